"""How the process's C allocator treats the large buffers a training step frees and takes again."""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
OPT_OUT = "QFORMER_GLIBC_MALLOC"


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for the next step instead of handing it back to the OS (glibc on Linux).

    glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it on
    free, so each step page-faults its large buffers in again, page by page: the [30523, 768] word-embedding
    gradient (94 MB, zero-filled three times a step), the out-of-place gradient sums of the 1408-wide cross-attention
    projections, the ViT-g activations. Serving them from the heap and never trimming it keeps those pages mapped
    between steps, as PyTorch's caching allocator does on CUDA; the process's resident memory then stays at its
    peak rather than falling between steps. Set QFORMER_GLIBC_MALLOC=default to keep glibc's own behaviour.

    Returns whether the settings were applied.
    """
    if os.environ.get(OPT_OUT) == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...): its allocator is left as it is
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
