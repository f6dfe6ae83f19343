"""glibc's allocator settings for every rank of a timed job: freed memory stays in the heap.

With glibc's defaults a large tensor (128 KiB and up, the threshold then grows with
the largest block freed) gets a fresh ``mmap`` and the heap's top is returned to the
kernel once 2 x that threshold is free, so a step whose activations reach a few MiB
keeps unmapping memory it maps again next micro-batch, and pays a page fault per
4 KiB page it touches anew. Calibration's tight loops reuse their blocks and do not
pay it, so such steps ran slower than predicted and varied between iterations:
vgg16-mini on one rank at a micro-batch of 64 measured 59.5-61.8 ms (p10-p90
55.9-65.0 ms) against 53.1 ms predicted; with the settings below 51.0-52.2 ms
(p10-p90 50.1-53.4 ms). Frameworks training on CPUs meet the same cost and change the
allocator for it (jemalloc or tcmalloc in torch's CPU performance guides); pipesim
keeps glibc and sets, for calibration and runs alike:

- ``M_MMAP_MAX`` 0: no block gets a mapping of its own, every one comes from the heap
  (a threshold would not do: glibc caps it at 32 MiB, and Open MPI's all-reduce
  allocates a scratch buffer the size of the message each call: fc32 x 512 on one
  rank per replica, two replicas, 32 MiB of gradients, measured 158.9-161.2 ms with the
  threshold at 32 MiB and 147.6-149.1 ms with no mappings);
- ``M_TRIM_THRESHOLD`` 1 GiB: freed heap memory is kept for the next micro-batch.

A process whose environment already sets ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_MAX_`` keeps what it set (the memory probe
fixes the mmap threshold at a page for its own job); ``PIPESIM_MALLOC=default`` keeps
glibc's defaults; without glibc nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30
ENVIRONMENT_KEYS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_MAX_")


def libc() -> Any | None:
    """glibc, or None elsewhere (it alone has malloc_trim and these mallopt parameters)."""
    name = ctypes.util.find_library("c")
    try:
        found = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return found if found is not None and hasattr(found, "malloc_trim") else None


def keep_freed_memory() -> str:
    """Apply the settings above to this process; says what it did (for the run's record)."""
    if any(key in os.environ for key in ENVIRONMENT_KEYS):
        return "glibc, as the environment sets it"
    if os.environ.get("PIPESIM_MALLOC") == "default":
        return "glibc defaults (PIPESIM_MALLOC=default)"
    found = libc()
    if found is None:
        return "the system's allocator (not glibc: unchanged)"
    ok = found.mallopt(M_MMAP_MAX, 0) == 1
    ok = found.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        return "glibc defaults (mallopt refused)"
    return f"glibc, no mmap per block, trim threshold {TRIM_THRESHOLD_BYTES >> 20} MiB"
