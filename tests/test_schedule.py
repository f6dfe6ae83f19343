"""Schedules as data: actions, builders, validation, lowering, text form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.builders import DEFAULT_CHUNKS
from pipesim.lowering import LoweredSchedule, lower, message_tag, unit_steps
from pipesim.schedule import (
    SCHEDULES,
    Action,
    Kind,
    Schedule,
    ScheduleError,
    build_schedule,
    from_rows,
    validate,
)

F, B, I, W = Kind.F, Kind.B, Kind.I, Kind.W
PS = range(1, 9)
MS = range(1, 13)


def acts(text: str) -> tuple[Action, ...]:
    return tuple(Action.parse(t) for t in text.split())


# --- actions ------------------------------------------------------------------


def test_action_parse_and_str():
    assert Action.parse("1F0") == Action(1, F, 0)
    assert Action.parse(" 12B34 ") == Action(12, B, 34)
    assert Action.parse("2I3") == Action(2, I, 3) and str(Action(2, I, 3)) == "2I3"
    assert Action.parse("1W0") == Action(1, W, 0) and str(Action(1, W, 0)) == "1W0"
    assert Action.parse("1SEND_F0") == Action(1, Kind.SEND, 0, F)
    assert str(Action(2, Kind.RECV, 5, B, peer=3, tag=9)) == "2RECV_B5"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([F, B, I, W]), st.integers(0, 1000))
def test_action_text_round_trip(piece, kind, mb):
    action = Action(piece, kind, mb)
    assert Action.parse(str(action)) == action


@pytest.mark.parametrize("text", ["", "F0", "1F", "1X0", "1f0", "-1F0", "1F-1", "1F0x", "1 F 0", "1F0 2B1", "a",
                                  "1SEND0", "1SEND_I0", "1OVERLAP_F_B"])
def test_action_parse_errors(text):
    with pytest.raises(ScheduleError, match="bad action"):
        Action.parse(text)


# --- builders -----------------------------------------------------------------


def test_gpipe_and_1f1b_validate_in_two_m_plus_p_minus_one_unit_steps():
    for name in ("gpipe", "1f1b"):
        for p in PS:
            for m in MS:
                schedule = build_schedule(name, p, m)
                assert (schedule.num_stages, schedule.num_chunks, schedule.num_microbatches) == (p, 1, m)
                assert len(unit_steps(lower(schedule))[0]) == 2 * (m + p - 1)


def test_gpipe_shape():
    for p in PS:
        for m in MS:
            for rank, actions in enumerate(build_schedule("gpipe", p, m).ranks):
                assert list(actions) == [Action(rank, F, i) for i in range(m)] + [
                    Action(rank, B, i) for i in range(m)]


def test_one_f_one_b_shape():
    """Warm-up of min(p-r-1, m) forwards, then strict F/B alternation, then the cool-down."""
    for p in PS:
        for m in MS:
            for rank, actions in enumerate(build_schedule("1f1b", p, m).ranks):
                warmup = min(p - rank - 1, m)
                kinds = "".join(a.kind for a in actions)
                assert kinds == "F" * warmup + "FB" * (m - warmup) + "B" * warmup
                assert [a.microbatch for a in actions if a.kind == F] == list(range(m))
                assert [a.microbatch for a in actions if a.kind == B] == list(range(m))
                assert {a.piece for a in actions} == {rank}


def test_one_f_one_b_tiny_text():
    assert build_schedule("1f1b", 3, 4).to_text().splitlines()[1:] == [
        "rank 0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3",
        "rank 1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3",
        "rank 2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3",
    ]


def test_zb_v_places_pieces_in_a_v():
    schedule = build_schedule("zb-v", 4, 8)
    assert schedule.placement == "v" and schedule.num_pieces == 8
    assert [schedule.pieces_of(r) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    interleaved = build_schedule("interleaved-1f1b", 4, 8)
    assert [interleaved.pieces_of(r) for r in range(4)] == [(0, 4), (1, 5), (2, 6), (3, 7)]


@pytest.mark.parametrize("args, expected", [
    (("zigzag", 2, 2), "unknown schedule 'zigzag'"),
    (("gpipe", 0, 2), "at least one stage"),
    (("1f1b", 2, 0), "at least one stage, chunk and micro-batch"),
    (("1f1b", 2, 4, 2), "one chunk per rank"),
    (("interleaved-1f1b", 2, 4, 1), "needs --chunks >= 2"),
    (("interleaved-1f1b", 4, 9, 2), "multiple of max"),
    (("zb-h1", 4, 9), "multiple of max"),
    (("zb-v", 2, 4, 3), "exactly --chunks 2"),
    (("dualpipev", 2, 4, 1), "exactly --chunks 2"),
    (("dualpipev", 4, 7), r"--microbatches >= 2 x --stages = 8"),
])
def test_build_schedule_errors(args, expected):
    with pytest.raises(ScheduleError, match=expected):
        build_schedule(*args)


@st.composite
def any_schedule(draw):
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 6))
    v = {"interleaved-1f1b": draw(st.integers(2, 4)), "zb-h1": draw(st.integers(1, 3))}.get(name,
                                                                                              DEFAULT_CHUNKS[name])
    m = draw(st.integers(2 * p if name == "dualpipev" else 1, 16))
    try:
        return build_schedule(name, p, m, v)
    except ScheduleError as exc:  # only torch's rule on m for the 1F1B family
        assert "multiple of max" in str(exc)
        return build_schedule(name, p, p * max(1, m // p), v)


@settings(max_examples=300, deadline=None)
@given(any_schedule())
def test_every_builder_validates_and_computes_each_piece_once_per_kind(schedule):
    validate(schedule)
    done = [(a.piece, a.kind, a.microbatch) for acts_ in schedule.ranks for a in acts_]
    assert len(done) == len(set(done))
    for piece in range(schedule.num_pieces):
        for mb in range(schedule.num_microbatches):
            kinds = sorted(k for s, k, i in done if (s, i) == (piece, mb))
            assert kinds in (["B", "F"], ["F", "I", "W"])
    grid = unit_steps(lower(schedule))  # terminates
    assert sum(1 for row in grid for a in row if a) == len(done)


# --- validation ---------------------------------------------------------------


def custom(*rows: str, name="custom") -> Schedule:
    return from_rows([acts(row) for row in rows], name, {"placement": "loop"})


def test_validator_accepts_hand_written_schedules():
    validate(custom("0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"))
    validate(custom("0F0 0F1 0I0 0W0 0I1 0W1", "1F0 1I0 1F1 1I1 1W0 1W1"))
    validate(custom("0F0 0F1 0B0 0I1 0W1", "1F0 1I0 1F1 1B1 1W0"))  # B and I/W mixed, as DualPipeV does


@pytest.mark.parametrize("rows, expected", [
    (("0F0 0F1 0B0 0B1", "1F0 1B0 1F1"), "piece 1, micro-batch 1 as F and B.*runs \\['F'\\]"),
    (("0F0 0F1 0B0 0B1 0B1", "1F0 1B0 1F1 1B1"), "piece 0, micro-batch 1.*\\['B', 'B', 'F'\\]"),
    (("0F0 0B0 1F0", "1B0"), "rank 0 runs actions not of its pieces \\[0\\]"),
    (("0F0 0I0 0B0", "1F0 1B0"), "piece 0, micro-batch 0.*\\['B', 'F', 'I'\\]"),
    (("0F0 0I0", "1F0 1B0"), "piece 0, micro-batch 0.*\\['F', 'I'\\]"),
])
def test_validator_catches_wrong_counts(rows, expected):
    with pytest.raises(ScheduleError, match=expected):
        validate(custom(*rows))


def test_validator_catches_wrong_rank_count():
    schedule = Schedule("short", 3, 1, 1, "loop", (acts("0F0 0B0"), acts("1F0 1B0")))
    with pytest.raises(ScheduleError, match="2 ranks for --stages 3"):
        validate(schedule)


def test_validator_catches_deadlock_with_marked_grid():
    # rank 0 waits for 1B0 before it sends F1; rank 1 waits for F1 before it does F0/B0.
    schedule = custom("0F0 0B0 0F1 0B1", "1F1 1F0 1B0 1B1", name="tangled")
    with pytest.raises(ScheduleError) as info:
        validate(schedule)
    lines = str(info.value).splitlines()
    assert "'tangled' deadlocks" in lines[0]
    grid = lines[1:]
    assert len(grid) == 2
    assert "0F0" in grid[0] and "*0B0" in grid[0]  # ran one step, then stuck
    assert "*1F1" in grid[1]


@pytest.mark.parametrize("rows", [("0B0 0F0", "1F0 1B0"), ("0F0 0W0 0I0", "1F0 1B0"),
                                  ("0F0 0F1 0B0 0B1", "1F0 1W0 1I0 1F1 1B1")])
def test_validator_catches_local_order_deadlocks(rows):
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(custom(*rows))


def test_local_hand_off_order_is_checked_on_one_rank():
    """P = 1, two chunks: piece 1's forward needs piece 0's, on the same rank."""
    validate(from_rows([acts("0F0 1F0 1B0 0B0")], "x", {"stages": 1}))
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(from_rows([acts("1F0 0F0 1B0 0B0")], "x", {"stages": 1}))


# --- lowering -----------------------------------------------------------------


def test_lowering_adds_explicit_messages():
    lowered = lower(build_schedule("1f1b", 2, 2))
    assert [str(a) for a in lowered.ranks[0]] == ["0F0", "0SEND_F0", "0F1", "0SEND_F1", "0RECV_B0", "0B0",
                                                   "0RECV_B1", "0B1"]
    assert [str(a) for a in lowered.ranks[1]] == ["1RECV_F0", "1F0", "1B0", "1SEND_B0", "1RECV_F1", "1F1",
                                                   "1B1", "1SEND_B1"]
    send = lowered.ranks[0][1]
    assert (send.peer, send.tag) == (1, lowered.ranks[1][0].tag)


def test_v_placement_hand_off_is_local():
    """Pieces P-1 and P sit on rank P-1: no message between them."""
    lowered = lower(build_schedule("zb-v", 2, 4))
    messages = [a for row in lowered.ranks for a in row if a.kind in (Kind.SEND, Kind.RECV)]
    assert not [a for a in messages if {a.piece, lowered.key(a).piece} == {1, 2}]
    assert {(a.piece, a.kind, a.direction) for a in lowered.ranks[1] if a.kind == Kind.SEND} == {
        (2, Kind.SEND, F), (1, Kind.SEND, B)}


@pytest.mark.parametrize("name, p, m", [("1f1b", 4, 8), ("interleaved-1f1b", 3, 6), ("zb-v", 4, 8),
                                        ("dualpipev", 3, 6), ("zb-h1", 4, 4)])
def test_every_message_pairs_and_tags_are_unique(name, p, m):
    lowered = lower(build_schedule(name, p, m))
    sends = {(r, a.peer, a.tag) for r, row in enumerate(lowered.ranks) for a in row if a.kind == Kind.SEND}
    recvs = {(a.peer, r, a.tag) for r, row in enumerate(lowered.ranks) for a in row if a.kind == Kind.RECV}
    assert sends == recvs and sends
    tags = [a.tag for row in lowered.ranks for a in row if a.kind == Kind.SEND]
    assert len(tags) == len(set(tags))
    assert max(tags) < 2 * m * p * lowered.schedule.num_chunks


def test_message_tag_is_unique_per_piece_microbatch_direction():
    from pipesim.schedule import MessageKey

    keys = [MessageKey(s, d, i) for s in range(6) for d in (F, B) for i in range(7)]
    assert len({message_tag(k, 6) for k in keys}) == len(keys)


# --- text form ----------------------------------------------------------------


@pytest.mark.parametrize("name, p, m", [("gpipe", 1, 1), ("1f1b", 2, 3), ("interleaved-1f1b", 4, 8),
                                        ("zb-h1", 5, 2), ("zb-v", 3, 7), ("dualpipev", 2, 5)])
def test_schedule_and_lowered_text_round_trip(name, p, m):
    schedule = build_schedule(name, p, m)
    again = Schedule.from_text(schedule.to_text())
    assert again == schedule
    lowered = lower(schedule)
    assert LoweredSchedule.from_text(lowered.to_text()) == lowered


def test_from_text_without_header_infers_the_shape():
    schedule = Schedule.from_text("rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1B0 1F1 1B1\n")
    assert schedule.name == "custom"
    assert (schedule.num_stages, schedule.num_chunks, schedule.num_microbatches) == (2, 1, 2)
    v = Schedule.from_text("rank 0: 0F0 3F0 3B0 0B0\nrank 1: 1F0 2F0 2B0 1B0")
    assert (v.placement, v.num_chunks) == ("v", 2)
    validate(v)


def test_from_text_bad_action():
    with pytest.raises(ScheduleError, match="bad action 'oops'"):
        Schedule.from_text("rank 0: 0F0 oops")
