"""The event simulation (simpy) over a compact schedule; see engine.py for the model.

Each rank is one simpy process with its own clock ``t`` (never behind
``env.now``). It yields only to wait for a message not yet sent (the sender
wakes it with the arrival time), to bring ``env.now`` up to ``t`` before a
SEND on a link that several ranks send on (so that a link's messages are
queued in the order they are sent, ties in event order), and, for a cost
model with run-time inputs, before each action, whose cost it then asks for.
A link's queue is its "free at" time: first come, first served.

A message that needs MPI's rendezvous (Resolved.handshake_s, from a link's
``rendezvous_bytes``) is not put on its link by its sender. A handshake process
carries it: the announcement reaches the receiver after one control-message
time; the receiver matches it at its next MPI call (at once when it is waiting
or between actions, else when its current compute action ends, where the
runner tests its requests); the reply reaches the sender after another control
time; the sender pushes the data at its next MPI call; only then does the
message queue for its link. An action that takes a message starts inside MPI
(the runner tests the receive first) for ``mpi_window_s``, the per-action
overhead: a reply that comes back within it is taken at once. To know what a rank is doing "now", every rank
then yields before every action (lock step), as with run-time cost inputs.

An action that had to wait for its message costs ``Resolved.cold_s`` more (its weights
came back into cache), as on the fast path.
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
    handshake: list[float] = costs.handshake_s.tolist() if costs.handshake_s is not None else []
    lock_step = ask is not None or costs.handshakes
    window = costs.mpi_window_s
    cold = costs.cold_s.tolist() if costs.cold_s is not None else [0.0] * n
    if costs.handshakes:
        shared = set(link)  # every send in time order: queued and handshaken messages share links
    busy = [(0.0, 0.0)] * c.schedule.num_ranks  # per rank: its compute action that started last

    def put_on_link(i: int, t: float) -> None:
        code = link[i]
        begin = max(t, free_at.get(code, t))
        free_at[code] = arrival[i] = begin + message_s[i]
        send_start[i] = begin
        if i in waiting:
            waiting.pop(i).succeed()

    def next_mpi_call(r: int):
        """Wait until rank r is in an MPI call: now, unless a compute action it started
        before now is still running (then its end, where the runner tests its requests)."""
        began, ends = busy[r]
        if began < env.now < ends:
            yield env.timeout(ends - env.now)

    def rendezvous(i: int, sender: int, receiver: int, sent: float):
        yield env.timeout(sent + handshake[i] - env.now)  # the announcement reaches the receiver
        yield from next_mpi_call(receiver)  # which matches it and replies
        yield env.timeout(handshake[i])
        yield from next_mpi_call(sender)  # which pushes the data
        put_on_link(i, env.now)

    def rank_process(r: int):
        t = 0.0
        for k in range(int(c.offsets[r]), int(c.offsets[r + 1])):
            waited = False
            if receives[k]:
                if arrival[k] != arrival[k]:  # nan: not sent yet
                    event = waiting[k] = env.event()
                    yield event
                waited = arrival[k] > t
                t = max(t, arrival[k])
            if lock_step and t > env.now:
                yield env.timeout(t - env.now)
            if ask is not None:
                duration[k] = ask(k)
            start[k] = t
            t += duration[k] + (cold[k] if waited else 0.0)
            end[k] = t
            busy[r] = (start[k] + (window if receives[k] else 0.0), t)
            i = sends[k]
            if i >= 0:
                if handshake and handshake[i] == handshake[i]:  # not nan: a rendezvous
                    env.process(rendezvous(i, r, int(c.rank[i]), t))
                    continue
                if link[i] in shared and t > env.now:
                    yield env.timeout(t - env.now)
                put_on_link(i, t)

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
