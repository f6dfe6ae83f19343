"""The all-reduce's calibration: the ring law fitted to measured times, stored in the
profile (version 3), and older profiles falling back to their point-to-point link."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest

from pipesim.calibrate import CalibrationSettings, build_profile
from pipesim.collectives import fit_allreduce, law_errors, ring_allreduce_s
from pipesim.costs import ProfileCostModel
from pipesim.profile import VERSION, Link, ProfileError, parse_profile
from pipesim.runner.records import AllreduceSample, MicrobenchResult
from pipesim.wire import from_dict, to_dict

SIZES = [4096 * 4**k for k in range(8)]


@pytest.mark.parametrize("group", [2, 3, 8])
def test_the_fit_recovers_the_law_it_was_given(group):
    link = Link(7e-6, 3.5e9)
    times = [ring_allreduce_s(n, group, link) for n in SIZES]
    fitted = fit_allreduce(SIZES, times, group)
    assert fitted.latency_s == pytest.approx(7e-6, rel=1e-6)
    assert fitted.bandwidth_Bps == pytest.approx(3.5e9, rel=1e-6)
    assert max(abs(e) for e in law_errors(SIZES, times, group, fitted)) < 1e-6


def test_the_fit_weighs_every_size_by_its_relative_error():
    """A 10% bump at one large size must not swamp the small sizes' latency."""
    link = Link(2e-5, 1e9)
    times = [ring_allreduce_s(n, 2, link) * (1.1 if n == SIZES[-1] else 1.0) for n in SIZES]
    fitted = fit_allreduce(SIZES, times, 2)
    assert fitted.latency_s == pytest.approx(2e-5, rel=0.1)


def profile_v3(**collectives) -> dict:
    return {"schema": "pipesim-profile", "version": 3, "name": "v3",
            "compute": {"fc": {"forward": {"s_per_param": 1e-9}, "backward": {"s_per_param": 2e-9}}},
            "links": {"intra_node": {"latency_s": 1e-6, "bandwidth_Bps": 1e9}},
            "collectives": collectives}


def test_a_version_3_profile_carries_the_all_reduce_link_per_class():
    profile = parse_profile(profile_v3(intra_node={"latency_s": 4e-6, "bandwidth_Bps": 2e9},
                                       reduce_s_per_byte=1e-11))
    assert profile.collectives == {"intra_node": Link(4e-6, 2e9)} and profile.reduce_s_per_byte == 1e-11
    costs = ProfileCostModel(profile)
    assert costs.allreduce_s((0, 1), 10**6) == pytest.approx(2 * 4e-6 + 10**6 / 2e9 + 0.5 * 10**6 * 1e-11)


@pytest.mark.parametrize("data, message", [
    ({**profile_v3(), "version": 2}, "collectives needs version 3"),
    (profile_v3(intra_node={"latency_s": -1.0}), "collectives.intra_node.latency_s"),
    (profile_v3(ring={"latency_s": 1.0}), "unknown"),
])
def test_bad_collectives_are_refused(data, message):
    with pytest.raises(ProfileError, match=message):
        parse_profile(data)


def test_an_older_profile_falls_back_to_the_point_to_point_link_and_says_so():
    data = profile_v3()
    del data["collectives"]
    data["version"], data["name"] = 2, "old-v2"
    costs = ProfileCostModel(parse_profile(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seconds = costs.allreduce_s((0, 1), 10**6)
    assert seconds == pytest.approx(2 * 1e-6 + 10**6 / 1e9)
    assert any("old-v2" in str(w.message) and "point-to-point" in str(w.message) for w in caught)


def test_calibration_writes_the_fitted_all_reduce_and_compares_it_with_point_to_point():
    from test_calibrate import MB_SIZES, WIDTHS, microbench_result
    from test_calibrate import SIZES as LINK_SIZES

    law = Link(9e-6, 2.5e9)
    samples = tuple(AllreduceSample((0, 1), n, (ring_allreduce_s(n, 2, law),) * 3) for n in SIZES)
    raw = replace(microbench_result(), allreduce=samples)
    raw = from_dict(MicrobenchResult, json.loads(json.dumps(to_dict(raw))))  # as it crosses from the ranks
    settings = CalibrationSettings(widths=WIDTHS, microbatch_sizes=MB_SIZES, message_sizes=tuple(LINK_SIZES))
    data = build_profile(settings, "with-allreduce", raw, [1e-5])
    profile = parse_profile(data)
    assert data["version"] == VERSION
    assert profile.collectives["intra_node"].latency_s == pytest.approx(9e-6, rel=1e-6)
    assert profile.collectives["intra_node"].bandwidth_Bps == pytest.approx(2.5e9, rel=1e-6)
    record = data["samples"]["allreduce"]
    assert record["group_size"] == 2 and len(record["sizes"]) == len(SIZES)
    assert all(abs(s["error_fit"]) < 1e-6 for s in record["sizes"])
    assert record["point_to_point"]["latency_s"] == pytest.approx(profile.intra_node.latency_s)


def with_sizes(group: int = 2, link_class: str = "intra_node", sizes=((2**20, 1e-4), (2**24, 4e-3))) -> dict:
    data = profile_v3(intra_node={"latency_s": 4e-6, "bandwidth_Bps": 2e9})
    data["samples"] = {"allreduce": {"group_size": group, "link_class": link_class,
                                     "sizes": [{"bytes": n, "median_s": t} for n, t in sizes]}}
    return data


def test_a_ring_that_calibration_timed_is_priced_by_its_measured_sizes():
    """Between two measured sizes linearly, below them the smallest's time, past them the last slope;
    the law (here 16 MiB in 8.4 ms) no longer sets it."""
    costs = ProfileCostModel(parse_profile(with_sizes()))
    mid = (2**20 + 2**24) // 2
    assert costs.allreduce_s((0, 1), mid) == pytest.approx((1e-4 + 4e-3) / 2)
    assert costs.allreduce_s((0, 1), 1000) == pytest.approx(1e-4)
    slope = (4e-3 - 1e-4) / (2**24 - 2**20)
    assert costs.allreduce_s((0, 1), 2**25) == pytest.approx(4e-3 + slope * 2**24)
    assert costs.allreduce_s((0, 1), 0) == 0.0


def test_the_law_prices_what_calibration_did_not_time():
    law = 2 * 4e-6 + 2**22 / 2e9
    # another group size
    assert ProfileCostModel(parse_profile(with_sizes(group=4))).allreduce_s((0, 1), 2**22) == pytest.approx(law)
    # another link class
    assert ProfileCostModel(parse_profile(with_sizes(link_class="inter_node"))).allreduce_s(
        (0, 1), 2**22) == pytest.approx(law)
    # a what-if on an edge's link
    from pipesim.costs import LinkOverride

    costs = ProfileCostModel(parse_profile(with_sizes()), link_overrides=(((0, 1), LinkOverride(bandwidth_Bps=1e9)),))
    assert costs.allreduce_s((0, 1), 2**22) == pytest.approx(2 * 4e-6 + 2**22 / 1e9)


@pytest.mark.parametrize("sizes", [((2**20, 1e-4),), ((2**20, 1e-4), (2**20, 2e-4)), ((2**20, -1.0), (2**24, 1e-3))])
def test_bad_measured_sizes_are_refused(sizes):
    with pytest.raises(ProfileError, match="samples.allreduce"):
        parse_profile(with_sizes(sizes=sizes))
