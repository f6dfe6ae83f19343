"""Text tables for the terminal: numbers formatted for people at the edge (seconds and
bytes inside, ms and MiB here)."""

from __future__ import annotations

from ..predict import Prediction


def fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 10 else f"{seconds:.2f} s"


def recompute_text(optimum) -> list[str]:
    """Which recomputation optimize chose and why, and (--recompute auto) what each option gave."""
    if not optimum.recompute_reason:
        return []
    tried = [f"{t['recompute']} {fmt_s(t['iteration_time_s'])}, {fmt_bytes(t['peak_memory_bytes'])}" if t["fits"]
             else f"{t['recompute']} needs {fmt_bytes(t['min_cap_bytes'])}" for t in optimum.recompute_tried]
    return [f"chosen     {optimum.recompute_reason}"] + ([f"           tried: {'; '.join(tried)}"] if tried else [])


def fmt_bytes(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


CALIBRATE_HINT = "predictions for your own machine start with `pipesim calibrate`"


def layer_text(plan, rank: int) -> str:
    """The layer ranges of the pieces a (global) rank holds: ``0-3`` or ``0-3,16-19``."""
    stage = plan.layout().stage_of(rank)
    return ",".join(f"{first}-{last}" for first, last in plan.rank_bounds(stage))


def _where_header(plan) -> str:
    return f" {'replica':>7} {'stage':>5} {'node':>4}" if plan.data_parallel > 1 else ""


def _where(plan, rank: int, ranks_per_node: int | None) -> str:
    if plan.data_parallel == 1:
        return ""
    w = plan.layout(ranks_per_node).describe(rank)
    return f" {w['replica']:>7} {w['stage']:>5} {w['node']:>4}"


def _recompute(plan) -> str:
    return f", recompute pieces {','.join(map(str, plan.recompute))}" if plan.recompute else ""


def prediction_text(p: Prediction, measured_on: str) -> str:
    lines: list[str] = []
    plan, m = p.plan, p.metrics
    lines.append(f"model      {plan.model.describe()}")
    lines.append(f"profile    {p.profile}, measured on {measured_on}; {CALIBRATE_HINT}")
    lines += extrapolated_text(p.extrapolated)
    lines.append(f"pipeline   {plan.schedule.name}, {plan.num_stages} stages x {plan.num_chunks} chunk(s), "
                 f"{plan.num_microbatches} micro-batches x {plan.microbatch_size} samples (batch {plan.batch_size}), "
                 f"partition {plan.partition}{_recompute(plan)}")
    if plan.data_parallel > 1:
        lines.append(f"replicas   {plan.data_parallel} x {plan.num_stages} stages = {plan.world_size} ranks "
                     f"({plan.placement}), {plan.batch_size // plan.data_parallel} samples each; gradients "
                     f"all-reduced per stage (ring)")
    lines.append("")
    lines.append(f"iteration time   {fmt_s(m.iteration_time_s)}   "
                 f"(one rank: {fmt_s(p.baseline_time_s)}, speedup {p.speedup:.2f}x)")
    lines.append(f"throughput       {p.throughput_samples_per_s:,.0f} samples/s")
    lines.append(f"bubble fraction  {m.bubble_fraction:.1%}")
    lines.append(f"peak memory      {fmt_bytes(m.peak_memory_bytes)} (largest rank)")
    if plan.data_parallel > 1:
        lines.append(f"all-reduce       {fmt_s(p.exposed_allreduce_s)} exposed (added to the step)")
    lines.append("")
    lines.append(f"{'rank':>4}{_where_header(plan)}  {'layers':<12} {'busy':>12} {'idle':>12} {'bubble':>7} "
                 f"{'peak memory':>12}")
    for r in m.ranks:
        lines.append(f"{r.rank:>4}{_where(plan, r.rank, p.ranks_per_node)}  {layer_text(plan, r.rank):<12} "
                     f"{fmt_s(r.busy_s):>12} {fmt_s(r.idle_s):>12} "
                     f"{r.bubble_fraction:>7.1%} {fmt_bytes(r.peak_memory_bytes):>12}")
    return "\n".join(lines)


def extrapolated_text(extrapolated) -> list[str]:
    """Lines saying which costs were extrapolated (no measurement of their shape), and how far."""
    from ..kindcosts import summarize

    return [f"{'costs' if i == 0 else '':<10} extrapolated for {line}" for i, line in enumerate(summarize(extrapolated))]


def predictions_text(predictions: list[Prediction], measured_on: str) -> str:
    lines: list[str] = []
    lines.append(f"profile {predictions[0].profile}, measured on {measured_on}; {CALIBRATE_HINT}")
    lines.append(f"model {predictions[0].plan.model.describe()}; "
                 f"schedule {predictions[0].plan.schedule.name}; batch {predictions[0].plan.batch_size}")
    lines += extrapolated_text(predictions[0].extrapolated)
    lines.append(f"{'stages':>6} {'micro':>6} {'iteration':>12} {'speedup':>8} {'ideal':>6} "
                 f"{'bubble':>7} {'peak memory':>12}  partition")
    for p in predictions:
        s, mb = p.plan.num_stages, p.plan.num_microbatches
        ideal = s * mb / (mb + s - 1)
        lines.append(f"{s:>6} {mb:>6} {fmt_s(p.metrics.iteration_time_s):>12} {p.speedup:>7.2f}x "
                     f"{ideal:>5.2f}x {p.metrics.bubble_fraction:>7.1%} "
                     f"{fmt_bytes(p.metrics.peak_memory_bytes):>12}  {p.plan.partition}")
    return "\n".join(lines)


def measurement_text(measured, baseline) -> str:
    lines: list[str] = []
    plan, m = measured.plan, measured.metrics
    times = measured.iteration_times_s
    lines.append(f"model      {plan.model.describe()}")
    lines.append(f"pipeline   {plan.schedule.name}, {plan.num_stages} ranks, {plan.num_microbatches} "
                 f"micro-batches x {plan.microbatch_size} samples (batch {plan.batch_size}), "
                 f"partition {plan.partition}{_recompute(plan)}; {measured.mpi}")
    lines.append("iterations " + " ".join(f"{t * 1e3:.1f}" for t in times) + " ms")
    lines.append("")
    lines.append(f"iteration time   {fmt_s(measured.median_s)} median of {len(times)}   "
                 f"(p10 {fmt_s(measured.percentile_s(10))}, p90 {fmt_s(measured.percentile_s(90))})")
    if baseline is not None:
        speedup = baseline.median_s / measured.median_s
        lines.append(f"one rank         {fmt_s(baseline.median_s)} median   speedup {speedup:.2f}x "
                     f"(ideal {plan.num_stages * plan.num_microbatches / (plan.num_microbatches + plan.num_stages - 1):.2f}x)")
    lines.append(f"throughput       {plan.batch_size / measured.median_s:,.0f} samples/s")
    lines.append(f"bubble fraction  {m.bubble_fraction:.1%} (median iteration)")
    lines.append("")
    lines.append(f"{'rank':>4}  {'layers':<12} {'busy':>12} {'idle':>12} {'activations':>12} "
                 f"{'peak memory':>12} {'peak RSS':>10}")
    for r in m.ranks:
        lines.append(f"{r.rank:>4}  {layer_text(plan, r.rank):<12} {fmt_s(r.busy_s):>12} {fmt_s(r.idle_s):>12} "
                     f"{fmt_bytes(r.peak_activation_bytes):>12} {fmt_bytes(r.peak_memory_bytes):>12} "
                     f"{fmt_bytes(measured.peak_rss_bytes[r.rank]):>10}")
    return "\n".join(lines)


def profile_text(profile: dict) -> str:
    lines: list[str] = [f"profile {profile['name']}: {profile['description']}"]
    noise, samples = profile["noise"], profile["samples"]
    residual = samples["fit_max_relative_residual"]
    if "fc" in profile["compute"]:
        table = profile["compute"]["fc"]
        sizes = table["forward"]["microbatch_sizes"]
        lines.append(f"  fc layer time (us) by micro-batch size; forward / backward; noise CV "
                     f"{noise['forward_cv_median']:.1%} / {noise['backward_cv_median']:.1%}")
        lines.append("    width " + "".join(f"{b:>15}" for b in sizes))
        for w, f_row, b_row in zip(table["forward"]["widths"], table["forward"]["seconds"],
                                   table["backward"]["seconds"]):
            lines.append(f"    {w:>5} " + "".join(f"{f * 1e6:>7.0f}/{b * 1e6:<7.0f}" for f, b in zip(f_row, b_row)))
    for direction in [d for d in ("forward", "backward", "input", "weight") if d in samples["affine_fit"]]:
        c = samples["affine_fit"][direction]
        lines.append(f"  affine {direction:<8} {c['fixed_s'] * 1e6:6.2f} us + {c['s_per_param'] * 1e12:6.1f} ps/param"
                     f" + b x {c['s_per_flop'] * 1e12:5.2f} ps/flop (summary only; worst error "
                     f"{residual['affine_' + direction]:.0%}, so the table is used)")
    lines += kinds_text(profile.get("kinds", {}), residual.get("kinds", {}))
    opt = profile["optimizer"]
    lines.append("  optimizer    " + ", ".join(f"{p / 1e6:.2f}M params {t * 1e3:.2f} ms"
                                        for p, t in zip(opt["params"], opt["seconds"])))
    for name, link in profile["links"].items():
        bandwidth = "inf" if link["bandwidth_Bps"] is None else f"{link['bandwidth_Bps'] / 1e9:.3f} GB/s"
        lines.append(f"  {name:<12} latency {link['latency_s'] * 1e6:.2f} us, bandwidth {bandwidth}, "
                     f"{'duplex' if link.get('duplex', True) else 'one channel shared by both directions'}")
        if "rendezvous_bytes" in link:
            rendezvous = link["rendezvous_bytes"]
            lines.append("               " + ("every probed message moved while its sender computed" if rendezvous is None
                                          else f"messages from {rendezvous >> 10} KiB on wait for both ranks' "
                                               "MPI calls (rendezvous without asynchronous progress)"))
    lines.append(f"  per action   {profile['action_overhead_s'] * 1e6:.1f} us overhead")
    return "\n".join(lines)


def kinds_text(kinds: dict, worst: dict) -> list[str]:
    """Per kind: the shapes measured, and the fitted law of the whole backward with its worst error."""
    lines = []
    for kind, data in kinds.items():
        law = data["laws"]["backward"]
        sizes = sorted({b for shape in data["shapes"] for b in shape["microbatch_sizes"]})
        lines.append(f"  {kind:<17} {len(data['shapes'])} shape(s) at micro-batch sizes {sizes}; backward law "
                     f"{law['fixed_s'] * 1e6:.1f} us + b x ({law['s_per_flop'] * 1e12:.2f} ps/flop + "
                     f"{law['s_per_byte'] * 1e12:.1f} ps/byte), worst error "
                     f"{worst.get(kind + '_backward', 0.0):.0%}")
    return lines


def layer_table_text(model, rows) -> str:
    """`show-model`: one line per layer, per sample; the index is what partitions count."""
    loss = (f"per sample; loss {model.loss} saves {fmt_bytes(model.loss_saved_bytes_per_sample)} "
            "more on the last piece; a partition counts or ranges these indices")
    header = (f"{'index':>5}  {'kind':<18} {'output shape':<16} {'params':>13} {'FLOPs':>10} {'saved':>11} "
              f"{'message at a cut after it':>26}")
    lines = [model.describe(), loss, header]
    for r in rows:
        message = "-" if r.message_bytes_per_sample is None else fmt_bytes(r.message_bytes_per_sample)
        lines.append(f"{r.index:>5}  {r.kind:<18} {'x'.join(map(str, r.output_shape)):<16} {r.params:>13,} "
                     f"{r.forward_flops_per_sample:>10.3g} {fmt_bytes(r.saved_bytes_per_sample):>11} {message:>26}")
    lines.append(f"{'total':>5}  {'':<18} {'':<16} {model.params:>13,} "
                 f"{sum(r.forward_flops_per_sample for r in rows):>10.3g} "
                 f"{fmt_bytes(sum(r.saved_bytes_per_sample for r in rows)):>11}")
    return "\n".join(lines)


# --- optimize and sweep --------------------------------------------------------


def what_ifs_text(costs) -> str:
    """The heterogeneous-cluster what-ifs of a cost model, for humans ("" when none)."""
    parts = [f"rank {rank} at {factor:g}x speed" for rank, factor in getattr(costs, "rank_speed", ())]
    for (a, b), override in getattr(costs, "link_overrides", ()):
        values = []
        if override.bandwidth_Bps is not None:
            values.append(f"{override.bandwidth_Bps:.4g} B/s")
        if override.latency_s is not None:
            values.append(f"latency {override.latency_s * 1e6:g} us")
        parts.append(f"link {a}-{b} " + ", ".join(values))
    return "; ".join(parts)


def cap_text(cap_bytes: int | None) -> str:
    return f"memory cap {fmt_bytes(cap_bytes)}" if cap_bytes else "no memory cap"


def search_text(optimum) -> str:
    from ..optimize import count_partitions

    problem = optimum.problem
    total = count_partitions(problem.model.num_layers, problem.num_pieces)
    best_s = optimum.best.metrics.iteration_time_s
    head = f"search: {total:,} partitions, {len(optimum.candidates)} simulated; "
    if optimum.proven:
        return head + "optimal (every other partition's lower bound is at least the best simulated time)"
    gap = (best_s - optimum.remaining_bound_s) / best_s
    return head + (f"best found, not proven: no partition can be more than {gap:.2%} faster "
                   f"(lower bound {fmt_s(optimum.remaining_bound_s)})")


def optimum_text(optimum) -> str:
    problem, best, even = optimum.problem, optimum.best, optimum.even
    what_ifs = what_ifs_text(problem.costs)
    lines = [
        f"model      {problem.model.describe()}",
        f"profile    {problem.profile_name}" + (f"; what-ifs: {what_ifs}" if what_ifs else ""),
        *extrapolated_text(best.extrapolated),
        f"pipeline   {problem.schedule.name}, {problem.num_stages} stages x {problem.schedule.num_chunks} chunk(s), "
        f"{problem.num_microbatches} micro-batches "
        f"x {problem.microbatch_size} samples (batch {problem.batch_size}); {cap_text(problem.memory_cap_bytes)}",
        *recompute_text(optimum),
        "",
        f"{'':<11} {'partition':<24} {'iteration':>12} {'speedup':>8} {'peak memory':>12}",
    ]
    for label, p, fits in (("optimized", best, True), ("even split", even, optimum.even_fits)):
        lines.append(f"{label:<11} {p.plan.partition!s:<24} {fmt_s(p.metrics.iteration_time_s):>12} "
                     f"{p.speedup:>7.2f}x {fmt_bytes(p.metrics.peak_memory_bytes):>12}"
                     + ("" if fits else "  (over the cap)"))
    lines += [
        "",
        f"the optimized partition is {optimum.gain_over_even:.3f}x as fast as the even split "
        f"({(1 - 1 / optimum.gain_over_even):.1%} less time per step)",
        search_text(optimum),
        "",
        f"{'rank':>4}  {'layers':<8} {'busy':>12} {'idle':>12} {'peak memory':>12}   "
        f"{'even: layers':<12} {'peak memory':>12}",
    ]
    for r, e in zip(best.metrics.ranks, even.metrics.ranks):
        lines.append(f"{r.rank:>4}  {layer_text(best.plan, r.rank):<8} {fmt_s(r.busy_s):>12} {fmt_s(r.idle_s):>12} "
                     f"{fmt_bytes(r.peak_memory_bytes):>12}   {layer_text(even.plan, r.rank):<12} "
                     f"{fmt_bytes(e.peak_memory_bytes):>12}")
    return "\n".join(lines)


def sweep_text(sweep) -> str:
    lines = [f"model {sweep.model_name} ({sweep.num_layers} layers); batch {sweep.batch_size}; partition "
             f"{sweep.partition_mode}; one rank {fmt_s(sweep.baseline_time_s)}; {cap_text(sweep.memory_cap_bytes)}",
             f"{'schedule':<8} {'stages':>6} {'micro':>6} {'iteration':>12} {'speedup':>8} {'pm/(m+p-1)':>10} "
             f"{'bubble':>7} {'peak memory':>12} {'fits':>5}  partition"]
    for r in sweep.results:
        p = r.point
        if not r.ok:
            lines.append(f"{p.schedule:<8} {p.num_stages:>6} {p.num_microbatches:>6}  skipped: {r.skipped}")
            continue
        lines.append(f"{p.schedule:<8} {p.num_stages:>6} {p.num_microbatches:>6} {fmt_s(r.iteration_time_s):>12} "
                     f"{sweep.speedup(r):>7.2f}x {p.closed_form_speedup:>9.2f}x {r.bubble_fraction:>7.1%} "
                     f"{fmt_bytes(r.peak_memory_bytes):>12} {'yes' if sweep.fits(r) else 'NO':>5}  "
                     f"{','.join(map(str, r.partition))}")
    best = sweep.recommended()
    lines.append("")
    if best is None:
        lines.append(f"no configuration fits the {cap_text(sweep.memory_cap_bytes)}")
    else:
        lines.append(f"recommended ({cap_text(sweep.memory_cap_bytes)}): {best.point.schedule}, "
                     f"{best.point.num_stages} stages, {best.point.num_microbatches} micro-batches: "
                     f"{fmt_s(best.iteration_time_s)}, {sweep.speedup(best):.2f}x, peak memory "
                     f"{fmt_bytes(best.peak_memory_bytes)}")
    lines.append(f"{len(sweep.results)} configurations in {sweep.wall_s:.2f} s")
    return "\n".join(lines)


def searched_text(optima) -> str:
    """One line per (schedule, chunks) searched, fastest first."""
    lines = [f"{'schedule':<18} {'chunks':>6} {'iteration':>12}  proven  partition"]
    for o in optima:
        lines.append(f"{o.problem.build_schedule().name:<18} {o.problem.build_schedule().num_chunks:>6} "
                     f"{o.best.metrics.iteration_time_s * 1e3:>9.3f} ms  {'yes' if o.proven else 'no':<6}  "
                     f"{o.best.plan.partition}")
    return "\n".join(lines)


def shapes_text(search) -> str:
    """optimize --ranks: the best shape, and why (the best of every stage count beside it)."""
    best = search.best
    p = best.prediction
    lines = [f"{search.ranks} ranks, batch {search.batch_size}; {cap_text(search.memory_cap_bytes)}; "
             f"{len(search.results)} shapes tried (P x D = {search.ranks}, every m dividing B/D)", "",
             f"{'stages':>6} {'replicas':>8} {'micro':>6} {'schedule':<17} {'iteration':>12} {'bubble':>7} "
             f"{'all-reduce':>11} {'peak memory':>12}  partition"]
    for stages, r in search.best_per_stage_count().items():
        m = r.prediction.metrics
        mark = " <- best" if r is best else ""
        lines.append(f"{stages:>6} {r.shape.data_parallel:>8} {r.shape.num_microbatches:>6} "
                     f"{r.prediction.plan.schedule.name:<17} {fmt_s(m.iteration_time_s):>12} "
                     f"{m.bubble_fraction:>7.1%} {fmt_s(r.prediction.exposed_allreduce_s):>11} "
                     f"{fmt_bytes(m.peak_memory_bytes):>12}  {r.prediction.plan.partition}{mark}")
    lines += ["", f"best: {best.shape.describe()}, partition {p.plan.partition}"
              f"{' (optimize search)' if best.optimized else ' (balanced cut)'}: {fmt_s(p.metrics.iteration_time_s)}",
              "why:  " + shape_reasons(search)]
    return "\n".join(lines)


def shape_reasons(search) -> str:
    """The best shape against the best of each other stage count: what each loses on."""
    best = search.best.prediction
    reasons = []
    for stages, r in search.best_per_stage_count().items():
        if r is search.best:
            continue
        q = r.prediction
        bubble = (q.metrics.bubble_fraction - best.metrics.bubble_fraction) * q.metrics.iteration_time_s
        exposed = q.exposed_allreduce_s - best.exposed_allreduce_s
        memory = "" if q.metrics.peak_memory_bytes <= best.metrics.peak_memory_bytes else \
            f", needs {fmt_bytes(q.metrics.peak_memory_bytes)}"
        main = "a larger bubble" if bubble >= exposed else "more exposed all-reduce"
        reasons.append(f"P={stages} is {q.metrics.iteration_time_s / best.metrics.iteration_time_s:.2f}x slower "
                       f"({main}: bubble {q.metrics.bubble_fraction:.0%} vs {best.metrics.bubble_fraction:.0%}, "
                       f"all-reduce {fmt_s(q.exposed_allreduce_s)} vs {fmt_s(best.exposed_allreduce_s)}{memory})")
    fitting = search.best_per_stage_count()
    over: dict[int, int] = {}
    for r in search.results:
        if r.prediction is not None and not r.fits and r.shape.num_stages not in fitting:
            peak = r.prediction.metrics.peak_memory_bytes
            over[r.shape.num_stages] = min(over.get(r.shape.num_stages, peak), peak)
    reasons += [f"P={p} exceeds the memory cap (needs at least {fmt_bytes(peak)})" for p, peak in sorted(over.items())]
    return "; ".join(reasons) or "the only stage count that exists"
