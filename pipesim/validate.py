"""`pipesim validate`: run a grid of real executions, predict each, compare.

Grid files (validation/*.toml): a base execution spec plus axes; grid.py reads them.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from .costs import ProfileCostModel
from .engine import stage_shapes
from .grid import Case, Grid, GridError, calibration_cells, load_grid, plan_case
from .heldout import CaseSources, case_sources
from .ledger import step_peak_bytes
from .predict import Prediction, predict
from .profile import Profile
from .timeline import ACTION_KINDS, Timeline, compute_metrics

__all__ = ["Case", "Grid", "GridError", "calibration_cells", "load_grid", "plan_case"]  # grid.py, re-exported

# --- results ----------------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    case: Case
    prediction: Prediction
    rounds: tuple  # one runner Measurement per round
    memory: tuple = ()  # per rank: runner.records.StepMemory of the memory probe's job (() = not measured)
    sources: CaseSources | None = None  # where its costs came from (heldout.py)

    @property
    def all_times_s(self) -> list[float]:
        return [t for m in self.rounds for t in m.iteration_times_s]

    @property
    def measured_s(self) -> float:
        return statistics.median(self.all_times_s)

    @property
    def predicted_s(self) -> float:
        return self.prediction.metrics.iteration_time_s

    @property
    def error(self) -> float:
        return self.predicted_s / self.measured_s - 1

    @property
    def round_medians_s(self) -> list[float]:
        return [m.median_s for m in self.rounds]

    @property
    def repeat_difference(self) -> float:
        """The noise floor of this case: spread of its round medians over their mean."""
        medians = self.round_medians_s
        return (max(medians) - min(medians)) / statistics.mean(medians) if len(medians) > 1 else 0.0

    def spread_s(self) -> tuple[float, float]:
        times = sorted(self.all_times_s)
        return times[len(times) // 10], times[(len(times) * 9) // 10]

    @property
    def measured_timeline(self) -> Timeline:
        return self.rounds[-1].representative

    def saved_accounting_errors(self) -> list[tuple[int, int, float]]:
        """Per rank: (predicted, counted, error) of static bytes + peak saved activations. The
        runner counts saved tensors with saved-tensor hooks; for fc layers that count equals the
        formula by construction: a check of the accounting, not a measurement of memory."""
        predicted = saved_peak_bytes(self.prediction.plan)
        measured = compute_metrics(self.measured_timeline).ranks
        static = self.prediction.timeline.static_bytes
        return [(static[m.rank] + p, m.peak_memory_bytes, (static[m.rank] + p) / m.peak_memory_bytes - 1)
                for p, m in zip(predicted, measured)]

    def predicted_step_bytes(self) -> tuple[int, ...]:
        return predicted_step_bytes(self.prediction.plan)

    def memory_errors(self) -> list[tuple[int, int, float]]:
        """Per rank: (predicted, measured, error) of the bytes one step adds: the step ledger's
        peak against the RSS high-water of the memory probe's step less the resident size before
        it (runner/memory_probe.py). Empty when memory was not measured."""
        out = []
        for predicted, m in zip(self.predicted_step_bytes(), self.memory):
            if m is not None and m.rss_increase_bytes:
                out.append((predicted, m.rss_increase_bytes, predicted / m.rss_increase_bytes - 1))
        return out

    def profiler_errors(self) -> list[tuple[int, int, float]]:
        """As memory_errors, against torch's profiler: the peak of the step's tensor allocations."""
        return [(p, m.profiler_peak_bytes, p / m.profiler_peak_bytes - 1)
                for p, m in zip(self.predicted_step_bytes(), self.memory)
                if m is not None and m.profiler_peak_bytes]


def predicted_step_bytes(plan) -> tuple[int, ...]:
    """Per global rank: the step ledger's peak (ledger.py) of its stage in one replica
    (replicas hold the same), static bytes not included."""
    local = step_peak_bytes(plan.schedule, stage_shapes(plan.model, plan.partition, plan.recompute),
                            plan.microbatch_size, plan.batch_size // plan.data_parallel, plan.data_parallel > 1)
    layout = plan.layout()
    return tuple(local[layout.stage_of(rank)] for rank in range(plan.world_size))


def saved_peak_bytes(plan) -> tuple[int, ...]:
    from .ledger import saved_peak_bytes as saved

    return saved(plan.schedule, stage_shapes(plan.model, plan.partition, plan.recompute), plan.microbatch_size)


def rank_breakdown(timeline: Timeline, overhead_per_action_s: float | None = None) -> dict[str, float]:
    """Where each rank's iteration time goes, averaged over ranks: compute,
    per-action overhead, waiting for messages, and the rest (idle not spent
    waiting: the rank finished early). The four add up to the iteration time.

    Simulated timelines carry the overhead inside F/B spans (pass it per
    action); measured ones (None) show it as gaps between actions."""
    iteration = compute_metrics(timeline).iteration_time_s
    parts = {"compute": 0.0, "overhead": 0.0, "wait": 0.0, "rest": 0.0}
    for rank in range(timeline.num_ranks):
        spans = sorted(timeline.rank_spans(rank, (*ACTION_KINDS, "optimizer", "wait", "copy")),
                       key=lambda s: s.start_s)
        actions = [s for s in spans if s.kind in ACTION_KINDS]
        compute = sum(s.duration_s for s in spans if s.kind in (*ACTION_KINDS, "optimizer", "copy"))
        wait = sum(s.duration_s for s in spans if s.kind == "wait")
        if overhead_per_action_s is not None:
            overhead = overhead_per_action_s * len(actions)
            compute -= overhead
        else:  # measured: time between the first and last span not covered by any span
            overhead = (spans[-1].end_s - spans[0].start_s) - sum(s.duration_s for s in spans)
        parts["compute"] += compute
        parts["overhead"] += overhead
        parts["wait"] += wait
        parts["rest"] += iteration - compute - overhead - wait
    return {k: v / timeline.num_ranks for k, v in parts.items()}


def breakdown_difference(result: CaseResult, profile: Profile) -> dict[str, float]:
    """Measured minus simulated, per component, in seconds (sums to the iteration-time difference)."""
    measured = rank_breakdown(result.measured_timeline)
    simulated = rank_breakdown(result.prediction.timeline, profile.action_overhead_s)
    return {k: measured[k] - simulated[k] for k in measured}


# --- running ----------------------------------------------------------------------


def run_validation(grid: Grid, profile: Profile, log=print, measure=None, measure_memory=None) -> list[CaseResult]:
    """Measure every case `grid.rounds` times (rounds interleaved) and predict it; then, once
    per case, its memory in a job of its own (`measure_memory`; False: not measured)."""
    if measure is None:
        from .runner.results import measure
    if measure_memory is None:
        from .runner.results import measure_memory
    costs = ProfileCostModel(profile)
    plans = [plan_case(case, costs) for case in grid.cases]
    # predicted before anything is measured: a case the profile cannot predict fails in seconds
    predictions = [predict(plan, costs, profile.name) for plan in plans]
    sources = [case_sources(plan, profile) for plan in plans]
    measured: list[list] = [[] for _ in grid.cases]
    total = grid.rounds * len(grid.cases)
    for round_ in range(grid.rounds):
        for index, (case, plan) in enumerate(zip(grid.cases, plans)):
            done = round_ * len(grid.cases) + index + 1
            m = measure(plan, lambda _: None, iterations=grid.iterations, warmup=grid.warmup,
                        progress=False)
            measured[index].append(m)
            log(f"[{done}/{total}] round {round_ + 1}: {case.label}: {m.median_s * 1e3:.2f} ms")
    memory: list[tuple] = [() for _ in grid.cases]
    if measure_memory is not False:
        from .runner.launch import RunFailed

        for index, (case, plan) in enumerate(zip(grid.cases, plans)):
            try:  # an extra measurement: its failure must not throw away the timed rounds
                memory[index] = tuple(measure_memory(plan, lambda _: None, profile_memory=True) or ())
            except RunFailed as exc:
                log(f"[memory {index + 1}/{len(plans)}] {case.label}: not measured ({str(exc).splitlines()[-1]})")
                continue
            log(f"[memory {index + 1}/{len(plans)}] {case.label}: step adds "
                + ", ".join("?" if m is None or m.rss_increase_bytes is None else f"{m.rss_increase_bytes / 2**20:.2f} MiB"
                            for m in memory[index]))
    return [CaseResult(case, prediction, tuple(rounds), mem, source)
            for case, prediction, rounds, mem, source in zip(grid.cases, predictions, measured, memory, sources)]


# --- summary ----------------------------------------------------------------------


@dataclass(frozen=True)
class Summary:
    mape: float
    max_abs_error: float
    speedup_rank_correlation: float
    noise_floor_median: float
    noise_floor_max: float
    partition_rankings_match: int
    partition_rankings_total: int
    saved_accounting_max_abs_error: float  # formula against the saved-tensor hooks' count (equal by construction for fc)
    memory_mape: float = math.nan  # step ledger against the RSS high-water (nan: memory not measured)
    memory_max_abs_error: float = math.nan


def speedups(results: list[CaseResult]) -> list[tuple[CaseResult, float, float]]:
    """(case, measured speedup, predicted speedup) against the case's own baseline case."""
    baselines = {r.case.model_key: r for r in results if r.case.is_baseline}
    out = []
    for r in results:
        base = baselines.get(r.case.model_key)
        if base is not None and not r.case.is_baseline:
            out.append((r, base.measured_s / r.measured_s, base.predicted_s / r.predicted_s))
    return out


