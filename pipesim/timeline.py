"""Timelines of one training step, simulated or measured, and their metrics.

Knows nothing of how the timeline was produced: the engine and the runner both
fill the same types, so the two can be compared span by span.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass

ACTION_KINDS = ("F", "B", "I", "W")  # compute actions of the schedule (W counts as compute)
COMPUTE_KINDS = (*ACTION_KINDS, "optimizer")
SPAN_KINDS = (*COMPUTE_KINDS, "send", "wait", "copy", "allreduce")
SENDS = "sends"  # direction of a wait for the rank's own sends to complete, before its optimizer step
ALLREDUCES = "allreduces"  # direction of a wait for the rank's gradient all-reduces (data parallelism)


@dataclass(frozen=True)
class Span:
    """Something a rank (or a link, for ``send``) did from start_s to end_s.
    ``stage`` is the model piece (for F, B, I, W: the action's piece).

    ``send``: a transfer from ``rank`` to ``peer`` of micro-batch's activation
    (``stage`` = sending stage, direction from ``direction``);
    ``wait``: ``rank`` blocked on a message from ``peer``;
    ``copy``: a device <-> host copy of a message (runner on cuda);
    ``allreduce``: piece ``stage``'s gradient all-reduce across the replicas, from its
    start to its end; it runs beside the rank's compute (non-blocking).
    """

    rank: int
    kind: str
    start_s: float
    end_s: float
    stage: int = -1
    microbatch: int = -1
    peer: int = -1
    direction: str = ""  # for send/wait: "F" (activation) or "B" (gradient)

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def name(self) -> str:
        if self.kind in ACTION_KINDS:
            return f"{self.stage}{self.kind}{self.microbatch}"
        if self.kind == "send":
            return f"send {self.rank}->{self.peer} {self.direction}{self.microbatch}"
        if self.kind == "wait" and self.direction == SENDS:
            return "wait for sends"
        if self.kind == "wait" and self.direction == ALLREDUCES:
            return "wait for all-reduces"
        if self.kind == "allreduce":
            return f"all-reduce {self.stage}"
        if self.kind == "wait":
            return f"wait {self.peer}->{self.rank} {self.direction}{self.microbatch}"
        if self.kind == "copy":
            return f"copy {self.direction}{self.microbatch}"
        return self.kind


@dataclass(frozen=True)
class MemorySample:
    rank: int
    time_s: float
    activation_bytes: int  # saved activations held after this instant


@dataclass(frozen=True)
class Timeline:
    num_ranks: int
    spans: tuple[Span, ...]
    memory: tuple[MemorySample, ...]
    static_bytes: tuple[int, ...]  # per rank: parameters + gradients + optimizer state
    source: str = "simulated"  # or "measured"

    def rank_spans(self, rank: int, kinds=SPAN_KINDS) -> list[Span]:
        return [s for s in self.spans if s.rank == rank and s.kind in kinds]


@dataclass(frozen=True)
class RankMetrics:
    rank: int
    busy_s: float
    idle_s: float
    bubble_fraction: float
    peak_activation_bytes: int
    peak_memory_bytes: int


@dataclass(frozen=True)
class Metrics:
    iteration_time_s: float
    bubble_fraction: float
    ranks: tuple[RankMetrics, ...]

    @property
    def peak_memory_bytes(self) -> int:
        return max(r.peak_memory_bytes for r in self.ranks)


def peak_activation_bytes(timeline: Timeline) -> list[int]:
    if hasattr(timeline, "peak_activation_bytes"):  # steparrays.ArrayTimeline: from its arrays
        return timeline.peak_activation_bytes()
    peaks = [0] * timeline.num_ranks
    for sample in timeline.memory:
        peaks[sample.rank] = max(peaks[sample.rank], sample.activation_bytes)
    return peaks


def compute_metrics(timeline: Timeline) -> Metrics:
    """Iteration time is first start to last end; busy = F + B + I + W + optimizer."""
    if hasattr(timeline, "metrics"):  # steparrays.ArrayTimeline: from its arrays, no spans made
        return timeline.metrics()
    start = min(s.start_s for s in timeline.spans)
    end = max(s.end_s for s in timeline.spans)
    iteration = end - start
    busy: defaultdict[int, float] = defaultdict(float)
    for span in timeline.spans:
        if span.kind in COMPUTE_KINDS:
            busy[span.rank] += span.duration_s
    peaks = peak_activation_bytes(timeline)
    ranks = tuple(
        RankMetrics(
            rank=r,
            busy_s=busy[r],
            idle_s=iteration - busy[r],
            bubble_fraction=(iteration - busy[r]) / iteration if iteration > 0 else 0.0,
            peak_activation_bytes=peaks[r],
            peak_memory_bytes=timeline.static_bytes[r] + peaks[r],
        )
        for r in range(timeline.num_ranks)
    )
    total_idle = sum(r.idle_s for r in ranks)
    bubble = total_idle / (iteration * timeline.num_ranks) if iteration > 0 else 0.0
    return Metrics(iteration, bubble, ranks)


# --- export -------------------------------------------------------------------

_LINK_PID = 1


def to_chrome_trace(timeline: Timeline) -> dict:
    """Chrome trace JSON (open in Perfetto / chrome://tracing). Times in µs."""
    origin = min((s.start_s for s in timeline.spans), default=0.0)
    events: list[dict] = [
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": f"ranks ({timeline.source})"}},
        {"ph": "M", "pid": _LINK_PID, "name": "process_name", "args": {"name": "links"}},
    ]
    for rank in range(timeline.num_ranks):
        events.append({"ph": "M", "pid": 0, "tid": rank, "name": "thread_name",
                       "args": {"name": f"rank {rank}"}})
    for span in timeline.spans:
        on_link = span.kind in ("send", "allreduce")
        events.append({
            "ph": "X",
            "name": span.name,
            "cat": span.kind,
            "pid": _LINK_PID if on_link else 0,
            "tid": (f"{span.rank}->{span.peer}" if span.kind == "send" else f"all-reduce, rank {span.rank}")
            if on_link else span.rank,
            "ts": (span.start_s - origin) * 1e6,
            "dur": span.duration_s * 1e6,
            "args": {"stage": span.stage, "microbatch": span.microbatch},
        })
    for sample in timeline.memory:
        events.append({
            "ph": "C",
            "name": f"rank {sample.rank} memory",
            "pid": 0,
            "ts": (sample.time_s - origin) * 1e6,
            "args": {"bytes": timeline.static_bytes[sample.rank] + sample.activation_bytes},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def to_csv(timeline: Timeline) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["rank", "kind", "name", "stage", "microbatch", "peer", "start_s", "end_s"])
    for s in sorted(timeline.spans, key=lambda s: (s.rank, s.start_s)):
        writer.writerow([s.rank, s.kind, s.name, s.stage, s.microbatch, s.peer,
                         f"{s.start_s:.9f}", f"{s.end_s:.9f}"])
    return out.getvalue()
