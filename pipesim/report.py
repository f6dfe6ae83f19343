"""Figures (matplotlib, imported lazily) and markdown tables."""

from __future__ import annotations

from collections.abc import Sequence

from .timeline import Timeline

COLOURS = {"F": "#4C78A8", "B": "#F58518", "optimizer": "#54A24B", "send": "#B279A2",
           "wait": "#D0D0D0", "copy": "#9D755D"}
LABELS = {"F": "forward", "B": "backward", "optimizer": "optimizer step", "send": "transfer (on link)",
          "wait": "waiting for a message", "copy": "device copy"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_gantt(ax, timeline: Timeline, title: str = "") -> None:
    """One row per rank: compute as full-height bars (micro-batch on the bar),
    waits as grey, transfers as thin bars under the sending rank's row."""
    scale = 1e3  # ms on the axis
    end = max(s.end_s for s in timeline.spans)
    for span in timeline.spans:
        if span.kind == "send":
            y, height = span.rank + 0.32, 0.16
        else:
            y, height = span.rank - 0.3, 0.6
        ax.broken_barh([(span.start_s * scale, span.duration_s * scale)], (y, height),
                       facecolors=COLOURS[span.kind], edgecolor="white" if span.kind in "FB" else "none",
                       linewidth=0.4)
        width_fraction = span.duration_s / end if end else 0
        if span.kind in ("F", "B") and width_fraction > 0.012:
            ax.text((span.start_s + span.duration_s / 2) * scale, span.rank, str(span.microbatch),
                    ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(timeline.num_ranks), [f"rank {r}" for r in range(timeline.num_ranks)])
    ax.set_ylim(timeline.num_ranks - 0.45, -0.55)
    ax.set_xlim(0, end * scale * 1.01)
    ax.set_xlabel("time (ms)")
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)


def _legend(fig, timelines: Sequence[Timeline]) -> None:
    from matplotlib.patches import Patch

    kinds = [k for k in COLOURS if any(s.kind == k for t in timelines for s in t.spans)]
    fig.legend(handles=[Patch(color=COLOURS[k], label=LABELS[k]) for k in kinds],
               loc="lower center", ncol=len(kinds), fontsize=8, frameon=False)


def gantt_png(timeline: Timeline, path: str, title: str = "") -> None:
    gantt_stack_png([(timeline, title)], path)


def gantt_stack_png(panels: Sequence[tuple[Timeline, str]], path: str) -> None:
    """Several timelines one above the other on a shared time axis."""
    plt = _pyplot()
    heights = [max(1.2, 0.45 * t.num_ranks + 0.6) for t, _ in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights) + 0.9), sharex=True,
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (timeline, title) in zip(axes[:, 0], panels):
        draw_gantt(ax, timeline, title)
    end = max(max(s.end_s for s in t.spans) for t, _ in panels)
    axes[0, 0].set_xlim(0, end * 1e3 * 1.01)
    _legend(fig, [t for t, _ in panels])
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- validation report ------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def validation_csv(results) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["case", "layers", "width", "batch_size", "stages", "microbatches", "schedule",
                     "partition", "measured_s", "predicted_s", "error", "p10_s", "p90_s",
                     "round_medians_s", "peak_memory_error_max"])
    for r in results:
        c = r.case
        low, high = r.spread_s()
        writer.writerow([c.label, c.layers, c.width, c.batch_size, c.stages, c.microbatches, c.schedule,
                         c.partition, f"{r.measured_s:.6f}", f"{r.predicted_s:.6f}", f"{r.error:.4f}",
                         f"{low:.6f}", f"{high:.6f}", " ".join(f"{m:.6f}" for m in r.round_medians_s),
                         f"{max(abs(e) for _, _, e in r.memory_errors()):.4f}"])
    return out.getvalue()


