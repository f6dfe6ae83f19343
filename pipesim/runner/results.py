"""Measured runs as Timelines, the same type the simulator produces. No torch here."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Unpack

import numpy as np

from ..plan import Plan
from ..timeline import MemorySample, Metrics, Span, Timeline, compute_metrics
from .config import RunConfig, RunOptions
from .launch import launch
from .records import RankRun, RunResult, StepMemory


@dataclass(frozen=True)
class Measurement:
    plan: Plan
    timelines: tuple[Timeline, ...]  # one per measured iteration, clocks aligned, t=0 at step start
    peak_rss_bytes: tuple[int, ...]
    hosts: tuple[str, ...]
    mpi: str
    step_memory: tuple[StepMemory | None, ...] = ()  # per rank: the memory probe's step

    @property
    def iteration_times_s(self) -> list[float]:
        return [compute_metrics(t).iteration_time_s for t in self.timelines]

    @property
    def median_s(self) -> float:
        return statistics.median(self.iteration_times_s)

    def percentile_s(self, q: float) -> float:
        return float(np.percentile(self.iteration_times_s, q))

    @property
    def representative(self) -> Timeline:
        """The iteration at the median (the lower one for an even count)."""
        order = sorted(range(len(self.timelines)), key=self.iteration_times_s.__getitem__)
        return self.timelines[order[(len(order) - 1) // 2]]

    @property
    def metrics(self) -> Metrics:
        return compute_metrics(self.representative)


def _timeline(ranks: tuple[RankRun, ...], iteration: int) -> Timeline:
    """One iteration of every rank on rank 0's clock, t=0 at the earliest step start."""
    origin = min(r.records[iteration].start_s - r.clock_offset_s for r in ranks)
    spans: list[Span] = []
    memory: list[MemorySample] = []
    for r in ranks:
        record, shift = r.records[iteration], r.clock_offset_s + origin
        spans += [replace(s, start_s=s.start_s - shift, end_s=s.end_s - shift) for s in record.spans]
        memory += [replace(m, time_s=m.time_s - shift) for m in record.memory]
    spans.sort(key=lambda s: (s.start_s, s.rank))
    static = tuple(r.static_bytes for r in ranks)
    return Timeline(len(ranks), tuple(spans), tuple(memory), static, "measured")


def from_result(plan: Plan, result: RunResult) -> Measurement:
    ranks = tuple(sorted(result.ranks, key=lambda r: r.rank))
    return Measurement(
        plan=plan,
        timelines=tuple(_timeline(ranks, i) for i in range(len(ranks[0].records))),
        peak_rss_bytes=tuple(r.peak_rss_bytes for r in ranks),
        hosts=tuple(r.host for r in ranks),
        mpi=result.mpi,
        step_memory=tuple(r.step_memory for r in ranks),
    )


def measure(plan: Plan, log: Callable[[str], object] = print,
            **options: Unpack[RunOptions]) -> Measurement | None:
    """Run `plan` for real (options: see RunConfig); None on ranks other than 0."""
    config = RunConfig.from_plan(plan, **options)
    result = launch(config, RunResult, plan.world_size, config.threads_per_rank, log)
    return None if result is None else from_result(plan, result)


def measure_memory(plan: Plan, log: Callable[[str], object] = print,
                   **options: Unpack[RunOptions]) -> tuple[StepMemory | None, ...] | None:
    """Per rank, the memory of one step of `plan` after `warmup` steps (default 3), in a job of
    its own (runner/memory_probe.py says why); None on ranks other than 0."""
    from .memory_probe import ENVIRONMENT

    settings: RunOptions = {"warmup": 3, **options, "iterations": 0, "progress": False, "memory_probe": True}
    config = RunConfig.from_plan(plan, **settings)
    result = launch(config, RunResult, plan.world_size, config.threads_per_rank, log, ENVIRONMENT)
    return None if result is None else tuple(r.step_memory for r in sorted(result.ranks, key=lambda r: r.rank))
