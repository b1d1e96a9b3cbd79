"""A plan applied to the graph: its passes in the order that fixes the bytes of the data file
(rotations, linears, gains, biases, embedding), run through onnx-ir's pass manager so every
pass's preconditions are checked before it edits anything."""

from __future__ import annotations

import onnx_ir as ir

from dfq_onnx.config import OutputFormat, Recipe
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
        ir.passes.PassManager(passes)(model)


def finish(model: ir.Model, recipe: Recipe) -> None:
    """What the output format needs once every unit is applied."""
    if recipe.output_format == OutputFormat.QDQ and not recipe.float_output:
        ir.passes.PassManager([RaiseOpsetForQdq(recipe.quant.container_bits)])(model)
