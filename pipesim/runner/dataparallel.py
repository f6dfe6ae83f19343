"""The runner's data parallelism: sub-communicators, each replica's shard of the batch,
and the per-piece gradient all-reduce (non-blocking, started where the lowered
schedule's ALLREDUCE says, waited for before the optimizer step).

World = P x D ranks, placed by dataparallel.Layout. ``communicators`` splits the
world into one pipeline communicator per replica (ranks ordered by stage, so a
rank's pipeline rank is its stage, as the lowered schedule numbers them) and one
data-parallel communicator per stage (ordered by replica: the ring's order).
Replica d trains on samples [d B/D, (d+1) B/D) of the global mini-batch; the loss
of each micro-batch is divided by m x D, so the summed gradients are those of
the whole batch's mean loss, as single-process training computes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from mpi4py import MPI

from ..dataparallel import Layout
from ..timeline import ALLREDUCES
from .records import StepRecord


def communicators(world: Any, layout: Layout) -> tuple[Any, Any, int, int]:
    """(pipeline communicator, data-parallel communicator, replica, stage) of this rank."""
    rank = world.Get_rank()
    replica, stage = layout.replica_of(rank), layout.stage_of(rank)
    pipeline = world.Split(color=replica, key=stage)
    data_parallel = world.Split(color=stage, key=replica)
    return pipeline, data_parallel, replica, stage


class GradientSync:
    """One rank's all-reduces: started per piece, finished before the optimizer step.

    Each piece's gradients live in one flat buffer (``bind``: every parameter's ``.grad``
    is a view into it, as DDP's ``gradient_as_bucket_view``), which autograd accumulates
    into in place and MPI all-reduces in place: no copy before or after."""

    def __init__(self, comm: Any, replica: int, data_parallel: int) -> None:
        self.comm, self.replica, self.data_parallel = comm, replica, data_parallel
        self.buffers: dict[int, torch.Tensor] = {}  # piece -> its flat gradient buffer (float32, on the CPU)
        self.pending: list[list[Any]] = []  # [request, piece, start_s, end_s or None]

    def bind(self, piece: int, params: list[torch.Tensor]) -> None:
        """Give the piece's parameters gradients that are views into one flat buffer."""
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
            raise ValueError("data parallelism in the runner all-reduces float32 gradients on the CPU")
        flat = torch.zeros(sum(p.numel() for p in params))
        offset = 0
        for p in params:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        self.buffers[piece] = flat

    def check_bound(self, piece: int, params: list[torch.Tensor]) -> None:
        """Every gradient still a view into the piece's buffer (autograd accumulated in place)."""
        base = self.buffers[piece].untyped_storage().data_ptr()
        if any(p.grad is None or p.grad.untyped_storage().data_ptr() != base for p in params):
            raise RuntimeError(f"piece {piece}: a gradient left its all-reduce buffer")

    def shard(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This replica's samples of the global mini-batch."""
        share = inputs.shape[0] // self.data_parallel
        lo = self.replica * share
        return inputs[lo : lo + share], targets[lo : lo + share]

    def start(self, piece: int, params: list[torch.Tensor], now: float) -> None:
        self.check_bound(piece, params)
        request = self.comm.Iallreduce(MPI.IN_PLACE, self.buffers[piece].numpy(), op=MPI.SUM)
        self.pending.append([request, piece, now, None])

    def progress(self, clock: Callable[[], float]) -> None:
        """Drive the all-reduces on; note when each is seen done."""
        for entry in self.pending:
            if entry[3] is None and entry[0].Test():
                entry[3] = clock()

    def finish(self, rank: int, clock: Callable[[], float], spans: list) -> None:
        """Wait for every all-reduce (the sums are in the gradients already) and record the spans."""
        self.progress(clock)
        start = clock()
        waited = False
        for entry in self.pending:
            if entry[3] is None:
                entry[0].Wait()
                entry[3] = clock()
                waited = True
        if waited:
            spans.append((rank, "wait", start, clock(), -1, -1, -1, ALLREDUCES))
        for _, piece, began, ended in self.pending:
            spans.append((rank, "allreduce", began, ended, piece, -1, -1, ""))
        self.pending = []


def to_global(record: StepRecord, layout: Layout, replica: int) -> StepRecord:
    """A step recorded on pipeline ranks, on global ranks."""
    ranks = layout.replica_ranks(replica)
    spans = tuple(replace(s, rank=ranks[s.rank], peer=ranks[s.peer] if s.peer >= 0 else -1) for s in record.spans)
    memory = tuple(replace(m, rank=ranks[m.rank]) for m in record.memory)
    return replace(record, spans=spans, memory=memory)
