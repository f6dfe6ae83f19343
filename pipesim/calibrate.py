"""`pipesim calibrate`: measure costs with the runner, fit them, write a profile.

The measuring happens in the ranks (runner/microbench.py); this module fits
what they return with scipy and assembles the profile file (profile.py).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import socket
import statistics
import tomllib
import typing
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy.optimize import lsq_linear

from .kindcosts import DIRECTIONS, KindCosts, MeasuredShape, fit_law, moved_bytes_per_sample
from .model import LayerSpec, ModelSpec, fc, parse_model
from .plan import Plan, make_plan
from .profile import SCHEMA, VERSION, parse_profile
from .runner.config import GlooBenchConfig, KindJob, MicrobenchConfig
from .runner.records import (
    ColdSample,
    ComputeSample,
    GlooResult,
    KindSample,
    LinkSample,
    MicrobenchResult,
    OptimizerSample,
    ProgressSample,
    RankSamples,
)

Log = Callable[[str], object]
KiB, MiB = 1 << 10, 1 << 20
LARGE_MESSAGE = 64 * KiB
DUPLEX_RATIO = 1.5  # both-ways / one-way time below this: each direction has its own channel
DEFAULT_WIDTHS = (256, 384, 512, 768, 1024)
DEFAULT_MICROBATCH_SIZES = (4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_MESSAGE_SIZES = (1, 16, 256, 4 * KiB, 64 * KiB, 1 * MiB, 4 * MiB, 16 * MiB, 64 * MiB)
# The short real pipeline runs that fit the per-action overhead: 4 layers per
# stage at width 256, micro-batches of 4 (not a validation configuration).
OVERHEAD_WIDTH, OVERHEAD_LAYERS_PER_STAGE, OVERHEAD_MICROBATCHES, OVERHEAD_MB_SIZE = 256, 4, 8, 4
# Layer kinds by shape (runner/kindbench.py): each model at the micro-batch sizes of this list
# whose forward pass stays within the FLOP budget (at least the first two), so that a small
# model measures in well under a minute.
KIND_MICROBATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
KIND_FLOP_BUDGET = 4.2e9


@dataclass(frozen=True)
class CalibrationSettings:
    ranks: int = 2
    widths: tuple[int, ...] = DEFAULT_WIDTHS
    microbatch_sizes: tuple[int, ...] = DEFAULT_MICROBATCH_SIZES
    message_sizes: tuple[int, ...] = DEFAULT_MESSAGE_SIZES
    repeats: int = 30
    warmup: int = 3
    pingpong_repeats: int = 20
    threads_per_rank: int = 1
    optimizer: str = "sgd"
    seed: int = 0
    stack_bytes: int = 16 * MiB  # weights per timed stack: like a real stage's, beyond the caches
    overhead_iterations: int = 20
    allreduce_sizes: tuple[int, ...] = tuple(4 * KiB * 4**k for k in range(8))  # 4 KiB .. 64 MiB
    kind_jobs: tuple[KindJob, ...] = ()  # models measured layer by layer, by kind and shape
    kind_repeats: int = 10
    kind_warmup: int = 2
    transport: str = "mpi"  # "gloo": also measure torch.distributed's gloo links and pipelining overhead
    extra_metadata: dict[str, str] = field(default_factory=dict)

    def microbench(self) -> MicrobenchConfig:
        """The micro-benchmarks' job: what every rank measures."""
        return MicrobenchConfig(
            widths=self.widths, microbatch_sizes=self.microbatch_sizes, message_sizes=self.message_sizes,
            repeats=self.repeats, warmup=self.warmup, pingpong_repeats=self.pingpong_repeats,
            threads_per_rank=self.threads_per_rank, optimizer=self.optimizer, seed=self.seed,
            stack_bytes=self.stack_bytes, allreduce_sizes=self.allreduce_sizes, kind_jobs=self.kind_jobs,
            kind_repeats=self.kind_repeats, kind_warmup=self.kind_warmup)

    def gloo_bench(self) -> GlooBenchConfig:
        """The gloo transport's job: ping-pongs and torch's 1F1B on the overhead probe."""
        return GlooBenchConfig(
            message_sizes=self.message_sizes, pingpong_repeats=self.pingpong_repeats,
            threads_per_rank=self.threads_per_rank, seed=self.seed, probe_width=OVERHEAD_WIDTH,
            probe_layers_per_stage=OVERHEAD_LAYERS_PER_STAGE, probe_microbatches=OVERHEAD_MICROBATCHES,
            probe_mb_size=OVERHEAD_MB_SIZE, iterations=self.overhead_iterations, warmup=3)


