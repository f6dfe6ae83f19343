"""The fast engine against itself and against the engine it replaced.

- the exact fast path (longest path) equals the event simulation wherever it
  answers, and answers "not exact" (None) only when transfers on a link overlap;
- the event simulation equals the pre-issue-13 engine (tests/reference_engine.py:
  a simpy process and Resource per message, costs asked per action), span by span;
- the compact schedule's messages are the lowering pass's SEND/RECV pairs.

Over every builder, random partitions, compute, optimizer and overhead costs,
latency and bandwidth, duplex and shared links, two nodes, rank speeds.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from reference_engine import simulate as reference_simulate

from pipesim.compact import compact
from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.lowering import lower
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import Link, constant_profile
from pipesim.schedule import SCHEDULES, Kind, ScheduleError, build_schedule
from pipesim.timeline import compute_metrics

REL = 1e-9
CHUNKS = {"gpipe": (1,), "1f1b": (1,), "interleaved-1f1b": (2, 3), "zb-h1": (1,), "zb-v": (2,), "dualpipev": (2,)}


@st.composite
def steps(draw, duplex=None):
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 5))
    v = draw(st.sampled_from(CHUNKS[name]))
    m = draw(st.integers(1, 12))
    try:
        schedule = build_schedule(name, p, m, v)
    except ScheduleError:
        assume(False)
    pieces = schedule.num_pieces
    num_layers = draw(st.integers(pieces, pieces + 6))
    cuts = sorted(draw(st.sets(st.integers(1, num_layers - 1), min_size=pieces - 1, max_size=pieces - 1))
                  ) if pieces > 1 else []
    edges = [0, *cuts, num_layers]
    partition = Partition.from_counts([b - a for a, b in itertools.pairwise(edges)])
    seconds = st.floats(1e-5, 1e-2)
    latency = draw(st.sampled_from([0.0, 1e-5, 1e-3]))
    bandwidth = draw(st.sampled_from([math.inf, 1e6, 1e8, 1e10]))
    base = constant_profile(draw(seconds), draw(seconds), latency, bandwidth,
                            draw(st.sampled_from([0.0, 1e-9])), draw(st.sampled_from([0.0, 1e-4])),
                            input_s_per_sample=draw(seconds), weight_s_per_sample=draw(seconds))
    duplex = draw(st.booleans()) if duplex is None else duplex
    intra = Link(latency, bandwidth, duplex)
    inter = Link(latency * 10, bandwidth / 10, duplex)
    profile = type(base)(**{**vars(base), "intra_node": intra, "inter_node": inter})
    speeds = draw(st.lists(st.tuples(st.integers(0, p - 1), st.floats(0.25, 4.0)), max_size=2,
                           unique_by=lambda pair: pair[0]))
    costs = ProfileCostModel(profile, ranks_per_node=draw(st.sampled_from([None, 1, 2])), rank_speed=tuple(speeds))
    return schedule, partition, fc(num_layers, draw(st.integers(1, 64))), costs, draw(st.integers(1, 4))


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-15)


def _same_metrics(a, b) -> None:
    ma, mb = compute_metrics(a), compute_metrics(b)
    assert _close(ma.iteration_time_s, mb.iteration_time_s)
    assert _close(ma.bubble_fraction, mb.bubble_fraction)
    for ra, rb in zip(ma.ranks, mb.ranks, strict=True):
        assert _close(ra.busy_s, rb.busy_s)
        assert ra.peak_activation_bytes == rb.peak_activation_bytes
        # the reference engine predates the step ledger (ledger.py): its peak is static + saved
        steps = [getattr(t, "step_peak_bytes", ()) for t in (a, b)]
        expected = [t.static_bytes[ra.rank] + (s[ra.rank] if s else ra.peak_activation_bytes)
                    for t, s in zip((a, b), steps)]
        assert (ra.peak_memory_bytes, rb.peak_memory_bytes) == tuple(expected)


def _span_key(span):
    return (span.rank, span.kind, span.stage, span.microbatch, span.peer, span.direction)


def _same_spans(a, b) -> None:
    """The same spans (matched by what they are), with the same times."""
    first = {_span_key(s): s for s in a.spans}
    second = {_span_key(s): s for s in b.spans}
    assert len(first) == len(a.spans) and len(second) == len(b.spans)
    assert first.keys() == second.keys()
    for key, span in first.items():
        assert _close(span.start_s, second[key].start_s) and _close(span.end_s, second[key].end_s), key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(steps())
def test_fast_path_equals_the_event_simulation_where_it_answers(step):
    fast = simulate(*step, path="fast")
    des = simulate(*step, path="des")
    assert des.engine_path == "des"
    event("transfers overlap: event simulation" if fast is None else "fast path exact")
    if fast is None:  # not exact: then the event simulation queued some transfer behind another
        made = {(s.rank, s.stage, s.microbatch, "F" if s.kind == "F" else "B"): s.end_s
                for s in des.spans if s.kind in ("F", "B", "I")}
        assert any(s.start_s > made[(s.rank, s.stage, s.microbatch, s.direction)]
                   for s in des.spans if s.kind == "send")
        return
    assert fast.engine_path == "fast"
    _same_metrics(fast, des)
    _same_spans(fast, des)
    assert Counter((s.rank, s.activation_bytes) for s in fast.memory) == Counter(
        (s.rank, s.activation_bytes) for s in des.memory)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(steps(duplex=True))
def test_new_engine_equals_the_engine_it_replaced(step):
    """Duplex links: each link has one sender, so no tie between ranks decides a queue's order."""
    new = simulate(*step)
    old = reference_simulate(*step)
    _same_metrics(new, old)
    _same_spans(new, old)
    for rank in range(new.num_ranks):
        mine = [s for s in new.memory if s.rank == rank]
        theirs = [s for s in old.memory if s.rank == rank]
        assert [s.activation_bytes for s in mine] == [s.activation_bytes for s in theirs]
        assert all(_close(a.time_s, b.time_s) for a, b in zip(mine, theirs))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(steps(duplex=False))
