"""Blocking MPI_Allreduce (what calibration times) against MPI_Iallreduce + Wait (what the
runner's data parallelism does, runner/dataparallel.py), in place, float32 sums, 2 ranks.

Usage: mpiexec -n 2 python benchmarks/iallreduce_probe.py [--repeats 10]
Prints per size the median of the slowest rank's seconds for each way, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from mpi4py import MPI

MIB = 2**20
SIZES = (1 * MIB, 4 * MIB, 13.6 * MIB, 32 * MIB, 64 * MIB)


def timed(comm, buffer, blocking: bool) -> float:
    comm.Barrier()
    start = time.perf_counter()
    if blocking:
        comm.Allreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)
    else:
        comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM).Wait()
    mine = time.perf_counter() - start
    buffer.fill(1.0)
    return comm.allreduce(mine, op=MPI.MAX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    buffers = {n: np.ones(int(n) // 4, dtype=np.float32) for n in SIZES}
    times = {(n, b): [] for n in SIZES for b in (True, False)}
    for round_ in range(2 + args.repeats):
        for n in SIZES:
            for blocking in (True, False):
                t = timed(comm, buffers[n], blocking)
                if round_ >= 2:
                    times[(n, blocking)].append(t)
    if comm.Get_rank() == 0:
        print(f"{'MiB':>6} {'Allreduce ms':>13} {'Iallreduce+Wait ms':>19} {'ratio':>6}")
        for n in SIZES:
            a, i = statistics.median(times[(n, True)]), statistics.median(times[(n, False)])
            print(f"{n / MIB:6.1f} {a * 1e3:13.3f} {i * 1e3:19.3f} {i / a:6.2f}")


if __name__ == "__main__":
    main()
