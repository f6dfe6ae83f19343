"""Data parallelism x pipeline: D replicas of one P-stage pipeline, world = P x D ranks.

``Layout`` places the replicas' ranks: ``stage-major`` (default) puts a replica's
pipeline on consecutive global ranks (replica d, stage s -> rank d*P + s), so
pipeline messages stay inside a node where they can and the all-reduce groups
(one stage across the replicas) span nodes; ``replica-major`` is the other way
(rank s*D + d). Node of a global rank: rank // ranks_per_node. Every what-if
(``--rank-speed``, ``--link``, ``--ranks-per-node``) names global ranks.

The step (``simulate_data_parallel``): each replica runs the pipeline schedule on
its own micro-batches, simulated by the engine (fast path or event simulation)
with a cost model seen through the replica's global ranks (``ReplicaCosts``);
replicas whose ranks see the same costs are simulated once. The lowered schedule
starts piece s's all-reduce after the piece's last B or W
(schedule.gradients_ready); it begins when every replica has got there, runs
beside the rank's compute (non-blocking, as Iallreduce), after the rank's earlier
all-reduces (one communicator per stage group, operations in order), and takes the
cost model's ``allreduce_s`` (the ring law, collectives.py). A rank's optimizer
step waits for its sends and its all-reduces. All-reduce traffic does not contend
with pipeline messages here (the ring law's baseline). A cost model whose
``allreduce`` is "ring-steps" (``--allreduce ring-steps``) gets one event
simulation of the whole world instead, the ring's steps message by message and a
network interface per node shared by all inter-node traffic (ringsteps.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

import numpy as np

from .errors import UserError
from .timeline import MemorySample, Metrics, RankMetrics, Span

PLACEMENTS = ("stage-major", "replica-major")
DEFAULT_PLACEMENT = "stage-major"


class DataParallelError(UserError):
    """A data-parallel shape that does not fit; one line for the user."""


@dataclass(frozen=True)
class Layout:
    """Where replica d's stage s runs, among P x D global ranks."""

    num_stages: int
    data_parallel: int = 1
    placement: str = DEFAULT_PLACEMENT
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise DataParallelError(f"unknown placement {self.placement!r} (allowed: {', '.join(PLACEMENTS)})")
        if self.data_parallel < 1 or self.num_stages < 1:
            raise DataParallelError(f"--data-parallel and --stages must be >= 1, got {self.data_parallel} "
                                    f"and {self.num_stages}")

    @property
    def world_size(self) -> int:
        return self.num_stages * self.data_parallel

    def global_rank(self, replica: int, stage: int) -> int:
        if self.placement == "stage-major":
            return replica * self.num_stages + stage
        return stage * self.data_parallel + replica

    def replica_of(self, rank: int) -> int:
        return rank // self.num_stages if self.placement == "stage-major" else rank % self.data_parallel

    def stage_of(self, rank: int) -> int:
        return rank % self.num_stages if self.placement == "stage-major" else rank // self.data_parallel

    def node_of(self, rank: int) -> int:
        return 0 if self.ranks_per_node is None else rank // self.ranks_per_node

    def replica_ranks(self, replica: int) -> tuple[int, ...]:
        """Global ranks of one replica's pipeline, by stage."""
        return tuple(self.global_rank(replica, s) for s in range(self.num_stages))

    def group(self, stage: int) -> tuple[int, ...]:
        """Global ranks of one stage's all-reduce group, by replica (the ring's order)."""
        return tuple(self.global_rank(d, stage) for d in range(self.data_parallel))

    def describe(self, rank: int) -> dict[str, int]:
        return {"replica": self.replica_of(rank), "stage": self.stage_of(rank), "node": self.node_of(rank)}


def check_shape(batch_size: int, data_parallel: int, num_microbatches: int) -> None:
    """B/D samples per replica, cut into m micro-batches: D must divide B and m must divide B/D."""
    if data_parallel < 1 or batch_size % data_parallel:
        raise DataParallelError(f"--batch-size {batch_size} must be a multiple of --data-parallel {data_parallel} "
                                "(each replica trains on batch/D samples)")
    share = batch_size // data_parallel
    if num_microbatches < 1 or share % num_microbatches:
        raise DataParallelError(f"--microbatches {num_microbatches} must divide the {share} samples of each of the "
                                f"{data_parallel} replicas (--batch-size {batch_size} / --data-parallel {data_parallel})")


