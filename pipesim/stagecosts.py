"""Cost-model figures of a piece holding a layer range, in O(1) per range.

A cost model that declares ``additive_layers`` (ProfileCostModel: an action's
time is a per-action term plus a sum over its layers) is asked once per rank,
kind and distinct layer; a range's cost is then a difference of prefix sums
(equal to the model's own sum up to rounding, ~1e-16 relative; bounds.py
allows for that). Any other cost model is asked per range, cached: exact, but
as slow as there are ranges (layers squared per piece), so `optimize` on
hundreds of layers then takes minutes.

A piece the problem recomputes (``Problem.recompute``) costs what the engine charges
(engine.compute_s): its B and I run its forward first, so they cost B (or I) + F; its
memory is the step ledger with ``recomputed=1`` (ledger.py).

Memory figures are integer prefix sums of the model's per-layer bytes: exact.
Every figure exists as a scalar (piece, first, last) and as a matrix over all
(first, last) of one piece, which the dynamic programmes of bounds.py read.
"""

from __future__ import annotations

from collections import Counter
from functools import cache

import numpy as np

from .lowering import lower
from .model import FLOAT32_BYTES
from .plan import distinct_layers
from .schedule import Kind, Schedule

INF = np.inf


def piece_actions(schedule: Schedule, piece: int, allreduce: bool = False) -> list[Kind]:
    """The kinds of a piece's actions, in its rank's order; with `allreduce`, its gradient
    all-reduce after its last B or W (schedule.gradients_ready)."""
    kinds = [a.kind for a in schedule.ranks[schedule.rank_of(piece)] if a.piece == piece]
    if allreduce:
        last = max(i for i, kind in enumerate(kinds) if kind in (Kind.B, Kind.W))
        kinds.insert(last + 1, Kind.ALLREDUCE)
    return kinds


def ledger_states(schedule: Schedule, piece: int) -> set[tuple[int, int]]:
    """(micro-batches holding their saved activations, micro-batches holding what W needs)
    after each of the piece's actions; the engine's ledger for this piece is
    saved_bytes x the first + weight_bytes x the second."""
    saved = weight = 0
    states = {(0, 0)}
    for kind in piece_actions(schedule, piece):
        saved += {Kind.F: 1, Kind.B: -1, Kind.I: -1}.get(kind, 0)
        weight += {Kind.I: 1, Kind.W: -1}.get(kind, 0)
        states.add((saved, weight))
    return states


