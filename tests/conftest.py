from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-gemma2")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """tiny(style) -> path of the tiny Gemma 2 exported in that style (built once per session)."""

    def get(style: str) -> Path:
        return tiny_models.export(style, tiny_root)

    return get


def file_digests(model: Path) -> dict[str, str]:
    """Hashes of a model file and every file beside it (its external data), to prove nothing changed."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model.parent.iterdir())
        if p.is_file()
    }
