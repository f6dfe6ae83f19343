"""The command line: it parses flags (declared in options.py; the two are the only
modules that touch argparse) and experiment files into an ExecutionSpec, calls the
command's workflow (workflows.py) and prints the result through formats/.

Exit codes: 0 success; 1 a real run or a validation that failed; 2 anything the
user got wrong (one line, ``pipesim: error: ...``); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .checks import figure_file, finite_json, output_file, output_folder, warn_no_effect
from .errors import UserError
from .options import build_parser
from .runner.launch import RunFailed
from .spec import ExecutionSpec, dump_spec, load_spec, normal_path, spec_json
from .workflows import log

_FLAGS = {"model": "model_file", "layers": "layers", "width": "width", "profile": "profile", "stages": "stages",
          "chunks": "chunks", "schedule": "schedule", "schedule_file": "schedule_file", "partition": "partition",
          "microbatches": "microbatches", "batch_size": "batch_size", "optimizer": "optimizer",
          "memory_cap": "memory_cap", "ranks_per_node": "ranks_per_node", "rank_speed": "rank_speed",
          "link": "links", "data_parallel": "data_parallel", "placement": "placement", "recompute": "recompute",
          "transport": "transport", "allreduce": "allreduce"}


def spec_from_args(args) -> ExecutionSpec:
    """--config's spec (or the empty one) with the flags given on top."""
    given = {field: getattr(args, flag, None) for flag, field in _FLAGS.items()}
    if given["model_file"]:
        for flag in ("layers", "width"):
            if given[flag] is not None:
                warn_no_effect(f"--{flag} is ignored: --model {given['model_file']} gives the layers")
                given[flag] = None
    for key in ("model_file", "schedule_file"):
        path = given[key]
        given[key] = normal_path(path) if path else None
    for key in ("rank_speed", "links"):
        given[key] = tuple(given[key] or ())
    return (load_spec(args.config) if args.config else ExecutionSpec()).merged(given)


def save_config_file(args) -> None:
    """--save-config's path, checked before any work."""
    if args.save_config:
        output_file(args.save_config, "--save-config")


def finish(args, spec: ExecutionSpec, text: str | None, data: dict | list, end: str = "\n") -> int:
    """Write --save-config, then print the JSON (with the spec embedded) or the text."""
    if args.save_config:
        path = Path(args.save_config)
        path.write_text(dump_spec(spec, path, "pipesim " + " ".join(sys.argv[1:])))
        log(f"wrote {path}")
    if getattr(args, "json", False):
        print(finite_json(data if isinstance(data, list) else {**data, "spec": spec_json(spec)}))
    elif text is not None:
        print(text, end=end)
    return 0


def cmd_predict(args) -> int:
    from .formats import jsondata, text
    from .workflows import run_predict

    trace = output_file(args.trace, "--trace") if args.trace else None  # all checked before any work
    gantt = figure_file(args.gantt, "--gantt") if args.gantt else None
    save_config_file(args)
    result = run_predict(spec_from_args(args), single_only=bool(trace or gantt))
    if trace or gantt:
        write_outputs(result.predictions[0].timeline, trace, gantt, "simulated, profile "
                      + result.predictions[0].profile, result.predictions[0].plan)
    data = [{**jsondata.prediction_json(p), "profile_measured_on": result.measured_on,
             "spec": spec_json(result.spec_of(p))} for p in result.predictions]
    shown = (text.prediction_text(result.predictions[0], result.measured_on) if result.single
             else text.predictions_text(list(result.predictions), result.measured_on))
    return finish(args, result.spec, shown, data[0] if result.single else data)


def write_outputs(timeline, trace: Path | None, gantt: Path | None, source: str, plan) -> None:
    if trace:
        from .timeline import to_chrome_trace

        trace.write_text(json.dumps(to_chrome_trace(timeline)))
        log(f"wrote {trace} (Chrome trace; open in https://ui.perfetto.dev)")
    if gantt:
        from .report import gantt_png

        replicas = f" x {plan.data_parallel} replicas" if plan.data_parallel > 1 else ""
        gantt_png(timeline, str(gantt), title=f"{plan.schedule.name}, {plan.num_stages} stages{replicas}, "
                  f"{plan.num_microbatches} micro-batches ({source})")
        log(f"wrote {gantt}")


def _plots(args) -> Path | None:
    return output_folder(args.plots, "--plots") if args.plots else None


def _figures(out: Path | None, draw) -> None:
    for name in (draw(out) if out else {}).values():
        log(f"wrote {out / name}")


def cmd_optimize(args) -> int:
    from . import report
    from .formats import jsondata, text
    from .workflows import run_optimize

    plots = _plots(args)
    save_config_file(args)
    if args.ranks is not None:
        from .workflows import run_shapes

        spec, search = run_shapes(spec_from_args(args), args.ranks, args.max_simulations)
        return finish(args, spec, text.shapes_text(search), jsondata.shapes_json(search))
    result = run_optimize(spec_from_args(args), args.max_simulations)
    _figures(plots, lambda out: report.optimize_figures(result.best, out))
    data = jsondata.optimum_json(result.best)
    if len(result.optima) > 1:
        data["searched"] = jsondata.searched_json(list(result.optima))
    shown = (text.searched_text(result.optima) + "\n\n" if len(result.optima) > 1 else "") + \
        text.optimum_text(result.best)
    return finish(args, result.spec, shown, data)


