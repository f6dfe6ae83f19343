"""The validation report: markdown, CSV and figures of predicted against measured."""

from __future__ import annotations

from pathlib import Path

from .heldout import held_out_paragraph
from .report import _pyplot, gantt_stack_png


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def _opt(value) -> str:
    return "" if value is None else str(value)


def _mib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / 2**20:.2f}"


def validation_csv(results) -> str:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["case", "layers", "width", "batch_size", "stages", "microbatches", "schedule",
                     "partition", "measured_s", "predicted_s", "error", "p10_s", "p90_s",
                     "round_medians_s", "cost_status", "cost_sources", "predicted_step_bytes",
                     "rss_increase_bytes", "profiler_peak_bytes", "memory_error_max",
                     "saved_accounting_error_max", "data_parallel"])
    for r in results:
        c = r.case
        low, high = r.spread_s()
        memory = r.memory_errors()
        writer.writerow([c.label, c.model().num_layers, "" if c.model_file else c.width, c.batch_size, c.stages,
                         c.microbatches, c.schedule,
                         c.partition, f"{r.measured_s:.6f}", f"{r.predicted_s:.6f}", f"{r.error:.4f}",
                         f"{low:.6f}", f"{high:.6f}", " ".join(f"{m:.6f}" for m in r.round_medians_s),
                         r.sources.status if r.sources else "", r.sources.describe() if r.sources else "",
                         " ".join(str(b) for b in r.predicted_step_bytes()),
                         " ".join(_opt(m and m.rss_increase_bytes) for m in r.memory),
                         " ".join(_opt(m and m.profiler_peak_bytes) for m in r.memory),
                         f"{max(abs(e) for _, _, e in memory):.4f}" if memory else "",
                         f"{max(abs(e) for _, _, e in r.saved_accounting_errors()):.4f}", c.data_parallel])
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
        key = (*c.model_key, c.schedule, c.microbatches)
        series.setdefault(key, []).append((c.stages, measured, predicted))
    for index, (key, points) in enumerate(sorted(series.items())):
        points = sorted([(1, 1.0, 1.0)] + points)
        stages = [p for p, _, _ in points]
        colour = f"C{index % 10}"
        label = f"{key[0]} b{key[1]} {key[2]} m{key[3]}"
        ax.plot(stages, [m for _, m, _ in points], "o-", color=colour, label=f"{label} measured")
        ax.plot(stages, [p for _, _, p in points], "x--", color=colour, label=f"{label} predicted")
        m = key[3]
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
                        figures: dict[str, str], verdict: str) -> str:
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
        held_out_paragraph([r.sources for r in results if r.sources is not None], profile),
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
        f"| memory per rank: step ledger vs RSS high-water over one step, mean / max abs error | "
        f"{summary.memory_mape:.2%} / {summary.memory_max_abs_error:.2%} |",
        f"| saved-activation accounting (formula vs saved-tensor hooks; not a measurement), max abs error | "
        f"{summary.saved_accounting_max_abs_error:.2%} |",
        f"| verdict | {verdict} |",
        "",
        "## Cases",
        "",
        "| case | measured (ms) | predicted (ms) | error | measured p10–p90 (ms) | round medians (ms) | cells |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        low, high = r.spread_s()
        lines.append(f"| {r.case.label} | {_ms(r.measured_s)} | {_ms(r.predicted_s)} | {r.error:+.1%} | "
                     f"{_ms(low)}–{_ms(high)} | {' / '.join(_ms(m) for m in r.round_medians_s)} | "
                     f"{r.sources.status if r.sources else '?'} |")
    lines += ["", "## Where each case's costs come from", "",
              "Per distinct piece: the width its largest layer is sized like, the micro-batch size and the "
              "piece's weight working set, each (m) a measured value of the profile, (i) between measured "
              "values (interpolated), (x) outside them (extrapolated; for the working set, costs do not vary "
              "with it: the tables hold the stacks calibration timed); then the optimizer step at each rank's "
              "parameter count.", "", "| case | cells | working set | pieces |", "|---|---|---|---|"]
    for r in results:
        if r.sources is not None:
            lines.append(f"| {r.case.label} | {r.sources.status} | {r.sources.working_set_status} | "
                         f"{r.sources.describe()} |")
    lines += ["", "## Speedups", "", "| case | measured | predicted | ideal pm/(m+p−1) |", "|---|---:|---:|---:|"]
    for r, measured, predicted in speedups(results):
        p, m, d = r.case.stages, r.case.microbatches, r.case.data_parallel
        lines.append(f"| {r.case.label} | {measured:.2f}x | {predicted:.2f}x | {d * p * m / (m + p - 1):.2f}x |")
    lines += ["", "## Partition rankings", "", "| group | measured order (fastest first) | predicted order | match |",
              "|---|---|---|---|"]
    for group in partition_groups(results):
        c = group[0].case
        measured_order = " < ".join(r.case.partition for r in sorted(group, key=lambda r: r.measured_s))
        predicted_order = " < ".join(r.case.partition for r in sorted(group, key=lambda r: r.predicted_s))
        lines.append(f"| {c.model_name} p{c.stages} m{c.microbatches} {c.schedule} | {measured_order} | "
                     f"{predicted_order} | {'yes' if ranking_matches(group) else 'no'} |")
    lines += ["", "## Where the error comes from", "",
              "Per case, the median iteration of the last round minus the simulated step, per rank "
              "(averaged over ranks), split into compute "
              "(F, B, optimizer), per-action overhead (measured: gaps between a rank's actions; simulated: "
              "the profile's overhead per action), waiting for messages (transfers and pipeline "
              "dependencies), and the rest (idle after the rank's last action). The four add up to the "
              "iteration-time difference.", "",
              "| case | Δ iteration (ms) | Δ compute | Δ overhead | Δ waiting | Δ rest |", "|---|---:|---:|---:|---:|---:|"]
    for r, parts in zip(results, breakdowns):
        total = sum(parts.values())  # the shown (median) iteration of the last round minus predicted
        lines.append(f"| {r.case.label} | {total * 1e3:+.2f} | {parts['compute'] * 1e3:+.2f} | "
                     f"{parts['overhead'] * 1e3:+.2f} | {parts['wait'] * 1e3:+.2f} | {parts['rest'] * 1e3:+.2f} |")
    lines += memory_section(results)
    lines += ["", "## Figures", ""]
    lines += [f"![{caption}]({name})" for caption, name in figures.items()]
    return "\n".join(lines) + "\n"


