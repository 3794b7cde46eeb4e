"""Hand freed heap memory back to the operating system between model-sized steps.

Flower pulls and pushes a model as 5 MB chunks from worker threads. glibc's allocator
serves those from per-thread arenas and, once its dynamic ``mmap`` threshold has grown
past the chunk size, keeps what they free on its free lists instead of unmapping it: a
coordinator that has pulled three 440 MB replies one after the other keeps the resident
size of all three, although at most one is alive. Two remedies, both no-ops off glibc:
:func:`map_large_blocks` (at process start: blocks of 1 MiB and more get their own
mappings, returned to the OS when freed) and :func:`release_freed_memory`
(``malloc_trim(0)``: every whole free page of every arena). Measured in
``benchmarks.large_model``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from functools import cache

#: glibc's ``mallopt`` parameter for the mmap threshold (malloc.h: ``M_MMAP_THRESHOLD``).
_M_MMAP_THRESHOLD = -3


@cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """A glibc function, or None where the C library lacks it (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    return function


def map_large_blocks(threshold: int = 1 << 20) -> bool:
    """Serve allocations of ``threshold`` bytes and more from their own mappings (glibc).

    Fixes glibc's mmap threshold (by default it grows with the blocks freed, up to 32 MiB,
    after which 5 MB chunks stay on the heap). Call once at process start; True if set.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(threshold)))


def release_freed_memory() -> bool:
    """Return free heap pages to the OS (glibc only); True when some were released."""
    trim = _libc_function("malloc_trim")
    return bool(trim(ctypes.c_size_t(0))) if trim else False
