"""The command line: the only module that touches argparse.

Each sub-command maps to one function that composes the library's workflows.
Exit codes: 0 success; 1 a real run or a validation that failed; 2 anything the
user got wrong (one line, ``pipesim: error: ...``); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from . import __version__
from . import limits as lim
from .checks import (
    check_finite_time,
    figure_file,
    finite_json,
    output_file,
    output_folder,
    warn_no_effect,
    warn_unused_what_ifs,
)
from .costs import ProfileCostModel, parse_link_override, parse_rank_speed
from .errors import UserError
from .model import ModelSpec, fc, load_model
from .predict import Prediction, predict, prediction_json
from .profile import load_profile
from .runner.launch import RunFailed
from .schedule import SCHEDULES, ScheduleError
from .show import print_measurement, print_prediction, print_profile, print_sweep
from .timeline import to_chrome_trace

SWEEP_SCHEDULES = ("gpipe", "1f1b")


class UsageError(UserError):
    """Bad command-line input found after argparse."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other user error."""

    def error(self, message: str):
        self.exit(2, f"pipesim: error: {message} (see '{self.prog} --help')\n")


def log(text: str) -> None:
    """Progress and notes go to stderr; results go to stdout."""
    print(text, file=sys.stderr)


def int_in(low: int, high: int):
    """An argparse type: one integer in low..high (the limits and their reasons: limits.py)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    return parse


def ints_in(low: int, high: int):
    """An argparse type: integers like 4 or 1,2,4,8, each in low..high."""
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like 4 or 1,2,4,8, got {text!r}") from None
        if any(not low <= v <= high for v in values):
            raise argparse.ArgumentTypeError(f"values must be in {low}..{high}, got {text!r}")
        return values
    return parse


def float_in(low: float, high: float, low_open: bool = True):
    """An argparse type: a finite number in (low, high] ([low, high] unless `low_open`)."""
    def parse(text: str) -> float:
        try:
            return lim.check_number("the value", float(text), low, high, low_open=low_open)
        except (ValueError, UserError):
            raise argparse.ArgumentTypeError(f"must be a finite number in {'(' if low_open else '['}"
                                             f"{low:g}, {high:g}], got {text!r}") from None
    return parse


int_list = ints_in(1, lim.MAX_BATCH_SIZE)
STAGES, STAGE_LIST = int_in(1, lim.MAX_STAGES), ints_in(1, lim.MAX_STAGES)
MICROBATCHES, MICROBATCH_LIST = int_in(1, lim.MAX_BATCH_SIZE), ints_in(1, lim.MAX_BATCH_SIZE)
LAYERS, WIDTH, BATCH = int_in(1, lim.MAX_LAYERS), int_in(1, lim.MAX_WIDTH), int_in(1, lim.MAX_BATCH_SIZE)


# --- shared options -----------------------------------------------------------


def add_plan_options(parser: argparse.ArgumentParser, lists: bool = False, what_ifs: bool = False) -> None:
    """Options that describe a pipeline; shared by predict and run (what-ifs: predict only)."""
    g = parser.add_argument_group("model and pipeline")
    g.add_argument("--layers", type=LAYERS, default=None, help="number of fc layers (default: 32)")
    g.add_argument("--width", type=WIDTH, default=None, help="fc layer width (default: 512)")
    g.add_argument("--model", metavar="FILE", help="model spec TOML (models/*.toml); overrides --layers/--width")
    stages_help = "pipeline stages, one rank each" + (" (a list like 1,2,4,8 predicts each)" if lists else "")
    g.add_argument("--stages", type=STAGE_LIST if lists else STAGES, default=None,
                   help=stages_help + " (default: 4, or the partition's stage count)")
    g.add_argument("--microbatches", type=MICROBATCH_LIST if lists else MICROBATCHES, default=None,
                   help="micro-batches per mini-batch" + (" (list allowed)" if lists else "")
                        + " (default: 8, or the --schedule-file's)")
    g.add_argument("--batch-size", type=BATCH, default=512, help="samples per mini-batch (default: 512)")
    g.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default: 1f1b)")
    add_chunk_options(g)
    g.add_argument("--partition", default="balanced",
                   help="layers per piece (P x V pieces): counts '8,8,8,8', ranges '0-9,10-31', or 'balanced' "
                        "(default: the cut minimising the slowest piece)")
    g.add_argument("--profile", default="default",
                   help="cost profile JSON (default: the measured profile shipped with pipesim)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                   help="optimizer: SGD with momentum or Adam (default: sgd)")
    if what_ifs:
        add_what_if_options(parser)


def add_chunk_options(g) -> None:
    g.add_argument("--chunks", type=int_in(1, lim.MAX_STAGES), default=None, metavar="V",
                   help="model chunks per rank: the model is cut into stages x chunks pieces (default: 1; "
                        "2 for interleaved-1f1b, zb-v and dualpipev)")
    g.add_argument("--schedule-file", metavar="FILE", default=None,
                   help="a schedule to use instead of --schedule: pipesim's text form (`pipesim schedule`) "
                        "or torch's compute-only CSV")


def schedule_from_args(args, stages: int | None, microbatches: int | None):
    """The --schedule name, or the Schedule read from --schedule-file (validated,
    checked against --stages, --chunks and --microbatches when given)."""
    if not getattr(args, "schedule_file", None):
        return args.schedule
    from .plan import load_schedule_file

    schedule, notes = load_schedule_file(args.schedule_file, stages, args.chunks, microbatches,
                                         f"--schedule-file {args.schedule_file}")
    for note in notes:
        log(f"note: {args.schedule_file}: {note}")
    return schedule


def add_what_if_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what-ifs for heterogeneous clusters")
    g.add_argument("--ranks-per-node", type=int_in(1, lim.MAX_RANKS_PER_NODE), default=None, metavar="N",
                   help="rank r sits on node r // N: links between nodes use the profile's inter_node "
                        "costs (default: all ranks on one node)")
    g.add_argument("--rank-speed", action="append", default=[], metavar="RANK:FACTOR",
                   help="rank RANK computes FACTOR times as fast, e.g. 3:0.5 (half speed); repeat or "
                        "comma-separate for several ranks")
    g.add_argument("--link", action="append", default=[], metavar="A-B:VALUE[,VALUE]",
                   help="the link between ranks A and B (both directions): bandwidth like 1-2:1.25e9Bps, "
                        "latency like 1-2:5e-6s, or both 1-2:1.25e9Bps,5e-6s; repeatable")


def costs_from_args(args):
    """The profile and the cost model, with the what-if options applied."""
    profile = load_profile(args.profile)
    rank_speed = tuple(pair for text in getattr(args, "rank_speed", []) for pair in parse_rank_speed(text))
    links = tuple(parse_link_override(text) for text in getattr(args, "link", []))
    return profile, ProfileCostModel(profile, optimizer=args.optimizer, rank_speed=rank_speed,
                                     link_overrides=links,
                                     ranks_per_node=getattr(args, "ranks_per_node", None))


def model_from_args(args) -> ModelSpec:
    if not args.model:
        return fc(args.layers or 32, args.width or 512)
    for option in ("layers", "width"):
        if getattr(args, option, None) is not None:
            warn_no_effect(f"--{option} is ignored: --model {args.model} gives the layers")
    return load_model(args.model)


def _explicit_stage_count(partition: str, chunks: int | None = None, schedule: str = "1f1b") -> int | None:
    """The ranks an explicit partition of P x V pieces implies (V: --chunks, or the schedule's own)."""
    from .builders import DEFAULT_CHUNKS

    chunks = chunks or DEFAULT_CHUNKS.get(schedule, 1)
    return None if partition.strip() == "balanced" else max(1, len(partition.split(",")) // chunks)


# --- predict ------------------------------------------------------------------


def _predict_one(args, model, stages, microbatches, schedule, costs, profile_name) -> Prediction:
    from .plan import make_plan

    plan = make_plan(model, stages, microbatches, args.batch_size, schedule, args.partition, costs, args.chunks)
    costs.check_ranks(plan.num_stages)
    return predict(plan, costs, profile_name)


def _single(values: list[int] | None, flag: str) -> int | None:
    if values and len(values) > 1:
        raise UsageError(f"--schedule-file fixes the schedule: give one {flag}, not a list")
    return values[0] if values else None


def cmd_predict(args) -> int:
    schedule = args.schedule
    if args.schedule_file:
        schedule = schedule_from_args(args, _single(args.stages, "--stages"),
                                      _single(args.microbatches, "--microbatches"))
        args.stages, args.microbatches = [schedule.num_stages], [schedule.num_microbatches]
    args.microbatches = args.microbatches or [8]
    explicit = _explicit_stage_count(args.partition, args.chunks, args.schedule)
    stage_list = args.stages or [explicit or 4]
    if explicit is not None and len(stage_list) > 1:
        raise UsageError("an explicit --partition fits one stage count; use 'balanced' with a --stages list")
    single = len(stage_list) * len(args.microbatches) == 1
    if (args.trace or args.gantt) and not single:
        raise UsageError("--trace and --gantt need a single configuration")
    trace = output_file(args.trace, "--trace") if args.trace else None
    gantt = figure_file(args.gantt, "--gantt") if args.gantt else None
    model = model_from_args(args)
    profile, costs = costs_from_args(args)
    costs.check_ranks(max(stage_list))
    warn_unused_what_ifs(costs.link_overrides, costs.ranks_per_node, max(stage_list))
    for stages in stage_list:
        lim.check_size(model.num_layers, stages, max(args.microbatches), args.chunks or 1, spans=bool(trace or gantt))
    lim.check_work(sum(lim.work_s(model.num_layers, p, m) for p in stage_list for m in args.microbatches),
                   f"predicting {len(stage_list) * len(args.microbatches)} configuration(s)")
    predictions = [
        _predict_one(args, model, stages, mbs, schedule, costs, profile.name)
        for stages in stage_list for mbs in args.microbatches
    ]
    for prediction in predictions:
        check_finite(prediction)
    if trace or gantt:
        write_outputs(predictions[0], trace, gantt)
    if args.json:
        data = [{**prediction_json(p), "profile_measured_on": profile.measured_on} for p in predictions]
        print(finite_json(data[0] if single else data))
    elif single:
        print_prediction(predictions[0], profile.measured_on)
    else:
        print_sweep(predictions, profile.measured_on)
    return 0


def check_finite(prediction: Prediction) -> None:
    check_finite_time(prediction.metrics.iteration_time_s, "the predicted iteration time")
    check_finite_time(prediction.baseline_time_s, "the one-rank baseline time")


def write_outputs(prediction: Prediction, trace: Path | None, gantt: Path | None) -> None:
    if trace:
        trace.write_text(json.dumps(to_chrome_trace(prediction.timeline)))
        print(f"wrote {trace} (Chrome trace; open in https://ui.perfetto.dev)", file=sys.stderr)
    if gantt:
        from .report import gantt_png

        gantt_png(prediction.timeline, str(gantt), title=f"{prediction.plan.schedule.name}, "
                  f"{prediction.plan.num_stages} stages, {prediction.plan.num_microbatches} micro-batches "
                  f"(simulated, profile {prediction.profile})")
        print(f"wrote {gantt}", file=sys.stderr)


# --- optimize, sweep, report --------------------------------------------------


def schedule_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SCHEDULES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown schedule {unknown[0]!r} (allowed: {', '.join(SCHEDULES)})")
    return names


def add_search_options(parser: argparse.ArgumentParser, grid: bool) -> None:
    """Model, pipeline, costs and cap for optimize (one configuration) and sweep (`grid`: lists)."""
    g = parser.add_argument_group("model and pipeline")
    g.add_argument("--layers", type=LAYERS, default=None, help="number of fc layers (default: 32)")
    g.add_argument("--width", type=WIDTH, default=None, help="fc layer width (default: 512)")
    g.add_argument("--model", metavar="FILE", help="model spec TOML (models/*.toml); overrides --layers/--width")
    if grid:
        g.add_argument("--stages", type=STAGE_LIST, default=[1, 2, 4, 8, 16],
                       help="stage counts (default: 1,2,4,8,16)")
        g.add_argument("--microbatches", type=MICROBATCH_LIST, default=[1, 2, 4, 8, 16, 32],
                       help="micro-batch counts (default: 1,2,4,8,16,32)")
        g.add_argument("--schedule", type=schedule_list, default=list(SWEEP_SCHEDULES),
                       help="schedules (default: gpipe,1f1b)")
        g.add_argument("--partition", choices=("balanced", "even", "optimized"), default="balanced",
                       help="per point: the cut minimising the slowest stage, equal layer counts, or "
                            "`optimize`'s search (slower) (default: balanced)")
    else:
        g.add_argument("--stages", type=int_in(1, lim.MAX_OPTIMIZE_STAGES), default=4,
                       help="pipeline stages, one rank each (default: 4)")
        g.add_argument("--microbatches", type=MICROBATCHES, default=8, help="micro-batches (default: 8)")
        g.add_argument("--schedule", type=schedule_list, default=["1f1b"],
                       help="schedule, or a list like 1f1b,zb-h1,zb-v searched over too (default: 1f1b)")
        g.add_argument("--chunks", type=ints_in(1, lim.MAX_STAGES), default=None, metavar="V[,V]",
                       help="chunks per rank, or a list searched over (default: each schedule's own)")
    g.add_argument("--batch-size", type=BATCH, default=512, help="samples per mini-batch (default: 512)")
    g.add_argument("--profile", default="default", help="cost profile JSON (default: the shipped one)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimizer (default: sgd)")
    g.add_argument("--memory-cap", metavar="BYTES", default=None,
                   help="largest peak memory any rank may use, like 2GiB, 512MiB or 1.5e9 (default: none)")
    add_what_if_options(parser)


def _memory_cap(args) -> int | None:
    from .optimize import parse_bytes

    return None if args.memory_cap is None else parse_bytes(args.memory_cap)


def _optima(args) -> list:
    """The optimum of every (schedule, chunks) of the lists that can be built, fastest first."""
    from .optimize import MAX_EXPANSIONS, Problem, optimize

    model = model_from_args(args)
    profile, costs = costs_from_args(args)
    costs.check_ranks(args.stages)
    warn_unused_what_ifs(costs.link_overrides, costs.ranks_per_node, args.stages)
    combos = [(name, chunks) for name in args.schedule for chunks in (args.chunks or [None])]
    for _, chunks in combos:
        lim.check_size(model.num_layers, args.stages, args.microbatches, chunks or 1)
    lim.check_work(len(combos) * lim.optimize_work_s(model.num_layers, args.stages, args.microbatches,
                                                     args.max_simulations, MAX_EXPANSIONS),
                   "optimize's search (at most --max-simulations runs per schedule and chunk count)")
    optima, skipped = [], []
    for name, chunks in combos:
        try:
            problem = Problem(model, name, args.stages, args.microbatches, args.batch_size, costs,
                              _memory_cap(args), profile.name, chunks)
        except ScheduleError as exc:
            if len(combos) == 1:
                raise
            skipped.append(f"{name} with --chunks {chunks}: {exc}")
            continue
        optimum = optimize(problem, max_simulations=args.max_simulations)
        check_finite(optimum.best)
        optima.append(optimum)
    for line in skipped:
        log(f"note: skipped {line}")
    if not optima:
        raise UsageError("no schedule and chunk count of the lists can be built (see the notes above)")
    return sorted(optima, key=lambda o: o.best.metrics.iteration_time_s)


def _optimum(args):
    return _optima(args)[0]


def _sweep(args, progress: bool = True):
    from .sweep import ProgressBar, grid, run_sweep, sweep_work_s

    model = model_from_args(args)
    _, costs = costs_from_args(args)
    costs.check_ranks(max(args.stages))
    warn_unused_what_ifs(costs.link_overrides, costs.ranks_per_node, max(args.stages))
    points = grid(args.stages, args.microbatches, args.schedule)
    jobs = min(args.jobs or os.cpu_count() or 1, len(points))
    lim.check_work(sweep_work_s(model.num_layers, points, args.partition) / jobs,
                   f"the sweep of {len(points)} points on {jobs} processes")
    bar = ProgressBar(len(points)) if progress else None
    sweep = run_sweep(model, costs, points, args.batch_size, args.partition, _memory_cap(args), args.jobs, bar)
    if not any(result.ok for result in sweep.results):
        raise UsageError(f"every point of the sweep was skipped, e.g. {sweep.results[0].point.num_stages} "
                         f"stages x {sweep.results[0].point.num_microbatches} micro-batches: "
                         f"{sweep.results[0].skipped}")
    check_finite_time(sweep.baseline_time_s, "the one-rank baseline time")
    return sweep


def _log_figures(out: Path, figures: dict[str, str]) -> None:
    for name in figures.values():
        log(f"wrote {out / name}")


def _plots(args, draw) -> None:
    """With --plots DIR, draw(DIR) writes the figures there."""
    if args.plots:
        out = output_folder(args.plots, "--plots")
        out.mkdir(parents=True, exist_ok=True)
        _log_figures(out, draw(out))


def cmd_optimize(args) -> int:
    from . import report
    from .optimize import optimum_json, searched_json, searched_text

    if args.plots:
        output_folder(args.plots, "--plots")
    optima = _optima(args)
    optimum = optima[0]
    _plots(args, lambda out: report.optimize_figures(optimum, out))
    if args.json:
        data = optimum_json(optimum)
        print(finite_json(data if len(optima) == 1 else {**data, "searched": searched_json(optima)}))
    else:
        print((searched_text(optima) + "\n\n" if len(optima) > 1 else "") + report.optimum_text(optimum))
    return 0


def cmd_sweep(args) -> int:
    from . import report
    from .sweep import sweep_json

    if args.plots:
        output_folder(args.plots, "--plots")
    sweep = _sweep(args, progress=not args.quiet)
    _plots(args, lambda out: report.sweep_figures(sweep, out))
    print(finite_json(sweep_json(sweep)) if args.json else report.sweep_text(sweep))
    return 0


def cmd_report(args) -> int:
    from . import report

    output_folder(args.out, "--out")
    optimum = _optimum(args)
    grid_args = argparse.Namespace(**{**vars(args), "stages": args.sweep_stages, "schedule": args.sweep_schedules,
                                      "microbatches": args.sweep_microbatches, "partition": "balanced"})
    sweep = _sweep(grid_args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures = {**report.optimize_figures(optimum, out), **report.sweep_figures(sweep, out)}
    _log_figures(out, figures)
    command = "pipesim " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    page = out / f"report-{optimum.problem.model.name}.md"
    page.write_text(report.report_markdown(optimum, sweep, figures, command))
    print(f"wrote {page}")
    return 0


def add_optimize_parsers(sub) -> None:
    o = sub.add_parser("optimize", help="the partition with the smallest predicted time under a memory cap",
                       description="Search every contiguous partition (branch and bound on cost-model "
                                   "bounds, candidates confirmed by the simulator) for the smallest "
                                   "predicted iteration time whose every rank fits --memory-cap, and "
                                   "compare it with the even split by layer count.")
    add_search_options(o, grid=False)
    o.add_argument("--max-simulations", type=int_in(1, lim.MAX_SIMULATIONS), default=200,
                   help="simulate at most this many candidates (default: 200)")
    out = o.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--plots", metavar="DIR", help="write optimize-*.png (Gantt, memory per rank) into DIR")
    o.set_defaults(func=cmd_optimize)

    s = sub.add_parser("sweep", help="predict a grid of stages x micro-batches x schedules",
                       description="Predict every configuration of the grid in parallel processes; print "
                                   "speedup and peak memory, and recommend the fastest that fits --memory-cap.")
    add_search_options(s, grid=True)
    s.add_argument("--jobs", type=int_in(1, lim.MAX_JOBS), default=None, help="processes (default: one per core)")
    out = s.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--plots", metavar="DIR", help="write sweep-*.png (speedup curves, heatmap) into DIR")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="optimize + sweep, figures and one markdown page (default: in reports/)",
                       description="Optimize one configuration and sweep a grid, then write the Gantt "
                                   "charts, memory bars, speedup curves, heatmap and a markdown page.")
    add_search_options(r, grid=False)
    r.add_argument("--max-simulations", type=int_in(1, lim.MAX_SIMULATIONS), default=200,
                   help="as in optimize (default: 200)")
    r.add_argument("--sweep-stages", type=STAGE_LIST, default=[1, 2, 4, 8, 16], help="(default: 1,2,4,8,16)")
    r.add_argument("--sweep-microbatches", type=MICROBATCH_LIST, default=[1, 2, 4, 8, 16, 32],
                   help="(default: 1,2,4,8,16,32)")
    r.add_argument("--sweep-schedules", type=schedule_list, default=list(SWEEP_SCHEDULES),
                   help="(default: gpipe,1f1b)")
    r.add_argument("--jobs", type=int_in(1, lim.MAX_JOBS), default=None,
                   help="sweep processes (default: one per core)")
    r.add_argument("--out", default="reports",
                   help="where the page and figures go (default: reports/, which is tracked by git: "
                        "running this there changes the committed reports)")
    r.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    r.set_defaults(func=cmd_report)


# --- run ----------------------------------------------------------------------


def cmd_run(args) -> int:
    from .plan import make_plan
    from .runner.launch import (
        check_runner_available,
        inside_mpi_world,
    )
    from .runner.results import measure, measurement_json

    trace = output_file(args.trace, "--trace") if args.trace else None  # all checked before launching
    gantt = figure_file(args.gantt, "--gantt") if args.gantt else None
    model = model_from_args(args)
    costs = ProfileCostModel(load_profile(args.profile), optimizer=args.optimizer)
    schedule = schedule_from_args(args, args.stages, args.microbatches)
    if isinstance(schedule, str):
        stages = args.stages or _explicit_stage_count(args.partition, args.chunks, args.schedule) or 4
        microbatches = args.microbatches or 8
    else:
        stages, microbatches = schedule.num_stages, schedule.num_microbatches
    plan = make_plan(model, stages, microbatches, args.batch_size, schedule, args.partition, costs, args.chunks)
    options = dict(iterations=args.iterations, warmup=args.warmup, threads_per_rank=args.threads_per_rank,
                   optimizer=args.optimizer, seed=args.seed, device=args.device)
    check_runner_available("pipesim run")
    baseline = None
    if args.baseline and not inside_mpi_world():
        log(f"baseline: 1 rank, whole model, batch {plan.batch_size}")
        single = make_plan(model, 1, 1, plan.batch_size, "gpipe", str(model.num_layers))
        baseline = measure(single, log, **options)
    log(f"pipeline: {plan.schedule.name}, {plan.num_stages} ranks, partition {plan.partition}, "
        f"{plan.num_microbatches} micro-batches x {plan.microbatch_size}")
    measured = measure(plan, log, **options)
    if measured is None:  # a rank other than 0 inside an existing MPI world
        return 0
    extra = {}
    if baseline is not None:
        extra = {"baseline_time_s": baseline.median_s, "speedup": baseline.median_s / measured.median_s}
    if trace:
        trace.write_text(json.dumps(to_chrome_trace(measured.representative)))
        log(f"wrote {trace} (Chrome trace of the median iteration)")
    if gantt:
        from .report import gantt_png

        gantt_png(measured.representative, str(gantt), title=f"{plan.schedule.name}, {plan.num_stages} "
                  f"stages, {plan.num_microbatches} micro-batches (measured, median iteration)")
        log(f"wrote {gantt}")
    if args.json:
        print(finite_json(measurement_json(measured, **extra)))
    else:
        print_measurement(measured, baseline)
    return 0


# --- schedule -----------------------------------------------------------------


def cmd_schedule(args) -> int:
    from .lowering import lower
    from .schedule import build_schedule
    from .torchcsv import render

    if args.lowered and args.format != "text":
        raise UsageError("--lowered prints pipesim's text form only (torch's CSV holds compute actions)")
    out = output_file(args.out, "--out") if args.out else None
    lim.check_size(0, args.stages, args.microbatches, args.chunks or 1)
    schedule = build_schedule(args.schedule, args.stages, args.microbatches, args.chunks)
    text = lower(schedule).to_text() + "\n" if args.lowered else render(schedule, args.format)
    if out:
        out.write_text(text)
        log(f"wrote {out} ({args.format})")
    else:
        print(text, end="")
    return 0


def _add_schedule_parser(sub) -> None:
    from .torchcsv import FORMATS

    s = sub.add_parser("schedule", help="print or write a schedule's per-rank compute actions",
                       description="Build a schedule and print its per-rank actions as pipesim's text form "
                                   "or as the compute-only CSV torch's PipelineScheduleMulti._load_csv reads. "
                                   "predict and run read either back with --schedule-file.")
    s.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="(default: 1f1b)")
    s.add_argument("--stages", type=STAGES, default=4, help="pipeline depth in ranks (default: 4)")
    s.add_argument("--chunks", type=int_in(1, lim.MAX_STAGES), default=None, metavar="V",
                   help="chunks per rank (default: 1; 2 for interleaved-1f1b, zb-v and dualpipev)")
    s.add_argument("--microbatches", type=MICROBATCHES, default=8, help="(default: 8)")
    s.add_argument("--format", choices=FORMATS, default="text", help="(default: text)")
    s.add_argument("--lowered", action="store_true", help="text form with the SEND/RECV actions lowering adds")
    s.add_argument("--out", metavar="FILE", help="write to FILE instead of printing")
    s.set_defaults(func=cmd_schedule)


# --- calibrate ----------------------------------------------------------------


def cmd_calibrate(args) -> int:
    from .calibrate import DEFAULT_WIDTHS, CalibrationSettings, calibrate
    from .runner.launch import check_runner_available

    out = output_file(args.out or f"calibration/{_host_name()}.json", "--out", make_parents=True)
    if args.layers is not None:
        warn_no_effect(f"--layers {args.layers}: calibration depends only on the layer width")
    if args.model:
        widths = tuple(sorted({layer.out_features for layer in load_model(args.model).layers}))
    else:
        widths = tuple(args.widths) if args.widths else (
            (args.width,) if args.width is not None else DEFAULT_WIDTHS)
    given = {"microbatch_sizes": args.microbatch_sizes and tuple(args.microbatch_sizes),
             "repeats": args.repeats, "stack_bytes": args.stack_mib and args.stack_mib << 20}
    settings = CalibrationSettings(
        ranks=args.ranks, widths=widths, threads_per_rank=args.threads_per_rank, optimizer=args.optimizer,
        extra_metadata={"command": "pipesim " + " ".join(sys.argv[1:])},
        **{key: value for key, value in given.items() if value},
    )
    name = args.name or out.stem
    check_runner_available("pipesim calibrate")
    log(f"calibrating on {settings.ranks} ranks: widths {list(widths)}, micro-batch sizes "
        f"{list(settings.microbatch_sizes)}")
    profile = calibrate(settings, name, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile, indent=1) + "\n")
    if args.json:
        print(json.dumps(profile, indent=1))
    else:
        print_profile(profile)
        print(f"\nwrote {out}")
    return 0


