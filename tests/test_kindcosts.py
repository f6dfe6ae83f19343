"""Costs by layer kind and shape (pipesim/kindcosts.py, profile version 3): parsing, the
measured-shape lookup, the fitted law, extrapolation marks, the missing-kind error, and
the ledger figures (the loss's saved tensors, PieceMemory) that optimize's memory cap uses."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.kindcosts import (
    DIRECTIONS,
    KindCosts,
    KindLaw,
    MeasuredShape,
    fit_law,
    moved_bytes_per_sample,
    summarize,
)
from pipesim.model import fc, layer, load_model
from pipesim.profile import ProfileError, constant_profile, parse_profile
from pipesim.schedule import Kind

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
LAW = {"forward": KindLaw(1e-5, 0.0, 1e-11, 1e-10), "backward": KindLaw(2e-5, 1e-10, 2e-11, 2e-10),
       "input": KindLaw(1e-5, 0.0, 1e-11, 1e-10), "weight": KindLaw(1e-5, 1e-10, 1e-11, 1e-10)}
SIZES = (1, 4, 16)


def law_shape(spec, laws=LAW, sizes=SIZES) -> MeasuredShape:
    """A measured shape whose times the laws give exactly (at its own size)."""
    moved = moved_bytes_per_sample(spec)
    return MeasuredShape(spec.cost_key, spec.params, spec.forward_flops_per_sample, moved, sizes,
                         {d: tuple(laws[d].time_s(b, spec.params, spec.forward_flops_per_sample, moved)
                                   for b in sizes) for d in DIRECTIONS})


def kinds_of(models, laws=LAW) -> dict:
    """A profile's ``kinds`` section: every distinct layer of `models` measured, times by `laws`."""
    shapes: dict[str, dict] = {}
    for model in models:
        for spec in model.layers:
            shapes.setdefault(spec.kind, {})[spec.cost_key] = law_shape(spec, laws)
    return {kind: KindCosts(kind, dict(laws), tuple(by_key.values())).to_json() for kind, by_key in shapes.items()}


def profile_data(kinds: dict | None = None, version: int = 3, fc_table: bool = True) -> dict:
    data = {"schema": "pipesim-profile", "version": version, "name": "kinds-test",
            "compute": {}, "links": {"intra_node": {"latency_s": 1e-6, "bandwidth_Bps": 1e9}}}
    if fc_table:
        table = {"widths": [256, 512], "microbatch_sizes": [4, 64], "seconds": [[1e-5, 1e-4], [4e-5, 4e-4]]}
        data["compute"]["fc"] = {d: table for d in DIRECTIONS}
        data["ranges"] = {"fc": {"width": [256, 512], "microbatch_size": [4, 64]}}
    if kinds is not None:
        data["kinds"] = kinds
    return data


def mini(name: str):
    return load_model(MODELS / f"{name}.toml")


# --- the profile section ----------------------------------------------------------------


def test_kinds_section_round_trips_through_the_profile():
    kinds = kinds_of([mini("vgg16-mini")])
    profile = parse_profile(profile_data(kinds))
    assert set(profile.kinds) == {"conv2d", "maxpool", "flatten", "fc"}
    assert {k: v.to_json() for k, v in profile.kinds.items()} == kinds


@pytest.mark.parametrize("version", [1, 2])
def test_older_versions_still_load_without_kinds(version):
    profile = parse_profile(profile_data(version=version))
    assert profile.kinds == {}
    assert ProfileCostModel(profile).layer_s(fc(1, 256).layers[0], Kind.F, 4) == pytest.approx(1e-5)


@pytest.mark.parametrize("mutate, field", [
    (lambda k: k["conv2d"].pop("laws"), "kinds.conv2d"),
    (lambda k: k["conv2d"]["laws"].pop("weight"), "kinds.conv2d.laws"),
    (lambda k: k["conv2d"]["laws"]["forward"].update(s_per_watt=1.0), "kinds.conv2d.laws.forward.s_per_watt"),
    (lambda k: k["conv2d"]["laws"]["backward"].update(fixed_s=-1.0), "kinds.conv2d.laws.backward.fixed_s"),
    (lambda k: k["conv2d"]["shapes"][0]["forward"].pop(), "kinds.conv2d.shapes[0].forward"),
    (lambda k: k["conv2d"]["shapes"][0].update(microbatch_sizes=[4, 1, 16]),
     "kinds.conv2d.shapes[0].microbatch_sizes"),
    (lambda k: k["conv2d"]["shapes"][0]["input"].__setitem__(0, math.nan), "kinds.conv2d.shapes[0].input[0]"),
    (lambda k: k["conv2d"].update(shapes=[]), "kinds.conv2d.shapes"),
    (lambda k: k["conv2d"]["shapes"][0].pop("key"), "kinds.conv2d.shapes[0]"),
])
def test_malformed_kinds_name_the_field(mutate, field):
    kinds = copy.deepcopy(kinds_of([mini("vgg16-mini")]))
    mutate(kinds)
    with pytest.raises(ProfileError, match=re.escape(field)):
        parse_profile(profile_data(kinds))


