"""Cost-model bounds on partitions: what a piece costs, holds, and how fast a
partition can possibly be.

Everything is read from the Schedule object (its actions and placement), never
from its name. "Stage" here is a piece of the model (P·V of them; piece s on
rank ``schedule.rank_of(s)``). For every piece s and layer range first..last
the cost model gives its forward ``f`` and backward ``b`` time per micro-batch
(c = f + b), its whole work in the schedule (its F, B, I and W actions), the
messages to the next piece and back (none between pieces on one rank, as the
lowered schedule has none), its optimizer step and its peak memory: static
bytes plus the peak of the piece's own activations along its rank's action
order, exactly what the engine's ledger counts for that piece (with one piece
per rank, the rank's peak; with several, a lower bound of it).

The lower bounds (see `Bounds`) are lengths of paths through the step's
dependency graph, so the simulator can never be faster; they decompose over
pieces, so dynamic programmes bound every completion of a partial partition.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import cache

from .costs import CostModel
from .lowering import lower
from .model import ModelSpec
from .partition import Partition
from .schedule import Kind, Schedule, build_schedule


@dataclass(frozen=True)
class Problem:
    """What to optimise; ``schedule`` is a Schedule, or a name built here with `num_chunks`."""

    model: ModelSpec
    schedule: Schedule | str
    num_stages: int
    num_microbatches: int
    batch_size: int
    costs: CostModel
    memory_cap_bytes: int | None = None
    profile_name: str = ""
    num_chunks: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", build_schedule(
                self.schedule, self.num_stages, self.num_microbatches, self.num_chunks))

    @property
    def num_pieces(self) -> int:
        return self.build_schedule().num_pieces

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.num_microbatches

    def build_schedule(self) -> Schedule:
        """The schedule (__post_init__ has built it from its name)."""
        assert isinstance(self.schedule, Schedule)
        return self.schedule

    def describe(self) -> str:
        schedule = self.build_schedule()
        chunks = f" x {schedule.num_chunks} chunks" if schedule.num_chunks > 1 else ""
        return (f"{self.model.num_layers} layers into {self.num_stages} stages{chunks} ({schedule.name}, "
                f"{self.num_microbatches} micro-batches of {self.microbatch_size})")


def piece_actions(schedule: Schedule, piece: int) -> list[Kind]:
    """The kinds of a piece's actions, in its rank's order."""
    return [a.kind for a in schedule.ranks[schedule.rank_of(piece)] if a.piece == piece]


def ledger_states(schedule: Schedule, piece: int) -> set[tuple[int, int]]:
    """(micro-batches holding their saved activations, micro-batches holding what W needs)
    after each of the piece's actions; the engine's ledger for this piece is
    saved_bytes x the first + weight_bytes x the second."""
    saved = weight = 0
    states = {(0, 0)}
    for kind in piece_actions(schedule, piece):
        saved += {Kind.F: 1, Kind.B: -1, Kind.I: -1}.get(kind, 0)
        weight += {Kind.I: 1, Kind.W: -1}.get(kind, 0)
        states.add((saved, weight))
    return states


def held_microbatches(schedule: Schedule, piece: int) -> int:
    """Micro-batches whose activations a piece holds at its peak (F until B, or until W)."""
    return max(a + b for a, b in ledger_states(schedule, piece))


class StageCosts:
    """Cost-model figures of stage s holding layers first..last, cached."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.schedule = problem.build_schedule()
        self.model = problem.model
        self.costs = problem.costs
        self.mbs = problem.microbatch_size
        self.counts = [Counter(piece_actions(self.schedule, s)) for s in range(self.schedule.num_pieces)]
        lowered = lower(self.schedule)  # which pieces hand their activation on by message
        self.sends_forward = {a.piece for row in lowered.ranks for a in row
                              if a.kind == Kind.SEND and a.direction == Kind.F}
        self.states = [ledger_states(self.schedule, s) for s in range(self.schedule.num_pieces)]
        self.compute_s = cache(self._compute_s)
        self.work_s = cache(self._work_s)
        self.forward_s = cache(self._forward_s)
        self.link_s = cache(self._link_s)
        self.optimizer_s = cache(self._optimizer_s)
        self.memory_bytes = cache(self._memory_bytes)

    def _layers(self, first: int, last: int):
        return self.model.layers[first : last + 1]

    def _params(self, first: int, last: int) -> int:
        return sum(layer.params for layer in self._layers(first, last))

    def _action_s(self, stage: int, first: int, last: int, kind: Kind) -> float:
        rank = self.schedule.rank_of(stage)
        return self.costs.compute_s(self._layers(first, last), kind, self.mbs, rank=rank)

    def _forward_s(self, stage: int, first: int, last: int) -> float:
        return self._action_s(stage, first, last, Kind.F)

    def _compute_s(self, stage: int, first: int, last: int) -> float:
        """Forward + backward of one micro-batch."""
        return self.forward_s(stage, first, last) + self._action_s(stage, first, last, Kind.B)

    def _work_s(self, stage: int, first: int, last: int) -> float:
        """All the piece's actions in the schedule (its F, B, I and W)."""
        return sum(count * self._action_s(stage, first, last, kind) for kind, count in self.counts[stage].items())

    def _link_s(self, stage: int, last: int) -> tuple[float, float]:
        """(activation to piece+1, gradient back from it) for a piece ending at `last`;
        nothing between pieces on one rank (the lowered schedule has no message there)."""
        if stage not in self.sends_forward:  # the last piece, or a hand-off on one rank
            return 0.0, 0.0
        src, dst = self.schedule.rank_of(stage), self.schedule.rank_of(stage + 1)
        nbytes = self.model.layers[last].output_bytes_per_sample * self.mbs
        return self.costs.transfer_s(src, dst, nbytes), self.costs.transfer_s(dst, src, nbytes)

    def _optimizer_s(self, stage: int, first: int, last: int) -> float:
        return self.costs.optimizer_s(self._params(first, last), rank=self.schedule.rank_of(stage))

    def _memory_bytes(self, stage: int, first: int, last: int) -> int:
        saved = self.model.stage_saved_bytes(first, last) * self.mbs
        weight = self.model.stage_weight_bytes(first, last) * self.mbs
        activations = max(a * saved + b * weight for a, b in self.states[stage])
        return self.costs.static_bytes(self._params(first, last)) + activations

    def fits(self, stage: int, first: int, last: int) -> bool:
        cap = self.problem.memory_cap_bytes
        return cap is None or self.memory_bytes(stage, first, last) <= cap

    def step_s(self, stage: int, first: int, last: int) -> float:
        """Critical-path contribution of a stage before the bottleneck: c + messages."""
        forward, backward = self.link_s(stage, last)
        return self.compute_s(stage, first, last) + forward + backward


