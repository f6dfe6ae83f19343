"""The step's memory ledger: every buffer a rank holds during one step, not only what
autograd saves for backward (engine.ledger_change counts that part alone).

What the runner (runner/interpreter.py) holds, per rank, in bytes:

- from the step's start to its end: the input copies (the rank holding piece 0)
  and the target copies (the rank holding the last piece), a whole batch each;
- a receive buffer for every RECV, posted at the step's start: an activation
  (input of the receiving piece) is held until the piece's B (or W) frees what
  it saved, a gradient until the B (or I) that consumes it;
- what F saves for backward (its input not twice: it is the receive buffer or
  an input copy already counted), freed by B, or swapped by I for what W needs;
- every message sent, held until the step's end (the runner waits for its sends
  there): an F output that its last layer saved stays after B frees the rest; an
  input gradient made by B (or I) is new;
- with data parallelism, from each piece's all-reduce to the step's end, a scratch
  buffer of its gradient's size: Open MPI's all-reduce allocates one per call (measured:
  the RSS of p1 D2 fc32 ranks exceeded the ledger by 32 MiB, its gradient).

A hand-off between two pieces of one rank is no message; there the piece's input
is counted as before (inside what F saves). Each action also holds temporaries
for a moment (`transient_bytes`), added to the peak, not to what stays. A backward walks
the piece's layers from the last: at each, its scratch (a weight gradient made whole
before it is added into .grad, LayerSpec.scratch_bytes) and the gradients at its input and
output, less what autograd has freed of the later layers' saved tensors by then
(`backward_walk_bytes`): a large layer low in the piece can set the peak.
The allocator's own slack (page rounding, small blocks) is not in the ledger;
the validation report compares it with what the runner's memory probe measured
(runner/memory_probe.py).

Memory changes only at a rank's own actions, so a rank's peak follows from its
action order alone: no times are needed.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, assert_never

from .model import FLOAT32_BYTES
from .schedule import Kind, Schedule


@dataclass(frozen=True)
class PieceBuffers:
    """Bytes of one piece for one micro-batch, and how its input and output travel.
    Flags are 0 or 1 (or arrays of them, and the bytes arrays: stagecosts.py asks for
    many layer ranges at once), so the ledger below is plain arithmetic."""

    input_bytes: Any
    output_bytes: Any
    saved_bytes: Any  # what F saves (engine.StageShape.saved_bytes_per_sample x micro-batch size)
    weight_bytes: Any  # what I keeps for W
    input_saved: Any  # 1: the first layer saves its input (so saved_bytes includes it)
    output_saved: Any  # 1: the last layer saves its output
    input_received: int  # 1: from another rank (a receive buffer); its input gradient is then sent back
    output_sent: int  # 1: to another rank; its output gradient then arrives in a receive buffer
    first: int  # 1: piece 0, whose input is an input copy
    backward_bytes: Any = 0  # what B holds for a moment at its peak (backward_walk_bytes)
    scratch_bytes: Any = 0  # W's moment (weight_pass_bytes)
    top_input_bytes: Any = 0  # the last layer's input and output, one micro-batch
    top_output_bytes: Any = 0
    recomputed: int = 0  # 1: F keeps only the input (and the loss's saved tensors); B or I runs F again
    loss_bytes: Any = 0  # the loss's saved tensors (inside saved_bytes), the last piece
    loss_backward_bytes: Any = 0  # what the loss's backward holds for a moment, the last piece
    param_bytes: Any = 0  # all its parameters: an all-reduce's scratch buffer is one gradient

    @property
    def held_input_bytes(self) -> Any:
        """The input's bytes inside saved_bytes that a buffer already counts."""
        return self.input_bytes * self.input_saved * max(self.input_received, self.first)


def backward_walk_bytes(layers: Sequence, microbatch_size: int, output_sent: int) -> int:
    """What a piece's B holds for a moment at its peak, over what the ledger held as it
    started: walking its layers from the last, at each layer its scratch and the gradients
    at its input and output (one micro-batch), less what autograd has freed by then: the
    saved tensors of the layers after it, and its own tail (e.g. its ReLU's result), except
    an output a send still holds. The loss's saved tensors, which the loss's backward frees
    before any layer's, are taken off in transient_bytes."""
    top = layers[-1]
    kept = top.output_bytes_per_sample if output_sent and top.saves_output else 0
    freed, values = 0, []
    for i in range(len(layers) - 1, -1, -1):
        x = layers[i]
        if i + 1 < len(layers):
            after = layers[i + 1]
            freed += after.saved_bytes_per_sample
            if after.saves_input and not x.saves_output:  # held only for the next layer
                freed += x.output_bytes_per_sample
        gone = freed + x.tail_saved_bytes_per_sample - kept
        values.append(x.scratch_bytes(microbatch_size) + microbatch_size * (
            x.input_bytes_per_sample + x.output_bytes_per_sample - gone))
    return max(values)