# --- lookup: measured shapes, the law ------------------------------------------------


def test_measured_shape_is_exact_at_its_points_and_piecewise_between():
    model = mini("vgg16-mini")
    costs = ProfileCostModel(parse_profile(profile_data(kinds_of([model]))))
    conv = model.layers[0]
    shape = law_shape(conv)
    for b, seconds in zip(SIZES, shape.seconds["backward"]):
        assert costs.layer_s(conv, Kind.B, b) == pytest.approx(seconds, rel=1e-12)
    # halfway between 4 and 16 samples: halfway between the two times
    assert costs.layer_s(conv, Kind.F, 10) == pytest.approx(sum(shape.seconds["forward"][1:]) / 2, rel=1e-12)


def test_unmeasured_shape_costs_what_the_law_says():
    profile = parse_profile(profile_data(kinds_of([mini("vgg16-mini")])))
    big = load_model(MODELS / "vgg16.toml").layers[1]  # conv 64->64 at 224x224: never measured
    moved = moved_bytes_per_sample(big)
    for kind, direction in ((Kind.F, "forward"), (Kind.B, "backward"), (Kind.I, "input"), (Kind.W, "weight")):
        expected = LAW[direction].time_s(8, big.params, big.forward_flops_per_sample, moved)
        assert ProfileCostModel(profile).layer_s(big, kind, 8) == pytest.approx(expected, rel=1e-12)


def test_fc_keeps_its_width_table_when_the_profile_has_one():
    """The fc tables win over measured fc shapes, so fc models cost what they always did."""
    kinds = kinds_of([mini("vgg16-mini")])
    with_kinds = ProfileCostModel(parse_profile(profile_data(kinds)))
    without = ProfileCostModel(parse_profile(profile_data()))
    for spec in (fc(1, 256).layers[0], mini("vgg16-mini").layers[20]):  # 256x256 was measured as a kind too
        for kind in (Kind.F, Kind.B, Kind.I, Kind.W):
            assert with_kinds.layer_s(spec, kind, 32) == without.layer_s(spec, kind, 32)


def test_fc_from_its_measured_shapes_when_there_is_no_table():
    model = mini("vgg16-mini")
    costs = ProfileCostModel(parse_profile(profile_data(kinds_of([model]), fc_table=False)))
    head = model.layers[-1]
    assert costs.layer_s(head, Kind.B, 16) == pytest.approx(law_shape(head).seconds["backward"][2], rel=1e-12)


# --- fitting ----------------------------------------------------------------------------


def test_fit_law_recovers_an_exact_law_from_several_shapes():
    truth = KindLaw(3e-5, 2e-10, 1.5e-11, 4e-10)
    shapes = [law_shape(x, {d: truth for d in DIRECTIONS}, (1, 2, 8, 32))
              for x in load_model(MODELS / "vgg16-mini.toml").layers if x.kind == "conv2d"]
    points = [(b, s.params, s.flops_per_sample, s.bytes_per_sample, t)
              for s in shapes for b, t in zip(s.microbatch_sizes, s.seconds["forward"])]
    law, worst = fit_law(points)
    assert worst < 1e-6
    for key in ("fixed_s", "s_per_param", "s_per_flop", "s_per_byte"):
        assert getattr(law, key) == pytest.approx(getattr(truth, key), rel=1e-4), key


def test_fit_law_with_one_shape_keeps_fixed_and_flops_and_fits_the_points():
    """One transformer block shape cannot tell FLOPs from bytes: the law keeps FLOPs."""
    block = mini("gpt2-mini").layers[1]
    truth = KindLaw(2e-3, 0.0, 3e-11, 0.0)
    shape = law_shape(block, {d: truth for d in DIRECTIONS}, (1, 2, 4))
    points = [(b, shape.params, shape.flops_per_sample, shape.bytes_per_sample, t)
              for b, t in zip(shape.microbatch_sizes, shape.seconds["backward"])]
    law, worst = fit_law(points)
    assert worst < 1e-9 and law.s_per_byte == 0.0 and law.s_per_param == 0.0
    assert law.s_per_flop == pytest.approx(3e-11, rel=1e-6) and law.fixed_s == pytest.approx(2e-3, rel=1e-6)


