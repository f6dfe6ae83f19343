"""What a job is asked to do, as plain data the launcher hands to every rank.

A job file (``python -m pipesim.runner.worker JOB.json``) names the job, its
config and where rank 0 writes the gathered result. The configs are frozen
dataclasses, written with `wire.to_dict` and read back strictly with
`wire.from_dict`: a missing or unknown key is a one-line error.

RunConfig carries the plan itself (model layers, partition, schedule text), so
the ranks interpret exactly the schedule object the caller built. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict, Unpack

from ..errors import read_user_text
from ..model import ModelSpec, fc_layer
from ..partition import Partition
from ..plan import Plan
from ..schedule import Schedule
from ..wire import WireError, from_dict, to_dict


class RunOptions(TypedDict, total=False):
    """RunConfig's fields beyond the plan, as keywords: ``measure(plan, **options)``
    (mypy checks the callers' names and types against these)."""

    iterations: int
    warmup: int
    threads_per_rank: int
    optimizer: str
    seed: int
    device: str
    params_path: str
    progress: bool
    fail_on_rank: int


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
    def from_plan(cls, plan: Plan, **options: Unpack[RunOptions]) -> RunConfig:
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

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: object, where: str = "") -> RunConfig:
        return from_dict(cls, data, where)


@dataclass(frozen=True)
class RunBatch:
    """Several runs in one MPI job (tests batch their configurations so)."""

    runs: tuple[RunConfig, ...]


@dataclass(frozen=True)
class MicrobenchConfig:
    """The calibration micro-benchmarks (runner/microbench.py) every rank runs."""

    widths: tuple[int, ...]
    microbatch_sizes: tuple[int, ...]
    message_sizes: tuple[int, ...]  # bytes
    repeats: int
    warmup: int
    pingpong_repeats: int
    threads_per_rank: int
    optimizer: str
    seed: int
    stack_bytes: int  # weights per timed stack


@dataclass(frozen=True)
class GlooBenchConfig:
    """The gloo transport's measurements (runner/gloo.py): ping-pongs and a torch 1F1B probe."""

    message_sizes: tuple[int, ...]  # bytes
    pingpong_repeats: int
    threads_per_rank: int
    seed: int
    probe_width: int
    probe_layers_per_stage: int
    probe_microbatches: int
    probe_mb_size: int
    iterations: int
    warmup: int


JobConfig = RunConfig | RunBatch | MicrobenchConfig | GlooBenchConfig
JOBS: dict[str, type[JobConfig]] = {"run": RunConfig, "runs": RunBatch, "calibrate": MicrobenchConfig,
                                    "gloo": GlooBenchConfig}


def job_name(config: JobConfig) -> str:
    return next(name for name, kind in JOBS.items() if isinstance(config, kind))


@dataclass(frozen=True)
class JobFile:
    config: JobConfig
    result_path: str  # where rank 0 writes the gathered result (JSON)

    def to_dict(self) -> dict[str, Any]:
        return {"job": job_name(self.config), "config": to_dict(self.config), "result_path": self.result_path}

    @classmethod
    def from_dict(cls, data: object, where: str = "job file") -> JobFile:
        keys = ("job", "config", "result_path")
        if not isinstance(data, dict) or set(data) != set(keys):
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise WireError(f"{where}: expected an object with keys {', '.join(keys)}, got {found}")
        if data["job"] not in JOBS:
            raise WireError(f"{where}: unknown job {data['job']!r} (allowed: {', '.join(JOBS)})")
        if not isinstance(data["result_path"], str):
            raise WireError(f"{where}: result_path: expected a str, got {data['result_path']!r:.60}")
        return cls(from_dict(JOBS[data["job"]], data["config"], f"{where}: config"), data["result_path"])


def write_job_file(path: Path, job: JobFile) -> None:
    path.write_text(json.dumps(job.to_dict()))


def load_job_file(path: str | Path) -> JobFile:
    """The job file at `path`; anything malformed raises WireError (one line)."""
    text = read_user_text(path, WireError, "job")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WireError(f"job file {path}: not JSON ({exc})") from None
    return JobFile.from_dict(data, f"job file {path}")
