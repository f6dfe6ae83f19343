"""pipesim validate: grids, the comparison arithmetic (with stand-in measurements
built from simulated timelines), and the quick grid for real against the
shipped reference profile."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest

from pipesim import cli
from pipesim import validate as V
from pipesim.profile import load_profile
from pipesim.timeline import MemorySample, Timeline

REPO = Path(__file__).resolve().parents[1]

GRID = """
name = "t"
iterations = 3
warmup = 1
rounds = 2
[[groups]]
layers = [8]
widths = [64]
batch_sizes = [32]
stages = [2]
microbatches = [2, 4]
partitions = ["balanced", "2,6", "6,2"]
schedules = ["1f1b", "gpipe"]
"""


def write_grid(tmp_path, text=GRID) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    return path


def test_grid_is_the_product_plus_a_baseline(tmp_path):
    grid = V.load_grid(write_grid(tmp_path))
    assert len(grid.cases) == 2 * 3 * 2 + 1
    assert grid.cases[0].is_baseline and grid.cases[0].model_key == ("fc8x64", 32)
    assert (grid.iterations, grid.warmup, grid.rounds) == (3, 1, 2)


@pytest.mark.parametrize("text,message", [
    ('name = "x"\nbogus = 1\n', "unknown key 'bogus'"),
    ('name = "x"\n', "no cases"),
    ('[[groups]]\nlayers = [8]\nwidths = []\n', "widths must be a non-empty list"),
    ('[[groups]]\nlayer = [8]\n', "unknown key 'layer'"),
])
def test_bad_grids_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(V.GridError, match=message):
        V.load_grid(write_grid(tmp_path, text))


def scaled(timeline: Timeline, factor: float) -> Timeline:
    spans = tuple(dataclasses.replace(s, start_s=s.start_s * factor, end_s=s.end_s * factor)
                  for s in timeline.spans)
    memory = tuple(MemorySample(m.rank, m.time_s * factor, m.activation_bytes) for m in timeline.memory)
    return Timeline(timeline.num_ranks, spans, memory, timeline.static_bytes, "measured")


def fake_measure(factor_of):
    """A stand-in for the runner: the simulated timeline, stretched by factor_of(plan, round)."""
    from pipesim.costs import ProfileCostModel
    from pipesim.engine import simulate
    from pipesim.runner.results import Measurement

    calls = {}

    def measure(plan, log, iterations, warmup, progress):
        costs = ProfileCostModel(load_profile(None))
        base = simulate(plan.schedule, plan.partition, plan.model, costs, plan.microbatch_size)
        round_ = calls[plan] = calls.get(plan, -1) + 1
        timelines = tuple(scaled(base, factor_of(plan, round_)) for _ in range(iterations))
        return Measurement(plan, timelines, (0,) * plan.num_stages, ("h",) * plan.num_stages, "fake MPI")

    return measure


def fake_memory(factor=1.0, profiler_factor=1.0):
    """A stand-in for the memory probe: the step ledger's peak per rank, scaled."""
    from pipesim.engine import stage_shapes
    from pipesim.ledger import step_peak_bytes
    from pipesim.runner.records import StepMemory

    def measure_memory(plan, log, profile_memory):
        peaks = step_peak_bytes(plan.schedule, stage_shapes(plan.model, plan.partition), plan.microbatch_size,
                                plan.batch_size)
        return tuple(StepMemory(300 << 20, round(p * factor), 65536, round(p * profiler_factor), None)
                     for p in peaks)

    return measure_memory


def test_perfect_measurements_give_zero_error(tmp_path):
    grid = V.load_grid(write_grid(tmp_path))
    results = V.run_validation(grid, load_profile(None), log=lambda _: None,
                               measure_memory=fake_memory(), measure=fake_measure(lambda plan, r: 1.0))
    summary = V.summarize(results)
    assert summary.mape == pytest.approx(0, abs=1e-12)
    assert summary.memory_max_abs_error == pytest.approx(0, abs=1e-6)
    assert summary.saved_accounting_max_abs_error == pytest.approx(0, abs=1e-12)
    assert summary.partition_rankings_match == summary.partition_rankings_total == 4
    assert summary.speedup_rank_correlation == pytest.approx(1.0)
    for r in results:
        diff = V.breakdown_difference(r, load_profile(None))
        assert sum(diff.values()) == pytest.approx(0, abs=1e-9)


