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
    per session). A cell declared unsupported at export (tiny_models.UNSUPPORTED) is skipped with its
    reason once the exporter fails as declared; it fails if it exports, and so does every other cell
    whose export fails."""

    def get(family: str, style: str) -> Path:
        declared = tiny_models.UNSUPPORTED.get((family, style))
        if declared is not None and declared.stage != "export":
            declared = None
        try:
            model = tiny_models.build(family, style, tiny_root)
        except tiny_models.ExportFailed as exc:
            if declared is None:
                pytest.fail(f"{family} / {style}: the export failed and no limitation is declared for it: {exc}")
            if not declared.shown_by(str(exc)):
                pytest.fail(f"{family} / {style}: declared unsupported ({declared.error!r}), but the export failed otherwise: {exc}")
            pytest.skip(f"{family} / {style}: {declared.reason} ({exc})")
        if declared is not None:
            pytest.fail(f"{family} / {style} is declared unsupported ({declared.reason}) but exported: "
                        "take it out of tiny_models.UNSUPPORTED and the README's support table")
        return model

    return get


def file_digests(model: Path) -> dict[str, str]:
    """Hashes of a model file and every file beside it (its external data), to prove nothing changed."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(model.parent.iterdir())
        if p.is_file()
    }
