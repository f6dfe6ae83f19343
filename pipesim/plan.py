"""A pipeline plan: the model, its partition and the schedule, resolved once.

Both `pipesim predict` (the simulator) and `pipesim run` (the real runner)
build their work from the same Plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import CostModel
from .limits import check_size, check_work, work_s
from .model import ModelSpec
from .partition import Partition, check_stage_count, parse_partition
from .schedule import Schedule, ScheduleError, build_schedule


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    partition: Partition
    schedule: Schedule
    batch_size: int

    @property
    def num_stages(self) -> int:
        return self.schedule.num_stages

    @property
    def num_microbatches(self) -> int:
        return self.schedule.num_microbatches

    @property
    def microbatch_size(self) -> int:
        return self.batch_size // self.num_microbatches

    def stage_layers(self, stage: int):
        first, last = self.partition.bounds[stage]
        return self.model.layers[first : last + 1]


def layer_costs(model: ModelSpec, costs: CostModel, microbatch_size: int,
                rank: int | None = None) -> list[float]:
    """Forward + backward seconds of each layer at one micro-batch size (on `rank`)."""
    return [
        costs.compute_s([layer], "F", microbatch_size, rank=rank)
        + costs.compute_s([layer], "B", microbatch_size, rank=rank)
        for layer in model.layers
    ]


def make_plan(
    model: ModelSpec,
    num_stages: int,
    num_microbatches: int,
    batch_size: int,
    schedule: str = "1f1b",
    partition: str = "balanced",
    costs: CostModel | None = None,
) -> Plan:
    """Resolve a partition description and build the schedule.

    `balanced` minimises the slowest stage under `costs`, stage s costed on
    rank s (equal layer costs when no cost model is given).
    """
    if batch_size < 1 or num_microbatches < 1 or batch_size % num_microbatches:
        raise ScheduleError(
            f"--batch-size {batch_size} must be a positive multiple of --microbatches {num_microbatches}"
        )
    microbatch_size = batch_size // num_microbatches
    check_size(model.num_layers, num_stages, num_microbatches)
    balanced = partition.strip() == "balanced"
    if balanced:  # before costing every rank
        check_stage_count(model.num_layers, num_stages)
    check_work(work_s(model.num_layers, num_stages, num_microbatches, balanced),
               f"planning and simulating {model.num_layers} layers on {num_stages} stages")
    weights = None
    if costs is not None and balanced:
        weights = [layer_costs(model, costs, microbatch_size, rank) for rank in range(max(num_stages, 1))]
    cut = parse_partition(partition, model.num_layers, num_stages, stage_layer_costs=weights)
    return Plan(model, cut, build_schedule(schedule, cut.num_stages, num_microbatches), batch_size)
