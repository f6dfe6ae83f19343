"""The runner proper: one rank interprets its lowered action list (lowering.py)
with real torch ops and real MPI messages, and records what happened.

A rank holds one module per piece it owns. Per step: one receive per RECV of
the rank's lowered schedule is posted up front (so senders never block); the
rank walks its actions in order: a RECV waits for its message, F/B/I/W compute,
a SEND starts the message its producer left; after the last action it waits
for its sends and runs the optimizer step. A hand-off between two pieces on
this rank is no message: the consumer reads the producer's tensor in place.

I and W are torch's own ``stage_backward_input`` / ``stage_backward_weight``
(the gradient w.r.t. the piece's input first, the weight gradients later from
the intermediate gradients I kept). Unlike torch, piece 0 also computes its
(unused) input gradient at I, so its I and W split like every other piece's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, assert_never

import torch
from mpi4py import MPI

from ..plan import Plan
from ..schedule import Action, Kind, MessageKey, makes_output, needs_input
from ..timeline import SENDS, MemorySample, Span
from .records import StepRecord
from .stage import make_optimizer, make_stage, static_bytes, synthetic_batch

clock = time.perf_counter  # CLOCK_MONOTONIC on Linux: one time base for all ranks of a host


def handler(kind: Kind) -> str:
    """The StageWorker method that runs an action of this kind."""
    match kind:
        case Kind.F:
            return "_forward"
        case Kind.B:
            return "_backward"
        case Kind.I:
            return "_backward_input"
        case Kind.W:
            return "_backward_weight"
        case Kind.SEND:
            return "_send"
        case Kind.RECV:
            return "_receive"
        case _:
            assert_never(kind)


class SavedBytes:
    """Counts the bytes autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, parameter_storages: set[int]):
        self.exclude = parameter_storages
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor.detach()  # not the tensor: that would tie it to its own graph node in a cycle

    @property
    def total(self) -> int:
        return sum(self.storages.values())


SpanFields = tuple[int, str, float, float, int, int, int, str]  # timeline.Span's, in order


@dataclass
class StepLog:
    """What one rank sees during one step, times on the rank's clock (aligned later).
    Plain tuples while the step runs: a Span costs 0.7 us to build, a tuple 0.02 us,
    and the time between actions is the runner overhead that calibration measures."""

    rank: int
    start_s: float = 0.0
    end_s: float = 0.0
    spans: list[SpanFields] = field(default_factory=list)
    memory: list[tuple[float, int]] = field(default_factory=list)  # (time_s, activation_bytes)

    def record(self) -> StepRecord:
        """The step as it crosses the MPI job boundary."""
        return StepRecord(self.start_s, self.end_s, tuple(Span(*fields) for fields in self.spans),
                          tuple(MemorySample(self.rank, t, nbytes) for t, nbytes in self.memory))


def _tensor_bytes(groups: list[dict[str, Any]] | None) -> int:
    return sum(g.numel() * g.element_size() for group in groups or () for grads in group.get("grads") or ()
               for g in grads or () if g is not None)