def test_fit_law_of_nothing_measured_is_zero():
    assert fit_law([(1, 0, 10.0, 10.0, 0.0), (4, 0, 10.0, 10.0, 0.0)]) == (KindLaw(), 0.0)


# --- extrapolation marks and the missing-kind error -------------------------------------


def test_extrapolations_say_which_layers_and_how_far():
    kinds = kinds_of([mini("vgg16-mini")])
    costs = ProfileCostModel(parse_profile(profile_data(kinds)))
    # every conv, pool and flatten measured; fc from the width table, two below its widths
    below = costs.extrapolations(mini("vgg16-mini").layers)
    assert [(e.layer, e.source) for e in below] == [(19, "fc table"), (21, "fc table")]
    assert all(e.ratio < 1 for e in below)
    vgg = load_model(MODELS / "vgg16.toml")
    marks = {e.layer: e for e in costs.extrapolations(vgg.layers)}
    assert sorted(marks) == list(range(22))
    largest = max((s for s in costs.profile.kinds["conv2d"].shapes), key=lambda s: s.flops_per_sample)
    assert marks[1].ratio == pytest.approx(vgg.layers[1].forward_flops_per_sample / largest.flops_per_sample)
    assert marks[1].source == "law" and marks[1].measure == "FLOPs" and marks[1].reference == largest.key
    assert marks[18].kind == "flatten" and marks[18].measure == "bytes" and marks[18].ratio > 1
    assert marks[19].source == "fc table" and marks[19].reference == "fc width 512"
    assert marks[19].ratio == pytest.approx(2 * 25088 * 4096 / (2 * 512 * 512 + 512), rel=1e-3)
    lines = summarize(tuple(marks.values()))
    assert lines[0].startswith("13 conv2d layer(s) from the law: ") and len(lines) == 4


def test_missing_kinds_is_one_line_naming_them_and_the_command():
    costs = ProfileCostModel(parse_profile(profile_data(kinds_of([mini("vgg16-mini")]))))
    with pytest.raises(ProfileError) as info:
        costs.check_kinds(load_model(MODELS / "resnet50.toml"), "models/resnet50.toml")
    message = str(info.value)
    assert "\n" not in message and "bottleneck, avgpool" in message
    assert "pipesim calibrate --model models/resnet50.toml" in message
    ProfileCostModel(constant_profile(1e-6, 2e-6)).check_kinds(load_model(MODELS / "resnet50.toml"))  # "*"


def write_profile(tmp_path, data) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_predict_without_the_kinds_is_exit_2_one_line(tmp_path, capsys):
    path = write_profile(tmp_path, profile_data(version=2))
    code = main(["predict", "--model", str(MODELS / "gpt2-small.toml"), "--profile", path])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "embedding, transformer_block, lm_head" in err and "pipesim calibrate --model" in err


