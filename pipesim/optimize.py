"""The best partition of a layer chain under a memory cap, exact on the simulator.

A branch and bound over cut points (``search``):

1. Partial partitions (the first stages fixed) sit on a heap ordered by the
   least lower bound any of their completions can have (bounds.py: path
   lengths through the step's dependency graph, with dynamic programmes over
   the unfixed stages). Stages whose peak memory exceeds the cap are never
   placed, so every partition the search reaches fits.
2. A whole partition comes off the heap in bound order and is simulated with
   the simpy engine (schedule order, link contention, every rank's optimizer
   step) unless its own, tighter bound already loses to the best time so far.
   The even split and the cut minimising the slowest stage are simulated
   first, so the search starts with a good time to beat.
3. Once the heap's least bound is no better than the best simulated time, no
   partition left can win: the result is the simulator's optimum. On a budget
   (simulations, heap expansions) the best found is returned with the gap
   that remains.

No ILP is needed: the memory cap is a per-(stage, layer range) constraint,
which the search enforces by skipping ranges; when nothing fits, a min-max
dynamic programme over peak memory names the smallest cap that works.
"""

from __future__ import annotations

import heapq
import math
import re
import sys
import time
from dataclasses import dataclass

from .bounds import (
    Bounds,
    PartialPartition,
    Problem,
    StageCosts,
    lower_bound_s,
    peak_memory_bytes,
)
from .engine import simulate
from .errors import UserError
from .partition import Partition, check_stage_count, even_split, min_max_partition
from .plan import Plan
from .predict import Prediction, predict, simulate_plan
from .schedule import Schedule, ScheduleError
from .timeline import compute_metrics

__all__ = ["Candidate", "InfeasibleError", "OptimizeError", "Optimum", "Problem", "StageCosts",
           "lower_bound_s", "optimize", "parse_bytes", "peak_memory_bytes", "search"]

MAX_SIMULATIONS = 200
MAX_EXPANSIONS = 20_000


class OptimizeError(UserError):
    """A search that cannot run or has no answer; the message is one line for the user."""


class InfeasibleError(OptimizeError):
    """No partition fits the memory cap; carries the smallest cap that works."""

    def __init__(self, message: str, min_cap_bytes: int, partition: Partition):
        super().__init__(message)
        self.min_cap_bytes = min_cap_bytes
        self.partition = partition


# --- memory caps as text --------------------------------------------------------