def _host_name() -> str:
    import socket

    return socket.gethostname().split(".")[0] or "host"


# --- validate -----------------------------------------------------------------


def cmd_validate(args) -> int:
    from .runner.launch import check_runner_available
    from .validate import (
        Tolerance,
        load_grid,
        plan_case,
        run_validation,
        summarize,
        summary_line,
        verdict,
    )
    from .validation_report import write_report

    grid = load_grid(args.grid)
    profile = load_profile(args.profile)
    costs = ProfileCostModel(profile)
    for case in grid.cases:  # every case plans (partition, sizes) before anything launches
        plan_case(case, costs)
    output_folder(args.out, "--out")
    check_runner_available("pipesim validate")
    log(f"validating {len(grid.cases)} cases x {grid.rounds} rounds of grid {grid.name!r} "
        f"against profile {profile.name!r}")
    results = run_validation(grid, profile, log)
    summary = summarize(results)
    cap = math.inf if args.max_tolerance is None else args.max_tolerance
    judged = verdict(summary, Tolerance(args.tolerance, args.noise_multiple, cap))
    command = "pipesim " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    path = write_report(grid, profile, results, summary, Path(args.out), command, judged.text)
    print(summary_line(results, summary))
    print(f"{judged.text}; report {path}")
    return 0 if judged.passed else 1


