"""Schedule builders: gpipe, 1f1b, interleaved-1f1b, zb-h1, zb-v, dualpipev.

Where torch 2.13 has the same schedule, the builder gives the same per-rank
compute order as torch's class (``interleaved-1f1b`` = ScheduleInterleaved1F1B,
``zb-h1`` = ScheduleInterleavedZeroBubble, ``zb-v`` = ScheduleZBVZeroBubble,
``dualpipev`` = ScheduleDualPipeV), once torch's ``None`` bubbles are dropped,
and refuses what torch refuses (tests/test_torch_schedules.py compares them),
so predicting "zb-v" predicts what a torch user runs.
"""

from __future__ import annotations

from collections import defaultdict, deque

from .compact import paused_gc
from .schedule import SCHEDULES, Action, Kind, Schedule, ScheduleError, validate

F, B, I, W = Kind.F, Kind.B, Kind.I, Kind.W
DEFAULT_CHUNKS = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zb-h1": 1, "zb-v": 2, "dualpipev": 2}
PLACEMENT = {"gpipe": "loop", "1f1b": "loop", "interleaved-1f1b": "loop", "zb-h1": "loop",
             "zb-v": "v", "dualpipev": "v"}


class _Order:
    """One rank's actions under construction; micro-batches counted per (piece, kind)."""

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.count: dict[tuple[int, Kind], int] = defaultdict(int)

    def add(self, piece: int, kind: Kind) -> int:
        """Append the next micro-batch of `kind` on `piece`; a B counts as an I and a W."""
        counter = I if kind == B else kind
        mb = self.count[piece, counter]
        self.actions.append(Action(piece, kind, mb))
        self.count[piece, counter] += 1
        if kind == B:
            self.count[piece, W] += 1
        return mb


# --- one chunk per rank -------------------------------------------------------


def _actions(piece: int, kind: Kind, microbatches: range) -> list[Action]:
    """Action(piece, kind, i) for each i, made without Action.__new__'s argument handling
    (millions of actions at 256 stages x 4096 micro-batches)."""
    make = tuple.__new__
    return [make(Action, (piece, kind, i, None, -1, -1)) for i in microbatches]


def gpipe(p: int, m: int) -> list[list[Action]]:
    """Fill-drain (Huang et al., GPipe, NeurIPS 2019, §2.2): every forward, then every backward."""
    return [_actions(r, F, range(m)) + _actions(r, B, range(m)) for r in range(p)]


def one_f_one_b(p: int, m: int) -> list[list[Action]]:
    """PipeDream-Flush / Megatron's non-interleaved 1F1B (Narayanan et al., SC21, §2.2.1):
    a warm-up of min(p-r-1, m) forwards on rank r, then one forward and one backward
    in turn, then the cool-down's backwards."""
    ranks = []
    for r in range(p):
        warmup = min(p - r - 1, m)
        steady: list = [None] * (2 * (m - warmup))  # one forward and one backward in turn
        steady[0::2] = _actions(r, F, range(warmup, m))
        steady[1::2] = _actions(r, B, range(m - warmup))
        ranks.append(_actions(r, F, range(warmup)) + steady + _actions(r, B, range(m - warmup, m)))
    return ranks


# --- torch's 1F1B family: interleaved-1f1b and zb-h1 ---------------------------


