"""tools/ablation.py's rows: each one changes the default recipe in exactly the [method] keys it names,
and the recipe it writes is one dfq-onnx loads with those values (a renamed key fails here, not after
an hour of quantizing)."""
from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path

import pytest

from dfq_onnx import config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import ablation  # noqa: E402

KEYED_ROWS = [(key, change["keys"]) for key, _, change in ablation.ROWS if change.get("keys")]


@pytest.mark.parametrize("key,keys", KEYED_ROWS, ids=[k for k, _ in KEYED_ROWS])
def test_row_recipe_changes_only_its_keys(key, keys, tmp_path):
    default = config.load_recipe(str(ablation.DEFAULT_RECIPE)).method
    changed = config.load_recipe(str(ablation.recipe_with(keys, tmp_path / f"{key}.toml"))).method
    differing = {f.name for f in dataclasses.fields(default) if getattr(default, f.name) != getattr(changed, f.name)}
    assert differing == {k for k in keys if str(getattr(default, k)) != str(getattr(changed, k))}
    assert differing, f"row {key} changes nothing in the default recipe"
    for name, value in keys.items():
        got = getattr(changed, name)
        expected = tomllib.loads(f"v = {value}")["v"]  # the value as the recipe parser reads it
        expected = tuple(expected) if isinstance(expected, list) else expected
        assert got == expected or getattr(got, "value", None) == expected, (name, got, expected)


def test_unknown_key_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no setting 'no_such_key'"):
        ablation.recipe_with({"no_such_key": "1"}, tmp_path / "r.toml")


def test_builtin_rows_name_real_recipes_and_methods():
    for key, _, change in ablation.ROWS:
        if "recipe" in change:
            assert change["recipe"] in config.builtin_recipes(), key
        if "method" in change:
            assert change["method"] in {m.value for m in config.Method}, key