def weight_pass_bytes(layers: Sequence, microbatch_size: int) -> int:
    """What a piece's W holds for a moment: torch's stage_backward_weight computes one layer's
    weight gradients, adds them into .grad and goes on to the next layer while still holding
    the previous layer's (its loop variable), so two neighbours' scratch at once."""
    scratch = [x.scratch_bytes(microbatch_size) for x in layers]
    return max((a + b for a, b in itertools.pairwise(scratch)), default=scratch[0])


def piece_buffers(schedule: Schedule, shapes: Sequence, microbatch_size: int) -> list[PieceBuffers]:
    """`shapes`: engine.StageShape per piece."""
    last = schedule.num_pieces - 1
    out = []
    for piece, shape in enumerate(shapes):
        rank = schedule.rank_of(piece)
        top = shape.layers[-1]
        sent = int(piece < last and schedule.rank_of(piece + 1) != rank)
        out.append(PieceBuffers(
            input_bytes=shape.input_bytes_per_sample * microbatch_size,
            output_bytes=shape.output_bytes_per_sample * microbatch_size,
            saved_bytes=shape.saved_bytes_per_sample * microbatch_size,
            weight_bytes=shape.weight_bytes_per_sample * microbatch_size,
            input_saved=int(shape.layers[0].saves_input),
            output_saved=int(top.saves_output),
            input_received=int(piece > 0 and schedule.rank_of(piece - 1) != rank),
            output_sent=sent,
            first=int(piece == 0),
            backward_bytes=backward_walk_bytes(shape.layers, microbatch_size, sent),
            scratch_bytes=weight_pass_bytes(shape.layers, microbatch_size),
            param_bytes=shape.params * FLOAT32_BYTES,
            top_input_bytes=top.input_bytes_per_sample * microbatch_size,
            top_output_bytes=top.output_bytes_per_sample * microbatch_size,
            recomputed=int(shape.recomputed),
            loss_bytes=shape.loss_bytes_per_sample * microbatch_size,
            loss_backward_bytes=shape.loss_backward_bytes_per_sample * microbatch_size,
        ))
    return out


def _saved_split(b: PieceBuffers) -> tuple[Any, Any, Any]:
    """(what B frees of what the piece saved, what F holds of it, what B or I brings back
    as it starts): all at F, nothing brought, unless the piece is recomputed."""
    saved = b.saved_bytes - b.held_input_bytes  # its buffered input aside
    if not b.recomputed:
        return saved, saved, 0
    buffered = max(b.input_received, b.first)
    saved = b.saved_bytes + b.input_bytes * (1 - b.input_saved) - b.input_bytes * buffered
    at_f = b.input_bytes * (1 - buffered) + b.loss_bytes
    return saved, at_f, saved - at_f


def action_change_bytes(kind: Kind, b: PieceBuffers) -> tuple[Any, Any]:
    """Bytes the step ledger adds when an action of `kind` on piece `b` starts and when it ends.
    A recomputed piece (engine.ledger_change) keeps its input from F (in its
    buffer, if it has one) and the loss's saved tensors; B and I bring the rest back as they start."""
    saved, at_f, brought = _saved_split(b)
    grad_received = b.output_bytes * b.output_sent  # its receive buffer, freed here
    grad_sent = b.input_bytes * b.input_received  # made here, held to the step's end
    input_buffer = b.input_bytes * b.input_received  # freed with what the piece saved
    output_kept = b.output_bytes * b.output_sent * b.output_saved  # a sent output B does not free
    match kind:
        case Kind.F:
            return at_f, b.output_bytes * b.output_sent * (1 - b.output_saved)
        case Kind.B:
            return brought, -saved - input_buffer + output_kept - grad_received + grad_sent
        case Kind.I:
            kept = b.weight_bytes - b.held_input_bytes
            return brought, kept - saved + output_kept - grad_received + grad_sent
        case Kind.W:
            return 0, -(b.weight_bytes - b.held_input_bytes) - input_buffer
        case Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return 0, 0
        case _:
            assert_never(kind)


