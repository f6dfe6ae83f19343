"""One workflow per command: an ExecutionSpec in, a result object out.

The command line (cli.py) parses flags and files into specs, calls one of these
and hands the result to formats/ for printing. Each workflow first resolves the
spec (the command's defaults filled in) so that the result carries the spec that
reproduces it (`--save-config`, the `spec` field of `--json`).
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import limits as lim
from .checks import check_finite_time, warn_no_effect, warn_unused_what_ifs
from .errors import UserError
from .model import ModelSpec, fc, load_model
from .predict import Prediction, baseline_plan, predict
from .spec import ExecutionSpec, SpecError, profile_sha256

SWEEP_SCHEDULES = ("gpipe", "1f1b")
SWEEP_STAGES, SWEEP_MICROBATCHES = (1, 2, 4, 8, 16), (1, 2, 4, 8, 16, 32)
DEFAULT_STAGES, DEFAULT_MICROBATCHES, DEFAULT_BATCH = 4, 8, 512


def log(text: str) -> None:
    """Progress and notes go to stderr; results go to stdout."""
    print(text, file=sys.stderr)


# --- what every command builds from a spec -------------------------------------------


def model_of(spec: ExecutionSpec) -> ModelSpec:
    return load_model(spec.model_file) if spec.model_file else fc(spec.layers or 32, spec.width or 512)


def costs_of(spec: ExecutionSpec, model: ModelSpec, what_ifs: bool = True):
    """The profile and the cost model (with the spec's what-ifs unless `what_ifs` is off); a
    one-line error when the profile lacks a layer kind of `model`."""
    from .costs import ProfileCostModel, parse_link_override, parse_rank_speed
    from .profile import load_profile

    profile = load_profile(spec.profile).with_transport(spec.transport)
    ProfileCostModel(profile).check_kinds(model, spec.model_file)
    if not what_ifs:
        return profile, ProfileCostModel(profile, optimizer=spec.optimizer or "sgd")
    rank_speed = tuple(pair for text in spec.rank_speed for pair in parse_rank_speed(text))
    links = tuple(parse_link_override(text) for text in spec.links)
    return profile, ProfileCostModel(profile, optimizer=spec.optimizer or "sgd", rank_speed=rank_speed,
                                     link_overrides=links, ranks_per_node=spec.ranks_per_node,
                                     allreduce=spec.allreduce or "law")


def single(values: tuple | None, name: str, command: str):
    """The one value a command takes where the spec may hold a list."""
    if values is not None and len(values) > 1:
        raise SpecError(f"{command} takes one {name}, got {', '.join(map(str, values))}")
    return None if values is None else values[0]


def memory_cap_bytes(spec: ExecutionSpec) -> int | None:
    from .optimize import parse_bytes

    return None if spec.memory_cap is None else parse_bytes(spec.memory_cap)


def _common(spec: ExecutionSpec, model: ModelSpec) -> tuple[ExecutionSpec, int]:
    """The spec with the defaults every command shares and the profile's hash; and the batch size."""
    generated = spec.model_file is None
    batch = spec.batch_size or DEFAULT_BATCH
    return replace(spec, layers=model.num_layers if generated else None,
                   width=model.layers[0].out_features if generated else None, batch_size=batch,
                   optimizer=spec.optimizer or "sgd", profile_sha256=profile_sha256(spec.profile)), batch


def data_parallel_of(spec: ExecutionSpec) -> tuple[int, str]:
    """(D, placement) of the spec, the defaults filled in."""
    from .dataparallel import DEFAULT_PLACEMENT

    return spec.data_parallel, spec.placement or DEFAULT_PLACEMENT


def check_world(costs, num_stages: int, spec: ExecutionSpec) -> None:
    """What-ifs name global ranks 0..P x D - 1; P x D within the limits."""
    from .dataparallel import DataParallelError, Layout

    d, placement = data_parallel_of(spec)
    if num_stages * d > lim.MAX_STAGES:
        raise DataParallelError(f"--stages {num_stages} x --data-parallel {d} = {num_stages * d} ranks; "
                                f"at most {lim.MAX_STAGES}")
    costs.check_ranks(num_stages * d)
    if d == 1 and costs.allreduce != "law":
        warn_no_effect(f"--allreduce {costs.allreduce}: one replica has no all-reduce")
    layout = Layout(num_stages, d, placement, costs.ranks_per_node) if d > 1 else None
    warn_unused_what_ifs(costs.link_overrides, costs.ranks_per_node, num_stages * d, layout)


def _replica0(costs, num_stages: int, data_parallel: int, placement: str):
    """The cost model replica 0 sees (local ranks 0..P-1), for the balanced cut; the model
    itself when D = 1."""
    from .dataparallel import Layout, replica_costs

    if data_parallel == 1:
        return costs
    return replica_costs(costs, Layout(num_stages, data_parallel, placement, costs.ranks_per_node))


def explicit_stage_count(spec: ExecutionSpec) -> int | None:
    """The ranks an explicit partition of P x V pieces implies (V: chunks, or the schedule's own)."""
    from .builders import DEFAULT_CHUNKS

    partition = spec.partition or "balanced"
    if partition.strip() == "balanced":
        return None
    chunks = (spec.chunks or (None,))[0] or DEFAULT_CHUNKS.get((spec.schedule or ("1f1b",))[0], 1)
    return max(1, len(partition.split(",")) // chunks)


def schedule_of(spec: ExecutionSpec, command: str):
    """The schedule's name, or the Schedule its file holds (checked against the spec's shape)."""
    if not spec.schedule_file:
        return single(spec.schedule, "schedule", command) or "1f1b"
    from .plan import load_schedule_file

    schedule, notes = load_schedule_file(
        spec.schedule_file, single(spec.stages, "stage count", "--schedule-file (it fixes the schedule)"),
        single(spec.chunks, "chunk count", command),
        single(spec.microbatches, "micro-batch count", "--schedule-file (it fixes the schedule)"),
        f"--schedule-file {spec.schedule_file}")
    for note in notes:
        log(f"note: {spec.schedule_file}: {note}")
    return schedule


def _no_schedule_file(spec: ExecutionSpec, command: str) -> None:
    if spec.schedule_file is not None:
        raise SpecError(f"schedule_file {spec.schedule_file}: {command} builds its schedules by name; "
                        "predict and run read schedule files")


def _no_recompute(spec: ExecutionSpec, command: str) -> None:
    if spec.recompute.strip() != "none":
        raise SpecError(f"recompute {spec.recompute}: {command} does not search with recomputation; "
                        "optimize does (--recompute auto), predict and run take none, all or pieces")


def _no_search(spec: ExecutionSpec, command: str) -> None:
    if spec.memory_cap is not None:
        warn_no_effect(f"memory_cap {spec.memory_cap}: {command} does not search; optimize and sweep use it")


def _check_partition(spec: ExecutionSpec, counts: tuple[int, ...]) -> None:
    if spec.partition_counts is not None and spec.partition_counts != counts:
        warnings.warn(f"partition {spec.partition!r} now resolves to {','.join(map(str, counts))}, not the "
                      f"{','.join(map(str, spec.partition_counts))} the config recorded (a changed profile?)",
                      stacklevel=2)


# --- predict ------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictResult:
    spec: ExecutionSpec  # resolved: what reproduces every prediction
    predictions: tuple[Prediction, ...]
    measured_on: str  # where the profile was measured

    @property
    def single(self) -> bool:
        return len(self.predictions) == 1

    def spec_of(self, prediction: Prediction) -> ExecutionSpec:
        """The spec of one prediction of a list."""
        plan = prediction.plan
        return replace(self.spec, stages=(plan.num_stages,), microbatches=(plan.num_microbatches,),
                       partition_counts=plan.partition.counts)


def run_predict(spec: ExecutionSpec, single_only: bool = False) -> PredictResult:
    from .plan import make_plan

    _no_search(spec, "predict")
    schedule = schedule_of(spec, "predict")
    if not isinstance(schedule, str):
        spec = replace(spec, stages=(schedule.num_stages,), microbatches=(schedule.num_microbatches,))
    explicit = explicit_stage_count(spec)
    stage_list = spec.stages or (explicit or DEFAULT_STAGES,)
    microbatches = spec.microbatches or (DEFAULT_MICROBATCHES,)
    if explicit is not None and len(stage_list) > 1:
        raise SpecError("an explicit --partition fits one stage count; use 'balanced' with a --stages list")
    if single_only and len(stage_list) * len(microbatches) > 1:
        raise SpecError("--trace and --gantt need a single configuration")
    model = model_of(spec)
    profile, costs = costs_of(spec, model)
    for stages in stage_list:
        check_world(costs, stages, spec)
    dp, placement = data_parallel_of(spec)
    chunks = single(spec.chunks, "chunk count", "predict")
    for stages in stage_list:
        lim.check_size(model.num_layers, stages, max(microbatches), chunks or 1, spans=single_only)
    lim.check_work(sum(lim.work_s(model.num_layers, p, m) for p in stage_list for m in microbatches),
                   f"predicting {len(stage_list) * len(microbatches)} configuration(s)")
    spec, batch = _common(spec, model)
    predictions = []
    for stages in stage_list:
        for mbs in microbatches:
            plan = make_plan(model, stages, mbs, batch, schedule, spec.partition or "balanced",
                             _replica0(costs, stages, dp, placement), chunks, dp, placement, spec.recompute)
            costs.check_ranks(plan.world_size)
            prediction = predict(plan, costs, profile.name)
            check_finite_time(prediction.metrics.iteration_time_s, "the predicted iteration time")
            check_finite_time(prediction.baseline_time_s, "the one-rank baseline time")
            predictions.append(prediction)
    first = predictions[0].plan
    resolved = replace(spec, stages=tuple(stage_list), microbatches=tuple(microbatches),
                       schedule=None if spec.schedule_file else (first.schedule.name,),
                       chunks=(first.num_chunks,), partition=spec.partition or "balanced",
                       partition_counts=first.partition.counts if len(predictions) == 1 else None,
                       placement=placement if dp > 1 else spec.placement)
    if len(predictions) == 1:
        _check_partition(spec, first.partition.counts)
    return PredictResult(resolved, tuple(predictions), profile.measured_on)


# --- optimize -----------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizeResult:
    spec: ExecutionSpec
    optima: tuple[Any, ...]  # optimize.Optimum per (schedule, chunks) built, fastest first

    @property
    def best(self):
        return self.optima[0]


def run_optimize(spec: ExecutionSpec, max_simulations: int) -> OptimizeResult:
    """The optimum of every (schedule, chunks) of the spec's lists that can be built."""
    from .optimize import MAX_EXPANSIONS, Problem
    from .recomputation import optimize_recompute, options
    from .schedule import ScheduleError

    _no_schedule_file(spec, "optimize")
    stages = single(spec.stages, "stage count", "optimize") or DEFAULT_STAGES
    if stages > lim.MAX_OPTIMIZE_STAGES:
        raise SpecError(f"optimize takes at most {lim.MAX_OPTIMIZE_STAGES} stages, got {stages}")
    microbatches = single(spec.microbatches, "micro-batch count", "optimize") or DEFAULT_MICROBATCHES
    if spec.partition not in (None, "balanced"):
        warn_no_effect(f"partition {spec.partition}: optimize searches every partition")
    model = model_of(spec)
    profile, costs = costs_of(spec, model)
    check_world(costs, stages, spec)
    dp, placement = data_parallel_of(spec)
    combos = [(name, chunks) for name in spec.schedule or ("1f1b",) for chunks in spec.chunks or (None,)]
    for _, chunks in combos:
        lim.check_size(model.num_layers, stages, microbatches, chunks or 1)
    searches = sum(len(options(stages * (chunks or 1))) if spec.recompute.strip() == "auto" else 1
                   for _, chunks in combos)
    lim.check_work(searches * lim.optimize_work_s(model.num_layers, stages, microbatches,
                                                  max_simulations, MAX_EXPANSIONS),
                   "optimize's search (at most --max-simulations runs per schedule, chunk count and "
                   "recomputation option)")
    spec, batch = _common(spec, model)
    spec = replace(spec, stages=(stages,), microbatches=(microbatches,), schedule=spec.schedule or ("1f1b",))
    optima, skipped = [], []
    for name, chunks in combos:
        try:
            problem = Problem(model, name, stages, microbatches, batch, costs,
                              memory_cap_bytes(spec), profile.name, chunks, dp, placement)
        except ScheduleError as exc:
            if len(combos) == 1:
                raise
            skipped.append(f"{name} with --chunks {chunks}: {exc}")
            continue
        optimum = optimize_recompute(problem, spec.recompute, max_simulations)
        check_finite_time(optimum.best.metrics.iteration_time_s, "the predicted iteration time")
        check_finite_time(optimum.best.baseline_time_s, "the one-rank baseline time")
        optima.append(optimum)
    for line in skipped:
        log(f"note: skipped {line}")
    if not optima:
        raise UserError("no schedule and chunk count of the lists can be built (see the notes above)")
    optima.sort(key=lambda o: o.best.metrics.iteration_time_s)
    return OptimizeResult(spec, tuple(optima))


def run_shapes(spec: ExecutionSpec, ranks: int, max_simulations: int):
    """optimize --ranks N: the best (stages, replicas, micro-batches, schedule, chunks, partition)."""
    from .shapes import search_shapes, shapes_for

    _no_schedule_file(spec, "optimize --ranks")
    for name, value in (("stages", spec.stages), ("microbatches", spec.microbatches)):
        if value is not None:
            warn_no_effect(f"{name} {','.join(map(str, value))}: optimize --ranks searches every {name[:-1]} count")
    if spec.data_parallel != 1:
        warn_no_effect(f"data_parallel {spec.data_parallel}: optimize --ranks searches every replica count")
    if spec.partition not in (None, "balanced"):
        warn_no_effect(f"partition {spec.partition}: optimize searches every partition")
    if spec.recompute.strip() != "none":
        warn_no_effect(f"recompute {spec.recompute}: optimize --ranks searches shapes without recomputation")
    model = model_of(spec)
    profile, costs = costs_of(spec, model)
    costs.check_ranks(ranks)
    spec, batch = _common(spec, model)
    schedules, chunks = spec.schedule or ("1f1b",), spec.chunks or (None,)
    shapes, _ = shapes_for(ranks, batch, model.num_layers, schedules, chunks)
    lim.check_work(sum(lim.work_s(model.num_layers, s.num_stages, s.num_microbatches)
                       for s in shapes) + 3 * lim.optimize_work_s(model.num_layers, ranks, max(
                           (s.num_microbatches for s in shapes), default=1), min(max_simulations, 40), 2_000),
                   f"optimize --ranks {ranks}: {len(shapes)} shapes")
    search = search_shapes(model, costs, profile.name, ranks, batch, schedules, chunks, memory_cap_bytes(spec),
                           data_parallel_of(spec)[1], max_simulations=min(max_simulations, 40))
    best = search.best
    if best.prediction is None:
        raise UserError(f"no shape of {ranks} ranks could be predicted, e.g. {best.shape.describe()}: {best.skipped}")
    s = best.shape
    return replace(spec, stages=(s.num_stages,), microbatches=(s.num_microbatches,), schedule=(s.schedule,),
                   chunks=(best.prediction.plan.num_chunks,), data_parallel=s.data_parallel,
                   partition=",".join(map(str, best.prediction.plan.partition.counts))), search


# --- sweep --------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    spec: ExecutionSpec
    sweep: Any  # sweep.Sweep


def run_sweep(spec: ExecutionSpec, jobs: int | None, progress: bool = True) -> SweepResult:
    """The one sweep: every (schedule, stages, micro-batches) of the spec's lists."""
    from .sweep import PARTITION_MODES, ProgressBar, grid, sweep_work_s
    from .sweep import run_sweep as sweep_points

    _no_schedule_file(spec, "sweep")
    _no_recompute(spec, "sweep")
    partition = spec.partition or "balanced"
    if partition not in PARTITION_MODES:
        raise SpecError(f"sweep partition must be one of {', '.join(PARTITION_MODES)}, got {partition!r}")
    if spec.chunks is not None:
        warn_no_effect("chunks: sweep uses each schedule's own chunk count")
    stages, microbatches = spec.stages or SWEEP_STAGES, spec.microbatches or SWEEP_MICROBATCHES
    schedules = spec.schedule or SWEEP_SCHEDULES
    spec = replace(spec, stages=stages, microbatches=microbatches, schedule=schedules, partition=partition,
                   chunks=None)
    model = model_of(spec)
    _, costs = costs_of(spec, model)
    check_world(costs, max(stages), spec)
    points = grid(stages, microbatches, schedules, *data_parallel_of(spec))
    jobs = min(jobs or os.cpu_count() or 1, len(points))
    lim.check_work(sweep_work_s(model.num_layers, points, partition) / jobs,
                   f"the sweep of {len(points)} points on {jobs} processes")
    spec, batch = _common(spec, model)
    bar = ProgressBar(len(points)) if progress else None
    sweep = sweep_points(model, costs, points, batch, partition, memory_cap_bytes(spec), jobs, bar)
    if not any(result.ok for result in sweep.results):
        first = sweep.results[0]
        raise UserError(f"every point of the sweep was skipped, e.g. {first.point.num_stages} stages x "
                        f"{first.point.num_microbatches} micro-batches: {first.skipped}")
    check_finite_time(sweep.baseline_time_s, "the one-rank baseline time")
    return SweepResult(spec, sweep)


# --- run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunResult:
    spec: ExecutionSpec
    measured: Any  # runner.results.Measurement, None on a rank other than 0
    baseline: Any  # the single-rank Measurement with --baseline, else None


def run_real(spec: ExecutionSpec, options: dict, baseline: bool) -> RunResult:
    from .plan import make_plan
    from .runner.launch import check_runner_available, inside_mpi_world
    from .runner.results import measure

    if spec.rank_speed or spec.links or spec.ranks_per_node is not None:
        warn_no_effect("what-ifs (rank speeds, links, ranks per node): run measures the real machine")
    if spec.allreduce not in (None, "law"):
        warn_no_effect(f"allreduce {spec.allreduce}: run measures the real all-reduces")
    _no_search(spec, "run")
    model = model_of(spec)
    _, costs = costs_of(spec, model, what_ifs=False)
    schedule = schedule_of(spec, "run")
    if isinstance(schedule, str):
        stages = single(spec.stages, "stage count", "run") or explicit_stage_count(spec) or DEFAULT_STAGES
        microbatches = single(spec.microbatches, "micro-batch count", "run") or DEFAULT_MICROBATCHES
    else:
        stages, microbatches = schedule.num_stages, schedule.num_microbatches
    spec, batch = _common(spec, model)
    spec = replace(spec, rank_speed=(), links=(), ranks_per_node=None)
    dp, placement = data_parallel_of(spec)
    check_world(costs, stages, spec)
    plan = make_plan(model, stages, microbatches, batch, schedule, spec.partition or "balanced",
                     _replica0(costs, stages, dp, placement), single(spec.chunks, "chunk count", "run"),
                     dp, placement, spec.recompute)
    spec = replace(spec, stages=(stages,), microbatches=(microbatches,), chunks=(plan.num_chunks,),
                   schedule=None if spec.schedule_file else (plan.schedule.name,),
                   partition=spec.partition or "balanced", partition_counts=plan.partition.counts)
    options = {**options, "optimizer": spec.optimizer}
    check_runner_available("pipesim run")
    measured_baseline = None
    if baseline and not inside_mpi_world():
        log(f"baseline: 1 rank, whole model, batch {plan.batch_size}")
        measured_baseline = measure(baseline_plan(model, plan.batch_size), log, **options)
    replicas = f" x {dp} replicas ({placement}) = {plan.world_size} ranks" if dp > 1 else ""
    log(f"pipeline: {plan.schedule.name}, {plan.num_stages} ranks{replicas}, partition {plan.partition}, "
        f"{plan.num_microbatches} micro-batches x {plan.microbatch_size}")
    return RunResult(spec, measure(plan, log, **options), measured_baseline)


# --- schedule -----------------------------------------------------------------------


def run_schedule(spec: ExecutionSpec, text_format: str, lowered: bool) -> tuple[ExecutionSpec, str]:
    """The schedule's text (pipesim's form, lowered or not, or torch's CSV) and its resolved spec."""
    from .lowering import lower
    from .schedule import build_schedule
    from .torchcsv import render

    _no_schedule_file(spec, "schedule")
    stages = single(spec.stages, "stage count", "schedule") or DEFAULT_STAGES
    microbatches = single(spec.microbatches, "micro-batch count", "schedule") or DEFAULT_MICROBATCHES
    chunks = single(spec.chunks, "chunk count", "schedule")
    lim.check_size(0, stages, microbatches, chunks or 1)
    schedule = build_schedule(single(spec.schedule, "schedule", "schedule") or "1f1b", stages, microbatches, chunks)
    text = lower(schedule, allreduce=spec.data_parallel > 1).to_text() + "\n" if lowered else render(schedule, text_format)
    return replace(spec, stages=(stages,), microbatches=(microbatches,), chunks=(schedule.num_chunks,),
                   schedule=(schedule.name,)), text



# --- report, calibrate, validate ------------------------------------------------------


def run_report(spec: ExecutionSpec, sweep_spec: ExecutionSpec, max_simulations: int, jobs: int | None,
               out: Path, command: str) -> Path:
    """optimize + sweep, their figures and one markdown page in `out`; returns the page."""
    from . import report
    from .formats.markdown import report_markdown

    optimum = run_optimize(spec, max_simulations).best
    sweep = run_sweep(sweep_spec, jobs).sweep
    out.mkdir(parents=True, exist_ok=True)
    figures = {**report.optimize_figures(optimum, out), **report.sweep_figures(sweep, out)}
    for name in figures.values():
        log(f"wrote {out / name}")
    page = out / f"report-{optimum.problem.model.name}.md"
    page.write_text(report_markdown(optimum, sweep, figures, command))
    return page


def run_calibrate(out: Path, command: str, model_files: list[str], width: int | None, widths, ranks: int,
                  microbatch_sizes, repeats, stack_mib, threads_per_rank: int, optimizer: str,
                  name: str | None, transport: str = "mpi") -> dict | None:
    """Measure the costs on this machine and write the profile to `out`; returns the profile
    (None on a rank other than 0 inside an existing MPI world, which writes nothing). fc widths:
    --widths or --width; else the fc-only models'; else none when models of other kinds are given
    (their fc layers are measured by shape); else the defaults."""
    import json

    from .calibrate import DEFAULT_WIDTHS, CalibrationSettings, calibrate, calibration_models
    from .runner.launch import check_runner_available

    model_widths, jobs = calibration_models(model_files, log)
    given_widths = tuple(widths or ()) or ((width,) if width is not None else ())
    widths = given_widths or model_widths or (() if jobs else DEFAULT_WIDTHS)
    given = {"microbatch_sizes": microbatch_sizes and tuple(microbatch_sizes), "repeats": repeats,
             "stack_bytes": stack_mib and stack_mib << 20}
    settings = CalibrationSettings(ranks=ranks, widths=widths, threads_per_rank=threads_per_rank,
                                   optimizer=optimizer, transport=transport, extra_metadata={"command": command},
                                   kind_jobs=jobs, **{key: value for key, value in given.items() if value},
                                   **({"kind_repeats": repeats} if repeats else {}))
    check_runner_available("pipesim calibrate")
    if widths:
        log(f"calibrating on {settings.ranks} ranks: fc widths {list(widths)}, micro-batch sizes "
            f"{list(settings.microbatch_sizes)}")
    profile = calibrate(settings, name or out.stem, log)
    if profile is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    return profile
