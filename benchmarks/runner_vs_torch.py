"""pipesim's runner against torch.distributed.pipelining, interleaved.

Same model (32 x Linear(512,512)+ReLU), same mini-batch, 2 ranks, 8
micro-batches, SGD with momentum, one thread per rank. Each round runs, one
after the other: pipesim gpipe, pipesim 1f1b, torch GPipe + 1F1B (one job),
and pipesim's single-rank baseline, so drift hits every configuration alike.
Writes reports/runner-vs-torch.md and prints it.

    python benchmarks/runner_vs_torch.py --rounds 3 --iterations 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def pipesim_run(stages: int, schedule: str, microbatches: int, args) -> list[float]:
    partition = "16,16" if stages == 2 else "32"
    command = [str(BIN / "pipesim"), "run", "--layers", "32", "--width", "512", "--stages", str(stages),
               "--partition", partition, "--schedule", schedule, "--microbatches", str(microbatches),
               "--batch-size", str(args.batch_size), "--iterations", str(args.iterations),
               "--warmup", str(args.warmup), "--json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["iteration_times_s"]


def torch_run(args) -> dict[str, list[float]]:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}
    command = [str(BIN / "mpiexec"), "-n", "2", sys.executable, str(ROOT / "benchmarks/torch_pipelining.py"),
               "--schedule", "both", "--iterations", str(args.iterations), "--warmup", str(args.warmup),
               "--batch-size", str(args.batch_size), "--microbatches", "8"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return {row["schedule"]: row["iteration_times_s"] for row in map(json.loads, out.splitlines())}


def spread(times: list[float]) -> str:
    q = statistics.quantiles(times, n=10, method="inclusive")
    return f"{q[0] * 1e3:.1f}–{q[-1] * 1e3:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    args = parser.parse_args()
    times: dict[str, list[float]] = {}
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for schedule in ("gpipe", "1f1b"):
            times.setdefault(f"pipesim {schedule}", []).extend(pipesim_run(2, schedule, 8, args))
        for schedule, values in torch_run(args).items():
            times.setdefault(f"torch {schedule}", []).extend(values)
        times.setdefault("pipesim 1 rank", []).extend(pipesim_run(1, "gpipe", 1, args))
    med = {name: statistics.median(values) for name, values in times.items()}
    m = 8
    lines = [
        "# pipesim runner vs torch.distributed.pipelining",
        "",
        f"32 x Linear(512,512)+ReLU, batch {args.batch_size}, 2 ranks (one per core), 8 micro-batches, "
        f"SGD momentum, 1 thread per rank, CPU (gloo for torch, Open MPI shared memory for pipesim). "
        f"{args.rounds} interleaved rounds x {args.iterations} measured iterations after {args.warmup} "
        "warm-up, per configuration.",
        "",
        f"Command: `python benchmarks/runner_vs_torch.py --rounds {args.rounds} --iterations "
        f"{args.iterations} --batch-size {args.batch_size}`",
        "",
        "| configuration | median (ms) | p10–p90 (ms) | n |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {med[name] * 1e3:.1f} | {spread(v)} | {len(v)} |" for name, v in times.items()),
        "",
        f"- GPipe: pipesim / torch = **{med['pipesim gpipe'] / med['torch gpipe']:.3f}**",
        f"- 1F1B: pipesim / torch = **{med['pipesim 1f1b'] / med['torch 1f1b']:.3f}**",
        f"- speedup of 2 stages over 1 rank: gpipe {med['pipesim 1 rank'] / med['pipesim gpipe']:.2f}x, "
        f"1f1b {med['pipesim 1 rank'] / med['pipesim 1f1b']:.2f}x; ideal 2m/(m+1) = {2 * m / (m + 1):.2f}x",
    ]
    text = "\n".join(lines) + "\n"
    (ROOT / "reports").mkdir(exist_ok=True)
    (ROOT / "reports/runner-vs-torch.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
