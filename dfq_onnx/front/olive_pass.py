"""dfq-onnx as an Olive pass: `DfqOnnxQuantization` quantizes an ONNX model inside an Olive workflow.

Install with `pip install dfq-onnx[olive]` (olive-ai >= 0.13). Olive finds a pass only through a
package config, and `olive.workflows.run(config, package_config=...)` / `olive run --package-config`
*replace* Olive's own config rather than extend it. `package_config()` returns Olive's built-in
config with this pass added, so a workflow can mix built-in passes and this one:

    from olive.workflows import run
    from dfq_onnx.front.olive_pass import package_config

    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": "model.onnx"},
        "passes": {"quantize": {"type": "DfqOnnxQuantization", "recipe": "cafeq-int4-cuda", "bits": 4}},
        "output_dir": "out",
    }
    run(workflow, package_config=package_config())

From the command line (olive-ai 0.13 has `olive run --package-config FILE`), write the merged
config to a file first:

    python -m dfq_onnx.front.olive_pass olive_packages.json
    olive run --config workflow.json --package-config olive_packages.json

(`dfq_onnx/front/olive_config.json` alone also works as the package config when the workflow uses no
built-in pass.) Parameters are those of `dfq_onnx.quantize`; None keeps the recipe's value. The
pass writes `<input name>.onnx`, its `<input name>.onnx.data` and the JSON report into the pass's
output folder. Olive keys its cache on the parameter values: after editing a TOML recipe that a
workflow names by path, clear Olive's cache (`"clean_cache": true`) or it reuses the old result.

This module imports olive at the top: only Olive imports it (through the package config).
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.package_config import OlivePackageConfig
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam, PassParamDefault
from olive.resource_path import LocalFolder
from olive.search.search_parameter import SearchParameter, SpecialParamValue
from pydantic import model_validator

from ..config import DEFAULT_RECIPE, load_recipe
from ..errors import DfqError, Interrupted
from .api import check_budget, quantize
from .options import BUDGET_OPTIONS, RECIPE_OPTIONS, budget_settings, recipe_overrides

logger = logging.getLogger(__name__)

_OVERRIDE_TYPES = {o.name: (o.type_, o.help) for o in RECIPE_OPTIONS}
# A size budget instead of one format (dfq-onnx optimize --target-bits/--target-size): a format per linear.
_BUDGET_TYPES = {o.name: (o.type_, o.help) for o in BUDGET_OPTIONS}


class DfqOnnxQuantization(Pass):
    """Data-free low-bit weight quantization of an exported decoder LLM (dfq-onnx)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        config = {
            "recipe": PassConfigParam(
                type_=str, default_value=DEFAULT_RECIPE, description="built-in recipe name or TOML recipe path"
            ),
        }
        for name, (type_, description) in _OVERRIDE_TYPES.items():
            config[name] = PassConfigParam(
                type_=type_, default_value=None, description=f"{description}; None keeps the recipe's value"
            )
        for name, (type_, description) in _BUDGET_TYPES.items():
            config[name] = PassConfigParam(type_=type_, default_value=None, description=f"{description}; None: no budget")
        config["device"] = PassConfigParam(type_=str, default_value="cpu", description="torch device: cpu, cuda, cuda:N")
        config["verify"] = PassConfigParam(
            type_=str, default_value="auto", description="check before publishing: auto, compare, run or none"
        )
        return config

    @classmethod
    def _validators(cls):
        # Reject a bad recipe or setting when Olive builds the pass config, before earlier passes run.
        return {"validate_recipe": model_validator(mode="after")(_check_recipe)}

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        source = Path(model.model_path)
        target = Path(resolve_onnx_path(output_model_path, source.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            report = quantize(
                source,
                target,
                recipe=config.recipe,
                device=config.device,
                verify=config.verify,
                progress=_log_progress,
                **_budget(config),
                **_overrides(config),
            )
        except DfqError as exc:
            # Olive re-raises ValueError to the caller but logs and swallows most other errors.
            raise ValueError(f"dfq-onnx: {exc}") from exc
        except Interrupted as exc:
            # Stop the whole workflow, as Ctrl-C does; Olive would otherwise carry on without output.
            raise KeyboardInterrupt(str(exc)) from exc
        logger.info("dfq-onnx wrote %s (%.3f bits per weight)", target, report.totals()["bits_per_weight"])
        # A folder: the external data and the report lie beside the model.
        return ONNXModelHandler(model_path=LocalFolder({"path": target.parent}), onnx_file_name=target.name)


def _overrides(config) -> dict[str, Any]:
    return recipe_overrides(config)


def _budget(config) -> dict[str, Any]:
    return budget_settings(config)


def _check_recipe(config):
    values = [config.recipe, *_overrides(config).values(), *_budget(config).values()]
    placeholders = (SearchParameter, PassParamDefault, SpecialParamValue)
    if not any(isinstance(v, placeholders) for v in values):  # checked once Olive has fixed the values
        try:
            load_recipe(config.recipe or DEFAULT_RECIPE).with_overrides(**_overrides(config))
            budget = _budget(config)
            check_budget(budget["target_bits"], budget["target_size"], budget["target_formats"], budget["target_weighting"])
        except DfqError as exc:
            raise ValueError(f"dfq-onnx: {exc}") from None
    return config


def _log_progress(label: str, done: int, total: int) -> None:
    logger.debug("dfq-onnx: %s (%d/%d)", label, done, total)


def package_config(path: str | Path | None = None) -> dict:
    """Olive's built-in package config with DfqOnnxQuantization added; also written to `path` if given."""
    merged = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    ours = json.loads(resources.files(__package__).joinpath("olive_config.json").read_text())
    merged.setdefault("passes", {}).update(ours["passes"])
    merged.setdefault("extra_dependencies", {}).update(ours.get("extra_dependencies", {}))
    if path is not None:
        Path(path).write_text(json.dumps(merged, indent=2) + "\n")
    return merged


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m dfq_onnx.front.olive_pass OUTPUT.json  (writes Olive's package config plus this pass)")
    package_config(sys.argv[1])
