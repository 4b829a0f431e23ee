"""Host (CPU) memory allocator settings for training on CPU.

PyTorch's CPU tensors come straight from malloc. With glibc's defaults, large blocks are
mmap'ed and unmapped on free, and free memory at the top of the heap is returned to the OS
once it exceeds a (dynamically adjusted) trim threshold, so a training step that frees and
re-allocates the same activations every step keeps taking fresh pages from the kernel: page
faults and zero-filling on first touch. cola_tiny took ~44k page faults per step (~170 MB of
fresh pages) and the 4-layer character GPT of bench/ar_vs_nanogpt.py ~1k per forward and
backward of its blocks. `retain_freed_memory` fixes glibc's mmap threshold at its maximum
(32 MiB: smaller blocks come from the heap) and stops heap trimming, so freed memory is reused
by the next step. The process keeps its peak memory; results are unchanged.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit (HEAP_MAX_SIZE / 2)
_applied = False


def retain_freed_memory() -> bool:
    """Apply the glibc malloc settings above to this process (idempotent). Returns whether
    they are in effect (False off Linux/glibc)."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _applied