def memory_section(results) -> list[str]:
    """Memory per rank measured independently, then the saved-activation accounting."""
    lines = ["", "## Memory per rank, measured independently", "",
             "Predicted: the step ledger's peak (pipesim/ledger.py: saved activations, receive buffers posted "
             "at the step's start, sends held to its end, input and target copies, the backward's "
             "temporaries), static bytes (parameters, gradients, optimizer state) not included. Measured, "
             "once per case in a job of its own after the timed rounds (pipesim/runner/memory_probe.py): the "
             "RSS high-water over one step (VmHWM reset just before it) less the resident size before it, "
             "with glibc's mmap threshold fixed at a page so that freed tensors leave the resident set (a "
             "receive buffer is resident only once its message has landed: the ledger counts it from "
             "posting); and the peak of torch's profiler's allocation events (profile_memory=True) on the "
             "next step. Error: predicted against the RSS.", "",
             "| case | rank | predicted (MiB) | RSS high-water increase (MiB) | torch profiler (MiB) | error |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for rank, predicted in enumerate(r.predicted_step_bytes()):
            m = r.memory[rank] if rank < len(r.memory) else None
            rss = m.rss_increase_bytes if m is not None else None
            error = f"{predicted / rss - 1:+.1%}" if rss else "–"
            lines.append(f"| {r.case.label} | {rank} | {_mib(predicted)} | {_mib(rss)} | "
                         f"{_mib(m.profiler_peak_bytes if m is not None else None)} | {error} |")
    lines += ["", "## Saved-activation accounting", "",
              "Parameters + gradients + optimizer state + peak saved activations, the formula against the "
              "runner's count of what autograd saves (saved-tensor hooks). For fc layers the count equals "
              "the formula by construction: this checks the accounting, it does not measure memory.", "",
              "| case | rank | formula | counted | difference |", "|---|---:|---:|---:|---:|"]
    for r in results:
        for rank, (predicted, measured, error) in enumerate(r.saved_accounting_errors()):
            lines.append(f"| {r.case.label} | {rank} | {predicted:,} | {measured:,} | {error:+.2%} |")
    return lines


def write_report(grid, profile, results, summary, out: Path, command: str, verdict: str) -> Path:
    """Write reports/validation-<profile>[-<grid>].md, its CSV and PNGs; returns the .md path."""
    from .validate import breakdown_difference, speedups

    out.mkdir(parents=True, exist_ok=True)
    stem = f"validation-{profile.name}" + (f"-{grid.name}" if grid.name != "default" else "")
    title = f"grid {grid.name}, profile {profile.name}"
    figures = {"predicted vs measured": f"{stem}-scatter.png",
               "speedup against stages": f"{stem}-speedup.png",
               "simulated (top) and measured (bottom) timeline": f"{stem}-gantt.png"}
    plot_predicted_vs_measured(results, str(out / figures["predicted vs measured"]), title)
    plot_speedups(speedups(results), str(out / figures["speedup against stages"]), title)
    shown = max((r for r in results if not r.case.is_baseline),
                key=lambda r: (r.case.stages, r.case.microbatches))
    gantt_stack_png([(shown.prediction.timeline, f"simulated: {shown.case.label}"),
                     (shown.measured_timeline, f"measured (median iteration): {shown.case.label}")],
                    str(out / figures["simulated (top) and measured (bottom) timeline"]))
    breakdowns = [breakdown_difference(r, profile) for r in results]
    path = out / f"{stem}.md"
    path.write_text(validation_markdown(grid, profile, results, summary, breakdowns, command, figures,
                                        verdict))
    (out / f"{stem}.csv").write_text(validation_csv(results))
    return path
