"""A progress bar on stderr for long runs (the CLI's, and the Python API's with progress=True)."""

from __future__ import annotations

import sys
from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]  # (label of the unit just done, done, total)


class ProgressBar:
    """A ProgressFn that draws a tqdm bar (over the linears, by default); close() it when the run ends."""

    def __init__(self, desc: str = "optimise", unit: str = "site"):
        self.desc, self.unit = desc, unit
        self._bar = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit=self.unit, desc=self.desc, file=sys.stderr, dynamic_ncols=True)
        self._bar.set_postfix_str(label)
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
