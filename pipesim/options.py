"""The command line's options: argparse types and every sub-command's parser.

With cli.py (which maps each sub-command to its workflow and prints the result)
the only module that touches argparse. The model, profile and execution options
are declared once (`add_spec_options`); their defaults are the commands' own
(workflows.py), so a flag not given leaves --config's field as it is.
"""

from __future__ import annotations

import argparse

from . import __version__
from . import limits as lim
from .errors import UserError
from .schedule import SCHEDULES
from .spec import ALLREDUCE_MODELS


class Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line like every other user error."""

    def error(self, message: str):
        self.exit(2, f"pipesim: error: {message} (see '{self.prog} --help')\n")


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
    """An argparse type: integers like 4 or 1,2,4,8, each in low..high (a tuple)."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
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


def schedule_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in SCHEDULES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown schedule {unknown[0]!r} (allowed: {', '.join(SCHEDULES)})")
    return names


def one_schedule(text: str) -> tuple[str, ...]:
    if text not in SCHEDULES:
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from {', '.join(SCHEDULES)})")
    return (text,)


def one(parse):
    """A single value held as the one-element tuple an ExecutionSpec keeps."""
    return lambda text: (parse(text),)


STAGES, MICROBATCHES = int_in(1, lim.MAX_STAGES), int_in(1, lim.MAX_BATCH_SIZE)
STAGE_LIST, MICROBATCH_LIST = ints_in(1, lim.MAX_STAGES), ints_in(1, lim.MAX_BATCH_SIZE)
LAYERS, WIDTH, BATCH = int_in(1, lim.MAX_LAYERS), int_in(1, lim.MAX_WIDTH), int_in(1, lim.MAX_BATCH_SIZE)
CHUNKS = int_in(1, lim.MAX_STAGES)
# the options each command takes as lists (the rest take one value)
LISTS = {"predict": {"stages", "microbatches"}, "run": set(), "schedule": set(),
         "optimize": {"schedule", "chunks"}, "report": {"schedule", "chunks"},
         "sweep": {"stages", "microbatches", "schedule"}}


