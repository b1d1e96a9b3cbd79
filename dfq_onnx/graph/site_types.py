"""What the matcher finds: linears and their roles, attention and MLP structure, norms, the embedding."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ..roles import Role


FUSED_ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "PagedAttention"}


FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclasses.dataclass
class WeightSource:
    """Where a linear's W[K, N] lives: an initializer, maybe seen through Transpose / Cast."""

    initializer: str
    transposed: bool  # W = initializer^T
    dtype: str
    via: list[str]  # names of the Transpose / Cast nodes in between


@dataclasses.dataclass
class Linear:
    node: str
    op_type: str
    k: int
    n: int
    weight: WeightSource
    role: Role = Role.OTHER
    layer: int | None = None
    bias: str | None = None  # the [N] bias initializer: Gemm's C input, or the constant of an Add right after
    bias_add: str | None = None  # that Add node, when the bias is a node of its own (MatMul -> Add)


@dataclasses.dataclass
class NormGain:
    """A multiplicative per-channel gain right before a group of linears (RMSNorm's gamma)."""

    node: str
    op_type: str
    input_index: int
    initializer: str
    plus_one: bool  # the graph computes gain = 1 + w from the initializer w
    consumers: list[str]
    exclusive: bool  # the normalised output feeds only these linears: folding is exact


@dataclasses.dataclass
class Attention:
    layer: int
    kind: str  # fused op type, or "decomposed"
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # packed q|k|v columns in one linear
    qkv_split: tuple[int, int, int] | None = None
    o: str | None = None
    rope: str = "unknown"  # "half" (pairs i, i + d/2), "interleaved", "none", "unknown"
    rotary_dim: int | None = None
    qk_norm: bool = False
    input_norm: NormGain | None = None
    output_norm: NormGain | None = None  # a norm on the attention output before the residual add (Gemma)

    @property
    def group_size(self) -> int | None:
        if self.num_heads and self.num_kv_heads:
            return self.num_heads // self.num_kv_heads
        return None


@dataclasses.dataclass
class Mlp:
    layer: int
    gate: str
    up: str
    down: str
    activation: str
    input_norm: NormGain | None = None
    output_norm: NormGain | None = None
    # One fused linear (gate == up): the column ranges [start, end) of its gate and up halves.
    gate_columns: tuple[int, int] | None = None
    up_columns: tuple[int, int] | None = None

    @property
    def fused(self) -> bool:
        return self.gate == self.up


@dataclasses.dataclass
class Embedding:
    node: str
    initializer: str
    transposed: bool  # Gather reads Transpose(initializer)
    vocab: int
    hidden: int
    tied: bool = False  # lm_head reads the same initializer


@dataclasses.dataclass
class PairSite:
    """Two linears that multiply each other, recorded for paired transforms."""

    kind: str  # "vo", "up_down", "qk"
    layer: int
    first: str
    second: str
    detail: dict


@dataclasses.dataclass
class ModelSites:
    linears: dict[str, Linear]
    attentions: list[Attention]
    mlps: list[Mlp]
    embedding: Embedding | None
    lm_head: str | None
    vocab: int | None
    style: str
    notes: list[str]
    embedding_scale: float = 1.0  # the constant the embedding lookup is multiplied by
    lm_head_norm: NormGain | None = None  # the final norm's gain in front of the lm_head
    # Past-KV graph inputs of sliding-window layers whose cache has a fixed capacity (the onnxruntime-genai
    # builder's default windowed cache): input name -> capacity the runtime allocates.
    kv_windows: dict[str, int] = dataclasses.field(default_factory=dict)
    # Linears the matcher could not place in a layer's structure, and why (they get no pairing).
    unmatched: dict[str, str] = dataclasses.field(default_factory=dict)

    def by_role(self, role: Role) -> list[Linear]:
        return [lin for lin in self.linears.values() if lin.role == role]

    def layers(self) -> list[int]:
        return sorted({lin.layer for lin in self.linears.values() if lin.layer is not None})

    def pairs(self) -> list[PairSite]:
        out: list[PairSite] = []
        for att in self.attentions:
            v = att.v or att.qkv
            q = att.q or att.qkv
            k = att.k or att.qkv
            if v and att.o and att.head_dim and att.num_kv_heads:
                out.append(PairSite("vo", att.layer, v, att.o, self._vo_detail(att)))
            if q and k and att.head_dim:
                out.append(
                    PairSite(
                        "qk",
                        att.layer,
                        q,
                        k,
                        {"rope": att.rope, "qk_norm": att.qk_norm, "applies": att.rope == "half" and not att.qk_norm},
                    )
                )
        for mlp in self.mlps:
            out.append(PairSite("up_down", mlp.layer, mlp.up, mlp.down, {}))
        return out

    @staticmethod
    def _vo_detail(att: Attention) -> dict:
        d, g = att.head_dim, att.group_size or 1
        v_offset = (att.qkv_split[0] + att.qkv_split[1]) if att.qkv and att.qkv_split else 0
        heads = []
        for j in range(att.num_kv_heads):
            heads.append(
                {
                    "kv_head": j,
                    "v_columns": [v_offset + j * d, v_offset + (j + 1) * d],
                    "o_rows": [[h * d, (h + 1) * d] for h in range(j * g, (j + 1) * g)],
                }
            )
        return {"head_dim": d, "group_size": g, "heads": heads}