def plot_predicted_vs_measured(results, path: str, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    measured = [r.measured_s * 1e3 for r in results]
    predicted = [r.predicted_s * 1e3 for r in results]
    for stages in sorted({r.case.stages for r in results}):
        chosen = [i for i, r in enumerate(results) if r.case.stages == stages]
        ax.scatter([measured[i] for i in chosen], [predicted[i] for i in chosen], s=22,
                   label=f"{stages} stage{'s' if stages > 1 else ''}")
    top = max(measured + predicted) * 1.05
    ax.plot([0, top], [0, top], color="black", linewidth=0.8, label="y = x")
    ax.fill_between([0, top], [0, top * 0.9], [0, top * 1.1], color="grey", alpha=0.15, label="±10%")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured iteration time (ms)")
    ax.set_ylabel("predicted iteration time (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_speedups(rows, path: str, title: str) -> None:
    """rows: (case, measured speedup, predicted speedup); one line per model/schedule/partition."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for result, measured, predicted in rows:
        c = result.case
        if c.partition != "balanced":
            continue
        key = (c.layers, c.width, c.batch_size, c.schedule, c.microbatches)
        series.setdefault(key, []).append((c.stages, measured, predicted))
    for index, (key, points) in enumerate(sorted(series.items())):
        points = sorted([(1, 1.0, 1.0)] + points)
        stages = [p for p, _, _ in points]
        colour = f"C{index % 10}"
        label = f"fc{key[0]}x{key[1]} b{key[2]} {key[3]} m{key[4]}"
        ax.plot(stages, [m for _, m, _ in points], "o-", color=colour, label=f"{label} measured")
        ax.plot(stages, [p for _, _, p in points], "x--", color=colour, label=f"{label} predicted")
        m = key[4]
        ax.plot(stages, [p * m / (m + p - 1) for p in stages], ":", color=colour, alpha=0.6,
                label=f"ideal pm/(m+p-1), m={m}")
    ax.set_xlabel("stages (ranks)")
    ax.set_ylabel("speedup over one rank")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def validation_markdown(grid, profile, results, summary, breakdowns, command: str,
                        figures: dict[str, str], tolerance: float) -> str:
    from .validate import partition_groups, ranking_matches, speedups

    lines = [
        f"# Validation: profile `{profile.name}`, grid `{grid.name}`",
        "",
        f"Command: `{command}`",
        "",
        f"Every case ran for real ({grid.rounds} interleaved rounds x {grid.iterations} measured "
        f"iterations after {grid.warmup} warm-up; network: {grid.network}) and was predicted by the "
        f"simulator with profile `{profile.name}` ({profile.description})",
        "",
        "**Held out.** The profile was fitted from `pipesim calibrate` micro-benchmarks (stacks of single "
        "fc layers, ping-pongs, optimizer steps) and one probe pipeline (width 256, 4 layers per stage, "
        "8 micro-batches of 4); none of the cases below is that probe, and no measurement of any case was "
        "used to fit the profile.",
        "",
        "## Summary",
        "",
        "| metric | value |",
        "|---|---:|",
        f"| cases | {len(results)} |",
        f"| MAPE of iteration time | {summary.mape:.2%} |",
        f"| max abs error | {summary.max_abs_error:.2%} |",
        f"| rank correlation (Spearman) of predicted vs measured speedups | "
        f"{summary.speedup_rank_correlation:.3f} |",
        f"| noise floor: same case, round medians differ by (median / max) | "
        f"{summary.noise_floor_median:.2%} / {summary.noise_floor_max:.2%} |",
        f"| partition rankings that match (groups of cases differing only in partition) | "
        f"{summary.partition_rankings_match} / {summary.partition_rankings_total} |",
        f"| peak memory per rank, max abs error | {summary.memory_max_abs_error:.2%} |",
        f"| tolerance (MAPE) | {tolerance:.1%} |",
        "",
        "## Cases",
        "",
        "| case | measured (ms) | predicted (ms) | error | measured p10–p90 (ms) | round medians (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        low, high = r.spread_s()
        lines.append(f"| {r.case.label} | {_ms(r.measured_s)} | {_ms(r.predicted_s)} | {r.error:+.1%} | "
                     f"{_ms(low)}–{_ms(high)} | {' / '.join(_ms(m) for m in r.round_medians_s)} |")
    lines += ["", "## Speedups", "", "| case | measured | predicted | ideal pm/(m+p−1) |", "|---|---:|---:|---:|"]
    for r, measured, predicted in speedups(results):
        p, m = r.case.stages, r.case.microbatches
        lines.append(f"| {r.case.label} | {measured:.2f}x | {predicted:.2f}x | {p * m / (m + p - 1):.2f}x |")
    lines += ["", "## Partition rankings", "", "| group | measured order (fastest first) | predicted order | match |",
              "|---|---|---|---|"]
    for group in partition_groups(results):
        c = group[0].case
        measured = " < ".join(r.case.partition for r in sorted(group, key=lambda r: r.measured_s))
        predicted = " < ".join(r.case.partition for r in sorted(group, key=lambda r: r.predicted_s))
        lines.append(f"| fc{c.layers}x{c.width} p{c.stages} m{c.microbatches} {c.schedule} | {measured} | "
                     f"{predicted} | {'yes' if ranking_matches(group) else 'no'} |")
    lines += ["", "## Where the error comes from", "",
              "Per case, measured minus simulated time per rank (averaged over ranks), split into compute "
              "(F, B, optimizer), per-action overhead (measured: gaps between a rank's actions; simulated: "
              "the profile's overhead per action), waiting for messages (transfers and pipeline "
              "dependencies), and the rest (idle after the rank's last action). The four add up to the "
              "iteration-time difference.", "",
              "| case | Δ iteration (ms) | Δ compute | Δ overhead | Δ waiting | Δ rest |", "|---|---:|---:|---:|---:|---:|"]
    for r, parts in zip(results, breakdowns):
        total = r.measured_s - r.predicted_s
        lines.append(f"| {r.case.label} | {total * 1e3:+.2f} | {parts['compute'] * 1e3:+.2f} | "
                     f"{parts['overhead'] * 1e3:+.2f} | {parts['wait'] * 1e3:+.2f} | {parts['rest'] * 1e3:+.2f} |")
    lines += ["", "## Peak memory per rank", "",
              "Parameters + gradients + optimizer state + peak saved activations (counted exactly in the "
              "runner with saved-tensor hooks).", "",
              "| case | rank | predicted | measured | error |", "|---|---:|---:|---:|---:|"]
    for r in results:
        for rank, (predicted, measured, error) in enumerate(r.memory_errors()):
            lines.append(f"| {r.case.label} | {rank} | {predicted:,} | {measured:,} | {error:+.2%} |")
    lines += ["", "## Figures", ""]
    lines += [f"![{caption}]({name})" for caption, name in figures.items()]
    return "\n".join(lines) + "\n"
