"""The runner proper: one rank interprets its action list with real torch ops
and real MPI messages, and records what happened.

Per step: receives for every input the rank will need are posted up front
(so senders never block), the rank walks its actions in schedule order, and
after the last one it waits for its sends and runs the optimizer step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from mpi4py import MPI

from ..plan import Plan
from ..schedule import BACKWARD, FORWARD, Action
from ..timeline import SENDS
from .stage import make_optimizer, make_stage, static_bytes, synthetic_batch

clock = time.perf_counter  # CLOCK_MONOTONIC on Linux: one time base for all ranks of a host


def _tag(action: Action) -> int:
    return 2 * action.microbatch + (0 if action.kind == FORWARD else 1)


class SavedBytes:
    """Counts the bytes autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, parameter_storages: set[int]):
        self.exclude = parameter_storages
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


@dataclass
class StepRecord:
    """What one rank saw in one step; times on the rank's clock (aligned later)."""

    start_s: float = 0.0
    end_s: float = 0.0
    spans: list[tuple] = field(default_factory=list)  # Span fields, see timeline.Span
    memory: list[tuple] = field(default_factory=list)  # (time_s, activation_bytes)


class StageWorker:
    """One rank's stage: its module, optimizer, and the interpreter of its actions."""

    def __init__(self, plan: Plan, comm, optimizer: str, seed: int, device: str):
        self.plan = plan
        self.comm = comm
        self.rank = comm.Get_rank()
        self.stage = self.rank
        self.seed = seed
        self.device = torch.device(device)
        first, _ = plan.partition.bounds[self.stage]
        self.module = make_stage(plan.stage_layers(self.stage), first, seed).to(self.device)
        self.optimizer = make_optimizer(optimizer, self.module.parameters())
        self.param_storages = {p.untyped_storage().data_ptr() for p in self.module.parameters()}
        self.last = self.stage == plan.num_stages - 1
        self.in_features = plan.stage_layers(self.stage)[0].in_features
        self.out_features = plan.stage_layers(self.stage)[-1].out_features
        self.cuda = self.device.type == "cuda"

    # --- one step -------------------------------------------------------------

    def step(self, iteration: int) -> StepRecord:
        plan, mb = self.plan, self.plan.microbatch_size
        inputs, targets = synthetic_batch(iteration, plan.batch_size, plan.model.input_features,
                                          plan.model.output_features, self.seed)
        self.inputs = [x.clone().to(self.device) for x in inputs.split(mb)]
        self.targets = [y.clone().to(self.device) for y in targets.split(mb)]
        self.optimizer.zero_grad(set_to_none=False)
        self.receives = self._post_receives()
        self.sends: list[tuple[MPI.Request, torch.Tensor]] = []
        self.saved: dict[int, tuple] = {}
        self.held_bytes = 0
        record = StepRecord()
        self.comm.Barrier()
        record.start_s = clock()
        record.memory.append((record.start_s, 0))
        for action in plan.schedule.ranks[self.rank]:
            (self._forward if action.kind == FORWARD else self._backward)(action, record)
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
        return record

    def _post_receives(self) -> dict[Action, tuple[MPI.Request, torch.Tensor]]:
        receives = {}
        for action in self.plan.schedule.ranks[self.rank]:
            if action.kind == FORWARD and self.stage > 0:
                peer, features = self.rank - 1, self.in_features
            elif action.kind == BACKWARD and not self.last:
                peer, features = self.rank + 1, self.out_features
            else:
                continue
            buffer = torch.empty(self.plan.microbatch_size, features)
            receives[action] = (self.comm.Irecv(buffer.numpy(), source=peer, tag=_tag(action)), buffer)
        return receives

    def _receive(self, action: Action, record: StepRecord) -> torch.Tensor:
        request, buffer = self.receives.pop(action)
        if not request.Test():
            start = clock()
            request.Wait()
            peer = self.rank - 1 if action.kind == FORWARD else self.rank + 1
            record.spans.append((self.rank, "wait", start, clock(), action.stage, action.microbatch,
                                 peer, action.kind))
        if self.cuda:
            start = clock()
            buffer = buffer.to(self.device)
            self._sync()
            record.spans.append((self.rank, "copy", start, clock(), action.stage, action.microbatch,
                                 -1, action.kind))
        return buffer

    def _send(self, tensor: torch.Tensor, action: Action, peer: int, record: StepRecord) -> None:
        if self.cuda:
            start = clock()
            tensor = tensor.to("cpu")
            record.spans.append((self.rank, "copy", start, clock(), action.stage, action.microbatch,
                                 -1, action.kind))
        tensor = tensor.contiguous()
        receiver = Action(action.stage + (1 if action.kind == FORWARD else -1), action.kind,
                          action.microbatch)
        self.sends.append((self.comm.Isend(tensor.numpy(), dest=peer, tag=_tag(receiver)), tensor))

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _forward(self, action: Action, record: StepRecord) -> None:
        mb = action.microbatch
        x = self.inputs[mb] if self.stage == 0 else self._receive(action, record).requires_grad_(True)
        start = clock()
        counter = SavedBytes(self.param_storages)
        with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
            out = self.module(x)
        self.held_bytes += counter.total
        record.memory.append((start, self.held_bytes))
        if self.last:
            loss = torch.nn.functional.mse_loss(out, self.targets[mb]) / self.plan.num_microbatches
            self.saved[mb] = (x, loss, counter.total)
        else:
            self.saved[mb] = (x, out, counter.total)
        self._sync()
        record.spans.append((self.rank, FORWARD, start, clock(), action.stage, mb, -1, ""))
        if not self.last:
            self._send(out.detach(), action, self.rank + 1, record)

    def _backward(self, action: Action, record: StepRecord) -> None:
        mb = action.microbatch
        grad = None if self.last else self._receive(action, record)
        start = clock()
        x, out, nbytes = self.saved.pop(mb)
        out.backward(grad)
        self._sync()
        end = clock()
        self.held_bytes -= nbytes
        record.memory.append((end, self.held_bytes))
        record.spans.append((self.rank, BACKWARD, start, end, action.stage, mb, -1, ""))
        if self.stage > 0:
            self._send(x.grad, action, self.rank - 1, record)

    # --- after the run ----------------------------------------------------------

    def static_bytes(self) -> int:
        return static_bytes(self.module, self.optimizer)

    def parameters(self) -> dict:
        """Parameters by global layer index as numpy arrays (for equivalence checks)."""
        first, _ = self.plan.partition.bounds[self.stage]
        return {
            f"{first + i}.{name}": tensor.detach().cpu().numpy()
            for i, layer in enumerate(self.module)
            for name, tensor in layer[0].named_parameters()
        }
