"""What a run is asked to do, as plain data the launcher hands to every rank.

Carries the plan itself (model layers, partition, schedule text), so the ranks
interpret exactly the schedule object the caller built. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..model import ModelSpec, fc_layer
from ..partition import Partition
from ..plan import Plan
from ..schedule import Schedule


@dataclass(frozen=True)
class RunConfig:
    model_name: str
    layer_shapes: tuple[tuple[int, int], ...]  # (in_features, out_features) of each fc layer
    partition: tuple[int, ...]  # layers per piece (P x V pieces)
    schedule_name: str
    schedule_text: str
    batch_size: int
    iterations: int = 20
    warmup: int = 5
    threads_per_rank: int = 1
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "cpu"
    params_path: str = ""  # when set, rank 0 saves the trained parameters here (.npz)
    progress: bool = True  # rank 0 prints a line every 10 steps
    fail_on_rank: int = -1  # fault injection for tests: this rank raises at its first step

    @classmethod
    def from_plan(cls, plan: Plan, **options) -> RunConfig:
        return cls(
            model_name=plan.model.name,
            layer_shapes=tuple((x.in_features, x.out_features) for x in plan.model.layers),
            partition=plan.partition.counts,
            schedule_name=plan.schedule.name,
            schedule_text=plan.schedule.to_text(),
            batch_size=plan.batch_size,
            **options,
        )

    def plan(self) -> Plan:
        model = ModelSpec(self.model_name, tuple(fc_layer(i, o) for i, o in self.layer_shapes))
        schedule = Schedule.from_text(self.schedule_text, self.schedule_name)
        return Plan(model, Partition.from_counts(self.partition), schedule, self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunConfig:
        data = {**data, "layer_shapes": tuple(tuple(x) for x in data["layer_shapes"]),
                "partition": tuple(data["partition"])}
        return cls(**data)
