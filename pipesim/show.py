"""Human-readable output of the commands: numbers formatted at the edge."""

from __future__ import annotations

from .predict import Prediction


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 10 else f"{seconds:.2f} s"


def fmt_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


CALIBRATE_HINT = "predictions for your own machine start with `pipesim calibrate`"


def layer_text(plan, rank: int) -> str:
    """The layer ranges of the pieces a rank holds: ``0-3`` or ``0-3,16-19``."""
    return ",".join(f"{first}-{last}" for first, last in plan.rank_bounds(rank))


def print_prediction(p: Prediction, measured_on: str) -> None:
    plan, m = p.plan, p.metrics
    print(f"model      {plan.model.describe()}")
    print(f"profile    {p.profile}, measured on {measured_on}; {CALIBRATE_HINT}")
    print(f"pipeline   {plan.schedule.name}, {plan.num_stages} stages x {plan.num_chunks} chunk(s), "
          f"{plan.num_microbatches} micro-batches x {plan.microbatch_size} samples (batch {plan.batch_size}), "
          f"partition {plan.partition}")
    print()
    print(f"iteration time   {fmt_s(m.iteration_time_s)}   "
          f"(one rank: {fmt_s(p.baseline_time_s)}, speedup {p.speedup:.2f}x)")
    print(f"throughput       {p.throughput_samples_per_s:,.0f} samples/s")
    print(f"bubble fraction  {m.bubble_fraction:.1%}")
    print(f"peak memory      {fmt_bytes(m.peak_memory_bytes)} (largest rank)")
    print()
    print(f"{'rank':>4}  {'layers':<12} {'busy':>12} {'idle':>12} {'bubble':>7} {'peak memory':>12}")
    for r in m.ranks:
        print(f"{r.rank:>4}  {layer_text(plan, r.rank):<12} {fmt_s(r.busy_s):>12} {fmt_s(r.idle_s):>12} "
              f"{r.bubble_fraction:>7.1%} {fmt_bytes(r.peak_memory_bytes):>12}")


def print_sweep(predictions: list[Prediction], measured_on: str) -> None:
    print(f"profile {predictions[0].profile}, measured on {measured_on}; {CALIBRATE_HINT}")
    print(f"model {predictions[0].plan.model.describe()}; "
          f"schedule {predictions[0].plan.schedule.name}; batch {predictions[0].plan.batch_size}")
    print(f"{'stages':>6} {'micro':>6} {'iteration':>12} {'speedup':>8} {'ideal':>6} "
          f"{'bubble':>7} {'peak memory':>12}  partition")
    for p in predictions:
        s, mb = p.plan.num_stages, p.plan.num_microbatches
        ideal = s * mb / (mb + s - 1)
        print(f"{s:>6} {mb:>6} {fmt_s(p.metrics.iteration_time_s):>12} {p.speedup:>7.2f}x "
              f"{ideal:>5.2f}x {p.metrics.bubble_fraction:>7.1%} "
              f"{fmt_bytes(p.metrics.peak_memory_bytes):>12}  {p.plan.partition}")


def print_measurement(measured, baseline) -> None:
    plan, m = measured.plan, measured.metrics
    times = measured.iteration_times_s
    print(f"model      {plan.model.describe()}")
    print(f"pipeline   {plan.schedule.name}, {plan.num_stages} ranks, {plan.num_microbatches} "
          f"micro-batches x {plan.microbatch_size} samples (batch {plan.batch_size}), "
          f"partition {plan.partition}; {measured.mpi}")
    print("iterations " + " ".join(f"{t * 1e3:.1f}" for t in times) + " ms")
    print()
    print(f"iteration time   {fmt_s(measured.median_s)} median of {len(times)}   "
          f"(p10 {fmt_s(measured.percentile_s(10))}, p90 {fmt_s(measured.percentile_s(90))})")
    if baseline is not None:
        speedup = baseline.median_s / measured.median_s
        print(f"one rank         {fmt_s(baseline.median_s)} median   speedup {speedup:.2f}x "
              f"(ideal {plan.num_stages * plan.num_microbatches / (plan.num_microbatches + plan.num_stages - 1):.2f}x)")
    print(f"throughput       {plan.batch_size / measured.median_s:,.0f} samples/s")
    print(f"bubble fraction  {m.bubble_fraction:.1%} (median iteration)")
    print()
    print(f"{'rank':>4}  {'layers':<12} {'busy':>12} {'idle':>12} {'activations':>12} "
          f"{'peak memory':>12} {'peak RSS':>10}")
    for r in m.ranks:
        print(f"{r.rank:>4}  {layer_text(plan, r.rank):<12} {fmt_s(r.busy_s):>12} {fmt_s(r.idle_s):>12} "
              f"{fmt_bytes(r.peak_activation_bytes):>12} {fmt_bytes(r.peak_memory_bytes):>12} "
              f"{fmt_bytes(measured.peak_rss_bytes[r.rank]):>10}")


def print_profile(profile: dict) -> None:
    table, noise = profile["compute"]["fc"], profile["noise"]
    samples = profile["samples"]
    residual = samples["fit_max_relative_residual"]
    print(f"profile {profile['name']}: {profile['description']}")
    sizes = table["forward"]["microbatch_sizes"]
    print(f"  fc layer time (us) by micro-batch size; forward / backward; noise CV "
          f"{noise['forward_cv_median']:.1%} / {noise['backward_cv_median']:.1%}")
    print("    width " + "".join(f"{b:>15}" for b in sizes))
    for w, f_row, b_row in zip(table["forward"]["widths"], table["forward"]["seconds"],
                               table["backward"]["seconds"]):
        print(f"    {w:>5} " + "".join(f"{f * 1e6:>7.0f}/{b * 1e6:<7.0f}" for f, b in zip(f_row, b_row)))
    for direction in [d for d in ("forward", "backward", "input", "weight") if d in samples["affine_fit"]]:
        c = samples["affine_fit"][direction]
        print(f"  affine {direction:<8} {c['fixed_s'] * 1e6:6.2f} us + {c['s_per_param'] * 1e12:6.1f} ps/param"
              f" + b x {c['s_per_flop'] * 1e12:5.2f} ps/flop (summary only; worst error "
              f"{residual['affine_' + direction]:.0%}, so the table is used)")
    opt = profile["optimizer"]
    print("  optimizer    " + ", ".join(f"{p / 1e6:.2f}M params {t * 1e3:.2f} ms"
                                        for p, t in zip(opt["params"], opt["seconds"])))
    for name, link in profile["links"].items():
        bandwidth = "inf" if link["bandwidth_Bps"] is None else f"{link['bandwidth_Bps'] / 1e9:.3f} GB/s"
        print(f"  {name:<12} latency {link['latency_s'] * 1e6:.2f} us, bandwidth {bandwidth}, "
              f"{'duplex' if link.get('duplex', True) else 'one channel shared by both directions'}")
    print(f"  per action   {profile['action_overhead_s'] * 1e6:.1f} us overhead")