def add_spec_options(p, command: str) -> None:
    """The model, profile and execution options, declared once for every command that takes a spec.
    Their defaults are the command's own (workflows.py), so a flag not given leaves --config's value."""
    lists, g = LISTS[command], p.add_argument_group("model and pipeline (override --config's fields)")
    g.add_argument("--config", metavar="FILE", help="an execution spec TOML (experiments/*.toml)")
    g.add_argument("--save-config", metavar="FILE", help="write the resolved execution spec as TOML")
    if command != "schedule":
        g.add_argument("--layers", type=LAYERS, help="number of fc layers (default: 32)")
        g.add_argument("--width", type=WIDTH, help="fc layer width (default: 512)")
        g.add_argument("--model", metavar="FILE", help="model spec TOML (models/*.toml); overrides --layers/--width")
    stages_type = int_in(1, lim.MAX_OPTIMIZE_STAGES) if command in ("optimize", "report") else STAGES
    g.add_argument("--stages", type=STAGE_LIST if "stages" in lists else one(stages_type),
                   help="pipeline stages, one rank each" + (" (a list like 1,2,4,8)" if "stages" in lists else "")
                   + (" (default: 1,2,4,8,16)" if command == "sweep" else " (default: 4, or the partition's)"))
    g.add_argument("--microbatches", type=MICROBATCH_LIST if "microbatches" in lists else one(MICROBATCHES),
                   help="micro-batches per mini-batch" + (" (list allowed)" if "microbatches" in lists else "")
                   + (" (default: 1,2,4,8,16,32)" if command == "sweep" else " (default: 8)"))
    g.add_argument("--schedule", type=schedule_list if "schedule" in lists else one_schedule, metavar="NAME",
                   help=f"pipeline schedule{', or a list searched over' if 'schedule' in lists else ''}: "
                        f"{', '.join(SCHEDULES)} (default: {'gpipe,1f1b' if command == 'sweep' else '1f1b'})")
    if command != "sweep":
        g.add_argument("--chunks", type=ints_in(1, lim.MAX_STAGES) if "chunks" in lists else one(CHUNKS),
                       metavar="V", help="model chunks per rank: the model is cut into stages x chunks pieces "
                                         "(default: 1; 2 for interleaved-1f1b, zb-v and dualpipev)")
    if command == "schedule":
        g.add_argument("--data-parallel", type=int_in(1, lim.MAX_STAGES), metavar="D",
                       help="with --lowered: D > 1 adds each piece's ALLREDUCE (default: 1)")
        return
    if command in ("predict", "run"):
        g.add_argument("--schedule-file", metavar="FILE", help="a schedule instead of --schedule: pipesim's "
                                                               "text form (`pipesim schedule`) or torch's CSV")
    g.add_argument("--batch-size", type=BATCH, help="samples per mini-batch, all replicas together (default: 512)")
    if command != "report":
        g.add_argument("--data-parallel", type=int_in(1, lim.MAX_STAGES), metavar="D",
                       help="pipeline replicas, world = stages x D ranks; each trains on batch/D samples "
                            "and gradients are all-reduced per stage (default: 1)")
        g.add_argument("--placement", choices=("stage-major", "replica-major"),
                       help="global rank of replica d, stage s: d*P+s (stage-major: a replica's pipeline on "
                            "consecutive ranks) or s*D+d (replica-major) (default: stage-major)")
    if command in ("predict", "optimize", "sweep"):
        g.add_argument("--allreduce", choices=ALLREDUCE_MODELS,
                       help="how the gradient all-reduces are simulated: the ring law after the pipelines, or "
                            "the ring's 2(D-1) steps message by message in one event simulation with a network "
                            "interface per node (--ranks-per-node) shared by all inter-node traffic "
                            "(default: law)")
    if command == "sweep":
        g.add_argument("--partition", choices=("balanced", "even", "optimized"),
                       help="per point: the cut minimising the slowest stage, equal layer counts, or "
                            "`optimize`'s search (slower) (default: balanced)")
    elif command in ("predict", "run"):
        g.add_argument("--partition", help="layers per piece (P x V pieces): counts '8,8,8,8', ranges "
                                           "'0-9,10-31', or 'balanced' (default: the cut minimising the slowest piece)")
    g.add_argument("--profile", help="cost profile JSON (default: the measured profile shipped with pipesim)")
    if command != "run":
        g.add_argument("--transport", choices=("mpi", "gloo"),
                       help="whose links and per-action overhead to use: MPI's, or torch.distributed's over gloo "
                            "(the profile must have them: `pipesim calibrate --transport gloo`) (default: mpi)")
    g.add_argument("--optimizer", choices=("sgd", "adam"), help="SGD with momentum or Adam (default: sgd)")
    if command in ("predict", "run"):
        g.add_argument("--recompute", metavar="none|all|LIST",
                       help="activation recomputation: pieces that keep only their input and run the forward "
                            "again before the backward: none, all, or piece indices like 0,2 (default: none; "
                            "auto is optimize's)")
    if command == "optimize":
        g.add_argument("--recompute", metavar="auto|none|all|LIST",
                       help="activation recomputation: auto (optimize only) tries none, all and (up to 4 "
                            "pieces) each piece alone, each with its best partition, and keeps the fastest "
                            "that fits --memory-cap; none, all or piece indices like 0,2 fix it (default: none)")
    if command in ("optimize", "report", "sweep"):
        g.add_argument("--memory-cap", metavar="BYTES",
                       help="largest peak memory any rank may use, like 2GiB, 512MiB or 1.5e9 (default: none)")
    if command != "run":
        w = p.add_argument_group("what-ifs for heterogeneous clusters")
        w.add_argument("--ranks-per-node", type=int_in(1, lim.MAX_RANKS_PER_NODE), metavar="N",
                       help="rank r sits on node r // N: links between nodes use the profile's inter_node costs")
        w.add_argument("--rank-speed", action="append", metavar="RANK:FACTOR",
                       help="rank RANK computes FACTOR times as fast, e.g. 3:0.5; repeat or comma-separate")
        w.add_argument("--link", action="append", metavar="A-B:VALUE[,VALUE]",
                       help="the link between ranks A and B: bandwidth like 1-2:1.25e9Bps, latency like "
                            "1-2:5e-6s, or both 1-2:1.25e9Bps,5e-6s; repeatable")


