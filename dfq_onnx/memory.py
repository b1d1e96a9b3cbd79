"""Keeping resident memory at the size of one layer without paying for it in page faults.

glibc raises its mmap threshold after large buffers are freed, after which layer-sized arrays
come from the heap and stay resident when released. A fixed threshold keeps every large
buffer (> 4 MiB) in its own mapping, returned on free, and a trim after each layer returns the
rest. Smaller temporaries (the search loops keep theirs under 2 MiB) come from the heap, whose
free top is kept between allocations: returning it at once made every temporary a fresh
mapping, and zeroing those pages took half the CPU time (2B-shape layer 120 s -> 56 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 256 << 20


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def configure() -> None:
    """Fix the allocator's mmap threshold and keep the heap's free top (glibc only; elsewhere nothing to do)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release() -> None:
    """Return freed heap memory to the OS."""
    import gc

    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def available_bytes() -> int:
    """Memory the OS can give this process now without swapping (Linux MemAvailable; elsewhere the
    physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
