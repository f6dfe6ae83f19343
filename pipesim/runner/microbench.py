"""Calibration micro-benchmarks, run on every rank with the runner's own code.

Compute: stacks of the runner's own fc layers (make_stage), forward under the
same saved-tensor counter the interpreter uses, backward as the interpreter
does it; every rank measures at once, so shared cores and memory bandwidth
are in the numbers. Links: ping-pong between pipeline neighbours with the
runner's transport (Isend/Irecv of tensors' buffers). Optimizer: the runner's
optimizer step at several parameter counts. Returns raw samples; fitting is
done by pipesim.calibrate.
"""

from __future__ import annotations

import socket
import sys

import torch

from .interpreter import SavedBytes, clock
from .stage import make_optimizer, make_stage
from ..model import fc_layer


OPTIMIZER_WIDTH, OPTIMIZER_DEPTHS = 512, (1, 2, 4, 8, 16, 32)  # 0.26M .. 8.4M parameters


def _stack_depth(width: int, stack_bytes: int) -> int:
    """Enough layers that the stack's weights exceed the caches, as in a real stage."""
    return max(4, min(32, -(-stack_bytes // (width * width * 4))))


def _time_compute(width: int, microbatch: int, depth: int, config: dict, comm) -> dict:
    layers = [fc_layer(width, width)] * depth
    stack = make_stage(layers, 0, config["seed"])
    storages = {p.untyped_storage().data_ptr() for p in stack.parameters()}
    x = torch.randn(microbatch, width, requires_grad=True)
    forward, backward, saved = [], [], 0
    comm.Barrier()
    for rep in range(config["warmup"] + config["repeats"]):
        counter = SavedBytes(storages)
        start = clock()
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
            out = stack(x)
        middle = clock()
        out.backward(torch.ones_like(out))
        end = clock()
        if rep >= config["warmup"]:
            forward.append((middle - start) / depth)
            backward.append((end - middle) / depth)
        saved = counter.total
    return {"width": width, "microbatch_size": microbatch, "depth": depth,
            "forward_s": forward, "backward_s": backward,
            "saved_bytes_per_sample_per_layer": (saved - x.numel() * 4) / (microbatch * depth),
            "params_per_layer": layers[0].params, "flops_per_sample_per_layer": layers[0].forward_flops_per_sample}


def _time_optimizer(width: int, depth: int, config: dict, comm) -> dict:
    stack = make_stage([fc_layer(width, width)] * depth, 0, config["seed"])
    optimizer = make_optimizer(config["optimizer"], stack.parameters())
    stack(torch.randn(2, width)).sum().backward()
    times = []
    comm.Barrier()
    for rep in range(config["warmup"] + config["repeats"]):
        start = clock()
        optimizer.step()
        if rep >= config["warmup"]:
            times.append(clock() - start)
    return {"params": sum(p.numel() for p in stack.parameters()), "times_s": times}


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
    return results


def execute(config: dict, comm) -> dict | None:
    torch.set_num_threads(config["threads_per_rank"])
    rank = comm.Get_rank()
    log = (lambda text: print(text, file=sys.stderr, flush=True)) if rank == 0 else (lambda text: None)
    compute = []
    _time_compute(config["widths"][0], config["microbatch_sizes"][0], 4, config, comm)  # settle in
    for width in config["widths"]:
        depth = _stack_depth(width, config["stack_bytes"])
        log(f"  compute: width {width}, {depth} layers, micro-batches {config['microbatch_sizes']}")
        for microbatch in config["microbatch_sizes"]:
            compute.append(_time_compute(width, microbatch, depth, config, comm))
    log(f"  optimizer ({config['optimizer']}) step at {len(OPTIMIZER_DEPTHS)} sizes")
    optimizer = [_time_optimizer(OPTIMIZER_WIDTH, depth, config, comm) for depth in OPTIMIZER_DEPTHS]
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
