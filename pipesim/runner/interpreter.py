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

Messages carry tensors of any per-sample shape: a receive buffer is sized from the
spec's shape at the cut. A piece in the plan's ``recompute`` runs its forward under
``torch.utils.checkpoint`` (non-reentrant): F keeps only its input, and B (or I) runs
the forward again first. Its ledger adds the input at F and, at the start of B or I,
what the re-forward saves (counted once per piece by a forward at start-up, since the
checkpoint's own hooks hide those tensors from the counter during the step).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, assert_never

import torch
from mpi4py import MPI
from torch.utils.checkpoint import checkpoint

from ..plan import Plan
from ..schedule import Action, Kind, MessageKey, makes_output, needs_input
from ..timeline import SENDS, MemorySample, Span
from .records import StepRecord
from .stage import (
    TORCH_DTYPES,
    layer_parameters,
    loss_fn,
    make_optimizer,
    make_stage,
    static_bytes,
    synthetic_batch,
)

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
        case Kind.ALLREDUCE:
            return "_allreduce"
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

    def __init__(self, plan: Plan, comm: Any, optimizer: str, seed: int, device: str, sync: Any = None,
                 eval_mode: bool = False) -> None:
        self.plan = plan
        self.sync = sync  # runner/dataparallel.GradientSync with D > 1 replicas (comm: the replica's pipeline)
        self.comm = comm
        self.rank = comm.Get_rank()
        self.seed = seed
        self.device = torch.device(device)
        self.pieces = plan.schedule.pieces_of(self.rank)
        self.num_pieces = plan.schedule.num_pieces
        self.modules = {s: make_stage(plan.stage_layers(s), plan.partition.bounds[s][0], seed).to(self.device)
                        for s in self.pieces}
        for module in self.modules.values():
            module.train(not eval_mode)
        self.optimizer = make_optimizer(optimizer, [p for m in self.modules.values() for p in m.parameters()])
        self.param_storages = {p.untyped_storage().data_ptr() for m in self.modules.values()
                               for p in m.parameters()}
        self.actions = plan.lowered.ranks[self.rank]
        self.cuda = self.device.type == "cuda"
        for piece, module in self.modules.items() if sync is not None else ():
            sync.bind(piece, list(module.parameters()))
        self.loss = loss_fn(plan.model)
        self.recompute = set(plan.recompute) & set(self.pieces)
        self.recomputed_bytes = {s: self._saved_by_forward(s) for s in sorted(self.recompute)}
        self.sends: list[tuple[MPI.Request, torch.Tensor]] = []
        self.receives: dict[int, tuple[MPI.Request, torch.Tensor]] = {}
        if os.environ.get("PIPESIM_PROGRESS") == "layers":
            self._progress_between_layers()

    def _progress_between_layers(self) -> None:
        """PIPESIM_PROGRESS=layers: an MPI test of the step's requests after every layer's
        forward and after every layer's output gradient, so that a rendezvous over a transport
        without asynchronous progress (Open MPI over TCP) is matched and pushed within a layer,
        not at the end of an action. An experiment (issue 16); off by default."""

        def progress(*_: Any) -> None:
            requests = [r for r, _ in self.sends] + [r for r, _ in self.receives.values()]
            if requests:
                MPI.Request.Testall(requests)

        def after_forward(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            progress()
            if isinstance(output, torch.Tensor) and output.requires_grad:
                output.register_hook(progress)  # returns None: the gradient is unchanged

        for module in self.modules.values():
            for layer in module:
                layer.register_forward_hook(after_forward)

    def _saved_by_forward(self, piece: int) -> int:
        """Bytes a plain forward of one micro-batch saves besides its input (for the ledger
        of a recomputed piece: what its re-forward brings back at B or I). The module's
        buffers (batch-norm's running statistics) are put back as they were."""
        layer = self.plan.stage_layers(piece)[0]
        module = self.modules[piece]
        buffers = {name: value.clone() for name, value in module.named_buffers()}
        dtype = TORCH_DTYPES[layer.input_dtype]
        x = torch.zeros(self.plan.microbatch_size, *layer.input_shape, dtype=dtype, device=self.device)
        if dtype.is_floating_point:
            x.requires_grad_(True)
        counter = SavedBytes(self.param_storages | {x.untyped_storage().data_ptr()})
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
            module(x)
        with torch.no_grad():
            for name, value in module.named_buffers():
                value.copy_(buffers[name])
        return counter.total

    # --- one step -------------------------------------------------------------

    def step(self, iteration: int) -> StepLog:
        plan, mb = self.plan, self.plan.microbatch_size
        inputs, targets = synthetic_batch(iteration, plan.batch_size, plan.model, self.seed)
        if self.sync is not None:
            inputs, targets = self.sync.shard(inputs, targets)
        first, last = 0 in self.pieces, self.num_pieces - 1 in self.pieces  # who reads inputs, targets
        self.inputs = [x.clone().to(self.device) for x in inputs.split(mb)] if first else []
        self.targets = [y.clone().to(self.device) for y in targets.split(mb)] if last else []
        del inputs, targets  # the copies above are what the step holds (the memory ledger counts them)
        self.optimizer.zero_grad(set_to_none=False)
        self.receives = self._post_receives()
        self.sends = []
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
            if self.sync is not None:
                self.sync.progress(clock)
        start = clock()
        if not MPI.Request.Testall([req for req, _ in self.sends]):
            MPI.Request.Waitall([req for req, _ in self.sends])
            record.spans.append((self.rank, "wait", start, clock(), -1, -1, -1, SENDS))
        if self.sync is not None:
            self.sync.finish(self.rank, clock, record.spans)
        start = clock()
        self.optimizer.step()
        self._sync()
        record.end_s = clock()
        record.spans.append((self.rank, "optimizer", start, record.end_s, -1, -1, -1, ""))
        self.sends, self.inputs, self.targets = [], [], []  # held to the end of the step, no longer
        return record

    def _buffer(self, key: MessageKey) -> torch.Tensor:
        """A receive buffer: the piece's input (F) or its output's gradient (B), one micro-batch."""
        layers = self.plan.stage_layers(key.piece)
        shape, dtype = ((layers[0].input_shape, layers[0].input_dtype) if key.direction == Kind.F
                        else (layers[-1].output_shape, layers[-1].output_dtype))
        return torch.empty(self.plan.microbatch_size, *shape, dtype=TORCH_DTYPES[dtype])

    def _post_receives(self) -> dict[int, tuple[MPI.Request, torch.Tensor]]:
        receives = {}
        for action in self.actions:
            if action.kind == Kind.RECV:
                key = self.plan.lowered.key(action)
                buffer = self._buffer(key)
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

    def _allreduce(self, action: Action, record: StepLog) -> None:
        self._sync()
        self.sync.start(action.piece, list(self.modules[action.piece].parameters()), clock())

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
        x = x.detach().requires_grad_(True) if x.is_floating_point() else x
        start = clock()
        last = piece == self.num_pieces - 1
        # the targets exist before the step (the ledger counts them as inputs), so the loss's
        # saved tensors count here but the targets it keeps do not
        counter = SavedBytes(self.param_storages | ({self.targets[mb].untyped_storage().data_ptr()} if last else set()))
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
            if piece in self.recompute:
                out = checkpoint(self.modules[piece], x, use_reentrant=False)
            else:
                out = self.modules[piece](x)
            if last:  # the loss's saved tensors are held from here until B, recomputed or not
                out = self.loss(out, self.targets[mb]) / (self.plan.num_microbatches * self.plan.data_parallel)
        if piece in self.recompute:  # it keeps its input (which the checkpoint may also save)
            counter.storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        held = counter.total
        self._memory(record, start, held)
        self.saved[piece, mb] = (x, out, held)
        self._sync()
        record.spans.append((self.rank, "F", start, clock(), piece, mb, -1, ""))
        self._output(action, out.detach())

    def _recomputing(self, record: StepLog, piece: int, start: float) -> int:
        """A recomputed piece's re-forward brings its saved tensors back as B or I starts."""
        extra = self.recomputed_bytes.get(piece, 0)
        if extra:
            self._memory(record, start, extra)
        return extra

    def _gradient(self, action: Action) -> torch.Tensor | None:
        return None if action.piece == self.num_pieces - 1 else self._input(action)

    def _backward(self, action: Action, record: StepLog) -> None:
        piece, mb = action.piece, action.microbatch
        grad = self._gradient(action)
        start = clock()
        x, out, nbytes = self.saved.pop((piece, mb))
        nbytes += self._recomputing(record, piece, start)
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
        nbytes += self._recomputing(record, piece, start)
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
        named = {}
        for s, module in self.modules.items():
            first = self.plan.partition.bounds[s][0]
            for i, (layer, spec) in enumerate(zip(module, self.plan.stage_layers(s), strict=True)):
                named.update(layer_parameters(layer, spec, first + i))
        return {name: tensor.detach().cpu().numpy() for name, tensor in named.items()}
