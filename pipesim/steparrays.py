"""A simulated step stored as arrays; spans and memory samples made only when asked.

The fast path and the event simulation (engine.py) both produce, per compute
action (node, compact.py), its start and end, and per message its send start and
arrival. Everything else follows from those and the schedule's program order:
a rank waits at a RECV from the end of its previous action until the arrival,
waits for its own sends after its last action, then runs its optimizer step;
its memory ledger changes at the start and end of each action.

``ArrayTimeline`` offers what ``timeline.Timeline`` offers (``spans``,
``memory``, ``rank_spans``, ``static_bytes``) and computes ``metrics()`` from
the arrays without making a Span per action; a trace, Gantt chart or CSV
materialises the spans on first use.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .compact import KINDS, CompactSchedule, paused_gc
from .timeline import ALLREDUCES, SENDS, SPAN_KINDS, MemorySample, Metrics, RankMetrics, Span


@dataclass(frozen=True, eq=False)
class StepArrays:
    """Times of one step: per node (compute action) and per rank."""

    start_s: np.ndarray
    end_s: np.ndarray
    send_start_s: np.ndarray  # per node that receives a message: when its producer's SEND started
    arrival_s: np.ndarray  # ... and when the message arrived (nan for other nodes)
    optimizer_s: np.ndarray  # per rank
    ready_s: np.ndarray | None = None  # per rank: when its all-reduces have ended (data parallelism)
    allreduce: tuple[tuple[int, int, float, float], ...] = ()  # (rank, piece, start_s, end_s)


@dataclass(frozen=True, eq=False)
class ArrayTimeline:
    compact: CompactSchedule
    times: StepArrays
    ledger_start_bytes: np.ndarray  # per node: activation bytes added when it starts ...
    ledger_end_bytes: np.ndarray  # ... and when it ends
    static_bytes: tuple[int, ...]
    source: str = "simulated"
    engine_path: str = "des"  # "fast" (longest path) or "des" (event simulation)
    step_peak_bytes: tuple[int, ...] = ()  # per rank: the step ledger's peak (ledger.py); () = the saved ledger's

    @property
    def num_ranks(self) -> int:
        return self.compact.schedule.num_ranks

    # --- derived per-rank facts ---------------------------------------------------

    @cached_property
    def _per_rank(self) -> dict[str, np.ndarray]:
        c, t = self.compact, self.times
        r = self.num_ranks
        has = c.offsets[1:] > c.offsets[:-1]
        last_end = np.zeros(r)
        last_end[has] = t.end_s[c.offsets[1:][has] - 1]
        sends_end = last_end.copy()
        cross = c.cross
        np.maximum.at(sends_end, c.rank[c.producer[cross]], t.arrival_s[cross])
        optimizer_start = sends_end if t.ready_s is None else np.maximum(sends_end, t.ready_s)
        return {"last_end": last_end, "sends_end": sends_end, "optimizer_start": optimizer_start,
                "optimizer_end": optimizer_start + t.optimizer_s}

    @cached_property
    def _waits(self) -> tuple[np.ndarray, np.ndarray]:
        """Nodes whose rank waited at the RECV before them, and since when."""
        c, t = self.compact, self.times
        pred = c.rank_predecessor()
        since = np.where(pred >= 0, t.end_s[np.maximum(pred, 0)], 0.0)
        waited = c.cross & (t.arrival_s > since)
        return np.flatnonzero(waited), since[waited]

    def peak_activation_bytes(self) -> list[int]:
        c = self.compact
        changes = np.empty(2 * c.num_nodes, dtype=self.ledger_start_bytes.dtype)
        changes[0::2], changes[1::2] = self.ledger_start_bytes, self.ledger_end_bytes
        held = np.cumsum(changes)
        peaks = []
        for r in range(self.num_ranks):
            lo, hi = c.offsets[r], c.offsets[r + 1]
            mine = held[2 * lo : 2 * hi] - (held[2 * lo - 1] if lo else 0)
            peaks.append(int(max(0, mine.max())) if hi > lo else 0)
        return peaks

    def metrics(self) -> Metrics:
        c, t, per = self.compact, self.times, self._per_rank
        waited, since = self._waits
        cross = c.cross
        starts = [t.start_s, since, t.send_start_s[cross], per["optimizer_start"]]
        ends = [t.end_s, t.arrival_s[waited], t.arrival_s[cross], per["optimizer_end"]]
        start = min(a.min() for a in starts if a.size)
        iteration = max(a.max() for a in ends if a.size) - start
        busy = np.bincount(c.rank, weights=t.end_s - t.start_s, minlength=self.num_ranks)
        busy = busy + (per["optimizer_end"] - per["optimizer_start"])
        peaks, step = self.peak_activation_bytes(), self.step_peak_bytes
        ranks = tuple(
            RankMetrics(rank=r, busy_s=float(busy[r]), idle_s=float(iteration - busy[r]),
                        bubble_fraction=float((iteration - busy[r]) / iteration) if iteration > 0 else 0.0,
                        peak_activation_bytes=peaks[r],
                        peak_memory_bytes=self.static_bytes[r] + (step[r] if step else peaks[r]))
            for r in range(self.num_ranks))
        total_idle = sum(r.idle_s for r in ranks)
        bubble = total_idle / (iteration * self.num_ranks) if iteration > 0 else 0.0
        return Metrics(float(iteration), float(bubble), ranks)

    # --- materialised on demand -----------------------------------------------

    @cached_property
    def spans(self) -> tuple[Span, ...]:
        with paused_gc():
            return self._spans()

    def _spans(self) -> tuple[Span, ...]:
        c, t, per = self.compact, self.times, self._per_rank
        rank, piece, kind, mb = c.rank.tolist(), c.piece.tolist(), c.kind.tolist(), c.microbatch.tolist()
        start, end = t.start_s.tolist(), t.end_s.tolist()
        spans = [Span(rank[i], str(KINDS[kind[i]]), start[i], end[i], piece[i], mb[i]) for i in range(c.num_nodes)]
        waited, since = self._waits
        for i, from_s in zip(waited.tolist(), since.tolist()):
            j = int(c.producer[i])
            spans.append(Span(rank[i], "wait", from_s, float(t.arrival_s[i]), piece[i], mb[i], rank[j],
                              _direction(kind[i])))
        for i in np.flatnonzero(c.cross).tolist():
            j = int(c.producer[i])
            spans.append(Span(rank[j], "send", float(t.send_start_s[i]), float(t.arrival_s[i]), piece[j], mb[i],
                              rank[i], _direction(kind[i])))
        for r, piece, ar_start, ar_end in t.allreduce:
            spans.append(Span(r, "allreduce", ar_start, ar_end, piece))
        for r in range(self.num_ranks):
            last, opt_start = float(per["last_end"][r]), float(per["optimizer_start"][r])
            sends = float(per["sends_end"][r])
            if sends > last:
                spans.append(Span(r, "wait", last, sends, direction=SENDS))
            if opt_start > max(last, sends):
                spans.append(Span(r, "wait", max(last, sends), opt_start, direction=ALLREDUCES))
            spans.append(Span(r, "optimizer", opt_start, float(per["optimizer_end"][r])))
        order = {k: n for n, k in enumerate(("wait", "send", *SPAN_KINDS))}
        return tuple(sorted(spans, key=lambda s: (s.start_s, s.rank, s.end_s, order[s.kind])))

    @cached_property
    def memory(self) -> tuple[MemorySample, ...]:
        c, t = self.compact, self.times
        samples = [MemorySample(r, 0.0, 0) for r in range(self.num_ranks)]
        at_start, at_end = self.ledger_start_bytes.tolist(), self.ledger_end_bytes.tolist()
        start, end = t.start_s.tolist(), t.end_s.tolist()
        for r in range(self.num_ranks):
            held = 0
            for i in range(c.offsets[r], c.offsets[r + 1]):
                if at_start[i]:
                    held += at_start[i]
                    samples.append(MemorySample(r, start[i], held))
                if at_end[i]:
                    held += at_end[i]
                    samples.append(MemorySample(r, end[i], held))
        return tuple(samples)

    def rank_spans(self, rank: int, kinds=SPAN_KINDS) -> list[Span]:
        return [s for s in self.spans if s.rank == rank and s.kind in kinds]


def _direction(kind_code: int) -> str:
    """A message to an F carries an activation (F); to a B or I a gradient (B)."""
    return "F" if kind_code == 0 else "B"
