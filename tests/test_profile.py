"""The profile file: parsing and its errors, the measured-table law, the
optimizer table, the shipped default, and the range warnings."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import pytest

from pipesim.costs import ProfileCostModel
from pipesim.model import fc, fc_layer
from pipesim.profile import (
    Affine,
    Link,
    ProfileError,
    Table,
    load_profile,
    parse_profile,
)

REL = 1e-12


def params(w: int) -> int:
    """Parameters of a square fc layer (weight + bias), as fc_layer counts them."""
    return w * w + w


def base(**changes) -> dict:
    """A minimal valid profile dict; keyword arguments replace top-level keys."""
    data = {
        "schema": "pipesim-profile",
        "version": 1,
        "name": "test",
        "compute": {"fc": {"forward": {"s_per_param": 1e-9}, "backward": {"s_per_param": 2e-9}}},
        "links": {"intra_node": {"latency_s": 1e-6, "bandwidth_Bps": 1e9}},
    }
    data.update(changes)
    return data


def table_profile(forward: dict, **changes) -> dict:
    return base(compute={"fc": {"forward": forward, "backward": {"s_per_param": 1e-9}}}, **changes)


def error(data) -> str:
    with pytest.raises(ProfileError) as info:
        parse_profile(data)
    return str(info.value)


# --- parsing --------------------------------------------------------------------


def test_minimal_profile_parses_with_defaults():
    profile = parse_profile(base())
    assert profile.name == "test"
    forward, backward = profile.compute["fc"]
    assert forward == Affine(s_per_param=1e-9)
    assert backward == Affine(s_per_param=2e-9)
    assert profile.action_overhead_s == 0.0
    assert profile.optimizer_table is None
    assert (profile.optimizer_fixed_s, profile.optimizer_s_per_param) == (0.0, 0.0)
    assert profile.intra_node == Link(1e-6, 1e9)
    assert profile.description == ""


def test_optional_blocks_are_carried():
    data = base(description="d", action_overhead_s=5e-5, metadata={"host": "h"},
                ranges={"fc": {"width": [1, 2]}}, samples={"x": 1}, noise={"y": 2})
    profile = parse_profile(data)
    assert profile.description == "d"
    assert profile.action_overhead_s == 5e-5
    assert profile.ranges == {"fc": {"width": [1, 2]}}
    assert profile.extra == {"metadata": {"host": "h"}, "samples": {"x": 1}, "noise": {"y": 2}}


@pytest.mark.parametrize("schema", ["pipesim-model", None, 1])
def test_wrong_schema(schema):
    data = base(schema=schema)
    if schema is None:
        del data["schema"]
    assert "schema" in error(data)


@pytest.mark.parametrize("version", [0, 6, "1", None])
def test_wrong_version(version):
    data = base(version=version)
    if version is None:
        del data["version"]
    assert "version" in error(data)


def test_not_an_object():
    assert "object" in error([base()])


def test_unknown_top_level_key_is_named():
    message = error(base(colour="blue"))
    assert "colour" in message and "unknown" in message


@pytest.mark.parametrize("name", [None, 3])
def test_name_required_string(name):
    data = base(name=name)
    if name is None:
        del data["name"]
    assert "name" in error(data)


@pytest.mark.parametrize("field, mutate", [
    ("action_overhead_s", lambda d: d.update(action_overhead_s=-1e-6)),
    ("compute.fc.forward.s_per_param", lambda d: d["compute"]["fc"]["forward"].update(s_per_param=-1e-9)),
    ("compute.fc.backward.fixed_s", lambda d: d["compute"]["fc"]["backward"].update(fixed_s=-1.0)),
    ("links.intra_node.latency_s", lambda d: d["links"]["intra_node"].update(latency_s=-1e-6)),
    ("links.intra_node.bandwidth_Bps", lambda d: d["links"]["intra_node"].update(bandwidth_Bps=-1.0)),
    ("links.intra_node.bandwidth_Bps", lambda d: d["links"]["intra_node"].update(bandwidth_Bps=0)),
    ("optimizer.s_per_param", lambda d: d.update(optimizer={"s_per_param": -1e-9})),
])
def test_negative_numbers_name_the_field(field, mutate):
    data = base()
    mutate(data)
    message = error(data)
    assert field.split(".")[-1] in message
    assert field in message or field == "action_overhead_s"


@pytest.mark.parametrize("field, mutate", [
    ("compute", lambda d: d.update(compute=[1, 2])),
    ("compute.fc", lambda d: d["compute"].update(fc="fast")),
    ("compute.fc.forward", lambda d: d["compute"]["fc"].update(forward=[1e-9])),
    ("compute.fc.backward", lambda d: d["compute"]["fc"].pop("backward")),
    ("compute.fc.forward.s_per_param", lambda d: d["compute"]["fc"]["forward"].update(s_per_param="1e-9")),
    ("compute.fc.forward.s_per_flop", lambda d: d["compute"]["fc"]["forward"].update(s_per_flop=True)),
    ("compute.fc.forward.s_per_parm", lambda d: d["compute"]["fc"]["forward"].update(s_per_parm=1e-9)),
    ("links", lambda d: d.pop("links")),
    ("links.intra_node", lambda d: d["links"].update(intra_node=None)),
    ("links.inter_node", lambda d: d["links"].update(inter_node=5)),
    ("links.intra_node.latency_s", lambda d: d["links"]["intra_node"].update(latency_s="0")),
    ("links.intra_node.bandwidth_Bps", lambda d: d["links"]["intra_node"].update(bandwidth_Bps="1e9")),
    ("optimizer", lambda d: d.update(optimizer=[0.0])),
    ("optimizer.fixed_s", lambda d: d.update(optimizer={"fixed_s": "0"})),
])
def test_wrong_types_name_the_field(field, mutate):
    data = base()
    mutate(data)
    assert field in error(data)


def test_top_level_field_named_without_a_leading_dot():
    assert "field action_overhead_s" in error(base(action_overhead_s=-1.0))


@pytest.mark.parametrize("field, mutate", [
    ("optimizer.s_per_parm", lambda d: d.update(optimizer={"s_per_parm": 1e-9})),
    ("links.intra_node.bandwith_Bps", lambda d: d["links"]["intra_node"].update(bandwith_Bps=1e9)),
    ("links.inter-node", lambda d: d["links"].update({"inter-node": {"latency_s": 1e-5}})),
])
def test_unknown_keys_in_optimizer_and_links_are_named(field, mutate):
    data = base()
    mutate(data)
    assert field in error(data)


def test_bandwidth_null_is_infinite():
    data = base(links={"intra_node": {"latency_s": 3e-6, "bandwidth_Bps": None}})
    link = parse_profile(data).intra_node
    assert link.bandwidth_Bps == math.inf
    assert link.time_s(0) == link.time_s(1 << 30) == 3e-6


def test_bandwidth_and_latency_default_to_free():
    link = parse_profile(base(links={"intra_node": {}})).intra_node
    assert link == Link(0.0, math.inf)
    assert link.time_s(1 << 20) == 0.0


def test_inter_node_defaults_to_intra_node():
    profile = parse_profile(base())
    assert profile.inter_node == profile.intra_node == Link(1e-6, 1e9)
    costs = ProfileCostModel(profile, ranks_per_node=1)
    assert costs.transfer_s(0, 1, 1000) == pytest.approx(1e-6 + 1000 / 1e9, rel=REL)


def test_inter_node_given_is_used_across_nodes_only():
    data = base(links={"intra_node": {"latency_s": 1e-6, "bandwidth_Bps": 1e10},
                       "inter_node": {"latency_s": 5e-5, "bandwidth_Bps": 1e9}})
    profile = parse_profile(data)
    assert profile.inter_node == Link(5e-5, 1e9)
    costs = ProfileCostModel(profile, ranks_per_node=2)
    assert costs.transfer_s(0, 1, 1000) == pytest.approx(1e-6 + 1000 / 1e10, rel=REL)  # node 0
    assert costs.transfer_s(1, 2, 1000) == pytest.approx(5e-5 + 1000 / 1e9, rel=REL)  # node 0 -> 1
    assert costs.transfer_s(2, 3, 1000) == pytest.approx(1e-6 + 1000 / 1e10, rel=REL)  # node 1
    single_node = ProfileCostModel(profile)  # ranks_per_node=None: everything intra-node
    assert single_node.transfer_s(1, 2, 1000) == pytest.approx(1e-6 + 1000 / 1e10, rel=REL)


def test_load_profile_from_file_and_errors(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(base(name="from-file")))
    assert load_profile(path).name == "from-file"
    assert load_profile(str(path)).name == "from-file"
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(path)


def test_default_profile_loads_and_prices_an_fc_layer():
    profile = load_profile(None)
    assert load_profile("default") == profile
    assert profile.name
    assert "fc" in profile.compute or "*" in profile.compute
    costs = ProfileCostModel(profile)
    layers = fc(2, 512).layers
    forward, backward = costs.compute_s(layers, "F", 8), costs.compute_s(layers, "B", 8)
    assert 0 < forward < backward < 1.0
    assert 0 < costs.transfer_s(0, 1, 1 << 20) < 1.0
    assert costs.optimizer_s(1_000_000) >= 0


# --- the measured-table law -----------------------------------------------------

WIDTHS = (256, 512, 1024)
SIZES = (4, 16, 64)
# Time per parameter differs per width (and is not proportional in b) so that the
# width law and the micro-batch law both show.
SECONDS = ((1.0e-4, 2.0e-4, 8.0e-4),
           (6.0e-4, 1.5e-3, 4.0e-3),
           (4.0e-3, 9.0e-3, 3.0e-2))
TABLE = {"widths": list(WIDTHS), "microbatch_sizes": list(SIZES),
         "seconds": [list(row) for row in SECONDS]}


def table() -> Table:
    law, _ = parse_profile(table_profile(copy.deepcopy(TABLE))).compute["fc"]
    assert isinstance(law, Table)
    return law


def layer_time(law: Table, width: int, b: int) -> float:
    layer = fc_layer(width, width)
    return law.time_s(b, layer.params, layer.forward_flops_per_sample)


def test_table_parses():
    law = table()
    assert law.widths == WIDTHS and law.microbatch_sizes == SIZES and law.seconds == SECONDS


# The layer's width is that of the square fc layer with its parameter count
# (w*w + w, bias included): taking sqrt(params) instead lands every measured
# width but the largest a little into the next interval, and these fail.
@pytest.mark.parametrize("i", range(len(WIDTHS)))
@pytest.mark.parametrize("j", range(len(SIZES)))
def test_table_exact_at_measured_points(i, j):
    assert layer_time(table(), WIDTHS[i], SIZES[j]) == pytest.approx(SECONDS[i][j], rel=REL)


def test_table_exact_at_measured_points_single_width():
    law = Table((512,), SIZES, (SECONDS[1],))
    for b, seconds in zip(SIZES, SECONDS[1]):
        assert layer_time(law, 512, b) == pytest.approx(seconds, rel=REL)


@pytest.mark.parametrize("b, expected", [
    (10, 1.5e-3 / 2 + 6.0e-4 / 2),               # halfway 4..16
    (7, 6.0e-4 + 3 / 12 * (1.5e-3 - 6.0e-4)),    # quarter 4..16
    (40, 1.5e-3 + 24 / 48 * (4.0e-3 - 1.5e-3)),  # halfway 16..64
    (128, 4.0e-3 + 64 * (4.0e-3 - 1.5e-3) / 48),  # past the end: last segment's slope
    (2, 6.0e-4 - 2 * (1.5e-3 - 6.0e-4) / 12),     # before the start: first segment's slope
])
def test_table_piecewise_linear_in_microbatch_size(b, expected):
    law = Table((512,), SIZES, (SECONDS[1],))
    assert layer_time(law, 512, b) == pytest.approx(expected, rel=REL)


def test_table_piecewise_linear_at_each_measured_width():
    law = table()
    for i, w in enumerate(WIDTHS):
        assert layer_time(law, w, 10) == pytest.approx((SECONDS[i][0] + SECONDS[i][1]) / 2, rel=REL)
        assert layer_time(law, w, 40) == pytest.approx((SECONDS[i][1] + SECONDS[i][2]) / 2, rel=REL)


def test_table_never_negative():
    # Steep: extending the first segment down to b = 1 would go below zero.
    law = Table((512,), (10, 20), ((1e-4, 1e-3),))
    assert layer_time(law, 512, 1) == 0.0
    assert layer_time(law, 512, 9) == pytest.approx(1e-4 - 9e-5, rel=1e-9)
    for b in range(1, 40):
        assert layer_time(law, 512, b) >= 0.0


def test_table_single_microbatch_size_is_proportional():
    law = Table((512,), (8,), ((4e-4,),))
    assert layer_time(law, 512, 8) == pytest.approx(4e-4, rel=REL)
    assert layer_time(law, 512, 2) == pytest.approx(1e-4, rel=REL)
    assert layer_time(law, 512, 32) == pytest.approx(1.6e-3, rel=REL)


WIDTH_REL = 1e-9  # float rounding in the logarithms only


def per_param(i: int, j: int) -> float:
    return SECONDS[i][j] / params(WIDTHS[i])


@pytest.mark.parametrize("j", range(len(SIZES)))
def test_table_log_width_midpoint_by_hand(j):
    law = Table((256, 1024), SIZES, (SECONDS[0], SECONDS[2]))
    # 512 is halfway between 256 and 1024 in log width: mean of the two times per parameter.
    p256, p1024 = SECONDS[0][j] / params(256), SECONDS[2][j] / params(1024)
    expected = 0.5 * (p256 + p1024) * params(512)
    assert layer_time(law, 512, SIZES[j]) == pytest.approx(expected, rel=WIDTH_REL)
    # Not linear in width (weight 1/3) nor the interpolated total time.
    linear = (2 / 3 * p256 + 1 / 3 * p1024) * params(512)
    assert abs(layer_time(law, 512, SIZES[j]) / linear - 1) > 0.05


def test_table_log_width_picks_the_right_interval():
    law = table()
    # 724 ~ 512 * sqrt(2): halfway between 512 and 1024 in log width.
    weight = math.log(724 / 512) / math.log(2)
    for j, b in enumerate(SIZES):
        expected = ((1 - weight) * per_param(1, j) + weight * per_param(2, j)) * params(724)
        assert layer_time(law, 724, b) == pytest.approx(expected, rel=WIDTH_REL)
    # Between micro-batch sizes too: both laws at once.
    expected = ((1 - weight) * (6.0e-4 + 1.5e-3) / 2 / params(512)
                + weight * (4.0e-3 + 9.0e-3) / 2 / params(1024)) * params(724)
    assert layer_time(law, 724, 10) == pytest.approx(expected, rel=WIDTH_REL)


@pytest.mark.parametrize("width, i", [(64, 0), (128, 0), (2048, 2), (4096, 2)])
@pytest.mark.parametrize("j", range(len(SIZES)))
def test_table_nearest_width_outside_the_measured_widths(width, i, j):
    expected = per_param(i, j) * params(width)
    assert layer_time(table(), width, SIZES[j]) == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize("field, change", [
    ("widths", {"widths": [512, 256, 1024]}),
    ("widths", {"widths": [256, 256, 1024]}),
    ("widths", {"widths": [0, 512, 1024]}),
    ("widths", {"widths": [256.0, 512, 1024]}),
    ("widths", {"widths": []}),
    ("microbatch_sizes", {"microbatch_sizes": [16, 4, 64]}),
    ("microbatch_sizes", {"microbatch_sizes": "4,16,64"}),
    ("seconds", {"seconds": [[1e-4, 2e-4], [6e-4, 1.5e-3], [4e-3, 9e-3]]}),  # rows too short
    ("seconds", {"seconds": [list(SECONDS[0]), list(SECONDS[1])]}),  # a row missing
    ("seconds", {"seconds": [list(SECONDS[0]), [6e-4, -1.5e-3, 4e-3], list(SECONDS[2])]}),
    ("seconds", {"seconds": [list(SECONDS[0]), [6e-4, "x", 4e-3], list(SECONDS[2])]}),
])
def test_malformed_table_names_the_field(field, change):
    message = error(table_profile({**copy.deepcopy(TABLE), **change}))
    assert f"compute.fc.forward.{field}" in message


def test_table_with_missing_or_extra_key():
    partial = {k: v for k, v in TABLE.items() if k != "widths"}
    assert "compute.fc.forward" in error(table_profile(partial))
    assert "compute.fc.forward" in error(table_profile({**TABLE, "fixed_s": 0.0}))


def test_forward_table_backward_affine_through_the_cost_model():
    costs = ProfileCostModel(parse_profile(table_profile(copy.deepcopy(TABLE))))
    layers = fc(3, 1024).layers
    assert costs.compute_s(layers, "F", 16) == pytest.approx(3 * 9.0e-3, rel=REL)
    assert costs.compute_s(layers, "B", 16) == pytest.approx(3 * 1e-9 * params(1024), rel=REL)


# --- the optimizer ----------------------------------------------------------------

OPTIMIZER = {"params": [1000, 2000, 4000], "seconds": [1e-3, 3e-3, 5e-3]}


def test_optimizer_table_parses():
    profile = parse_profile(base(optimizer=copy.deepcopy(OPTIMIZER)))
    assert profile.optimizer_table == ((1000, 2000, 4000), (1e-3, 3e-3, 5e-3))


@pytest.mark.parametrize("n, expected", [
    (1000, 1e-3), (2000, 3e-3), (4000, 5e-3),  # measured points
    (1500, 2e-3), (3000, 4e-3), (2500, 3.5e-3),  # between
    (8000, 9e-3),  # past the end: last segment's slope (1e-6 s per parameter)
    (750, 5e-4),  # before the start: first segment's slope (2e-6 s per parameter)
    (100, 0.0),  # clamped at zero
])
def test_optimizer_table_is_piecewise_linear(n, expected):
    costs = ProfileCostModel(parse_profile(base(optimizer=copy.deepcopy(OPTIMIZER))))
    assert costs.optimizer_s(n) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_optimizer_affine():
    costs = ProfileCostModel(parse_profile(base(optimizer={"fixed_s": 1e-3, "s_per_param": 2e-9})))
    assert costs.optimizer_s(1_000_000) == pytest.approx(3e-3, rel=REL)
    assert ProfileCostModel(parse_profile(base())).optimizer_s(1_000_000) == 0.0


@pytest.mark.parametrize("optimizer", [
    {"params": [2000, 1000], "seconds": [1e-3, 2e-3]},
    {"params": [1000, 2000], "seconds": [1e-3]},
    {"params": [1000, 2000], "seconds": [1e-3, -2e-3]},
    {"params": [], "seconds": []},
    {"params": "1000", "seconds": [1e-3]},
])
def test_malformed_optimizer_table(optimizer):
    assert "optimizer" in error(base(optimizer=optimizer))


def test_optimizer_table_params_must_be_positive():
    assert "optimizer" in error(base(optimizer={"params": [0], "seconds": [1e-3]}))


# --- range warnings -------------------------------------------------------------

RANGES = {"fc": {"width": [256, 1024], "microbatch_size": [4, 64]}}


def ranged_costs(name: str) -> ProfileCostModel:
    # Warnings are remembered per message (which carries the profile name), so
    # every test uses its own name.
    return ProfileCostModel(parse_profile(table_profile(copy.deepcopy(TABLE), name=name,
                                                        ranges=copy.deepcopy(RANGES))))


def no_warnings(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    assert [str(w.message) for w in caught] == []
    return result


@pytest.mark.parametrize("width, b", [(256, 4), (1024, 64), (512, 16), (724, 5)])
def test_no_warning_inside_the_range(width, b):
    costs = ranged_costs(f"inside-{width}-{b}")
    no_warnings(lambda: costs.compute_s(fc(4, width).layers, "F", b))
    no_warnings(lambda: costs.compute_s(fc(4, width).layers, "B", b))


@pytest.mark.parametrize("width, b, field, value", [
    (2048, 16, "width", 2048),
    (128, 16, "width", 128),
    (512, 128, "microbatch_size", 128),
    (512, 2, "microbatch_size", 2),
])
def test_warning_outside_the_range_once(width, b, field, value):
    costs = ranged_costs(f"outside-{width}-{b}")
    with pytest.warns(UserWarning) as caught:
        costs.compute_s(fc(5, width).layers, "F", b)  # five layers, one warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert re.search(rf"\b{field}\b", messages[0]) and str(value) in messages[0]
    assert "outside" in messages[0] or "extrapolated" in messages[0]
    # Not again: neither for the same call nor for backward.
    no_warnings(lambda: costs.compute_s(fc(5, width).layers, "F", b))
    no_warnings(lambda: costs.compute_s(fc(5, width).layers, "B", b))


def test_warning_for_width_and_size_both_outside():
    costs = ranged_costs("outside-both")
    with pytest.warns(UserWarning) as caught:
        costs.compute_s(fc(2, 4096).layers, "F", 512)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "4096" in messages[1] and "512" in messages[0]


def test_no_ranges_no_warning():
    costs = ProfileCostModel(parse_profile(base(name="no-ranges")))
    no_warnings(lambda: costs.compute_s(fc(2, 8192).layers, "F", 4096))
