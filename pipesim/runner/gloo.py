"""The gloo transport's costs, measured inside an MPI job (`pipesim calibrate
--transport gloo`): torch.distributed point-to-point over gloo between
neighbouring ranks (the ping-pong the MPI links get), and the step times of
torch.distributed.pipelining's own 1F1B on the calibration's probe pipeline,
from which calibrate.py derives gloo's per-action overhead.

MPI only starts the ranks and gathers the results; every timed message goes
through gloo.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .config import GlooBenchConfig
from .interpreter import clock
from .records import GlooResult, LinkSample


def init_gloo(comm: Any) -> None:
    """One gloo process group over the MPI world, on a free port rank 0 picks."""
    port = None
    if comm.Get_rank() == 0:
        with socket.socket() as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
    hosts = comm.allgather(socket.gethostname())
    os.environ["MASTER_ADDR"] = "127.0.0.1" if len(set(hosts)) == 1 else hosts[0]
    os.environ["MASTER_PORT"] = str(comm.bcast(port, root=0))
    dist.init_process_group("gloo", rank=comm.Get_rank(), world_size=comm.Get_size())


def _pingpong(peer: int, nbytes: int, repeats: int, leader: bool) -> list[float]:
    buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8)
    times = []
    for _ in range(repeats + 2):
        start = clock()
        if leader:
            dist.send(buffer, dst=peer)
            dist.recv(buffer, src=peer)
        else:
            dist.recv(buffer, src=peer)
            dist.send(buffer, dst=peer)
        times.append((clock() - start) / 2)
    return times[2:]


def time_links(config: GlooBenchConfig, comm: Any) -> list[LinkSample]:
    rank, size = comm.Get_rank(), comm.Get_size()
    samples = []
    for left in range(size - 1):
        comm.Barrier()
        if rank not in (left, left + 1):
            continue
        for nbytes in config.message_sizes:
            repeats = config.pingpong_repeats if nbytes < (1 << 22) else max(3, config.pingpong_repeats // 4)
            times = _pingpong(left + 1 if rank == left else left, nbytes, repeats, leader=rank == left)
            if rank == left:
                samples.append(LinkSample((left, left + 1), nbytes, tuple(times), ()))
    return samples


def _probe_schedule(config: GlooBenchConfig, rank: int, size: int) -> tuple[Any, torch.optim.Optimizer]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    torch.manual_seed(config.seed * 1009 + rank)
    width = config.probe_width
    layers: list[nn.Module] = []
    for _ in range(config.probe_layers_per_stage):
        layers += [nn.Linear(width, width), nn.ReLU()]
    module = nn.Sequential(*layers)
    stage = PipelineStage(module, rank, size, torch.device("cpu"))
    m = config.probe_microbatches

    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.mse_loss(output, target) / m  # pipesim's arithmetic

    schedule = Schedule1F1B(stage, m, loss_fn=loss_fn, scale_grads=False)
    return schedule, torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)


def probe_steps(config: GlooBenchConfig, comm: Any) -> list[float] | None:
    """torch 1F1B steps of the probe pipeline, in the runner's timing window
    (zero_grad, barrier, then schedule step + optimizer step; latest end minus
    earliest start over the ranks, on rank 0's clock). None off rank 0."""
    from .worker import clock_offsets

    rank, size = comm.Get_rank(), comm.Get_size()
    schedule, optimizer = _probe_schedule(config, rank, size)
    generator = torch.Generator().manual_seed(config.seed)
    batch = config.probe_microbatches * config.probe_mb_size
    x = torch.randn(batch, config.probe_width, generator=generator)
    target = torch.randn(batch, config.probe_width, generator=generator)
    args = (x,) if rank == 0 else ()
    kwargs: dict[str, Any] = {"return_outputs": False}
    if rank == size - 1:
        kwargs["target"] = target
    spans = []
    for i in range(config.warmup + config.iterations):
        optimizer.zero_grad(set_to_none=False)
        dist.barrier()
        start = clock()
        schedule.step(*args, **kwargs)
        optimizer.step()
        if i >= config.warmup:
            spans.append((start, clock()))
    offset = clock_offsets(comm, clock)[rank] if size > 1 else 0.0
    everyone = comm.gather([(s - offset, e - offset) for s, e in spans], root=0)
    if everyone is None:
        return None
    return [max(e for _, e in its) - min(s for s, _ in its) for its in zip(*everyone)]


def execute(config: GlooBenchConfig, comm: Any) -> GlooResult | None:
    torch.set_num_threads(config.threads_per_rank)
    rank = comm.Get_rank()
    if rank == 0:
        print(f"  gloo: ping-pong between neighbours, {len(config.message_sizes)} sizes; torch 1f1b probe, "
              f"{comm.Get_size()} stages x {config.probe_layers_per_stage} layers, width {config.probe_width}, "
              f"{config.probe_microbatches} micro-batches of {config.probe_mb_size}", file=sys.stderr, flush=True)
    init_gloo(comm)
    try:
        links = time_links(config, comm)
        steps = probe_steps(config, comm)
        gathered = comm.gather(links, root=0)
    finally:
        dist.destroy_process_group()
    if gathered is None or steps is None:
        return None
    return GlooResult(tuple(s for rank_links in gathered for s in rank_links), tuple(steps), torch.__version__)
