"""The one lowering pass: a compute-only Schedule -> a LoweredSchedule with
explicit SEND and RECV actions (peer rank, MPI tag). torch's ``_add_send_recv``
is the model.

Every consumer reads the lowered schedule: the engine (a RECV waits for the
message, a SEND starts a transfer), the runner (it posts one receive per RECV
up front, waits at the RECV, and sends at the SEND), the validator's deadlock
check (``unit_steps``) and the optimizer's bounds. Nothing else derives who
sends what to whom.

Rules: a RECV goes right before the compute action that consumes the tensor,
a SEND right after the one that produces it. A hand-off between two pieces on
the same rank (pieces P-1 and P under the V placement; any neighbours when
P = 1) is no message: the consumer reads the producer's tensor in place (the
runner hands it over by reference, no copy), so it costs nothing. Tags are
unique per receiving piece, micro-batch and direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from .schedule import (
    Action,
    Kind,
    MessageKey,
    Schedule,
    ScheduleError,
    gradients_ready,
    is_compute,
    local_prerequisites,
    makes_output,
    needs_input,
    parse_header,
)


def message_tag(key: MessageKey, num_pieces: int) -> int:
    """Unique per (receiving piece, micro-batch, direction); small enough for any MPI."""
    return 2 * (key.microbatch * num_pieces + key.piece) + (0 if key.direction == Kind.F else 1)


@dataclass(frozen=True)
class LoweredSchedule:
    schedule: Schedule  # the compute-only schedule it was lowered from
    ranks: tuple[tuple[Action, ...], ...]  # rank -> compute, SEND and RECV actions in order

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    def key(self, action: Action) -> MessageKey:
        """The message a SEND or RECV carries."""
        match action.kind:
            case Kind.SEND | Kind.RECV:
                if action.direction is None:
                    raise ScheduleError(f"{action} is a message without a direction")
                step = 0 if action.kind == Kind.RECV else 1 if action.direction == Kind.F else -1
                return MessageKey(action.piece + step, action.direction, action.microbatch)
            case Kind.F | Kind.B | Kind.I | Kind.W | Kind.ALLREDUCE:
                raise ScheduleError(f"{action} is not a message")
            case _:
                assert_never(action.kind)

    def to_text(self) -> str:
        return "\n".join([self.schedule.header()] + [
            f"rank {rank}: " + " ".join(map(str, actions)) for rank, actions in enumerate(self.ranks)])

    @classmethod
    def from_text(cls, text: str) -> LoweredSchedule:
        """Reads ``to_text`` back: the compute actions give the schedule, the
        SEND/RECV actions get their peer and tag from its placement."""
        meta = parse_header(text)
        rows = []
        for line in text.strip().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append(tuple(Action.parse(tok) for tok in line.partition(":")[2].split()))
        from .schedule import from_rows

        schedule = from_rows([tuple(a for a in row if is_compute(a.kind)) for row in rows],
                             meta.get("name", "custom"), meta)
        shell = cls(schedule, ())
        ranks = tuple(tuple(a if is_compute(a.kind) or a.kind == Kind.ALLREDUCE else _addressed(shell, a)
                            for a in row) for row in rows)
        return cls(schedule, ranks)


def _addressed(lowered: LoweredSchedule, action: Action) -> Action:
    key = lowered.key(action)
    schedule = lowered.schedule
    other = key.piece - 1 if key.direction == Kind.F else key.piece + 1  # the producing piece
    peer = schedule.rank_of(key.piece if action.kind == Kind.SEND else other)
    return action._replace(peer=peer, tag=message_tag(key, schedule.num_pieces))


def lower(schedule: Schedule, allreduce: bool = False) -> LoweredSchedule:
    """Add a RECV before each action whose input comes from another rank and a
    SEND after each action whose output goes to another rank; with `allreduce`
    (data parallelism), an ALLREDUCE of each piece after its last B or W and its SEND
    (schedule.gradients_ready)."""
    n = schedule.num_pieces
    ready = gradients_ready(schedule) if allreduce else {}
    ranks = []
    for rank, actions in enumerate(schedule.ranks):
        out: list[Action] = []
        for position, action in enumerate(actions):
            needed = needs_input(action, n)
            if needed is not None and schedule.rank_of(needed[1]) != rank:
                key, source = needed
                out.append(Action(key.piece, Kind.RECV, key.microbatch, key.direction,
                                  schedule.rank_of(source), message_tag(key, n)))
            out.append(action)
            made = makes_output(action, n)
            if made is not None and schedule.rank_of(made.piece) != rank:
                out.append(Action(action.piece, Kind.SEND, made.microbatch, made.direction,
                                  schedule.rank_of(made.piece), message_tag(made, n)))
            if ready.get(action.piece) == position:
                out.append(Action(action.piece, Kind.ALLREDUCE, -1))
        ranks.append(tuple(out))
    return LoweredSchedule(schedule, tuple(ranks))


# --- the deadlock check: lock-step unit time over the lowered schedule --------


class _LockStep:
    def __init__(self, lowered: LoweredSchedule):
        self.lowered = lowered
        self.n = lowered.schedule.num_pieces
        self.done: set[tuple[int, Kind, int]] = set()
        self.available: set[MessageKey] = set()  # tensors produced in earlier steps
        self.position = [0] * lowered.num_ranks

    def next_compute(self, rank: int) -> tuple[int, Action | None]:
        """Index just past the RECVs before the rank's next compute action, and that action."""
        actions, i = self.lowered.ranks[rank], self.position[rank]
        while i < len(actions) and not is_compute(actions[i].kind):
            i += 1
        return i, actions[i] if i < len(actions) else None

    def ready(self, rank: int) -> bool:
        actions, start = self.lowered.ranks[rank], self.position[rank]
        i, action = self.next_compute(rank)
        if action is None:
            return False
        received = all(self.lowered.key(a) in self.available for a in actions[start:i] if a.kind == Kind.RECV)
        needed = needs_input(action, self.n)
        local = all(any((action.piece, k, action.microbatch) in self.done for k in any_of)
                    for any_of in local_prerequisites(action))
        return received and local and (needed is None or needed[0] in self.available)

    def run(self, rank: int) -> Action:
        i, action = self.next_compute(rank)
        assert action is not None, f"rank {rank} has no compute action left; run it only when ready"
        self.done.add((action.piece, action.kind, action.microbatch))
        actions = self.lowered.ranks[rank]
        i += 1
        while i < len(actions) and actions[i].kind == Kind.SEND:  # sends right after their producer
            i += 1
        self.position[rank] = i
        return action

    def finished(self, rank: int) -> bool:
        return self.next_compute(rank)[1] is None


