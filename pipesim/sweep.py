"""What-if sweeps: predict every (stages, micro-batches, schedule) of a grid.

Points are simulated in parallel processes (one per core by default) with a
progress bar on stderr; the result is a table, figures (report.py) and the
fastest configuration whose every rank fits a memory cap.
"""

from __future__ import annotations

import itertools
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TextIO

from .costs import CostModel
from .dataparallel import DataParallelError
from .model import ModelSpec
from .optimize import OptimizeError, Problem, optimize
from .partition import PartitionError
from .plan import make_plan
from .predict import baseline_time_s, predict
from .schedule import SCHEDULES, ScheduleError

PARTITION_MODES = ("balanced", "even", "optimized")
OPTIMIZED_SIMULATIONS, OPTIMIZED_EXPANSIONS = 40, 2_000  # optimize's budget per point ("optimized")


@dataclass(frozen=True)
class SweepPoint:
    num_stages: int
    num_microbatches: int
    schedule: str
    data_parallel: int = 1  # D replicas of the pipeline (world = num_stages x D)
    placement: str = "stage-major"

    @property
    def closed_form_speedup(self) -> float:
        """Balanced stages, free links, no optimizer: D * p*m / (m + p - 1)."""
        p, m = self.num_stages, self.num_microbatches
        return self.data_parallel * p * m / (m + p - 1)


@dataclass(frozen=True)
class PointResult:
    point: SweepPoint
    partition: tuple[int, ...] = ()
    iteration_time_s: float | None = None  # None when skipped
    bubble_fraction: float | None = None
    rank_peak_memory_bytes: tuple[int, ...] = ()
    skipped: str = ""  # why the point has no prediction

    @property
    def ok(self) -> bool:
        return not self.skipped

    @property
    def peak_memory_bytes(self) -> int:
        return max(self.rank_peak_memory_bytes)


@dataclass(frozen=True)
class Sweep:
    model_name: str
    num_layers: int
    batch_size: int
    partition_mode: str
    baseline_time_s: float  # the whole model on one rank, whole mini-batch
    memory_cap_bytes: int | None
    results: tuple[PointResult, ...]  # in grid order: schedule, stages, micro-batches
    wall_s: float = 0.0

    def speedup(self, result: PointResult) -> float:
        assert result.iteration_time_s is not None, "a skipped point has no speedup"
        return self.baseline_time_s / result.iteration_time_s

    def fits(self, result: PointResult) -> bool:
        return result.ok and (self.memory_cap_bytes is None or result.peak_memory_bytes <= self.memory_cap_bytes)

    def recommended(self) -> PointResult | None:
        """The fastest point that fits the cap; ties go to fewer stages, then fewer micro-batches."""
        fitting = [r for r in self.results if self.fits(r)]
        return min(fitting, key=lambda r: (r.iteration_time_s, r.point.num_stages, r.point.num_microbatches),
                   default=None)

    @property
    def stages(self) -> list[int]:
        return sorted({r.point.num_stages for r in self.results})

    @property
    def microbatches(self) -> list[int]:
        return sorted({r.point.num_microbatches for r in self.results})

    @property
    def schedules(self) -> list[str]:
        return list(dict.fromkeys(r.point.schedule for r in self.results))

    def result(self, stages: int, microbatches: int, schedule: str) -> PointResult | None:
        for r in self.results:
            if r.point == SweepPoint(stages, microbatches, schedule):
                return r
        return None


def grid(stages: Sequence[int], microbatches: Sequence[int], schedules: Sequence[str],
         data_parallel: int = 1, placement: str = "stage-major") -> list[SweepPoint]:
    for name in schedules:
        if name not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {name!r} (allowed: {', '.join(SCHEDULES)})")
    return [SweepPoint(p, m, s, data_parallel, placement)
            for s, p, m in itertools.product(schedules, stages, microbatches)]


def evaluate(point: SweepPoint, model: ModelSpec, costs: CostModel, batch_size: int,
             partition_mode: str = "balanced", memory_cap_bytes: int | None = None) -> PointResult:
    """Predict one point; a point that cannot exist (more stages than layers, a
    batch that micro-batches do not divide, no partition under the cap) is skipped."""
    try:
        if partition_mode == "optimized":
            problem = Problem(model, point.schedule, point.num_stages, point.num_microbatches,
                              batch_size, costs, memory_cap_bytes, data_parallel=point.data_parallel,
                              placement=point.placement)
            prediction = optimize(problem, max_simulations=OPTIMIZED_SIMULATIONS,
                                  max_expansions=OPTIMIZED_EXPANSIONS).best
        else:
            text = "balanced" if partition_mode == "balanced" else _even_text(model, point.num_stages)
            plan = make_plan(model, point.num_stages, point.num_microbatches, batch_size, point.schedule,
                             text, _replica0(costs, point), data_parallel=point.data_parallel,
                             placement=point.placement)
            prediction = predict(plan, costs, "")
    except (PartitionError, ScheduleError, OptimizeError, DataParallelError) as exc:
        return PointResult(point, skipped=str(exc))
    metrics = prediction.metrics
    return PointResult(point, prediction.plan.partition.counts, metrics.iteration_time_s,
                       metrics.bubble_fraction, tuple(r.peak_memory_bytes for r in metrics.ranks))


