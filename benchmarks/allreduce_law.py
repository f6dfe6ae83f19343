"""The ring all-reduce law against measured MPI_Allreduce, 4 KiB to 64 MiB, D = 2 ranks here.

    /work/shared/tools/wait-quiet 600 && .venv/bin/python benchmarks/allreduce_law.py

launches ``mpiexec -n 2`` on itself; each rank times in-place float32 Allreduce(SUM)
with runner/collbench.py's code, rounds interleaved over the sizes (a round: every
size once, with that size's repeats). Then, in the parent:

- the law fitted (collectives.fit_allreduce) on the odd rounds, its error per size on
  the even rounds (held out: not the data it was fitted on);
- the law with the shipped profile's point-to-point link (what a profile without a
  measured all-reduce predicts), its error per size on all rounds;
- the time one calibration pass of the all-reduce takes (every size once, with
  calibrate's repeats), which must stay small (<= 20 s);

and writes reports/allreduce-law.md, plus, with --profile-out, the shipped profile
with the all-reduce fitted on every round added (version 3): what the data-parallel
validation predicts with.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def inner(out: str, rounds: int, repeats: int) -> None:
    from mpi4py import MPI

    from pipesim.runner.collbench import ALLREDUCE_SIZES, repeats_for, time_allreduce

    comm = MPI.COMM_WORLD
    times: dict[int, list[list[float]]] = {n: [] for n in ALLREDUCE_SIZES}
    for n in ALLREDUCE_SIZES:  # warm every size once
        time_allreduce(comm, n, 1, blocking=True)
    start = time.perf_counter()
    for n in ALLREDUCE_SIZES:  # one calibration pass, as calibrate runs it (pingpong_repeats = 20)
        time_allreduce(comm, n, repeats_for(n, 20), blocking=True)
    calibration_s = time.perf_counter() - start
    for _ in range(rounds):
        for n in ALLREDUCE_SIZES:
            times[n].append(time_allreduce(comm, n, repeats_for(n, repeats), warmup=1, blocking=True))
    if comm.Get_rank() == 0:
        Path(out).write_text(json.dumps({"ranks": comm.Get_size(), "calibration_pass_s": calibration_s,
                                         "times": {str(n): t for n, t in times.items()},
                                         "mpi": MPI.Get_library_version().split(",")[0].strip()}))


def launch(rounds: int, repeats: int) -> dict:
    from pipesim.runner.launch import find_mpiexec

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        command = [find_mpiexec(), "-n", "2"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        command += [sys.executable, __file__, "--inner", str(out), "--rounds", str(rounds), "--repeats", str(repeats)]
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        return json.loads(out.read_text())


def report(data: dict, profile_out: str | None, command: str) -> str:
    from pipesim.collectives import fit_allreduce, ring_allreduce_s
    from pipesim.profile import load_profile

    sizes = sorted(int(n) for n in data["times"])
    group = data["ranks"]
    rounds = {n: data["times"][str(n)] for n in sizes}
    median = {n: statistics.median(t for r in rounds[n] for t in r) for n in sizes}
    odd = {n: statistics.median(t for r in rounds[n][0::2] for t in r) for n in sizes}
    even = {n: statistics.median(t for r in rounds[n][1::2] for t in r) for n in sizes}
    fit_half = fit_allreduce(sizes, [odd[n] for n in sizes], group)
    fit_all = fit_allreduce(sizes, [median[n] for n in sizes], group)
    shipped = load_profile()
    p2p = shipped.intra_node
    lines = [
        "# The ring all-reduce law against measured MPI_Allreduce (issue 15)", "",
        f"Command: `{command}`", "",
        f"{group} ranks on this machine ({os.cpu_count()} cores), {data['mpi']}; in-place float32 "
        f"Allreduce(SUM), each time the slowest rank's; {len(rounds[sizes[0]])} interleaved rounds "
        "(every size once per round).", "",
        "Law: `t = 2(D-1)·α + 2(D-1)/D · S/β` (the reduction's additions folded into β).", "",
        f"- fitted on the odd rounds (β: least squares on the relative error of the sizes >= 1 MiB; α: from "
        f"the smallest size): α = {fit_half.latency_s * 1e6:.2f} µs, "
        f"β = {fit_half.bandwidth_Bps / 1e9:.3f} GB/s; its error below is on the even rounds (held out)",
        f"- fitted on every round (written to the profile the data-parallel validation uses): "
        f"α = {fit_all.latency_s * 1e6:.2f} µs, β = {fit_all.bandwidth_Bps / 1e9:.3f} GB/s",
        f"- the shipped profile's point-to-point link ({shipped.name}): latency {p2p.latency_s * 1e6:.2f} µs, "
        f"bandwidth {p2p.bandwidth_Bps / 1e9:.3f} GB/s: the law a profile without a measured all-reduce uses",
        f"- one calibration pass of the all-reduce (8 sizes, calibrate's repeats): "
        f"{data['calibration_pass_s']:.1f} s", "",
        "| size | measured median (even rounds) | p10–p90 (all) | fitted law | error | point-to-point law | error |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    errors_fit, errors_p2p = [], []
    for n in sizes:
        flat = sorted(t for r in rounds[n] for t in r)
        p10, p90 = flat[len(flat) // 10], flat[(9 * len(flat)) // 10]
        law = ring_allreduce_s(n, group, fit_half)
        point = ring_allreduce_s(n, group, p2p)
        e1, e2 = law / even[n] - 1, point / median[n] - 1
        errors_fit.append(abs(e1))
        errors_p2p.append(abs(e2))
        lines.append(f"| {_size(n)} | {even[n] * 1e3:.3f} ms | {p10 * 1e3:.3f}–{p90 * 1e3:.3f} ms | "
                     f"{law * 1e3:.3f} ms | {e1:+.1%} | {point * 1e3:.3f} ms | {e2:+.1%} |")
    lines += ["", f"Fitted law: mean absolute error {statistics.mean(errors_fit):.1%}, max {max(errors_fit):.1%} "
              f"(held-out rounds). Point-to-point law: mean {statistics.mean(errors_p2p):.1%}, "
              f"max {max(errors_p2p):.1%}."]
    if profile_out:
        profile = json.loads((REPO / "pipesim/data/default.json").read_text())
        profile.update(version=3, name=Path(profile_out).stem,
                       description=profile.get("description", "") + " All-reduce added by "
                       "benchmarks/allreduce_law.py (fitted on every round of its measurement).")
        profile["collectives"] = {"intra_node": {"latency_s": fit_all.latency_s,
                                                 "bandwidth_Bps": fit_all.bandwidth_Bps}}
        profile.setdefault("samples", {})["allreduce"] = {"group_size": group, "sizes": sizes,
                                                          "median_s": [median[n] for n in sizes]}
        Path(profile_out).write_text(json.dumps(profile, indent=1) + "\n")
        lines += ["", f"Profile with the fitted all-reduce: `{profile_out}`."]
    return "\n".join(lines) + "\n"


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(REPO / "reports/allreduce-law.md"))
    parser.add_argument("--raw", default=str(REPO / "reports/allreduce-law.json"))
    parser.add_argument("--profile-out", default=None)
    parser.add_argument("--from-raw", action="store_true", help="re-render --raw's measurement, measure nothing")
    args = parser.parse_args()
    if args.inner:
        inner(args.inner, args.rounds, args.repeats)
        return
    if args.from_raw:
        data = json.loads(Path(args.raw).read_text())
    else:
        data = launch(args.rounds, args.repeats)
        data["command"] = "python benchmarks/allreduce_law.py " + " ".join(sys.argv[1:])
        Path(args.raw).write_text(json.dumps(data) + "\n")
    text = report(data, args.profile_out, "python benchmarks/allreduce_law.py " + " ".join(sys.argv[1:]))
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
