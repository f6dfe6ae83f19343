"""Figures (matplotlib, imported lazily); the text and markdown around them: formats/."""

from __future__ import annotations

from collections.abc import Sequence

from .formats.text import fmt_s, what_ifs_text
from .timeline import ACTION_KINDS, Timeline

COLOURS = {"F": "#4C78A8", "B": "#F58518", "I": "#E45756", "W": "#EECA3B", "optimizer": "#54A24B", "send": "#B279A2",
           "wait": "#D0D0D0", "copy": "#9D755D", "allreduce": "#17BECF"}
LABELS = {"F": "forward", "B": "backward", "I": "input gradient (I)", "W": "weight gradients (W)",
          "optimizer": "optimizer step", "send": "transfer (on link)",
          "wait": "waiting for a message", "copy": "device copy",
          "allreduce": "gradient all-reduce (beside compute)"}


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
        elif span.kind == "allreduce":  # runs beside the rank's compute: a thin bar above its row
            y, height = span.rank - 0.48, 0.16
        else:
            y, height = span.rank - 0.3, 0.6
        ax.broken_barh([(span.start_s * scale, span.duration_s * scale)], (y, height),
                       facecolors=COLOURS[span.kind], edgecolor="white" if span.kind in ACTION_KINDS else "none",
                       linewidth=0.4)
        width_fraction = span.duration_s / end if end else 0
        if span.kind in ACTION_KINDS and width_fraction > 0.012:
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


# --- optimize and sweep figures ---------------------------------------------------

_MIB = 2**20


def _cap_mib(cap_bytes: int | None) -> str:
    return f"{cap_bytes / _MIB:,.1f} MiB" if cap_bytes else ""


