"""The prediction workflow: plan -> simpy engine -> timeline -> metrics."""

from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .engine import simulate
from .plan import Plan, make_plan
from .timeline import Metrics, Timeline, compute_metrics


@dataclass(frozen=True)
class Prediction:
    plan: Plan
    profile: str
    timeline: Timeline
    metrics: Metrics
    baseline_time_s: float
    engine_path: str = "des"  # which path produced the timeline: "fast" (longest path) or "des"

    @property
    def speedup(self) -> float:
        return self.baseline_time_s / self.metrics.iteration_time_s

    @property
    def throughput_samples_per_s(self) -> float:
        return self.plan.batch_size / self.metrics.iteration_time_s


def baseline_time_s(plan: Plan, costs: CostModel) -> float:
    """The whole model on one rank, the whole mini-batch at once, no pipelining."""
    single = make_plan(plan.model, 1, 1, plan.batch_size, "gpipe", str(plan.model.num_layers))
    return compute_metrics(simulate(single.schedule, single.partition, single.model, costs,
                                    single.microbatch_size)).iteration_time_s


def predict(plan: Plan, costs: CostModel, profile_name: str) -> Prediction:
    timeline = simulate(plan.schedule, plan.partition, plan.model, costs, plan.microbatch_size)
    return Prediction(plan, profile_name, timeline, compute_metrics(timeline),
                      baseline_time_s(plan, costs), getattr(timeline, "engine_path", "des"))


def result_json(plan: Plan, metrics: Metrics, **extra) -> dict:
    """The fields `predict --json` and `run --json` share, so they compare field by field."""
    ranks = []
    for rank_metrics in metrics.ranks:
        pieces = plan.rank_bounds(rank_metrics.rank)
        ranks.append({
            "rank": rank_metrics.rank,
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
        baseline_time_s=prediction.baseline_time_s,
        speedup=prediction.speedup,
        profile=prediction.profile,
        source="simulated",
        engine_path=prediction.engine_path,
    )
