"""How many threads the optimisation computes with, fixed before torch starts.

The bytes a run writes depend on torch's thread count: a float sum split over more threads is
added in another order (reductions, Cholesky). So a run names its count (by default torch's, all
cores), records it in its checkpoint, and the workers of a distributed run are started with the
driver's count: each unit is rounded exactly as a local run would round it. The compiled GPTQ
loops split work by column, so their results do not depend on it.

The count is set through the environment before torch is imported, never by
torch.set_num_threads: that call turns MKL's dynamic threading off, after which the batched LU
factorisations the method uses (inverses of 8 x 256 x 256 blocks) fail inside torch's parallel
loops with this MKL ("Parameter 6 was incorrect on entry to DLASWP") and can hang.
"""

from __future__ import annotations

import os
import sys

from .errors import DfqError

VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def use(threads: int | None) -> int:
    """The count this process computes with: `threads` when torch has not started yet (it is then
    started with it), or torch's own count, which `threads` must equal once torch is running."""
    if threads is not None and threads < 1:
        raise DfqError(f"--threads {threads}: give a positive number of threads")
    if threads is not None and "torch" not in sys.modules:
        os.environ.update(environment(threads))
    import torch

    current = torch.get_num_threads()
    if threads is not None and threads != current:
        raise DfqError(
            f"threads={threads}, but this process already computes with {current} torch threads; start it with "
            f"OMP_NUM_THREADS={threads} (torch's thread count cannot be changed safely once it runs)"
        )
    return current


def environment(threads: int) -> dict[str, str]:
    """What starts a process (a Ray worker) computing with `threads` threads."""
    return {name: str(threads) for name in VARIABLES}
