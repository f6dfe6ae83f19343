"""Cost-model bounds on partitions: what a stage costs, holds, and how fast a
partition can possibly be.

For every stage s (on rank s) and layer range first..last the cost model
gives the stage's forward ``f`` and backward ``b`` time per micro-batch
(c = f + b), the messages to the next stage and back, its optimizer step and
its peak memory: static bytes (parameters, gradients, optimizer state) plus
the micro-batches the schedule holds (GPipe m, 1F1B min(p - s, m)), exactly
what the engine's memory ledger counts.

The lower bounds (see `Bounds`) are lengths of paths through the step's
dependency graph, so the simulator can never be faster; they decompose over
stages, so dynamic programmes bound every completion of a partial partition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

from .costs import CostModel
from .model import ModelSpec
from .partition import Partition
from .schedule import Schedule, build_schedule


@dataclass(frozen=True)
class Problem:
    model: ModelSpec
    schedule: str
    num_stages: int
    num_microbatches: int
    batch_size: int
    costs: CostModel
    memory_cap_bytes: int | None = None
    profile_name: str = ""

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.num_microbatches

    def build_schedule(self) -> Schedule:
        return build_schedule(self.schedule, self.num_stages, self.num_microbatches)

    def describe(self) -> str:
        return (f"{self.model.num_layers} layers into {self.num_stages} stages ({self.schedule}, "
                f"{self.num_microbatches} micro-batches of {self.microbatch_size})")


def held_microbatches(schedule: str, num_stages: int, num_microbatches: int, stage: int) -> int:
    """Micro-batches whose activations a stage holds at its peak."""
    if schedule == "1f1b":
        return min(num_stages - stage, num_microbatches)
    return num_microbatches


class StageCosts:
    """Cost-model figures of stage s holding layers first..last, cached."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.model = problem.model
        self.costs = problem.costs
        self.mbs = problem.microbatch_size
        self.compute_s = cache(self._compute_s)
        self.forward_s = cache(self._forward_s)
        self.link_s = cache(self._link_s)
        self.optimizer_s = cache(self._optimizer_s)
        self.memory_bytes = cache(self._memory_bytes)

    def _layers(self, first: int, last: int):
        return self.model.layers[first : last + 1]

    def _params(self, first: int, last: int) -> int:
        return sum(layer.params for layer in self._layers(first, last))

    def _forward_s(self, stage: int, first: int, last: int) -> float:
        return self.costs.compute_s(self._layers(first, last), "F", self.mbs, rank=stage)

    def _compute_s(self, stage: int, first: int, last: int) -> float:
        """Forward + backward of one micro-batch."""
        backward = self.costs.compute_s(self._layers(first, last), "B", self.mbs, rank=stage)
        return self.forward_s(stage, first, last) + backward

    def _link_s(self, stage: int, last: int) -> tuple[float, float]:
        """(activation to stage+1, gradient back from it) for a stage ending at `last`."""
        if stage == self.problem.num_stages - 1:
            return 0.0, 0.0
        nbytes = self.model.layers[last].output_bytes_per_sample * self.mbs
        return (self.costs.transfer_s(stage, stage + 1, nbytes),
                self.costs.transfer_s(stage + 1, stage, nbytes))

    def _optimizer_s(self, stage: int, first: int, last: int) -> float:
        return self.costs.optimizer_s(self._params(first, last), rank=stage)

    def _memory_bytes(self, stage: int, first: int, last: int) -> int:
        p = self.problem
        held = held_microbatches(p.schedule, p.num_stages, p.num_microbatches, stage)
        activations = held * self.model.stage_saved_bytes(first, last) * self.mbs
        return self.costs.static_bytes(self._params(first, last)) + activations

    def fits(self, stage: int, first: int, last: int) -> bool:
        cap = self.problem.memory_cap_bytes
        return cap is None or self.memory_bytes(stage, first, last) <= cap

    def step_s(self, stage: int, first: int, last: int) -> float:
        """Critical-path contribution of a stage before the bottleneck: c + messages."""
        forward, backward = self.link_s(stage, last)
        return self.compute_s(stage, first, last) + forward + backward


def forwards_after_first_backward(schedule: str, num_stages: int, num_microbatches: int,
                                   stage: int) -> int:
    """Forwards a stage runs after its first backward: the rest of its warm-up."""
    if schedule == "1f1b":
        warmup = min(num_stages - stage - 1, num_microbatches)
        return max(0, num_microbatches - warmup - 1)
    return 0


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
    bound any completion can have.
    """

    def __init__(self, table: StageCosts):
        self.table = table
        problem = table.problem
        self.p, self.n, self.m = problem.num_stages, table.model.num_layers, problem.num_microbatches
        self.gpipe = problem.schedule != "1f1b"
        self.k1_suffix = cache(self._k1_suffix)
        self.step_suffix = cache(self._step_suffix)
        self.g_suffix = cache(self._g_suffix)

    def g(self, stage: int, first: int, last: int) -> float:
        t = self.table
        if self.gpipe:
            return (self.m - 1) * t.compute_s(stage, first, last)
        forward = t.forward_s(stage, first, last)
        backward = t.compute_s(stage, first, last) - forward
        after = forwards_after_first_backward("1f1b", self.p, self.m, stage)
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
        k1 = max(node.k1, node.steps + self.k1_suffix(s, start))
        k2 = node.steps + self.step_suffix(s, start) + max(node.g, self.g_suffix(s, start))
        return node.opt0 + max(k1, k2)

    def whole(self, partition: Partition) -> float:
        """K1, K2 and, per rank r, its own optimizer step after micro-batch 0
        reached it and it computed m micro-batches."""
        t, node = self.table, PartialPartition()
        head_f, own_optimizer = 0.0, 0.0
        for stage, (first, last) in enumerate(partition.bounds):
            busy = self.m * t.compute_s(stage, first, last)
            own_optimizer = max(own_optimizer, head_f + busy + t.optimizer_s(stage, first, last))
            head_f += t.forward_s(stage, first, last) + t.link_s(stage, last)[0]
            node = self.child(node, last)
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
    return tuple(table.memory_bytes(s, first, last) for s, (first, last) in enumerate(partition.bounds))
