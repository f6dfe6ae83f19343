"""Schedules as data: actions, builders, validation, text form."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.schedule import (
    BACKWARD,
    FORWARD,
    Action,
    Schedule,
    ScheduleError,
    build_schedule,
    gpipe,
    one_f_one_b,
    unit_steps,
    validate,
)

PS = range(1, 9)
MS = range(1, 13)


def acts(text: str) -> tuple[Action, ...]:
    return tuple(Action.parse(t) for t in text.split())


# --- actions ------------------------------------------------------------------


def test_action_parse_and_str():
    assert Action.parse("1F0") == Action(1, FORWARD, 0)
    assert Action.parse(" 12B34 ") == Action(12, BACKWARD, 34)
    assert str(Action(3, BACKWARD, 7)) == "3B7"


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([FORWARD, BACKWARD]), st.integers(0, 1000))
def test_action_text_round_trip(stage, kind, mb):
    action = Action(stage, kind, mb)
    assert Action.parse(str(action)) == action


@pytest.mark.parametrize("text", ["", "F0", "1F", "1X0", "1f0", "-1F0", "1F-1", "1F0x", "1 F 0", "1F0 2B1", "a"])
def test_action_parse_errors(text):
    with pytest.raises(ScheduleError, match="bad action"):
        Action.parse(text)


# --- builders -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
def test_builders_validate(name):
    for p in PS:
        for m in MS:
            schedule = build_schedule(name, p, m)
            assert schedule.name == name
            assert (schedule.num_stages, schedule.num_microbatches, schedule.num_ranks) == (p, m, p)
            validate(schedule)
            # lock-step with unit costs: both fill-drain and 1F1B take 2(m + p - 1) steps
            assert len(unit_steps(schedule)[0]) == 2 * (m + p - 1)


def test_gpipe_shape():
    for p in PS:
        for m in MS:
            for rank, actions in enumerate(gpipe(p, m).ranks):
                expected = [Action(rank, FORWARD, i) for i in range(m)] + [
                    Action(rank, BACKWARD, i) for i in range(m)]
                assert list(actions) == expected


def test_one_f_one_b_shape():
    """Warm-up of min(p-r-1, m) forwards, then strict F/B alternation, then the cool-down."""
    for p in PS:
        for m in MS:
            for rank, actions in enumerate(one_f_one_b(p, m).ranks):
                warmup = min(p - rank - 1, m)
                kinds = "".join(a.kind for a in actions)
                assert kinds == "F" * warmup + "FB" * (m - warmup) + "B" * warmup
                # leading forwards: the warm-up plus the first steady-state forward
                leading = len(kinds) - len(kinds.lstrip("F"))
                assert leading == min(p - rank, m)
                # micro-batches run in order within each kind
                assert [a.microbatch for a in actions if a.kind == FORWARD] == list(range(m))
                assert [a.microbatch for a in actions if a.kind == BACKWARD] == list(range(m))
                assert {a.stage for a in actions} == {rank}


def test_one_f_one_b_tiny_text():
    assert one_f_one_b(3, 4).to_text() == (
        "rank 0: 0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3\n"
        "rank 1: 1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3\n"
        "rank 2: 2F0 2B0 2F1 2B1 2F2 2B2 2F3 2B3"
    )


@pytest.mark.parametrize("args, expected", [
    (("zigzag", 2, 2), "unknown schedule 'zigzag'"),
    (("gpipe", 0, 2), "at least one stage"),
    (("1f1b", 2, 0), "at least one stage and one micro-batch"),
])
def test_build_schedule_errors(args, expected):
    with pytest.raises(ScheduleError, match=expected):
        build_schedule(*args)


# --- validation ---------------------------------------------------------------


def custom(*rows: str, name="custom") -> Schedule:
    ranks = tuple(acts(row) for row in rows)
    all_actions = [a for row in ranks for a in row]
    return Schedule(name, 1 + max(a.stage for a in all_actions),
                    1 + max(a.microbatch for a in all_actions), ranks)


def test_validator_accepts_a_hand_written_schedule():
    validate(custom("0F0 0F1 0B0 0B1", "1F0 1B0 1F1 1B1"))


def test_validator_catches_missing_action():
    schedule = custom("0F0 0F1 0B0 0B1", "1F0 1B0 1F1")
    with pytest.raises(ScheduleError) as info:
        validate(schedule)
    assert "rank 1" in str(info.value)
    assert "missing ['1B1']" in str(info.value)


def test_validator_catches_duplicate_action():
    schedule = custom("0F0 0F1 0B0 0B1 0B1", "1F0 1B0 1F1 1B1")
    with pytest.raises(ScheduleError) as info:
        validate(schedule)
    message = str(info.value)
    assert "rank 0" in message and "repeated" in message and "0B1" in message


def test_validator_catches_action_of_another_stage():
    schedule = custom("0F0 0B0 1F0", "1B0")
    with pytest.raises(ScheduleError, match="rank 0"):
        validate(schedule)


def test_validator_catches_wrong_rank_count():
    schedule = Schedule("short", 3, 1, (acts("0F0 0B0"), acts("1F0 1B0")))
    with pytest.raises(ScheduleError, match="2 ranks for 3 stages"):
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
    assert grid[0].startswith("rank 0 |") and grid[1].startswith("rank 1 |")
    assert "0F0" in grid[0] and "*0B0" in grid[0]  # ran one step, then stuck
    assert "*1F1" in grid[1]
    assert "*" not in grid[0].replace("*0B0", "")


def test_validator_catches_backward_before_own_forward():
    schedule = custom("0B0 0F0", "1F0 1B0")
    with pytest.raises(ScheduleError, match=r"deadlocks[\s\S]*\*0B0"):
        validate(schedule)


# --- text form ----------------------------------------------------------------


@pytest.mark.parametrize("build", [gpipe, one_f_one_b])
@pytest.mark.parametrize("p, m", [(1, 1), (2, 3), (4, 8), (5, 2)])
def test_schedule_text_round_trip(build, p, m):
    schedule = build(p, m)
    again = Schedule.from_text(schedule.to_text(), name=schedule.name)
    assert again == schedule
    assert again.to_text() == schedule.to_text()


def test_schedule_text_form():
    text = gpipe(2, 2).to_text()
    assert text == "rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1F1 1B0 1B1"


def test_from_text_custom_then_validate():
    schedule = Schedule.from_text("rank 0: 0F0 0F1 0B0 0B1\nrank 1: 1F0 1B0 1F1 1B1\n")
    assert schedule.name == "custom"
    assert (schedule.num_stages, schedule.num_microbatches) == (2, 2)
    assert schedule.ranks[1] == acts("1F0 1B0 1F1 1B1")
    validate(schedule)


def test_from_text_bad_action():
    with pytest.raises(ScheduleError, match="bad action 'oops'"):
        Schedule.from_text("rank 0: 0F0 oops")
