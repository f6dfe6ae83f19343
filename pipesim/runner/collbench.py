"""Timing the all-reduce for calibration as the runner's data parallelism calls it
(runner/dataparallel.py), over message sizes, on the whole world as one group (here D = 2
on one node).

Each size: a barrier, then one non-blocking MPI_Iallreduce of float32 sums, in place (as
the runner's gradient buffers), and its Wait, timed on every rank; a repetition's time is
the slowest rank's. Not the blocking MPI_Allreduce: Open MPI runs the two with different
algorithms (libnbc and tuned), and on the 2-core reference VM Iallreduce + Wait took 2.2x
as long from 13.6 MiB up (benchmarks/iallreduce_probe.py, 2026-12-08: 8.7 against 4.0 ms
at 13.6 MiB, 36 against 16 ms at 32 MiB), which is what the data-parallel validation's
under-predicted all-reduces had shown. `blocking=True` times MPI_Allreduce instead
(benchmarks/allreduce_law.py). Sizes of 4 KiB to 64 MiB, a few repeats for the large
ones: a few seconds in all.
"""

from __future__ import annotations

import time
from typing import Any

from .records import AllreduceSample

KiB, MiB = 1 << 10, 1 << 20
ALLREDUCE_SIZES = tuple(4 * KiB * 4**k for k in range(8))  # 4 KiB, 16 KiB, ..., 64 MiB


def repeats_for(nbytes: int, repeats: int) -> int:
    return repeats if nbytes < 4 * MiB else max(3, repeats // 4)


def time_allreduce(comm: Any, nbytes: int, repeats: int, warmup: int = 2, blocking: bool = False) -> list[float]:
    """Seconds of `repeats` in-place float32 all-reduces (SUM) of `nbytes`, the slowest rank's:
    Iallreduce + Wait as the runner calls it, or with `blocking` MPI_Allreduce."""
    import numpy as np
    from mpi4py import MPI

    buffer = np.ones(max(nbytes // 4, 1), dtype=np.float32)
    times = []
    for _ in range(warmup + repeats):
        comm.Barrier()
        start = time.perf_counter()
        if blocking:
            comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
        else:
            comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM).Wait()
        mine = time.perf_counter() - start
        buffer.fill(1.0)  # keep the values finite
        times.append(comm.allreduce(mine, op=MPI.MAX))
    return times[warmup:]


def measure_allreduce(comm: Any, sizes: tuple[int, ...], repeats: int) -> tuple[AllreduceSample, ...]:
    """Every size on the whole world (every rank takes part; all return the samples)."""
    group = tuple(range(comm.Get_size()))
    return tuple(AllreduceSample(group, n, tuple(time_allreduce(comm, n, repeats_for(n, repeats))))
                 for n in sizes)
