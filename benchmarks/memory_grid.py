"""The step ledger (pipesim/ledger.py) against memory measured independently, for every case
of the given grids, without the timed rounds of `pipesim validate` (memory does not depend
on timing, so this runs on a machine too noisy to time on).

Per case, one job of its own (runner/memory_probe.py, as validate's memory section): per
rank the RSS high-water over one step less the resident size before it, and the peak of
torch's profiler's allocation events on the next step; against the ledger's peak.

Usage: python benchmarks/memory_grid.py validation/models.toml [...] --out reports/memory-ledger
Writes OUT.csv (one row per case and rank) and OUT.md.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipesim.costs import ProfileCostModel
from pipesim.grid import load_grid, plan_case
from pipesim.profile import load_profile
from pipesim.runner.results import measure_memory
from pipesim.validate import predicted_step_bytes

MIB = 2**20
SMALL = 1 * MIB  # below this the RSS is page- and allocator-bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("grids", nargs="+")
    parser.add_argument("--profile", default="calibration/reference-2core.json",
                        help="only to resolve 'balanced' partitions, as validate does")
    parser.add_argument("--out", default="reports/memory-ledger")
    args = parser.parse_args()
    costs = ProfileCostModel(load_profile(args.profile))
    rows = []
    for grid_file in args.grids:
        grid = load_grid(grid_file)
        for index, case in enumerate(grid.cases):
            plan = plan_case(case, costs)
            measured = measure_memory(plan, lambda _: None, profile_memory=True) or ()
            for rank, (predicted, m) in enumerate(zip(predicted_step_bytes(plan), measured)):
                rows.append({"grid": Path(grid_file).stem, "case": case.label, "rank": rank, "ledger_bytes": predicted,
                             "rss_increase_bytes": m.rss_increase_bytes, "profiler_peak_bytes": m.profiler_peak_bytes})
            print(f"[{Path(grid_file).stem} {index + 1}/{len(grid.cases)}] {case.label}", flush=True)
    out = Path(args.out)
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_markdown(rows, out.with_suffix(".md"), " ".join(sys.argv))


def error(row: dict, against: str) -> float | None:
    return row["ledger_bytes"] / row[against] - 1 if row[against] else None


def write_markdown(rows: list[dict], path: Path, command: str) -> None:
    lines = [f"# The step ledger against memory measured independently ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})",
             "", f"Command: `python {command}`", "",
             ("Per rank, static bytes (parameters, gradients, optimizer state) aside: the ledger's peak "
              "(pipesim/ledger.py) against the RSS high-water over one step less the resident size before "
              "it, and against the peak of torch's profiler's allocation events (runner/memory_probe.py)."),
             "", "## Summary", "", ("| grid | rank-cases | vs RSS: mean / max abs error | same, ranks >= 1 MiB "
                                    "| vs torch's allocations: mean / max abs error |"), "|---|---:|---:|---:|---:|"]
    for grid in dict.fromkeys(r["grid"] for r in rows):
        mine = [r for r in rows if r["grid"] == grid]
        rss = [abs(e) for r in mine if (e := error(r, "rss_increase_bytes")) is not None]
        big = [abs(e) for r in mine if r["ledger_bytes"] >= SMALL and (e := error(r, "rss_increase_bytes")) is not None]
        prof = [abs(e) for r in mine if (e := error(r, "profiler_peak_bytes")) is not None]
        lines.append(f"| {grid} | {len(mine)} | {statistics.mean(rss):.2%} / {max(rss):.2%} | "
                     f"{statistics.mean(big):.2%} / {max(big):.2%} ({len(big)}) | "
                     f"{statistics.mean(prof):.2%} / {max(prof):.2%} |")
    lines += ["", "## Cases", "", "| grid | case | rank | ledger (MiB) | RSS increase (MiB) | error | torch profiler (MiB) | error |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        e_rss, e_prof = error(r, "rss_increase_bytes"), error(r, "profiler_peak_bytes")
        lines.append(f"| {r['grid']} | {r['case']} | {r['rank']} | {r['ledger_bytes'] / MIB:.2f} | "
                     f"{(r['rss_increase_bytes'] or 0) / MIB:.2f} | {'' if e_rss is None else f'{e_rss:+.1%}'} | "
                     f"{(r['profiler_peak_bytes'] or 0) / MIB:.2f} | {'' if e_prof is None else f'{e_prof:+.1%}'} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
