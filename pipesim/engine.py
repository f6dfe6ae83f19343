"""The simpy simulation of one training step.

One process per rank walks its action list; each input (activation or
gradient) is an event that a transfer process triggers when the message has
crossed its link. A link is a simpy Resource of capacity one: transfers that
share it are serialised. Sending never blocks the sender. After its last
action a rank runs its optimizer step.

Knows nothing of FLOPs or torch: every duration comes from the CostModel.
"""

from __future__ import annotations

from dataclasses import dataclass

import simpy

from .costs import CostModel
from .model import LayerSpec, ModelSpec
from .partition import Partition
from .schedule import BACKWARD, FORWARD, Action, Schedule
from .timeline import SENDS, MemorySample, Span, Timeline


@dataclass(frozen=True)
class StageShape:
    """What the engine needs to know of one stage's layers."""

    layers: tuple[LayerSpec, ...]
    params: int
    saved_bytes_per_sample: int
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
            input_bytes_per_sample=layers[0].input_bytes_per_sample,
            output_bytes_per_sample=layers[-1].output_bytes_per_sample,
        ))
    return shapes


class _Step:
    """State of one simulated step: the environment, inputs, links and records."""

    def __init__(self, schedule, partition, model, costs, microbatch_size):
        self.env = simpy.Environment()
        self.schedule = schedule
        self.costs = costs
        self.microbatch_size = microbatch_size
        self.shapes = stage_shapes(model, partition)
        self.inputs: dict[Action, simpy.Event] = {}
        self.links: dict[object, simpy.Resource] = {}
        self.spans: list[Span] = []
        self.memory: list[MemorySample] = []
        self.finished = [False] * schedule.num_ranks

    def input_ready(self, action: Action) -> simpy.Event:
        """The event of the message that `action` needs from another rank."""
        if action not in self.inputs:
            self.inputs[action] = self.env.event()
        return self.inputs[action]

    def needs_message(self, action: Action) -> bool:
        last = self.schedule.num_stages - 1
        return (action.kind == FORWARD and action.stage > 0) or (
            action.kind == BACKWARD and action.stage < last)

    def rank(self, rank: int):
        """The process of one rank: its actions in order, then the optimizer step."""
        env, mb_size = self.env, self.microbatch_size
        held = 0
        outgoing = []
        for action in self.schedule.ranks[rank]:
            stage, kind, mb = action
            shape = self.shapes[stage]
            if self.needs_message(action):
                waited_from = env.now
                yield self.input_ready(action)
                if env.now > waited_from:
                    peer = self.schedule.rank_of_stage(stage - 1 if kind == FORWARD else stage + 1)
                    self.spans.append(Span(rank, "wait", waited_from, env.now, stage, mb, peer, kind))
            start = env.now
            if kind == FORWARD:
                held += shape.saved_bytes_per_sample * mb_size
                self.memory.append(MemorySample(rank, start, held))
            yield env.timeout(self.costs.compute_s(shape.layers, kind, mb_size, rank=rank))
            self.spans.append(Span(rank, kind, start, env.now, stage, mb))
            if kind == BACKWARD:
                held -= shape.saved_bytes_per_sample * mb_size
                self.memory.append(MemorySample(rank, env.now, held))
            outgoing += self.send_result(rank, action)
        waited_from = env.now
        yield simpy.AllOf(env, outgoing)  # like the runner: sends complete before the step
        if env.now > waited_from:
            self.spans.append(Span(rank, "wait", waited_from, env.now, direction=SENDS))
        start = env.now
        params = sum(self.shapes[s].params for s in range(self.schedule.num_stages)
                     if self.schedule.rank_of_stage(s) == rank)
        yield env.timeout(self.costs.optimizer_s(params, rank=rank))
        self.spans.append(Span(rank, "optimizer", start, env.now))
        self.finished[rank] = True

    def send_result(self, rank: int, action: Action) -> list:
        """Start the transfer of what `action` produced, if another rank needs it."""
        stage, kind, mb = action
        if kind == FORWARD and stage < self.schedule.num_stages - 1:
            nbytes = self.shapes[stage].output_bytes_per_sample * self.microbatch_size
            return [self.env.process(self.transfer(rank, Action(stage + 1, FORWARD, mb), nbytes))]
        if kind == BACKWARD and stage > 0:
            nbytes = self.shapes[stage].input_bytes_per_sample * self.microbatch_size
            return [self.env.process(self.transfer(rank, Action(stage - 1, BACKWARD, mb), nbytes))]
        return []

    def transfer(self, src: int, consumer: Action, nbytes: int):
        """Carry a message over the (serialised) link to the rank of `consumer`."""
        dst = self.schedule.rank_of_stage(consumer.stage)
        link_id = self.costs.link_id(src, dst)
        if link_id not in self.links:
            self.links[link_id] = simpy.Resource(self.env, capacity=1)
        with self.links[link_id].request() as turn:
            yield turn
            start = self.env.now
            yield self.env.timeout(self.costs.transfer_s(src, dst, nbytes))
        sending_stage = consumer.stage - 1 if consumer.kind == FORWARD else consumer.stage + 1
        self.spans.append(Span(src, "send", start, self.env.now, sending_stage,
                               consumer.microbatch, dst, consumer.kind))
        self.input_ready(consumer).succeed()


def simulate(
    schedule: Schedule,
    partition: Partition,
    model: ModelSpec,
    costs: CostModel,
    microbatch_size: int,
) -> Timeline:
    """Simulate one training step of `schedule` and return its timeline."""
    if partition.num_stages != schedule.num_stages:
        raise ValueError(f"partition has {partition.num_stages} stages, schedule {schedule.num_stages}")
    step = _Step(schedule, partition, model, costs, microbatch_size)
    for rank in range(schedule.num_ranks):
        step.memory.append(MemorySample(rank, 0.0, 0))
        step.env.process(step.rank(rank))
    step.env.run()
    stuck = [r for r, done in enumerate(step.finished) if not done]
    if stuck:
        raise RuntimeError(f"simulation ended with ranks {stuck} blocked: schedule deadlocks")
    static = [0] * schedule.num_ranks
    for stage, shape in enumerate(step.shapes):
        static[schedule.rank_of_stage(stage)] += costs.static_bytes(shape.params)
    spans = sorted(step.spans, key=lambda s: (s.start_s, s.rank))
    return Timeline(schedule.num_ranks, tuple(spans), tuple(step.memory), tuple(static), "simulated")
