"""Step time against the stage count P for N = 8, 16 and 64 ranks (P x D = N): the figure of
issue 15's `optimize --ranks` (predictions only; nothing is timed).

    .venv/bin/python benchmarks/shapes_figure.py [--profile calibration/reference-2core-allreduce.json]

For each N and each P dividing N (P <= layers), the best over D = N/P replicas, every
micro-batch count dividing B/D, schedules gpipe and 1f1b, with the balanced cut
(shapes.search_shapes without the partition refinement). Ranks sit 8 to a node
(stage-major placement: a replica's pipeline inside a node while P <= 8, the
all-reduce groups across nodes). Inter-node links are a stated what-if, since only one
node can be measured here: 10 Gb/s Ethernet, latency 5 us, bandwidth 1.25 GB/s, for
point-to-point messages and the all-reduce alike. Writes reports/dataparallel-shapes.png
and .md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RANKS = (8, 16, 64)
RANKS_PER_NODE = 8
INTER_NODE_LATENCY_S, INTER_NODE_BANDWIDTH_BPS = 5e-6, 1.25e9


def main() -> None:
    import warnings

    from pipesim.costs import ProfileCostModel
    from pipesim.model import fc
    from pipesim.profile import Link, load_profile
    from pipesim.shapes import search_shapes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--out", default=str(REPO / "reports"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # extrapolated micro-batch sizes are expected at D = 64
    profile = load_profile(args.profile)
    inter = Link(INTER_NODE_LATENCY_S, INTER_NODE_BANDWIDTH_BPS)
    profile = replace(profile, inter_node=inter, collectives={**profile.collectives, "inter_node": inter})
    costs = ProfileCostModel(profile, ranks_per_node=RANKS_PER_NODE)
    model = fc(32, 512)
    rows, series = [], {}
    for n in RANKS:
        search = search_shapes(model, costs, profile.name, n, args.batch_size, ("gpipe", "1f1b"), (None,), None,
                               refine=0)
        best = search.best_per_stage_count()
        series[n] = [(p, r.time_s) for p, r in best.items()]
        for p, r in best.items():
            m = r.prediction.metrics
            rows.append(f"| {n} | {p} | {r.shape.data_parallel} | {r.shape.num_microbatches} | {r.shape.schedule} | "
                        f"{m.iteration_time_s * 1e3:.1f} ms | {m.bubble_fraction:.1%} | "
                        f"{r.prediction.exposed_allreduce_s * 1e3:.2f} ms | {m.peak_memory_bytes / 2**20:.1f} MiB |"
                        + (" best |" if r is search.best else " |"))
    out = Path(args.out)
    figure = out / "dataparallel-shapes.png"
    _plot(series, figure, profile.name)
    text = [
        "# Step time against stages for N ranks (data parallelism x pipeline, issue 15)", "",
        f"Command: `python benchmarks/shapes_figure.py {' '.join(sys.argv[1:])}`", "",
        f"Predictions for fc32 (32 x 512), batch {args.batch_size}, profile `{profile.name}`; for each N and "
        "P (P x D = N), the best of D = N/P replicas, every micro-batch count dividing B/D, gpipe and 1f1b, "
        f"balanced cut. {RANKS_PER_NODE} ranks per node, stage-major placement. **Inter-node links are a "
        f"what-if** (only one node can be measured here): latency {INTER_NODE_LATENCY_S * 1e6:.0f} µs, "
        f"bandwidth {INTER_NODE_BANDWIDTH_BPS / 1e9:.2f} GB/s (10 Gb/s Ethernet), for messages and the "
        "all-reduce; intra-node costs are this machine's.", "",
        f"![step time against stages]({figure.name})", "",
        "| N | P | D | m | schedule | step | bubble | exposed all-reduce | peak memory | |",
        "|---:|---:|---:|---:|---|---:|---:|---:|---:|---|", *rows, ""]
    (out / "dataparallel-shapes.md").write_text("\n".join(text))
    print("\n".join(text))


def _plot(series: dict, path: Path, profile: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, points in series.items():
        ax.plot([p for p, _ in points], [t * 1e3 for _, t in points], "o-", label=f"N = {n} ranks")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("pipeline stages P (replicas D = N / P)")
    ax.set_ylabel("predicted step time (ms), best m and schedule")
    ax.set_title(f"fc32, batch 512, 8 ranks/node, inter-node 10 Gb/s what-if ({profile})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
