"""pipesim's runner against torch.distributed.pipelining, interleaved.

Same model (32 x Linear(512,512)+ReLU), same mini-batch, 2 ranks, 8
micro-batches, SGD with momentum, one thread per rank. Each round runs, one
after the other: pipesim once per schedule (one MPI job each), torch with every
schedule (one job, benchmarks/torch_pipelining.py), so drift hits every
configuration alike.

Two modes (the --window of benchmarks/torch_pipelining.py):

  barrier (default): torch's iteration is barrier to barrier on rank 0 including
  zero_grad, with torch's default loss scaling; pipesim's is its runner's own
  window. Adds pipesim's single-rank baseline to each round. Writes
  reports/runner-vs-torch.md (the original comparison):

    python benchmarks/runner_vs_torch.py --rounds 3 --iterations 20

  pipesim: torch is timed in exactly pipesim's runner window (see
  torch_pipelining.py) with the same loss arithmetic; the order of pipesim and
  torch alternates between rounds. Writes reports/runner-vs-torch-schedules.md
  and .csv (each round's medians), with a ratio per round:

    python benchmarks/runner_vs_torch.py --window pipesim \\
        --schedules gpipe,1f1b,interleaved-1f1b,zb-h1,zb-v --rounds 3 --iterations 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHUNKS = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zb-h1": 2, "zb-v": 2}
PARTITION = {1: "32", 2: "16,16", 4: "8,8,8,8"}  # layers per piece, by piece count
TORCH_NAMES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved-1f1b": "ScheduleInterleaved1F1B",
               "zb-h1": "ScheduleInterleavedZeroBubble", "zb-v": "ScheduleZBVZeroBubble"}


def pipesim_run(stages: int, schedule: str, microbatches: int, args) -> list[float]:
    chunks = CHUNKS[schedule] if stages > 1 else 1
    command = [str(BIN / "pipesim"), "run", "--layers", "32", "--width", "512", "--stages", str(stages),
               "--partition", PARTITION[stages * chunks], "--schedule", schedule, "--microbatches", str(microbatches),
               "--batch-size", str(args.batch_size), "--iterations", str(args.iterations),
               "--warmup", str(args.warmup), "--json"]
    if chunks > 1:
        command += ["--chunks", str(chunks)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["iteration_times_s"]


def torch_run(schedules: list[str], args) -> dict[str, list[float]]:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    command = [str(BIN / "mpiexec"), "-n", "2", sys.executable, str(ROOT / "benchmarks/torch_pipelining.py"),
               "--schedules", ",".join(schedules), "--window", args.window, "--iterations", str(args.iterations),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--microbatches", "8"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return {row["schedule"]: row["iteration_times_s"] for row in map(json.loads, out.splitlines())}


def spread(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return f"{q[0] * 1e3:.1f}–{q[-1] * 1e3:.1f}"


def measure(args, schedules: list[str]) -> list[dict[str, list[float]]]:
    """Per round: configuration name -> that round's iteration times."""
    rounds = []
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
        times: dict[str, list[float]] = {}
        torch_first = args.window == "pipesim" and round_ % 2 == 1
        if torch_first:
            times.update({f"torch {s}": v for s, v in torch_run(schedules, args).items()})
        for schedule in schedules:
            times[f"pipesim {schedule}"] = pipesim_run(2, schedule, 8, args)
        if not torch_first:
            times.update({f"torch {s}": v for s, v in torch_run(schedules, args).items()})
        if args.window == "barrier":
            times["pipesim 1 rank"] = pipesim_run(1, "gpipe", 1, args)
        rounds.append(times)
    return rounds


def barrier_report(args, rounds) -> str:
    """The original report: pooled medians, torch timed barrier to barrier."""
    times: dict[str, list[float]] = {}
    for name in ([f"pipesim {s}" for s in args.schedules] + [f"torch {s}" for s in args.schedules]
                 + ["pipesim 1 rank"]):
        times[name] = [t for r in rounds for t in r[name]]
    med = {name: statistics.median(values) for name, values in times.items()}
    m = 8
    return "\n".join([
        "# pipesim runner vs torch.distributed.pipelining",
        "",
        (f"32 x Linear(512,512)+ReLU, batch {args.batch_size}, 2 ranks (one per core), 8 micro-batches, "
         "SGD momentum, 1 thread per rank, CPU (gloo for torch, Open MPI shared memory for pipesim). "
         f"{args.rounds} interleaved rounds x {args.iterations} measured iterations after {args.warmup} "
         "warm-up, per configuration."),
        "",
        (f"Command: `python benchmarks/runner_vs_torch.py --rounds {args.rounds} --iterations "
         f"{args.iterations} --batch-size {args.batch_size}`"),
        "",
        "| configuration | median (ms) | p10–p90 (ms) | n |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {med[name] * 1e3:.1f} | {spread(v)} | {len(v)} |" for name, v in times.items()),
        "",
        *(f"- {label}: pipesim / torch = **{med[f'pipesim {s}'] / med[f'torch {s}']:.3f}**"
          for s, label in (("gpipe", "GPipe"), ("1f1b", "1F1B")) if s in args.schedules),
        "- speedup of 2 stages over 1 rank: "
        + ", ".join(f"{s} {med['pipesim 1 rank'] / med[f'pipesim {s}']:.2f}x" for s in args.schedules)
        + f"; ideal 2m/(m+1) = {2 * m / (m + 1):.2f}x",
    ]) + "\n"