def forwards_after_first_backward(schedule: Schedule, rank: int) -> int:
    """Forwards a rank runs after its first backward."""
    kinds = [a.kind for a in schedule.ranks[rank]]
    first = kinds.index(Kind.B) if Kind.B in kinds else len(kinds)
    return kinds[first:].count(Kind.F)


def bound_form(schedule: Schedule) -> str:
    """Which bounds are proven for this schedule, read from its actions: "gpipe" and
    "1f1b" (K1 and K2, see Bounds) for exactly those one-chunk action orders; any
    other schedule gets the "generic" bounds, valid for every schedule."""
    from .builders import gpipe, one_f_one_b

    if schedule.num_chunks == 1 and schedule.placement == "loop":
        rows = [list(actions) for actions in schedule.ranks]
        for form, build in (("gpipe", gpipe), ("1f1b", one_f_one_b)):
            if rows == build(schedule.num_stages, schedule.num_microbatches):
                return form
    return "generic"


class Bounds:
    """Lower bounds on the simulated iteration time, for whole and partial partitions.

    Each bound is the length of one path through the step's dependency graph
    (actions in rank order, messages between ranks, the optimizer step at the
    end), so the engine can only take longer (it may also queue on links):

    * prefix bound, for each rank r: micro-batch 0 reaches r, r computes m
      micro-batches, the last gradient flows back to rank 0, which steps::

          K1 = opt_0 + max_r ( sum_{s<r} step_s + m*c_r )

    * sum bound, for each rank r: micro-batch 0 (GPipe: m-1) runs forward to
      the last stage and its gradient back to r, r finishes, the last gradient
      flows back to rank 0::

          K2 = opt_0 + sum_s step_s + max_r g_r,
          g_r = (m-1)*c_r (GPipe),  (m-1)*b_r + (forwards after r's first backward)*f_r (1F1B)

    with c = f + b per micro-batch and step = c + the messages to the next
    stage and back. Both are min-max/min-sum recurrences over stages, so
    dynamic programmes give, for any first stages already fixed, the least
    bound any completion can have. K1 and K2 are proven for the GPipe and
    1F1B action orders only (``bound_form``).

    The generic bound, for any schedule: every piece's rank must run all of
    the piece's actions, ``max_s work_s``; and for a whole partition, each rank
    r starts no earlier than the forwards of the pieces before its first piece
    reach it, then runs all its work and its optimizer step.
    """

    def __init__(self, table: StageCosts):
        self.table = table
        problem = table.problem
        self.p, self.n, self.m = problem.num_pieces, table.model.num_layers, problem.num_microbatches
        self.form = bound_form(problem.build_schedule())
        self.k1_suffix = cache(self._k1_suffix)
        self.step_suffix = cache(self._step_suffix)
        self.g_suffix = cache(self._g_suffix)

    def g(self, stage: int, first: int, last: int) -> float:
        t = self.table
        if self.form == "generic":
            return t.work_s(stage, first, last)
        if self.form == "gpipe":
            return (self.m - 1) * t.compute_s(stage, first, last)
        forward = t.forward_s(stage, first, last)
        backward = t.compute_s(stage, first, last) - forward
        after = forwards_after_first_backward(self.table.schedule, stage)
        return (self.m - 1) * backward + after * forward

    def ranges(self, stage: int, start: int) -> range:
        """Last layers stage `stage` may take when it starts at `start`."""
        if stage == self.p - 1:
            return range(self.n - 1, self.n)
        return range(start, self.n - (self.p - stage - 1))

    def _best(self, stage: int, start: int, value) -> float:
        """min over this stage's sizes that fit, of value(last) (inf: nothing fits)."""
        options = [value(last) for last in self.ranges(stage, start) if self.table.fits(stage, start, last)]
        return min(options, default=math.inf)

    def _k1_suffix(self, stage: int, start: int) -> float:
        """least max_{r>=stage} (sum_{stage<=q<r} step_q + m*c_r) over completions."""
        t = self.table
        if stage == self.p:
            return -math.inf if start == self.n else math.inf
        return self._best(stage, start, lambda last: max(
            self.m * t.compute_s(stage, start, last),
            t.step_s(stage, start, last) + self.k1_suffix(stage + 1, last + 1)))

    def _step_suffix(self, stage: int, start: int) -> float:
        if stage == self.p:
            return 0.0 if start == self.n else math.inf
        return self._best(stage, start, lambda last: self.table.step_s(stage, start, last)
                          + self.step_suffix(stage + 1, last + 1))

    def _g_suffix(self, stage: int, start: int) -> float:
        if stage == self.p:
            return -math.inf if start == self.n else math.inf
        return self._best(stage, start, lambda last: max(self.g(stage, start, last),
                                                         self.g_suffix(stage + 1, last + 1)))

    def partial(self, node: PartialPartition) -> float:
        """Least bound of any completion of `node` (inf when none fits)."""
        s, start = node.stage, node.start
        if self.form == "generic":
            return max(node.g, self.g_suffix(s, start))
        k1 = max(node.k1, node.steps + self.k1_suffix(s, start))
        k2 = node.steps + self.step_suffix(s, start) + max(node.g, self.g_suffix(s, start))
        return node.opt0 + max(k1, k2)

    def whole(self, partition: Partition) -> float:
        """The partial bound and, per rank r, its own optimizer step after the
        forwards reached its first piece and it ran all its pieces' work."""
        t, node, schedule = self.table, PartialPartition(), self.table.schedule
        head_f, heads = 0.0, []
        for stage, (first, last) in enumerate(partition.bounds):
            heads.append(head_f)
            head_f += t.forward_s(stage, first, last) + t.link_s(stage, last)[0]
            node = self.child(node, last)
        own_optimizer = 0.0
        for rank in range(schedule.num_ranks):
            pieces = schedule.pieces_of(rank)
            busy = sum(t.work_s(s, *partition.bounds[s]) for s in pieces)
            params = sum(t._params(*partition.bounds[s]) for s in pieces)
            optimizer = self.table.costs.optimizer_s(params, rank=rank)
            own_optimizer = max(own_optimizer, heads[min(pieces)] + busy + optimizer)
        return max(self.partial(node), own_optimizer)

    def child(self, node: PartialPartition, last: int) -> PartialPartition:
        t, s, start = self.table, node.stage, node.start
        return PartialPartition(
            counts=(*node.counts, last - start + 1),
            stage=s + 1,
            start=last + 1,
            steps=node.steps + t.step_s(s, start, last),
            k1=max(node.k1, node.steps + self.m * t.compute_s(s, start, last)),
            g=max(node.g, self.g(s, start, last)),
            opt0=t.optimizer_s(0, 0, last) if s == 0 else node.opt0,
        )