def cmd_sweep(args) -> int:
    from . import report
    from .formats import jsondata, text
    from .workflows import run_sweep

    plots = _plots(args)
    save_config_file(args)
    result = run_sweep(spec_from_args(args), args.jobs, progress=not args.quiet)
    _figures(plots, lambda out: report.sweep_figures(result.sweep, out))
    return finish(args, result.spec, text.sweep_text(result.sweep), jsondata.sweep_json(result.sweep))


def cmd_report(args) -> int:
    from dataclasses import replace

    from .workflows import run_report

    out = output_folder(args.out, "--out")
    save_config_file(args)
    spec = spec_from_args(args)
    sweep_spec = replace(spec, stages=args.sweep_stages, microbatches=args.sweep_microbatches,
                         schedule=args.sweep_schedules, partition="balanced", chunks=None)
    command = "pipesim " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    page = run_report(spec, sweep_spec, args.max_simulations, args.jobs, out, command)
    return finish(args, spec, f"wrote {page}", {})


def cmd_run(args) -> int:
    from .formats.jsondata import measurement_json
    from .formats.text import measurement_text
    from .workflows import run_real

    trace = output_file(args.trace, "--trace") if args.trace else None  # all checked before launching
    gantt = figure_file(args.gantt, "--gantt") if args.gantt else None
    save_config_file(args)
    options = dict(iterations=args.iterations, warmup=args.warmup, threads_per_rank=args.threads_per_rank,
                   seed=args.seed, device=args.device)
    result = run_real(spec_from_args(args), options, args.baseline)
    measured, baseline = result.measured, result.baseline
    if measured is None:  # a rank other than 0 inside an existing MPI world
        return 0
    write_outputs(measured.representative, trace, gantt, "measured, median iteration", measured.plan)
    extra = {} if baseline is None else {"baseline_time_s": baseline.median_s,
                                         "speedup": baseline.median_s / measured.median_s}
    return finish(args, result.spec, measurement_text(measured, baseline), measurement_json(measured, **extra))


def cmd_schedule(args) -> int:
    from .workflows import run_schedule

    if args.lowered and args.format != "text":
        raise UserError("--lowered prints pipesim's text form only (torch's CSV holds compute actions)")
    out = output_file(args.out, "--out") if args.out else None
    save_config_file(args)
    spec, text = run_schedule(spec_from_args(args), args.format, args.lowered)
    if out:
        out.write_text(text)
        log(f"wrote {out} ({args.format})")
    return finish(args, spec, None if out else text, {}, end="")


def cmd_calibrate(args) -> int:
    from .formats.text import profile_text
    from .workflows import run_calibrate

    out = output_file(args.out or f"calibration/{_host_name()}.json", "--out", make_parents=True)
    if args.layers is not None:
        warn_no_effect(f"--layers {args.layers}: calibration depends only on the layer width")
    model_files = [path.strip() for given in args.model or () for path in given.split(",") if path.strip()]
    profile = run_calibrate(out, "pipesim " + " ".join(sys.argv[1:]), model_files=model_files, width=args.width,
                            **{k: getattr(args, k) for k in ("ranks", "widths", "microbatch_sizes", "repeats",
                                                             "stack_mib", "threads_per_rank", "optimizer", "name",
                                                             "transport")})
    if profile is None:  # a rank other than 0 inside an existing MPI world
        return 0
    print(json.dumps(profile, indent=1) if args.json else f"{profile_text(profile)}\n\nwrote {out}")
    return 0


def _host_name() -> str:
    import socket

    return socket.gethostname().split(".")[0] or "host"


def cmd_show_model(args) -> int:
    from .formats.jsondata import layer_table_json
    from .formats.text import layer_table_text
    from .model import layer_table, load_model

    model = load_model(args.model)
    rows = layer_table(model)
    print(finite_json(layer_table_json(model, rows)) if args.json else layer_table_text(model, rows))
    return 0


def cmd_validate(args) -> int:
    from .validate import validate_grid

    output_folder(args.out, "--out")
    command = "pipesim " + " ".join(sys.argv[1:]) if args.command_line is None else args.command_line
    passed, lines = validate_grid(args.grid, args.profile, args.out, command, log,
                                 (args.tolerance, args.noise_multiple, args.max_tolerance))
    print("\n".join(lines))
    return 0 if passed else 1


HANDLERS = {"predict": cmd_predict, "schedule": cmd_schedule, "optimize": cmd_optimize, "sweep": cmd_sweep,
            "report": cmd_report, "run": cmd_run, "calibrate": cmd_calibrate, "show-model": cmd_show_model,
            "validate": cmd_validate}


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"pipesim: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 success, 1 a failed run or validation, 2 a user error, 130 interrupted."""
    import warnings

    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", UserWarning)  # every command says its warnings, not only the first
        try:
            args = build_parser(HANDLERS).parse_args(argv)
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