@dataclass(frozen=True, eq=False)
class ReplicaCosts:
    """A cost model seen by one replica: its local ranks 0..P-1 are global ranks `ranks`."""

    base: Any  # a CostModel over global ranks
    ranks: tuple[int, ...]

    @property
    def runtime_inputs(self) -> frozenset[str]:
        return frozenset(getattr(self.base, "runtime_inputs", frozenset()))

    @property
    def additive_layers(self) -> bool:
        return bool(getattr(self.base, "additive_layers", False))

    def _g(self, rank: int | None) -> int | None:
        return None if rank is None else self.ranks[rank]

    def compute_s(self, layers, kind, microbatch_size: int, rank: int | None = None) -> float:
        return self.base.compute_s(layers, kind, microbatch_size, rank=self._g(rank))

    def transfer_s(self, src: int, dst: int, nbytes: int) -> float:
        return self.base.transfer_s(self.ranks[src], self.ranks[dst], nbytes)

    def link_id(self, src: int, dst: int) -> Hashable:
        return self.base.link_id(self.ranks[src], self.ranks[dst])

    # the optional parts of a CostModel (costs.py), when the base has them
    def handshake_s(self, src: int, dst: int, nbytes: int) -> float | None:
        handshake = getattr(self.base, "handshake_s", None)
        return None if handshake is None else handshake(self.ranks[src], self.ranks[dst], nbytes)

    @property
    def mpi_window_s(self) -> float:
        return float(getattr(self.base, "mpi_window_s", 0.0))

    def cold_start_s(self, layers, kind, rank: int | None = None) -> float:
        cold_start = getattr(self.base, "cold_start_s", None)
        return 0.0 if cold_start is None else cold_start(layers, kind, rank=self._g(rank))

    def optimizer_s(self, params: int, rank: int | None = None) -> float:
        return self.base.optimizer_s(params, rank=self._g(rank))

    def static_bytes(self, params: int) -> int:
        return self.base.static_bytes(params)

    def allreduce_s(self, ranks: Sequence[int], nbytes: int) -> float:
        return self.base.allreduce_s([self.ranks[r] for r in ranks], nbytes)

    def signature(self, model, partition, schedule, microbatch_size: int) -> tuple:
        """What this replica's pipeline costs depend on: equal signatures, equal timelines."""
        from .engine import stage_shapes
        from .schedule import COMPUTE_KINDS

        shapes = stage_shapes(model, partition)
        kinds = sorted({str(a.kind) for row in schedule.ranks for a in row})
        compute = tuple(self.compute_s(shapes[s].layers, kind, microbatch_size, rank=schedule.rank_of(s))
                        for s in range(schedule.num_pieces) for kind in COMPUTE_KINDS if str(kind) in kinds)
        p = schedule.num_stages
        links = tuple(self.transfer_s(a, b, n) for a in range(p) for b in range(p) if a != b for n in (0, 1 << 20))
        optimizer = tuple(self.optimizer_s(1 << 20, rank=r) for r in range(p))
        return compute, links, optimizer


def replica_costs(costs, layout: Layout, replica: int = 0):
    """The cost model of one replica (the model itself when local and global ranks agree)."""
    ranks = layout.replica_ranks(replica)
    return costs if ranks == tuple(range(layout.num_stages)) else ReplicaCosts(costs, ranks)


def simulate_data_parallel(plan, costs, layout: Layout, path: str = "auto"):
    """One step of `plan` on D replicas (see the module text); None when `path` is
    "fast" and the fast path is not exact for some replica."""
    from .compact import compact
    from .engine import simulate

    if getattr(costs, "allreduce", "law") == "ring-steps":
        if path == "fast":
            return None
        from .ringsteps import simulate_ring_steps

        return simulate_ring_steps(plan, costs, layout)
    schedule, mbs = plan.schedule, plan.microbatch_size
    views = [ReplicaCosts(costs, layout.replica_ranks(d)) for d in range(layout.data_parallel)]
    classes: dict[tuple, int] = {}
    class_of = [classes.setdefault(v.signature(plan.model, plan.partition, schedule, mbs), len(classes))
                for v in views]
    first = {k: class_of.index(k) for k in range(len(classes))}
    timelines = []
    for k in range(len(classes)):
        timeline = simulate(schedule, plan.partition, plan.model, views[first[k]], mbs, path, recompute=plan.recompute,
                            allreduce=True)
        if timeline is None:
            return None
        timelines.append(timeline)
    c = compact(schedule)
    ready, spans = allreduce_times(plan, costs, layout, c, [t.times.end_s for t in timelines])
    done = [replace(t, times=replace(t.times, ready_s=ready, allreduce=spans)) for t in timelines]
    return DataParallelTimeline(layout, tuple(done[class_of[d]] for d in range(layout.data_parallel)))


