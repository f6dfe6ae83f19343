"""Re-predict a validated grid's measured runs (its CSV) with the all-reduce priced three ways,
all else equal: by the profile's measured sizes (what the cost model does where they apply),
by the profile's ring law alone, and, given other measured all-reduces (e.g. blocking
MPI_Allreduce from benchmarks/allreduce_law.py --raw), by the law fitted on those.

Usage: python benchmarks/allreduce_ab.py GRID PROFILE VALIDATION_CSV [RAW_JSON]
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipesim.collectives import fit_allreduce
from pipesim.costs import ProfileCostModel
from pipesim.grid import load_grid, plan_case
from pipesim.predict import predict
from pipesim.profile import load_profile


def main(grid_file: str, profile_file: str, csv_file: str, raw_file: str | None = None) -> None:
    profile = load_profile(profile_file)
    variants = {"measured sizes": profile, "law": dataclasses.replace(profile, allreduce_sizes={})}
    if raw_file:
        raw = json.loads(Path(raw_file).read_text())
        sizes = sorted(int(n) for n in raw["times"])
        medians = [statistics.median([t for r in raw["times"][str(n)] for t in r]) for n in sizes]
        other = fit_allreduce(sizes, medians, raw["ranks"])
        print(f"profile's law: {profile.collectives['intra_node']}; other law: {other}")
        variants["other law"] = dataclasses.replace(profile, allreduce_sizes={},
                                                    collectives={**profile.collectives, "intra_node": other})
    with Path(csv_file).open() as f:
        measured = {r["case"]: float(r["measured_s"]) for r in csv.DictReader(f)}
    for case in load_grid(grid_file).cases:
        m = measured[case.label]
        cells = []
        for name, variant in variants.items():
            costs = ProfileCostModel(variant)
            t = predict(plan_case(case, costs), costs, variant.name).metrics.iteration_time_s
            cells.append(f"{name} {t * 1e3:8.2f} ms ({t / m - 1:+.1%})")
        print(f"{case.label:45s} measured {m * 1e3:8.2f} ms   " + "   ".join(cells))


if __name__ == "__main__":
    main(*sys.argv[1:5])
