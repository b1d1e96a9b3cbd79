"""Whether a group of linears that read one activation (gate/up, or down) takes an online block
rotation of that activation: it costs time at inference, so it is kept only where it lowers the
group's proxy by `online_min_gain`.

The comparison needs the group rounded both ways. Without the rotation it is wanted only when the
rotation is refused, so it is first rounded on a sample of columns (GPTQ rounds columns
independently, and the proxy is a sum over them): where the rotated rounding, measured on the same
columns, wins by a clear margin, the sample decides; otherwise both are rounded whole and compared.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import keeps
from . import learn, transforms
from .site import Rounding, SiteOutcome

SAMPLE_STRIDE = 4  # every 4th column: a quarter of the unrotated rounding's cost
SAMPLE_MARGIN = 0.05  # the sample decides alone only this far past the threshold (a ratio of sums)

Make = Callable[..., dict[str, SiteOutcome]]  # make(t=None, tag=None, columns=None, sample=None)


def choose_online(make: Make, plain: dict[str, SiteOutcome] | None, k: int, device, how: Rounding,
                  online: dict[str, torch.Tensor], learn_from=None) -> dict[str, SiteOutcome]:  # fmt: skip
    """The group's outcomes: rotated where the rotation pays (its block goes into `online` per
    site), else `plain` (rounded here when None). `make(t, tag, columns=s, sample=s)` rounds the
    group with the online block t; `columns` = s: every s-th column only; `sample` = s: whole, with
    the error over every s-th column kept. `learn_from()` -> (weights as the rotation sees them,
    their H, the activation dtype) lets a learned general block start from the rotation."""
    config = how.config
    b = transforms.online_block_size(k, config.online_block)
    if b is None:
        return plain if plain is not None else make()
    t = how.block(b, device)
    sample = None if plain is not None or config.force_transforms else SAMPLE_STRIDE
    rotated = make(t, f"online-{config.rotation.value}{b}", sample=sample)
    if learn_from is not None and config.learned_online_steps > 0:
        weights, h, dtype = learn_from()
        start = t.expand(k // b, b, b)
        found = learn.learn_online(weights, h, how.fmt, start, config.learned_online_steps, config.learned_online_lr, dtype)
        if found.moved or config.force_transforms:
            trial = make(found.value, f"online-learned{b}", sample=sample)
            if keeps(config, _total(trial), _total(rotated)):
                rotated, t = trial, found.value
    keep = config.force_transforms
    if not keep and plain is None:
        estimate = make(columns=SAMPLE_STRIDE)  # the unrotated rounding of the same columns
        after = sum(o.sample_error for o in rotated.values())
        keep = after < (1.0 - config.online_min_gain - SAMPLE_MARGIN) * _total(estimate)
    if not keep:
        plain = plain if plain is not None else make()
        keep = _total(rotated) < (1.0 - config.online_min_gain) * _total(plain)
    if not keep:
        return plain
    online.update({name: t for name in rotated})
    return rotated


def _total(outcomes: dict[str, SiteOutcome]) -> float:
    return sum(o.error for o in outcomes.values())
