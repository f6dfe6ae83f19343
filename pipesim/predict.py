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
    ranks_per_node: int | None = None  # the what-if that places global ranks on nodes
    exposed_allreduce_s: float = 0.0  # how much the gradient all-reduces lengthen the step (D > 1)
    extrapolated: tuple = ()  # kindcosts.Extrapolation of each layer not costed from its own measured shape

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


def simulate_plan(plan: Plan, costs: CostModel, path: str = "auto"):
    """One step of `plan`: the pipeline, or with D > 1 every replica and the all-reduces."""
    if plan.data_parallel == 1:
        return simulate(plan.schedule, plan.partition, plan.model, costs, plan.microbatch_size, path,
                        recompute=plan.recompute)
    from .dataparallel import simulate_data_parallel

    return simulate_data_parallel(plan, costs, plan.layout(getattr(costs, "ranks_per_node", None)), path)


def predict(plan: Plan, costs: CostModel, profile_name: str) -> Prediction:
    timeline = simulate_plan(plan, costs)
    exposed = timeline.exposed_allreduce_s() if hasattr(timeline, "exposed_allreduce_s") else 0.0
    extrapolations = getattr(costs, "extrapolations", None)
    return Prediction(plan, profile_name, timeline, compute_metrics(timeline),
                      baseline_time_s(plan.model, plan.batch_size, costs), getattr(timeline, "engine_path", "des"),
                      getattr(costs, "ranks_per_node", None), exposed,
                      tuple(extrapolations(plan.model.layers)) if extrapolations else ())