def kind_microbatch_sizes(model: ModelSpec) -> tuple[int, ...]:
    """The micro-batch sizes a model's layers are timed at (KIND_FLOP_BUDGET)."""
    flops = sum(layer.forward_flops_per_sample for layer in model.layers)
    fitting = [b for b in KIND_MICROBATCH_SIZES if b * flops <= KIND_FLOP_BUDGET]
    return tuple(fitting) if len(fitting) >= 2 else KIND_MICROBATCH_SIZES[:2]


def calibration_models(model_files: Sequence[str], log: Log) -> tuple[tuple[int, ...], tuple[KindJob, ...]]:
    """`calibrate --model`'s files: the fc widths of the models made of fc layers only (their
    tables, as before), and a kind job (runner/kindbench.py) for each model with other kinds."""
    from .errors import read_user_text
    from .model import ModelError

    widths: set[int] = set()
    jobs = []
    for path in model_files:
        text = read_user_text(path, ModelError, "model")
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ModelError(f"{path}: not valid TOML: {exc}") from None
        model = parse_model(data, where=path)
        if all(layer.kind == "fc" for layer in model.layers):
            widths.update(layer.out_features for layer in model.layers)
        else:
            jobs.append(KindJob(text, kind_microbatch_sizes(model)))
            log(f"calibrating the layer kinds of {path} at micro-batch sizes {list(jobs[-1].microbatch_sizes)}")
    return tuple(sorted(widths)), tuple(jobs)


# --- fitting (pure numpy/scipy: tested without MPI) ----------------------------


def fit_nonnegative(features: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, float]:
    """Least squares on relative error, coefficients >= 0. Returns (coefficients,
    max relative residual)."""
    weights = 1.0 / times
    result = lsq_linear(features * weights[:, None], np.ones_like(times), bounds=(0, np.inf))
    predicted = features @ result.x
    return result.x, float(np.max(np.abs(predicted / times - 1)))


def fit_compute(samples: Sequence[ComputeSample], direction: str) -> tuple[dict[str, float], float]:
    """t_layer = fixed_s + s_per_param * params + b * s_per_flop * flops_per_sample."""
    rows, times = [], []
    for s in samples:
        rows.append([1.0, s.params_per_layer, s.microbatch_size * s.flops_per_sample_per_layer])
        times.append(statistics.median(s.times_s(direction)))
    coef, worst = fit_nonnegative(np.array(rows), np.array(times))
    return {"fixed_s": coef[0], "s_per_param": coef[1], "s_per_sample": 0.0, "s_per_flop": coef[2]}, worst


def compute_table(samples: Sequence[ComputeSample], direction: str) -> dict[str, Any]:
    """Median per-layer seconds at each measured (width, micro-batch size), all ranks pooled."""
    pooled: dict[tuple[int, int], list[float]] = {}
    for s in samples:
        pooled.setdefault((s.width, s.microbatch_size), []).extend(s.times_s(direction))
    widths = sorted({w for w, _ in pooled})
    sizes = sorted({b for _, b in pooled})
    return {"widths": widths, "microbatch_sizes": sizes,
            "seconds": [[statistics.median(pooled[w, b]) for b in sizes] for w in widths]}


def kinds_section(models: Sequence[ModelSpec], samples: Sequence[KindSample]) -> tuple[dict, dict, dict]:
    """The profile's ``kinds`` (kindcosts.py): per measured shape the median per-layer seconds
    at each micro-batch size (ranks, and layers of one shape, pooled), per kind the fitted
    laws; and the laws' worst relative errors and the median noise, per kind and direction."""
    pooled: dict[str, dict[int, dict[str, list[float]]]] = {}
    layers: dict[str, LayerSpec] = {}
    for s in samples:
        layers[s.key] = models[s.job].layers[s.layer]
        point = pooled.setdefault(s.key, {}).setdefault(s.microbatch_size, {d: [] for d in DIRECTIONS})
        for d in DIRECTIONS:
            point[d].extend(s.times_s(d))
    by_kind: dict[str, list[MeasuredShape]] = {}
    for key, points in pooled.items():
        layer, sizes = layers[key], sorted(points)
        by_kind.setdefault(layer.kind, []).append(MeasuredShape(
            key, layer.params, layer.forward_flops_per_sample, moved_bytes_per_sample(layer), tuple(sizes),
            {d: tuple(statistics.median(points[b][d]) for b in sizes) for d in DIRECTIONS}))
    section, worst, noise = {}, {}, {}
    for kind, shapes in by_kind.items():
        laws = {}
        for d in DIRECTIONS:
            laws[d], worst[f"{kind}_{d}"] = fit_law((b, s.params, s.flops_per_sample, s.bytes_per_sample, t)
                                                    for s in shapes for b, t in zip(s.microbatch_sizes, s.seconds[d]))
            noise[f"{kind}_{d}_cv_median"] = statistics.median(
                cv(x.times_s(d)) if any(x.times_s(d)) else 0.0 for x in samples if x.kind == kind)
        section[kind] = KindCosts(kind, laws, tuple(shapes)).to_json()
    return section, worst, noise


