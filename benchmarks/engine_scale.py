"""How fast and how big the simulator runs at scale: actions per second, wall time and
peak RSS for 64 x 1024, 128 x 1024 and 256 x 4096 (stages x micro-batches), for every
schedule and each engine path, each case in its own process (so each peak RSS is its own).

    python benchmarks/engine_scale.py                 # the full table (several minutes)
    python benchmarks/engine_scale.py --sizes 8x64    # a quick look
    python benchmarks/engine_scale.py --before DIR    # also time `pipesim predict` from an
                                                      # older checkout DIR (64 x 1024, 1f1b)

An action is a compute action (F, B, I or W). One layer per piece (fc, width 512),
micro-batches of 4 samples, the shipped profile. "wall" covers building and
validating the schedule, resolving costs, simulating and computing the metrics
(not starting Python or importing); `predict` rows time the whole command
in-process, imports included.
Paths: "fast" is the longest path over the action graph (exact where no two
transfers overlap on a link; "not exact" otherwise), "des" the event simulation.
Nothing is asserted: these are measurements to report (reports/engine-scale.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = ((64, 1024), (128, 1024), (256, 4096))
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v", "dualpipev")
PATHS = ("fast", "des")

_CASE = r"""
import json, resource, sys, time
name, p, m, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import load_profile
from pipesim.schedule import build_schedule
from pipesim.timeline import compute_metrics
started = time.perf_counter()
schedule = build_schedule(name, p, m)
built = time.perf_counter()
actions = sum(len(r) for r in schedule.ranks)
costs = ProfileCostModel(load_profile("default"))
model = fc(schedule.num_pieces, 512)
timeline = simulate(schedule, Partition.from_counts([1] * schedule.num_pieces), model, costs, 4, path=path)
result = {"actions": actions, "exact": timeline is not None}
if timeline is not None:
    result["iteration_time_s"] = compute_metrics(timeline).iteration_time_s
done = time.perf_counter()
result.update(wall_s=done - started, simulate_s=done - built)
result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(result))
"""

_PREDICT = r"""
import contextlib, io, json, resource, sys, time, warnings
warnings.simplefilter("ignore")
started = time.perf_counter()
from pipesim.cli import main
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
data = json.loads(out.getvalue()) if code == 0 else {}
print(json.dumps({"code": code, "wall_s": time.perf_counter() - started,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "engine_path": data.get("engine_path", "(old engine)"),
                  "iteration_time_s": data.get("iteration_time_s")}))
"""


def run(script: str, args: list[str], path: str, timeout_s: float) -> dict:
    env = {**os.environ, "PYTHONPATH": path}
    try:
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                              env=env, timeout=timeout_s, cwd=path, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout_s:.0f} s"}
    if done.returncode:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:80]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def case_row(name: str, p: int, m: int, path: str, timeout_s: float) -> str:
    r = run(_CASE, [name, str(p), str(m), path], REPO, timeout_s)
    head = f"| {name} | {p} x {m} | {path} |"
    if "error" in r:
        return f"{head} {r['error']} | | | | |"
    if not r["exact"]:
        return f"{head} not exact: transfers overlap, the event simulation answers | | | | {r['actions']:,} |"
    return (f"{head} {r['actions'] / r['wall_s']:,.0f} | {r['actions'] / r['simulate_s']:,.0f} | "
            f"{r['wall_s']:.2f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | {r['actions']:,} |")


def predict_row(label: str, p: int, m: int, checkout: str, timeout_s: float, extra: tuple = ()) -> str:
    argv = ["predict", "--layers", str(p), "--stages", str(p), "--microbatches", str(m),
            "--batch-size", str(4 * m), "--json", *extra]
    r = run(_PREDICT, argv, checkout, timeout_s)
    head = f"| {label} | {p} x {m} |"
    if "error" in r or r.get("code"):
        return f"{head} {r.get('error', 'exit ' + str(r.get('code')))} | | | |"
    return (f"{head} {r['engine_path']} | {r['wall_s']:.2f} s | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
            f"{r['iteration_time_s']:.6f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(f"{p}x{m}" for p, m in SIZES),
                        help="stages x micro-batches, comma-separated (default: 64x1024,128x1024,256x4096)")
    parser.add_argument("--schedules", default=",".join(SCHEDULES))
    parser.add_argument("--before", metavar="DIR", help="an older checkout to time `pipesim predict` from")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per case (default: 180)")
    args = parser.parse_args()
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    started = time.perf_counter()
    print("`pipesim predict --layers P --stages P --microbatches M --batch-size 4M --json` (1f1b), whole command:\n")
    print("| code | stages x micro-batches | path | wall | peak RSS | iteration time |")
    print("|---|---|---|---:|---:|---:|")
    if args.before:
        print(predict_row(f"before ({os.path.basename(os.path.abspath(args.before))})", *sizes[0], args.before,
                          args.timeout), flush=True)
    for p, m in sizes:
        print(predict_row("this branch", p, m, REPO, args.timeout), flush=True)
    for p, m in sizes:  # a link so slow that transfers queue: the fast path is not exact
        print(predict_row("this branch, --link 0-1:1e6Bps", p, m, REPO, args.timeout, ("--link", "0-1:1e6Bps")),
              flush=True)
    print("\nThe engine per schedule and path. actions/s: over the wall time (build and validate the "
          "schedule, resolve costs, simulate, metrics); simulation only: the same without building "
          "and validating the schedule (the fast path's topological order is made while validating):\n")
    print("| schedule | stages x micro-batches | path | actions/s | actions/s, simulation only | wall | "
          "peak RSS | actions |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for p, m in sizes:
        for name in args.schedules.split(","):
            for path in PATHS:
                print(case_row(name, p, m, path, args.timeout), flush=True)
    print(f"\n(benchmark ran {time.perf_counter() - started:.0f} s; {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
