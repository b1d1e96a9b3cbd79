"""The roles a linear plays in a decoder layer: the one list recipes, the report and the matcher use
(its order is the report's)."""

from __future__ import annotations

import enum


class Role(str, enum.Enum):
    Q = "q"
    K = "k"
    V = "v"
    QKV = "qkv"
    O = "o"
    GATE = "gate"
    UP = "up"
    GATE_UP = "gate_up"  # gate and up columns in one linear (Phi-3), split after the MatMul
    DOWN = "down"
    LM_HEAD = "lm_head"
    OTHER = "other"


ROLES = tuple(r.value for r in Role)
