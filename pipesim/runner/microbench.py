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

import torch

from ..model import fc_layer
from .interpreter import SavedBytes, clock
from .stage import make_optimizer, make_stage

OPTIMIZER_WIDTH, OPTIMIZER_DEPTHS = 512, (1, 2, 4, 8, 16, 32)  # 0.26M .. 8.4M parameters


def _stack_depth(width: int, stack_bytes: int) -> int:
    """Enough layers that the stack's weights exceed the caches, as in a real stage."""
    return max(4, min(64, -(-stack_bytes // (width * width * 4))))


def _time_once(stack, x, depth: int, storages: set[int]) -> tuple[float, float, int]:
    """One forward (under the interpreter's saved-tensor counter) and backward, per layer."""
    counter = SavedBytes(storages)
    start = clock()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        out = stack(x)
    middle = clock()
    out.backward(torch.ones_like(out))
    end = clock()
    return (middle - start) / depth, (end - middle) / depth, counter.total


def _time_split(stack, x, depth: int) -> tuple[float, float]:
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


def _whole_backward_pass(points: list[dict], stacks: dict, comm, keep: bool) -> None:
    """F and B of every point."""
    previous_width = None
    for point in points:
        stack, depth, storages = stacks[point["width"]]
        if point["width"] != previous_width:  # bring this stack's weights back into cache,
            _time_once(stack, point["x"], depth, storages)  # as a stage's next action finds them
            previous_width = point["width"]
        comm.Barrier()
        forward, backward, saved = _time_once(stack, point["x"], depth, storages)
        if keep:
            point["forward_s"].append(forward)
            point["backward_s"].append(backward)
        point["saved_bytes_per_sample_per_layer"] = (
            (saved - point["x"].numel() * 4) / (point["microbatch_size"] * depth))


def _split_backward_pass(points: list[dict], stacks: dict, comm, keep: bool) -> None:
    """F, I and W of every point, in a pass of their own (see _time_split), not
    after a full backward that has just brought the weight gradients into
    cache (timed that way, W came out 5-10% fast)."""
    previous_width = None
    for point in points:
        stack, depth, _ = stacks[point["width"]]
        if point["width"] != previous_width:
            _time_split(stack, point["x"], depth)
            previous_width = point["width"]
        comm.Barrier()
        input_grad, weight_grad = _time_split(stack, point["x"], depth)
        if keep:
            point["input_s"].append(input_grad)
            point["weight_s"].append(weight_grad)


def _measure_compute(config: dict, comm, log) -> list[dict]:
    """Every (width, micro-batch size) point once per round, rounds repeated:
    drift and bursts of noise spread over all points alike. All ranks time the
    same point at the same moment (a barrier before each sample)."""
    stacks = {}
    for width in config["widths"]:
        depth = _stack_depth(width, config["stack_bytes"])
        stack = make_stage([fc_layer(width, width)] * depth, 0, config["seed"])
        stacks[width] = (stack, depth, {p.untyped_storage().data_ptr() for p in stack.parameters()})
    points = []
    for width in config["widths"]:
        layer = fc_layer(width, width)
        for microbatch in config["microbatch_sizes"]:
            points.append({"width": width, "microbatch_size": microbatch, "depth": stacks[width][1],
                           "params_per_layer": layer.params,
                           "flops_per_sample_per_layer": layer.forward_flops_per_sample,
                           "forward_s": [], "backward_s": [], "input_s": [], "weight_s": [],
                           "x": torch.randn(microbatch, width, requires_grad=True)})
    rounds = config["warmup"] + config["repeats"]
    for round_ in range(rounds):
        _whole_backward_pass(points, stacks, comm, keep=round_ >= config["warmup"])
        _split_backward_pass(points, stacks, comm, keep=round_ >= config["warmup"])
        if (round_ + 1) % 10 == 0 or round_ + 1 == rounds:
            log(f"  compute: round {round_ + 1}/{rounds} over {len(points)} (width, micro-batch) points")
    for point in points:
        del point["x"]
    return points


def _measure_optimizer(config: dict, comm) -> list[dict]:
    """The optimizer step at several parameter counts, interleaved like compute."""
    setups = []
    for depth in OPTIMIZER_DEPTHS:
        stack = make_stage([fc_layer(OPTIMIZER_WIDTH, OPTIMIZER_WIDTH)] * depth, 0, config["seed"])
        optimizer = make_optimizer(config["optimizer"], stack.parameters())
        stack(torch.randn(2, OPTIMIZER_WIDTH)).sum().backward()
        setups.append((optimizer, {"params": sum(p.numel() for p in stack.parameters()), "times_s": []}))
    for round_ in range(config["warmup"] + config["repeats"]):
        for optimizer, record in setups:
            comm.Barrier()
            start = clock()
            optimizer.step()
            if round_ >= config["warmup"]:
                record["times_s"].append(clock() - start)
    return [record for _, record in setups]


def _pingpong(comm, peer: int, nbytes: int, repeats: int, leader: bool) -> list[float]:
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


def _time_links(config: dict, comm) -> list[dict]:
    rank, size = comm.Get_rank(), comm.Get_size()
    results = []
    for left in range(size - 1):
        comm.Barrier()
        if rank not in (left, left + 1):
            continue
        peer = left + 1 if rank == left else left
        for nbytes in config["message_sizes"]:
            repeats = config["pingpong_repeats"] if nbytes < (1 << 22) else max(3, config["pingpong_repeats"] // 4)
            times = _pingpong(comm, peer, nbytes, repeats, leader=rank == left)
            if rank == left:
                results.append({"pair": [left, left + 1], "bytes": nbytes, "one_way_s": times})
        exchange = _exchange(comm, peer, config["message_sizes"][-1], 3)
        if rank == left:
            results[-1]["both_ways_s"] = exchange
    return results


def _exchange(comm, peer: int, nbytes: int, repeats: int) -> list[float]:
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


def execute(config: dict, comm) -> dict | None:
    torch.set_num_threads(config["threads_per_rank"])
    rank = comm.Get_rank()
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if rank == 0 else (lambda text: None)
    log(f"  compute: widths {config['widths']} x micro-batch sizes {config['microbatch_sizes']}, "
        f"{config['repeats']} rounds after {config['warmup']} warm-up")
    compute = _measure_compute(config, comm, log)
    log(f"  optimizer ({config['optimizer']}) step at {len(OPTIMIZER_DEPTHS)} sizes")
    optimizer = _measure_optimizer(config, comm)
    log(f"  links: ping-pong between neighbours, {len(config['message_sizes'])} sizes "
        f"{config['message_sizes'][0]} B .. {config['message_sizes'][-1] >> 20} MiB")
    links = _time_links(config, comm)
    mine = {"rank": rank, "host": socket.gethostname(), "processor": _processor_name(),
            "compute": compute, "optimizer": optimizer, "links": links}
    everyone = comm.gather(mine, root=0)
    if rank != 0:
        return None
    from .worker import mpi_version

    return {"ranks": everyone, "mpi": mpi_version(), "torch": torch.__version__}


def _processor_name() -> str:
    from mpi4py import MPI

    return MPI.Get_processor_name()
