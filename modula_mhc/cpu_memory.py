"""Keep freed CPU memory in the process instead of handing it back to the OS after every step.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large requests with fresh
``mmap`` pages, or trims its heap once the free space at its top passes a threshold, so a training
step that frees and reallocates the same large activations pays a page fault per 4 KiB page on
every step. Measured on the 2-core development CPU (1 thread, CPU time of forward + backward,
medians of 31, three runs each): an mHC layer at 4096 tokens × 4 streams × width 256 (16 MiB
stream tensors) took 123–126 ms with glibc's defaults and 99–120 ms with freed memory retained;
its plain residual twin 31–41 ms either way. A 64 MiB tensor allocated, filled and freed again
faults 16 385 pages per round with the defaults, 0–4 096 retained (tests/test_cpu_memory.py).

:func:`retain_freed_memory` is a process-wide setting, so the library never calls it on import:
the ``modula-mhc`` command calls it for CPU runs, the mHC and training-step benchmarks call it for every method they
compare (``--system-malloc`` measures without it), and a user's own script may call it. The cost
is the usual one of a caching allocator: the process keeps its peak memory until it exits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["retain_freed_memory"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: the largest trim threshold mallopt accepts (an int): 2 GiB of free heap top is kept
_TRIM_MAX = 2**31 - 1


def retain_freed_memory() -> bool:
    """Make glibc's malloc serve every request from its heap (M_MMAP_MAX = 0) and never trim it
    below 2 GiB of free space (M_TRIM_THRESHOLD): freed tensors' pages are reused, not faulted in
    again. Returns True when applied; False where the C library is not glibc (macOS, Windows,
    musl), which changes nothing. Idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl has no such symbol  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_MAX))
