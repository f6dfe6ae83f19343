"""Schedules as data: one ordered list of actions per rank.

The same ``Schedule`` object is interpreted by the simulator (engine.py) and by
the real runner (runner/). Knows nothing of costs or time.

Communication is implied by the actions: after ``sF m`` the activation of
micro-batch m goes to the rank of stage s+1; after ``sB m`` its gradient goes
to the rank of stage s-1. Sends never block (the runner posts its receives
ahead), so a schedule can only deadlock through its order of computations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

from .errors import UserError

FORWARD = "F"
BACKWARD = "B"
SCHEDULES = ("gpipe", "1f1b")
_ACTION_RE = re.compile(r"^(\d+)([FB])(\d+)$")


class ScheduleError(UserError):
    """An invalid schedule; the message may hold a multi-line grid."""


class Action(NamedTuple):
    stage: int
    kind: str  # FORWARD or BACKWARD
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        match = _ACTION_RE.match(text.strip())
        if not match:
            raise ScheduleError(f"bad action {text!r}: expected like 1F0 (stage, F or B, micro-batch)")
        return cls(int(match[1]), match[2], int(match[3]))


@dataclass(frozen=True)
class Schedule:
    name: str
    num_stages: int
    num_microbatches: int
    ranks: tuple[tuple[Action, ...], ...]  # rank -> ordered actions

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def rank_of_stage(self, stage: int) -> int:
        return stage  # one stage per rank (interleaved schedules would map several)

    def to_text(self) -> str:
        return "\n".join(
            f"rank {rank}: " + " ".join(map(str, actions)) for rank, actions in enumerate(self.ranks)
        )

    @classmethod
    def from_text(cls, text: str, name: str = "custom") -> Schedule:
        rows = []
        for line in text.strip().splitlines():
            _, _, body = line.partition(":")
            rows.append(tuple(Action.parse(tok) for tok in body.split()))
        actions = [a for row in rows for a in row]
        if not actions:
            raise ScheduleError("schedule text has no actions (expected lines like 'rank 0: 0F0 0B0')")
        num_stages = 1 + max(a.stage for a in actions)
        num_microbatches = 1 + max(a.microbatch for a in actions)
        return cls(name, num_stages, num_microbatches, tuple(rows))


# --- builders -----------------------------------------------------------------


def _forwards(stage: int, microbatches: range) -> list[Action]:
    return [Action(stage, FORWARD, mb) for mb in microbatches]


def _backwards(stage: int, microbatches: range) -> list[Action]:
    return [Action(stage, BACKWARD, mb) for mb in microbatches]


def gpipe(num_stages: int, num_microbatches: int) -> Schedule:
    """Fill-drain: every forward, then every backward (the original study's scheme)."""
    everything = range(num_microbatches)
    ranks = tuple(
        tuple(_forwards(s, everything) + _backwards(s, everything)) for s in range(num_stages)
    )
    return Schedule("gpipe", num_stages, num_microbatches, ranks)


def _one_f_one_b_rank(stage: int, num_stages: int, num_microbatches: int) -> tuple[Action, ...]:
    warmup = min(num_stages - stage - 1, num_microbatches)
    steady = num_microbatches - warmup
    actions = _forwards(stage, range(warmup))
    for i in range(steady):  # steady state: one forward, then the oldest backward
        actions += _forwards(stage, range(warmup + i, warmup + i + 1))
        actions += _backwards(stage, range(i, i + 1))
    actions += _backwards(stage, range(steady, num_microbatches))  # cool-down
    return tuple(actions)


def one_f_one_b(num_stages: int, num_microbatches: int) -> Schedule:
    """PipeDream-Flush / Megatron non-interleaved 1F1B: warm-up of p-r-1 forwards on rank r."""
    ranks = tuple(
        _one_f_one_b_rank(s, num_stages, num_microbatches) for s in range(num_stages)
    )
    return Schedule("1f1b", num_stages, num_microbatches, ranks)


_BUILDERS = {"gpipe": gpipe, "1f1b": one_f_one_b}


def build_schedule(name: str, num_stages: int, num_microbatches: int) -> Schedule:
    if name not in _BUILDERS:
        raise ScheduleError(f"unknown schedule {name!r} (allowed: {', '.join(SCHEDULES)})")
    if num_stages < 1 or num_microbatches < 1:
        raise ScheduleError(
            f"need at least one stage and one micro-batch, got {num_stages} and {num_microbatches}"
        )
    schedule = _BUILDERS[name](num_stages, num_microbatches)
    validate(schedule)
    return schedule


# --- validation ---------------------------------------------------------------


def _check_counts(schedule: Schedule) -> None:
    p, m = schedule.num_stages, schedule.num_microbatches
    if schedule.num_ranks != p:
        raise ScheduleError(f"schedule has {schedule.num_ranks} ranks for {p} stages")
    for rank, actions in enumerate(schedule.ranks):
        expected = {Action(rank, k, mb) for k in (FORWARD, BACKWARD) for mb in range(m)}
        seen = set(actions)
        if len(actions) != len(seen) or seen != expected:
            extra = [str(a) for a in actions if a not in expected or actions.count(a) > 1]
            missing = sorted(str(a) for a in expected - seen)
            raise ScheduleError(
                f"rank {rank} must run each of F and B once per micro-batch of stage {rank}: "
                f"missing {missing[:5] or 'none'}, wrong or repeated {extra[:5] or 'none'}"
            )


def _dependencies(action: Action, num_stages: int) -> list[Action]:
    stage, kind, mb = action
    if kind == FORWARD:
        return [Action(stage - 1, FORWARD, mb)] if stage > 0 else []
    deps = [Action(stage, FORWARD, mb)]
    if stage < num_stages - 1:
        deps.append(Action(stage + 1, BACKWARD, mb))
    return deps


def unit_steps(schedule: Schedule) -> list[list[Action | None]]:
    """Run the schedule in lock-step unit time; returns rank x step grid.

    Raises ScheduleError with the grid, the stuck actions marked, on deadlock.
    """
    p = schedule.num_stages
    done: set[Action] = set()
    position = [0] * schedule.num_ranks
    grid: list[list[Action | None]] = [[] for _ in schedule.ranks]
    while any(pos < len(acts) for pos, acts in zip(position, schedule.ranks)):
        ran = []
        for rank, actions in enumerate(schedule.ranks):
            nxt = actions[position[rank]] if position[rank] < len(actions) else None
            ok = nxt is not None and all(d in done for d in _dependencies(nxt, p))
            grid[rank].append(nxt if ok else None)
            if ok:
                ran.append(nxt)
                position[rank] += 1
        if not ran:
            stuck = [acts[pos] for pos, acts in zip(position, schedule.ranks) if pos < len(acts)]
            raise ScheduleError(
                f"schedule {schedule.name!r} deadlocks; stuck actions marked *\n"
                + format_grid(grid, stuck=stuck, position=position, schedule=schedule)
            )
        done.update(ran)
    return grid


def format_grid(grid, stuck=(), position=None, schedule=None) -> str:
    """Rank x step table; after a deadlock the next (stuck) action is appended, marked *."""
    rows = []
    for rank, cells in enumerate(grid):
        text = [str(c) if c else "." for c in cells]
        if position is not None and schedule is not None and position[rank] < len(schedule.ranks[rank]):
            nxt = schedule.ranks[rank][position[rank]]
            if nxt in stuck:
                text.append(f"*{nxt}")
        rows.append(f"rank {rank} | " + " ".join(f"{c:>5}" for c in text))
    return "\n".join(rows)


def validate(schedule: Schedule) -> None:
    """Every micro-batch gets exactly one F and one B on every stage; no deadlock."""
    _check_counts(schedule)
    unit_steps(schedule)