class StageCosts:
    """Cost-model figures of stage s holding layers first..last."""

    def __init__(self, problem):
        self.problem = problem
        self.schedule = schedule = problem.build_schedule()
        self.model = model = problem.model
        self.costs = problem.replica_costs
        self.mbs = problem.microbatch_size
        self.n = model.num_layers
        self.counts = [Counter(piece_actions(schedule, s)) for s in range(schedule.num_pieces)]
        lowered = lower(schedule)  # which pieces hand their activation on by message
        self.sends_forward = {a.piece for row in lowered.ranks for a in row
                              if a.kind == Kind.SEND and a.direction == Kind.F}
        self.additive = bool(getattr(self.costs, "additive_layers", False))
        self.recompute = frozenset(getattr(problem, "recompute", ()))
        self._laws: dict[tuple[int, Kind], tuple[float, np.ndarray]] = {}
        layers = model.layers
        self._params = _prefix([layer.params for layer in layers])
        self.memory = PieceMemory(model)
        self._input = [layer.input_bytes_per_sample for layer in layers]
        self._input_array = np.array(self._input, dtype=np.int64)
        self._output_array = np.array([layer.output_bytes_per_sample for layer in layers], dtype=np.int64)
        self._saves_input = np.array([int(layer.saves_input) for layer in layers], dtype=np.int64)
        self._saves_output = np.array([int(layer.saves_output) for layer in layers], dtype=np.int64)
        self.kinds = [piece_actions(schedule, s, getattr(problem, "data_parallel", 1) > 1)
                      for s in range(schedule.num_pieces)]
        self.link_s = cache(self._link_s)
        self.optimizer_s = cache(self._optimizer_s)
        self._ranged = cache(self._ranged_s)
        self._link_rows: dict[int, np.ndarray] = {}

    # --- compute -------------------------------------------------------------------

    def _law(self, rank: int, kind: Kind) -> tuple[float, np.ndarray]:
        """(per-action seconds, prefix sums of each layer's seconds) of `kind` on `rank`."""
        key = (rank, kind)
        if key not in self._laws:
            base = self.costs.compute_s([], kind, self.mbs, rank=rank)
            distinct, index = distinct_layers(self.model)
            per = np.array([self.costs.compute_s([layer], kind, self.mbs, rank=rank) - base for layer in distinct])
            self._laws[key] = base, np.concatenate(([0.0], np.cumsum(per[index])))
        return self._laws[key]

    def _ranged_s(self, stage: int, first: int, last: int, kind: Kind) -> float:
        rank = self.schedule.rank_of(stage)
        return self.costs.compute_s(self.model.layers[first : last + 1], kind, self.mbs, rank=rank)

    def _refolds(self, stage: int, kind: Kind) -> bool:
        """Whether this action of `stage` runs the piece's forward again first (engine.compute_s)."""
        return stage in self.recompute and kind in (Kind.B, Kind.I)

    def action_s(self, stage: int, first: int, last: int, kind: Kind) -> float:
        """One action's seconds, as the engine charges it (a recomputed B or I includes an F)."""
        seconds = self._plain_s(stage, first, last, kind)
        if self._refolds(stage, kind):
            seconds += self._plain_s(stage, first, last, Kind.F)
        return seconds

    def _plain_s(self, stage: int, first: int, last: int, kind: Kind) -> float:
        if not self.additive:
            return self._ranged(stage, first, last, kind)
        base, prefix = self._law(self.schedule.rank_of(stage), kind)
        return float(base + (prefix[last + 1] - prefix[first]))

    def action_matrix(self, stage: int, kind: Kind, firsts: np.ndarray, width: int) -> np.ndarray:
        """action_s of first..last for first in `firsts` (rows) and last = first + k,
        k in 0..width-1 (columns); inf where last is past the model's end."""
        matrix = self._plain_matrix(stage, kind, firsts, width)
        if self._refolds(stage, kind):
            matrix = matrix + self._plain_matrix(stage, Kind.F, firsts, width)
        return matrix

    def _plain_matrix(self, stage: int, kind: Kind, firsts: np.ndarray, width: int) -> np.ndarray:
        n = self.n
        lasts = firsts[:, None] + np.arange(width)[None, :]
        clipped = np.minimum(lasts, n - 1)
        if self.additive:
            base, prefix = self._law(self.schedule.rank_of(stage), kind)
            matrix = base + (prefix[clipped + 1] - prefix[firsts][:, None])
        else:
            matrix = np.array([[self._ranged(stage, a, l, kind) for l in row]
                               for a, row in zip(firsts.tolist(), clipped.tolist())])
        return np.where(lasts < n, matrix, INF)

    def forward_s(self, stage: int, first: int, last: int) -> float:
        return self.action_s(stage, first, last, Kind.F)

    def compute_s(self, stage: int, first: int, last: int) -> float:
        """Forward + backward of one micro-batch."""
        return self.forward_s(stage, first, last) + self.action_s(stage, first, last, Kind.B)

    def compute_matrix(self, stage: int, firsts: np.ndarray, width: int) -> np.ndarray:
        return self.action_matrix(stage, Kind.F, firsts, width) + self.action_matrix(stage, Kind.B, firsts, width)

    def work_s(self, stage: int, first: int, last: int) -> float:
        """All the piece's actions in the schedule (its F, B, I and W)."""
        return sum(count * self.action_s(stage, first, last, kind) for kind, count in self.counts[stage].items())

    def work_matrix(self, stage: int, firsts: np.ndarray, width: int) -> np.ndarray:
        return sum(count * self.action_matrix(stage, kind, firsts, width)
                   for kind, count in self.counts[stage].items())

    def _link_s(self, stage: int, last: int) -> tuple[float, float]:
        """(activation to piece+1, gradient back from it) for a piece ending at `last`;
        nothing between pieces on one rank (the lowered schedule has no message there)."""
        if stage not in self.sends_forward:  # the last piece, or a hand-off on one rank
            return 0.0, 0.0
        src, dst = self.schedule.rank_of(stage), self.schedule.rank_of(stage + 1)
        nbytes = self.model.layers[last].output_bytes_per_sample * self.mbs
        return self.costs.transfer_s(src, dst, nbytes), self.costs.transfer_s(dst, src, nbytes)

    def step_s(self, stage: int, first: int, last: int) -> float:
        """Critical-path contribution of a stage before the bottleneck: c + messages."""
        forward, backward = self.link_s(stage, last)
        return self.compute_s(stage, first, last) + forward + backward

    def step_matrix(self, stage: int, firsts: np.ndarray, width: int,
                    compute: np.ndarray | None = None) -> np.ndarray:
        """step_s like action_matrix; `compute`: compute_matrix(stage, firsts, width) if made."""
        compute = self.compute_matrix(stage, firsts, width) if compute is None else compute
        lasts = np.minimum(firsts[:, None] + np.arange(width)[None, :], self.n - 1)
        return compute + self._links(stage)[lasts]

    def _links(self, stage: int) -> np.ndarray:
        """Per last layer: the messages to the next piece and back."""
        if stage not in self._link_rows:
            self._link_rows[stage] = np.array([sum(self.link_s(stage, last)) for last in range(self.n)])
        return self._link_rows[stage]

    # --- optimizer and memory --------------------------------------------------------

    def params(self, first: int, last: int) -> int:
        return int(self._params[last + 1] - self._params[first])

    def _optimizer_s(self, stage: int, first: int, last: int) -> float:
        return self.costs.optimizer_s(self.params(first, last), rank=self.schedule.rank_of(stage))

    def _buffers(self, stage: int, firsts: np.ndarray, lasts: np.ndarray, dtype):
        """The step ledger's view (ledger.py) of piece `stage` holding first..last for each row's
        first (`firsts`, 1-D) and each of its lasts (`lasts`, 2-D), with its receive buffers and
        input or target copy at the start."""
        from .ledger import PieceBuffers, piece_start_bytes

        mbs, schedule, model = self.mbs, self.schedule, self.model
        saved, weight = self.memory.spans(firsts, lasts, dtype)
        inputs, outputs = self._input_array.astype(dtype)[firsts][:, None], self._output_array.astype(dtype)[lasts]
        rank = schedule.rank_of(stage)
        received = int(stage > 0 and schedule.rank_of(stage - 1) != rank)
        sent = int(stage < schedule.num_pieces - 1 and schedule.rank_of(stage + 1) != rank)
        b = PieceBuffers(
            input_bytes=inputs * mbs, output_bytes=outputs * mbs, saved_bytes=saved * mbs, weight_bytes=weight * mbs,
            input_saved=self._saves_input[firsts][:, None], output_saved=self._saves_output[lasts],
            input_received=received, output_sent=sent, first=int(stage == 0),
            backward_bytes=self.memory.backward_walk(firsts, lasts, mbs, sent, dtype),
            scratch_bytes=self.memory.weight_pass(firsts, lasts, mbs, dtype),
            top_input_bytes=self._input_array.astype(dtype)[lasts] * mbs, top_output_bytes=outputs * mbs,
            loss_bytes=np.where(lasts == self.n - 1, model.loss_saved_bytes_per_sample, 0).astype(dtype) * mbs,
            loss_backward_bytes=np.where(lasts == self.n - 1, model.loss_backward_bytes_per_sample,
                                         0).astype(dtype) * mbs,
            recomputed=int(stage in self.recompute),
            param_bytes=_spans(self._params, dtype, firsts, lasts) * FLOAT32_BYTES)
        batch = mbs * schedule.num_microbatches
        targets = np.where(lasts == self.n - 1, model.target_bytes_per_sample * batch, 0).astype(dtype)
        start = piece_start_bytes(b, schedule.num_microbatches, self._input[0] * batch if stage == 0 else 0, targets)
        return b, start

    def _activations(self, stage: int, firsts: np.ndarray, lasts: np.ndarray, dtype):
        from .ledger import walk_peak_bytes

        b, start = self._buffers(stage, firsts, lasts, dtype)
        return walk_peak_bytes([(kind, b) for kind in self.kinds[stage]], start)

    def memory_bytes(self, stage: int, first: int, last: int) -> int:
        """Static bytes plus the peak of the step ledger (ledger.py) along the piece's own
        actions: with one piece per rank, the rank's peak; with several, a lower bound of it."""
        activations = self._activations(stage, np.array([first]), np.array([[last]]), object)
        return self.costs.static_bytes(self.params(first, last)) + int(activations[0, 0])

    def fits(self, stage: int, first: int, last: int) -> bool:
        cap = self.problem.memory_cap_bytes
        return cap is None or self.memory_bytes(stage, first, last) <= cap

    def fits_matrix(self, stage: int, firsts: np.ndarray, width: int) -> np.ndarray | None:
        """fits like action_matrix (False past the model's end); None when there is no cap."""
        cap = self.problem.memory_cap_bytes
        if cap is None:
            return None
        n = self.n
        lasts = firsts[:, None] + np.arange(width)[None, :]
        ok = lasts < n
        lasts = np.minimum(lasts, n - 1)
        exact = (self.memory.total + int(self._input_array.max()) * 4 + int(self._output_array.max()) * 4
                 ) * self.mbs * (self.schedule.num_microbatches + 4) < 2**62
        dtype = np.int64 if exact and int(self._params[-1]) < 2**50 else object
        activations = self._activations(stage, firsts, lasts, dtype)
        params = np.where(ok, _spans(self._params, dtype, firsts, lasts), 0)
        try:
            static = self.costs.static_bytes(params)
        except TypeError:  # a cost model that takes plain ints only
            static = np.vectorize(self.costs.static_bytes, otypes=[object])(params)
        return ok & np.asarray(static + activations <= cap, dtype=bool)


