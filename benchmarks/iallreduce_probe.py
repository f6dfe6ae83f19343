"""Blocking MPI_Allreduce (what calibration times) against MPI_Iallreduce + Wait (what the
runner's data parallelism does, runner/dataparallel.py), in place, float32 sums, 2 ranks.

Usage: mpiexec -n 2 python benchmarks/iallreduce_probe.py [--repeats 10]
Prints per size the median of the slowest rank's seconds for each way, interleaved.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipesim.runner.collbench import time_allreduce

MIB = 2**20
SIZES = (1 * MIB, 4 * MIB, 13.6 * MIB, 32 * MIB, 64 * MIB)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    times: dict[tuple[float, bool], list[float]] = {(n, b): [] for n in SIZES for b in (True, False)}
    for round_ in range(2 + args.repeats):
        for n in SIZES:
            for blocking in (True, False):
                t = time_allreduce(comm, int(n), 1, warmup=0, blocking=blocking)[0]
                if round_ >= 2:
                    times[(n, blocking)].append(t)
    if comm.Get_rank() == 0:
        print(f"{'MiB':>6} {'Allreduce ms':>13} {'Iallreduce+Wait ms':>19} {'ratio':>6}")
        for n in SIZES:
            a, i = statistics.median(times[(n, True)]), statistics.median(times[(n, False)])
            print(f"{n / MIB:6.1f} {a * 1e3:13.3f} {i * 1e3:19.3f} {i / a:6.2f}")


if __name__ == "__main__":
    main()