class StageWorker:
    """One rank's pieces: their modules, one optimizer, and the interpreter of its actions."""

    def __init__(self, plan: Plan, comm: Any, optimizer: str, seed: int, device: str) -> None:
        self.plan = plan
        self.comm = comm
        self.rank = comm.Get_rank()
        self.seed = seed
        self.device = torch.device(device)
        self.pieces = plan.schedule.pieces_of(self.rank)
        self.num_pieces = plan.schedule.num_pieces
        self.modules = {s: make_stage(plan.stage_layers(s), plan.partition.bounds[s][0], seed).to(self.device)
                        for s in self.pieces}
        self.optimizer = make_optimizer(optimizer, [p for m in self.modules.values() for p in m.parameters()])
        self.param_storages = {p.untyped_storage().data_ptr() for m in self.modules.values()
                               for p in m.parameters()}
        self.actions = plan.lowered.ranks[self.rank]
        self.cuda = self.device.type == "cuda"

    # --- one step -------------------------------------------------------------

    def step(self, iteration: int) -> StepLog:
        plan, mb = self.plan, self.plan.microbatch_size
        inputs, targets = synthetic_batch(iteration, plan.batch_size, plan.model.input_features,
                                          plan.model.output_features, self.seed)
        first, last = 0 in self.pieces, self.num_pieces - 1 in self.pieces  # who reads inputs, targets
        self.inputs = [x.clone().to(self.device) for x in inputs.split(mb)] if first else []
        self.targets = [y.clone().to(self.device) for y in targets.split(mb)] if last else []
        del inputs, targets  # the copies above are what the step holds (the memory ledger counts them)
        self.optimizer.zero_grad(set_to_none=False)
        self.receives = self._post_receives()
        self.sends: list[tuple[MPI.Request, torch.Tensor]] = []
        self.tensors: dict[MessageKey, torch.Tensor] = {}  # produced or received, not yet consumed
        self.saved: dict[tuple[int, int], tuple] = {}
        self.held_bytes = 0
        record = StepLog(self.rank)
        self.comm.Barrier()
        record.start_s = clock()
        record.memory.append((record.start_s, 0))
        for action in self.actions:
            getattr(self, handler(action.kind))(action, record)
            MPI.Request.Testall([req for req, _ in self.sends])  # drive progress of sends
        start = clock()
        if not MPI.Request.Testall([req for req, _ in self.sends]):
            MPI.Request.Waitall([req for req, _ in self.sends])
            record.spans.append((self.rank, "wait", start, clock(), -1, -1, -1, SENDS))
        start = clock()
        self.optimizer.step()
        self._sync()
        record.end_s = clock()
        record.spans.append((self.rank, "optimizer", start, record.end_s, -1, -1, -1, ""))
        self.sends, self.inputs, self.targets = [], [], []  # held to the end of the step, no longer
        return record

    def _features(self, key: MessageKey) -> int:
        layers = self.plan.stage_layers(key.piece)
        return layers[0].in_features if key.direction == Kind.F else layers[-1].out_features

    def _post_receives(self) -> dict[int, tuple[MPI.Request, torch.Tensor]]:
        receives = {}
        for action in self.actions:
            if action.kind == Kind.RECV:
                key = self.plan.lowered.key(action)
                buffer = torch.empty(self.plan.microbatch_size, self._features(key))
                receives[action.tag] = (self.comm.Irecv(buffer.numpy(), source=action.peer, tag=action.tag), buffer)
        return receives

    def _receive(self, action: Action, record: StepLog) -> None:
        request, buffer = self.receives.pop(action.tag)
        if not request.Test():
            start = clock()
            request.Wait()
            record.spans.append((self.rank, "wait", start, clock(), action.piece, action.microbatch,
                                 action.peer, str(action.direction)))
        if self.cuda:
            start = clock()
            buffer = buffer.to(self.device)
            self._sync()
            record.spans.append((self.rank, "copy", start, clock(), action.piece, action.microbatch,
                                 -1, str(action.direction)))
        self.tensors[self.plan.lowered.key(action)] = buffer

    def _send(self, action: Action, record: StepLog) -> None:
        tensor = self.tensors.pop(self.plan.lowered.key(action))
        if self.cuda:
            start = clock()
            tensor = tensor.to("cpu")
            record.spans.append((self.rank, "copy", start, clock(), action.piece, action.microbatch,
                                 -1, str(action.direction)))
        tensor = tensor.contiguous()
        self.sends.append((self.comm.Isend(tensor.numpy(), dest=action.peer, tag=action.tag), tensor))

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _input(self, action: Action) -> torch.Tensor:
        needed = needs_input(action, self.num_pieces)
        assert needed is not None, f"{action} takes no input from another piece"
        return self.tensors.pop(needed[0])

    def _output(self, action: Action, tensor: torch.Tensor) -> None:
        """Leave what `action` made for the next piece (sent by a SEND, or read in place)."""
        made = makes_output(action, self.num_pieces)
        if made is not None:
            self.tensors[made] = tensor

    def _memory(self, record: StepLog, when: float, change: int) -> None:
        self.held_bytes += change
        record.memory.append((when, self.held_bytes))

    def _forward(self, action: Action, record: StepLog) -> None:
        piece, mb = action.piece, action.microbatch
        x = self.inputs[mb] if piece == 0 else self._input(action)
        x = x.detach().requires_grad_(True)
        start = clock()
        counter = SavedBytes(self.param_storages)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
            out = self.modules[piece](x)
        self._memory(record, start, counter.total)
        if piece == self.num_pieces - 1:
            loss = torch.nn.functional.mse_loss(out, self.targets[mb]) / self.plan.num_microbatches
            self.saved[piece, mb] = (x, loss, counter.total)
        else:
            self.saved[piece, mb] = (x, out, counter.total)
        self._sync()
        record.spans.append((self.rank, "F", start, clock(), piece, mb, -1, ""))
        self._output(action, out.detach())

    def _gradient(self, action: Action) -> torch.Tensor | None:
        return None if action.piece == self.num_pieces - 1 else self._input(action)

    def _backward(self, action: Action, record: StepLog) -> None:
        piece, mb = action.piece, action.microbatch
        grad = self._gradient(action)
        start = clock()
        x, out, nbytes = self.saved.pop((piece, mb))
        out.backward(grad)
        self._sync()
        end = clock()
        self._memory(record, end, -nbytes)
        record.spans.append((self.rank, "B", start, end, piece, mb, -1, ""))
        self._output(action, x.grad)

    def _backward_input(self, action: Action, record: StepLog) -> None:
        from torch.distributed.pipelining._backward import stage_backward_input

        piece, mb = action.piece, action.microbatch
        grad = self._gradient(action)
        start = clock()
        x, out, nbytes = self.saved.pop((piece, mb))
        _, groups = stage_backward_input([out], None if grad is None else [grad], [x],
                                         self.modules[piece].parameters())
        self._sync()
        end = clock()
        kept = _tensor_bytes(groups)
        self.saved[piece, mb] = (groups, nbytes + kept)
        self._memory(record, end, kept)
        record.spans.append((self.rank, "I", start, end, piece, mb, -1, ""))
        self._output(action, x.grad)

    def _backward_weight(self, action: Action, record: StepLog) -> None:
        from torch.distributed.pipelining._backward import stage_backward_weight

        piece, mb = action.piece, action.microbatch
        start = clock()
        groups, nbytes = self.saved.pop((piece, mb))
        stage_backward_weight(self.modules[piece].parameters(), groups)
        self._sync()
        end = clock()
        self._memory(record, end, -nbytes)
        record.spans.append((self.rank, "W", start, end, piece, mb, -1, ""))

    # --- after the run ----------------------------------------------------------

    def static_bytes(self) -> int:
        return sum(static_bytes(m, None) for m in self.modules.values()) + static_bytes(None, self.optimizer)

    def parameters(self) -> dict:
        """Parameters by global layer index as numpy arrays (for equivalence checks)."""
        return {
            f"{self.plan.partition.bounds[s][0] + i}.{name}": tensor.detach().cpu().numpy()
            for s, module in self.modules.items()
            for i, layer in enumerate(module)
            for name, tensor in layer[0].named_parameters()
        }
