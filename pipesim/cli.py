"""The command line: the only module that touches argparse.

Each sub-command maps to one function that composes the library's workflows.
Errors meant for the user print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .costs import ProfileCostModel, WhatIfError, parse_link_override, parse_rank_speed
from .model import ModelError, ModelSpec, fc, load_model
from .optimize import OptimizeError
from .partition import PartitionError
from .predict import Prediction, predict, prediction_json
from .profile import ProfileError, load_profile
from .runner.launch import RunFailed, RunnerUnavailable
from .schedule import SCHEDULES, ScheduleError
from .show import print_measurement, print_prediction, print_profile, print_sweep
from .timeline import to_chrome_trace
from .validate import GridError

SWEEP_SCHEDULES = ("gpipe", "1f1b")
USER_ERRORS = (ModelError, PartitionError, ScheduleError, ProfileError, GridError, WhatIfError,
               OptimizeError)


class UsageError(ValueError):
    """Bad command-line input found after argparse."""


def log(text: str) -> None:
    """Progress and notes go to stderr; results go to stdout."""
    print(text, file=sys.stderr)


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 4 or 1,2,4,8, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


# --- shared options -----------------------------------------------------------


def add_plan_options(parser: argparse.ArgumentParser, lists: bool = False, what_ifs: bool = False) -> None:
    """Options that describe a pipeline; shared by predict and run (what-ifs: predict only)."""
    g = parser.add_argument_group("model and pipeline")
    g.add_argument("--layers", type=int, default=32, help="number of fc layers (default: 32)")
    g.add_argument("--width", type=int, default=512, help="fc layer width (default: 512)")
    g.add_argument("--model", metavar="FILE", help="model spec TOML (models/*.toml); overrides --layers/--width")
    stages_help = "pipeline stages, one rank each" + (" (a list like 1,2,4,8 predicts each)" if lists else "")
    g.add_argument("--stages", type=int_list if lists else int, default=None,
                   help=stages_help + " (default: 4, or the partition's stage count)")
    g.add_argument("--microbatches", type=int_list if lists else int, default=None,
                   help="micro-batches per mini-batch" + (" (list allowed)" if lists else "")
                        + " (default: 8, or the --schedule-file's)")
    g.add_argument("--batch-size", type=int, default=512, help="samples per mini-batch (default: 512)")
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
    g.add_argument("--chunks", type=int, default=None, metavar="V",
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
    from .plan import check_schedule_shape
    from .schedule import validate
    from .torchcsv import read_schedule_file

    schedule, notes = read_schedule_file(args.schedule_file)
    for note in notes:
        log(f"note: {args.schedule_file}: {note}")
    check_schedule_shape(schedule, stages, args.chunks, microbatches, f"--schedule-file {args.schedule_file}")
    validate(schedule)
    return schedule


def add_what_if_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what-ifs for heterogeneous clusters")
    g.add_argument("--ranks-per-node", type=int, default=None, metavar="N",
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
    return load_model(args.model) if args.model else fc(args.layers, args.width)


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
    model = model_from_args(args)
    profile, costs = costs_from_args(args)
    schedule = args.schedule
    if args.schedule_file:
        schedule = schedule_from_args(args, _single(args.stages, "--stages"),
                                      _single(args.microbatches, "--microbatches"))
        args.stages, args.microbatches = [schedule.num_stages], [schedule.num_microbatches]
    explicit = _explicit_stage_count(args.partition, args.chunks, args.schedule)
    stage_list = args.stages or [explicit or 4]
    if explicit is not None and len(stage_list) > 1:
        raise UsageError("an explicit --partition fits one stage count; use 'balanced' with a --stages list")
    predictions = [
        _predict_one(args, model, stages, mbs, schedule, costs, profile.name)
        for stages in stage_list for mbs in args.microbatches or [8]
    ]
    single = len(predictions) == 1
    if args.trace or args.gantt:
        if not single:
            raise UsageError("--trace and --gantt need a single configuration")
        write_outputs(predictions[0], args.trace, args.gantt)
    if args.json:
        data = [prediction_json(p) for p in predictions]
        print(json.dumps(data[0] if single else data, indent=2))
    elif single:
        print_prediction(predictions[0])
    else:
        print_sweep(predictions)
    return 0


def write_outputs(prediction: Prediction, trace: str | None, gantt: str | None) -> None:
    if trace:
        Path(trace).write_text(json.dumps(to_chrome_trace(prediction.timeline)))
        print(f"wrote {trace} (Chrome trace; open in https://ui.perfetto.dev)", file=sys.stderr)
    if gantt:
        from .report import gantt_png

        gantt_png(prediction.timeline, gantt, title=f"{prediction.plan.schedule.name}, "
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
    g.add_argument("--layers", type=int, default=32, help="number of fc layers (default: 32)")
    g.add_argument("--width", type=int, default=512, help="fc layer width (default: 512)")
    g.add_argument("--model", metavar="FILE", help="model spec TOML (models/*.toml); overrides --layers/--width")
    if grid:
        g.add_argument("--stages", type=int_list, default=[1, 2, 4, 8, 16],
                       help="stage counts (default: 1,2,4,8,16)")
        g.add_argument("--microbatches", type=int_list, default=[1, 2, 4, 8, 16, 32],
                       help="micro-batch counts (default: 1,2,4,8,16,32)")
        g.add_argument("--schedule", type=schedule_list, default=list(SWEEP_SCHEDULES),
                       help="schedules (default: gpipe,1f1b)")
        g.add_argument("--partition", choices=("balanced", "even", "optimized"), default="balanced",
                       help="per point: the cut minimising the slowest stage, equal layer counts, or "
                            "`optimize`'s search (slower) (default: balanced)")
    else:
        g.add_argument("--stages", type=int, default=4, help="pipeline stages, one rank each (default: 4)")
        g.add_argument("--microbatches", type=int, default=8, help="micro-batches (default: 8)")
        g.add_argument("--schedule", type=schedule_list, default=["1f1b"],
                       help="schedule, or a list like 1f1b,zb-h1,zb-v searched over too (default: 1f1b)")
        g.add_argument("--chunks", type=int_list, default=None, metavar="V[,V]",
                       help="chunks per rank, or a list searched over (default: each schedule's own)")
    g.add_argument("--batch-size", type=int, default=512, help="samples per mini-batch (default: 512)")
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
    from .optimize import Problem, optimize

    model = model_from_args(args)
    profile, costs = costs_from_args(args)
    costs.check_ranks(args.stages)
    combos = [(name, chunks) for name in args.schedule for chunks in (args.chunks or [None])]
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
        optima.append(optimize(problem, max_simulations=args.max_simulations))
    for line in skipped:
        log(f"note: skipped {line}")
    if not optima:
        raise UsageError("no schedule and chunk count of the lists can be built (see the notes above)")
    return sorted(optima, key=lambda o: o.best.metrics.iteration_time_s)


def _optimum(args):
    return _optima(args)[0]


def _sweep(args, progress: bool = True):
    from .sweep import ProgressBar, grid, run_sweep

    model = model_from_args(args)
    _, costs = costs_from_args(args)
    costs.check_ranks(max(args.stages))
    points = grid(args.stages, args.microbatches, args.schedule)
    bar = ProgressBar(len(points)) if progress else None
    return run_sweep(model, costs, points, args.batch_size, args.partition, _memory_cap(args), args.jobs, bar)


def _log_figures(out: Path, figures: dict[str, str]) -> None:
    for name in figures.values():
        log(f"wrote {out / name}")


def _plots(args, draw) -> None:
    """With --plots DIR, draw(DIR) writes the figures there."""
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        _log_figures(out, draw(out))


def cmd_optimize(args) -> int:
    from . import report
    from .optimize import optimum_json, searched_json, searched_text

    optima = _optima(args)
    optimum = optima[0]
    _plots(args, lambda out: report.optimize_figures(optimum, out))
    if args.json:
        data = optimum_json(optimum)
        print(json.dumps(data if len(optima) == 1 else {**data, "searched": searched_json(optima)}, indent=2))
    else:
        print((searched_text(optima) + "\n\n" if len(optima) > 1 else "") + report.optimum_text(optimum))
    return 0


def cmd_sweep(args) -> int:
    from . import report
    from .sweep import sweep_json

    sweep = _sweep(args, progress=not args.quiet)
    _plots(args, lambda out: report.sweep_figures(sweep, out))
    print(json.dumps(sweep_json(sweep), indent=2) if args.json else report.sweep_text(sweep))
    return 0


def cmd_report(args) -> int:
    from . import report

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
    o.add_argument("--max-simulations", type=int, default=200,
                   help="simulate at most this many candidates (default: 200)")
    out = o.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--plots", metavar="DIR", help="write optimize-*.png (Gantt, memory per rank) into DIR")
    o.set_defaults(func=cmd_optimize)

    s = sub.add_parser("sweep", help="predict a grid of stages x micro-batches x schedules",
                       description="Predict every configuration of the grid in parallel processes; print "
                                   "speedup and peak memory, and recommend the fastest that fits --memory-cap.")
    add_search_options(s, grid=True)
    s.add_argument("--jobs", type=int, default=None, help="processes (default: one per core)")
    out = s.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--plots", metavar="DIR", help="write sweep-*.png (speedup curves, heatmap) into DIR")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_sweep)

    r = sub.add_parser("report", help="optimize + sweep, figures and one markdown page in reports/",
                       description="Optimize one configuration and sweep a grid, then write the Gantt "
                                   "charts, memory bars, speedup curves, heatmap and a markdown page.")
    add_search_options(r, grid=False)
    r.add_argument("--max-simulations", type=int, default=200, help="as in optimize (default: 200)")
    r.add_argument("--sweep-stages", type=int_list, default=[1, 2, 4, 8, 16], help="(default: 1,2,4,8,16)")
    r.add_argument("--sweep-microbatches", type=int_list, default=[1, 2, 4, 8, 16, 32],
                   help="(default: 1,2,4,8,16,32)")
    r.add_argument("--sweep-schedules", type=schedule_list, default=list(SWEEP_SCHEDULES),
                   help="(default: gpipe,1f1b)")
    r.add_argument("--jobs", type=int, default=None, help="sweep processes (default: one per core)")
    r.add_argument("--out", default="reports", help="where the page and figures go (default: reports/)")
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

    if args.iterations < 1 or args.warmup < 0 or args.threads_per_rank < 1:
        raise UsageError("--iterations and --threads-per-rank must be >= 1, --warmup >= 0")
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
    check_runner_available()
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
    if args.trace:
        Path(args.trace).write_text(json.dumps(to_chrome_trace(measured.representative)))
        log(f"wrote {args.trace} (Chrome trace of the median iteration)")
    if args.gantt:
        from .report import gantt_png

        gantt_png(measured.representative, args.gantt, title=f"{plan.schedule.name}, {plan.num_stages} "
                  f"stages, {plan.num_microbatches} micro-batches (measured, median iteration)")
        log(f"wrote {args.gantt}")
    if args.json:
        print(json.dumps(measurement_json(measured, **extra), indent=2))
    else:
        print_measurement(measured, baseline)
    return 0


# --- schedule -----------------------------------------------------------------


def cmd_schedule(args) -> int:
    from .lowering import lower
    from .schedule import build_schedule
    from .torchcsv import render

    schedule = build_schedule(args.schedule, args.stages, args.microbatches, args.chunks)
    if args.lowered and args.format != "text":
        raise UsageError("--lowered prints pipesim's text form only (torch's CSV holds compute actions)")
    text = lower(schedule).to_text() + "\n" if args.lowered else render(schedule, args.format)
    if args.out:
        Path(args.out).write_text(text)
        log(f"wrote {args.out} ({args.format})")
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
    s.add_argument("--stages", type=int, default=4, help="pipeline depth in ranks (default: 4)")
    s.add_argument("--chunks", type=int, default=None, metavar="V",
                   help="chunks per rank (default: 1; 2 for interleaved-1f1b, zb-v and dualpipev)")
    s.add_argument("--microbatches", type=int, default=8, help="(default: 8)")
    s.add_argument("--format", choices=FORMATS, default="text", help="(default: text)")
    s.add_argument("--lowered", action="store_true", help="text form with the SEND/RECV actions lowering adds")
    s.add_argument("--out", metavar="FILE", help="write to FILE instead of printing")
    s.set_defaults(func=cmd_schedule)


# --- calibrate ----------------------------------------------------------------


def cmd_calibrate(args) -> int:
    from .calibrate import DEFAULT_WIDTHS, CalibrationSettings, calibrate

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
    out = Path(args.out or f"calibration/{_host_name()}.json")
    name = args.name or out.stem
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
    from .validate import load_grid, run_validation, summarize
    from .validation_report import write_report

    grid = load_grid(args.grid)
    profile = load_profile(args.profile)
    log(f"validating {len(grid.cases)} cases x {grid.rounds} rounds of grid {grid.name!r} "
        f"against profile {profile.name!r}")
    check_runner_available()
    results = run_validation(grid, profile, log)
    summary = summarize(results)
    command = "pipesim " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    path = write_report(grid, profile, results, summary, Path(args.out), command, args.tolerance)
    verdict = "PASS" if summary.mape <= args.tolerance else "FAIL"
    print(f"{len(results)} cases: MAPE {summary.mape:.2%}, max |error| {summary.max_abs_error:.2%}, "
          f"speedup rank correlation {summary.speedup_rank_correlation:.3f}, noise floor "
          f"{summary.noise_floor_median:.2%} (max {summary.noise_floor_max:.2%}), partition rankings "
          f"{summary.partition_rankings_match}/{summary.partition_rankings_total}, memory max |error| "
          f"{summary.memory_max_abs_error:.2%}")
    print(f"{verdict}: MAPE {summary.mape:.2%} {'<=' if verdict == 'PASS' else '>'} tolerance "
          f"{args.tolerance:.1%}; report {path}")
    return 0 if verdict == "PASS" else 1


# --- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    m.add_argument("--iterations", type=int, default=20, help="measured iterations (default: 20)")
    m.add_argument("--warmup", type=int, default=5, help="iterations run first and discarded (default: 5)")
    m.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per rank (default: 1)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where stages compute")
    m.add_argument("--seed", type=int, default=0, help="seed of parameters and synthetic data")
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
    c.add_argument("--ranks", type=int, default=2, help="ranks to measure with (default: 2)")
    c.add_argument("--model", metavar="FILE", help="calibrate the layer widths of this model spec")
    c.add_argument("--width", type=int, default=None, help="calibrate this one fc width")
    c.add_argument("--widths", type=int_list, help="fc widths to measure (default: 256,384,512,768,1024)")
    c.add_argument("--layers", type=int, default=None,
                   help="accepted like predict's; calibration depends only on the layer width")
    c.add_argument("--microbatch-sizes", type=int_list,
                   help="micro-batch sizes to measure (default: 4,8,...,512)")
    c.add_argument("--repeats", type=int, help="timed rounds over all points (default: 30)")
    c.add_argument("--stack-mib", type=int,
                   help="weights per timed layer stack, MiB: like one of your stages (default: 16)")
    c.add_argument("--threads-per-rank", type=int, default=1, help="torch threads per rank (default: 1)")
    c.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    c.add_argument("--name", help="profile name (default: the output file's stem)")
    c.add_argument("--out", metavar="FILE", help="where to write (default: calibration/HOST.json)")
    c.add_argument("--json", action="store_true", help="also print the profile JSON")
    c.set_defaults(func=cmd_calibrate)


def _add_validate_parser(sub) -> None:
    v = sub.add_parser("validate", help="run a grid for real, predict each case, report the accuracy",
                       description="Measure every case of a grid with the runner (interleaved rounds), "
                                   "predict it with the simulator, and write reports/validation-*.md, "
                                   ".csv and PNGs. Exits 1 when MAPE exceeds --tolerance.")
    v.add_argument("--grid", default="validation/default.toml", help="grid TOML (default: %(default)s)")
    v.add_argument("--profile", default="default", help="cost profile JSON (default: the shipped one)")
    v.add_argument("--tolerance", type=float, default=0.05, help="largest MAPE that passes (default: 0.05)")
    v.add_argument("--out", default="reports", help="where the report goes (default: reports/)")
    v.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
    v.set_defaults(func=cmd_validate)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pipesim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    import warnings

    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (*USER_ERRORS, UsageError, RunnerUnavailable) as exc:
        print(f"pipesim: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # a rank's traceback is already on stderr
        print(f"pipesim: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
