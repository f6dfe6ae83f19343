"""A second transport in the profile (torch.distributed over gloo, issue 16):
its parsing, the fit of its per-action overhead, `--transport` on the CLI, and
the gloo job itself on real ranks."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from pipesim.calibrate import CalibrationSettings, gloo_transport, overhead_probe_plan
from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.profile import Link, ProfileError, parse_profile
from pipesim.runner.records import GlooResult, LinkSample
from pipesim.timeline import compute_metrics

LATENCY_S, BANDWIDTH_BPS = 40e-6, 1.5e9  # a slower link than the shipped profile's MPI one


def shipped() -> dict:
    """The shipped profile without its own gloo section (each test states the one it needs)."""
    with open("pipesim/data/default.json") as handle:
        data = json.load(handle)
    data.pop("transports", None)
    return data


def with_gloo(data: dict, overhead_s: float = 1e-4, **extra) -> dict:
    data = copy.deepcopy(data)
    data["transports"] = {"gloo": {"links": {"intra_node": {"latency_s": LATENCY_S, "bandwidth_Bps": BANDWIDTH_BPS}},
                                   "action_overhead_s": overhead_s, **extra}}
    return data


def test_with_transport_swaps_links_and_overhead_only():
    mpi = parse_profile(with_gloo(shipped()))
    gloo = mpi.with_transport("gloo")
    assert gloo.intra_node == gloo.inter_node == Link(LATENCY_S, BANDWIDTH_BPS)
    assert gloo.action_overhead_s == 1e-4
    assert gloo.compute == mpi.compute and gloo.optimizer_table == mpi.optimizer_table
    assert mpi.with_transport("mpi") is mpi
    assert mpi.intra_node != gloo.intra_node  # the MPI fields are untouched


def test_a_profile_without_the_transport_names_the_command_that_measures_it():
    with pytest.raises(ProfileError, match=r"has no gloo costs; `pipesim calibrate --transport gloo`"):
        parse_profile(shipped()).with_transport("gloo")


@pytest.mark.parametrize("change, message", [
    (lambda d: [d.pop("collectives"), d.pop("kinds"), d.pop("cold_start", None), d.update(version=2)],
     "transports needs version 3"),
    (lambda d: d["transports"].update(nccl={}), "transports.nccl: unknown transport"),
    (lambda d: d["transports"]["gloo"].update(speed=1), "transports.gloo.speed is unknown"),
    (lambda d: d["transports"]["gloo"]["links"].update(intra_node={"latency_s": -1}), "latency_s"),
])
def test_malformed_transports_are_one_line_errors(change, message):
    data = with_gloo(shipped())
    change(data)
    with pytest.raises(ProfileError, match=message):
        parse_profile(data)


def probe_step_s(data: dict, overhead_s: float) -> float:
    profile = parse_profile(with_gloo(data, overhead_s)).with_transport("gloo")
    plan = overhead_probe_plan(2)
    timeline = simulate(plan.schedule, plan.partition, plan.model, ProfileCostModel(profile), plan.microbatch_size)
    return compute_metrics(timeline).iteration_time_s


def gloo_result(step_s: float) -> GlooResult:
    links = tuple(LinkSample((0, 1), n, (LATENCY_S + n / BANDWIDTH_BPS,) * 3) for n in (1, 1 << 16, 1 << 22))
    return GlooResult(links, (step_s * 0.99, step_s, step_s * 1.01), "2.13.0")


@pytest.mark.parametrize("overhead_s", [5e-5, 3e-4])
def test_the_overhead_fit_recovers_the_overhead_that_made_the_probe_step(overhead_s):
    """Steps simulated with a known overhead over known gloo links: the fit, which
    knows neither, finds both again."""
    data = shipped()
    fitted = gloo_transport(CalibrationSettings(), data, gloo_result(probe_step_s(data, overhead_s)))
    link = fitted["links"]["intra_node"]
    assert link["latency_s"] == pytest.approx(LATENCY_S, rel=1e-3)
    assert link["bandwidth_Bps"] == pytest.approx(BANDWIDTH_BPS, rel=1e-3)
    assert fitted["action_overhead_s"] == pytest.approx(overhead_s, rel=1e-3)
    parse_profile({**data, "transports": {"gloo": fitted}})  # what calibrate stores loads


def test_a_probe_faster_than_the_model_without_overhead_gets_zero():
    data = shipped()
    fitted = gloo_transport(CalibrationSettings(), data, gloo_result(probe_step_s(data, 0.0) * 0.5))
    assert fitted["action_overhead_s"] == 0.0


def pipesim(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipesim", *args], capture_output=True, text=True)


def test_predict_with_the_gloo_transport(tmp_path):
    path = tmp_path / "gloo.json"
    path.write_text(json.dumps(with_gloo(shipped(), overhead_s=1e-3)))
    runs = {t: pipesim("predict", "--profile", str(path), "--transport", t, "--json") for t in ("mpi", "gloo")}
    assert all(r.returncode == 0 for r in runs.values()), runs
    mpi, gloo = (json.loads(runs[t].stdout) for t in ("mpi", "gloo"))
    assert gloo["spec"]["profile"]["transport"] == "gloo"
    assert gloo["iteration_time_s"] > mpi["iteration_time_s"]  # 1 ms per action against ~40 us
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(shipped()))
    refused = pipesim("predict", "--profile", str(plain), "--transport", "gloo")
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "has no gloo costs" in refused.stderr


def test_the_gloo_job_on_real_ranks():
    """Ping-pongs over gloo and torch's own 1F1B on the probe pipeline, as small as they go."""
    from pipesim.runner.launch import launch

    settings = CalibrationSettings(message_sizes=(1, 1 << 16), pingpong_repeats=2, overhead_iterations=3)
    result = launch(settings.gloo_bench(), GlooResult, 2, log=lambda _: None)
    assert [(s.pair, s.bytes, len(s.one_way_s)) for s in result.links] == [((0, 1), 1, 2), ((0, 1), 1 << 16, 2)]
    assert len(result.probe_step_s) == 3 and all(t > 0 for t in result.probe_step_s)
