"""The simpy simulation of one training step, and the choice of path.

`simulate` resolves every cost once (fastpath.resolve), tries the exact fast
path (a longest path over the action graph) and runs the event simulation
only when the fast path is not exact: when two transfers would overlap on a
link, or the cost model declares inputs that change during the run.

The event simulation: one process per rank walks its actions in the lowered
order (compact.py holds it as arrays): a RECV waits for its message, a compute
action (F, B, I, W) takes its cost, a SEND puts the message on its link. A
link carries one message at a time, first come first served: a message starts
when it is sent or when the link's previous message has arrived, whichever is
later, so no process or Resource is needed per message (a link's "free at"
time is the queue). Sending never blocks the sender. After its last action a
rank waits for its sends and runs its optimizer step.

A rank keeps its own clock and yields to simpy only where another rank can
change what happens next: when its message has not been sent yet, and before
it sends on a link that more than one rank sends on (so that requests reach
the link in time order); with run-time cost inputs, before every action.

Memory ledger per (piece, micro-batch): F holds what the piece saves for
backward (on the last piece, the loss's saved tensors too: ModelSpec.piece_saved_bytes);
B frees it; I swaps it for what W still needs (each layer's input and its output
gradient, ModelSpec.stage_weight_bytes), which W frees. That is the saved-activation
ledger (the timeline's memory samples); a rank's peak memory is its static bytes plus
the peak of the step ledger (ledger.py), which also holds receive buffers, sent
messages and the input and target copies.

A piece that recomputes its activations (``recompute``) holds only its input from
F on; B and I run the forward again first (their time includes an F), and the
re-forward's saved tensors join the ledger as they start; B frees everything, I
leaves what W needs (W then uses what I kept and recomputes nothing).

Two costs depend on what happens during the step, and only the event simulation has the
first: a message that needs MPI's rendezvous moves only once the receiver and then the
sender reach an MPI call (des.py); an action that waited for its message costs the cold
start more (its weights came back into cache; both paths).

Knows nothing of FLOPs or torch: every duration comes from the CostModel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

from .costs import CostModel
from .lowering import LoweredSchedule
from .model import LayerSpec, ModelSpec
from .partition import Partition
from .schedule import Kind, MessageKey, Schedule


@dataclass(frozen=True)
class StageShape:
    """What the engine needs to know of one piece's layers."""

    layers: tuple[LayerSpec, ...]
    params: int
    saved_bytes_per_sample: int
    weight_bytes_per_sample: int  # held from I until W
    input_bytes_per_sample: int
    output_bytes_per_sample: int
    recomputed: bool = False  # holds only its input from F until B or I, which run F again
    loss_bytes_per_sample: int = 0  # the loss's saved tensors (last piece): held from F, recomputed or not
    target_bytes_per_sample: int = 0  # the last piece's target (ModelSpec.target_bytes_per_sample)
    loss_backward_bytes_per_sample: int = 0  # the last piece (ModelSpec.loss_backward_bytes_per_sample)


def stage_shapes(model: ModelSpec, partition: Partition, recompute: tuple[int, ...] = ()) -> list[StageShape]:
    shapes = []
    for piece, (first, last) in enumerate(partition.bounds):
        layers = model.layers[first : last + 1]
        shapes.append(StageShape(
            layers=layers,
            params=sum(layer.params for layer in layers),
            saved_bytes_per_sample=model.piece_saved_bytes(first, last),
            weight_bytes_per_sample=model.stage_weight_bytes(first, last),
            input_bytes_per_sample=layers[0].input_bytes_per_sample,
            output_bytes_per_sample=layers[-1].output_bytes_per_sample,
            recomputed=piece in recompute,
            loss_bytes_per_sample=model.loss_saved_bytes_per_sample if last == model.num_layers - 1 else 0,
            target_bytes_per_sample=model.target_bytes_per_sample if last == model.num_layers - 1 else 0,
            loss_backward_bytes_per_sample=(model.loss_backward_bytes_per_sample
                                            if last == model.num_layers - 1 else 0),
        ))
    return shapes


