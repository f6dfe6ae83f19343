"""The data-parallel step with each all-reduce simulated step by step (``--allreduce ring-steps``).

The default (dataparallel.py) places each piece's all-reduce with the ring law after
the replicas' pipelines are simulated, so its traffic meets nothing. Here one event
simulation (simpy) runs the whole world, P x D global ranks, so that pipeline
messages and the all-reduces' messages share what they really share:

- a rank walks its actions as in des.py (a RECV waits for its message, a compute
  action takes its cost, a SEND puts the message on the network and does not
  block); after a piece's last B (or W) and its SEND the rank starts the piece's
  all-reduce, which runs beside its compute, after the rank's earlier all-reduces;
- an all-reduce of S bytes over the D ranks of a stage group (Layout.group, the
  ring's order) is 2(D - 1) steps; in each, every member sends S/D bytes to the
  next member over the edge's collective link (cost model's ``collective_link``:
  the profile's measured all-reduce link of the edge's class, else its
  point-to-point link, what-ifs on top). A member sends step k once it has
  received step k - 1 (and, in the first D - 1 steps, added it: S/D bytes of the
  profile's ``reduce_s_per_byte``) and its neighbour has joined the all-reduce
  (it has posted its receives). With equal edges, members that join together and
  nothing else on the network this is exactly the ring law
  ``2(D-1)(alpha + S/(D beta)) + (D-1) S/D gamma`` (collectives.py). The default
  path prices a ring that calibration timed by the measured sizes instead
  (collectives.measured_allreduce_s); the steps keep the law;
- the network: a message holds its link (cost model's ``link_id``: one per
  direction between two ranks) and, between two nodes (``--ranks-per-node``),
  its sender's node's outgoing interface and its receiver's node's incoming one,
  for its whole transfer time. Each of those carries one message at a time,
  first come first served, as des.py's links do ("free at" times); messages
  inside a node use no interface. A sender brings ``env.now`` up to its own clock
  before it reserves, so requests reach the network in time order.

A rank's optimizer step waits for its sends and its all-reduces. The result is a
DataParallelTimeline with one timeline per replica (no two are shared: contention
can make equal replicas differ); its engine path is always "des".
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
import simpy

from .dataparallel import DataParallelTimeline, Layout, ReplicaCosts

Key = tuple[str, Hashable]  # ("link", link id) or ("out" | "in", node)


@dataclass
class Network:
    """Links and per-node network interfaces as "free at" times (first come, first served)."""

    layout: Layout
    free_at: dict[Key, float] = field(default_factory=dict)
    busy_s: dict[Key, float] = field(default_factory=dict)  # seconds each resource carried messages

    def path(self, src: int, dst: int, link_id: Hashable) -> tuple[Key, ...]:
        """What a message from global rank `src` to `dst` holds: its link, and between nodes
        the sender node's outgoing interface and the receiver node's incoming one."""
        a, b = self.layout.node_of(src), self.layout.node_of(dst)
        return (("link", link_id),) if a == b else (("link", link_id), ("out", a), ("in", b))

    def reserve(self, now: float, path: tuple[Key, ...], seconds: float) -> tuple[float, float]:
        """(start, arrival) of a message sent at `now` that takes `seconds` on `path`."""
        begin = max([now] + [self.free_at.get(key, now) for key in path])
        for key in path:
            self.free_at[key] = begin + seconds
            self.busy_s[key] = self.busy_s.get(key, 0.0) + seconds
        return begin, begin + seconds

    def interface_busy_s(self) -> dict[tuple[str, int], float]:
        """Seconds each node's interface carried messages, per direction ("out", "in")."""
        return {(kind, node): v for (kind, node), v in self.busy_s.items()
                if kind != "link" and isinstance(node, int)}


def simulate_ring_steps(plan, costs, layout: Layout) -> DataParallelTimeline:
    """One step of `plan` on `layout`'s D replicas, all-reduces step by step (module text)."""
    return run_world(plan, costs, layout)[0]


def run_world(plan, costs, layout: Layout) -> tuple[DataParallelTimeline, Network]:
    """The step's timeline and the network it used (for the interfaces' busy time)."""
    from .compact import blocked_ranks, compact
    from .fastpath import resolve, runtime_inputs
    from .steparrays import ArrayTimeline, StepArrays

    if runtime_inputs(costs):
        raise ValueError("--allreduce ring-steps needs a cost model whose costs are fixed in advance")
    c = compact(plan.schedule)
    if c.waves is None:
        raise RuntimeError(f"simulation ended with ranks {blocked_ranks(c)} blocked: schedule deadlocks")
    views = [ReplicaCosts(costs, layout.replica_ranks(d)) for d in range(layout.data_parallel)]
    resolved = [resolve(c, plan.partition, plan.model, v, plan.microbatch_size, plan.recompute, allreduce=True)
                for v in views]
    world = _World(plan, costs, layout, c, resolved)
    world.run()
    timelines = []
    for d, r in enumerate(resolved):
        times = StepArrays(np.array(world.start[d]), np.array(world.end[d]), np.array(world.send_start[d]),
                           np.array(world.arrival[d]), r.optimizer_s, world.ready_s(d), world.spans(d))
        timelines.append(ArrayTimeline(c, times, r.ledger_start_bytes, r.ledger_end_bytes, r.static_bytes,
                                       "simulated", "des", r.step_peak_bytes))
    return DataParallelTimeline(layout, tuple(timelines)), world.network


