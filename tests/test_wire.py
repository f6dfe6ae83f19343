"""What crosses a process boundary: every job and result dataclass survives JSON
unchanged, and a malformed job file is a one-line error (no MPI, no torch)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from pipesim.model import fc, layer
from pipesim.plan import make_plan
from pipesim.runner import config as config_module
from pipesim.runner import records as records_module
from pipesim.runner.config import (
    GlooBenchConfig,
    JobFile,
    KindJob,
    LayerWire,
    MicrobenchConfig,
    RunBatch,
    RunConfig,
    RunOptions,
    load_job_file,
)
from pipesim.runner.records import (
    AllreduceSample,
    ColdSample,
    ComputeSample,
    GlooResult,
    KindSample,
    LinkSample,
    MicrobenchResult,
    OptimizerSample,
    ProgressSample,
    RankRun,
    RankSamples,
    RunBatchResult,
    RunResult,
    StepMemory,
    StepRecord,
)
from pipesim.timeline import SENDS, MemorySample, Span
from pipesim.wire import WireError, from_dict, to_dict


def run_config(**options) -> RunConfig:
    plan = make_plan(fc(6, 8), 2, 4, 8, "zb-h1", "2,4", recompute="1")
    return RunConfig.from_plan(plan, iterations=3, warmup=1, optimizer="adam", seed=7, params_path="p.npz",
                               progress=False, **options)


MICROBENCH = MicrobenchConfig(widths=(16, 32), microbatch_sizes=(2, 4), message_sizes=(1, 4096),
                              repeats=3, warmup=1, pingpong_repeats=2, threads_per_rank=1, optimizer="sgd",
                              seed=1, stack_bytes=1 << 16, allreduce_sizes=(4096,),
                              kind_jobs=(KindJob('[[layers]]\nkind = "fc"\n', (1, 4)),))

STEP = StepRecord(0.5, 1.25, (Span(1, "F", 0.5, 0.75, 1, 0), Span(1, "wait", 0.75, 0.8, -1, -1, -1, SENDS),
                              Span(1, "wait", 0.8, 0.9, 2, 3, 0, "B")),
                  (MemorySample(1, 0.5, 0), MemorySample(1, 0.75, 4096)))
RANK_RUN = RankRun(1, "node-a", "cpu", 12345, 1 << 30, (STEP, STEP), -2.5e-6,
                   StepMemory(1 << 27, 1 << 20, 4096, None, None))
RUN_RESULT = RunResult((dataclasses.replace(RANK_RUN, rank=0, clock_offset_s=0.0), RANK_RUN), "Open MPI v5.0.8")
COMPUTE = ComputeSample(1, 512, 8, 16, 262656, 524800.0, (1e-4, 1.1e-4), (2e-4,), (1e-4,), (1e-4,), 4096.0)
LINKS = (LinkSample((0, 1), 1, (1e-6, 2e-6)), LinkSample((0, 1), 1 << 20, (1e-3,), (1.5e-3, 1.6e-3)))
KIND = KindSample(0, 0, 3, "conv2d", "conv2d:3x32x32->16", 4, (1e-4,), (2e-4,), (1e-4,), (1e-4,))
PROGRESS = ProgressSample((0, 1), 65536, 0.01, (2.6e-3, 2.7e-3), (1.2e-2, 1.2e-2))
COLD = ColdSample(0, 512, 32, 4, 4202496, (7.7e-4,), (1.7e-3,), (8.0e-4,), (1.8e-3,))
RANK_SAMPLES = RankSamples(0, "node-a", "node-a", (COMPUTE,), (OptimizerSample(262656, (3e-4, 4e-4)),), LINKS,
                           (KIND,), (PROGRESS,), (COLD,))
ALLREDUCE = AllreduceSample((0, 1), 4096, (2e-5, 2.1e-5))
MICROBENCH_RESULT = MicrobenchResult((RANK_SAMPLES, dataclasses.replace(RANK_SAMPLES, rank=1, links=())),
                                     "Open MPI v5.0.8", "2.13.0", (ALLREDUCE,))

GLOO = GlooBenchConfig(message_sizes=(1, 4096), pingpong_repeats=2, threads_per_rank=1, seed=0, probe_width=16,
                       probe_layers_per_stage=2, probe_microbatches=4, probe_mb_size=2, iterations=3, warmup=1)
GLOO_RESULT = GlooResult(LINKS[:1], (2e-3, 2.1e-3), "2.13.0")

EXAMPLES = [run_config(), LayerWire.of(layer("embedding", vocab_size=9, hidden=4, seq_len=3)),
            RunBatch((run_config(), run_config(device="cuda"))), MICROBENCH, STEP, RANK_RUN, RANK_RUN.step_memory,
            RUN_RESULT, RunBatchResult((RUN_RESULT, RUN_RESULT)), COMPUTE, *LINKS, RANK_SAMPLES.optimizer[0],
            RANK_SAMPLES, MICROBENCH_RESULT, ALLREDUCE, KIND, MICROBENCH.kind_jobs[0], GLOO, GLOO_RESULT, PROGRESS, COLD]


def through_json(data: dict) -> object:
    return json.loads(json.dumps(data))


@pytest.mark.parametrize("value", EXAMPLES, ids=lambda v: type(v).__name__)
def test_every_job_and_result_round_trips_through_json(value):
    back = from_dict(type(value), through_json(to_dict(value)))
    assert back == value
    assert type(back) is type(value)


def test_the_examples_cover_every_dataclass_that_crosses():
    crossing = {cls for module in (config_module, records_module) for cls in vars(module).values()
                if isinstance(cls, type) and dataclasses.is_dataclass(cls)
                and cls.__module__ == module.__name__}
    covered = {type(v) for v in EXAMPLES} | {JobFile}
    assert crossing == covered


@pytest.mark.parametrize("config", [run_config(), RunBatch((run_config(),)), MICROBENCH],
                         ids=lambda c: type(c).__name__)
def test_job_file_round_trips_each_job(tmp_path, config):
    path = tmp_path / "job.json"
    config_module.write_job_file(path, JobFile(config, "/tmp/result.json"))
    assert load_job_file(path) == JobFile(config, "/tmp/result.json")


def test_run_options_are_exactly_the_run_configs_fields_beyond_the_plan():
    """measure(plan, **options) is checked by mypy against RunOptions: it must not drift."""
    import typing

    config_hints = typing.get_type_hints(RunConfig)
    beyond_plan = {f.name for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    assert typing.get_type_hints(RunOptions) == {name: config_hints[name] for name in beyond_plan}


def test_a_run_config_still_builds_its_plan_after_the_trip():
    config = run_config()
    back = RunConfig.from_dict(through_json(config.to_dict()))
    assert back.plan().schedule.to_text() == config.plan().schedule.to_text()
    assert back.plan().partition.counts == (2, 4)


def job(config: dict | None = None, **top) -> dict:
    data = {"job": "run", "config": config if config is not None else run_config().to_dict(),
            "result_path": "/tmp/r.json"}
    return {**data, **top}


def changed(**fields) -> dict:
    return {**run_config().to_dict(), **fields}


def without(key: str) -> dict:
    data = run_config().to_dict()
    del data[key]
    return data


MALFORMED = [
    ("{not json", r"not JSON"),
    (json.dumps([1, 2]), r"expected an object with keys job, config, result_path, got list"),
    (json.dumps({"job": "run", "config": {}}), r"expected an object with keys job, config, result_path"),
    (json.dumps(job(job="train")), r"unknown job 'train' \(allowed: run, runs, calibrate, gloo\)"),
    (json.dumps(job(result_path=3)), r"result_path: expected a str"),
    (json.dumps(job(changed(iteratoins=3))), r"config: unknown key 'iteratoins' \(allowed: model_name, "),
    (json.dumps(job(without("warmup"))), r"config: missing key 'warmup'"),
    (json.dumps(job(changed(iterations="3"))), r"config\.iterations: expected an int, got str '3'"),
    (json.dumps(job(changed(iterations=True))), r"config\.iterations: expected an int, got bool"),
    (json.dumps(job(changed(progress=1))), r"config\.progress: expected a bool, got int"),
    (json.dumps(job(changed(layers=[{"kind": "fc", "fields": "{}", "input_shape": [4], "repeat": 2}]))),
     r"config\.layers\[0\]: unknown key 'repeat' \(allowed: kind, fields, input_shape\)"),
    (json.dumps(job(changed(layers=[{"kind": "fc", "fields": "{}", "input_shape": ["4"]}]))),
     r"config\.layers\[0\]\.input_shape\[0\]: expected an int, got str"),
    (json.dumps(job(changed(partition="2,4"))), r"config\.partition: expected a list, got str"),
    (json.dumps({"job": "runs", "config": {"runs": [changed(seed=None)]}, "result_path": "r"}),
     r"config\.runs\[0\]\.seed: expected an int, got NoneType"),
    (json.dumps({"job": "calibrate", "config": {**to_dict(MICROBENCH), "widths": [16, 2.5]},
                 "result_path": "r"}),
     r"config\.widths\[1\]: expected an int, got float 2\.5"),
]


@pytest.mark.parametrize("text,message", MALFORMED)
def test_a_malformed_job_file_is_one_line_naming_the_key(tmp_path, text, message):
    path = tmp_path / "job.json"
    path.write_text(text)
    with pytest.raises(WireError, match=rf"^job file {path}: .*{message}") as caught:
        load_job_file(path)
    assert "\n" not in str(caught.value)


def test_a_missing_job_file_is_one_line(tmp_path):
    with pytest.raises(WireError, match=r"^job file not found: .*nowhere\.json$"):
        load_job_file(tmp_path / "nowhere.json")


def test_the_worker_reports_a_malformed_job_file_in_one_line_and_exit_2(tmp_path):
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job(changed(iteratoins=3))))
    done = subprocess.run([sys.executable, "-m", "pipesim.runner.worker", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"pipesim: error: job file {path}: config: unknown key 'iteratoins'")


def test_numbers_and_optionals():
    @dataclasses.dataclass(frozen=True)
    class Example:
        seconds: float
        count: int | None
        pair: tuple[int, str]
        named: dict[str, float]

    assert from_dict(Example, {"seconds": 2, "count": None, "pair": [1, "a"], "named": {"x": 1}}) == \
        Example(2.0, None, (1, "a"), {"x": 1.0})
    assert isinstance(from_dict(Example, {"seconds": 2, "count": 1, "pair": [1, "a"], "named": {}}).seconds, float)
    with pytest.raises(WireError, match=r"^Example\.seconds: expected a number, got bool"):
        from_dict(Example, {"seconds": True, "count": None, "pair": [1, "a"], "named": {}})
    with pytest.raises(WireError, match=r"^Example\.count: expected an int, got float"):
        from_dict(Example, {"seconds": 1.0, "count": 1.5, "pair": [1, "a"], "named": {}})
    with pytest.raises(WireError, match=r"^Example\.named\.x: expected a number, got str"):
        from_dict(Example, {"seconds": 1.0, "count": 1, "pair": [1, "a"], "named": {"x": "1"}})
