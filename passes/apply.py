"""A plan applied to the graph: its passes in the order that fixes the bytes of the data file
(rotations, linears, gains, biases, embedding), run through onnx-ir's pass manager so every
pass's preconditions are checked before it edits anything."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.config import OutputFormat, Recipe
from dfq_onnx.errors import DfqError
from dfq_onnx.plan import UnitPlan

from .context import PlanContext
from .emit_matmulnbits import EmitMatMulNBits
from .emit_qdq import EmitQdq, RaiseOpsetForQdq
from .float_edits import FoldGains, MoveBiases, WriteFloatWeights
from .online_rotation import InsertOnlineRotations
from .quantized_embedding import GatherBlockQuantizedEmbedding, UnpackedEmbedding

EMIT = {OutputFormat.MATMULNBITS: EmitMatMulNBits, OutputFormat.QDQ: EmitQdq}
EMBEDDING = {OutputFormat.MATMULNBITS: GatherBlockQuantizedEmbedding, OutputFormat.QDQ: UnpackedEmbedding}


def passes_for(plan: UnitPlan, output_format: OutputFormat, context: PlanContext) -> list[ir.passes.PassBase]:
    out: list[ir.passes.PassBase] = []
    if plan.online:  # before the linears are replaced: it rewires their input
        out.append(InsertOnlineRotations(plan.online, context))
    if plan.quantized:
        out.append(EMIT[output_format](plan.quantized, context))
    if plan.float_weights:
        out.append(WriteFloatWeights(plan.float_weights, context))
    if plan.gains:
        out.append(FoldGains(plan.gains, context))
    if plan.biases:
        out.append(MoveBiases(plan.biases, context))
    if plan.embedding is not None:
        out.append(EMBEDDING[output_format](plan.embedding, plan.embedding_tied, context))
    return out


def apply_plan(model: ir.Model, plan: UnitPlan, output_format: OutputFormat, context: PlanContext) -> None:
    passes = passes_for(plan, output_format, context)
    if passes:
        run(passes, model)


def run(passes: list[ir.passes.PassBase], model: ir.Model) -> None:
    """The passes in order; a pass that failed on the disk (OSError) or on the model (DfqError) raises
    that error itself, not onnx-ir's PassError around it, so the caller says it in one line."""
    try:
        ir.passes.PassManager(passes)(model)
    except ir.passes.PassError as exc:
        cause = exc.__cause__
        while isinstance(cause, ir.passes.PassError):  # one wrapper per pass and one per step
            cause = cause.__cause__
        if isinstance(cause, (OSError, DfqError)):
            raise cause from None
        raise


# Where a QDQ model keeps the accuracy level its fused MatMulNBits should run at: ORT takes it from a
# session option only (session.qdq_matmulnbits_accuracy_level), so the deployer sets it from here.
QDQ_ACCURACY_KEY = "dfq_onnx.qdq_matmulnbits_accuracy_level"


def finish(model: ir.Model, recipe: Recipe, container_bits: set[int]) -> list[str]:
    """What the output format needs once every unit is applied (`container_bits`: those written);
    returns what the report should say about it."""
    if recipe.output_format != OutputFormat.QDQ or recipe.float_output:
        return []
    run([RaiseOpsetForQdq(min(container_bits, default=recipe.quant.container_bits))], model)
    if not recipe.accuracy_level:
        return []
    model.metadata_props[QDQ_ACCURACY_KEY] = str(recipe.accuracy_level)
    return [
        f"accuracy_level {recipe.accuracy_level}: a QDQ model cannot carry it in its nodes; it is in the model's metadata "
        f"({QDQ_ACCURACY_KEY}) and ONNX Runtime applies it with the session option "
        f"session.qdq_matmulnbits_accuracy_level={recipe.accuracy_level} (ORT's default for fused QDQ is 4)"
    ]
