"""How many threads the optimisation computes with, held fixed for a run.

The bytes a run writes depend on torch's thread count: a float sum split over more threads is
added in another order (reductions, Cholesky). A run therefore names its count (by default
torch's, all cores), records it in its checkpoint, and every worker of a distributed run computes
with the driver's count, so each unit is rounded exactly as a local run would round it. The
compiled GPTQ loops split work by column, so their results do not depend on the count.
"""

from __future__ import annotations

import contextlib

import torch


def resolved(threads: int | None) -> int:
    """The count a run uses: the one asked for, or torch's current one."""
    return threads if threads is not None else torch.get_num_threads()


@contextlib.contextmanager
def computing_with(threads: int):
    """torch (and the compiled loops) with `threads` threads inside the block, restored after."""
    previous = torch.get_num_threads()
    set_threads(threads)
    try:
        yield
    finally:
        set_threads(previous)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    import numba  # the compiled loops' pool: at most the threads it was started with

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
