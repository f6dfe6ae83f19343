"""Per-layer F and B of fc stacks of several sizes, timed as calibration times its tables
(pipesim/runner/microbench.py: every rank times the same point at once, a barrier before
each, points interleaved over rounds), to see whether a stack's weight bytes change the
per-layer cost: the tables are timed on 16 MiB stacks.

Usage: mpiexec -n 2 python benchmarks/working_set_probe.py [--rounds 20]
Prints, per (width, micro-batch size, stack MiB), the median per-layer F and B (us) and
their ratio to the 16 MiB stack's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from mpi4py import MPI

from pipesim.model import fc_layer
from pipesim.runner.microbench import _time_once
from pipesim.runner.stage import make_stage

MIB = 2**20
SHAPES = ((288, 24), (448, 36), (640, 40))
STACKS_MIB = (1, 2, 4, 8, 16, 32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    points = []
    for width, mbs in SHAPES:
        for mib in STACKS_MIB:
            depth = max(1, round(mib * MIB / (4 * width * width)))
            stack = make_stage([fc_layer(width, width)] * depth, 0, 0)
            storages = {p.untyped_storage().data_ptr() for p in stack.parameters()}
            points.append({"width": width, "mbs": mbs, "mib": mib, "depth": depth, "stack": stack,
                           "storages": storages, "x": torch.randn(mbs, width, requires_grad=True), "f": [], "b": []})
    for round_ in range(args.warmup + args.rounds):
        for p in points:
            _time_once(p["stack"], p["x"], p["depth"], p["storages"])  # the point's stack back in cache
            comm.Barrier()
            f, b, _ = _time_once(p["stack"], p["x"], p["depth"], p["storages"])
            if round_ >= args.warmup:
                p["f"].append(f)
                p["b"].append(b)
    if comm.Get_rank() == 0:
        print(f"{'width':>5} {'mbs':>4} {'MiB':>4} {'depth':>5} {'F us':>8} {'B us':>8} {'F/F16':>6} {'B/B16':>6}")
        for width, mbs in SHAPES:
            rows = [p for p in points if p["width"] == width]
            ref = next(p for p in rows if p["mib"] == 16)
            f16, b16 = statistics.median(ref["f"]), statistics.median(ref["b"])
            for p in rows:
                f, b = statistics.median(p["f"]), statistics.median(p["b"])
                print(f"{width:5d} {mbs:4d} {p['mib']:4d} {p['depth']:5d} {f * 1e6:8.1f} {b * 1e6:8.1f} "
                      f"{f / f16:6.3f} {b / b16:6.3f}", flush=True)


if __name__ == "__main__":
    main()