_BYTE_UNITS = {"": 1, "B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40,
               "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_BYTES_RE = re.compile(r"^\s*([0-9.]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(text: str) -> int:
    """``2GiB``, ``512MiB``, ``1.5e9``, ``800MB`` -> bytes."""
    match = _BYTES_RE.match(text)
    if not match or match[2] not in _BYTE_UNITS:
        raise OptimizeError(f"bad memory size {text!r} (allowed: a number of bytes like 1.5e9, or "
                            f"with a unit: {', '.join(u for u in _BYTE_UNITS if u)}, e.g. 2GiB)")
    try:
        value = float(match[1]) * _BYTE_UNITS[match[2]]
    except ValueError:
        raise OptimizeError(f"bad memory size {text!r}: {match[1]!r} is not a number") from None
    if not value >= 1 or math.isinf(value):
        raise OptimizeError(f"bad memory size {text!r}: must be a finite number of at least 1 byte")
    return int(value)


def format_bytes(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


# --- the search --------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    partition: Partition
    lower_bound_s: float
    iteration_time_s: float  # simulated
    peak_memory_bytes: tuple[int, ...]  # per rank, simulated


@dataclass(frozen=True)
class Optimum:
    problem: Problem
    best: Prediction
    even: Prediction
    even_fits: bool
    candidates: tuple[Candidate, ...]  # every simulated partition, fastest first
    proven: bool  # no unsimulated partition can be faster
    remaining_bound_s: float  # lower bound of every partition not simulated (inf: none left)
    recompute_reason: str = ""  # which recomputation (problem.recompute) and why (recomputation.py)
    recompute_tried: tuple[dict, ...] = ()  # --recompute auto: each option's best time, or the cap it needs

    @property
    def gain_over_even(self) -> float:
        """How much faster than the even split: even time / best time."""
        return self.even.metrics.iteration_time_s / self.best.metrics.iteration_time_s


def count_partitions(num_layers: int, num_stages: int) -> int:
    return math.comb(num_layers - 1, num_stages - 1)


def _check(problem: Problem) -> None:
    check_stage_count(problem.model.num_layers, problem.num_pieces)
    b, m = problem.batch_size, problem.num_microbatches
    if problem.data_parallel > 1:
        from .dataparallel import check_shape

        check_shape(b, problem.data_parallel, m)
    if b < 1 or m < 1 or b % m:
        raise ScheduleError(f"--batch-size {b} must be a positive multiple of --microbatches {m}")


def smallest_cap(problem: Problem, table: StageCosts) -> tuple[int, Partition]:
    """The partition with the smallest peak memory on its largest rank (exact DP with one
    piece per rank; with several, the DP bounds each piece alone)."""
    partition = min_max_partition(problem.model.num_layers, problem.num_pieces, table.memory_bytes)
    return max(peak_memory_bytes(partition, table)), partition


def _infeasible(problem: Problem, table: StageCosts) -> InfeasibleError:
    assert problem.memory_cap_bytes is not None, "without a memory cap every partition fits"
    cap_bytes, partition = smallest_cap(problem, table)
    which = ("the smallest cap that works" if problem.build_schedule().num_chunks == 1
             else "a cap that works (with several chunks per rank, not proven the smallest)")
    return InfeasibleError(
        f"no partition of {problem.describe()} fits --memory-cap {format_bytes(problem.memory_cap_bytes)} "
        f"({problem.memory_cap_bytes} bytes); {which} is {format_bytes(cap_bytes)} "
        f"(--memory-cap {cap_bytes}, partition {partition})", cap_bytes, partition)


def simulate_partition(problem: Problem, schedule: Schedule, partition: Partition) -> tuple[float, tuple[int, ...]]:
    if problem.data_parallel > 1:
        plan = Plan(problem.model, partition, schedule, problem.batch_size, problem.data_parallel, problem.placement,
                    problem.recompute)
        timeline = simulate_plan(plan, problem.costs)
    else:
        timeline = simulate(schedule, partition, problem.model, problem.costs, problem.microbatch_size,
                            recompute=problem.recompute)
    metrics = compute_metrics(timeline)
    return metrics.iteration_time_s, tuple(r.peak_memory_bytes for r in metrics.ranks)


def fits_cap(problem: Problem, memory: tuple[int, ...]) -> bool:
    return problem.memory_cap_bytes is None or max(memory) <= problem.memory_cap_bytes


def _seeds(problem: Problem, table: StageCosts) -> list[Partition]:
    """Good guesses simulated first so that pruning starts early: the even split
    and the cut minimising the slowest stage (each if it fits the cap)."""
    n, p = problem.model.num_layers, problem.num_pieces
    seeds = [even_split(n, p), min_max_partition(n, p, table.compute_s, stage_band=table.compute_matrix)]
    fitting = [s for s in seeds if all(table.fits(i, a, b) for i, (a, b) in enumerate(s.bounds))]
    return list({s.counts: s for s in fitting}.values())


class _Search:
    """The state of one branch and bound: the heap, the simulated candidates, the best time."""

    def __init__(self, problem: Problem):
        self.problem = problem
        self.progress = _Progress(problem.describe())
        self.table = StageCosts(problem)
        self.bounds = Bounds(self.table)
        self.schedule = problem.build_schedule()
        self.simulated: dict[tuple[int, ...], Candidate] = {}
        self.best_s = math.inf
        self.expansions = 0
        root = PartialPartition()
        self.bounds.suffix(lambda stage: self.progress.tick(self, f"bounds: {stage} stages to go"))
        self.heap = [(self.bounds.partial(root), root.counts, root)]

    def confirm(self, partition: Partition) -> None:
        """Simulate a whole partition unless its own bound already loses."""
        bound = self.bounds.whole(partition)
        if partition.counts in self.simulated or bound >= self.best_s:
            return
        time_s, memory = simulate_partition(self.problem, self.schedule, partition)
        self.simulated[partition.counts] = Candidate(partition, bound, time_s, memory)
        if fits_cap(self.problem, memory):
            self.best_s = min(self.best_s, time_s)

    def expand(self, priority: float, node: PartialPartition) -> None:
        """Push every next stage that fits and whose completions could still win
        (their bounds computed together, Bounds.children)."""
        self.expansions += 1
        lasts, bounds = self.bounds.children(node)
        for last, bound in zip(lasts.tolist(), bounds.tolist()):
            child_priority = max(priority, bound)
            if child_priority < self.best_s:
                child = self.bounds.child(node, last)
                heapq.heappush(self.heap, (child_priority, child.counts, child))

    def run(self, max_simulations: int, max_expansions: int) -> tuple[bool, float]:
        """(proven, least bound of what was not examined)."""
        while self.heap:
            self.progress.tick(self)
            priority, _, node = heapq.heappop(self.heap)
            if priority >= self.best_s:
                return True, priority
            if self.expansions >= max_expansions or len(self.simulated) >= max_simulations:
                return False, priority
            if node.stage == self.problem.num_pieces:
                self.confirm(Partition.from_counts(node.counts))
            else:
                self.expand(priority, node)
        return True, math.inf


class _Progress:
    """One line on stderr, redrawn at most twice a second, once a search has run for a second."""

    def __init__(self, what: str, stream=None, after_s: float = 1.0):
        self.what, self.stream, self.after_s = what, stream, after_s
        self.started, self.shown = time.perf_counter(), -math.inf
        self.drawn = False
        self.live = getattr(stream or sys.stderr, "isatty", lambda: False)()

    def tick(self, state: _Search, doing: str = "") -> None:
        """Redrawn in place on a terminal (twice a second); elsewhere a line every 5 s."""
        now = time.perf_counter()
        if now - self.started < self.after_s or now - self.shown < (0.5 if self.live else 5.0):
            return
        self.shown, self.drawn = now, True
        if not doing:
            best = "none yet" if math.isinf(state.best_s) else f"{state.best_s * 1e3:.3f} ms"
            doing = f"{state.expansions:,} expansions, {len(state.simulated)} simulated, best {best}"
        stream = self.stream or sys.stderr
        line = f"optimize {self.what}: {doing}, {now - self.started:.0f} s"
        stream.write(f"\r{line}\033[K" if self.live else f"{line}\n")
        stream.flush()

    def close(self) -> None:
        if self.drawn and self.live:
            (self.stream or sys.stderr).write("\n")


def search(problem: Problem, max_simulations: int = MAX_SIMULATIONS,
           max_expansions: int = MAX_EXPANSIONS) -> tuple[list[Candidate], bool, float]:
    """Branch and bound (see the module text). Returns the simulated candidates,
    fastest first, whether the best is proven optimal, and the least lower bound
    of every partition not simulated (inf when none is left)."""
    _check(problem)
    state = _Search(problem)
    if state.heap[0][0] == math.inf:
        raise _infeasible(problem, state.table)
    for seed in _seeds(problem, state.table):
        state.confirm(seed)
    try:
        proven, remaining = state.run(max_simulations, max_expansions)
    finally:
        state.progress.close()
    return _ranked(state.simulated), proven, remaining


def _ranked(simulated: dict) -> list[Candidate]:
    return sorted(simulated.values(),
                  key=lambda c: (c.iteration_time_s, max(c.peak_memory_bytes), c.partition.counts))


def optimize(problem: Problem, max_simulations: int = MAX_SIMULATIONS,
             max_expansions: int = MAX_EXPANSIONS) -> Optimum:
    """The partition with the smallest simulated iteration time that fits the memory cap,
    and the even split by layer count for comparison."""
    candidates, proven, remaining = search(problem, max_simulations, max_expansions)
    fitting = [c for c in candidates if fits_cap(problem, c.peak_memory_bytes)]
    if not fitting:  # several chunks per rank: per-piece memory bounds let through ranks over the cap
        raise _infeasible(problem, StageCosts(problem))
    schedule = problem.build_schedule()
    best = _prediction(problem, schedule, fitting[0].partition)
    even = _prediction(problem, schedule, even_split(problem.model.num_layers, problem.num_pieces))
    return Optimum(problem, best, even, fits_cap(problem, tuple(r.peak_memory_bytes for r in even.metrics.ranks)),
                   tuple(candidates), proven, remaining)


def _prediction(problem: Problem, schedule: Schedule, partition: Partition) -> Prediction:
    plan = Plan(problem.model, partition, schedule, problem.batch_size, problem.data_parallel, problem.placement,
                problem.recompute)
    return predict(plan, problem.costs, problem.profile_name)
