"""Re-predict a validated grid with the profile's all-reduce law swapped for one fitted on
other measured all-reduces (e.g. blocking MPI_Allreduce from benchmarks/allreduce_law.py --raw),
against the same measured runs (the validation's CSV): what the all-reduce's calibration alone
changes.

Usage: python benchmarks/allreduce_ab.py GRID PROFILE VALIDATION_CSV RAW_JSON
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipesim.collectives import fit_allreduce
from pipesim.costs import ProfileCostModel
from pipesim.grid import load_grid, plan_case
from pipesim.predict import predict
from pipesim.profile import load_profile


def main(grid_file: str, profile_file: str, csv_file: str, raw_file: str) -> None:
    raw = json.loads(Path(raw_file).read_text())
    sizes = sorted(int(n) for n in raw["times"])
    medians = [statistics.median([t for r in raw["times"][str(n)] for t in r]) for n in sizes]
    other = fit_allreduce(sizes, medians, raw["ranks"])
    data = json.loads(Path(profile_file).read_text())
    print(f"profile's all-reduce law: {data['collectives']['intra_node']}; other: {other}")
    data["collectives"]["intra_node"] = {"latency_s": other.latency_s, "bandwidth_Bps": other.bandwidth_Bps}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(data, f)
        f.flush()
        profiles = (load_profile(profile_file), load_profile(f.name))
    with Path(csv_file).open() as f:
        measured = {r["case"]: float(r["measured_s"]) for r in csv.DictReader(f)}
    for case in load_grid(grid_file).cases:
        m = measured[case.label]
        cells = []
        for profile in profiles:
            costs = ProfileCostModel(profile)
            t = predict(plan_case(case, costs), costs, profile.name).metrics.iteration_time_s
            cells.append(f"{t * 1e3:8.2f} ms ({t / m - 1:+.1%})")
        print(f"{case.label:45s} measured {m * 1e3:8.2f} ms   profile's {cells[0]}   other {cells[1]}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
