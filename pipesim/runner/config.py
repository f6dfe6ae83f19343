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
from ..model import LayerSpec, ModelSpec, layer
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
    eval_mode: bool
    memory_probe: bool
    profile_memory: bool


@dataclass(frozen=True)
class LayerWire:
    """One layer as it crosses the job boundary: its kind, its fields (JSON) and its input shape."""

    kind: str
    fields: str
    input_shape: tuple[int, ...]

    @classmethod
    def of(cls, spec: LayerSpec) -> LayerWire:
        return cls(spec.kind, json.dumps(spec.options, sort_keys=True), spec.input_shape)

    def layer(self) -> LayerSpec:
        return layer(self.kind, self.input_shape, where="job file", **json.loads(self.fields))


@dataclass(frozen=True)
class RunConfig:
    model_name: str
    layers: tuple[LayerWire, ...]
    partition: tuple[int, ...]  # layers per piece (P x V pieces)
    schedule_name: str
    schedule_text: str
    batch_size: int
    data_parallel: int  # D replicas: world = P x D ranks
    placement: str  # dataparallel.PLACEMENTS
    recompute: tuple[int, ...]  # pieces whose activations are recomputed (torch.utils.checkpoint)
    iterations: int = 20
    warmup: int = 5
    threads_per_rank: int = 1
    optimizer: str = "sgd"
    seed: int = 0
    device: str = "cpu"
    params_path: str = ""  # when set, rank 0 saves the trained parameters here (.npz)
    progress: bool = True  # rank 0 prints a line every 10 steps
    fail_on_rank: int = -1  # fault injection for tests: this rank raises at its first step
    eval_mode: bool = False  # modules in eval mode (batch-norm normalises by its running statistics): tests
    memory_probe: bool = False  # one more step after the timed ones, its memory measured (memory_probe.py)
    profile_memory: bool = False  # and another under torch's profiler (profile_memory=True; slow)

    @classmethod
    def from_plan(cls, plan: Plan, **options: Unpack[RunOptions]) -> RunConfig:
        return cls(
            model_name=plan.model.name,
            layers=tuple(LayerWire.of(x) for x in plan.model.layers),
            partition=plan.partition.counts,
            schedule_name=plan.schedule.name,
            schedule_text=plan.schedule.to_text(),
            batch_size=plan.batch_size,
            data_parallel=plan.data_parallel,
            placement=plan.placement,
            recompute=plan.recompute,
            **options,
        )

    def plan(self) -> Plan:
        model = ModelSpec(self.model_name, tuple(x.layer() for x in self.layers))
        schedule = Schedule.from_text(self.schedule_text, self.schedule_name)
        return Plan(model, Partition.from_counts(self.partition), schedule, self.batch_size, self.data_parallel,
                    self.placement, self.recompute)

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
class KindJob:
    """A model whose layers calibration times by kind and shape (runner/kindbench.py)."""

    model_toml: str  # the model file's text, parsed on every rank
    microbatch_sizes: tuple[int, ...]


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
    allreduce_sizes: tuple[int, ...] = ()  # bytes; MPI_Allreduce over the world (runner/collbench.py)
    kind_jobs: tuple[KindJob, ...] = ()  # models timed layer by layer (no fc tables needed for them)
    kind_repeats: int = 10
    kind_warmup: int = 2


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
