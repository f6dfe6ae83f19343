"""optimize with activation recomputation (--recompute auto|none|all|LIST): the optimizer's
tables cost a recomputed piece as the engine does (exact against brute force), auto picks
recomputation only when the memory cap needs it, and its plan predicts what it said."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_optimize import REL, all_partitions, brute_force, problems

from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.engine import compute_s, stage_shapes
from pipesim.model import fc
from pipesim.optimize import (
    InfeasibleError,
    Problem,
    StageCosts,
    lower_bound_s,
    optimize,
    peak_memory_bytes,
)
from pipesim.profile import load_profile
from pipesim.recomputation import optimize_recompute
from pipesim.schedule import Kind

GPT2 = ["--model", "models/gpt2-mini.toml", "--stages", "2", "--batch-size", "8", "--microbatches", "4"]
GPT2_CAP = "44MiB"  # the best partition needs 45.97 MiB without recomputation, 38.60 MiB with all recomputed (3,3)


def _json(capsys, args: list[str]) -> dict:
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@st.composite
def recomputed_problems(draw):
    problem, cap_choice = draw(problems())
    pieces = tuple(sorted(draw(st.sets(st.integers(0, problem.num_pieces - 1), min_size=1))))
    return Problem(problem.model, problem.schedule, problem.num_stages, problem.num_microbatches,
                   problem.batch_size, problem.costs, recompute=pieces), cap_choice


@settings(max_examples=80, deadline=None)
@given(recomputed_problems())
def test_tables_cost_recomputed_pieces_as_the_engine_does(drawn):
    problem, _ = drawn
    table = StageCosts(problem)
    for time_s, memory, part in brute_force(problem):
        assert lower_bound_s(part, table) <= time_s * (1 + REL)
        assert peak_memory_bytes(part, table) == memory


@settings(max_examples=60, deadline=None)
@given(recomputed_problems())
def test_tables_charge_each_action_what_the_engine_charges(drawn):
    """A recomputed piece's B and I cost B (or I) + F in the tables, scalar and matrix, as in the engine."""
    problem, _ = drawn
    table, schedule = StageCosts(problem), problem.build_schedule()
    for part in all_partitions(problem.model.num_layers, problem.num_pieces):
        shapes = stage_shapes(problem.model, part, problem.recompute)
        for piece, (first, last) in enumerate(part.bounds):
            for kind in (Kind.F, Kind.B):
                engine_s = compute_s(problem.costs, shapes[piece], kind, problem.microbatch_size,
                                     schedule.rank_of(piece))
                assert table.action_s(piece, first, last, kind) == pytest.approx(engine_s, rel=REL)
                matrix = table.action_matrix(piece, kind, np.array([first]), last - first + 1)
                assert matrix[0, -1] == pytest.approx(engine_s, rel=REL)