def test_predict_marks_extrapolated_costs_in_text_and_json(tmp_path, capsys):
    path = write_profile(tmp_path, profile_data(kinds_of([mini("gpt2-mini")])))
    model = str(MODELS / "gpt2-small.toml")
    assert main(["predict", "--model", model, "--profile", path, "--stages", "4", "--microbatches", "4",
                 "--batch-size", "8", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    marks = data["extrapolated"]
    assert [m["layer"] for m in marks] == list(range(14))
    block = next(m for m in marks if m["kind"] == "transformer_block")
    assert block["flops_ratio"] == pytest.approx(81.26, rel=1e-3) and block["source"] == "law"
    assert main(["predict", "--model", model, "--profile", path, "--stages", "4", "--microbatches", "4",
                 "--batch-size", "8"]) == 0
    text = capsys.readouterr().out
    assert "extrapolated for 12 transformer_block layer(s) from the law: 81.3x the FLOPs" in text


# --- memory: the loss on the last piece, and optimize's figures equal the ledger ------


def test_cross_entropy_saves_one_float_per_logit_on_the_last_piece():
    gpt = mini("gpt2-mini")
    assert gpt.loss == "cross_entropy" and gpt.loss_saved_bytes_per_sample == 4 * 128 * 2048
    assert fc(4, 64).loss == "mse" and fc(4, 64).loss_saved_bytes_per_sample == 0  # ReLU keeps the output
    assert gpt.piece_saved_bytes(0, 5) == gpt.stage_saved_bytes(0, 5) + 4 * 128 * 2048
    assert gpt.piece_saved_bytes(0, 4) == gpt.stage_saved_bytes(0, 4)


def test_the_simulated_ledger_holds_the_loss_on_the_last_rank():
    from pipesim.plan import make_plan
    from pipesim.predict import predict

    gpt = mini("gpt2-mini")
    costs = ProfileCostModel(constant_profile(1e-4, 2e-4))
    plan = make_plan(gpt, 2, 1, 2, "gpipe", "5,1")
    ranks = predict(plan, costs, "c").metrics.ranks
    assert ranks[1].peak_activation_bytes == 2 * gpt.piece_saved_bytes(5, 5)
    assert ranks[1].peak_activation_bytes == 2 * (gpt.stage_saved_bytes(5, 5) + 4 * 128 * 2048)


@pytest.mark.parametrize("name", ["vgg16-mini", "resnet50-mini", "gpt2-mini", "uneven", "fc32"])
def test_piece_memory_equals_the_ledger_for_every_range(name):
    from pipesim.stagecosts import PieceMemory

    model = mini(name)
    memory, n = PieceMemory(model), model.num_layers
    firsts = np.arange(n)
    lasts = np.minimum(firsts[:, None] + np.arange(n)[None, :], n - 1)
    saved, weight = memory.spans(firsts, lasts, object)
    for first in range(n):
        for k in range(n - first):
            assert saved[first, k] == model.piece_saved_bytes(first, first + k), (first, k)
            assert weight[first, k] == model.stage_weight_bytes(first, first + k), (first, k)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_optimize_under_a_memory_cap_on_vgg16_mini(schedule):
    """Every rank of the chosen cut fits the cap by the simulator's ledger; the search's own
    figure for each piece is that ledger's."""
    from pipesim.optimize import Problem, StageCosts, optimize, smallest_cap

    model = mini("vgg16-mini")
    costs = ProfileCostModel(parse_profile(profile_data(kinds_of([model]))))
    free = Problem(model, schedule, 2, 4, 64, costs, None, "k")
    loose = max(r.peak_memory_bytes for r in optimize(free).best.metrics.ranks)
    least, _ = smallest_cap(free, StageCosts(free))
    assert least < loose  # the cap below binds
    cap = (least + loose) // 2
    problem = Problem(model, schedule, 2, 4, 64, costs, cap, "k")
    optimum = optimize(problem)
    assert all(r.peak_memory_bytes <= cap for r in optimum.best.metrics.ranks)
    table = StageCosts(problem)
    for stage, (first, last) in enumerate(optimum.best.plan.partition.bounds):
        assert table.memory_bytes(stage, first, last) == optimum.best.metrics.ranks[stage].peak_memory_bytes
    assert optimum.gain_over_even >= 1.0 or not optimum.even_fits


# --- show-model --------------------------------------------------------------------------


def test_show_model_prints_one_row_per_layer(capsys):
    assert main(["show-model", str(MODELS / "resnet50.toml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("resnet50: 21 layers") and "message at a cut after it" in lines[2]
    rows = lines[3:-1]
    assert len(rows) == 21 and rows[0].split()[:3] == ["0", "conv2d", "64x112x112"]
    assert rows[-1].split()[-1] == "-" and lines[-1].split()[1] == "25,557,032"


def test_show_model_json_matches_the_layer_table(capsys):
    from pipesim.model import layer_table

    path = MODELS / "gpt2-mini.toml"
    assert main(["show-model", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = layer_table(load_model(path))
    assert data["params"] == 4_240_896 and data["loss_saved_bytes_per_sample"] == 4 * 128 * 2048
    assert [d["message_bytes_per_sample"] for d in data["layers"]] == [r.message_bytes_per_sample for r in rows]
    assert data["layers"][1]["output_shape"] == [128, 256]


def test_show_model_missing_file_is_exit_2(capsys, tmp_path):
    assert main(["show-model", str(tmp_path / "nope.toml")]) == 2
    assert "pipesim: error:" in capsys.readouterr().err


def test_layer_spec_for_the_law_helper():
    """moved_bytes_per_sample: input + output + saved (a maxpool's argmax indices included)."""
    pool = layer("maxpool", (4, 8, 8), kernel=2, stride=2)
    assert moved_bytes_per_sample(pool) == 4 * 256 + 4 * 64 + 8 * 64


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.toml")), ids=lambda p: p.stem)
def test_the_shipped_profile_covers_every_kind_in_models(path):
    from pipesim.profile import load_profile

    ProfileCostModel(load_profile()).check_kinds(load_model(path), str(path))