def plot_memory_bars(panels: Sequence[tuple[str, Sequence[int], Sequence[int]]], cap_bytes: int | None,
                     path: str, title: str = "") -> None:
    """Peak memory per rank as bars (parameters + gradients + optimizer state, with
    the saved activations stacked on top), one group of bars per partition, against the cap.

    panels: (label, static bytes per rank, peak activation bytes per rank).
    """
    plt = _pyplot()
    num_ranks = max(len(static) for _, static, _ in panels)
    width = 0.8 / len(panels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * num_ranks + 3), 4.2))
    for index, (label, static, activations) in enumerate(panels):
        xs = [r - 0.4 + width * (index + 0.5) for r in range(len(static))]
        colour = f"C{index}"
        ax.bar(xs, [s / _MIB for s in static], width * 0.92, color=colour, alpha=0.55,
               label=f"{label}: parameters, gradients, optimizer state")
        ax.bar(xs, [a / _MIB for a in activations], width * 0.92, bottom=[s / _MIB for s in static],
               color=colour, label=f"{label}: saved activations")
        for x, s, a in zip(xs, static, activations):
            ax.text(x, (s + a) / _MIB, f"{(s + a) / _MIB:,.0f}", ha="center", va="bottom", fontsize=7)
    if cap_bytes:
        ax.axhline(cap_bytes / _MIB, color="#C0392B", linestyle="--", linewidth=1.2,
                   label=f"memory cap {_cap_mib(cap_bytes)}")
    ax.set_xticks(range(num_ranks), [f"rank {r}" for r in range(num_ranks)])
    ax.set_ylabel("peak memory (MiB)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sweep_speedup(sweep, path: str, title: str = "") -> None:
    """Speedup over one rank against stages: one panel per schedule, a colour per
    micro-batch count m: simulated (solid), the closed form pm/(m+p-1) (dotted),
    and the ideal p (dashed black)."""
    from matplotlib.lines import Line2D

    plt = _pyplot()
    schedules, stages, micro = sweep.schedules, sweep.stages, sweep.microbatches
    fig, axes = plt.subplots(1, len(schedules), figsize=(5.2 * len(schedules) + 1.8, 4.4),
                             sharey=True, squeeze=False)
    top, any_over = 1.0, False
    for ax, schedule in zip(axes[0], schedules):
        ax.plot(stages, stages, "--", color="black", linewidth=1)
        for index, m in enumerate(micro):
            colour = f"C{index % 10}"
            rows = [r for r in (sweep.result(p, m, schedule) for p in stages) if r is not None and r.ok]
            xs = [r.point.num_stages for r in rows]
            ys = [sweep.speedup(r) for r in rows]
            top = max([top, *ys])
            ax.plot(xs, ys, "o-", color=colour, markersize=4)
            ax.plot(stages, [p * m / (m + p - 1) for p in stages], ":", color=colour, linewidth=1.3)
            over = [(x, y) for x, y, r in zip(xs, ys, rows) if not sweep.fits(r)]
            if over:
                any_over = True
                ax.scatter(*zip(*over), s=70, facecolors="none", edgecolors="#C0392B", linewidths=1.2, zorder=3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(stages, [str(p) for p in stages])
        ax.set_xlabel("stages p (ranks)")
        ax.set_title(schedule, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("speedup over one rank")
    axes[0, 0].set_ylim(0, top * 1.25)
    handles = [Line2D([], [], color=f"C{i % 10}", marker="o", markersize=4, label=f"m = {m}")
               for i, m in enumerate(micro)]
    handles += [Line2D([], [], color="grey", linestyle="-", label="simulated"),
                Line2D([], [], color="grey", linestyle=":", linewidth=1.3, label="closed form pm/(m+p-1)"),
                Line2D([], [], color="black", linestyle="--", linewidth=1, label="ideal: p")]
    if any_over:
        handles.append(Line2D([], [], marker="o", markersize=8, markerfacecolor="none", linestyle="none",
                              markeredgecolor="#C0392B", label="over the memory cap"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title + " (lines above the top of the axes run off it)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_sweep_heatmap(sweep, path: str, title: str = "") -> None:
    """Heatmaps over stages x micro-batches, one row per schedule: speedup (left)
    and peak memory of the largest rank (right). Cells over the cap are hatched,
    the recommended configuration is outlined."""
    import numpy as np
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    schedules, stages, micro = sweep.schedules, sweep.stages, sweep.microbatches
    best = sweep.recommended()
    fig, axes = plt.subplots(len(schedules), 2, figsize=(11, 0.55 * len(stages) * len(schedules) + 1.6),
                             squeeze=False)
    speedups = [sweep.speedup(r) for r in sweep.results if r.ok]
    memories = [r.peak_memory_bytes / _MIB for r in sweep.results if r.ok]
    limits = {"speedup": (min(speedups, default=0), max(speedups, default=1)),
              "memory": (min(memories, default=0), max(memories, default=1))}
    for row, schedule in enumerate(schedules):
        for col, what in enumerate(("speedup", "memory")):
            ax = axes[row, col]
            values = np.full((len(stages), len(micro)), np.nan)
            for i, p in enumerate(stages):
                for j, m in enumerate(micro):
                    r = sweep.result(p, m, schedule)
                    if r is not None and r.ok:
                        values[i, j] = sweep.speedup(r) if what == "speedup" else r.peak_memory_bytes / _MIB
            image = ax.imshow(values, cmap="viridis" if what == "speedup" else "magma_r", aspect="auto",
                              origin="lower", vmin=limits[what][0], vmax=limits[what][1])
            fig.colorbar(image, ax=ax, label="speedup over one rank" if what == "speedup" else "peak MiB")
            for i, p in enumerate(stages):
                for j, m in enumerate(micro):
                    r = sweep.result(p, m, schedule)
                    if r is None or not r.ok:
                        ax.text(j, i, "n/a", ha="center", va="center", fontsize=7, color="grey")
                        continue
                    text = f"{values[i, j]:.2f}x" if what == "speedup" else f"{values[i, j]:,.0f}"
                    shade = (values[i, j] - limits[what][0]) / ((limits[what][1] - limits[what][0]) or 1)
                    dark = shade < 0.55 if what == "speedup" else shade > 0.45
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if dark else "black")
                    if not sweep.fits(r):
                        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                               edgecolor="#C0392B", linewidth=0))
                    if r == best:
                        ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False,
                                               edgecolor="#00E5FF", linewidth=2.2))
            ax.set_xticks(range(len(micro)), [str(m) for m in micro])
            ax.set_yticks(range(len(stages)), [str(p) for p in stages])
            ax.set_xlabel("micro-batches m")
            ax.set_ylabel("stages p")
            name = "speedup" if what == "speedup" else "peak memory, largest rank (MiB)"
            ax.set_title(f"{schedule}: {name}", fontsize=9)
    notes = []
    if sweep.memory_cap_bytes:
        notes.append(f"hatched: over the memory cap ({_cap_mib(sweep.memory_cap_bytes)})")
    if best is not None:
        notes.append(f"outlined: recommended ({best.point.schedule}, p={best.point.num_stages}, "
                     f"m={best.point.num_microbatches})")
    fig.suptitle((title + "\n" if title else "") + "; ".join(notes), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# --- optimize and sweep: text, figure files, the report page ------------------------


def optimize_figures(optimum, out) -> dict[str, str]:
    """Write the optimize figures into directory `out`; returns caption -> file name."""
    from pathlib import Path

    problem, best, even = optimum.problem, optimum.best, optimum.even
    what_ifs = what_ifs_text(problem.costs)
    stem = (f"optimize-{problem.model.name}-{problem.schedule.name}-p{problem.num_stages}-"
            f"m{problem.num_microbatches}" + ("-whatif" if what_ifs else ""))
    names = {"Gantt charts: optimized (top) and even split (bottom)": f"{stem}-gantt.png",
             "peak memory per rank against the cap": f"{stem}-memory.png"}
    suffix = f" [{what_ifs}]" if what_ifs else ""
    gantt_stack_png([
        (best.timeline, f"optimized {best.plan.partition}: {fmt_s(best.metrics.iteration_time_s)}{suffix}"),
        (even.timeline, f"even split {even.plan.partition}: {fmt_s(even.metrics.iteration_time_s)}"),
    ], str(Path(out) / names["Gantt charts: optimized (top) and even split (bottom)"]))
    panels = [(f"optimized {p.plan.partition}", p.timeline.static_bytes,
               [r.peak_activation_bytes for r in p.metrics.ranks])
              for p in (best, even)]
    panels[1] = (panels[1][0].replace("optimized", "even split"), *panels[1][1:])
    plot_memory_bars(panels, problem.memory_cap_bytes, str(Path(out) / names["peak memory per rank against the cap"]),
                     title=f"{problem.model.name}, {problem.schedule.name}, {problem.num_stages} stages, "
                           f"{problem.num_microbatches} micro-batches of {problem.microbatch_size}")
    return names


def sweep_figures(sweep, out) -> dict[str, str]:
    from pathlib import Path

    stem = f"sweep-{sweep.model_name}"
    names = {"speedup against stages": f"{stem}-speedup.png",
             "speedup and peak memory over the grid": f"{stem}-heatmap.png"}
    title = f"{sweep.model_name}, batch {sweep.batch_size}, {sweep.partition_mode} partitions"
    plot_sweep_speedup(sweep, str(Path(out) / names["speedup against stages"]), title)
    plot_sweep_heatmap(sweep, str(Path(out) / names["speedup and peak memory over the grid"]), title)
    return names