WINDOWS = """\
Timing windows (the same on both sides):

- pipesim (`pipesim run`, pipesim/runner/interpreter.py `StageWorker.step` and
  `timeline.compute_metrics`): before the window each rank builds the mini-batch, runs
  `zero_grad(set_to_none=False)` and posts its receives, then `MPI Barrier`. The window runs
  from the earliest start of any rank's first action (right after the barrier returns) to the
  latest end of any rank's `optimizer.step()` (after waiting for its sends). No closing barrier.
- torch (`benchmarks/torch_pipelining.py --window pipesim`): `zero_grad(set_to_none=False)`,
  then `dist.barrier()`; each rank reads `time.perf_counter()` when the barrier returns and when
  `optimizer.step()` returns (after `schedule.step(..., return_outputs=False)`); the iteration is
  the latest end minus the earliest start over the two ranks (one monotonic clock per host).
  Loss `mse_loss / m` with `scale_grads=False`, the same arithmetic as pipesim's runner.
- Both contain: all forward/backward compute, all messages, the optimizer step. Neither contains
  zero_grad or a closing barrier. Difference left: pipesim posts its receives (MPI Irecv) before
  the barrier; torch posts its irecvs inside `step()`, as its schedule goes.
"""


def schedules_report(args, rounds) -> tuple[str, list[list]]:
    """Per-round medians, per-round ratios and pooled medians; CSV rows of the raw medians."""
    rows = [["round", "impl", "schedule", "median_s", "p10_s", "p90_s", "n"]]
    for i, times in enumerate(rounds, 1):
        for name, values in times.items():
            q = statistics.quantiles(values, n=10, method="inclusive")
            rows.append([i, *name.split(" ", 1), f"{statistics.median(values):.6f}", f"{q[0]:.6f}",
                         f"{q[-1]:.6f}", len(values)])
    command = (f"python benchmarks/runner_vs_torch.py --window pipesim --schedules {','.join(args.schedules)} "
               f"--rounds {args.rounds} --iterations {args.iterations} --warmup {args.warmup} "
               f"--batch-size {args.batch_size}")
    lines = [
        "# pipesim runner vs torch.distributed.pipelining, torch's own schedules",
        "",
        (f"32 x Linear(512,512)+ReLU, batch {args.batch_size}, 2 ranks (one per core), 8 micro-batches, "
         "SGD(lr 0.01, momentum 0.9), 1 thread per rank, CPU (gloo for torch, Open MPI shared memory for "
         "pipesim). Multi-chunk schedules: 4 pieces of 8 layers, rank r holds pieces r and r+2 (loop: "
         "interleaved-1f1b, zb-h1) or r and 3−r (V: zb-v), on both sides. "
         f"{args.rounds} rounds x {args.iterations} measured iterations after {args.warmup} warm-up, per "
         "configuration; pipesim and torch alternate which goes first from round to round."),
        "",
        f"Command: `/work/shared/tools/wait-quiet 600 && {command}`",
        "",
        WINDOWS,
        ("| schedule (torch class) | pipesim median (ms) | p10–p90 | torch median (ms) | p10–p90 "
         "| pipesim / torch | per-round ratios |"),
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for s in args.schedules:
        ours = [t for r in rounds for t in r[f"pipesim {s}"]]
        theirs = [t for r in rounds for t in r[f"torch {s}"]]
        per_round = [statistics.median(r[f"pipesim {s}"]) / statistics.median(r[f"torch {s}"]) for r in rounds]
        lines.append(
            f"| {s} ({TORCH_NAMES[s]}) | {statistics.median(ours) * 1e3:.1f} | {spread(ours)} "
            f"| {statistics.median(theirs) * 1e3:.1f} | {spread(theirs)} "
            f"| **{statistics.median(ours) / statistics.median(theirs):.3f}** "
            f"| {', '.join(f'{r:.3f}' for r in per_round)} |")
    lines += [
        "",
        "The ratio is of the pooled medians; per-round ratios are of each round's medians (the spread).",
        "",
        "Each round's medians (ms; raw in reports/runner-vs-torch-schedules.csv):",
        "",
        "| round | " + " | ".join(f"pipesim {s} | torch {s}" for s in args.schedules) + " |",
        "|---:|" + "---:|" * (2 * len(args.schedules)),
        *(f"| {i} | " + " | ".join(f"{statistics.median(r[f'pipesim {s}']) * 1e3:.1f} | "
                                   f"{statistics.median(r[f'torch {s}']) * 1e3:.1f}" for s in args.schedules) + " |"
          for i, r in enumerate(rounds, 1)),
    ]
    return "\n".join(lines) + "\n", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schedules", default="gpipe,1f1b", help=f"comma-separated, of {', '.join(CHUNKS)}")
    parser.add_argument("--window", choices=["barrier", "pipesim"], default="barrier",
                        help="torch's timing window (see benchmarks/torch_pipelining.py)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    args.schedules = args.schedules.split(",")
    unknown = [s for s in args.schedules if s not in CHUNKS]
    if unknown:
        parser.error(f"unknown schedule(s) {', '.join(unknown)}; choose from {', '.join(CHUNKS)}")
    rounds = measure(args, args.schedules)
    (ROOT / "reports").mkdir(exist_ok=True)
    if args.window == "barrier":
        text = barrier_report(args, rounds)
        (ROOT / "reports/runner-vs-torch.md").write_text(text)
    else:
        text, rows = schedules_report(args, rounds)
        (ROOT / "reports/runner-vs-torch-schedules.md").write_text(text)
        with open(ROOT / "reports/runner-vs-torch-schedules.csv", "w", newline="") as handle:
            csv.writer(handle).writerows(rows)
    print(text)


if __name__ == "__main__":
    main()