def transient_bytes(kind: Kind, b: PieceBuffers) -> Any:
    """What an action holds for a moment on top of the ledger, at its peak. F: the last
    layer's output before its activation function. B: the walk down its layers
    (backward_walk_bytes). I: the last layer's gradients at its output and its input; once
    the activation's backward has run, autograd frees the output the layer saved, unless a
    send still holds it. B and I of the last piece begin with the loss's backward, which may
    hold more, and which frees the loss's saved tensors before the layers' backward (and,
    in a recomputed piece, before the piece's forward runs again: before what B brings back).
    W: two neighbouring layers' weight gradients (weight_pass_bytes)."""
    import numpy as np

    freed = b.top_output_bytes * b.output_saved * (1 - b.output_sent)
    loss = b.loss_backward_bytes - _saved_split(b)[2]  # relative to the ledger after B's start
    match kind:
        case Kind.F:
            return b.top_output_bytes
        case Kind.B:
            return np.maximum(b.backward_bytes - b.loss_bytes, loss)
        case Kind.I:
            return np.maximum(b.top_input_bytes + b.top_output_bytes - freed - b.loss_bytes, loss)
        case Kind.W:
            return b.scratch_bytes
        case Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return 0
        case _:
            assert_never(kind)


def piece_start_bytes(b: PieceBuffers, num_microbatches: int, input_copy: Any = 0, target_copy: Any = 0) -> Any:
    """What a piece holds once the step has begun: its receive buffers, and the batch's input
    copy (piece 0) or target copy (the last piece) when given."""
    return (num_microbatches * (b.input_bytes * b.input_received + b.output_bytes * b.output_sent)
            + input_copy + target_copy)


def walk_peak_bytes(actions: Sequence[tuple[Kind, PieceBuffers]], initial: Any) -> Any:
    """The most held along (kind, piece) actions in order, from `initial` bytes."""
    import numpy as np

    held = peak = initial
    for kind, b in actions:
        if kind == Kind.ALLREDUCE:  # MPI's scratch for the gradient, until the step's end
            held = held + b.param_bytes
            peak = np.maximum(peak, held)
            continue
        if kind in (Kind.SEND, Kind.RECV):
            continue
        at_start, at_end = action_change_bytes(kind, b)
        held = held + at_start
        peak = np.maximum(peak, held + transient_bytes(kind, b))
        held = held + at_end
        peak = np.maximum(peak, held)
    return peak


def step_peak_bytes(schedule: Schedule, shapes: Sequence, microbatch_size: int, batch_size: int,
                    allreduce: bool = False) -> tuple[int, ...]:
    """Per rank: the most the step ledger holds (static bytes not included); `allreduce`:
    each piece's gradient all-reduce after its last B or W (data parallelism)."""
    from .schedule import gradients_ready

    buffers = piece_buffers(schedule, shapes, microbatch_size)
    ready = gradients_ready(schedule) if allreduce else {}
    last = schedule.num_pieces - 1
    inputs = shapes[0].input_bytes_per_sample * batch_size
    targets = shapes[-1].target_bytes_per_sample * batch_size
    peaks = []
    for rank in range(schedule.num_ranks):
        initial = sum(piece_start_bytes(buffers[s], schedule.num_microbatches, inputs if s == 0 else 0,
                                        targets if s == last else 0) for s in schedule.pieces_of(rank))
        actions = []
        for position, a in enumerate(schedule.ranks[rank]):
            actions.append((a.kind, buffers[a.piece]))
            if ready.get(a.piece) == position:
                actions.append((Kind.ALLREDUCE, buffers[a.piece]))
        peaks.append(int(walk_peak_bytes(actions, initial)))
    return tuple(peaks)


def saved_peak_bytes(schedule: Schedule, shapes: Sequence, microbatch_size: int) -> tuple[int, ...]:
    """Per rank: the most it holds of what autograd saves (the saved-activation accounting,
    which the runner's saved-tensor hooks count)."""
    from .engine import ledger_change

    peaks = []
    for actions in schedule.ranks:
        held = peak = 0
        for action in actions:
            if action.kind in (Kind.SEND, Kind.RECV, Kind.ALLREDUCE):
                continue
            for change in ledger_change(action.kind, shapes[action.piece]):
                held += change * microbatch_size
                peak = max(peak, held)
        peaks.append(peak)
    return tuple(peaks)
