"""Costs resolved once, and the exact fast path: the step as a longest path.

``resolve`` asks the cost model once per distinct key (piece and kind for
compute, receiving piece and direction for a message, rank for the optimizer)
and spreads the answers over the schedule's nodes with numpy indexing. This is
exact only for a cost model whose costs do not depend on what else happens
during the run: such a model declares the inputs that do in
``runtime_inputs`` (ProfileCostModel: none), and the engine then asks it per
action instead (engine.py).

``longest_path``: with fixed costs and no queueing, an action starts when the
previous action on its rank has ended and its message (if any) has arrived,
and a message arrives ``transfer_s`` after its producer ends. Those are
max-plus recurrences over the action graph, solved front by front in a
topological order (compact.topological_waves), each front in a few numpy
operations. The event simulation would give the same times exactly unless two
transfers on one link overlapped (a link carries one message at a time); that
is checked afterwards, and on an overlap the caller runs the event simulation.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from .compact import KINDS, CompactSchedule
from .costs import CostModel
from .model import ModelSpec
from .partition import Partition
from .schedule import Kind, MessageKey
from .steparrays import StepArrays


@dataclass(frozen=True, eq=False)
class Resolved:
    """Every cost of one step, per node (compute action) and per rank."""

    duration_s: np.ndarray  # per node
    message_s: np.ndarray  # per node: transfer time of the message it receives (0: none)
    link: np.ndarray  # per node: link code of that message (-1: none)
    link_ids: tuple[Hashable, ...]  # code -> the cost model's link id
    optimizer_s: np.ndarray  # per rank
    ledger_start_bytes: np.ndarray  # per node
    ledger_end_bytes: np.ndarray
    static_bytes: tuple[int, ...]  # per rank
    step_peak_bytes: tuple[int, ...] = ()  # per rank: the step ledger's peak (ledger.py)
    handshake_s: np.ndarray | None = None  # per node: the rendezvous's control-message time of the
    # message it receives (NaN: it moves as soon as it is sent); None: no message waits for one
    mpi_window_s: float = 0.0  # with handshakes: time in MPI at the start of an action that receives
    cold_s: np.ndarray | None = None  # per node: what it costs more right after its rank waited
    # for a message (CostModel.cold_start_s); None: nothing

    @property
    def handshakes(self) -> bool:
        """Whether some message waits for both ranks' MPI calls (only the event simulation has them)."""
        return self.handshake_s is not None


def runtime_inputs(costs: CostModel) -> frozenset[str]:
    """What the cost model's answers depend on during a run (empty: costs are fixed in advance)."""
    return frozenset(getattr(costs, "runtime_inputs", frozenset()))


def resolve(c: CompactSchedule, partition: Partition, model: ModelSpec, costs: CostModel,
            microbatch_size: int, recompute: tuple[int, ...] = (), allreduce: bool = False) -> Resolved:
    """``allreduce``: the ranks all-reduce their gradients (data parallelism; the step ledger
    then holds MPI's scratch buffer)."""
    from .engine import compute_s, ledger_change, stage_shapes

    schedule = c.schedule
    shapes = stage_shapes(model, partition, recompute)
    p, mbs = schedule.num_pieces, microbatch_size
    duration = np.zeros((p, 4))
    cold = np.zeros((p, 4))
    cold_start_s = getattr(costs, "cold_start_s", None)
    at_start = np.zeros((p, 4), dtype=np.int64)
    at_end = np.zeros((p, 4), dtype=np.int64)
    for key in np.unique(c.piece * 4 + c.kind).tolist():  # only the kinds the schedule runs
        piece, code = divmod(key, 4)
        kind = KINDS[code]
        duration[piece, code] = compute_s(costs, shapes[piece], kind, mbs, schedule.rank_of(piece))
        if cold_start_s is not None:
            cold[piece, code] = cold_start_s(shapes[piece].layers, kind, schedule.rank_of(piece))
        at_start[piece, code], at_end[piece, code] = (b * mbs for b in ledger_change(kind, shapes[piece]))
    message, link, link_ids, handshake = _messages(c, shapes, costs, mbs)
    optimizer = np.array([costs.optimizer_s(sum(shapes[s].params for s in schedule.pieces_of(r)), rank=r)
                          for r in range(schedule.num_ranks)], dtype=float)
    static = [0] * schedule.num_ranks
    for piece, shape in enumerate(shapes):
        static[schedule.rank_of(piece)] += costs.static_bytes(shape.params)
    from .ledger import step_peak_bytes

    step = step_peak_bytes(schedule, shapes, mbs, mbs * schedule.num_microbatches, allreduce)
    return Resolved(duration[c.piece, c.kind], message, link, link_ids, optimizer,
                    at_start[c.piece, c.kind], at_end[c.piece, c.kind], tuple(static), step, handshake,
                    float(getattr(costs, "mpi_window_s", 0.0)) if handshake is not None else 0.0,
                    cold[c.piece, c.kind] if cold.any() else None)