def partition_groups(results: list[CaseResult]) -> list[list[CaseResult]]:
    """Cases that differ only in their partition (two or more partitions)."""
    groups: dict[tuple, list[CaseResult]] = {}
    for r in results:
        c = r.case
        groups.setdefault((c.model_key, c.stages, c.data_parallel, c.microbatches, c.schedule), []).append(r)
    return [g for g in groups.values() if len({r.prediction.plan.partition for r in g}) > 1]


def ranking_matches(group: list[CaseResult]) -> bool:
    by_measured = [r.case.partition for r in sorted(group, key=lambda r: r.measured_s)]
    by_predicted = [r.case.partition for r in sorted(group, key=lambda r: r.predicted_s)]
    return by_measured == by_predicted


def summarize(results: list[CaseResult]) -> Summary:
    from scipy.stats import spearmanr

    errors = [abs(r.error) for r in results]
    pairs = speedups(results)
    correlation = float(spearmanr([m for _, m, _ in pairs], [p for _, _, p in pairs]).statistic) \
        if len(pairs) > 2 else float("nan")
    floors = [r.repeat_difference for r in results]
    groups = partition_groups(results)
    saved = [abs(e) for r in results for _, _, e in r.saved_accounting_errors()]
    memory = [abs(e) for r in results for _, _, e in r.memory_errors()]
    return Summary(
        mape=statistics.mean(errors),
        max_abs_error=max(errors),
        speedup_rank_correlation=correlation,
        noise_floor_median=statistics.median(floors),
        noise_floor_max=max(floors),
        partition_rankings_match=sum(ranking_matches(g) for g in groups),
        partition_rankings_total=len(groups),
        saved_accounting_max_abs_error=max(saved),
        memory_mape=statistics.mean(memory) if memory else math.nan,
        memory_max_abs_error=max(memory) if memory else math.nan,
    )


