"""Calibration micro-benchmarks of every layer kind, by shape: run on every rank at once.

Each model of the job is built whole from the layer registry's torch modules
(``LayerSpec.module``) and run as one chain, the way a pipeline piece holding all its
layers runs it, and every layer is timed inside that chain:

- forward: the clock between consecutive layers;
- whole backward (B): one ``backward()`` over the chain, each layer's time read from
  hooks on the tensors between layers (a hook fires when that tensor's gradient is
  done), so no layer pays a backward call of its own;
- I and W as a zero-bubble pipeline runs them (torch's ``stage_backward_input`` /
  ``stage_backward_weight``, what the runner calls): I over the chain with the same
  hooks, then W layer by layer (each layer's parameter groups), timed for the first
  of two micro-batches after the second one's F and I, so its saved tensors are
  no longer fresh in cache. The graph walk ``stage_backward_input`` does before
  autograd starts is shared out over the layers in proportion to their I time.

A layer taking token ids (embedding) has no input gradient: its I is 0 and its W is
its whole backward. Every (model, micro-batch size) point is measured once per round,
rounds repeated, a barrier before each, so drift spreads over all points alike.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..model import LayerSpec, ModelSpec, parse_model
from .config import MicrobenchConfig
from .interpreter import clock
from .records import KindSample


def _stamps(tensors: list[torch.Tensor], stamps: list[float | None]) -> list[Any]:
    """Hooks that write the time each tensor's gradient is done into `stamps` (by index)."""
    handles = []
    for i, t in enumerate(tensors):
        if t.requires_grad:
            def hook(grad: torch.Tensor, i: int = i) -> None:
                stamps[i] = clock()
            handles.append(t.register_hook(hook))
    return handles


def _forward(layers: list[torch.nn.Module], x: torch.Tensor) -> tuple[list[torch.Tensor], list[float]]:
    """The chain's tensors (input, then each layer's output) and each layer's forward seconds."""
    tensors, times = [x], []
    start = clock()
    for layer in layers:
        tensors.append(layer(tensors[-1]))
        now = clock()
        times.append(now - start)
        start = now
    return tensors, times


def _per_layer(start: float, stamps: list[float | None], end: float) -> list[float]:
    """Backward seconds of each layer from the stamps of the tensors between layers (the
    first and last entries are the chain's input and output, not stamped): layer i runs from
    the gradient of its output (stamp i + 1) to that of its input (stamp i)."""
    n = len(stamps) - 1
    inner = stamps[1:n]
    assert all(t is not None for t in inner), "a tensor between two layers got no gradient"
    marks = [end, *(t for t in inner if t is not None), start]
    return [max(marks[i] - marks[i + 1], 0.0) for i in range(n)]


@dataclass
class _Chain:
    """One model at one micro-batch size while it is being measured."""

    job: int
    model: ModelSpec
    modules: list[torch.nn.Module]
    x: torch.Tensor
    microbatch_size: int
    first_float: int  # layers before it take token ids: no I, W = B
    times: dict[str, list[list[float]]] = field(default_factory=dict)  # direction -> per layer

    def keep(self, direction: str, seconds: list[float]) -> None:
        rows = self.times.setdefault(direction, [[] for _ in self.modules])
        for row, value in zip(rows, seconds):
            row.append(value)


def _whole_backward(chain: _Chain) -> tuple[list[float], list[float]]:
    tensors, forward = _forward(chain.modules, chain.x)
    inner: list[float | None] = [None] * (len(tensors) - 2)
    handles = _stamps(tensors[1:-1], inner)
    out = tensors[-1]
    start = clock()
    out.backward(torch.ones_like(out))
    end = clock()
    for handle in handles:
        handle.remove()
    return forward, _per_layer(start, [None, *inner, None], end)