def _messages(c: CompactSchedule, shapes, costs: CostModel, mbs: int):
    """Transfer time, link and handshake (None: none) of each received message, asked once per
    (receiving piece, direction)."""
    from .engine import message_bytes_per_sample

    cross = c.cross
    nodes = np.flatnonzero(cross)
    backward = (c.kind[nodes] != 0).astype(np.int64)
    keys = c.piece[nodes] * 2 + backward
    message = np.zeros(c.num_nodes)
    link = np.full(c.num_nodes, -1, dtype=np.int64)
    codes: dict[Hashable, int] = {}
    unique, first = np.unique(keys, return_index=True)
    seconds, link_of_key = np.zeros(len(unique)), np.zeros(len(unique), dtype=np.int64)
    handshake_of_key = np.full(len(unique), np.nan)
    handshake_s = getattr(costs, "handshake_s", None)
    for n, (key, i) in enumerate(zip(unique.tolist(), nodes[first].tolist())):
        piece, is_backward = divmod(key, 2)
        src, dst = int(c.rank[c.producer[i]]), int(c.rank[i])
        direction = Kind.B if is_backward else Kind.F
        nbytes = message_bytes_per_sample(MessageKey(piece, direction, 0), shapes) * mbs
        seconds[n] = costs.transfer_s(src, dst, nbytes)
        link_of_key[n] = codes.setdefault(costs.link_id(src, dst), len(codes))
        control = handshake_s(src, dst, nbytes) if handshake_s is not None else None
        if control is not None:
            handshake_of_key[n] = control
    where = np.searchsorted(unique, keys)
    message[nodes], link[nodes] = seconds[where], link_of_key[where]
    handshake = None
    if not np.isnan(handshake_of_key).all():
        handshake = np.full(c.num_nodes, np.nan)
        handshake[nodes] = handshake_of_key[where]
    return message, link, tuple(codes), handshake


def longest_path(c: CompactSchedule, costs: Resolved) -> StepArrays | None:
    """The step's times without queueing on links; None when two transfers on one link
    would overlap (then only the event simulation is exact)."""
    n = c.num_nodes
    sentinel = n  # end_s[n] stays 0: "no predecessor"
    pred = c.rank_predecessor()
    pred[pred < 0] = sentinel
    producer = np.where(c.producer >= 0, c.producer, sentinel)
    end = np.zeros(n + 1)
    start = np.zeros(n)
    duration, message = costs.duration_s, costs.message_s
    waves = c.waves
    assert waves is not None, "simulate() refuses a deadlocking schedule first"
    cold = costs.cold_s
    for front in waves:
        ready, arrives = end[pred[front]], end[producer[front]] + message[front]
        begin = np.maximum(ready, arrives)
        start[front] = begin
        end[front] = begin + duration[front]
        if cold is not None:  # waited for a message: the weights come back into cache
            end[front] += np.where(c.cross[front] & (arrives > ready), cold[front], 0.0)
    end = end[:n]
    cross = c.cross
    send_start = np.full(n, np.nan)
    arrival = np.full(n, np.nan)
    send_start[cross] = end[c.producer[cross]]
    arrival[cross] = send_start[cross] + message[cross]
    if _overlap(costs.link[cross], send_start[cross], arrival[cross]):
        return None
    return StepArrays(start, end, send_start, arrival, costs.optimizer_s)


def _overlap(link: np.ndarray, start: np.ndarray, end: np.ndarray) -> bool:
    """Whether two transfers on one link overlap (touching is fine): sorted by link and
    start, each must begin no earlier than the one before it on its link ended."""
    if link.size < 2:
        return False
    order = np.lexsort((end, start, link))
    link, start, end = link[order], start[order], end[order]
    same = link[1:] == link[:-1]
    return bool(np.any(same & (start[1:] < end[:-1])))
