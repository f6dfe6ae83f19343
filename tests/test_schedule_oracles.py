"""The modern schedules in the simulator against closed forms (constant costs, free links).

F, I, W and Bf = I + W are the times of one rank's whole share of the model for
one micro-batch (with v chunks per rank one chunk costs F/v). "In flight" on a
rank: (piece, micro-batch) pairs whose activations are held, from F until B, or
until W when the backward is split.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import constant_profile
from pipesim.schedule import SCHEDULES, build_schedule
from pipesim.timeline import compute_metrics

REL = 1e-9
MBS = 2  # samples per micro-batch
LAYERS_PER_PIECE = 2


def simulate_even(name, p, m, v=None, f=1e-3, i=1e-3, w=1e-3, b=None):
    """Every piece LAYERS_PER_PIECE layers; per layer and sample: f forward, i input grad, w weight grad,
    b (default i + w) full backward."""
    schedule = build_schedule(name, p, m, v)
    pieces = schedule.num_pieces
    model = fc(pieces * LAYERS_PER_PIECE, 8)
    costs = ProfileCostModel(constant_profile(f, i + w if b is None else b, input_s_per_sample=i,
                                              weight_s_per_sample=w))
    timeline = simulate(schedule, Partition.from_counts([LAYERS_PER_PIECE] * pieces), model, costs, MBS)
    share = LAYERS_PER_PIECE * schedule.num_chunks * MBS  # one rank's layers x samples
    return schedule, timeline, compute_metrics(timeline), share


def in_flight_peaks(timeline, num_ranks: int) -> list[int]:
    """From the simulated spans: +1 at each F's start, -1 at each B's or W's end."""
    peaks = []
    for rank in range(num_ranks):
        events = []
        for s in timeline.rank_spans(rank, ("F", "B", "W")):
            events.append((s.start_s, 1) if s.kind == "F" else (s.end_s, -1))
        held = peak = 0
        for _, change in sorted(events, key=lambda e: (e[0], e[1])):
            held += change
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


costs_st = st.floats(1e-4, 1e-2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(2, 4), st.integers(1, 4), costs_st, costs_st, costs_st)
def test_interleaved_1f1b_makespan_and_in_flight(p, v, rounds, f, i, w):
    """Narayanan et al. SC21 §2.2.2: m(F+Bf) + (p-1)(F+Bf)/v when m is a multiple of p."""
    m = p * rounds
    _schedule, timeline, metrics, share = simulate_even("interleaved-1f1b", p, m, v, f, i, w)
    F, Bf = share * f, share * (i + w)
    assert metrics.iteration_time_s == pytest.approx(m * (F + Bf) + (p - 1) * (F + Bf) / v, rel=REL)
    for r, peak in enumerate(in_flight_peaks(timeline, p)):
        assert peak == min((v - 1) * p + 2 * (p - 1 - r) + 1, m * v)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 8), costs_st, costs_st, costs_st)
