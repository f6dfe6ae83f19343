"""Schedules as data: one ordered list of compute actions per rank.

Words (used the same way in every command): ``--stages P`` is the pipeline
depth in ranks; ``--chunks V`` the model chunks per rank; the model is cut
into P·V *pieces*. An action names a piece (torch's ``stage_index``), a kind
and a micro-batch, and prints as ``2I3`` (piece 2, input gradient,
micro-batch 3). A schedule carries its piece -> rank placement: ``loop``
(piece s on rank s mod P) or ``v`` (rank r holds pieces r and 2P-1-r).

A ``Schedule`` holds compute actions only. Communication is added by one pass,
``lowering.lower``, which every consumer (engine, runner, validator, bounds)
reads. Knows nothing of costs or time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple, assert_never

from .errors import UserError


class Kind(StrEnum):
    """What an action does. Every dispatch over kinds is an exhaustive ``match`` ending in
    ``assert_never``: a kind added here fails tests/test_kinds.py in every dispatcher
    until each handles it."""

    F = "F"  # forward
    B = "B"  # full backward (input and weight gradients at once)
    I = "I"
    W = "W"  # backward for the weight gradients only (torch's BACKWARD_WEIGHT)
    SEND = "SEND"  # a message to another rank (lowered schedules only)
    RECV = "RECV"  # a message from another rank (lowered schedules only)
    ALLREDUCE = "ALLREDUCE"  # start the piece's gradient all-reduce across replicas (lowered, D > 1)


FORWARD, BACKWARD = Kind.F, Kind.B
COMPUTE_KINDS = (Kind.F, Kind.B, Kind.I, Kind.W)
PLACEMENTS = ("loop", "v")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v", "dualpipev")
_COMPUTE_RE = re.compile(r"^(\d+)([FBIW])(\d+)$")
_MESSAGE_RE = re.compile(r"^(\d+)(SEND|RECV)_([FB])(\d+)$")
_ALLREDUCE_RE = re.compile(r"^(\d+)ALLREDUCE$")


class ScheduleError(UserError):
    """An invalid schedule; the message may hold a multi-line grid."""


def is_compute(kind: Kind) -> bool:
    match kind:
        case Kind.F | Kind.B | Kind.I | Kind.W:
            return True
        case Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return False
        case _:
            assert_never(kind)


class Action(NamedTuple):
    """``piece`` = the model piece (torch's stage index). For SEND/RECV (lowered
    schedules only): ``direction`` F (activation) or B (gradient), ``piece`` the
    sending piece (SEND) or the receiving piece (RECV), as torch writes them;
    ``peer`` the other rank and ``tag`` the MPI tag."""

    piece: int
    kind: Kind
    microbatch: int
    direction: Kind | None = None
    peer: int = -1
    tag: int = -1

    def __str__(self) -> str:
        if is_compute(self.kind):
            return f"{self.piece}{self.kind}{self.microbatch}"
        if self.kind == Kind.ALLREDUCE:
            return f"{self.piece}{self.kind}"
        return f"{self.piece}{self.kind}_{self.direction}{self.microbatch}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """``1F0``, ``2I3``, ``1W0``; lowered forms ``1SEND_F0`` and ``2RECV_F0``
        (peer and tag are filled in by the lowered schedule that reads them)."""
        text = text.strip()
        if match := _COMPUTE_RE.match(text):
            return cls(int(match[1]), Kind(match[2]), int(match[3]))
        if match := _MESSAGE_RE.match(text):
            return cls(int(match[1]), Kind(match[2]), int(match[4]), Kind(match[3]))
        if match := _ALLREDUCE_RE.match(text):
            return cls(int(match[1]), Kind.ALLREDUCE, -1)
        raise ScheduleError(f"bad action {text!r}: expected like 1F0 (piece, F/B/I/W, micro-batch), "
                            "1SEND_F0 / 2RECV_B0 or 1ALLREDUCE")


def rank_of_piece(piece: int, num_stages: int, placement: str) -> int:
    """loop: piece s on rank s mod P; v: rank r holds pieces r and 2P-1-r."""
    if placement == "loop":
        return piece % num_stages
    if placement == "v":
        return piece if piece < num_stages else 2 * num_stages - 1 - piece
    raise ScheduleError(f"unknown placement {placement!r} (allowed: {', '.join(PLACEMENTS)})")


@dataclass(frozen=True)
class Schedule:
    name: str
    num_stages: int  # P: ranks
    num_chunks: int  # V: pieces per rank
    num_microbatches: int
    placement: str  # "loop" or "v"
    ranks: tuple[tuple[Action, ...], ...]  # rank -> ordered compute actions

    @property
    def num_ranks(self) -> int:
        return len(self.ranks)

    @property
    def num_pieces(self) -> int:
        return self.num_stages * self.num_chunks

    def rank_of(self, piece: int) -> int:
        return rank_of_piece(piece, self.num_stages, self.placement)

    def pieces_of(self, rank: int) -> tuple[int, ...]:
        return tuple(s for s in range(self.num_pieces) if self.rank_of(s) == rank)

    def kinds(self) -> set[Kind]:
        return {a.kind for actions in self.ranks for a in actions}

    @property
    def splits_backward(self) -> bool:
        """Whether some backward is split into I and W (needs I and W costs)."""
        return bool(self.kinds() & {Kind.I, Kind.W})

    def header(self) -> str:
        return (f"# pipesim schedule {self.name} stages={self.num_stages} chunks={self.num_chunks} "
                f"microbatches={self.num_microbatches} placement={self.placement}")

    def to_text(self) -> str:
        return "\n".join([self.header()] + [
            f"rank {rank}: " + " ".join(map(str, actions)) for rank, actions in enumerate(self.ranks)])

    @classmethod
    def from_text(cls, text: str, name: str = "custom") -> Schedule:
        """Lines ``rank R: 0F0 0B0 ...``; an optional ``# pipesim schedule NAME
        key=value ...`` header names it, else the shape is inferred."""
        meta, rows = parse_header(text), []
        for line in text.strip().splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                _, _, body = line.partition(":")
                rows.append(tuple(Action.parse(tok) for tok in body.split()))
        return from_rows(rows, meta.get("name", name), meta)


def parse_header(text: str) -> dict:
    for line in text.strip().splitlines():
        words = line.split()
        if words[:3] == ["#", "pipesim", "schedule"] and len(words) > 3:
            meta: dict = {"name": words[3]}
            for word in words[4:]:
                key, _, value = word.partition("=")
                meta[key] = value if key == "placement" else int(value)
            return meta
    return {}


def from_rows(rows: list[tuple[Action, ...]], name: str, meta: dict | None = None) -> Schedule:
    """A schedule from per-rank compute actions; the placement is inferred when not given."""
    meta = meta or {}
    actions = [a for row in rows for a in row]
    if not actions:
        raise ScheduleError("schedule has no actions (expected lines like 'rank 0: 0F0 0B0')")
    if not all(is_compute(a.kind) for a in actions):
        raise ScheduleError("a schedule holds compute actions only (F, B, I, W); SEND/RECV come from lowering")
    num_stages = meta.get("stages", len(rows))
    num_pieces = 1 + max(a.piece for a in actions)
    chunks = meta.get("chunks", -(-num_pieces // num_stages))
    microbatches = meta.get("microbatches", 1 + max(a.microbatch for a in actions))
    placement = meta.get("placement") or _infer_placement(rows, num_stages)
    return Schedule(name, num_stages, chunks, microbatches, placement, tuple(rows))


def _infer_placement(rows, num_stages: int) -> str:
    for placement in PLACEMENTS:
        if all(rank_of_piece(a.piece, num_stages, placement) == rank
               for rank, row in enumerate(rows) for a in row):
            return placement
    raise ScheduleError("the schedule places pieces neither 'loop' (piece s on rank s mod P) "
                        "nor 'v' (rank r holds pieces r and 2P-1-r)")


# --- who needs what: the one statement of the data flow ------------------------


class MessageKey(NamedTuple):
    """A tensor that flows between pieces: to ``piece``, activation (F) or gradient (B)."""

    piece: int
    direction: Kind
    microbatch: int


def needs_input(action: Action, num_pieces: int) -> tuple[MessageKey, int] | None:
    """(the tensor `action` consumes from a neighbouring piece, that piece)."""
    piece, mb = action.piece, action.microbatch
    match action.kind:
        case Kind.F:
            return (MessageKey(piece, Kind.F, mb), piece - 1) if piece > 0 else None
        case Kind.B | Kind.I:
            return (MessageKey(piece, Kind.B, mb), piece + 1) if piece < num_pieces - 1 else None
        case Kind.W | Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return None
        case _:
            assert_never(action.kind)


def makes_output(action: Action, num_pieces: int) -> MessageKey | None:
    """The tensor `action` produces for a neighbouring piece."""
    piece, mb = action.piece, action.microbatch
    match action.kind:
        case Kind.F:
            return MessageKey(piece + 1, Kind.F, mb) if piece < num_pieces - 1 else None
        case Kind.B | Kind.I:
            return MessageKey(piece - 1, Kind.B, mb) if piece > 0 else None
        case Kind.W | Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return None
        case _:
            assert_never(action.kind)


def local_prerequisites(action: Action) -> tuple[tuple[Kind, ...], ...]:
    """Actions of the same piece and micro-batch that must come first: each entry
    is satisfied by any one of its kinds."""
    match action.kind:
        case Kind.F | Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return ()
        case Kind.B | Kind.I:
            return ((Kind.F,),)
        case Kind.W:
            return ((Kind.I,),)
        case _:
            assert_never(action.kind)


# --- validation ---------------------------------------------------------------


def check_counts(schedule: Schedule) -> None:
    """Each (piece, micro-batch) is computed exactly once: one F, and one B or one I and one W,
    on the rank that holds the piece."""
    p, v, m = schedule.num_stages, schedule.num_chunks, schedule.num_microbatches
    if schedule.num_ranks != p:
        raise ScheduleError(f"schedule has {schedule.num_ranks} ranks for --stages {p}")
    for rank, actions in enumerate(schedule.ranks):
        wrong = [str(a) for a in actions
                 if not is_compute(a.kind) or not 0 <= a.piece < p * v or schedule.rank_of(a.piece) != rank
                 or not 0 <= a.microbatch < m]
        if wrong:
            raise ScheduleError(f"rank {rank} runs actions not of its pieces {list(schedule.pieces_of(rank))} "
                                f"and micro-batches 0-{m - 1}: {wrong[:5]}")
        seen: dict[tuple[int, int], list[str]] = {}
        for a in actions:
            seen.setdefault((a.piece, a.microbatch), []).append(str(a.kind))
        for piece in schedule.pieces_of(rank):
            for mb in range(m):
                kinds = sorted(seen.get((piece, mb), []))
                if kinds not in (["B", "F"], ["F", "I", "W"]):
                    raise ScheduleError(f"rank {rank} must run piece {piece}, micro-batch {mb} as F and B, "
                                        f"or F, I and W, each once; it runs {kinds or 'nothing'}")


def validate(schedule: Schedule) -> None:
    """Counts (see check_counts), and no deadlock in the lowered schedule (checked on
    arrays, compact.validate_fast; the lock-step grid is drawn only for the message)."""
    from .compact import validate_fast

    validate_fast(schedule)


def gradients_ready(schedule: Schedule) -> dict[int, int]:
    """Piece -> the position, in its rank's compute actions, of the piece's last B or W:
    after it the piece's weight gradients are final, so its all-reduce can start (as
    Megatron's gradient sync and torch's REDUCE_GRAD place it). The one statement of
    where the all-reduce goes; lowering and the simulator both read it."""
    ready: dict[int, int] = {}
    for actions in schedule.ranks:
        for position, action in enumerate(actions):
            if action.kind in (Kind.B, Kind.W):
                ready[action.piece] = position
    return ready


def build_schedule(name: str, num_stages: int, num_microbatches: int, num_chunks: int | None = None) -> Schedule:
    from .builders import build

    return build(name, num_stages, num_microbatches, num_chunks)