def fit_link(samples: Sequence[LinkSample]) -> tuple[dict[str, Any], float]:
    """one-way time = latency_s + bytes / bandwidth_Bps.

    Bandwidth is fitted on the large messages (>= 64 KiB), latency comes from
    the median time of the smallest: small messages slip through a token-bucket
    shaper unshaped and ride on protocol switches, so one law fitted to every
    size at once misjudges both (seen with tc tbf: bandwidth 4x too high)."""
    by_size: dict[int, list[float]] = {}
    for s in samples:
        by_size.setdefault(s.bytes, []).extend(s.one_way_s)
    sizes = sorted(by_size)
    medians = np.array([statistics.median(by_size[n]) for n in sizes])
    large = [i for i, n in enumerate(sizes) if n >= LARGE_MESSAGE] or [len(sizes) - 1]
    rows = np.array([[1.0, sizes[i]] for i in large])
    coef, _ = fit_nonnegative(rows, medians[large])
    bandwidth = 1.0 / coef[1] if coef[1] > 0 else None
    latency = max(float(medians[0]) - sizes[0] / (bandwidth or math.inf), 0.0)
    predicted = latency + np.array(sizes) / (bandwidth or math.inf)
    link: dict[str, Any] = {"latency_s": latency, "bandwidth_Bps": bandwidth}
    exchanges = [s for s in samples if s.both_ways_s]
    if exchanges:  # sending both ways at once takes about twice one way: a shared channel
        ratio = statistics.median(statistics.median(s.both_ways_s) / statistics.median(s.one_way_s)
                                  for s in exchanges)
        link["duplex"] = bool(ratio < DUPLEX_RATIO)
    return link, float(np.max(np.abs(predicted / medians - 1)))


def fit_rendezvous(samples: Sequence[ProgressSample]) -> int | None:
    """The smallest probed size from which on every larger one waited for its sender's next MPI
    call (Link.rendezvous_bytes); None when the largest did not (messages move on their own)."""
    waits: dict[int, list[bool]] = {}
    for s in samples:
        waits.setdefault(s.bytes, []).append(s.waits_for_sender)
    threshold = None
    for nbytes in sorted(waits, reverse=True):
        if statistics.median(waits[nbytes]) < 0.5:  # most pairs saw it move on its own
            break
        threshold = nbytes
    return threshold


def fit_cold_start(samples: Sequence[ColdSample]) -> dict[str, Any] | None:
    """Per stack size, each rank's median cold time less its median warm time (F and B), the
    median over ranks, at least 0 and never less than a smaller stack's (profile.ColdStart)."""
    sizes = sorted({s.stack_bytes for s in samples})
    if not sizes:
        return None
    table: dict[str, Any] = {"width": samples[0].width, "microbatch_size": samples[0].microbatch_size,
                             "stack_bytes": sizes}
    for name, cold, warm in (("forward_s", "cold_forward_s", "warm_forward_s"),
                             ("backward_s", "cold_backward_s", "warm_backward_s")):
        extra = [max(statistics.median(statistics.median(getattr(s, cold)) - statistics.median(getattr(s, warm))
                                       for s in samples if s.stack_bytes == n), 0.0)
                 for n in sizes]  # each rank's cold less its own warm, then the median over ranks
        table[name] = [float(x) for x in np.maximum.accumulate(extra)]
    return table


def fit_optimizer(samples: Sequence[OptimizerSample]) -> tuple[dict[str, float], float]:
    """Affine in the parameter count; returned for the summary (the step time
    is superlinear once the state leaves the caches, so the table is used)."""
    rows = np.array([[1.0, s.params] for s in samples])
    times = np.array([statistics.median(s.times_s) for s in samples])
    coef, worst = fit_nonnegative(rows, times)
    return {"fixed_s": coef[0], "s_per_param": coef[1]}, worst


