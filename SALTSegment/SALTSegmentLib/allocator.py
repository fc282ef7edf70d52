"""How the process gets memory for tensors: huge pages for large ones (default), and a low-memory opt-in.

Large tensors on transparent huge pages (Linux, the default of every
``saltsegment`` command): glibc serves each large tensor from a fresh
mapping and unmaps it on free, so every training step faults its
activations in again, 4 KiB at a time. Asking PyTorch to place tensors of
2 MiB or more on transparent huge pages (its ``THP_MEM_ALLOC_ENABLE``,
read once, before the first tensor is allocated) makes each fault map
2 MiB: the memory is still returned on free, and most of the page faults that
were over a quarter of the CPU time go (``python scripts/measure_allocator.py``;
its numbers are in the README, "Performance"). It needs the kernel's huge pages on
``always`` or ``madvise`` (most Linux distributions); elsewhere nothing
changes. ``THP_MEM_ALLOC_ENABLE=0`` in the environment turns it off.

Opt-in (``SALTSEGMENT_LOW_MEMORY=1``): give large freed buffers back to the operating system (glibc).

Training allocates and frees many tensors of a few MB per step. glibc keeps
freed blocks below its adaptive mmap threshold in the heap, where
fragmentation holds on to them. Serving every block of 128 KiB or more from
its own mapping returns it on free, at the price of page faults on every
reuse. Measured on the embedded sample (train, five slices, 8 steps, one
thread, three runs side by side on the same machine): peak RSS 4.08 GB ->
3.20 GB, but CPU time 49 s -> 86 s (user time the same, system time 15 s ->
49 s). Too slow to be the default; worth it where memory is what stops a
run. Other platforms (and other C libraries) are left alone.

The opposite, keeping every freed block (mmap and trim thresholds of
2 GiB), measured on ``saltsegment demo`` on a 2-core CPU without bf16:
695 s -> 579 s (system time 168 s -> 6 s), the same Dice, but peak RSS
3.96 GB -> 4.37 GB, over the demo's 4 GB budget. The test suite keeps its
freed memory (Makefile); the product keeps glibc's default.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_MMAP_THRESHOLD = -3          # glibc mallopt parameter
THRESHOLD_BYTES = 128 * 1024


LOW_MEMORY_VARIABLE = "SALTSEGMENT_LOW_MEMORY"
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"       # PyTorch's switch (c10's CPU allocator), read once


def use_huge_pages_for_large_tensors() -> bool:
    """On Linux, ask PyTorch to put tensors of 2 MiB or more on transparent huge pages; True if it will.

    Must run before torch allocates its first tensor (before ``import
    torch``): PyTorch reads the switch once. A value the user set, 0
    included, is kept.
    """
    if not sys.platform.startswith("linux"):
        return False
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
    return os.environ[HUGE_PAGES_VARIABLE] == "1" and "torch" not in sys.modules


def return_large_blocks_to_the_system() -> bool:
    """If ``SALTSEGMENT_LOW_MEMORY=1``, ask glibc to map blocks of 128 KiB or more separately; True if it did."""
    if os.environ.get(LOW_MEMORY_VARIABLE, "") != "1" or not sys.platform.startswith("linux"):
        return False
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    try:
        libc = ctypes.CDLL(library)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