def test_zb_h1_makespan_and_in_flight(p, extra, f, i, w):
    """Qi et al. ICLR 2024 §2.1: m(F+I+W) + (p-1)(F+I-W) when m >= p (and W <= F, I)."""
    w = min(w, f, i)
    m = p + extra
    if m % max(1, m // p):
        m = p * max(1, m // p)
    _schedule, timeline, metrics, share = simulate_even("zb-h1", p, m, 1, f, i, w)
    F, I, W = share * f, share * i, share * w
    assert metrics.iteration_time_s == pytest.approx(m * (F + I + W) + (p - 1) * (F + I - W), rel=REL)
    assert max(in_flight_peaks(timeline, p)) <= p
    for rank in metrics.ranks:  # W is compute: it counts as busy, not as bubble
        assert rank.busy_s == pytest.approx(m * (F + I + W), rel=REL)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(0, 8), costs_st)
def test_zb_v_makespan(p, extra, c):
    """Qi et al. arXiv 2401.10241 §6: m(F+I+W) + (p-1)F/2 with F = I = W and m >= 2p-1."""
    m = 2 * p - 1 + extra
    _, _, metrics, share = simulate_even("zb-v", p, m, 2, c, c, c)
    F = share * c
    assert metrics.iteration_time_s == pytest.approx(m * 3 * F + (p - 1) * F / 2, rel=REL)
    assert metrics.bubble_fraction == pytest.approx((p - 1) * F / 2 / (m * 3 * F + (p - 1) * F / 2), rel=1e-6,
                                                    abs=1e-12)


@pytest.mark.parametrize("p, m", [(1, 1), (2, 3), (4, 8), (5, 3)])
def test_1f1b_in_flight(p, m):
    _, timeline, _, _ = simulate_even("1f1b", p, m)
    assert in_flight_peaks(timeline, p) == [min(p - r, m) for r in range(p)]


@st.composite
def any_build(draw):
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 5))
    v = {"interleaved-1f1b": draw(st.integers(2, 3)), "zb-h1": draw(st.integers(1, 2))}.get(name)
    m = draw(st.integers(2 * p if name == "dualpipev" else 1, 12))
    if name in ("interleaved-1f1b", "zb-h1") and m % max(1, m // p):
        m = p * max(1, m // p)
    return name, p, m, v


@settings(max_examples=150, deadline=None)
@given(any_build(), costs_st, costs_st, costs_st)
def test_every_builder_simulates_each_action_once_and_no_faster_than_its_busiest_rank(build, f, i, w):
    name, p, m, v = build
    schedule, timeline, metrics, _share = simulate_even(name, p, m, v, f, i, w)
    ran = sorted(s.name for s in timeline.spans if s.kind in ("F", "B", "I", "W"))
    assert ran == sorted(str(a) for actions in schedule.ranks for a in actions)
    busiest = max(r.busy_s for r in metrics.ranks)
    assert metrics.iteration_time_s >= busiest * (1 - REL)
    assert all(sample.activation_bytes >= 0 for sample in timeline.memory)
    ends = {}
    for sample in timeline.memory:
        ends[sample.rank] = sample.activation_bytes
    assert set(ends.values()) == {0}  # every activation freed by the end of the step


# --- the I/W memory ledger, profiles and traces ------------------------------------


def test_ledger_swaps_saved_activations_for_what_w_needs_at_i():
    """One piece of 2 fc layers (8 wide): F holds input + both outputs; I keeps each
    layer's input and output gradient (W's needs), freeing the last output; W frees the rest."""
    _, timeline, _, _ = simulate_even("zb-h1", 1, 1)
    model = fc(2, 8)
    saved, weight = model.stage_saved_bytes(0, 1) * MBS, model.stage_weight_bytes(0, 1) * MBS
    assert saved == 3 * 8 * 4 * MBS and weight == 4 * 8 * 4 * MBS
    assert [s.activation_bytes for s in timeline.memory] == [0, saved, weight, 0]


def version_1_profile(tmp_path):
    import json

    path = tmp_path / "v1.json"
    path.write_text(json.dumps({"schema": "pipesim-profile", "version": 1, "name": "old",
                                "compute": {"*": {"forward": {"s_per_sample": 1e-4},
                                                  "backward": {"s_per_sample": 2e-4}}},
                                "links": {"intra_node": {}}}))
    return path


@pytest.mark.parametrize("name", ["zb-h1", "zb-v", "dualpipev"])
def test_version_1_profile_loads_and_refuses_zero_bubble_in_one_line(capsys, tmp_path, name):
    from pipesim.cli import main

    path = version_1_profile(tmp_path)
    base = ["predict", "--layers", "8", "--stages", "2", "--microbatches", "4", "--batch-size", "8",
            "--profile", str(path)]
    assert main([*base, "--schedule", "1f1b"]) == 0
    capsys.readouterr()
    assert main([*base, "--schedule", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no input/weight-gradient (I/W) costs" in err and "pipesim calibrate" in err


def test_version_2_profile_reads_input_and_weight_laws():
    from pipesim.profile import parse_profile

    law = {"s_per_sample": 1e-4}
    profile = parse_profile({"schema": "pipesim-profile", "version": 2, "name": "new", "links": {"intra_node": {}},
                             "compute": {"fc": {"forward": law, "backward": {"s_per_sample": 3e-4},
                                                "input": {"s_per_sample": 2e-4}, "weight": law}}})
    costs = ProfileCostModel(profile)
    layer = fc(1, 8).layers[0]
    from pipesim.schedule import Kind

    assert [costs.layer_s(layer, k, 10) for k in (Kind.F, Kind.B, Kind.I, Kind.W)] == pytest.approx(
        [1e-3, 3e-3, 2e-3, 1e-3])


def test_w_spans_reach_the_trace():
    from pipesim.timeline import to_chrome_trace

    _, timeline, _, _ = simulate_even("zb-v", 2, 4)
    events = [e for e in to_chrome_trace(timeline)["traceEvents"] if e.get("cat") == "W"]
    assert len(events) == 2 * 2 * 4 and {e["name"] for e in events} >= {"0W0", "3W3"}


def test_gantt_draws_i_and_w(tmp_path):
    from pipesim.report import gantt_png

    _, timeline, _, _ = simulate_even("zb-h1", 2, 4)
    gantt_png(timeline, str(tmp_path / "g.png"), title="zb-h1")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