class PieceMemory:
    """A piece's ledger figures per sample (what the engine counts: ModelSpec.piece_saved_bytes
    and stage_weight_bytes) for any first..last from prefix sums, as scalars or matrices.

    saved(first, last) = the first layer's input if it saves it + each layer's saved bytes
    + each output only the next layer saves (first..last-1) + the loss's on the last piece;
    weight(first, last) = saved(first, w) - tail(w) + the output gradients of first..w, with
    w the last layer with parameters up to `last` (0 when there is none from `first`).

    B's moment (ledger.backward_walk_bytes) is the running maximum, over the piece's layers
    l, of walk[l] = scratch[l] + (input[l] + output[l] + saved to l + handed to l - tail[l])
    x micro-batch, less (saved + handed to `last`) x micro-batch, plus a sent saved output."""

    def __init__(self, model):
        layers, n = model.layers, model.num_layers
        self.n, self.loss = n, model.loss_saved_bytes_per_sample
        self.input = np.array([x.input_bytes_per_sample if x.saves_input else 0 for x in layers], dtype=object)
        self.saved = _prefix([x.saved_bytes_per_sample for x in layers])
        self.handed = _prefix([x.output_bytes_per_sample if i + 1 < n and layers[i + 1].saves_input
                               and not x.saves_output else 0 for i, x in enumerate(layers)])
        self.grads = _prefix([x.output_grad_bytes_per_sample for x in layers])
        self.tail = np.array([x.tail_saved_bytes_per_sample for x in layers], dtype=object)
        weighted, previous = [], -1
        for i, x in enumerate(layers):
            previous = i if x.params else previous
            weighted.append(previous)
        self.weighted = np.array(weighted)
        self.outputs = np.array([x.output_bytes_per_sample for x in layers], dtype=object)
        self.saves_output = np.array([int(x.saves_output) for x in layers], dtype=object)
        self.walk = np.array([x.input_bytes_per_sample + x.output_bytes_per_sample - x.tail_saved_bytes_per_sample
                              for x in layers], dtype=object) + self.saved[1:] + self.handed[:-1]
        self.scratch_fixed = np.array([x.backward_scratch_bytes for x in layers], dtype=object)
        self.scratch_per_sample = np.array([x.backward_scratch_bytes_per_sample for x in layers], dtype=object)
        self.total = int(self.saved[-1] + self.handed[-1] + self.grads[-1] + max(self.input) + self.loss)

    def _saved(self, dtype, firsts: np.ndarray, lasts: np.ndarray):
        return (self.input.astype(dtype)[firsts][:, None] + _spans(self.saved, dtype, firsts, lasts)
                + _spans(self.handed, dtype, firsts, lasts - 1))

    def _scratch(self, mbs: int, dtype) -> np.ndarray:
        return np.maximum(self.scratch_fixed, self.scratch_per_sample * mbs).astype(dtype)

    def weight_pass(self, firsts: np.ndarray, lasts: np.ndarray, mbs: int, dtype) -> np.ndarray:
        """ledger.weight_pass_bytes of each row's first..each of its lasts: the largest scratch
        of two neighbours l, l + 1 within it, or the one layer's."""
        scratch = self._scratch(mbs, dtype)
        pairs = np.concatenate((scratch[:-1] + scratch[1:], scratch[-1:]))  # the last has no neighbour
        one = lasts == firsts[:, None]
        paired = _running_max(pairs, firsts, np.where(one, firsts[:, None], lasts - 1))
        return np.where(one, scratch[firsts][:, None], paired)

    def backward_walk(self, firsts: np.ndarray, lasts: np.ndarray, mbs: int, sent: int, dtype) -> np.ndarray:
        """ledger.backward_walk_bytes of each row's first..each of its lasts."""
        values = self._scratch(mbs, dtype) + self.walk.astype(dtype) * mbs
        kept = self.outputs.astype(dtype)[lasts] * self.saves_output.astype(dtype)[lasts] * sent
        return (_running_max(values, firsts, lasts)
                - (self.saved.astype(dtype)[lasts + 1] + self.handed.astype(dtype)[lasts] - kept) * mbs)

    def spans(self, firsts: np.ndarray, lasts: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
        """(saved, weight) per sample for each row's first and each of its lasts."""
        saved = self._saved(dtype, firsts, lasts) + np.where(lasts == self.n - 1, self.loss, 0).astype(dtype)
        w = self.weighted[lasts]
        has = w >= firsts[:, None]
        w = np.where(has, w, firsts[:, None])
        kept = (self._saved(dtype, firsts, w) - self.tail.astype(dtype)[w]
                + _spans(self.grads, dtype, firsts, w))
        return saved, np.where(has, kept, 0).astype(dtype)


def _running_max(values: np.ndarray, firsts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """max(values[first..last]) for each row's first and each of its lasts (lasts >= first)."""
    offsets = lasts - firsts[:, None]
    span = np.arange(int(offsets.max()) + 1)
    rows = values[np.minimum(firsts[:, None] + span[None, :], len(values) - 1)]
    return np.take_along_axis(np.maximum.accumulate(rows, axis=1), offsets, axis=1)


def _spans(prefix: np.ndarray, dtype, firsts: np.ndarray, lasts: np.ndarray) -> np.ndarray:
    """prefix[last + 1] - prefix[first] for each row's first and each of its lasts."""
    values = prefix.astype(dtype)
    return values[lasts + 1] - values[firsts][:, None]


def _prefix(values: list[int]) -> np.ndarray:
    """Integer prefix sums (object dtype: exact for any size)."""
    out = np.zeros(len(values) + 1, dtype=object)
    out[1:] = np.cumsum(np.array(values, dtype=object))
    return out
