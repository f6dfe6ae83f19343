"""A schedule as numpy arrays: one row per compute action, the data flow resolved.

The lowering pass (lowering.py) writes SEND and RECV actions as tuples, which
for 256 stages x 4096 micro-batches is millions of objects. This module holds
the same facts compactly, for the engine, the fast path and the validator:

- compute actions ("nodes") in rank order, then program order: ``rank``,
  ``piece``, ``kind`` (KIND_CODE), ``microbatch``; rank r's nodes are
  ``offsets[r]:offsets[r + 1]``;
- ``producer[i]``: the node whose output node i consumes (-1: none), on any rank;
  a producer on another rank means a message (the lowering's SEND right after
  the producer and RECV right before node i), on the same rank a hand-off in place;
- ``waves``: a topological order of the action graph (program order plus data
  flow), as successive fronts of nodes whose predecessors are all in earlier
  fronts (Kahn's algorithm, vectorised). A cycle is a deadlock.

It is a plain transcription of schedule.needs_input / makes_output for arrays
(tests/test_fastpath.py checks it against lower()).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .schedule import Kind, Schedule, ScheduleError

KINDS = (Kind.F, Kind.B, Kind.I, Kind.W)
KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}
F, B, I, W = range(4)
NONE = -1


@dataclass(frozen=True, eq=False)
class CompactSchedule:
    schedule: Schedule
    rank: np.ndarray
    piece: np.ndarray
    kind: np.ndarray
    microbatch: np.ndarray
    offsets: np.ndarray  # num_ranks + 1
    producer: np.ndarray  # node index or -1

    @property
    def num_nodes(self) -> int:
        return len(self.rank)

    @property
    def cross(self) -> np.ndarray:
        """Whether node i receives a message (its producer sits on another rank)."""
        has = self.producer >= 0
        out = np.zeros(self.num_nodes, dtype=bool)
        out[has] = self.rank[self.producer[has]] != self.rank[has]
        return out

    @cached_property
    def waves(self) -> list[np.ndarray] | None:
        """See `topological_waves`."""
        return topological_waves(self)

    def rank_predecessor(self) -> np.ndarray:
        pred = np.arange(-1, self.num_nodes - 1, dtype=np.int64)
        pred[self.offsets[:-1][self.offsets[:-1] < self.offsets[1:]]] = NONE
        return pred


_CACHE: dict[int, tuple[weakref.ref, CompactSchedule]] = {}


@contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cycle collector off while millions of acyclic objects (actions, spans) are made:
    each collection would walk all of them again, which was 80 % of building a 256 x 4096
    schedule. Collection resumes (and catches up) afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def compact(schedule: Schedule) -> CompactSchedule:
    """The arrays of `schedule` (built once per schedule object and cached)."""
    hit = _CACHE.get(id(schedule))
    if hit is not None and hit[0]() is schedule:
        return hit[1]
    result = _build(schedule)
    key = id(schedule)

    def forget(_: object, cache: dict = _CACHE) -> None:  # bound now: at exit _CACHE may be gone
        cache.pop(key, None)

    _CACHE[key] = (weakref.ref(schedule, forget), result)
    return result


def _build(schedule: Schedule) -> CompactSchedule:
    code = KIND_CODE
    pieces, kinds, mbs, counts = [], [], [], []
    for actions in schedule.ranks:
        pieces.extend([a[0] for a in actions])
        kinds.extend([code[a[1]] for a in actions])
        mbs.extend([a[2] for a in actions])
        counts.append(len(actions))
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    rank = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    piece = np.asarray(pieces, dtype=np.int64)
    kind = np.asarray(kinds, dtype=np.int8)
    microbatch = np.asarray(mbs, dtype=np.int64)
    producer = _producers(piece, kind, microbatch, schedule.num_pieces, schedule.num_microbatches)
    return CompactSchedule(schedule, rank, piece, kind, microbatch, offsets, producer)


def node_table(piece, kind, microbatch, num_pieces: int, num_microbatches: int) -> np.ndarray:
    """[piece, kind, micro-batch] -> node index (-1: none). Out-of-range actions are left out
    (check_counts reports them)."""
    table = np.full((num_pieces, 4, num_microbatches), NONE, dtype=np.int64)
    ok = (piece >= 0) & (piece < num_pieces) & (microbatch >= 0) & (microbatch < num_microbatches)
    table[piece[ok], kind[ok], microbatch[ok]] = np.flatnonzero(ok)
    return table


def _producers(piece, kind, microbatch, num_pieces: int, num_microbatches: int) -> np.ndarray:
    """needs_input for arrays: F of piece s reads F of s-1; B or I of s reads the B or I of s+1."""
    table = node_table(piece, kind, microbatch, num_pieces, num_microbatches)
    producer = np.full(len(piece), NONE, dtype=np.int64)
    ok = (piece >= 0) & (piece < num_pieces) & (microbatch >= 0) & (microbatch < num_microbatches)
    forward = ok & (kind == F) & (piece > 0)
    producer[forward] = table[piece[forward] - 1, F, microbatch[forward]]
    backward = ok & ((kind == B) | (kind == I)) & (piece < num_pieces - 1)
    up, mb = piece[backward] + 1, microbatch[backward]
    producer[backward] = np.where(table[up, B, mb] >= 0, table[up, B, mb], table[up, I, mb])
    return producer


# --- validation ------------------------------------------------------------------


def counts_ok(c: CompactSchedule) -> bool:
    """check_counts' rule, vectorised: every action on its piece's rank and in range, and each
    (piece, micro-batch) run as F and B or as F, I and W, each once."""
    s = c.schedule
    p, m = s.num_pieces, s.num_microbatches
    if s.num_ranks != s.num_stages:
        return False
    if c.num_nodes and (c.piece.min() < 0 or c.piece.max() >= p or c.microbatch.min() < 0
                        or c.microbatch.max() >= m):
        return False
    if s.placement == "loop":
        home = c.piece % s.num_stages
    else:
        home = np.where(c.piece < s.num_stages, c.piece, 2 * s.num_stages - 1 - c.piece)
    if not np.array_equal(home, c.rank):
        return False
    counts = np.bincount((c.piece * 4 + c.kind) * m + c.microbatch, minlength=p * 4 * m).reshape(p, 4, m)
    fb = (counts[:, F] == 1) & (counts[:, B] == 1) & (counts[:, I] == 0) & (counts[:, W] == 0)
    fiw = (counts[:, F] == 1) & (counts[:, B] == 0) & (counts[:, I] == 1) & (counts[:, W] == 1)
    return bool(np.all(fb | fiw))


def topological_waves(c: CompactSchedule) -> list[np.ndarray] | None:
    """Fronts of a topological order of program order plus data flow; None on a cycle
    (a deadlock), including an action placed before its own piece's F (or a W before its I)."""
    if not _local_order_ok(c):
        return None
    fronts, done = _kahn(c)
    return fronts if done.all() else None


