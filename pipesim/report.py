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