def unit_steps(lowered: LoweredSchedule) -> list[list[Action | None]]:
    """Run the lowered schedule in lock-step unit time; returns rank x step grid
    of compute actions. Raises ScheduleError with the grid, the stuck actions
    marked, on deadlock."""
    state = _LockStep(lowered)
    grid: list[list[Action | None]] = [[] for _ in lowered.ranks]
    while not all(state.finished(r) for r in range(lowered.num_ranks)):
        ran = [state.run(r) if state.ready(r) else None for r in range(lowered.num_ranks)]
        for rank, action in enumerate(ran):
            grid[rank].append(action)
        if not any(ran):
            stuck = {r: state.next_compute(r)[1] for r in range(lowered.num_ranks)}
            raise ScheduleError(f"schedule {lowered.schedule.name!r} deadlocks; stuck actions marked *\n"
                                + format_grid(grid, stuck))
        for action in filter(None, ran):
            made = makes_output(action, state.n)
            if made is not None:
                state.available.add(made)
    return grid


def format_grid(grid, stuck: dict | None = None) -> str:
    """Rank x step table; after a deadlock each rank's next (stuck) action is appended, marked *."""
    rows = []
    for rank, cells in enumerate(grid):
        text = [str(c) if c else "." for c in cells]
        if stuck and stuck.get(rank) is not None:
            text.append(f"*{stuck[rank]}")
        rows.append(f"rank {rank} | " + " ".join(f"{c:>5}" for c in text))
    return "\n".join(rows)