def blocked_ranks(c: CompactSchedule) -> list[int]:
    """The ranks that never finish: they hold an action on a cycle or behind one."""
    done = _kahn(c)[1] if _local_order_ok(c) else np.zeros(c.num_nodes, dtype=bool)
    return sorted(set(c.rank[~done].tolist()))


def _kahn(c: CompactSchedule) -> tuple[list[np.ndarray], np.ndarray]:
    n = c.num_nodes
    successor = np.arange(1, n + 1, dtype=np.int64)
    successor[c.offsets[1:][c.offsets[1:] > c.offsets[:-1]] - 1] = NONE
    consumer = np.full(n, NONE, dtype=np.int64)
    has = c.producer >= 0
    consumer[c.producer[has]] = np.flatnonzero(has)
    indegree = (c.rank_predecessor() >= 0).astype(np.int64) + has
    front = np.flatnonzero(indegree == 0)
    fronts, done = [], np.zeros(n, dtype=bool)
    while front.size:
        fronts.append(front)
        done[front] = True
        nxt = np.concatenate((successor[front], consumer[front]))
        nxt = nxt[nxt >= 0]
        np.subtract.at(indegree, nxt, 1)
        front = np.unique(nxt[indegree[nxt] == 0])
    return fronts, done


def _local_order_ok(c: CompactSchedule) -> bool:
    """B and I after their F, W after its I (same piece and micro-batch, hence same rank)."""
    s = c.schedule
    table = node_table(c.piece, c.kind, c.microbatch, s.num_pieces, s.num_microbatches)
    forward, backward = table[:, F], np.maximum(table[:, B], table[:, I])
    inputs, weights = table[:, I], table[:, W]
    split = weights >= 0
    return bool(np.all(forward < backward) and np.all(inputs[split] < weights[split]))


def validate_fast(schedule: Schedule) -> CompactSchedule:
    """schedule.validate's rules on arrays; on a failure the slow checks run for their message."""
    from .lowering import lower, unit_steps
    from .schedule import check_counts

    c = compact(schedule)
    if not counts_ok(c):
        check_counts(schedule)  # raises with the offending rank and piece
        raise ScheduleError(f"schedule {schedule.name!r} does not run each piece's actions once")
    if c.waves is None:
        unit_steps(lower(schedule))  # raises with the grid, the stuck actions marked
        raise ScheduleError(f"schedule {schedule.name!r} deadlocks")
    return c