def test_slower_measurements_and_drift_show_up(tmp_path):
    grid = V.load_grid(write_grid(tmp_path))
    # every case 10% slower than predicted; the second round 4% slower than the first
    results = V.run_validation(grid, load_profile(None), log=lambda _: None,
                               measure_memory=fake_memory(), measure=fake_measure(lambda plan, r: 1.1 * (1.04 if r else 1.0)))
    summary = V.summarize(results)
    measured_factor = 1.1 * 1.02  # median of the pooled rounds sits between them
    assert summary.mape == pytest.approx(1 - 1 / measured_factor, rel=1e-3)
    assert summary.noise_floor_median == pytest.approx(0.04 / 1.02, rel=1e-6)
    for r in results:  # the breakdown of the shown (last round's) timeline adds up
        diff = V.breakdown_difference(r, load_profile(None))
        shown_s = r.predicted_s * 1.1 * 1.04
        assert sum(diff.values()) == pytest.approx(shown_s - r.predicted_s, rel=1e-9)
        assert diff["compute"] > 0


def test_memory_is_compared_with_the_independent_measurement(tmp_path):
    grid = V.load_grid(write_grid(tmp_path))
    results = V.run_validation(grid, load_profile(None), log=lambda _: None,
                               measure_memory=fake_memory(factor=1.25, profiler_factor=0.5),
                               measure=fake_measure(lambda plan, r: 1.0))
    summary = V.summarize(results)
    assert summary.memory_mape == pytest.approx(abs(1 / 1.25 - 1), rel=1e-3)  # predicted 20% low
    assert summary.memory_max_abs_error == pytest.approx(0.2, rel=1e-3)
    assert summary.saved_accounting_max_abs_error == pytest.approx(0, abs=1e-12)
    for r in results:
        assert [round(e, 3) for _, _, e in r.profiler_errors()] == [1.0] * r.case.stages  # predicted 2x
        assert r.sources is not None
    without = V.run_validation(grid, load_profile(None), log=lambda _: None, measure_memory=False,
                               measure=fake_measure(lambda plan, r: 1.0))
    assert all(r.memory_errors() == [] for r in without)
    assert math.isnan(V.summarize(without).memory_mape)


def test_a_mispredicted_partition_ranking_is_caught(tmp_path):
    grid = V.load_grid(write_grid(tmp_path))

    def factor(plan, r):  # make the skewed 2,6 cut measure fastest of all: rankings break
        return 0.5 if plan.partition.counts == (2, 6) else 1.0

    results = V.run_validation(grid, load_profile(None), log=lambda _: None, measure_memory=fake_memory(), measure=fake_measure(factor))
    summary = V.summarize(results)
    assert summary.partition_rankings_match == 0 and summary.partition_rankings_total == 4


def test_rank_breakdown_adds_up_to_the_iteration_time(tmp_path):
    grid = V.load_grid(write_grid(tmp_path))
    results = V.run_validation(grid, load_profile(None), log=lambda _: None,
                               measure_memory=fake_memory(), measure=fake_measure(lambda plan, r: 1.0))
    for r in results:
        parts = V.rank_breakdown(r.prediction.timeline, load_profile(None).action_overhead_s)
        assert sum(parts.values()) == pytest.approx(r.predicted_s, rel=1e-9)
        assert all(v >= -1e-12 for v in parts.values())


