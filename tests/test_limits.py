"""Each limit of limits.py is enforced where the value enters, before any work."""

from __future__ import annotations

import math

import pytest

from pipesim import limits
from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.errors import UserError
from pipesim.model import ModelError, fc, fc_layer
from pipesim.partition import PartitionError, balanced
from pipesim.plan import make_plan
from pipesim.profile import constant_profile


def one_error(capsys, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("pipesim: error: ") and err.count("\n") == 1, err
    return err


def test_layers_and_width_limits():
    fc(limits.MAX_LAYERS, 1)
    with pytest.raises(ModelError, match="1..100000"):
        fc(limits.MAX_LAYERS + 1, 1)
    fc_layer(limits.MAX_WIDTH, 1)
    with pytest.raises(ModelError, match=f"1..{limits.MAX_WIDTH}"):
        fc(1, limits.MAX_WIDTH + 1)


@pytest.mark.parametrize("argv, expected", [
    (["predict", "--layers", str(limits.MAX_LAYERS + 1)], "--layers: must be in 1..100000"),
    (["predict", "--width", str(limits.MAX_WIDTH + 1)], "--width: must be in 1..1048576"),
    (["predict", "--batch-size", str(limits.MAX_BATCH_SIZE + 1)], "--batch-size: must be in 1..16777216"),
    (["predict", "--stages", str(limits.MAX_STAGES + 1)], "--stages: values must be in 1..1024"),
    (["optimize", "--stages", str(limits.MAX_OPTIMIZE_STAGES + 1)], "--stages: must be in 1..1024"),
    (["optimize", "--max-simulations", str(limits.MAX_SIMULATIONS + 1)], "--max-simulations"),
    (["sweep", "--jobs", str(limits.MAX_JOBS + 1)], "--jobs: must be in 1..256"),
    (["predict", "--rank-speed", "0:1e7"], "[1e-06, 1e+06]"),
    (["predict", "--link", "0-1:2e18Bps"], "[1, 1e+18]"),
    (["predict", "--link", "0-1:2e6s"], "[0, 1e+06]"),
])
def test_command_line_limits(capsys, argv, expected):
    assert expected in one_error(capsys, *argv)


def test_compute_action_limit_is_checked_before_any_work(capsys):
    stages, microbatches = 2, limits.MAX_COMPUTE_ACTIONS // 4 + 1
    assert 2 * stages * microbatches > limits.MAX_COMPUTE_ACTIONS
    err = one_error(capsys, "predict", "--layers", "4", "--stages", str(stages), "--microbatches",
                    str(microbatches), "--batch-size", str(microbatches))
    assert f"beyond the limit of {limits.MAX_COMPUTE_ACTIONS:,}" in err


def test_span_output_has_its_own_lower_action_limit(capsys, tmp_path):
    """A trace makes ~3 spans per action: 400,000 actions simulate, but not with --trace."""
    microbatches = limits.MAX_SPAN_ACTIONS // 4 + 1
    argv = ["predict", "--layers", "4", "--stages", "2", "--microbatches", str(microbatches),
            "--batch-size", str(microbatches)]
    err = one_error(capsys, *argv, "--trace", str(tmp_path / "t.json"))
    assert f"beyond the limit of {limits.MAX_SPAN_ACTIONS:,} with --trace or --gantt" in err
    assert not (tmp_path / "t.json").exists()


def test_the_action_ceilings_fit_the_memory_and_time_ceilings():
    """Whatever check_size accepts needs at most MAX_MEMORY_BYTES and about a minute (estimated)."""
    top = limits.MAX_COMPUTE_ACTIONS // 2  # stages x micro-batches at the ceiling
    assert limits.step_memory_bytes(1, top) <= limits.MAX_MEMORY_BYTES
    assert limits.step_memory_bytes(1, limits.MAX_SPAN_ACTIONS // 2, spans=True) <= limits.MAX_MEMORY_BYTES
    assert limits.work_s(1, 1, top, balanced=False) <= 1.5 * limits.MAX_WORK_S
    assert limits.work_s(1, 1, limits.MAX_SPAN_ACTIONS // 2, balanced=False, spans=True) <= 1.5 * limits.MAX_WORK_S


def test_more_pieces_than_layers_is_refused_before_the_schedule_is_built(monkeypatch):
    import pipesim.plan

    monkeypatch.setattr(pipesim.plan, "build_schedule", lambda *a: pytest.fail("built a schedule"))
    with pytest.raises(PartitionError, match="cannot cut 8 layers into 16 pieces"):
        make_plan(fc(8, 8), 8, 1000, 1000, "interleaved-1f1b", "0-3,4-7")


def test_more_microbatches_than_samples_is_refused(capsys):
    err = one_error(capsys, "predict", "--microbatches", "1024", "--batch-size", "512")
    assert "--batch-size 512 must be a positive multiple of --microbatches 1024" in err


def test_stages_beyond_layers_fail_before_costing_every_rank():
    calls = []

    class Counting(ProfileCostModel):
        def compute_s(self, *args, **kwargs):
            calls.append(args)
            return super().compute_s(*args, **kwargs)

    costs = Counting(constant_profile(1e-3, 2e-3))
    with pytest.raises(PartitionError, match="cannot cut 4 layers into 1000 pieces"):
        make_plan(fc(4, 8), 1000, 1, 8, "1f1b", "balanced", costs)
    assert calls == []


def test_work_limit_refuses_a_dynamic_programme_of_hours(capsys):
    assert limits.work_s(3000, 1000, 1) > limits.MAX_WORK_S
    assert "would take about" in one_error(capsys, "predict", "--layers", "3000", "--width", "8",
                                           "--stages", "1000", "--microbatches", "1", "--batch-size", "1")


def test_optimize_and_sweep_refuse_searches_beyond_the_work_limit(capsys):
    assert "optimize's search" in one_error(capsys, "optimize", "--layers", "20000", "--stages", "64")
    err = one_error(capsys, "sweep", "--layers", "3000", "--width", "8", "--stages", "500,1000",
                    "--microbatches", "1", "--batch-size", "1", "--jobs", "1", "--schedule", "1f1b", "--quiet")
    assert "the sweep of 2 points on 1 processes would take about" in err


def test_defaults_are_far_within_the_limits():
    from pipesim.optimize import MAX_EXPANSIONS, MAX_SIMULATIONS
    from pipesim.sweep import grid, sweep_work_s

    assert limits.work_s(32, 4, 8) < 1
    assert limits.optimize_work_s(32, 4, 8, MAX_SIMULATIONS, MAX_EXPANSIONS) < limits.MAX_WORK_S / 2
    points = grid([1, 2, 4, 8, 16], [1, 2, 4, 8, 16, 32], ["gpipe", "1f1b"])
    assert sweep_work_s(32, points) < 5


def test_balanced_cut_of_thousands_of_stages_has_no_recursion_limit():
    cut = balanced([1.0] * 2005, 2000)  # the recursive programme died beyond ~1000 stages
    assert cut.num_stages == 2000 and sum(cut.counts) == 2005 and max(cut.counts) == 2


def test_optimize_at_its_stage_limit_runs(capsys):
    """1,024 stages: the bounds' programmes once recursed a few frames per stage and died
    beyond ~300 stages (RecursionError); now they run bottom-up."""
    code = main(["optimize", "--layers", str(limits.MAX_OPTIMIZE_STAGES + 8), "--width", "16", "--stages",
                 str(limits.MAX_OPTIMIZE_STAGES), "--microbatches", "1", "--batch-size", "4",
                 "--max-simulations", "3", "--json"])
    out, _ = capsys.readouterr()
    assert code == 0 and f'"num_stages": {limits.MAX_OPTIMIZE_STAGES}' in out


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 10**400, "1", True, None, -1e-9, 2.0])
def test_check_number_refuses_what_is_not_a_finite_number_in_range(value):
    with pytest.raises(UserError, match="field x must be a finite number in"):
        limits.check_number("field x", value, 0.0, 1.0)


def test_check_number_bounds():
    assert limits.check_number("x", 0, 0.0, 1.0) == 0.0
    assert limits.check_number("x", 1, 0.0, 1.0) == 1.0
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        limits.check_number("x", 0, 0.0, 1.0, low_open=True)
