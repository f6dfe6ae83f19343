"""The `--json` layouts of every command, as plain dicts (printed with checks.finite_json).

`predict --json` and `run --json` share `result_json`'s fields, so a prediction
and a measurement compare field by field.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..optimize import Optimum, count_partitions, fits_cap
from ..plan import Plan
from ..predict import Prediction
from ..sweep import PointResult, Sweep
from ..timeline import Metrics

if TYPE_CHECKING:  # the runner's module is only imported where a run happened
    from ..runner.results import Measurement


def result_json(plan: Plan, metrics: Metrics, ranks_per_node: int | None = None, **extra) -> dict:
    """The fields `predict --json` and `run --json` share, so they compare field by field.
    Ranks are global ranks, each with its (replica, stage, node)."""
    ranks = []
    layout = plan.layout(ranks_per_node)
    for rank_metrics in metrics.ranks:
        where = layout.describe(rank_metrics.rank)
        pieces = plan.rank_bounds(where["stage"])
        ranks.append({
            "rank": rank_metrics.rank,
            **where,
            "first_layer": pieces[0][0],  # of the rank's first piece
            "last_layer": pieces[0][1],
            "layer_ranges": [list(bounds) for bounds in pieces],
            "busy_s": rank_metrics.busy_s,
            "idle_s": rank_metrics.idle_s,
            "bubble_fraction": rank_metrics.bubble_fraction,
            "peak_activation_bytes": rank_metrics.peak_activation_bytes,
            "peak_memory_bytes": rank_metrics.peak_memory_bytes,
        })
    return {
        "model": plan.model.name,
        "num_layers": plan.model.num_layers,
        "schedule": plan.schedule.name,
        "num_stages": plan.num_stages,
        "num_chunks": plan.num_chunks,
        "num_microbatches": plan.num_microbatches,
        "data_parallel": plan.data_parallel,
        "placement": plan.placement,
        "world_size": plan.world_size,
        "batch_size": plan.batch_size,
        "microbatch_size": plan.microbatch_size,
        "partition": list(plan.partition.counts),
        "iteration_time_s": metrics.iteration_time_s,
        "bubble_fraction": metrics.bubble_fraction,
        "throughput_samples_per_s": plan.batch_size / metrics.iteration_time_s,
        "peak_memory_bytes": metrics.peak_memory_bytes,
        **extra,
        "ranks": ranks,
    }


def prediction_json(prediction: Prediction) -> dict:
    return result_json(
        prediction.plan,
        prediction.metrics,
        prediction.ranks_per_node,
        exposed_allreduce_s=prediction.exposed_allreduce_s,
        baseline_time_s=prediction.baseline_time_s,
        speedup=prediction.speedup,
        profile=prediction.profile,
        source="simulated",
        engine_path=prediction.engine_path,
        extrapolated=[e.to_json() for e in prediction.extrapolated],
    )


def sweep_json(sweep: Sweep) -> dict:
    best = sweep.recommended()
    return {
        "model": sweep.model_name,
        "num_layers": sweep.num_layers,
        "batch_size": sweep.batch_size,
        "partition_mode": sweep.partition_mode,
        "baseline_time_s": sweep.baseline_time_s,
        "memory_cap_bytes": sweep.memory_cap_bytes,
        "wall_s": sweep.wall_s,
        "recommended": None if best is None else _point_json(sweep, best),
        "points": [_point_json(sweep, r) for r in sweep.results],
    }


def _point_json(sweep: Sweep, r: PointResult) -> dict:
    data = {"num_stages": r.point.num_stages, "num_microbatches": r.point.num_microbatches,
            "schedule": r.point.schedule, "closed_form_speedup": r.point.closed_form_speedup}
    if not r.ok:
        return {**data, "skipped": r.skipped}
    return {**data, "partition": list(r.partition), "iteration_time_s": r.iteration_time_s,
            "speedup": sweep.speedup(r), "bubble_fraction": r.bubble_fraction,
            "peak_memory_bytes": r.peak_memory_bytes, "rank_peak_memory_bytes": list(r.rank_peak_memory_bytes),
            "fits_memory_cap": sweep.fits(r)}


def optimum_json(optimum: Optimum, top: int = 5) -> dict:
    problem = optimum.problem
    return {
        **prediction_json(optimum.best),
        "memory_cap_bytes": problem.memory_cap_bytes,
        "recompute": {"pieces": list(problem.recompute), "reason": optimum.recompute_reason,
                      "tried": list(optimum.recompute_tried)},
        "proven_optimal": optimum.proven,
        "remaining_lower_bound_s": None if math.isinf(optimum.remaining_bound_s) else optimum.remaining_bound_s,
        "partitions_total": count_partitions(problem.model.num_layers, problem.num_pieces),
        "partitions_simulated": len(optimum.candidates),
        "gain_over_even": optimum.gain_over_even,
        "even_split": {**prediction_json(optimum.even), "fits_memory_cap": optimum.even_fits},
        "candidates": [
            {"partition": list(c.partition.counts), "iteration_time_s": c.iteration_time_s,
             "lower_bound_s": c.lower_bound_s, "peak_memory_bytes": max(c.peak_memory_bytes),
             "fits_memory_cap": fits_cap(problem, c.peak_memory_bytes)}
            for c in optimum.candidates[:top]
        ],
    }


def searched_json(optima: list[Optimum]) -> list[dict]:
    """One entry per (schedule, chunks) searched, fastest first."""
    return [{"schedule": o.problem.build_schedule().name, "num_chunks": o.problem.build_schedule().num_chunks,
             "partition": list(o.best.plan.partition.counts), "iteration_time_s": o.best.metrics.iteration_time_s,
             "proven_optimal": o.proven} for o in optima]


def measurement_json(m: Measurement, **extra: Any) -> dict[str, Any]:
    data = result_json(
        m.plan,
        m.metrics,
        iteration_time_s=m.median_s,
        iteration_times_s=m.iteration_times_s,
        p10_s=m.percentile_s(10),
        p90_s=m.percentile_s(90),
        source="measured",
        mpi=m.mpi,
        **extra,
    )
    data["throughput_samples_per_s"] = m.plan.batch_size / m.median_s
    for rank in data["ranks"]:
        rank["peak_rss_bytes"] = m.peak_rss_bytes[rank["rank"]]
        rank["host"] = m.hosts[rank["rank"]]
    return data


def shapes_json(search) -> dict:
    """optimize --ranks: the best shape's prediction, and the best of every stage count."""
    best = search.best
    return {**prediction_json(best.prediction), "ranks_searched": search.ranks, "shapes_tried": len(search.results),
            "partition_searched": best.optimized, "memory_cap_bytes": search.memory_cap_bytes,
            "best_per_stage_count": [
                {"num_stages": p, "data_parallel": r.shape.data_parallel, "num_microbatches": r.shape.num_microbatches,
                 "schedule": r.prediction.plan.schedule.name, "num_chunks": r.prediction.plan.num_chunks,
                 "partition": list(r.prediction.plan.partition.counts),
                 "iteration_time_s": r.prediction.metrics.iteration_time_s,
                 "bubble_fraction": r.prediction.metrics.bubble_fraction,
                 "exposed_allreduce_s": r.prediction.exposed_allreduce_s,
                 "peak_memory_bytes": r.prediction.metrics.peak_memory_bytes}
                for p, r in search.best_per_stage_count().items()]}


def layer_table_json(model, rows) -> dict:
    """`show-model --json`: the model's totals and one object per layer (per sample)."""
    return {"model": model.name, "num_layers": model.num_layers, "params": model.params, "loss": model.loss,
            "loss_saved_bytes_per_sample": model.loss_saved_bytes_per_sample,
            "layers": [{"index": r.index, "kind": r.kind, "output_shape": list(r.output_shape), "params": r.params,
                        "forward_flops_per_sample": r.forward_flops_per_sample,
                        "saved_bytes_per_sample": r.saved_bytes_per_sample,
                        "message_bytes_per_sample": r.message_bytes_per_sample} for r in rows]}