def test_cli_exits_1_above_tolerance_and_writes_the_report(tmp_path, monkeypatch, capsys):
    grid_path = write_grid(tmp_path)
    real = V.run_validation
    monkeypatch.setattr(V, "run_validation", lambda grid, profile, log: real(
        grid, profile, log, measure_memory=fake_memory(), measure=fake_measure(lambda plan, r: 1.2)))
    out = tmp_path / "reports"
    code = cli.main(["validate", "--grid", str(grid_path), "--tolerance", "0.1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and "FAIL" in printed
    profile = load_profile(None).name
    for suffix in (".md", ".csv", "-scatter.png", "-speedup.png", "-gantt.png"):
        assert (out / f"validation-{profile}-t{suffix}").exists()
    text = (out / f"validation-{profile}-t.md").read_text()
    assert "MAPE of iteration time | 16.67%" in text and "Held out" in text
    code = cli.main(["validate", "--grid", str(grid_path), "--tolerance", "0.2", "--out", str(out)])
    assert code == 0 and "PASS" in capsys.readouterr().out


def test_tolerance_grows_with_the_measured_noise_up_to_its_cap():
    rule = V.Tolerance(floor=0.04, noise_multiple=2.0, cap=0.10)

    def summary(mape, noise):
        return V.Summary(mape, mape, 1.0, noise, noise, 0, 0, 0.0)

    assert rule.limit(summary(0.0, 0.02)) == pytest.approx(0.08)
    assert rule.limit(summary(0.0, 0.05)) == pytest.approx(0.10)  # capped
    judged = V.verdict(summary(0.079, 0.02), rule)
    assert judged.passed and "8.0% = 4.0% + 2 x noise floor 2.00%" in judged.text
    judged = V.verdict(summary(0.081, 0.02), rule)
    assert not judged.passed and judged.text.startswith("FAIL: MAPE 8.10% > tolerance 8.0%")
    assert not V.verdict(summary(0.11, 0.2), rule).passed  # noise never buys more than the cap
    assert V.verdict(summary(0.05, 0.2), V.Tolerance(0.05)).text == "PASS: MAPE 5.00% <= tolerance 5.0%"


def test_noise_multiple_on_the_command_line(tmp_path, monkeypatch, capsys):
    grid_path = write_grid(tmp_path)
    real = V.run_validation
    # 10% slow, rounds 4% apart: noise floor 3.9%; 0.02 + 3 x 3.9% = 13.8% passes, 2 x fails
    monkeypatch.setattr(V, "run_validation", lambda grid, profile, log: real(
        grid, profile, log, measure_memory=fake_memory(), measure=fake_measure(lambda plan, r: 1.1 * (1.04 if r else 1.0))))
    out = tmp_path / "reports"
    args = ["validate", "--grid", str(grid_path), "--tolerance", "0.02", "--out", str(out)]
    assert cli.main([*args, "--noise-multiple", "3"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert cli.main([*args, "--noise-multiple", "3", "--max-tolerance", "0.1"]) == 1
    assert "capped at 10.0%" in capsys.readouterr().out


# --- the quick grid, for real, calibrated on this machine ---------------------------

# The check: MAPE <= 5% + 2 x the run's own median noise floor, and never above 10%, which
# stays below the smallest effect it exists to catch (the bubble of the m = 8 case, 11% of
# its step). Costs are measured here first: a profile from another VM of the same kind
# mispredicts this one by 8-20% (issue 9), so comparing with it would be a timed test.
# The floor: six quiet fresh-clone runs measured MAPE 1.4-5.6% with noise floors of 1.1-2.3%
# (reports/ci-repeat.md); part of it is systematic (one rank computing alone, the baseline,
# runs faster than costs calibrated with every rank busy: issue 16).
QUICK = V.Tolerance(floor=0.05, noise_multiple=2.0, cap=0.10)
# A host that changes speed between calibration and measurement fails the check whatever the
# model (2026-12-08: calibration CV 2-3%, then every case 7-21% slower than predicted, the
# baseline's rounds 17% apart). The check is then run once more, calibration included, and the
# first attempt's figures are printed beside the second's in the accuracy summary.
ATTEMPTS = 2


@pytest.fixture(scope="module")
def measured_here(tmp_path_factory):
    """Calibrate the quick grid's cells on this machine, then measure the grid (about 1.5 min);
    again if that attempt fails the check. (profile, results, lines about failed attempts)."""
    pytest.importorskip("torch", reason="the runner extra is not installed")
    grid = V.load_grid(REPO / "validation/quick.toml")
    widths, sizes = V.calibration_cells(grid)
    failed: list[str] = []
    for attempt in range(1, ATTEMPTS + 1):
        path = tmp_path_factory.mktemp("quick") / "here.json"
        code = cli.main(["calibrate", "--widths", ",".join(map(str, widths)), "--microbatch-sizes",
                         ",".join(map(str, sizes)), "--repeats", "10", "--out", str(path)])
        assert code == 0
        profile = load_profile(path)
        results = V.run_validation(grid, profile, log=lambda line: print(line, file=sys.stderr))
        summary = V.summarize(results)
        judged = V.verdict(summary, QUICK)
        if judged.passed or attempt == ATTEMPTS:
            return profile, results, failed
        failed.append(f"quick grid, attempt {attempt} of {ATTEMPTS} (run again, calibration included): "
                      f"{V.summary_line(results, summary)}; {judged.text}")
    raise AssertionError("unreachable")


def judge(results, report, label: str) -> V.Verdict:
    summary = V.summarize(results)
    judged = V.verdict(summary, QUICK)
    report(f"{label}: {V.summary_line(results, summary)}")
    report(f"{label}: {judged.text}")
    return judged


def test_quick_grid_predicts_real_runs(measured_here, report_accuracy):
    profile, results, failed = measured_here
    for line in failed:
        report_accuracy(line)
    noise = profile.extra["noise"]
    report_accuracy(f"calibration here: compute noise CV forward {noise['forward_cv_median']:.1%}, "
                    f"backward {noise['backward_cv_median']:.1%} (a busy machine shows here first)")
    judged = judge(results, report_accuracy, "quick grid, calibrated here")
    for r in results:
        report_accuracy(f"  {r.case.label}: measured {r.measured_s * 1e3:.1f} ms, predicted "
                        f"{r.predicted_s * 1e3:.1f} ms ({r.error:+.1%}), rounds {r.repeat_difference:.1%} apart")
    assert judged.passed, judged.text
    assert V.summarize(results).partition_rankings_match == 1


def repredicted(results, profile, *, links=1.0, optimizer=1.0):
    """The same measured cases, predicted again with a broken profile."""
    from pipesim.costs import ProfileCostModel
    from pipesim.predict import predict

    def slower(link):
        return dataclasses.replace(link, latency_s=link.latency_s * links,
                                   bandwidth_Bps=link.bandwidth_Bps / links)

    params, seconds = profile.optimizer_table
    broken = dataclasses.replace(profile, intra_node=slower(profile.intra_node),
                                 inter_node=slower(profile.inter_node),
                                 optimizer_table=(params, tuple(t * optimizer for t in seconds)))
    costs = ProfileCostModel(broken)
    return [dataclasses.replace(r, prediction=predict(r.prediction.plan, costs, "broken")) for r in results]


def without_bubbles(results, profile):
    """The schedule made ideal: every case takes only its busiest rank's work."""
    out = []
    for r in results:
        metrics = r.prediction.metrics
        ideal = dataclasses.replace(metrics, iteration_time_s=max(rank.busy_s for rank in metrics.ranks))
        out.append(dataclasses.replace(r, prediction=dataclasses.replace(r.prediction, metrics=ideal)))
    return out


# Each fault moves the predictions by more than the check's cap on average (asserted, with no
# timing involved), so a check that passes the true model must fail it. A smaller fault (say the
# optimizer step 10x too *fast*: 2% of a step) hides in the noise and cannot be caught by timing.
FAULTS = {
    "bubble removed": without_bubbles,
    "links 1000x slower": lambda results, profile: repredicted(results, profile, links=1000.0),
    "optimizer step 10x slower": lambda results, profile: repredicted(results, profile, optimizer=10.0),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_the_check_fails_a_broken_model(measured_here, fault, report_accuracy):
    profile, results, _ = measured_here
    broken = FAULTS[fault](results, profile)
    shift = sum(abs(b.predicted_s / r.predicted_s - 1) for b, r in zip(broken, results)) / len(results)
    assert shift > QUICK.cap, f"{fault}: moves predictions by only {shift:.1%}"
    judged = judge(broken, report_accuracy, f"fault '{fault}' (moves predictions {shift:.1%})")
    assert not judged.passed, f"{fault} was not caught: {judged.text}"