def _replica0(costs: CostModel, point: SweepPoint) -> CostModel:
    if point.data_parallel == 1:
        return costs
    from .dataparallel import Layout, replica_costs

    layout = Layout(point.num_stages, point.data_parallel, point.placement, getattr(costs, "ranks_per_node", None))
    return replica_costs(costs, layout)


def sweep_work_s(num_layers: int, points: Sequence[SweepPoint], partition_mode: str = "balanced") -> float:
    """Estimated single-core seconds of the whole sweep (limits.py); points with more
    stages than layers are skipped before any work."""
    from .limits import optimize_work_s, work_s

    total = 0.0
    for point in points:
        p, m = point.num_stages, point.num_microbatches
        if p > num_layers:
            continue
        if partition_mode == "optimized":
            total += optimize_work_s(num_layers, p, m, OPTIMIZED_SIMULATIONS, OPTIMIZED_EXPANSIONS)
        else:
            total += work_s(num_layers, p, m, balanced=partition_mode == "balanced")
    return total


def _even_text(model: ModelSpec, num_stages: int) -> str:
    from .partition import even_split

    return str(even_split(model.num_layers, num_stages))


class ProgressBar:
    """``[#######.........]  23/72 configurations`` redrawn in place on a terminal;
    elsewhere (logs, pipes) only the closing line is written."""

    def __init__(self, total: int, stream: TextIO | None = None, label: str = "configurations"):
        self.total, self.done, self.label = total, 0, label
        self.stream = stream if stream is not None else sys.stderr
        self.live = getattr(self.stream, "isatty", lambda: False)()
        self.started = time.perf_counter()

    def line(self, width: int = 30) -> str:
        filled = width * self.done // self.total if self.total else width
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.done:>3}/{self.total} {self.label}"

    def advance(self) -> None:
        self.done += 1
        if self.live:
            self.stream.write("\r" + self.line())
            self.stream.flush()

    def close(self) -> None:
        elapsed = time.perf_counter() - self.started
        self.stream.write(("\r" if self.live else "") + self.line() + f" in {elapsed:.1f} s\n")
        self.stream.flush()


def run_sweep(
    model: ModelSpec,
    costs: CostModel,
    points: Sequence[SweepPoint],
    batch_size: int,
    partition_mode: str = "balanced",
    memory_cap_bytes: int | None = None,
    jobs: int | None = None,
    progress: Callable[[], None] | ProgressBar | None = None,
) -> Sweep:
    """Predict every point, in `jobs` processes (default: one per core; 1: in this process)."""
    if partition_mode not in PARTITION_MODES:
        raise PartitionError(f"unknown sweep partition {partition_mode!r} (allowed: {', '.join(PARTITION_MODES)})")
    if jobs is not None and jobs < 1:
        raise PartitionError(f"--jobs must be >= 1, got {jobs}")
    started = time.perf_counter()
    baseline = baseline_time_s(model, batch_size, costs)
    args = (model, costs, batch_size, partition_mode, memory_cap_bytes)
    jobs = jobs or os.cpu_count() or 1
    advance = progress.advance if isinstance(progress, ProgressBar) else (progress or (lambda: None))
    if jobs == 1 or len(points) <= 1:
        results = []
        for point in points:
            results.append(evaluate(point, *args))
            advance()
    else:
        results = _parallel(points, args, jobs, advance)
    if isinstance(progress, ProgressBar):
        progress.close()
    return Sweep(model.name, model.num_layers, batch_size, partition_mode, baseline, memory_cap_bytes,
                 tuple(results), time.perf_counter() - started)


def _parallel(points: Sequence[SweepPoint], args: tuple, jobs: int, advance: Callable[[], None]) -> list:
    """Biggest points first (they take longest), results back in grid order."""
    order = sorted(range(len(points)), key=lambda i: -points[i].num_stages * points[i].num_microbatches)
    results: list[PointResult | None] = [None] * len(points)
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(points)), initializer=_ignore_sigint)
    try:
        futures = {pool.submit(evaluate, points[i], *args): i for i in order}
        for future in as_completed(futures):
            results[futures[future]] = future.result()
            advance()
    finally:  # on Ctrl-C or an error, drop the points not started instead of running them all
        pool.shutdown(wait=True, cancel_futures=True)
    return results


def _ignore_sigint() -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool (no traceback per worker)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
