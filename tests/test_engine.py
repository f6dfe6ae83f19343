"""The simpy engine against closed forms, golden timelines and properties."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate, stage_shapes
from pipesim.ledger import step_peak_bytes
from pipesim.model import ModelSpec, fc, fc_layer
from pipesim.partition import Partition
from pipesim.profile import constant_profile
from pipesim.schedule import Schedule, build_schedule
from pipesim.timeline import compute_metrics, peak_activation_bytes

REL = 1e-9


def run(schedule_name, p, m, *, model=None, counts=None, mbs=4, f=1e-3, b=2e-3,
        latency=0.0, bandwidth=math.inf, optimizer_s_per_param=0.0, overhead=0.0):
    model = model or fc(12, 16)
    part = Partition.from_counts(counts) if counts else Partition.from_counts([model.num_layers // p] * p)
    schedule = build_schedule(schedule_name, p, m)
    costs = ProfileCostModel(constant_profile(f, b, latency, bandwidth, optimizer_s_per_param,
                                              overhead))
    return simulate(schedule, part, model, costs, mbs), schedule, part, model


def fb_spans(timeline):
    return [s for s in timeline.spans if s.kind in ("F", "B")]


# --- closed-form oracles ------------------------------------------------------

CLOSED = [(sched, p, m) for sched in ("gpipe", "1f1b") for p in (1, 2, 3, 4, 6) for m in (1, 2, 5, 8)]


@pytest.mark.parametrize("sched, p, m", CLOSED)
def test_balanced_iteration_time_and_bubble(sched, p, m):
    mbs, fs, bs = 4, 1e-3, 2.5e-3
    timeline, _, _, _ = run(sched, p, m, mbs=mbs, f=fs, b=bs)
    per_stage = 12 // p
    f, b = per_stage * mbs * fs, per_stage * mbs * bs
    metrics = compute_metrics(timeline)
    assert metrics.iteration_time_s == pytest.approx((m + p - 1) * (f + b), rel=REL)
    assert metrics.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), rel=REL, abs=1e-12)
    for rank in metrics.ranks:
        assert rank.busy_s == pytest.approx(m * (f + b), rel=REL)


@pytest.mark.parametrize("sched, p, m", CLOSED)
def test_peak_microbatches_held(sched, p, m):
    mbs = 3
    timeline, _, part, model = run(sched, p, m, mbs=mbs)
    peaks = peak_activation_bytes(timeline)
    for rank, (first, last) in enumerate(part.bounds):
        per_microbatch = model.stage_saved_bytes(first, last) * mbs
        assert peaks[rank] % per_microbatch == 0
        held = peaks[rank] // per_microbatch
        assert held == (min(p - rank, m) if sched == "1f1b" else m)


def test_static_bytes_and_peak_memory():
    timeline, _, part, model = run("1f1b", 2, 4, mbs=2)
    stage_params = [sum(layer.params for layer in model.layers[a : b + 1]) for a, b in part.bounds]
    assert timeline.static_bytes == tuple(p * 4 * 3 for p in stage_params)  # sgd: param+grad+momentum
    metrics = compute_metrics(timeline)
    step = step_peak_bytes(build_schedule("1f1b", 2, 4), stage_shapes(model, part), 2, 8)
    for rank in metrics.ranks:  # the step ledger holds the saved activations and the buffers besides
        assert rank.peak_memory_bytes == timeline.static_bytes[rank.rank] + step[rank.rank]
        assert rank.peak_memory_bytes > timeline.static_bytes[rank.rank] + rank.peak_activation_bytes


def test_two_stages_one_microbatch_latency_and_bandwidth_add():
    # uneven widths so the boundary tensor (16 floats) differs from the model's input (8)
    model = ModelSpec("chain", (fc_layer(8, 16), fc_layer(16, 32), fc_layer(32, 4)))
    mbs, fs, bs, lat, bw = 2, 1e-3, 3e-3, 1e-4, 1e6
    timeline, _, _, _ = run("1f1b", 2, 1, model=model, counts=[1, 2], mbs=mbs, f=fs, b=bs,
                            latency=lat, bandwidth=bw)
    transfer = lat + 16 * 4 * mbs / bw
    f0, f1 = 1 * mbs * fs, 2 * mbs * fs
    b0, b1 = 1 * mbs * bs, 2 * mbs * bs
    expected = f0 + transfer + f1 + b1 + transfer + b0
    assert compute_metrics(timeline).iteration_time_s == pytest.approx(expected, rel=REL)
    sends = [s for s in timeline.spans if s.kind == "send"]
    assert [(s.rank, s.peer, s.direction) for s in sends] == [(0, 1, "F"), (1, 0, "B")]
    assert all(s.duration_s == pytest.approx(transfer, rel=REL) for s in sends)


def test_gpipe_slow_link_serialises_transfers():
    p, m, mbs, fs = 2, 4, 1, 1e-3
    transfer = 1e-2  # much slower than a forward
    nbytes = 16 * 4 * mbs
    timeline, _, _, _ = run("gpipe", p, m, counts=[6, 6], mbs=mbs, f=fs, b=fs,
                            bandwidth=nbytes / transfer)
    by_link = defaultdict(list)
    for s in timeline.spans:
        if s.kind == "send":
            by_link[(s.rank, s.peer)].append(s)
    assert set(by_link) == {(0, 1), (1, 0)}
    for link, sends in by_link.items():
        assert len(sends) == m
        sends.sort(key=lambda s: s.start_s)
        for a, b in zip(sends, sends[1:]):
            assert b.start_s >= a.end_s - 1e-15, f"overlap on {link}: {a} and {b}"
        assert all(s.duration_s == pytest.approx(transfer, rel=REL) for s in sends)
    # activations queue behind each other: the last one arrives at f + m * transfer
    f = 6 * mbs * fs
    forward_sends = sorted(by_link[(0, 1)], key=lambda s: s.end_s)
    assert forward_sends[-1].end_s == pytest.approx(f + m * transfer, rel=REL)


def test_optimizer_and_overhead_on_one_rank():
    model = fc(3, 5)
    timeline, _, _, _ = run("gpipe", 1, 2, model=model, counts=[3], mbs=2, f=1e-3, b=2e-3,
                            optimizer_s_per_param=1e-6, overhead=1e-4)
    per_action_f = 3 * 2 * 1e-3 + 1e-4
    per_action_b = 3 * 2 * 2e-3 + 1e-4
    expected = 2 * (per_action_f + per_action_b) + model.params * 1e-6
    assert compute_metrics(timeline).iteration_time_s == pytest.approx(expected, rel=REL)
    opt = [s for s in timeline.spans if s.kind == "optimizer"]
    assert len(opt) == 1 and opt[0].duration_s == pytest.approx(model.params * 1e-6, rel=REL)


# --- golden timelines ---------------------------------------------------------


def golden(sched):
    timeline, _, _, _ = run(sched, 2, 2, model=fc(2, 4), counts=[1, 1], mbs=1, f=1.0, b=2.0)
    return timeline


def test_golden_1f1b_p2_m2():
    timeline = golden("1f1b")
    assert [(s.rank, s.name, s.start_s, s.end_s) for s in fb_spans(timeline)] == [
        (0, "0F0", 0.0, 1.0),
        (0, "0F1", 1.0, 2.0),
        (1, "1F0", 1.0, 2.0),
        (1, "1B0", 2.0, 4.0),
        (0, "0B0", 4.0, 6.0),
        (1, "1F1", 4.0, 5.0),
        (1, "1B1", 5.0, 7.0),
        (0, "0B1", 7.0, 9.0),
    ]
    waits = [(s.rank, s.name, s.start_s, s.end_s) for s in timeline.spans if s.kind == "wait"]
    assert waits == [
        (1, "wait 0->1 F0", 0.0, 1.0),
        (0, "wait 1->0 B0", 2.0, 4.0),
        (0, "wait 1->0 B1", 6.0, 7.0),
    ]
    assert compute_metrics(timeline).iteration_time_s == 9.0


def test_golden_gpipe_p2_m2():
    timeline = golden("gpipe")
    assert [(s.rank, s.name, s.start_s, s.end_s) for s in fb_spans(timeline)] == [
        (0, "0F0", 0.0, 1.0),
        (0, "0F1", 1.0, 2.0),
        (1, "1F0", 1.0, 2.0),
        (1, "1F1", 2.0, 3.0),
        (1, "1B0", 3.0, 5.0),
        (0, "0B0", 5.0, 7.0),
        (1, "1B1", 5.0, 7.0),
        (0, "0B1", 7.0, 9.0),
    ]
    assert [(s.rank, s.time_s, s.activation_bytes) for s in timeline.memory if s.rank == 0] == [
        (0, 0.0, 0), (0, 0.0, 8 * 4), (0, 1.0, 16 * 4), (0, 7.0, 8 * 4), (0, 9.0, 0)]


# --- errors -------------------------------------------------------------------


def test_stage_count_mismatch_is_an_error():
    costs = ProfileCostModel(constant_profile(1.0, 1.0))
    with pytest.raises(ValueError, match="partition has 2 pieces, schedule 3"):
        simulate(build_schedule("1f1b", 3, 2), Partition.from_counts([6, 6]), fc(12, 4), costs, 1)


def test_deadlocking_schedule_is_reported():
    schedule = Schedule.from_text("rank 0: 0F0 0B0 0F1 0B1\nrank 1: 1F1 1F0 1B0 1B1")
    costs = ProfileCostModel(constant_profile(1.0, 1.0))
    with pytest.raises(RuntimeError, match=r"ranks \[0, 1\] blocked"):
        simulate(schedule, Partition.from_counts([1, 1]), fc(2, 4), costs, 1)


# --- properties ---------------------------------------------------------------


@st.composite
def configs(draw):
    p = draw(st.integers(1, 6))
    m = draw(st.integers(1, 8))
    num_layers = draw(st.integers(p, p + 6))
    cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), min_size=p - 1, max_size=p - 1))
                  ) if p > 1 else []
    edges = [0, *cuts, num_layers]
    counts = [b - a for a, b in zip(edges, edges[1:])]
    return dict(
        schedule_name=draw(st.sampled_from(["gpipe", "1f1b"])),
        p=p,
        m=m,
        model=fc(num_layers, draw(st.integers(1, 64))),
        counts=counts,
        mbs=draw(st.integers(1, 4)),
        f=draw(st.floats(1e-5, 1e-2)),
        b=draw(st.floats(1e-5, 1e-2)),
        latency=draw(st.floats(0.0, 1e-3)),
        bandwidth=draw(st.one_of(st.just(math.inf), st.floats(1e4, 1e10))),
    )


@settings(max_examples=120, deadline=None)
@given(configs())
def test_simulation_properties(cfg):
    p, m = cfg["p"], cfg["m"]
    timeline, schedule, part, model = run(**cfg)  # terminates, or raises
    assert part.counts == tuple(cfg["counts"])
    metrics = compute_metrics(timeline)
    spans = fb_spans(timeline)

    # each micro-batch's F and B once per stage, on that stage's rank
    assert Counter((s.rank, s.stage, s.kind, s.microbatch) for s in spans) == Counter(
        {(st_, st_, k, mb): 1 for st_ in range(p) for k in "FB" for mb in range(m)})
    # ranks run their actions in the schedule's order, one at a time
    for rank in range(p):
        mine = sorted((s for s in spans if s.rank == rank), key=lambda s: s.start_s)
        assert [s.name for s in mine] == [str(a) for a in schedule.ranks[rank]]
        for a, b in zip(mine, mine[1:]):
            assert b.start_s >= a.end_s - 1e-12

    # causality: F after the upstream F and its transfer; B after its own F and the downstream B
    by_action = {(s.stage, s.kind, s.microbatch): s for s in spans}
    sends = {(s.stage, s.direction, s.microbatch): s for s in timeline.spans if s.kind == "send"}
    assert len(sends) == 2 * m * (p - 1)
    for (stage, kind, mb), span in by_action.items():
        if kind == "F" and stage > 0:
            send = sends[(stage - 1, "F", mb)]
            assert by_action[(stage - 1, "F", mb)].end_s <= send.start_s + 1e-12
            assert send.end_s <= span.start_s + 1e-12
        if kind == "B":
            assert by_action[(stage, "F", mb)].end_s <= span.start_s + 1e-12
            if stage < p - 1:
                send = sends[(stage + 1, "B", mb)]
                assert by_action[(stage + 1, "B", mb)].end_s <= send.start_s + 1e-12
                assert send.end_s <= span.start_s + 1e-12

    # bounds on the makespan
    busiest = max(r.busy_s for r in metrics.ranks)
    assert metrics.iteration_time_s >= busiest * (1 - REL)
    serial = sum(s.duration_s for s in timeline.spans if s.kind in ("F", "B", "optimizer", "send"))
    assert metrics.iteration_time_s <= serial * (1 + REL)

    # memory: never negative, back to zero, peak bounded by holding every micro-batch
    assert all(sample.activation_bytes >= 0 for sample in timeline.memory)
    for rank, (first, last) in enumerate(part.bounds):
        samples = [s for s in timeline.memory if s.rank == rank]
        assert samples[-1].activation_bytes == 0
        assert max(s.time_s for s in samples) == samples[-1].time_s
        per_microbatch = model.stage_saved_bytes(first, last) * cfg["mbs"]
        peak = max(s.activation_bytes for s in samples)
        limit = m if cfg["schedule_name"] == "gpipe" else min(p - rank, m)
        assert peak == limit * per_microbatch


def _shared_or_duplex_step(duplex: bool):
    from pipesim.profile import Link
    from pipesim.schedule import build_schedule

    base = constant_profile(1e-4, 2e-4)
    link = Link(latency_s=0.0, bandwidth_Bps=2e6, duplex=duplex)
    profile = type(base)(**{**vars(base), "intra_node": link, "inter_node": link})
    # a slow last stage's gradients go back while the first stage still streams activations
    return simulate(build_schedule("1f1b", 2, 8), Partition.from_counts([7, 1]), fc(8, 256),
                    ProfileCostModel(profile), 16)


def _crossing(timeline) -> bool:
    forward = [s for s in timeline.spans if s.kind == "send" and s.rank == 0]
    backward = [s for s in timeline.spans if s.kind == "send" and s.rank == 1]
    return any(f.start_s < b.end_s - 1e-12 and b.start_s < f.end_s - 1e-12 for f in forward for b in backward)


def test_a_shared_channel_serialises_both_directions():
    """On a duplex link activations and gradients cross at the same time; on a
    shared channel (duplex false) they take turns, and the step gets longer."""
    duplex, shared = _shared_or_duplex_step(True), _shared_or_duplex_step(False)
    assert _crossing(duplex) and not _crossing(shared)
    assert compute_metrics(shared).iteration_time_s > compute_metrics(duplex).iteration_time_s
