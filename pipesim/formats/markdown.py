"""The report page (`pipesim report`): markdown tables around the figures report.py draws."""

from __future__ import annotations

from .text import cap_text, fmt_bytes, fmt_s, search_text, what_ifs_text


def _matrix(sweep, schedule: str, cell) -> list[str]:
    micro = sweep.microbatches
    lines = ["| stages \\ micro-batches | " + " | ".join(map(str, micro)) + " |",
             "|---:|" + "---:|" * len(micro)]
    for p in sweep.stages:
        cells = []
        for m in micro:
            r = sweep.result(p, m, schedule)
            cells.append("n/a" if r is None or not r.ok else cell(r))
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return lines


def report_markdown(optimum, sweep, figures: dict[str, str], command: str) -> str:
    problem, best, even = optimum.problem, optimum.best, optimum.even
    what_ifs = what_ifs_text(problem.costs) or "none"
    lines = [
        f"# pipesim report: `{problem.model.name}`",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {problem.model.describe()}. Profile: `{problem.profile_name}`. What-ifs: {what_ifs}. "
        f"Batch {problem.batch_size}; {cap_text(problem.memory_cap_bytes)}.",
        "",
        f"## Best partition: {problem.schedule.name}, {problem.num_stages} stages, "
        f"{problem.num_microbatches} micro-batches",
        "",
        "| | partition | predicted iteration | speedup over one rank | peak memory (largest rank) | fits |",
        "|---|---|---:|---:|---:|---|",
    ]
    for label, p, fits in (("optimized", best, True), ("even split by layer count", even, optimum.even_fits)):
        lines.append(f"| {label} | {p.plan.partition} | {fmt_s(p.metrics.iteration_time_s)} | {p.speedup:.2f}x | "
                     f"{fmt_bytes(p.metrics.peak_memory_bytes)} | {'yes' if fits else 'no'} |")
    lines += ["", f"The optimized partition is **{optimum.gain_over_even:.3f}x** as fast as the even split. "
              f"{search_text(optimum)[0].upper()}{search_text(optimum)[1:]}.", ""]
    captions = list(figures)
    lines += [f"![{c}]({figures[c]})" for c in captions[:2]]
    recommended = sweep.recommended()
    lines += ["", f"## Sweep: {len(sweep.results)} configurations ({sweep.partition_mode} partitions)", "",
              f"One rank, whole mini-batch: {fmt_s(sweep.baseline_time_s)}. "
              f"Swept in {sweep.wall_s:.2f} s."]
    if recommended is not None:
        lines += ["", f"**Recommended** ({cap_text(sweep.memory_cap_bytes)}): {recommended.point.schedule}, "
                      f"{recommended.point.num_stages} stages, {recommended.point.num_microbatches} micro-batches, "
                      f"partition {','.join(map(str, recommended.partition))}: "
                      f"{fmt_s(recommended.iteration_time_s)}, {sweep.speedup(recommended):.2f}x, "
                      f"peak memory {fmt_bytes(recommended.peak_memory_bytes)}."]
    for schedule in sweep.schedules:
        lines += ["", f"### {schedule}: speedup over one rank (closed form pm/(m+p-1) in brackets)", ""]
        lines += _matrix(sweep, schedule, lambda r: f"{sweep.speedup(r):.2f}x ({r.point.closed_form_speedup:.2f})"
                         + ("" if sweep.fits(r) else " over cap"))
        lines += ["", f"### {schedule}: peak memory of the largest rank", ""]
        lines += _matrix(sweep, schedule, lambda r: fmt_bytes(r.peak_memory_bytes))
    lines += [""] + [f"![{c}]({figures[c]})" for c in captions[2:]]
    return "\n".join(lines) + "\n"