@dataclass(frozen=True)
class PartialPartition:
    """The first `stage` stages fixed (layers 0..start-1) and their bound terms so far."""

    counts: tuple[int, ...] = ()
    stage: int = 0
    start: int = 0
    steps: float = 0.0
    k1: float = -math.inf
    g: float = -math.inf
    opt0: float = 0.0


def lower_bound_s(partition: Partition, table: StageCosts) -> float:
    """The best lower bound on the simulated iteration time of a whole partition."""
    return Bounds(table).whole(partition)


def peak_memory_bytes(partition: Partition, table: StageCosts) -> tuple[int, ...]:
    """Per rank: static bytes of its pieces plus the peak of their activations along
    its action order, exactly what the engine's ledger counts."""
    schedule, model, mbs = table.schedule, table.model, table.mbs
    saved = [model.stage_saved_bytes(*b) * mbs for b in partition.bounds]
    weight = [model.stage_weight_bytes(*b) * mbs for b in partition.bounds]
    peaks = []
    for rank, actions in enumerate(schedule.ranks):
        held = peak = 0
        for action in actions:
            s = action.piece
            held += {Kind.F: saved[s], Kind.B: -saved[s], Kind.I: weight[s] - saved[s], Kind.W: -weight[s]}[action.kind]
            peak = max(peak, held)
        static = sum(table.costs.static_bytes(table._params(*partition.bounds[s])) for s in schedule.pieces_of(rank))
        peaks.append(static + peak)
    return tuple(peaks)