# --- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="pipesim",
        description="Predict, and prove, how fast pipeline-parallel training runs.",
    )
    parser.add_argument("--version", action="version", version=f"pipesim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_predict_parser(sub)
    _add_schedule_parser(sub)
    add_optimize_parsers(sub)
    _add_run_parser(sub)
    _add_calibrate_parser(sub)
    _add_validate_parser(sub)
    return parser


def _add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="simulate one training step and report time, speedup, memory",
                       description="Simulate one pipeline-parallel training step with calibrated costs.")
    add_plan_options(p, lists=True, what_ifs=True)
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object (a list for sweeps)")
    out.add_argument("--trace", metavar="FILE", help="write a Chrome trace JSON (Perfetto opens it)")
    out.add_argument("--gantt", metavar="FILE.png", help="write a Gantt chart PNG")
    p.set_defaults(func=cmd_predict)


def _add_run_parser(sub) -> None:
    r = sub.add_parser("run", help="run the pipeline for real (torch + MPI) and measure it",
                       description="Execute the same schedule with real tensors and MPI messages, one "
                                   "rank per stage. Launches mpiexec itself, or uses the MPI world it "
                                   "was started in (mpiexec, srun).")
    add_plan_options(r)
    m = r.add_argument_group("measurement")
    m.add_argument("--iterations", type=int_in(1, 100_000), default=20, help="measured iterations (default: 20)")
    m.add_argument("--warmup", type=int_in(0, 100_000), default=5,
                   help="iterations run first and discarded (default: 5)")
    m.add_argument("--threads-per-rank", type=int_in(1, 1024), default=1, help="torch threads per rank (default: 1)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where stages compute")
    m.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of parameters and synthetic data")
    m.add_argument("--baseline", action="store_true",
                   help="also measure one rank running the whole model on the whole mini-batch")
    out = r.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object (fields as in predict)")
    out.add_argument("--trace", metavar="FILE", help="Chrome trace of the median iteration")
    out.add_argument("--gantt", metavar="FILE.png", help="Gantt chart PNG of the median iteration")
    r.set_defaults(func=cmd_run)


