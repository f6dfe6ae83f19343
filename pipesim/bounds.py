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
from dataclasses import dataclass

import numpy as np

from .costs import CostModel
from .model import ModelSpec
from .partition import Partition
from .schedule import Kind, Schedule, build_schedule
from .stagecosts import StageCosts, ledger_states, piece_actions

__all__ = ["Bounds", "PartialPartition", "Problem", "StageCosts", "bound_form", "held_microbatches",
           "ledger_states", "lower_bound_s", "peak_memory_bytes", "piece_actions"]


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
    data_parallel: int = 1  # D replicas; `costs` is over global ranks (see `replica_costs`)
    placement: str = "stage-major"
    recompute: tuple[int, ...] = ()  # pieces that recompute their activations (Plan.recompute)

    def __post_init__(self) -> None:
        if isinstance(self.schedule, str):
            object.__setattr__(self, "schedule", build_schedule(
                self.schedule, self.num_stages, self.num_microbatches, self.num_chunks))
        pieces = self.build_schedule().num_pieces
        if any(not 0 <= piece < pieces for piece in self.recompute):
            raise ValueError(f"recompute {self.recompute}: pieces are 0..{pieces - 1}")

    @property
    def num_pieces(self) -> int:
        return self.build_schedule().num_pieces

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // (self.data_parallel * self.num_microbatches)

    @property
    def replica_costs(self) -> CostModel:
        """The costs replica 0 sees on its local ranks: what the bounds use (any replica's
        pipeline time is a lower bound of the data-parallel step)."""
        if self.data_parallel == 1:
            return self.costs
        from .dataparallel import Layout, replica_costs

        layout = Layout(self.num_stages, self.data_parallel, self.placement,
                        getattr(self.costs, "ranks_per_node", None))
        return replica_costs(self.costs, layout)

    def build_schedule(self) -> Schedule:
        """The schedule (__post_init__ has built it from its name)."""
        assert isinstance(self.schedule, Schedule)
        return self.schedule

    def describe(self) -> str:
        schedule = self.build_schedule()
        chunks = f" x {schedule.num_chunks} chunks" if schedule.num_chunks > 1 else ""
        return (f"{self.model.num_layers} layers into {self.num_stages} stages{chunks} ({schedule.name}, "
                f"{self.num_microbatches} micro-batches of {self.microbatch_size}"
                + (f", recompute {','.join(map(str, self.recompute))}" if self.recompute else "") + ")")


