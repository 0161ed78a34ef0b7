"""Keep memory that PyTorch frees inside the process while CPU training or inference runs.

glibc's malloc serves every allocation above 32 MB (one 64^3 x 48-channel activation is 50 MB)
with a fresh ``mmap`` and unmaps it when it is freed, so each training step faults all of its
large activations into memory again, page by page. On the benchmark machine a BaselineUNet3D
step (base 48, patch 64, 2 threads) took 0.64 M page faults and 1.3 s of system time; with
``keep_freed_memory`` about a thousand and 0.04 s, and the step took 0.79 of the time (patch 96:
0.72; a 128^3 inference window: 0.62; ``benchmarks/bench_host_memory.py``, BENCHMARKS.md).

Inside the context, malloc takes large blocks from its heap instead of ``mmap`` and does not
give freed heap memory back to the OS, so the next step reuses it. On leaving, glibc's
defaults are restored and the free memory is returned (``malloc_trim``). Elsewhere than glibc
(macOS, Windows, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

# mallopt parameters and glibc's defaults (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
NO_TRIMMING = -1  # as M_TRIM_THRESHOLD: never give free heap memory back while active


def _glibc() -> Optional[ctypes.CDLL]:
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def set_freed_memory_kept(keep: bool) -> bool:
    """Switch glibc's malloc to keeping freed memory (no mmap for large blocks, no trimming) or
    back to its defaults. Returns whether glibc took the setting (False elsewhere). Memory kept so
    far stays in the process until ``malloc_trim`` (``keep_freed_memory`` calls it on leaving)."""
    libc = _glibc()
    if libc is None:
        return False
    if keep:
        return libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NO_TRIMMING) == 1
    return (libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX) == 1
            and libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD) == 1)


@contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """Context: freed host memory is kept for reuse (glibc only). Yields whether it is active."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    active = set_freed_memory_kept(True)
    try:
        yield active
    finally:
        set_freed_memory_kept(False)
        libc.malloc_trim(0)
