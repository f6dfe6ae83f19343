"""Issue 15's evidence page from a data-parallel validation run: with 2 ranks, a 2-stage
pipeline (p=2, D=1) against 2 replicas (p=1, D=2), per model, measured and predicted.

    .venv/bin/python benchmarks/dataparallel_evidence.py \
        [--csv reports/validation-dataparallel.csv] [--profile calibration/reference-2core-allreduce.json]

Reads the measured medians from the validation CSV (written by
`pipesim validate --grid validation/dataparallel.toml`), predicts every case again with
the profile the validation used (the shipped one plus the measured all-reduce) and with
the shipped profile alone (its all-reduce falls back to the point-to-point link), and
writes reports/dataparallel.md: each case's error, and per model and micro-batch count
whether the predicted winner (pipeline or replicas) is the measured one. Nothing is timed.
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from pipesim.costs import ProfileCostModel
    from pipesim.grid import load_grid, plan_case
    from pipesim.predict import predict
    from pipesim.profile import load_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", default=str(REPO / "reports/validation-dataparallel.csv"))
    parser.add_argument("--grid", default=str(REPO / "validation/dataparallel.toml"))
    parser.add_argument("--profile", default=str(REPO / "calibration/reference-2core-allreduce.json"))
    parser.add_argument("--out", default=str(REPO / "reports/dataparallel.md"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    measured = {row["case"]: row for row in csv.DictReader(open(args.csv))}
    grid = load_grid(args.grid)
    profiles = {"measured all-reduce": load_profile(args.profile), "point-to-point fallback": load_profile("default")}
    rows, by_key = [], {}
    for case in grid.cases:
        if case.is_baseline or case.label not in measured:
            continue
        row = measured[case.label]
        m = float(row["measured_s"])
        predicted = {}
        for name, profile in profiles.items():
            costs = ProfileCostModel(profile)
            p = predict(plan_case(case, costs), costs, profile.name)
            predicted[name] = (p.metrics.iteration_time_s, p.exposed_allreduce_s)
        rows.append((case, m, row["p10_s"], row["p90_s"], predicted))
        by_key.setdefault((case.model_name, case.microbatches), []).append((case, m, predicted))
    lines = ["# Data parallelism against pipelining on 2 ranks (issue 15)", "",
             f"Measured: `{args.csv}` (`pipesim validate --grid validation/dataparallel.toml --profile "
             f"{Path(args.profile).relative_to(REPO) if Path(args.profile).is_relative_to(REPO) else args.profile}`; "
             "medians of 20 iterations per round, rounds interleaved, median over rounds). Predicted with "
             "the profile the validation used (the shipped profile plus the all-reduce measured by "
             "`benchmarks/allreduce_law.py`), and with the shipped profile alone, whose all-reduce falls "
             "back to its point-to-point link.", "",
             f"Command: `python benchmarks/dataparallel_evidence.py {' '.join(sys.argv[1:])}`", "",
             "| case | measured | p10–p90 | predicted (measured all-reduce) | error | exposed all-reduce | "
             "predicted (point-to-point) | error |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case, m, p10, p90, predicted in rows:
        (a, exposed), (b, _) = predicted["measured all-reduce"], predicted["point-to-point fallback"]
        lines.append(f"| {case.label} | {m * 1e3:.1f} ms | {float(p10) * 1e3:.1f}–{float(p90) * 1e3:.1f} ms | "
                     f"{a * 1e3:.1f} ms | {a / m - 1:+.1%} | {exposed * 1e3:.2f} ms | {b * 1e3:.1f} ms | "
                     f"{b / m - 1:+.1%} |")
    lines += ["", "## Pipeline (p=2, D=1) or replicas (p=1, D=2)?", "",
              "Each shape at its best micro-batch count (measured best and predicted best chosen separately), "
              "and the two shapes at the one micro-batch count both ran.", "",
              "| model | comparison | measured winner (by) | predicted winner, measured all-reduce (by) | "
              "predicted winner, point-to-point (by) | match |", "|---|---|---|---|---|---|"]
    models = sorted({case.model_name for case, *_ in rows})
    for model in models:
        mine = [(c, m, pr) for c, m, _, _, pr in rows if c.model_name == model]
        shapes = sorted({(c.stages, c.data_parallel) for c, _, _ in mine})
        if len(shapes) != 2:
            continue
        def best(shape, key):
            return min((x for x in mine if (x[0].stages, x[0].data_parallel) == shape), key=key)
        measured_best = [best(s, lambda x: x[1]) for s in shapes]
        lines.append(_winner_row(model, "best m of each", measured_best,
                                 {k: [best(s, lambda x, k=k: x[2][k][0]) for s in shapes] for k in profiles}))
        for mb in sorted({c.microbatches for c, _, _ in mine}):
            pair = [x for x in mine if x[0].microbatches == mb]
            if len({(c.stages, c.data_parallel) for c, _, _ in pair}) == 2:
                lines.append(_winner_row(model, f"m={mb}", pair, {k: pair for k in profiles}))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _winner_row(model: str, what: str, measured: list, predicted: dict) -> str:
    def name(case) -> str:
        return f"p{case.stages} D{case.data_parallel}"

    def pick(pair, value):
        fast, slow = sorted(pair, key=value)
        return fast[0], value(slow) / value(fast) - 1

    winner, by = pick(measured, lambda x: x[1])
    cells, matches = [], []
    for key, pair in predicted.items():
        case, margin = pick(pair, lambda x, key=key: x[2][key][0])
        cells.append(f"{name(case)} ({margin:.0%})")
        matches.append("yes" if name(case) == name(winner) else "no")
    return f"| {model} | {what} | {name(winner)} ({by:.0%}) | {cells[0]} | {cells[1]} | {' / '.join(matches)} |"


if __name__ == "__main__":
    main()
