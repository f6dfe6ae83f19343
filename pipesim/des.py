"""The event simulation (simpy) over a compact schedule; see engine.py for the model.

Each rank is one simpy process with its own clock ``t`` (never behind
``env.now``). It yields only to wait for a message not yet sent (the sender
wakes it with the arrival time), to bring ``env.now`` up to ``t`` before a
SEND on a link that several ranks send on (so that a link's messages are
queued in the order they are sent, ties in event order), and, for a cost
model with run-time inputs, before each action, whose cost it then asks for.
A link's queue is its "free at" time: first come, first served.
"""

from __future__ import annotations

import numpy as np
import simpy

from .compact import KINDS, CompactSchedule
from .costs import CostModel
from .fastpath import Resolved, runtime_inputs
from .model import ModelSpec
from .partition import Partition
from .steparrays import StepArrays


def run_des(c: CompactSchedule, costs: Resolved, partition: Partition, model: ModelSpec,
            cost_model: CostModel, microbatch_size: int, recompute: tuple[int, ...] = ()) -> StepArrays:
    n = c.num_nodes
    env = simpy.Environment()
    cross = c.cross
    # per node: the message it receives (indexed by the receiving node) and the one it sends
    receives = cross.tolist()
    sends = [-1] * n
    for i, j in zip(np.flatnonzero(cross).tolist(), c.producer[cross].tolist()):
        sends[j] = i
    link, message_s, duration = costs.link.tolist(), costs.message_s.tolist(), costs.duration_s.tolist()
    senders: dict[int, set[int]] = {}
    for i in np.flatnonzero(cross).tolist():
        senders.setdefault(link[i], set()).add(int(c.rank[c.producer[i]]))
    shared = {code for code, ranks in senders.items() if len(ranks) > 1}
    free_at: dict[int, float] = {}
    start, end = [0.0] * n, [0.0] * n
    send_start, arrival = [float("nan")] * n, [float("nan")] * n
    waiting: dict[int, simpy.Event] = {}
    ask = _asker(c, partition, model, cost_model, microbatch_size, recompute) if runtime_inputs(cost_model) else None

    def rank_process(r: int):
        t = 0.0
        for k in range(int(c.offsets[r]), int(c.offsets[r + 1])):
            if receives[k]:
                if arrival[k] != arrival[k]:  # nan: not sent yet
                    event = waiting[k] = env.event()
                    yield event
                t = max(t, arrival[k])
            if ask is not None:
                if t > env.now:
                    yield env.timeout(t - env.now)
                duration[k] = ask(k)
            start[k] = t
            t += duration[k]
            end[k] = t
            i = sends[k]
            if i >= 0:
                code = link[i]
                if code in shared and t > env.now:
                    yield env.timeout(t - env.now)
                begin = max(t, free_at.get(code, t))
                free_at[code] = arrival[i] = begin + message_s[i]
                send_start[i] = begin
                if i in waiting:
                    waiting.pop(i).succeed()

    for r in range(c.schedule.num_ranks):
        env.process(rank_process(r))
    env.run()
    return StepArrays(np.array(start), np.array(end), np.array(send_start), np.array(arrival),
                      costs.optimizer_s)


def _asker(c: CompactSchedule, partition: Partition, model: ModelSpec, cost_model: CostModel,
           microbatch_size: int, recompute: tuple[int, ...] = ()):
    """Per-action cost, asked when the action starts (for cost models with run-time inputs)."""
    from .engine import compute_s, stage_shapes

    shapes = stage_shapes(model, partition, recompute)

    def ask(k: int) -> float:
        piece = int(c.piece[k])
        return compute_s(cost_model, shapes[piece], KINDS[int(c.kind[k])], microbatch_size, int(c.rank[k]))
    return ask