def _add_calibrate_parser(sub) -> None:
    c = sub.add_parser("calibrate", help="measure compute, link and optimizer costs; write a profile",
                       description="Measure costs with the runner's own code (all ranks at once) and fit "
                                   "them with scipy. Launches mpiexec itself, or runs inside an existing "
                                   "mpiexec/srun allocation.")
    c.add_argument("--ranks", type=int_in(2, lim.MAX_STAGES), default=2,
                   help="ranks to measure with, at least 2 for the links (default: 2)")
    c.add_argument("--model", metavar="FILE", help="calibrate the layer widths of this model spec")
    c.add_argument("--width", type=WIDTH, default=None, help="calibrate this one fc width")
    c.add_argument("--widths", type=ints_in(1, lim.MAX_WIDTH),
                   help="fc widths to measure (default: 256,384,512,768,1024)")
    c.add_argument("--layers", type=LAYERS, default=None,
                   help="accepted like predict's; calibration depends only on the layer width")
    c.add_argument("--microbatch-sizes", type=MICROBATCH_LIST,
                   help="micro-batch sizes to measure (default: 4,8,...,512)")
    c.add_argument("--repeats", type=int_in(1, 10_000), help="timed rounds over all points (default: 30)")
    c.add_argument("--stack-mib", type=int_in(1, 1 << 20),
                   help="weights per timed layer stack, MiB: like one of your stages (default: 16)")
    c.add_argument("--threads-per-rank", type=int_in(1, 1024), default=1,
                   help="torch threads per rank (default: 1)")
    c.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    c.add_argument("--name", help="profile name (default: the output file's stem)")
    c.add_argument("--out", metavar="FILE",
                   help="where to write (default: calibration/HOST.json, in the tracked calibration/ folder)")
    c.add_argument("--json", action="store_true", help="also print the profile JSON")
    c.set_defaults(func=cmd_calibrate)