def test_shared_channels_queue_like_the_engine_it_replaced(step):
    """Shared channels: both directions queue on one link; the old engine decided ties between
    messages sent at the same instant in its own event order, so compare where none is tied:
    no two transfers start at once, and no two ranks end a compute action at once (a message
    is asked for when its producer ends, so two such ends are two requests in a tie)."""
    old = reference_simulate(*step)
    sends = [s for s in old.spans if s.kind == "send"]
    starts = Counter(round(s.start_s, 12) for s in sends)
    assume(all(count == 1 for count in starts.values()))
    ends = Counter(round(s.end_s, 12) for s in old.spans if s.kind in ("F", "B", "I", "W"))
    assume(all(count == 1 for count in ends.values()))
    new = simulate(*step)
    _same_metrics(new, old)
    _same_spans(new, old)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(steps())
def test_compact_messages_are_the_lowering_passes_sends_and_receives(step):
    schedule = step[0]
    c = compact(schedule)
    receives = {(a.piece, a.direction, a.microbatch, a.peer) for actions in lower(schedule).ranks
                for a in actions if a.kind == Kind.RECV}
    cross = c.cross
    mine = {(int(c.piece[i]), Kind.F if c.kind[i] == 0 else Kind.B, int(c.microbatch[i]),
             int(c.rank[c.producer[i]])) for i in range(c.num_nodes) if cross[i]}
    assert mine == receives


def test_a_slow_shared_link_falls_back_to_the_event_simulation():
    base = constant_profile(1e-4, 2e-4)
    link = Link(latency_s=0.0, bandwidth_Bps=2e6, duplex=False)
    profile = type(base)(**{**vars(base), "intra_node": link, "inter_node": link})
    step = (build_schedule("1f1b", 2, 8), Partition.from_counts([7, 1]), fc(8, 256), ProfileCostModel(profile), 16)
    assert simulate(*step, path="fast") is None
    assert simulate(*step).engine_path == "des"
    _same_metrics(simulate(*step), reference_simulate(*step))


def test_fixed_costs_with_free_links_take_the_fast_path():
    step = (build_schedule("1f1b", 4, 16), Partition.from_counts([2] * 4), fc(8, 16),
            ProfileCostModel(constant_profile(1e-3, 2e-3)), 4)
    assert simulate(*step).engine_path == "fast"


def test_a_cost_model_with_run_time_inputs_runs_the_event_simulation_and_is_asked_per_action():
    asked = []

    class Crowded(ProfileCostModel):
        runtime_inputs = frozenset({"ranks computing at once"})

        def compute_s(self, layers, kind, microbatch_size, rank=None):
            asked.append(kind)
            return super().compute_s(layers, kind, microbatch_size, rank)

    step = (build_schedule("gpipe", 3, 4), Partition.from_counts([1, 1, 1]), fc(3, 8),
            Crowded(constant_profile(1e-3, 2e-3)), 2)
    timeline = simulate(*step)
    assert timeline.engine_path == "des"
    assert len(asked) >= 3 * 4 * 2  # every action asked at least once during the run
    _same_metrics(timeline, reference_simulate(*step))


def test_predict_json_says_which_path_answered(capsys):
    import json

    from pipesim.cli import main

    assert main(["predict", "--layers", "8", "--stages", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine_path"] == "fast"
    assert main(["predict", "--layers", "8", "--stages", "4", "--link", "1-2:1e3Bps", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["engine_path"] == "des"