@settings(max_examples=80, deadline=None)
@given(recomputed_problems())
def test_optimize_with_recomputation_matches_brute_force(drawn):
    problem, cap_choice = drawn
    everything = brute_force(problem)
    peaks = sorted(max(memory) for _, memory, _ in everything)
    cap = [None, peaks[0] - 1, peaks[len(peaks) // 2], peaks[0]][cap_choice]
    problem = Problem(problem.model, problem.schedule, problem.num_stages, problem.num_microbatches,
                      problem.batch_size, problem.costs, cap, recompute=problem.recompute)
    feasible = [t for t, memory, _ in everything if cap is None or max(memory) <= cap]
    if not feasible:
        with pytest.raises(InfeasibleError) as info:
            optimize(problem)
        assert info.value.min_cap_bytes == peaks[0]
        return
    optimum = optimize(problem)
    assert optimum.proven and optimum.best.plan.recompute == problem.recompute
    assert optimum.best.metrics.iteration_time_s == pytest.approx(min(feasible), rel=REL)


def test_auto_recomputes_when_only_that_meets_the_cap_and_predict_agrees(capsys):
    data = _json(capsys, ["optimize", *GPT2, "--memory-cap", GPT2_CAP, "--recompute", "auto"])
    chosen = data["recompute"]
    assert chosen["pieces"], "the cap is only met with recomputation"
    assert "without it the best partition needs 45.97 MiB" in chosen["reason"]
    assert {t["recompute"]: t["fits"] for t in chosen["tried"]}["none"] is False
    cap = 44 * 2**20
    assert data["peak_memory_bytes"] <= cap
    fitting = [t["iteration_time_s"] for t in chosen["tried"] if t["fits"]]
    assert data["iteration_time_s"] == min(fitting)
    partition = ",".join(map(str, data["partition"]))
    pieces = ",".join(map(str, chosen["pieces"]))
    predicted = _json(capsys, ["predict", *GPT2, "--partition", partition, "--recompute", pieces])
    assert predicted["iteration_time_s"] == data["iteration_time_s"]
    assert predicted["peak_memory_bytes"] == data["peak_memory_bytes"] <= cap
    assert [r["peak_memory_bytes"] for r in predicted["ranks"]] == [r["peak_memory_bytes"] for r in data["ranks"]]


def test_auto_text_says_what_it_chose_and_why(capsys):
    assert main(["optimize", *GPT2, "--memory-cap", GPT2_CAP, "--recompute", "auto"]) == 0
    out = capsys.readouterr().out
    assert "chosen     recompute 0: fits 44.00 MiB" in out
    assert "without it the best partition needs 45.97 MiB" in out
    assert "tried: none needs 46.0 MiB" in out
    assert "as fast as the even split" in out  # the comparison with the even split stays


@pytest.mark.parametrize("model", ["models/gpt2-mini.toml", "models/vgg16-mini.toml"])
def test_auto_without_a_cap_chooses_no_recomputation(capsys, model):
    data = _json(capsys, ["optimize", "--model", model, "--stages", "2", "--batch-size", "8",
                          "--microbatches", "4", "--recompute", "auto"])
    assert data["recompute"]["pieces"] == []
    assert data["recompute"]["reason"] == "recompute none: no memory cap, and recomputation only adds time"
    others = [t for t in data["recompute"]["tried"] if t["recompute"] != "none"]
    assert others and all(t["iteration_time_s"] > data["iteration_time_s"] for t in others)


def test_auto_under_a_cap_nothing_meets_names_the_smallest_cap(capsys):
    assert main(["optimize", *GPT2, "--memory-cap", "38MiB", "--recompute", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with or without recomputation" in err and "38.60 MiB" in err


def test_explicit_recompute_list_is_honoured(capsys):
    data = _json(capsys, ["optimize", *GPT2, "--recompute", "1"])
    assert data["recompute"] == {"pieces": [1], "reason": "recompute 1: as given (--recompute)", "tried": []}
    assert data["spec"]["execution"]["recompute"] == "1"
    plain = _json(capsys, ["optimize", *GPT2])
    assert plain["recompute"]["pieces"] == []
    assert data["iteration_time_s"] > plain["iteration_time_s"]


def test_fixed_recomputation_on_fc_models_equals_predict():
    """A small fc chain under the shipped profile, recompute all: the optimizer's best plan,
    predicted again from scratch, gives the same time and memory."""
    from pipesim.plan import make_plan
    from pipesim.predict import predict

    model = fc(8, 256)
    costs = ProfileCostModel(load_profile("default"))
    problem = Problem(model, "1f1b", 3, 4, 16, costs, None, "default")
    optimum = optimize_recompute(problem, "all", 50)
    best = optimum.best
    assert best.plan.recompute == (0, 1, 2)
    again = predict(make_plan(model, 3, 4, 16, "1f1b", ",".join(map(str, best.plan.partition.counts)),
                              recompute="all"), costs, "default")
    assert again.metrics.iteration_time_s == best.metrics.iteration_time_s
    assert again.metrics.peak_memory_bytes == best.metrics.peak_memory_bytes


@pytest.mark.parametrize("command", ["predict", "run"])
def test_auto_is_refused_outside_optimize(capsys, command):
    assert main([command, "--layers", "4", "--stages", "2", "--recompute", "auto"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipesim: error: --recompute auto: only optimize searches recomputation")
    assert err.count("\n") == 1


def test_a_recomputed_split_backward_costs_i_plus_f_and_w_alone():
    """zb-h1: the re-forward runs before I, not before W (engine.compute_s)."""
    from pipesim.profile import constant_profile

    costs = ProfileCostModel(constant_profile(1e-3, 2e-3, input_s_per_sample=1.2e-3, weight_s_per_sample=0.8e-3))
    problem = Problem(fc(4, 16), "zb-h1", 2, 4, 8, costs, recompute=(0,))
    table = StageCosts(problem)
    plain = StageCosts(Problem(fc(4, 16), "zb-h1", 2, 4, 8, costs))
    for kind, extra in ((Kind.F, 0.0), (Kind.I, plain.action_s(0, 0, 1, Kind.F)), (Kind.W, 0.0)):
        assert table.action_s(0, 0, 1, kind) == pytest.approx(plain.action_s(0, 0, 1, kind) + extra, rel=REL)
        assert table.action_s(1, 2, 3, kind) == pytest.approx(plain.action_s(1, 2, 3, kind), rel=REL)
    assert table.action_s(0, 0, 1, Kind.I) > plain.action_s(0, 0, 1, Kind.I)
