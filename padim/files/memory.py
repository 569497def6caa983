"""Keeping the resident memory of long loops flat on Linux, and reusable scratch buffers.

glibc's allocator keeps freed buffers (here: the backbone's activations, tens of MB each) in its heap;
from batch to batch the heap fragments and the process grows. ``malloc_trim`` hands the free pages
back to the system (it changes no setting). It costs well under a millisecond per call; elsewhere
it is a no-op. ``tune_malloc_for_scoring`` does change settings, process-wide: only on request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ctypes
import ctypes.util
import math
import os
import sys
from functools import lru_cache

if TYPE_CHECKING:  # annotations only: importing padim's decoding needs no torch
    import torch



@lru_cache(maxsize=1)
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # glibc's mallopt parameters (malloc.h)
LARGEST_MMAP_THRESHOLD = 32 << 20  # glibc refuses more on 64-bit systems
HEAP_TOP_PAD = 256 << 20  # address space only: pages count as resident once touched


@lru_cache(maxsize=1)
def tune_malloc_for_scoring() -> bool:
    """Asks glibc to serve buffers up to 32 MB from its heap, to keep freed memory for reuse and to
    grow its heap in 256 MB steps. Opt-in: the ``padim`` command calls it before it scores; the
    library itself never does (it would change its host process's allocator behind its back).

    Why: by default glibc's thresholds move with the allocation pattern, and a batch loop with
    buffers of 10-50 MB ends up returning its heap top to the system after one batch and faulting it
    back in during the next (batches then alternate between 28 and 37 ms per image). Fixed
    thresholds make scoring on the CPU 20-30 % faster. The padding stops what is left of it: with
    the default (128 kB) the heap still shrank and grew by ~200 MB per batch of 32, and the
    backbone's first touches of those pages made it ~25 % slower inside scoring than alone
    (efficientnet_lite0, 2 cores: 22 -> 17.5 ms per image; the process's peak grew by < 20 MB).
    Process-wide and kept (glibc cannot restore its moving thresholds), and inherited by forked
    workers: call it once, in a process that scores on the CPU, before scoring. Fits after it keep
    more freed memory (``padim benchmark`` accepts that for its later categories' fits; a process
    that only fits should not call it: fits trim the heap after every batch instead).
    PADIM_KEEP_MALLOC=1 makes it a no-op. Returns whether it was applied.
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt") or os.environ.get("PADIM_KEEP_MALLOC") == "1":
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, LARGEST_MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
                and libc.mallopt(M_TOP_PAD, HEAP_TOP_PAD))


def release_free_memory() -> None:
    """Returns the allocator's free memory to the operating system (glibc only)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class Workspace:
    """Scratch tensors reused from batch to batch, by name.

    Why: a fresh buffer of tens of MB is a fresh mmap on Linux, and the page faults of its first
    touch cost about as much as a pass of arithmetic over it. Scoring allocates three such buffers
    per batch (embeddings, centred embeddings, whitened embeddings); reusing them keeps the pages.
    """

    def __init__(self) -> None:
        self._buffers = {}

    def get(self, name: str, shape, dtype: torch.dtype, device) -> torch.Tensor:
        """A contiguous tensor of ``shape`` (contents undefined), sharing storage with earlier calls."""
        numel = math.prod(shape)
        buffer = self._buffers.get(name)
        import torch  # here: padim.files.decode imports this module, and decoding must not need torch (padim.runtime)

        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != torch.device(device):
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(tuple(shape))