def held_microbatches(schedule: Schedule, piece: int) -> int:
    """Micro-batches whose activations a piece holds at its peak (F until B, or until W)."""
    return max(a + b for a, b in ledger_states(schedule, piece))


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
        self.after = [forwards_after_first_backward(problem.build_schedule(), problem.build_schedule().rank_of(s))
                      for s in range(self.p)]
        self._suffix: dict[str, list[np.ndarray]] | None = None

    def g(self, stage: int, first: int, last: int) -> float:
        t = self.table
        if self.form == "generic":
            return t.work_s(stage, first, last)
        if self.form == "gpipe":
            return (self.m - 1) * t.compute_s(stage, first, last)
        forward = t.forward_s(stage, first, last)
        backward = t.compute_s(stage, first, last) - forward
        return (self.m - 1) * backward + self.after[stage] * forward

    def g_matrix(self, stage: int, firsts: np.ndarray, width: int) -> np.ndarray:
        """g like StageCosts.action_matrix (nan or inf past the model's end)."""
        t = self.table
        with np.errstate(invalid="ignore"):  # inf - inf, 0 * inf past the model's end
            if self.form == "generic":
                return t.work_matrix(stage, firsts, width)
            if self.form == "gpipe":
                return (self.m - 1) * t.compute_matrix(stage, firsts, width)
            forward = t.action_matrix(stage, Kind.F, firsts, width)
            backward = t.compute_matrix(stage, firsts, width) - forward
            return (self.m - 1) * backward + self.after[stage] * forward

    def ranges(self, stage: int, start: int) -> range:
        """Last layers stage `stage` may take when it starts at `start`."""
        if stage == self.p - 1:
            return range(self.n - 1, self.n)
        return range(start, self.n - (self.p - stage - 1))

    @property
    def width(self) -> int:
        """The most layers one stage can hold (every other stage holds at least one)."""
        return self.n - self.p + 1

    def firsts(self, stage: int) -> np.ndarray:
        """First layers stage `stage` can start at."""
        return np.array([0]) if stage == 0 else np.arange(stage, stage + self.width)

    def allowed(self, stage: int, firsts: np.ndarray) -> np.ndarray:
        """[first, k]: the stage may hold first..first+k (room left for the later stages, fits the cap)."""
        n = self.n
        lasts = firsts[:, None] + np.arange(self.width)[None, :]
        if stage == self.p - 1:
            ok = lasts == n - 1
        else:
            ok = lasts <= n - (self.p - stage - 1) - 1
        fits = self.table.fits_matrix(stage, firsts, self.width)
        return ok if fits is None else ok & fits

    def suffix(self, progress=None) -> dict[str, list[np.ndarray]]:
        """For every stage s and first layer a, the least of each bound term over the
        completions of stages s.. from layer a (inf: none fits), bottom-up over stages
        and in blocks of rows (memory stays small):

        k1[s][a] = min over last of max(m*c, step + k1[s+1][last+1])
        steps[s][a] = min over last of step + steps[s+1][last+1]
        g[s][a] = min over last of max(g, g[s+1][last+1])

        ``progress(stages to go)`` is called before each stage.
        """
        if self._suffix is None:
            n = self.n
            k1, steps, g = [np.full(n + 1, np.inf) for _ in range(3)]
            k1[n], steps[n], g[n] = -np.inf, 0.0, -np.inf
            tables = {"k1": [k1], "steps": [steps], "g": [g]}
            for stage in range(self.p - 1, -1, -1):
                if progress is not None:
                    progress(stage + 1)
                nxt = {name: rows[0] for name, rows in tables.items()}
                here = {name: np.full(n + 1, np.inf) for name in tables}
                for firsts in _blocks(self.firsts(stage), self.width):
                    for name, least in self._least_terms(stage, firsts, nxt).items():
                        here[name][firsts] = least
                for name, rows in tables.items():
                    rows.insert(0, here[name])
            self._suffix = tables
        return self._suffix

    def _least_terms(self, stage: int, firsts: np.ndarray, nxt: dict) -> dict[str, np.ndarray]:
        allowed = self.allowed(stage, firsts)
        after = np.minimum(firsts[:, None] + np.arange(self.width)[None, :], self.n - 1) + 1
        with np.errstate(invalid="ignore"):
            out = {"g": _least(allowed, np.maximum(self.g_matrix(stage, firsts, self.width), nxt["g"][after]))}
            if self.form != "generic":
                compute = self.table.compute_matrix(stage, firsts, self.width)
                step = self.table.step_matrix(stage, firsts, self.width, compute)
                out["k1"] = _least(allowed, np.maximum(self.m * compute, step + nxt["k1"][after]))
                out["steps"] = _least(allowed, step + nxt["steps"][after])
        return out

    def partial(self, node: PartialPartition) -> float:
        """Least bound of any completion of `node` (inf when none fits)."""
        s, start = node.stage, node.start
        table = self.suffix()
        if self.form == "generic":
            return float(max(node.g, table["g"][s][start]))
        k1 = max(node.k1, node.steps + table["k1"][s][start])
        k2 = node.steps + table["steps"][s][start] + max(node.g, table["g"][s][start])
        return float(node.opt0 + max(k1, k2))

    def children(self, node: PartialPartition) -> tuple[np.ndarray, np.ndarray]:
        """(last layers of the next stage that fit, the least bound of each child's completions),
        vectorised: what `partial(child(node, last))` gives for each."""
        s, a, m, t, w = node.stage, node.start, self.m, self.table, self.width
        firsts = np.array([a])
        ks = np.flatnonzero(self.allowed(s, firsts)[0])
        lasts = a + ks
        if not lasts.size:
            return lasts, np.zeros(0)
        table = self.suffix()
        g = np.maximum(node.g, self.g_matrix(s, firsts, w)[0, ks])
        with np.errstate(invalid="ignore"):
            if self.form == "generic":
                return lasts, np.maximum(g, table["g"][s + 1][lasts + 1])
            compute = t.compute_matrix(s, firsts, w)
            steps = node.steps + t.step_matrix(s, firsts, w, compute)[0, ks]
            k1 = np.maximum(node.k1, node.steps + m * compute[0, ks])
            opt0 = np.array([t.optimizer_s(0, 0, last) for last in lasts.tolist()]) if s == 0 else node.opt0
            k1 = np.maximum(k1, steps + table["k1"][s + 1][lasts + 1])
            k2 = steps + table["steps"][s + 1][lasts + 1] + np.maximum(g, table["g"][s + 1][lasts + 1])
            return lasts, opt0 + np.maximum(k1, k2)

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
            params = sum(t.params(*partition.bounds[s]) for s in pieces)
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
    """Per rank: static bytes of its pieces plus the peak of the step ledger (ledger.py)
    along its action order, exactly what the engine counts."""
    from .engine import stage_shapes
    from .ledger import step_peak_bytes

    schedule, model, mbs = table.schedule, table.model, table.mbs
    step = step_peak_bytes(schedule, stage_shapes(model, partition, tuple(sorted(table.recompute))), mbs,
                           mbs * schedule.num_microbatches, getattr(table.problem, "data_parallel", 1) > 1)
    return tuple(sum(table.costs.static_bytes(table.params(*partition.bounds[s])) for s in schedule.pieces_of(rank))
                 + step[rank] for rank in range(schedule.num_ranks))


def _least(allowed: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per first layer (row), the least value over the allowed last layers (inf: none)."""
    return np.where(allowed, values, np.inf).min(axis=1)


def _blocks(rows: np.ndarray, width: int, cells: int = 1 << 20):
    """`rows` in slices of about `cells` matrix cells each."""
    step = max(1, cells // max(width, 1))
    for i in range(0, len(rows), step):
        yield rows[i : i + step]