def _split_backward(chain: _Chain) -> tuple[list[float], list[float]]:
    """I over the float part of the chain, W layer by layer (see the module text)."""
    from torch.distributed.pipelining._backward import (
        _get_grad_fn_or_grad_acc,
        stage_backward_input,
        stage_backward_weight,
    )

    k, modules = chain.first_float, chain.modules
    with torch.no_grad():
        x = chain.x
        for layer in modules[:k]:
            x = layer(x)
    x = x.detach().requires_grad_(True)
    float_layers = modules[k:]
    params = [p for layer in float_layers for p in layer.parameters()]
    runs = []
    for _ in range(2):
        tensors, _ = _forward(float_layers, x)
        out = tensors[-1]
        out_stamp: list[float | None] = [None]
        inner: list[float | None] = [None] * (len(tensors) - 2)
        handles = _stamps([out], out_stamp) + _stamps(tensors[1:-1], inner)
        start = clock()
        groups = stage_backward_input([out], [torch.ones_like(out)], [x], iter(params))[1]
        end = clock()
        for handle in handles:
            handle.remove()
        walk = (out_stamp[0] or start) - start  # the graph walk before autograd starts
        seconds = _per_layer(out_stamp[0] or start, [None, *inner, None], end)
        total = sum(seconds) or 1.0
        runs.append(([s + walk * s / total for s in seconds], groups))
        x.grad = None
    owned = [{_get_grad_fn_or_grad_acc(p) for p in layer.parameters()} for layer in float_layers]
    weight = [0.0] * len(float_layers)
    for run, (_, groups) in enumerate(runs):
        for i in reversed(range(len(float_layers))):
            mine = [g for g in groups if g["params"] and set(g["params"]) <= owned[i]]
            if not mine:  # no parameters: no W
                continue
            start = clock()
            stage_backward_weight(iter(float_layers[i].parameters()), mine)
            if run == 0:
                weight[i] = clock() - start
        assert all("grads" not in g for g in groups if g["params"]), "a parameter group spans layers"
    for layer in float_layers:
        layer.zero_grad(set_to_none=True)
    return [0.0] * k + runs[0][0], [0.0] * k + weight


def _chains(config: MicrobenchConfig) -> list[_Chain]:
    chains = []
    for j, job in enumerate(config.kind_jobs):
        model = parse_model(tomllib.loads(job.model_toml), where=f"calibration model {j}")
        modules = [layer.module(seed=config.seed + i) for i, layer in enumerate(model.layers)]
        first_float = next((i for i, layer in enumerate(model.layers) if layer.input_dtype == "float32"),
                           len(model.layers))
        for b in job.microbatch_sizes:
            chains.append(_Chain(j, model, modules, _input(model.layers[0], b, config.seed), b, first_float))
    return chains


def _input(layer: LayerSpec, samples: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if layer.input_dtype == "int64":
        vocab = layer.options["vocab_size"]
        return torch.randint(vocab, (samples, *layer.input_shape), generator=generator)
    return torch.randn(samples, *layer.input_shape, generator=generator).requires_grad_(True)


def measure_kinds(config: MicrobenchConfig, comm: Any, log: Callable[[str], object]) -> list[KindSample]:
    """Per-layer F, B, I and W times of every model of the job at each of its micro-batch sizes."""
    chains = _chains(config)
    if not chains:
        return []
    rounds = config.kind_warmup + config.kind_repeats
    spent = [0.0] * len(config.kind_jobs)
    for round_ in range(rounds):
        for chain in chains:
            started = clock()
            comm.Barrier()
            forward, backward = _whole_backward(chain)
            comm.Barrier()
            input_s, weight_s = _split_backward(chain)
            if round_ >= config.kind_warmup:
                for direction, seconds in (("forward", forward), ("backward", backward), ("input", input_s),
                                           ("weight", weight_s)):
                    chain.keep(direction, seconds)
            for module in chain.modules:
                module.zero_grad(set_to_none=True)
            spent[chain.job] += clock() - started
        if (round_ + 1) % 5 == 0 or round_ + 1 == rounds:
            log(f"  kinds: round {round_ + 1}/{rounds} over {len(chains)} (model, micro-batch) points")
    log("  kinds: seconds per model: " + ", ".join(f"{chains_of(chains, j)} {s:.1f} s" for j, s in enumerate(spent)))
    return [_sample(chain, i, comm.Get_rank()) for chain in chains for i in range(len(chain.modules))]


def chains_of(chains: list[_Chain], job: int) -> str:
    return next(chain.model.name for chain in chains if chain.job == job)


def _sample(chain: _Chain, i: int, rank: int) -> KindSample:
    layer = chain.model.layers[i]
    backward = tuple(chain.times["backward"][i])
    input_s, weight_s = tuple(chain.times["input"][i]), tuple(chain.times["weight"][i])
    if i < chain.first_float:  # token ids: no input gradient, the weight gradients are the whole backward
        input_s, weight_s = tuple(0.0 for _ in backward), backward
    return KindSample(rank, chain.job, i, layer.kind, layer.cost_key, chain.microbatch_size,
                      tuple(chain.times["forward"][i]), backward, input_s, weight_s)