def optimizer_table(samples: Sequence[OptimizerSample]) -> dict[str, list[Any]]:
    pooled: dict[int, list[float]] = {}
    for s in samples:
        pooled.setdefault(s.params, []).extend(s.times_s)
    params = sorted(pooled)
    return {"params": params, "seconds": [statistics.median(pooled[p]) for p in params]}


def link_classes(processors: list[str], pairs: list[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """Each measured pair is intra_node when both ranks report the same MPI
    processor name (same host), inter_node otherwise."""
    return {pair: "intra_node" if processors[pair[0]] == processors[pair[1]] else "inter_node"
            for pair in pairs}


def cv(values: Sequence[float]) -> float:
    """Coefficient of variation (stdev / mean)."""
    return statistics.stdev(values) / statistics.mean(values) if len(values) > 1 else 0.0


# --- the workflow ---------------------------------------------------------------


def _fit_links(ranks: Sequence[RankSamples]) -> tuple[dict[str, dict[str, Any]], dict[str, float],
                                                       dict[str, float]]:
    processors = [r.processor for r in sorted(ranks, key=lambda r: r.rank)]
    samples = [s for r in ranks for s in r.links]
    progress = [s for r in ranks for s in r.progress]
    classes = link_classes(processors, sorted({s.pair for s in samples}))
    links, worst, noise = {}, {}, {}
    for name in ("intra_node", "inter_node"):
        chosen = [s for s in samples if classes[s.pair] == name]
        if chosen:
            links[name], worst[name] = fit_link(chosen)
            noise[name] = statistics.median(cv(s.one_way_s) for s in chosen)
            probed = [s for s in progress if classes.get(s.pair) == name]
            if probed:
                links[name]["rendezvous_bytes"] = fit_rendezvous(probed)
    if "intra_node" not in links:  # every neighbour pair crossed nodes
        links["intra_node"] = links["inter_node"]
    return links, worst, noise


def _summaries(compute: Sequence[ComputeSample]) -> list[dict[str, Any]]:
    return [{"width": s.width, "microbatch_size": s.microbatch_size, "rank": s.rank,
             **{key: value for d in DIRECTIONS for key, value in (
                 (f"{d}_median_s", statistics.median(s.times_s(d))), (f"{d}_cv", cv(s.times_s(d))))}}
            for s in compute]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def overhead_probe_plan(stages: int) -> Plan:
    """The short pipeline whose real runs give the per-action overhead (1F1B, even cuts)."""
    model = fc(OVERHEAD_LAYERS_PER_STAGE * stages, OVERHEAD_WIDTH, name="overhead-probe")
    return make_plan(model, stages, OVERHEAD_MICROBATCHES, OVERHEAD_MICROBATCHES * OVERHEAD_MB_SIZE, "1f1b",
                     ",".join([str(OVERHEAD_LAYERS_PER_STAGE)] * stages))


def measure_overhead(settings: CalibrationSettings, log: Log) -> list[float] | None:
    """Per-action overhead of the runner from short real pipeline runs: per rank
    and iteration, the time between its first and last action that is neither
    computing (F/B spans) nor waiting for a message, divided by the actions.
    This is the interpreter's own work: posting and testing messages, dispatch.
    None on ranks other than 0 inside an existing MPI world."""
    from .runner.results import measure

    stages = settings.ranks
    plan = overhead_probe_plan(stages)
    log(f"  overhead: real 1f1b pipeline, {stages} stages x {OVERHEAD_LAYERS_PER_STAGE} layers, width "
        f"{OVERHEAD_WIDTH}, {OVERHEAD_MICROBATCHES} micro-batches of {OVERHEAD_MB_SIZE}")
    measured = measure(plan, log, iterations=settings.overhead_iterations, warmup=3,
                       threads_per_rank=settings.threads_per_rank, optimizer=settings.optimizer,
                       progress=False)
    if measured is None:
        return None
    per_action = []
    for timeline in measured.timelines:
        for rank in range(plan.num_stages):
            actions = timeline.rank_spans(rank, ("F", "B"))
            first, last = min(s.start_s for s in actions), max(s.end_s for s in actions)
            busy = sum(s.duration_s for s in actions)
            waits = sum(s.duration_s for s in timeline.rank_spans(rank, ("wait",))
                        if first <= s.start_s < last)  # not the wait before the first action
            elapsed = last - first
            per_action.append((elapsed - busy - waits) / len(actions))
    return per_action


def _metadata(settings: CalibrationSettings, raw: MicrobenchResult) -> dict[str, Any]:
    return {
        "host": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ranks": settings.ranks,
        "threads_per_rank": settings.threads_per_rank,
        "processors": [r.processor for r in raw.ranks],
        "torch": raw.torch,
        "mpi": raw.mpi,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "settings": {k: v for k, v in asdict(settings).items() if k not in ("extra_metadata", "kind_jobs")},
        "kind_models": [{"name": model.name, "microbatch_sizes": list(job.microbatch_sizes)}
                        for model, job in zip(kind_models(settings), settings.kind_jobs)],
        **settings.extra_metadata,
    }


def _ranges(settings: CalibrationSettings) -> dict[str, Any]:
    widths, sizes = settings.widths, settings.microbatch_sizes
    fc_range = {"fc": {"width": [min(widths), max(widths)], "microbatch_size": [min(sizes), max(sizes)]}} \
        if widths else {}
    return {**fc_range,
            "message_bytes": [min(settings.message_sizes), max(settings.message_sizes)]}


def kind_models(settings: CalibrationSettings) -> list[ModelSpec]:
    return [parse_model(tomllib.loads(job.model_toml), where=f"calibration model {i}")
            for i, job in enumerate(settings.kind_jobs)]


def calibrate(settings: CalibrationSettings, name: str, log: Log = print) -> dict[str, Any] | None:
    """Run the micro-benchmarks and the overhead runs; return the profile as a dict
    (None on ranks other than 0 when started inside an MPI world: they only measure)."""
    from .runner.launch import launch

    raw = launch(settings.microbench(), MicrobenchResult, settings.ranks, settings.threads_per_rank, log)
    per_action = measure_overhead(settings, log)  # every rank takes part
    gloo = (launch(settings.gloo_bench(), GlooResult, settings.ranks, settings.threads_per_rank, log)
            if settings.transport == "gloo" else None)
    if raw is None or per_action is None or (settings.transport == "gloo" and gloo is None):
        return None
    profile = build_profile(settings, name, raw, per_action)
    if gloo is not None:
        profile["transports"] = {"gloo": gloo_transport(settings, profile, gloo)}
        parse_profile(profile)
    return profile


def gloo_transport(settings: CalibrationSettings, profile: dict[str, Any], raw: GlooResult) -> dict[str, Any]:
    """gloo's links, fitted like MPI's, and its per-action overhead: the value
    that makes the simulator's step of the probe pipeline (torch's 1F1B, gloo
    links, this profile's compute) equal the median measured step."""
    from scipy.optimize import brentq

    from .costs import ProfileCostModel
    from .engine import simulate
    from .timeline import compute_metrics

    classes = link_classes(profile["metadata"]["processors"], sorted({s.pair for s in raw.links}))
    links, worst = {}, {}
    for link_class in ("intra_node", "inter_node"):
        chosen = [s for s in raw.links if classes[s.pair] == link_class]
        if chosen:
            links[link_class], worst[link_class] = fit_link(chosen)
    if "intra_node" not in links:  # every neighbour pair crossed nodes
        links["intra_node"] = links["inter_node"]
    plan = overhead_probe_plan(settings.ranks)
    measured = statistics.median(raw.probe_step_s)
    base = parse_profile({**profile, "version": VERSION, "transports": {"gloo": {"links": links}}}).with_transport("gloo")

    def excess_s(overhead_s: float) -> float:
        costs = ProfileCostModel(replace(base, action_overhead_s=overhead_s), optimizer=settings.optimizer)
        timeline = simulate(plan.schedule, plan.partition, plan.model, costs, plan.microbatch_size)
        return compute_metrics(timeline).iteration_time_s - measured

    overhead = 0.0 if excess_s(0.0) >= 0 else brentq(excess_s, 0.0, measured, xtol=1e-7)
    return {"links": links, "action_overhead_s": overhead,
            "metadata": {"probe": "torch.distributed.pipelining Schedule1F1B, " + plan.model.name,
                         "probe_step_s_median": measured, "probe_steps": len(raw.probe_step_s),
                         "links_fit_max_relative_residual": worst, "torch": raw.torch,
                         "links_samples": [{"pair": list(s.pair), "bytes": s.bytes,
                                            "median_s": statistics.median(s.one_way_s)} for s in raw.links]}}


def _fc_parts(compute: Sequence[ComputeSample]) -> tuple[dict, dict, dict]:
    """The fc tables, their noise and their summary, when fc widths were measured."""
    if not compute:
        return {}, {}, {}
    return ({"fc": {d: compute_table(compute, d) for d in DIRECTIONS}},
            {f"{d}_cv_median": statistics.median(cv(s.times_s(d)) for s in compute) for d in DIRECTIONS},
            {"compute": _summaries(compute),
             "saved_bytes_per_sample_per_layer": sorted({round(s.saved_bytes_per_sample_per_layer) for s in compute})})


def build_profile(settings: CalibrationSettings, name: str, raw: MicrobenchResult,
                  per_action: list[float]) -> dict[str, Any]:
    """The profile file's content from the ranks' samples and the per-action overheads."""
    compute = [s for r in raw.ranks for s in r.compute]
    optimizer_samples = [s for r in raw.ranks for s in r.optimizer]
    links, links_worst, links_noise = _fit_links(raw.ranks)
    affine = {**({d: fit_compute(compute, d) for d in DIRECTIONS} if compute else {}),
              "optimizer": fit_optimizer(optimizer_samples)}
    tables, fc_noise, fc_samples = _fc_parts(compute)
    kinds, kinds_worst, kinds_noise = kinds_section(kind_models(settings), [s for r in raw.ranks for s in r.kinds])
    profile = {
        "schema": SCHEMA,
        "version": VERSION,
        "name": name,
        "description": f"Measured by `pipesim calibrate` on {socket.gethostname()} "
                       f"({_cpu_model()}, {os.cpu_count()} cores), {settings.ranks} ranks x "
                       f"{settings.threads_per_rank} thread(s), all ranks computing at once.",
        "compute": tables,
        "action_overhead_s": statistics.median(per_action),
        "optimizer": optimizer_table(optimizer_samples),
        "links": links,
        "metadata": _metadata(settings, raw),
        "ranges": _ranges(settings),
        "noise": {
            **fc_noise,
            "optimizer_cv_median": statistics.median(cv(s.times_s) for s in optimizer_samples),
            "links_cv_median": links_noise,
            "action_overhead_spread_s": [float(np.percentile(per_action, q)) for q in (10, 90)],
            **({"kinds_cv_median": kinds_noise} if kinds else {}),
        },
        "samples": {
            **fc_samples,
            "affine_fit": {key: fit for key, (fit, _) in affine.items()},
            "fit_max_relative_residual": {**{f"affine_{key}": worst for key, (_, worst) in affine.items()},
                                          "links": links_worst,
                                          **({"kinds": kinds_worst} if kinds else {})},
            "links": [{"pair": list(s.pair), "bytes": s.bytes, "median_s": statistics.median(s.one_way_s)}
                      for r in raw.ranks for s in r.links],
            "rendezvous_probe": [{"pair": list(s.pair), "bytes": s.bytes, "sender_busy_s": s.busy_s,
                                  "receiver_wait_idle_s": statistics.median(s.idle_s),
                                  "receiver_wait_sender_busy_s": statistics.median(s.sender_busy_s)}
                                 for r in raw.ranks for s in r.progress],
        },
        **({"kinds": kinds} if kinds else {}),
    }
    cold = fit_cold_start([s for r in raw.ranks for s in r.cold])
    if cold is not None:
        profile["cold_start"] = cold
        samples = typing.cast(dict[str, Any], profile["samples"])
        samples["cold_start"] = [
            {"rank": s.rank, "stack_bytes": s.stack_bytes, **{f"{k}_median_s": statistics.median(getattr(s, k))
                                                             for k in ("warm_forward_s", "warm_backward_s",
                                                                       "cold_forward_s", "cold_backward_s")}}
            for r in raw.ranks for s in r.cold]
    if raw.allreduce:
        _add_collectives(profile, raw, links)
    parse_profile(profile)  # what we write must load
    return profile


def _add_collectives(profile: dict[str, Any], raw: MicrobenchResult, links: dict[str, Any]) -> None:
    """The measured all-reduce's alpha, beta (collectives.py) and how the point-to-point fit compares."""
    from .collectives import calibrated_collectives

    processors = {r.processor for r in raw.ranks if r.rank in raw.allreduce[0].ranks}
    name = "intra_node" if len(processors) == 1 else "inter_node"
    table, record = calibrated_collectives(raw.allreduce, name, links.get(name, links["intra_node"]))
    profile["collectives"] = table
    profile["samples"]["allreduce"] = record
