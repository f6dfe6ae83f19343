"""Activation recomputation in the simulator (--recompute none|all|LIST): the re-forward
before each B (before I when the backward is split), the ledger holding only each piece's
input per micro-batch in flight, the fast path equal to the event simulation; the plan's
refusals. (The runner side: tests/test_runner_kinds.py.)"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fastpath import _same_metrics, _same_spans, steps

from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.model import fc, load_model
from pipesim.partition import Partition
from pipesim.plan import make_plan, recompute_pieces
from pipesim.profile import constant_profile
from pipesim.schedule import ScheduleError, build_schedule
from pipesim.timeline import compute_metrics

F_S, B_S, I_S, W_S = 1e-3, 2e-3, 1.2e-3, 0.8e-3  # per layer per sample
COSTS = ProfileCostModel(constant_profile(F_S, B_S, input_s_per_sample=I_S, weight_s_per_sample=W_S))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(steps(), st.data())
def test_fast_path_equals_the_event_simulation_with_recomputation(step, data):
    schedule = step[0]
    recompute = tuple(sorted(data.draw(st.sets(st.integers(0, schedule.num_pieces - 1)))))
    fast = simulate(*step, path="fast", recompute=recompute)
    des = simulate(*step, path="des", recompute=recompute)
    if fast is not None:
        _same_metrics(fast, des)
        _same_spans(fast, des)
    for rank in range(des.num_ranks):  # every byte the ledger took is given back by the end
        assert [s for s in des.memory if s.rank == rank][-1].activation_bytes == 0


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_recomputing_every_piece_adds_one_forward_to_every_backward(name):
    """Balanced stages, constant costs, free links: (m + p - 1)(f + b) becomes (m + p - 1)(2f + b)."""
    p, m, layers, mbs = 4, 6, 8, 3
    plan = make_plan(fc(layers, 16), p, m, m * mbs, name, "2,2,2,2", recompute="all")
    f, b = 2 * F_S * mbs, 2 * B_S * mbs  # two layers per stage
    plain = compute_metrics(simulate(plan.schedule, plan.partition, plan.model, COSTS, mbs))
    again = compute_metrics(simulate(plan.schedule, plan.partition, plan.model, COSTS, mbs,
                                     recompute=plan.recompute))
    assert plain.iteration_time_s == pytest.approx((m + p - 1) * (f + b))
    assert again.iteration_time_s == pytest.approx((m + p - 1) * (2 * f + b))


def test_a_split_backward_runs_the_forward_again_before_i_and_not_before_w():
    plan = make_plan(fc(4, 16), 2, 4, 8, "zb-h1", "2,2", recompute="0")
    timeline = simulate(plan.schedule, plan.partition, plan.model, COSTS, 2, recompute=plan.recompute)
    length = {(s.stage, s.kind): s.end_s - s.start_s for s in timeline.spans if s.kind in "FIW"}
    per_piece = 2 * 2  # two layers, two samples
    assert length[0, "I"] == pytest.approx((F_S + I_S) * per_piece)
    assert length[1, "I"] == pytest.approx(I_S * per_piece)
    assert length[0, "W"] == pytest.approx(W_S * per_piece)


@pytest.mark.parametrize("model_name", ["fc32", "gpt2-mini", "vgg16-mini"])
def test_recomputation_holds_only_inputs_in_flight_and_one_re_forward(model_name):
    """1F1B, rank r keeps k = min(p - r, m) micro-batches in flight: k x S (saved bytes) per
    sample without recomputation; with it, k x the piece's input plus one re-forward's
    saved bytes besides that input (every kind here saves its first layer's input)."""
    model = load_model(f"models/{model_name}.toml")
    p, m, mbs = 2, 4, 3
    plan = make_plan(model, p, m, m * mbs, "1f1b", "balanced", recompute="all")
    plain = compute_metrics(simulate(plan.schedule, plan.partition, model, COSTS, mbs))
    again = compute_metrics(simulate(plan.schedule, plan.partition, model, COSTS, mbs, recompute=plan.recompute))
    for rank, (first, last) in enumerate(plan.partition.bounds):
        k = min(p - rank, m)
        saved, held = model.piece_saved_bytes(first, last), model.layers[first].input_bytes_per_sample
        assert model.layers[first].saves_input
        assert plain.ranks[rank].peak_activation_bytes == k * saved * mbs
        assert again.ranks[rank].peak_activation_bytes == (k * held + saved - held) * mbs
        assert again.ranks[rank].peak_activation_bytes <= plain.ranks[rank].peak_activation_bytes


def test_recompute_text_names_pieces():
    assert recompute_pieces("none", 4) == ()
    assert recompute_pieces("all", 3) == (0, 1, 2)
    assert recompute_pieces("3,1,1", 4) == (1, 3)
    for text, message in (("4", r"pieces are 0\.\.3"), ("a", "expected none, all or piece indices")):
        with pytest.raises(ScheduleError, match=message):
            recompute_pieces(text, 4)


def test_a_piece_starting_with_an_embedding_cannot_split_its_backward():
    model = load_model("models/gpt2-mini.toml")
    with pytest.raises(ScheduleError, match=r"splits the backward of piece 0 into I and W, but its first layer "
                                            r"\(embedding\) takes int64 input") as info:
        make_plan(model, 2, 4, 8, "zb-h1", "3,3")
    assert "\n" not in str(info.value)
    make_plan(model, 2, 4, 8, "1f1b", "3,3")  # a whole backward is fine
    make_plan(load_model("models/vgg16-mini.toml"), 2, 4, 8, "zb-h1", "11,11")


def test_predict_takes_recompute_and_records_it(capsys):
    """Piece 0 recomputed (1F1B, 2 stages): rank 0 holds less, rank 1 the same, the step is slower."""
    assert main(["predict", "--layers", "8", "--stages", "2", "--recompute", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["spec"]["execution"]["recompute"] == "0"
    assert main(["predict", "--layers", "8", "--stages", "2", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert data["iteration_time_s"] > plain["iteration_time_s"]
    assert data["ranks"][0]["peak_memory_bytes"] < plain["ranks"][0]["peak_memory_bytes"]
    assert data["ranks"][1]["peak_memory_bytes"] == plain["ranks"][1]["peak_memory_bytes"]


@pytest.mark.parametrize("args, expected", [
    (["predict", "--layers", "8", "--stages", "2", "--recompute", "2"], "pieces are 0..1"),
    (["predict", "--layers", "8", "--stages", "2", "--recompute", "some"], "recompute must be none, all or"),
    (["sweep", "--layers", "8", "--stages", "2", "--config", "RECOMPUTE"], "sweep does not search"),
])
def test_bad_recompute_is_a_one_line_error(tmp_path, capsys, args, expected):
    config = tmp_path / "r.toml"
    config.write_text('[execution]\nrecompute = "all"\n')
    assert main([str(config) if a == "RECOMPUTE" else a for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipesim: error: ") and err.count("\n") == 1 and expected in err


def test_gpipe_on_one_rank_holds_every_input_then_one_re_forward():
    """3 fc layers of 8, 2 micro-batches of 2: both inputs (8 floats a sample) in flight, then
    the first B's re-forward brings back its 3 outputs."""
    timeline = simulate(build_schedule("gpipe", 1, 2), Partition.from_counts([3]), fc(3, 8), COSTS, 2,
                        recompute=(0,))
    assert compute_metrics(timeline).ranks[0].peak_activation_bytes == (2 * 8 * 4 + 3 * 8 * 4) * 2


def test_the_validation_report_predicts_memory_with_the_plans_recomputation():
    """validate's ledger figures (saved accounting, step ledger) are the engine's, recomputation
    included (they once left it out, so a recomputed case was predicted as a plain one)."""
    from pipesim.validate import saved_peak_bytes

    model = load_model("models/gpt2-mini.toml")
    plain, again = (make_plan(model, 2, 4, 8, "1f1b", "3,3", recompute=r) for r in ("none", "all"))
    for plan in (plain, again):
        metrics = compute_metrics(simulate(plan.schedule, plan.partition, model, COSTS, plan.microbatch_size,
                                           recompute=plan.recompute))
        assert saved_peak_bytes(plan) == tuple(r.peak_activation_bytes for r in metrics.ranks)
    assert saved_peak_bytes(again)[0] < saved_peak_bytes(plain)[0]