def build_parser(handlers: dict) -> argparse.ArgumentParser:
    """The parser; `handlers` maps each sub-command to the cli function it dispatches to."""
    from .torchcsv import FORMATS

    parser = Parser(prog="pipesim", description="Predict, and prove, how fast pipeline-parallel training runs.")
    parser.add_argument("--version", action="version", version=f"pipesim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("predict", help="simulate one training step and report time, speedup, memory",
                       description="Simulate one pipeline-parallel training step with calibrated costs.")
    add_spec_options(p, "predict")
    _outputs(p, "print one JSON object (a list for sweeps)", trace="write a Chrome trace JSON (Perfetto opens "
             "it)", gantt="write a Gantt chart PNG")

    s = sub.add_parser("schedule", help="print or write a schedule's per-rank compute actions",
                       description="Build a schedule and print its per-rank actions as pipesim's text form "
                                   "or as the compute-only CSV torch's PipelineScheduleMulti._load_csv reads. "
                                   "predict and run read either back with --schedule-file.")
    add_spec_options(s, "schedule")
    s.add_argument("--format", choices=FORMATS, default="text", help="(default: text)")
    s.add_argument("--lowered", action="store_true", help="text form with the SEND/RECV actions lowering adds")
    s.add_argument("--out", metavar="FILE", help="write to FILE instead of printing")

    o = sub.add_parser("optimize", help="the partition with the smallest predicted time under a memory cap",
                       description="Search every contiguous partition (branch and bound on cost-model "
                                   "bounds, candidates confirmed by the simulator) for the smallest "
                                   "predicted iteration time whose every rank fits --memory-cap, and "
                                   "compare it with the even split by layer count.")
    add_spec_options(o, "optimize")
    o.add_argument("--ranks", type=int_in(1, lim.MAX_STAGES), metavar="N",
                   help="search the shape too: every stages x data-parallel = N, every micro-batch count "
                        "that divides batch/D, the schedules and chunks given, and the partition")
    _max_simulations(o, "simulate at most this many candidates (default: 200)")
    _outputs(o, "print one JSON object", plots="write optimize-*.png (Gantt, memory per rank) into DIR")

    w = sub.add_parser("sweep", help="predict a grid of stages x micro-batches x schedules",
                       description="Predict every configuration of the grid in parallel processes; print "
                                   "speedup and peak memory, and recommend the fastest that fits --memory-cap.")
    add_spec_options(w, "sweep")
    _jobs(w, "processes (default: one per core)")
    _outputs(w, "print one JSON object", plots="write sweep-*.png (speedup curves, heatmap) into DIR")
    w.add_argument("--quiet", action="store_true", help="no progress bar")

    r = sub.add_parser("report", help="optimize + sweep, figures and one markdown page (default: in reports/)",
                       description="Optimize one configuration and sweep a grid, then write the Gantt "
                                   "charts, memory bars, speedup curves, heatmap and a markdown page.")
    add_spec_options(r, "report")
    _max_simulations(r, "as in optimize (default: 200)")
    r.add_argument("--sweep-stages", type=STAGE_LIST, default=(1, 2, 4, 8, 16), help="(default: 1,2,4,8,16)")
    r.add_argument("--sweep-microbatches", type=MICROBATCH_LIST, default=(1, 2, 4, 8, 16, 32),
                   help="(default: 1,2,4,8,16,32)")
    r.add_argument("--sweep-schedules", type=schedule_list, default=("gpipe", "1f1b"), help="(default: gpipe,1f1b)")
    _jobs(r, "sweep processes (default: one per core)")
    _report_out(r, "the page and figures go")

    u = sub.add_parser("run", help="run the pipeline for real (torch + MPI) and measure it",
                       description="Execute the same schedule with real tensors and MPI messages, one "
                                   "rank per stage. Launches mpiexec itself, or uses the MPI world it "
                                   "was started in (mpiexec, srun).")
    add_spec_options(u, "run")
    m = u.add_argument_group("measurement")
    m.add_argument("--iterations", type=int_in(1, 100_000), default=20, help="measured iterations (default: 20)")
    m.add_argument("--warmup", type=int_in(0, 100_000), default=5,
                   help="iterations run first and discarded (default: 5)")
    m.add_argument("--threads-per-rank", type=int_in(1, 1024), default=1, help="torch threads per rank (default: 1)")
    m.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where stages compute")
    m.add_argument("--seed", type=int_in(0, 2**32 - 1), default=0, help="seed of parameters and synthetic data")
    m.add_argument("--baseline", action="store_true",
                   help="also measure one rank running the whole model on the whole mini-batch")
    _outputs(u, "print one JSON object (fields as in predict)", trace="Chrome trace of the median iteration",
             gantt="Gantt chart PNG of the median iteration")

    c = sub.add_parser("calibrate", help="measure compute, link and optimizer costs; write a profile",
                       description="Measure costs with the runner's own code (all ranks at once) and fit "
                                   "them with scipy. Launches mpiexec itself, or runs inside an existing "
                                   "mpiexec/srun allocation.")
    c.add_argument("--ranks", type=int_in(2, lim.MAX_STAGES), default=2,
                   help="ranks to measure with, at least 2 for the links (default: 2)")
    c.add_argument("--model", metavar="FILE", action="append",
                   help="measure the layer kinds and shapes of this model spec (the widths of an fc-only model); "
                        "repeat or comma-separate")
    c.add_argument("--width", type=WIDTH, default=None, help="calibrate this one fc width")
    c.add_argument("--widths", type=ints_in(1, lim.MAX_WIDTH),
                   help="fc widths to measure (default: 256,384,512,768,1024)")
    c.add_argument("--layers", type=LAYERS, default=None,
                   help="accepted like predict's; calibration depends only on the layer width")
    c.add_argument("--microbatch-sizes", type=MICROBATCH_LIST,
                   help="micro-batch sizes to measure (default: 4,8,...,512)")
    c.add_argument("--repeats", type=int_in(1, 10_000), help="timed rounds over all points (default: 30 for fc widths, 20 for layer kinds)")
    c.add_argument("--stack-mib", type=int_in(1, 1 << 20),
                   help="weights per timed layer stack, MiB: like one of your stages (default: 16)")
    c.add_argument("--threads-per-rank", type=int_in(1, 1024), default=1,
                   help="torch threads per rank (default: 1)")
    c.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    c.add_argument("--transport", choices=("mpi", "gloo"), default="mpi",
                   help="gloo: also measure torch.distributed's gloo links and torch pipelining's per-action "
                        "overhead, stored beside MPI's (about 30 s more) (default: mpi)")
    c.add_argument("--name", help="profile name (default: the output file's stem)")
    c.add_argument("--out", metavar="FILE",
                   help="where to write (default: calibration/HOST.json, in the tracked calibration/ folder)")
    c.add_argument("--json", action="store_true", help="also print the profile JSON")

    d = sub.add_parser("show-model", help="print a model's per-layer table, to write a partition by hand",
                       description="Per layer of a model spec: index, kind, output shape, parameters, forward "
                                   "FLOPs, bytes saved for backward and the bytes a cut after it sends (per "
                                   "sample). Partitions (--partition) count or range these indices.")
    d.add_argument("model", metavar="FILE", help="model spec TOML (models/*.toml)")
    d.add_argument("--json", action="store_true", help="print one JSON object")

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
    _report_out(v, "the report goes")
    for name, command in sub.choices.items():
        command.set_defaults(func=handlers[name])
    return parser


def _outputs(p, json_help: str, **files: str) -> None:
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help=json_help)
    for name, text in files.items():
        out.add_argument(f"--{name}", metavar={"trace": "FILE", "gantt": "FILE.png", "plots": "DIR"}[name], help=text)


def _max_simulations(p, text: str) -> None:
    p.add_argument("--max-simulations", type=int_in(1, lim.MAX_SIMULATIONS), default=200, help=text)


def _jobs(p, text: str) -> None:
    p.add_argument("--jobs", type=int_in(1, lim.MAX_JOBS), default=None, help=text)


def _report_out(p, what: str) -> None:
    p.add_argument("--out", default="reports", help=f"where {what} (default: reports/, which is tracked by "
                                                    "git: running this there changes the committed reports)")
    p.add_argument("--command-line", default=None, help=argparse.SUPPRESS)
