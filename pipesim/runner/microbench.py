"""Calibration micro-benchmarks, run on every rank with the runner's own code.

Compute: stacks of the runner's own fc layers (make_stage), forward under the
same saved-tensor counter the interpreter uses, backward as the interpreter
does it, whole (B) and split into input gradient (I) and weight gradients (W)
with torch's stage_backward_input/weight as the interpreter runs them; every
rank measures at once, so shared cores and memory bandwidth
are in the numbers. Links: ping-pong between pipeline neighbours with the
runner's transport (Isend/Irecv of tensors' buffers). Optimizer: the runner's
optimizer step at several parameter counts. Returns raw samples; fitting is
done by pipesim.calibrate.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import fc_layer
from .config import MicrobenchConfig
from .interpreter import SavedBytes, clock
from .records import (
    ColdSample,
    ComputeSample,
    LinkSample,
    MicrobenchResult,
    OptimizerSample,
    ProgressSample,
    RankSamples,
)
from .stage import make_optimizer, make_stage

OPTIMIZER_WIDTH, OPTIMIZER_DEPTHS = 512, (1, 2, 4, 8, 16, 32)  # 0.26M .. 8.4M parameters


def _stack_depth(width: int, stack_bytes: int) -> int:
    """Enough layers that the stack's weights exceed the caches, as in a real stage."""
    return max(4, min(64, -(-stack_bytes // (width * width * 4))))


def _time_once(stack: torch.nn.Module, x: torch.Tensor, depth: int,
               storages: set[int]) -> tuple[float, float, int]:
    """One forward (under the interpreter's saved-tensor counter) and backward, per layer."""
    counter = SavedBytes(storages)
    start = clock()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        out = stack(x)
    middle = clock()
    out.backward(torch.ones_like(out))
    end = clock()
    return (middle - start) / depth, (end - middle) / depth, counter.total


def _time_split(stack: torch.nn.Module, x: torch.Tensor, depth: int) -> tuple[float, float]:
    """I and W as a zero-bubble pipeline runs them, per layer: three forwards
    (untimed) and their I's, then the W's, timing the first micro-batch's I and
    its W. That W finds its saved tensors out of cache, after the F and I of two
    later micro-batches, as in a pipeline's steady state; timed right after its
    own I it came out 7-14% fast (fc 512, micro-batch 64: 7.3 ms against 8.2 ms
    delayed by two, 7.9 ms delayed by one)."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    groups = []
    input_s = 0.0
    for k in range(3):
        out = stack(x)
        start = clock()
        groups.append(stage_backward_input([out], [torch.ones_like(out)], [x], stack.parameters())[1])
        if k == 0:
            input_s = clock() - start
    weight_s = 0.0
    for k, kept in enumerate(groups):
        start = clock()
        stage_backward_weight(stack.parameters(), kept)
        if k == 0:
            weight_s = clock() - start
    return input_s / depth, weight_s / depth


@dataclass
class _Point:
    """One (width, micro-batch size) point while it is being measured."""

    width: int
    microbatch_size: int
    x: Any  # the input tensor
    forward_s: list[float] = field(default_factory=list)
    backward_s: list[float] = field(default_factory=list)
    input_s: list[float] = field(default_factory=list)
    weight_s: list[float] = field(default_factory=list)
    saved_bytes_per_sample_per_layer: float = 0.0

    def sample(self, rank: int, depth: int) -> ComputeSample:
        layer = fc_layer(self.width, self.width)
        return ComputeSample(rank, self.width, self.microbatch_size, depth, layer.params,
                             layer.forward_flops_per_sample, tuple(self.forward_s), tuple(self.backward_s),
                             tuple(self.input_s), tuple(self.weight_s), self.saved_bytes_per_sample_per_layer)


Stacks = dict[int, tuple[Any, int, set[int]]]  # width -> (module, depth, parameter storages)


def _whole_backward_pass(points: list[_Point], stacks: Stacks, comm: Any, keep: bool) -> None:
    """F and B of every point."""
    previous_width = None
    for point in points:
        stack, depth, storages = stacks[point.width]
        if point.width != previous_width:  # bring this stack's weights back into cache,
            _time_once(stack, point.x, depth, storages)  # as a stage's next action finds them
            previous_width = point.width
        comm.Barrier()
        forward, backward, saved = _time_once(stack, point.x, depth, storages)
        if keep:
            point.forward_s.append(forward)
            point.backward_s.append(backward)
        point.saved_bytes_per_sample_per_layer = (saved - point.x.numel() * 4) / (point.microbatch_size * depth)


def _split_backward_pass(points: list[_Point], stacks: Stacks, comm: Any, keep: bool) -> None:
    """F, I and W of every point, in a pass of their own (see _time_split), not
    after a full backward that has just brought the weight gradients into
    cache (timed that way, W came out 5-10% fast)."""
    previous_width = None
    for point in points:
        stack, depth, _ = stacks[point.width]
        if point.width != previous_width:
            _time_split(stack, point.x, depth)
            previous_width = point.width
        comm.Barrier()
        input_grad, weight_grad = _time_split(stack, point.x, depth)
        if keep:
            point.input_s.append(input_grad)
            point.weight_s.append(weight_grad)


def _measure_compute(config: MicrobenchConfig, comm: Any,
                     log: Callable[[str], object]) -> list[ComputeSample]:
    """Every (width, micro-batch size) point once per round, rounds repeated:
    drift and bursts of noise spread over all points alike. All ranks time the
    same point at the same moment (a barrier before each sample)."""
    stacks: Stacks = {}
    for width in config.widths:
        depth = _stack_depth(width, config.stack_bytes)
        stack = make_stage([fc_layer(width, width)] * depth, 0, config.seed)
        stacks[width] = (stack, depth, {p.untyped_storage().data_ptr() for p in stack.parameters()})
    points = [_Point(width, microbatch, torch.randn(microbatch, width, requires_grad=True))
              for width in config.widths for microbatch in config.microbatch_sizes]
    rounds = config.warmup + config.repeats
    for round_ in range(rounds):
        _whole_backward_pass(points, stacks, comm, keep=round_ >= config.warmup)
        _split_backward_pass(points, stacks, comm, keep=round_ >= config.warmup)
        if (round_ + 1) % 10 == 0 or round_ + 1 == rounds:
            log(f"  compute: round {round_ + 1}/{rounds} over {len(points)} (width, micro-batch) points")
    return [point.sample(comm.Get_rank(), stacks[point.width][1]) for point in points]


COLD_WIDTH, COLD_MICROBATCH, COLD_DEPTHS, COLD_REPEATS = 512, 32, (1, 4, 16), 8  # 1, 4 and 16 MiB


def _forward(stack: torch.nn.Module, x: torch.Tensor, storages: set[int]) -> tuple[torch.Tensor, float]:
    """The stack's forward under the interpreter's saved-tensor counter, and its seconds."""
    start = clock()
    with torch.autograd.graph.saved_tensors_hooks(SavedBytes(storages).pack, lambda tensor: tensor):
        out = stack(x)
    return out, clock() - start


def _backward(out: torch.Tensor) -> float:
    start = clock()
    out.backward(torch.ones_like(out))
    return clock() - start


def _measure_cold_start(config: MicrobenchConfig, comm: Any) -> list[ColdSample]:
    """Ranks 0 and 1, each stack size in turn: both time F then B back to back (warm); then
    each in turn waits in MPI while the other runs its own stack's F and B, and times its B
    (of an F run before the wait), waits again, and times an F (cold). The waiting rank
    busy-polls in MPI_Recv, as a pipeline rank waiting for a message does."""
    rank = comm.Get_rank()
    if rank > 1:
        return []
    peer = 1 - rank
    samples = []
    for depth in COLD_DEPTHS:
        stack = make_stage([fc_layer(COLD_WIDTH, COLD_WIDTH)] * depth, 0, config.seed)
        storages = {p.untyped_storage().data_ptr() for p in stack.parameters()}
        x = torch.randn(COLD_MICROBATCH, COLD_WIDTH, requires_grad=True)
        times: dict[str, list[float]] = {"warm_f": [], "warm_b": [], "cold_f": [], "cold_b": []}
        for repeat in range(config.warmup + COLD_REPEATS):
            keep = repeat >= config.warmup
            comm.sendrecv(None, dest=peer, source=peer)
            _backward(_forward(stack, x, storages)[0])
            out, f = _forward(stack, x, storages)
            b = _backward(out)
            if keep:
                times["warm_f"].append(f)
                times["warm_b"].append(b)
            for waiter in (0, 1):
                comm.sendrecv(None, dest=peer, source=peer)
                if rank == waiter:
                    out, _ = _forward(stack, x, storages)
                    comm.recv(source=peer, tag=11)  # the other rank computes meanwhile
                    b = _backward(out)
                    comm.recv(source=peer, tag=11)
                    out, f = _forward(stack, x, storages)
                    _backward(out)
                    if keep:
                        times["cold_b"].append(b)
                        times["cold_f"].append(f)
                else:
                    for _ in range(2):
                        _backward(_forward(stack, x, storages)[0])
                        comm.send(None, dest=peer, tag=11)
        nbytes = depth * fc_layer(COLD_WIDTH, COLD_WIDTH).params * 4
        samples.append(ColdSample(rank, COLD_WIDTH, COLD_MICROBATCH, depth, nbytes,
                                  *(tuple(times[k]) for k in ("warm_f", "warm_b", "cold_f", "cold_b"))))
    return samples


def _measure_optimizer(config: MicrobenchConfig, comm: Any) -> list[OptimizerSample]:
    """The optimizer step at several parameter counts, interleaved like compute."""
    setups = []
    for depth in OPTIMIZER_DEPTHS:
        stack = make_stage([fc_layer(OPTIMIZER_WIDTH, OPTIMIZER_WIDTH)] * depth, 0, config.seed)
        optimizer = make_optimizer(config.optimizer, stack.parameters())
        stack(torch.randn(2, OPTIMIZER_WIDTH)).sum().backward()
        times: list[float] = []
        setups.append((optimizer, sum(p.numel() for p in stack.parameters()), times))
    for round_ in range(config.warmup + config.repeats):
        for optimizer, _, times in setups:
            comm.Barrier()
            start = clock()
            optimizer.step()
            if round_ >= config.warmup:
                times.append(clock() - start)
    return [OptimizerSample(params, tuple(times)) for _, params, times in setups]


def _pingpong(comm: Any, peer: int, nbytes: int, repeats: int, leader: bool) -> list[float]:
    buffer = torch.zeros(max(nbytes, 1), dtype=torch.uint8)[:nbytes]
    view = buffer.numpy()
    times = []
    for _ in range(repeats + 2):
        start = clock()
        if leader:
            comm.Isend(view, dest=peer, tag=7).Wait()
            comm.Irecv(view, source=peer, tag=7).Wait()
        else:
            comm.Irecv(view, source=peer, tag=7).Wait()
            comm.Isend(view, dest=peer, tag=7).Wait()
        times.append((clock() - start) / 2)
    return times[2:]


def _time_links(config: MicrobenchConfig, comm: Any) -> list[LinkSample]:
    rank, size = comm.Get_rank(), comm.Get_size()
    results = []
    for left in range(size - 1):
        comm.Barrier()
        if rank not in (left, left + 1):
            continue
        peer = left + 1 if rank == left else left
        one_way = [(n, _pingpong(comm, peer, n, _pingpong_repeats(config, n), leader=rank == left))
                   for n in config.message_sizes]
        exchange = _exchange(comm, peer, config.message_sizes[-1], 3)  # the largest size
        if rank == left:
            last = len(one_way) - 1
            results += [LinkSample((left, left + 1), n, tuple(times), tuple(exchange) if i == last else ())
                        for i, (n, times) in enumerate(one_way)]
    return results


PROGRESS_SIZES = tuple(1 << k for k in range(10, 21))  # 1 KiB .. 1 MiB: where the rendezvous starts
PROGRESS_BUSY_S = 0.010


def _spin(seconds: float) -> None:
    """Compute without entering MPI (as a rank does inside an F or B)."""
    end = clock() + seconds
    while clock() < end:
        pass


def _progress_probe(comm: Any, peer: int, leader: bool, repeats: int = 3) -> list[ProgressSample]:
    """Per size, the receiver's wait with the sender idle in MPI_Wait and with the sender
    computing PROGRESS_BUSY_S between MPI_Isend and MPI_Wait (the leader sends)."""
    samples = []
    for nbytes in PROGRESS_SIZES:
        view = torch.zeros(nbytes, dtype=torch.uint8).numpy()
        waits: dict[float, list[float]] = {0.0: [], PROGRESS_BUSY_S: []}
        for _ in range(repeats + 1):
            for busy, times in waits.items():
                comm.sendrecv(None, dest=peer, source=peer)  # start together
                start = clock()
                if leader:
                    request = comm.Isend(view, dest=peer, tag=9)
                    _spin(busy)
                    request.Wait()
                else:
                    comm.Irecv(view, source=peer, tag=9).Wait()
                    times.append(clock() - start)
        if not leader:
            comm.send({busy: times[1:] for busy, times in waits.items()}, dest=peer, tag=10)
        else:
            got = comm.recv(source=peer, tag=10)
            samples.append(ProgressSample((min(comm.Get_rank(), peer), max(comm.Get_rank(), peer)), nbytes,
                                          PROGRESS_BUSY_S, tuple(got[0.0]), tuple(got[PROGRESS_BUSY_S])))
    return samples


def _time_progress(comm: Any) -> list[ProgressSample]:
    rank, size = comm.Get_rank(), comm.Get_size()
    results: list[ProgressSample] = []
    for left in range(size - 1):
        comm.Barrier()
        if rank in (left, left + 1):
            results += _progress_probe(comm, left + 1 if rank == left else left, leader=rank == left)
    return results


def _pingpong_repeats(config: MicrobenchConfig, nbytes: int) -> int:
    return config.pingpong_repeats if nbytes < (1 << 22) else max(3, config.pingpong_repeats // 4)


def _exchange(comm: Any, peer: int, nbytes: int, repeats: int) -> list[float]:
    """Both ranks send `nbytes` to each other at once: as fast as one way on a
    duplex link, twice as slow on a shared channel."""
    from mpi4py import MPI

    outgoing = torch.zeros(nbytes, dtype=torch.uint8).numpy()
    incoming = torch.zeros(nbytes, dtype=torch.uint8).numpy()
    times = []
    for _ in range(repeats + 1):
        comm.sendrecv(None, dest=peer, source=peer)  # start together
        start = clock()
        requests = [comm.Irecv(incoming, source=peer, tag=8), comm.Isend(outgoing, dest=peer, tag=8)]
        MPI.Request.Waitall(requests)
        times.append(clock() - start)
    return times[1:]


def execute(config: MicrobenchConfig, comm: Any) -> MicrobenchResult | None:
    torch.set_num_threads(config.threads_per_rank)
    rank = comm.Get_rank()

    def log(text: str) -> None:
        if rank == 0:
            print(text, file=sys.stderr, flush=True)

    compute: list[ComputeSample] = []
    if config.widths:
        log(f"  compute: widths {list(config.widths)} x micro-batch sizes {list(config.microbatch_sizes)}, "
            f"{config.repeats} rounds after {config.warmup} warm-up")
        compute = _measure_compute(config, comm, log)
    kinds = []
    if config.kind_jobs:
        from .kindbench import measure_kinds

        log(f"  kinds: {len(config.kind_jobs)} model(s) layer by layer, {config.kind_repeats} rounds after "
            f"{config.kind_warmup} warm-up")
        started = clock()
        kinds = measure_kinds(config, comm, log)
        log(f"  kinds: {clock() - started:.1f} s")
    cold: list[ColdSample] = []
    if config.widths and comm.Get_size() > 1:
        log(f"  cold start: width {COLD_WIDTH} stacks of {list(COLD_DEPTHS)} layers right after a wait")
        cold = _measure_cold_start(config, comm)
    log(f"  optimizer ({config.optimizer}) step at {len(OPTIMIZER_DEPTHS)} sizes")
    optimizer = _measure_optimizer(config, comm)
    log(f"  links: ping-pong between neighbours, {len(config.message_sizes)} sizes "
        f"{config.message_sizes[0]} B .. {config.message_sizes[-1] >> 20} MiB")
    links = _time_links(config, comm)
    log(f"  rendezvous: does a message move while its sender computes? {len(PROGRESS_SIZES)} sizes "
        f"{PROGRESS_SIZES[0] >> 10} KiB .. {PROGRESS_SIZES[-1] >> 20} MiB")
    progress = _time_progress(comm)
    allreduce: tuple = ()
    if config.allreduce_sizes:
        from .collbench import measure_allreduce

        log(f"  all-reduce: {comm.Get_size()} ranks, {len(config.allreduce_sizes)} sizes "
            f"{config.allreduce_sizes[0] >> 10} KiB .. {config.allreduce_sizes[-1] >> 20} MiB")
        allreduce = measure_allreduce(comm, config.allreduce_sizes, config.pingpong_repeats)
    mine = RankSamples(rank, socket.gethostname(), _processor_name(), tuple(compute), tuple(optimizer),
                       tuple(links), tuple(kinds), tuple(progress), tuple(cold))
    everyone: list[RankSamples] | None = comm.gather(mine, root=0)
    if everyone is None:  # not rank 0
        return None
    from .worker import mpi_version

    return MicrobenchResult(tuple(sorted(everyone, key=lambda r: r.rank)), mpi_version(), torch.__version__,
                            allreduce)


def _processor_name() -> str:
    from mpi4py import MPI

    return MPI.Get_processor_name()