# --- the verdict ------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """The largest MAPE that passes: ``floor + noise_multiple x`` the run's own
    median noise floor (the same case's round medians differ by that much), and
    never more than ``cap``. With ``noise_multiple = 0`` it is a fixed MAPE.

    Timings only compare within one run: a tolerance fixed in advance would be
    a timed test in disguise on a machine noisier than the one it was set on."""

    floor: float
    noise_multiple: float = 0.0
    cap: float = math.inf

    def limit(self, summary: Summary) -> float:
        return min(self.floor + self.noise_multiple * summary.noise_floor_median, self.cap)

    def describe(self, summary: Summary) -> str:
        if not self.noise_multiple:
            return f"{self.limit(summary):.1%}"
        text = (f"{self.limit(summary):.1%} = {self.floor:.1%} + {self.noise_multiple:g} x noise floor "
                f"{summary.noise_floor_median:.2%}")
        return text + (f", capped at {self.cap:.1%}" if math.isfinite(self.cap) else "")


@dataclass(frozen=True)
class Verdict:
    passed: bool
    text: str  # one line: PASS/FAIL, the MAPE, the tolerance and how it was made


def verdict(summary: Summary, tolerance: Tolerance) -> Verdict:
    passed = summary.mape <= tolerance.limit(summary)
    return Verdict(passed, f"{'PASS' if passed else 'FAIL'}: MAPE {summary.mape:.2%} "
                           f"{'<=' if passed else '>'} tolerance {tolerance.describe(summary)}")


def summary_line(results: list[CaseResult], summary: Summary) -> str:
    return (f"{len(results)} cases: MAPE {summary.mape:.2%}, max |error| {summary.max_abs_error:.2%}, "
            f"speedup rank correlation {summary.speedup_rank_correlation:.3f}, noise floor "
            f"{summary.noise_floor_median:.2%} (max {summary.noise_floor_max:.2%}), partition rankings "
            f"{summary.partition_rankings_match}/{summary.partition_rankings_total}, memory (step ledger vs "
            f"RSS high-water) mean |error| {summary.memory_mape:.2%}, max {summary.memory_max_abs_error:.2%}")


# --- the command ------------------------------------------------------------------


def validate_grid(grid_file: str, profile_source: str, out: str, command: str, log,
                  tolerance: tuple[float, float, float | None]) -> tuple[bool, list[str]]:
    """Measure and predict every case of a grid, write the report; (passed, the lines to print)."""
    from .profile import load_profile
    from .runner.launch import check_runner_available
    from .validation_report import write_report

    grid = load_grid(grid_file)
    profile = load_profile(profile_source)
    costs = ProfileCostModel(profile)
    for case in grid.cases:  # every case plans (partition, sizes) before anything launches
        plan_case(case, costs)
    check_runner_available("pipesim validate")
    log(f"validating {len(grid.cases)} cases x {grid.rounds} rounds of grid {grid.name!r} "
        f"against profile {profile.name!r}")
    results = run_validation(grid, profile, log)
    summary = summarize(results)
    floor, multiple, cap = tolerance
    judged = verdict(summary, Tolerance(floor, multiple, math.inf if cap is None else cap))
    path = write_report(grid, profile, results, summary, Path(out), command, judged.text)
    return judged.passed, [summary_line(results, summary), f"{judged.text}; report {path}"]
