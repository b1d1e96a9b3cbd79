from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny(tiny_root):
    """tiny(style) -> path of the tiny Gemma 2 exported in that style (built once per session)."""

    def get(style: str) -> Path:
        return tiny_models.export(style, tiny_root)

    return get


@pytest.fixture(scope="session")
def tiny_family(tiny_root):
    """tiny_family(family, style) -> path of that family's tiny model in that export style (built once
    per session). Where the exporter cannot build the family, the test is skipped with its error."""

    def get(family: str, style: str) -> Path:
        try:
            return tiny_models.build(family, style, tiny_root)
        except tiny_models.ExportUnsupported as exc:
            pytest.skip(f"{family} / {style}: {exc}")

    return get


def file_digests(model: Path) -> dict[str, str]:
    """Hashes of a model file and every file beside it (its external data), to prove nothing changed."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model.parent.iterdir())
        if p.is_file()
    }