def _microbatches_per_round(name: str, p: int, m: int) -> int:
    rounds = max(1, m // p)
    if m % rounds:
        raise ScheduleError(f"{name} needs --microbatches a multiple of max(1, m // stages) = {rounds} "
                            f"(as torch does), got {m}")
    return m // rounds


def _looped_1f1b_rank(rank: int, p: int, v: int, m: int, zero_bubble: bool) -> list[Action]:
    """torch's _get_1f1b_rank_ops: depth-first over the rank's v pieces, a round of
    micro-batches per piece. Zero bubble: backwards are I, and the W of the oldest
    I follows each I once `rank` 1F1B pairs have run."""
    name = "zb-h1" if zero_bubble else "interleaved-1f1b"
    per_round, total = _microbatches_per_round(name, p, m), m * v
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (p - 1 - rank), total)
    order, backwards, weights = _Order(), [], 0

    def forward(op: int) -> None:
        order.add(((op // per_round) % v) * p + rank, F)

    def backward(op: int) -> None:
        piece = (v - 1 - ((op - warmup) // per_round) % v) * p + rank
        order.add(piece, I if zero_bubble else B)
        backwards.append(piece)

    def weight_if_due(op: int) -> None:
        nonlocal weights
        if zero_bubble and op - warmup >= rank:
            order.add(backwards[weights], W)
            weights += 1

    for op in range(warmup):  # warm-up: forwards only
        forward(op)
    for op in range(warmup, total):  # steady state: F, then B (or I, and a W when due)
        forward(op)
        backward(op)
        weight_if_due(op)
    for op in range(total, total + warmup):  # cool-down: the remaining backwards
        backward(op)
        weight_if_due(op)
    while zero_bubble and weights < len(backwards):  # flush: the W still pending
        order.add(backwards[weights], W)
        weights += 1
    return order.actions


def interleaved_1f1b(p: int, v: int, m: int) -> list[list[Action]]:
    """Megatron's interleaved 1F1B (Narayanan et al., SC21, §2.2.2) as torch's
    ScheduleInterleaved1F1B builds it: rank r holds pieces r, r+p, ...; warm-up of
    (v-1)·rounds + 2(p-1-r) forwards, then 1F1B. Like torch (and unlike the paper)
    m need not be a multiple of p, only of max(1, m // p)."""
    return [_looped_1f1b_rank(r, p, v, m, zero_bubble=False) for r in range(p)]


def zb_h1(p: int, v: int, m: int) -> list[list[Action]]:
    """ZB-H1 (Qi et al., Zero Bubble Pipeline Parallelism, ICLR 2024, §2.1) as torch's
    ScheduleInterleavedZeroBubble builds it (its ZB1P): 1F1B with the backward split
    into I and W, rank r deferring its W by r steps to fill the cool-down bubble.
    With v > 1 it is torch's interleaved zero-bubble schedule."""
    return [_looped_1f1b_rank(r, p, v, m, zero_bubble=True) for r in range(p)]


# --- V-shaped: zb-v and dualpipev -------------------------------------------------


def zb_v(p: int, m: int) -> list[list[Action]]:
    """ZB-V (Qi et al., arXiv 2401.10241, §6) as torch's ScheduleZBVZeroBubble
    builds it: rank r holds pieces r and 2p-1-r. Zero bubble when F = I = W and
    m >= 2p-1; torch builds max(2p-1, m) micro-batches and drops the extra ones."""
    return [_zb_v_rank(r, p, m) for r in range(p)]


def _zb_v_rank(rank: int, p: int, m: int) -> list[Action]:
    n, c0, c1, o = max(2 * p - 1, m), rank, 2 * p - 1 - rank, _Order()
    for _ in range(2 * (p - rank) - 1):  # warm-up 1: chunk 0 forwards
        o.add(c0, F)
    for _ in range(rank):  # warm-up 2: chunk 1 and chunk 0 forwards in turn
        o.add(c1, F), o.add(c0, F)
    for _ in range(p - rank):  # warm-up 3: chunk 1 forward, I, W
        o.add(c1, F), o.add(c1, I), o.add(c1, W)
    while o.count[c1, F] < o.count[c0, F] or o.count[c0, F] < n:  # steady: F I W on each chunk
        if o.count[c0, F] < n:
            o.add(c0, F)
        o.add(c0, I), o.add(c0, W), o.add(c1, F), o.add(c1, I), o.add(c1, W)
    for _ in range(rank):  # cool-down 1: the I of both chunks
        o.add(c0, I), o.add(c1, I)
    for _ in range(p - rank):  # cool-down 2: chunk 0's I and W
        o.add(c0, I), o.add(c0, W)
    for chunk in (c1, c0):  # flush: the W still pending
        while o.count[chunk, W] < o.count[chunk, I]:
            o.add(chunk, W)
    return [a for a in o.actions if a.microbatch < m]


def dualpipev(p: int, m: int) -> list[list[Action]]:
    """DualPipeV, the cut-in-half DualPipe (DeepSeek-V3 report, arXiv 2412.19437,
    §3.2.1; deepseek-ai/DualPipe), as torch's ScheduleDualPipeV builds it. torch's
    overlapped forward-backward pairs (OVERLAP_F_B) run here as the F then the B on
    one rank: on a CPU there is no second stream to overlap them, so no gain is
    modelled. Needs m >= 2p, as torch does."""
    return [_dualpipev_rank(r, p, m) for r in range(p)]


def _dualpipev_rank(rank: int, p: int, m: int) -> list[Action]:
    s0, s1, o = rank, 2 * p - 1 - rank, _Order()
    pending: deque[tuple[int, int]] = deque()

    def act(piece: int, kind: Kind) -> None:
        mb = o.add(piece, kind)
        if kind == I:
            pending.append((piece, mb))

    def weight() -> None:  # the oldest pending W, if any
        if pending:
            piece, mb = pending.popleft()
            o.actions.append(Action(piece, W, mb))
            o.count[piece, W] += 1

    def overlapped(forward_piece: int, backward_piece: int) -> None:  # torch's OVERLAP_F_B
        act(forward_piece, F)
        act(backward_piece, B)

    for _ in range((p - rank - 1) * 2):  # 1: F0
        act(s0, F)
    for _ in range(rank + 1):  # 2: F0 F1
        act(s0, F)
        act(s1, F)
    for _ in range(p - rank - 1):  # 3: I1 W F1 (zero bubble)
        act(s1, I)
        weight()
        act(s1, F)
    for i in range(m - 2 * p + rank + 1):  # 4, main: F0B1 F1B0
        if i == 0 and rank == p - 1:  # not overlapped, to shrink the bubble (as torch does)
            act(s0, F)
            act(s1, B)
        else:
            overlapped(s0, s1)
        overlapped(s1, s0)
    for _ in range(p - rank - 1):  # 5: B1 F1B0
        act(s1, B)
        overlapped(s1, s0)
    split = False
    for i in range(rank + 1):  # 6: B1 B0, the second half split into I and W
        split = split or (i == (rank + 1) // 2 and rank % 2 == 1)
        act(s1, I if split else B)
        split = split or (i == (rank + 1) // 2 and rank % 2 == 0)
        act(s0, I if split else B)
    for _ in range(p - rank - 1):  # 7: W B0
        weight()
        act(s0, I if split else B)
    for _ in range(rank + 1):  # 8: the W still pending
        weight()
    return o.actions


# --- dispatch ---------------------------------------------------------------------


def _check(name: str, p: int, v: int, m: int) -> None:
    if p < 1 or m < 1 or v < 1:
        raise ScheduleError(f"need at least one stage, chunk and micro-batch, got {p}, {v} and {m}")
    if name in ("gpipe", "1f1b") and v != 1:
        raise ScheduleError(f"{name} runs one chunk per rank, got --chunks {v} (interleaved-1f1b takes several)")
    if name == "interleaved-1f1b" and v < 2:
        raise ScheduleError(f"interleaved-1f1b needs --chunks >= 2, got {v} (with one chunk it is 1f1b)")
    if name in ("zb-v", "dualpipev") and v != 2:
        raise ScheduleError(f"{name} needs exactly --chunks 2 (a V: pieces r and 2P-1-r on rank r), got {v}")
    if name == "dualpipev" and m < 2 * p:
        raise ScheduleError(f"dualpipev needs --microbatches >= 2 x --stages = {2 * p}, got {m} (as torch does)")


def build(name: str, num_stages: int, num_microbatches: int, num_chunks: int | None = None) -> Schedule:
    """Build and validate a schedule; one-line ScheduleError for what cannot exist."""
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule {name!r} (allowed: {', '.join(SCHEDULES)})")
    p, m = num_stages, num_microbatches
    v = DEFAULT_CHUNKS[name] if num_chunks is None else num_chunks
    _check(name, p, v, m)
    with paused_gc():
        schedule = _build(name, p, v, m)
    validate(schedule)
    return schedule


def _build(name: str, p: int, v: int, m: int) -> Schedule:
    match name:
        case "gpipe":
            ranks = gpipe(p, m)
        case "1f1b":
            ranks = one_f_one_b(p, m)
        case "interleaved-1f1b":
            ranks = interleaved_1f1b(p, v, m)
        case "zb-h1":
            ranks = zb_h1(p, v, m)
        case "zb-v":
            ranks = zb_v(p, m)
        case "dualpipev":
            ranks = dualpipev(p, m)
    return Schedule(name, p, v, m, PLACEMENT[name], tuple(tuple(r) for r in ranks))