def ledger_change(kind: Kind, shape: StageShape) -> tuple[int, int]:
    """Bytes per sample the ledger adds when `kind` starts and when it ends: F holds what the
    piece saves; B frees it; I swaps it for what W needs, which W frees. A recomputed piece's
    F holds only its input (and, on the last piece, the loss's saved tensors: the loss runs
    outside the checkpoint); its B and I bring back the rest of what F saves as they start."""
    held, extra = shape.saved_bytes_per_sample, 0
    if shape.recomputed:
        held = shape.input_bytes_per_sample + shape.loss_bytes_per_sample
        extra = shape.saved_bytes_per_sample - held + (0 if shape.layers[0].saves_input
                                                       else shape.input_bytes_per_sample)
    match kind:
        case Kind.F:
            return held, 0
        case Kind.B:
            return extra, -(held + extra)
        case Kind.I:
            return extra, shape.weight_bytes_per_sample - held - extra
        case Kind.W:
            return 0, -shape.weight_bytes_per_sample
        case Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return 0, 0
        case _:
            assert_never(kind)


def compute_s(costs: CostModel, shape: StageShape, kind: Kind, microbatch_size: int, rank: int) -> float:
    """An action's time on `rank`; B and I of a recomputed piece run its forward first."""
    seconds = costs.compute_s(shape.layers, kind, microbatch_size, rank=rank)
    if shape.recomputed and kind in (Kind.B, Kind.I):
        seconds += costs.compute_s(shape.layers, Kind.F, microbatch_size, rank=rank)
    return seconds


def role(kind: Kind) -> str:
    """What a rank process does with an action of this kind."""
    match kind:
        case Kind.RECV:
            return "receive"
        case Kind.SEND:
            return "send"
        case Kind.ALLREDUCE:
            return "all-reduce"
        case Kind.F | Kind.B | Kind.I | Kind.W:
            return "compute"
        case _:
            assert_never(kind)


def message_bytes_per_sample(key: MessageKey, shapes: list[StageShape]) -> int:
    """An activation is the input of the receiving piece; a gradient its output's size."""
    match key.direction:
        case Kind.F:
            return shapes[key.piece].input_bytes_per_sample
        case Kind.B:
            return shapes[key.piece].output_bytes_per_sample
        case Kind.I | Kind.W | Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            raise ValueError(f"a message is an activation (F) or a gradient (B), not {key.direction}")
        case _:
            assert_never(key.direction)


PATHS = ("auto", "fast", "des")


def simulate(
    schedule: Schedule | LoweredSchedule,
    partition: Partition,
    model: ModelSpec,
    costs: CostModel,
    microbatch_size: int,
    path: str = "auto",
    recompute: tuple[int, ...] = (),
    allreduce: bool = False,
):
    """Simulate one training step of `schedule`; returns an ArrayTimeline (a Timeline's
    interface) whose ``engine_path`` says which path produced it. ``path``: "auto" (the
    fast path where it is exact, else the event simulation), "fast" (None where it is
    not exact) or "des" (always the event simulation). ``recompute``: the pieces that recompute
    their activations (Plan.recompute)."""
    from .compact import blocked_ranks, compact
    from .fastpath import longest_path, resolve, runtime_inputs
    from .steparrays import ArrayTimeline

    schedule = schedule.schedule if isinstance(schedule, LoweredSchedule) else schedule
    if partition.num_stages != schedule.num_pieces:
        raise ValueError(f"partition has {partition.num_stages} pieces, schedule {schedule.num_pieces}")
    c = compact(schedule)
    if c.waves is None:
        raise RuntimeError(f"simulation ended with ranks {blocked_ranks(c)} blocked: schedule deadlocks")
    resolved = resolve(c, partition, model, costs, microbatch_size, recompute, allreduce)
    times, used = None, "des"
    if path != "des" and not runtime_inputs(costs) and not resolved.handshakes:
        times, used = longest_path(c, resolved), "fast"
    if times is None and path == "fast":
        return None
    if times is None:
        from .des import run_des

        times, used = run_des(c, resolved, partition, model, costs, microbatch_size, recompute), "des"
    return ArrayTimeline(c, times, resolved.ledger_start_bytes, resolved.ledger_end_bytes,
                         resolved.static_bytes, "simulated", used, resolved.step_peak_bytes)
