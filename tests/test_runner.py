"""The real runner: pipeline training equals single-process training, faults end
the job, missing pieces say how to install them. These tests launch real MPI
jobs (2 and 4 ranks; oversubscribed on a 2-core machine, which is fine for
correctness)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the runner extra is not installed")

import reference_training

from pipesim.model import ModelSpec, fc_layer
from pipesim.plan import make_plan
from pipesim.runner import launch as launch_module
from pipesim.runner.config import RunConfig
from pipesim.runner.launch import RunFailed, RunnerUnavailable, launch
from pipesim.runner.records import RunResult
from pipesim.runner.results import measure

STEPS = 3
BATCH = 8
SEED = 3


def uneven_model() -> ModelSpec:
    widths = [12, 16, 16, 8, 24, 12, 12, 20, 6]  # 8 layers of different shapes
    return ModelSpec("uneven", tuple(fc_layer(a, b) for a, b in zip(widths, widths[1:])))


def reference_parameters(model: ModelSpec, steps: int, optimizer: str) -> dict[str, np.ndarray]:
    return reference_training.reference_parameters(model, steps, optimizer, BATCH, SEED)


CASES = [
    (1, "32", "gpipe", 2, "sgd"),
    (2, "4,4", "gpipe", 4, "sgd"),
    (2, "2,6", "1f1b", 4, "sgd"),
    (2, "0-5,6-7", "1f1b", 8, "adam"),
    (4, "2,2,2,2", "gpipe", 4, "sgd"),
    (4, "1,3,1,3", "1f1b", 4, "sgd"),
    (4, "3,1,2,2", "1f1b", 2, "adam"),
]


@pytest.mark.parametrize("stages,partition,schedule,microbatches,optimizer", CASES)
def test_pipeline_training_equals_single_process(tmp_path, stages, partition, schedule,
                                                 microbatches, optimizer):
    model = uneven_model()
    partition = "8" if partition == "32" else partition
    plan = make_plan(model, stages, microbatches, BATCH, schedule, partition)
    params_path = tmp_path / "params.npz"
    measured = measure(plan, log=lambda _: None, iterations=STEPS, warmup=0, seed=SEED,
                       optimizer=optimizer, params_path=str(params_path))
    assert len(measured.timelines) == STEPS
    got = dict(np.load(params_path))
    want = reference_parameters(model, STEPS, optimizer)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    # and training did move the parameters
    untrained = reference_parameters(model, 0, optimizer)
    assert any(not np.allclose(untrained[n], want[n]) for n in want)


def test_testing_requests_between_layers_keeps_training_exact(tmp_path, monkeypatch):
    """PIPESIM_PROGRESS=layers: MPI tests in forward and gradient hooks change no number."""
    monkeypatch.setenv("PIPESIM_PROGRESS", "layers")
    model = uneven_model()
    plan = make_plan(model, 2, 4, BATCH, "1f1b", "2,6")
    params_path = tmp_path / "params.npz"
    measure(plan, log=lambda _: None, iterations=STEPS, warmup=0, seed=SEED, optimizer="sgd",
            params_path=str(params_path))
    got, want = dict(np.load(params_path)), reference_parameters(model, STEPS, "sgd")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_measured_timeline_has_every_action_once_and_memory(tmp_path):
    model = uneven_model()
    plan = make_plan(model, 2, 4, BATCH, "1f1b", "4,4")
    measured = measure(plan, log=lambda _: None, iterations=2, warmup=1, seed=SEED)
    timeline = measured.representative
    names = sorted(s.name for s in timeline.spans if s.kind in ("F", "B"))
    expected = sorted(str(a) for actions in plan.schedule.ranks for a in actions)
    assert names == expected
    # per rank, actions ran in schedule order
    for rank, actions in enumerate(plan.schedule.ranks):
        ran = [s.name for s in sorted(timeline.rank_spans(rank, ("F", "B")), key=lambda s: s.start_s)]
        assert ran == [str(a) for a in actions]
    # saved activations counted exactly: stage input + each layer's output, per sample
    for stage, (first, last) in enumerate(plan.partition.bounds):
        per_microbatch = model.stage_saved_bytes(first, last) * plan.microbatch_size
        in_flight = min(plan.num_stages - stage, plan.num_microbatches)
        assert measured.metrics.ranks[stage].peak_activation_bytes == per_microbatch * in_flight
    # parameters + gradients + one momentum buffer
    for stage in range(2):
        params = sum(layer.params for layer in plan.stage_layers(stage))
        assert timeline.static_bytes[stage] == params * 4 * 3


def _worker_processes() -> str:
    """Workers started by this interpreter's launcher (not another checkout's runs)."""
    found = subprocess.run(["pgrep", "-af", "pipesim.runner.worker"], capture_output=True, text=True)
    return "\n".join(line for line in found.stdout.splitlines() if f"{sys.executable} -m" in line)


def test_exception_on_one_rank_ends_the_job_with_its_error(capfd):
    model = uneven_model()
    plan = make_plan(model, 2, 4, BATCH, "1f1b", "4,4")
    config = RunConfig.from_plan(plan, iterations=2, warmup=0, fail_on_rank=1)
    started = time.monotonic()
    with pytest.raises(RunFailed):
        launch(config, RunResult, 2, log=lambda _: None)
    assert time.monotonic() - started < 120  # a hang guard, not a speed test: unaborted, it never ends
    err = capfd.readouterr().err
    assert "[rank 1]" in err and "injected fault" in err
    time.sleep(0.5)
    assert _worker_processes() == ""


def test_missing_runner_packages_say_how_to_install(monkeypatch):
    real = launch_module.importlib.util.find_spec
    monkeypatch.setattr(launch_module.importlib.util, "find_spec",
                        lambda name: None if name == "mpi4py" else real(name))
    with pytest.raises(RunnerUnavailable, match=r"^pipesim calibrate needs mpi4py.*-c \S*constraints.txt '\S*\[runner\]'"):
        launch_module.check_runner_available("pipesim calibrate")


def test_a_tiny_calibration_runs_both_jobs_and_its_profile_loads():
    """The micro-benchmarks and the overhead runs for real, as small as they go: the
    typed samples come back from the ranks and make a profile that loads."""
    from pipesim.calibrate import CalibrationSettings, calibrate
    from pipesim.profile import parse_profile

    settings = CalibrationSettings(widths=(16, 32), microbatch_sizes=(2, 4), message_sizes=(1, 1 << 16),
                                   repeats=2, warmup=1, pingpong_repeats=2, stack_bytes=1 << 14,
                                   overhead_iterations=2)
    data = calibrate(settings, "tiny", log=lambda _: None)
    profile = parse_profile(data)
    assert data["metadata"]["ranks"] == 2 and len(data["metadata"]["processors"]) == 2
    assert [s["width"] for s in data["samples"]["compute"]] == [16, 16, 32, 32] * 2  # rank 0's, then rank 1's
    assert data["samples"]["saved_bytes_per_sample_per_layer"] == [16 * 4, 32 * 4]  # each layer's output
    assert [(s["pair"], s["bytes"]) for s in data["samples"]["links"]] == [([0, 1], 1), ([0, 1], 1 << 16)]
    assert "duplex" in data["links"]["intra_node"]  # the exchange of the largest message was timed
    probed = data["samples"]["rendezvous_probe"]
    assert [s["bytes"] for s in probed] == [1 << k for k in range(10, 21)]
    # over shared memory a message moves while its sender computes (the receiver copies it)
    assert data["links"]["intra_node"]["rendezvous_bytes"] is None, probed
    assert data["cold_start"]["stack_bytes"] == [d * (512 * 512 + 512) * 4 for d in (1, 4, 16)]
    assert profile.cold_start is not None and len(data["samples"]["cold_start"]) == 6  # 3 sizes x 2 ranks
    assert profile.action_overhead_s > 0


def test_an_unknown_optimizer_is_an_error_not_none():
    from pipesim.runner.stage import make_optimizer

    with pytest.raises(ValueError, match=r"unknown optimizer 'lamb' \(allowed: sgd, adam\)"):
        make_optimizer("lamb", [torch.zeros(2, requires_grad=True)])


@pytest.mark.parametrize("ranks, threads, cores, bind", [
    (4, 1, 16, "core"),   # one single-threaded rank per core: pinned
    (2, 2, 16, "none"),   # a rank's threads must be free to use several cores
    (4, 1, 2, "none"),    # oversubscribed: ranks share cores
])
def test_mpiexec_pins_one_thread_ranks_to_cores_only_when_they_fit(monkeypatch, ranks, threads, cores, bind):
    monkeypatch.setattr(launch_module.os, "cpu_count", lambda: cores)
    command, _ = launch_module.mpiexec_command(ranks, threads, "job.json")
    assert command[command.index("--bind-to") + 1] == bind
    assert ("--oversubscribe" in command) == (ranks * threads > cores)


# --- data parallelism: D replicas x p stages train like one process on the whole batch ----

DP_CASES = [  # p x D <= 4 ranks
    (1, 2, "32", "gpipe", 2, "sgd", "stage-major"),
    (2, 2, "4,4", "1f1b", 2, "sgd", "stage-major"),
    (2, 2, "2,6", "gpipe", 1, "adam", "replica-major"),
    (2, 2, "3,5", "zb-h1", 2, "sgd", "replica-major"),
]


@pytest.mark.parametrize("stages,replicas,partition,schedule,microbatches,optimizer,placement", DP_CASES)
def test_data_parallel_pipeline_training_equals_single_process(tmp_path, stages, replicas, partition, schedule,
                                                               microbatches, optimizer, placement):
    model = uneven_model()
    partition = "8" if partition == "32" else partition
    plan = make_plan(model, stages, microbatches, BATCH, schedule, partition, data_parallel=replicas,
                     placement=placement)
    params_path = tmp_path / "params.npz"
    measured = measure(plan, log=lambda _: None, iterations=STEPS, warmup=0, seed=SEED,
                       optimizer=optimizer, params_path=str(params_path))
    got = dict(np.load(params_path))
    want = reference_parameters(model, STEPS, optimizer)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    timeline = measured.timelines[-1]
    assert timeline.num_ranks == stages * replicas
    reduces = [s for s in timeline.spans if s.kind == "allreduce"]
    assert sorted((s.rank, s.stage) for s in reduces) == sorted(
        (plan.layout().global_rank(d, s), s) for d in range(replicas) for s in range(stages))
    for span in reduces:  # started after the piece's last backward on that rank, ended before its optimizer
        last = max(s.end_s for s in timeline.spans if s.rank == span.rank and s.stage == span.stage
                   and s.kind in ("B", "W"))
        optimizer_start = next(s.start_s for s in timeline.spans if s.rank == span.rank and s.kind == "optimizer")
        assert last <= span.start_s <= span.end_s <= optimizer_start