def allreduce_times(plan, costs, layout: Layout, c, ends: Sequence[np.ndarray]):
    """Per local rank: when its all-reduces end; and each all-reduce as (rank, piece, start, end)."""
    from .schedule import gradients_ready

    schedule = plan.schedule
    ready_at = gradients_ready(schedule)
    nbytes = {s: sum(layer.params for layer in plan.stage_layers(s)) * 4 for s in range(schedule.num_pieces)}
    free = np.zeros(schedule.num_ranks)
    spans = []
    issued = sorted((int(c.offsets[schedule.rank_of(s)]) + position, s) for s, position in ready_at.items())
    for node, piece in issued:
        rank = schedule.rank_of(piece)
        start = max(max(float(end[node]) for end in ends), free[rank])
        free[rank] = start + costs.allreduce_s(layout.group(rank), nbytes[piece])
        spans.append((rank, piece, start, float(free[rank])))
    return free, tuple(spans)


@dataclass(frozen=True, eq=False)
class DataParallelTimeline:
    """The step of every replica on global ranks; a Timeline's interface (timeline.py)."""

    layout: Layout
    replicas: tuple[Any, ...]  # per replica: its ArrayTimeline on local ranks (shared by equal replicas)
    source: str = "simulated"

    @property
    def engine_path(self) -> str:
        return "fast" if all(t.engine_path == "fast" for t in self.replicas) else "des"

    @property
    def num_ranks(self) -> int:
        return self.layout.world_size

    def _local(self, rank: int) -> tuple[Any, int]:
        return self.replicas[self.layout.replica_of(rank)], self.layout.stage_of(rank)

    @property
    def static_bytes(self) -> tuple[int, ...]:
        return tuple(t.static_bytes[s] for t, s in map(self._local, range(self.num_ranks)))

    def peak_activation_bytes(self) -> list[int]:
        peaks = [t.peak_activation_bytes() for t in self.replicas]
        return [peaks[self.layout.replica_of(g)][self.layout.stage_of(g)] for g in range(self.num_ranks)]

    def metrics(self) -> Metrics:
        per = [t.metrics() for t in self.replicas]
        iteration = max(m.iteration_time_s for m in per)
        ranks = []
        for g in range(self.num_ranks):
            r = per[self.layout.replica_of(g)].ranks[self.layout.stage_of(g)]
            idle = iteration - r.busy_s
            ranks.append(RankMetrics(g, r.busy_s, idle, idle / iteration if iteration > 0 else 0.0,
                                     r.peak_activation_bytes, r.peak_memory_bytes))
        bubble = sum(r.idle_s for r in ranks) / (iteration * len(ranks)) if iteration > 0 else 0.0
        return Metrics(float(iteration), float(bubble), tuple(ranks))

    def exposed_allreduce_s(self) -> float:
        """How much the all-reduces lengthen the step: the step minus the slowest replica's
        step without them (each rank's optimizer right after its sends)."""
        without = 0.0
        for t in self.replicas:
            per = t._per_rank
            without = max(without, float(np.max(per["sends_end"] + t.times.optimizer_s)))
        return self.metrics().iteration_time_s - without

    @cached_property
    def spans(self) -> tuple[Span, ...]:
        out = []
        for d, t in enumerate(self.replicas):
            ranks = self.layout.replica_ranks(d)
            out += [replace(s, rank=ranks[s.rank], peer=ranks[s.peer] if s.peer >= 0 else -1) for s in t.spans]
        return tuple(sorted(out, key=lambda s: (s.start_s, s.rank, s.end_s)))

    @cached_property
    def memory(self) -> tuple[MemorySample, ...]:
        out = []
        for d, t in enumerate(self.replicas):
            ranks = self.layout.replica_ranks(d)
            out += [replace(m, rank=ranks[m.rank]) for m in t.memory]
        return tuple(out)

    def rank_spans(self, rank: int, kinds=None) -> list[Span]:
        from .timeline import SPAN_KINDS

        kinds = SPAN_KINDS if kinds is None else kinds
        return [s for s in self.spans if s.rank == rank and s.kind in kinds]
