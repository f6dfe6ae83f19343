"""The simpy engine as it was before issue 13 (one process and Resource per message,
costs looked up per action, one Span per action), kept as the reference the
fast engine and the fast path are compared against (tests/test_fastpath.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import assert_never

import simpy

from pipesim.costs import CostModel
from pipesim.lowering import LoweredSchedule, lower
from pipesim.model import LayerSpec, ModelSpec
from pipesim.partition import Partition
from pipesim.schedule import Action, Kind, MessageKey, Schedule
from pipesim.timeline import SENDS, MemorySample, Span, Timeline


@dataclass(frozen=True)
class StageShape:
    """What the engine needs to know of one piece's layers."""

    layers: tuple[LayerSpec, ...]
    params: int
    saved_bytes_per_sample: int
    weight_bytes_per_sample: int  # held from I until W
    input_bytes_per_sample: int
    output_bytes_per_sample: int


def stage_shapes(model: ModelSpec, partition: Partition) -> list[StageShape]:
    shapes = []
    for first, last in partition.bounds:
        layers = model.layers[first : last + 1]
        shapes.append(StageShape(
            layers=layers,
            params=sum(layer.params for layer in layers),
            saved_bytes_per_sample=model.stage_saved_bytes(first, last),
            weight_bytes_per_sample=model.stage_weight_bytes(first, last),
            input_bytes_per_sample=layers[0].input_bytes_per_sample,
            output_bytes_per_sample=layers[-1].output_bytes_per_sample,
        ))
    return shapes


def ledger_change(kind: Kind, shape: StageShape) -> tuple[int, int]:
    """Bytes per sample the ledger adds when `kind` starts and when it ends."""
    match kind:
        case Kind.F:
            return shape.saved_bytes_per_sample, 0
        case Kind.B:
            return 0, -shape.saved_bytes_per_sample
        case Kind.I:
            return 0, shape.weight_bytes_per_sample - shape.saved_bytes_per_sample
        case Kind.W:
            return 0, -shape.weight_bytes_per_sample
        case Kind.SEND | Kind.RECV | Kind.ALLREDUCE:
            return 0, 0
        case _:
            assert_never(kind)


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


class _Step:
    """State of one simulated step: the environment, messages, links and records."""

    def __init__(self, lowered: LoweredSchedule, partition, model, costs, microbatch_size):
        self.env = simpy.Environment()
        self.lowered = lowered
        self.costs = costs
        self.microbatch_size = microbatch_size
        self.shapes = stage_shapes(model, partition)
        self.messages: dict[MessageKey, simpy.Event] = {}
        self.links: dict[object, simpy.Resource] = {}
        self.spans: list[Span] = []
        self.memory: list[MemorySample] = []
        self.held = [0] * lowered.num_ranks
        self.finished = [False] * lowered.num_ranks

    def arrived(self, key: MessageKey) -> simpy.Event:
        if key not in self.messages:
            self.messages[key] = self.env.event()
        return self.messages[key]

    def rank(self, rank: int):
        """The process of one rank: its lowered actions in order, then the optimizer step."""
        outgoing = []
        for action in self.lowered.ranks[rank]:
            match role(action.kind):
                case "receive":
                    yield from self.receive(rank, action)
                case "send":
                    outgoing.append(self.env.process(self.transfer(rank, action)))
                case "compute":
                    yield from self.compute(rank, action)
        waited_from = self.env.now
        yield simpy.AllOf(self.env, outgoing)  # like the runner: sends complete before the step
        if self.env.now > waited_from:
            self.spans.append(Span(rank, "wait", waited_from, self.env.now, direction=SENDS))
        start = self.env.now
        schedule = self.lowered.schedule
        params = sum(self.shapes[s].params for s in schedule.pieces_of(rank))
        yield self.env.timeout(self.costs.optimizer_s(params, rank=rank))
        self.spans.append(Span(rank, "optimizer", start, self.env.now))
        self.finished[rank] = True

    def receive(self, rank: int, action: Action):
        waited_from = self.env.now
        yield self.arrived(self.lowered.key(action))
        if self.env.now > waited_from:
            self.spans.append(Span(rank, "wait", waited_from, self.env.now, action.piece, action.microbatch,
                                   action.peer, str(action.direction)))

    def compute(self, rank: int, action: Action):
        shape, env = self.shapes[action.piece], self.env
        at_start, at_end = ledger_change(action.kind, shape)
        start = env.now
        if at_start:
            self.held[rank] += at_start * self.microbatch_size
            self.memory.append(MemorySample(rank, start, self.held[rank]))
        yield env.timeout(self.costs.compute_s(shape.layers, action.kind, self.microbatch_size, rank=rank))
        self.spans.append(Span(rank, str(action.kind), start, env.now, action.piece, action.microbatch))
        if at_end:
            self.held[rank] += at_end * self.microbatch_size
            self.memory.append(MemorySample(rank, env.now, self.held[rank]))

    def transfer(self, src: int, action: Action):
        """Carry a message over the (serialised) link to its peer."""
        key, dst = self.lowered.key(action), action.peer
        nbytes = message_bytes_per_sample(key, self.shapes) * self.microbatch_size
        link_id = self.costs.link_id(src, dst)
        if link_id not in self.links:
            self.links[link_id] = simpy.Resource(self.env, capacity=1)
        with self.links[link_id].request() as turn:
            yield turn
            start = self.env.now
            yield self.env.timeout(self.costs.transfer_s(src, dst, nbytes))
        self.spans.append(Span(src, "send", start, self.env.now, action.piece, action.microbatch, dst,
                               str(action.direction)))
        self.arrived(key).succeed()


def simulate(
    schedule: Schedule | LoweredSchedule,
    partition: Partition,
    model: ModelSpec,
    costs: CostModel,
    microbatch_size: int,
) -> Timeline:
    """Simulate one training step of `schedule` (lowered here unless it already is)."""
    lowered = schedule if isinstance(schedule, LoweredSchedule) else lower(schedule)
    schedule = lowered.schedule
    if partition.num_stages != schedule.num_pieces:
        raise ValueError(f"partition has {partition.num_stages} pieces, schedule {schedule.num_pieces}")
    step = _Step(lowered, partition, model, costs, microbatch_size)
    for rank in range(schedule.num_ranks):
        step.memory.append(MemorySample(rank, 0.0, 0))
        step.env.process(step.rank(rank))
    step.env.run()
    stuck = [r for r, done in enumerate(step.finished) if not done]
    if stuck:
        raise RuntimeError(f"simulation ended with ranks {stuck} blocked: schedule deadlocks")
    static = [0] * schedule.num_ranks
    for piece, shape in enumerate(step.shapes):
        static[schedule.rank_of(piece)] += costs.static_bytes(shape.params)
    spans = sorted(step.spans, key=lambda s: (s.start_s, s.rank))
    return Timeline(schedule.num_ranks, tuple(spans), tuple(step.memory), tuple(static), "simulated")