def _add_validate_parser(sub) -> None:
    v = sub.add_parser("validate", help="run a grid for real, predict each case, report the accuracy",
                       description="Measure every case of a grid with the runner (interleaved rounds), "
                                   "predict it with the simulator, and write reports/validation-*.md, "
                                   ".csv and PNGs. Exits 1 when MAPE exceeds --tolerance.")
    v.add_argument("--grid", default="validation/default.toml", help="grid TOML (default: %(default)s)")
    v.add_argument("--profile", default="default", help="cost profile JSON (default: the shipped one)")
    v.add_argument("--tolerance", type=float_in(0.0, 10.0), default=0.05,
                   help="largest MAPE that passes, or its floor with --noise-multiple (default: 0.05)")
    v.add_argument("--noise-multiple", type=float_in(0.0, 100.0, low_open=False), default=0.0, metavar="K",
                   help="add K x this run's median noise floor to --tolerance (default: 0)")
    v.add_argument("--max-tolerance", type=float_in(0.0, 10.0), default=None, metavar="CAP",
                   help="never let the tolerance exceed CAP (default: no cap)")
    v.add_argument("--out", default="reports",
                   help="where the report goes (default: reports/, which is tracked by git: running this "
                        "there changes the committed reports)")
    v.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_validate)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pipesim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 1 a failed run or validation, 2 a user error, 130 interrupted."""
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", UserWarning)  # every command says its warnings, not only the first
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help, --version, or a usage error already printed
            return exc.code if isinstance(exc.code, int) else 2
        try:
            return _run(args)
        except KeyboardInterrupt:  # the launcher has already stopped mpiexec and its ranks
            print("pipesim: interrupted", file=sys.stderr)
            return 130


def _run(args) -> int:
    try:
        return args.func(args)
    except UserError as exc:
        return _error(str(exc))
    except RunFailed as exc:  # a rank's traceback is already on stderr
        print(f"pipesim: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except OSError as exc:  # a file the user named could not be written (reads are checked where they happen)
        if exc.filename is None:
            raise
        return _error(f"cannot write {exc.filename}: {exc.strerror or exc}")


def _error(message: str) -> int:
    print(f"pipesim: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