class _World:
    """The simpy processes of one step: a rank process and an all-reduce process per global rank."""

    def __init__(self, plan, costs, layout: Layout, c, resolved) -> None:
        from .schedule import gradients_ready

        self.plan, self.costs, self.layout, self.c, self.resolved = plan, costs, layout, c, resolved
        self.env = simpy.Environment()
        self.network = Network(layout)
        n, d = c.num_nodes, layout.data_parallel
        self.start, self.end = [[0.0] * n for _ in range(d)], [[0.0] * n for _ in range(d)]
        self.send_start = [[float("nan")] * n for _ in range(d)]
        self.arrival = [[float("nan")] * n for _ in range(d)]
        self.waiting: dict[tuple[int, int], simpy.Event] = {}
        self.events: dict[tuple, simpy.Event] = {}
        schedule = plan.schedule
        ready = {int(c.offsets[schedule.rank_of(s)]) + position: s for s, position in gradients_ready(schedule).items()}
        self.ready_piece = ready  # node -> the piece whose gradients are final after it
        self.nbytes = {s: sum(layer.params for layer in plan.stage_layers(s)) * 4 for s in range(schedule.num_pieces)}
        self.reduce_s_per_byte = float(getattr(costs, "reduce_s_per_byte", 0.0))
        self.done: dict[int, float] = {}  # global rank -> when its last all-reduce ended
        self.allreduces: dict[int, list[tuple[int, int, float, float]]] = {}  # replica -> (rank, piece, start, end)
        cross = c.cross
        self.receives = cross.tolist()
        self.sends = [-1] * n
        for i, j in zip(np.flatnonzero(cross).tolist(), c.producer[cross].tolist()):
            self.sends[j] = i

    def event(self, key: tuple) -> simpy.Event:
        if key not in self.events:
            self.events[key] = self.env.event()
        return self.events[key]

    def run(self) -> None:
        schedule = self.plan.schedule
        for d in range(self.layout.data_parallel):
            for r in range(schedule.num_ranks):
                self.env.process(self._rank(d, r))
                nodes = [k for k in range(int(self.c.offsets[r]), int(self.c.offsets[r + 1])) if k in self.ready_piece]
                if nodes:
                    self.env.process(self._allreduces(self.layout.global_rank(d, r),
                                                      [self.ready_piece[k] for k in nodes]))
        self.env.run()
        stuck = [key for key, event in self.events.items() if not event.triggered] + list(self.waiting)
        if stuck:
            raise RuntimeError(f"ring-steps simulation ended with {len(stuck)} events pending: a bug")

    def _rank(self, d: int, r: int):
        """Replica d's local rank r: its actions in program order (des.py), then nothing more."""
        env, c, res = self.env, self.c, self.resolved[d]
        start, end, send_start, arrival = self.start[d], self.end[d], self.send_start[d], self.arrival[d]
        me = self.layout.global_rank(d, r)
        t = 0.0
        for k in range(int(c.offsets[r]), int(c.offsets[r + 1])):
            if self.receives[k]:
                if arrival[k] != arrival[k]:  # nan: not sent yet
                    event = self.waiting[d, k] = env.event()
                    yield event
                t = max(t, arrival[k])
            start[k] = t
            t += float(res.duration_s[k])
            end[k] = t
            i = self.sends[k]
            if (i >= 0 or k in self.ready_piece) and t > env.now:  # the network sees requests in time order
                yield env.timeout(t - env.now)
            if i >= 0:
                peer = self.layout.global_rank(d, int(c.rank[i]))
                path = self.network.path(me, peer, res.link_ids[int(res.link[i])])
                send_start[i], arrival[i] = self.network.reserve(t, path, float(res.message_s[i]))
                if (d, i) in self.waiting:
                    self.waiting.pop((d, i)).succeed()
            if k in self.ready_piece:
                self.event(("ready", me, self.ready_piece[k])).succeed()

    def _allreduces(self, me: int, pieces: list[int]):
        """Rank `me`'s all-reduces, one after another, each when its gradients are final."""
        for piece in pieces:
            yield self.event(("ready", me, piece))
            began = self.env.now
            yield from self._ring(me, piece)
            replica = self.layout.replica_of(me)
            self.allreduces.setdefault(replica, []).append((self.layout.stage_of(me), piece, began, self.env.now))
            self.done[me] = self.env.now

    def _ring(self, me: int, piece: int):
        """My part of the ring all-reduce of `piece` over my stage group (module text)."""
        env, layout = self.env, self.layout
        group = layout.group(layout.stage_of(me))
        size, nbytes = len(group), self.nbytes[piece]
        self.event(("joined", me, piece)).succeed()
        if size < 2 or nbytes <= 0:
            return
        nxt = group[(group.index(me) + 1) % size]
        chunk = nbytes / size
        step_s = self.costs.collective_link(me, nxt).time_s(chunk)
        path = self.network.path(me, nxt, self.costs.link_id(me, nxt))
        last = env.now
        for step in range(2 * (size - 1)):
            if step > 0:
                yield from self._receive(me, piece, step - 1)
                if step - 1 < size - 1:  # reduce-scatter: add the received share before passing it on
                    yield env.timeout(chunk * self.reduce_s_per_byte)
            yield self.event(("joined", nxt, piece))
            _, last = self.network.reserve(env.now, path, step_s)
            self.event(("step", nxt, piece, step)).succeed(last)
        yield from self._receive(me, piece, 2 * (size - 1) - 1)
        if last > env.now:
            yield env.timeout(last - env.now)

    def _receive(self, me: int, piece: int, step: int):
        arrival = yield self.event(("step", me, piece, step))
        if arrival > self.env.now:
            yield self.env.timeout(arrival - self.env.now)

    def ready_s(self, d: int) -> np.ndarray:
        """Per local rank of replica d: when its all-reduces have ended (0: it has none)."""
        return np.array([self.done.get(g, 0.0) for g in self.layout.replica_ranks(d)])

    def spans(self, d: int) -> tuple[tuple[int, int, float, float], ...]:
        return tuple(sorted(self.allreduces.get(d, [])))
