"""The prediction workflow: plan -> simpy engine -> timeline -> metrics."""

from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .engine import simulate
from .model import ModelSpec
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


def baseline_plan(model: ModelSpec, batch_size: int) -> Plan:
    """The single-rank baseline every speedup is measured against (predict, sweep,
    run --baseline, validation): the whole model on one rank, the whole mini-batch
    at once, no pipelining. Built here and nowhere else."""
    return make_plan(model, 1, 1, batch_size, "gpipe", str(model.num_layers))


def baseline_time_s(model: ModelSpec, batch_size: int, costs: CostModel) -> float:
    single = baseline_plan(model, batch_size)
    return compute_metrics(simulate(single.schedule, single.partition, single.model, costs,
                                    single.microbatch_size)).iteration_time_s


def predict(plan: Plan, costs: CostModel, profile_name: str) -> Prediction:
    timeline = simulate(plan.schedule, plan.partition, plan.model, costs, plan.microbatch_size,
                        recompute=plan.recompute)
    return Prediction(plan, profile_name, timeline, compute_metrics(timeline),
                      baseline_time_s(plan.model, plan.batch_size, costs), getattr(timeline, "engine_path", "des"))
