"""Predict torch.distributed.pipelining, a runtime nobody here wrote (issue 16).

1. `pipesim calibrate --transport gloo` on this machine (compute, MPI links, and
   gloo's links and per-action overhead from torch's own 1F1B on the small
   overhead probe: width 256, 4 layers per stage, micro-batches of 4).
2. torch.distributed.pipelining runs of fc32x512, batch 512, 8 micro-batches,
   on 2 ranks (benchmarks/torch_pipelining.py, pipesim's timing window), each
   schedule once per round, rounds interleaved.
3. `pipesim predict --transport gloo` of each (and `--transport mpi`, for the
   difference the transport makes); the error against each round's median.

Writes reports/torch-predicted.md and .csv:

    python benchmarks/torch_predicted.py --rounds 3 --iterations 20
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from runner_vs_torch import BIN, CHUNKS, PARTITION, ROOT, spread, torch_run

SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v")


def predict_s(schedule: str, transport: str, profile: Path, args) -> float:
    chunks = CHUNKS[schedule]
    command = [str(BIN / "pipesim"), "predict", "--layers", "32", "--width", "512", "--stages", "2",
               "--chunks", str(chunks), "--partition", PARTITION[2 * chunks], "--schedule", schedule,
               "--microbatches", "8", "--batch-size", str(args.batch_size), "--profile", str(profile),
               "--transport", transport, "--json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["iteration_time_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--calibrate", default="--widths 256,512 --microbatch-sizes 4,16,32,64,128",
                   help="calibrate's own options (the cases use width 512 at micro-batches of 64; "
                        "the probe width 256 at 4)")
    p.add_argument("--profile", help="use this profile instead of calibrating now (it must have gloo costs)")
    p.add_argument("--out", default=str(ROOT / "reports" / "torch-predicted"))
    args = p.parse_args()
    args.window = "pipesim"
    profile = Path(args.profile or f"{args.out}-profile.json")
    if not args.profile:
        command = [str(BIN / "pipesim"), "calibrate", "--transport", "gloo", *args.calibrate.split(),
                   "--out", str(profile)]
        print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, stdout=sys.stderr)
    rounds = []
    for r in range(args.rounds):
        order = list(SCHEDULES) if r % 2 == 0 else list(reversed(SCHEDULES))
        print(f"round {r + 1}/{args.rounds}: torch {', '.join(order)}", file=sys.stderr, flush=True)
        rounds.append(torch_run(order, args))
    rows = []
    for schedule in SCHEDULES:
        times = [t for rnd in rounds for t in rnd[schedule]]
        medians = [statistics.median(rnd[schedule]) for rnd in rounds]
        gloo, mpi = (predict_s(schedule, t, profile, args) for t in ("gloo", "mpi"))
        measured = statistics.median(times)
        rows.append({"schedule": schedule, "measured_ms": measured * 1e3, "spread": spread(times),
                     "round_medians_ms": " / ".join(f"{m * 1e3:.1f}" for m in medians),
                     "noise": (max(medians) - min(medians)) / min(medians),
                     "gloo_ms": gloo * 1e3, "gloo_error": gloo / measured - 1,
                     "mpi_ms": mpi * 1e3, "mpi_error": mpi / measured - 1})
    write(rows, profile, args)


def write(rows: list[dict], profile: Path, args) -> None:
    out = Path(args.out)
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    data = json.loads(profile.read_text())
    gloo = data["transports"]["gloo"]
    mape = statistics.mean(abs(r["gloo_error"]) for r in rows)
    lines = [
        "# torch.distributed.pipelining, predicted",
        "",
        f"fc32x512, batch {args.batch_size}, 8 micro-batches, 2 ranks (one per core), SGD momentum, CPU, gloo. "
        f"torch measured in pipesim's timing window ({args.rounds} interleaved rounds x {args.iterations} "
        f"iterations after {args.warmup} warm-up); predicted by `pipesim predict --transport gloo` with profile "
        f"`{profile.name}`, calibrated on this machine just before by `{data['metadata'].get('command', '?')}`.",
        "",
        f"gloo, as calibrated: latency {gloo['links']['intra_node']['latency_s'] * 1e6:.1f} us, bandwidth "
        f"{gloo['links']['intra_node']['bandwidth_Bps'] / 1e9:.2f} GB/s, per-action overhead "
        f"{gloo['action_overhead_s'] * 1e6:.1f} us (MPI: latency {data['links']['intra_node']['latency_s'] * 1e6:.1f} us, "
        f"{data['links']['intra_node']['bandwidth_Bps'] / 1e9:.2f} GB/s, {data['action_overhead_s'] * 1e6:.1f} us). "
        f"The overhead is the value that makes the simulated step of torch's 1F1B on the probe pipeline "
        f"({gloo['metadata']['probe']}) equal its measured median ({gloo['metadata']['probe_step_s_median'] * 1e3:.2f} ms); "
        "none of the cases below is that probe.",
        "",
        "Command: `python benchmarks/torch_predicted.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"**MAPE with the gloo transport: {mape:.1%}** (max {max(abs(r['gloo_error']) for r in rows):.1%}); "
        f"with MPI's links and overhead: {statistics.mean(abs(r['mpi_error']) for r in rows):.1%}.",
        "",
        "| schedule | measured (ms) | p10–p90 | round medians (ms) | noise | predicted, gloo (ms) | error "
        "| predicted, MPI (ms) | error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['schedule']} | {r['measured_ms']:.1f} | {r['spread']} | {r['round_medians_ms']} | "
              f"{r['noise']:.1%} | {r['gloo_ms']:.1f} | {r['gloo_error']:+.1%} | {r['mpi_ms']:.1f} | "
              f"{r['mpi_error']:+.1%} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
