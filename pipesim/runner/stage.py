"""Torch modules, synthetic data and the loss, built from the same ModelSpec the simulator uses.

Every layer is initialised from its global index, so a stage holds exactly the
parameters the whole model would hold for those layers, however it is cut. Any
kind of the layer registry (pipesim/layers) is built from its own torch module;
fc layers keep their own uniform initialisation (the one the project began with).

Inputs follow the first layer: float32 samples of its input shape, or token ids
(int64) for an embedding. The loss follows the last layer: cross-entropy over
class labels after an fc layer without activation (a classifier head), over
next-token ids after an lm_head (a language model), and mean squared error
against random targets of the output's shape otherwise (fc chains, as before).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from ..model import LayerSpec, ModelSpec

TORCH_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def make_layer(spec: LayerSpec, index: int, seed: int) -> nn.Module:
    """Layer `index` of the model: its kind's torch module, seeded by the index."""
    if spec.kind != "fc":
        return spec.module(seed=seed * 100_003 + index)
    linear = nn.Linear(spec.in_features, spec.out_features)
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    bound = 1.0 / math.sqrt(spec.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
    return nn.Sequential(linear, nn.ReLU()) if spec.options["activation"] == "relu" else nn.Sequential(linear)


def make_stage(layers: Sequence[LayerSpec], first_index: int, seed: int) -> nn.Sequential:
    return nn.Sequential(*(make_layer(spec, first_index + i, seed) for i, spec in enumerate(layers)))


def layer_parameters(module: nn.Module, spec: LayerSpec, index: int) -> dict[str, torch.Tensor]:
    """A layer's parameters named by global layer index: ``3.weight`` for fc (its Linear's),
    ``3.qkv.weight`` and the like for other kinds (the module's own names)."""
    named = module[0].named_parameters() if spec.kind == "fc" else module.named_parameters()
    return {f"{index}.{name}": tensor for name, tensor in named}


def loss_kind(model: ModelSpec) -> str:
    """"classes" (cross-entropy over labels), "tokens" (cross-entropy over next tokens) or "mse"."""
    last = model.layers[-1]
    if last.kind == "lm_head":
        return "tokens"
    if last.kind == "fc" and last.options["activation"] == "none" and len(last.output_shape) == 1:
        return "classes"
    return "mse"


def synthetic_batch(iteration: int, batch_size: int, model: ModelSpec,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of one mini-batch; the same on every rank. Token ids are drawn
    one longer than the sequence: the targets are the inputs shifted by one token."""
    generator = torch.Generator().manual_seed(seed * 7919 + iteration)
    first, last = model.layers[0], model.layers[-1]
    kind = loss_kind(model)
    if first.input_dtype == "int64":
        vocab, seq = first.options["vocab_size"], first.input_shape[0]
        ids = torch.randint(0, vocab, (batch_size, seq + 1), generator=generator)
        inputs = ids[:, :seq].clone()
        if kind == "tokens" and last.options["vocab_size"] == vocab and last.output_shape[0] == seq:
            return inputs, ids[:, 1:].clone()
    else:
        inputs = torch.randn(batch_size, *first.input_shape, generator=generator)
    if kind == "tokens":
        return inputs, torch.randint(0, last.output_shape[-1], (batch_size, last.output_shape[0]),
                                     generator=generator)
    if kind == "classes":
        return inputs, torch.randint(0, last.output_shape[0], (batch_size,), generator=generator)
    return inputs, torch.randn(batch_size, *last.output_shape, generator=generator)


def loss_fn(model: ModelSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of a micro-batch's output and targets, a mean over its samples (and tokens)."""
    kind = loss_kind(model)
    functional = torch.nn.functional
    if kind == "tokens":
        return lambda out, y: functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    if kind == "classes":
        return functional.cross_entropy
    return functional.mse_loss


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float = 0.01) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr * 0.1)
    raise ValueError(f"unknown optimizer {name!r} (allowed: sgd, adam)")


def static_bytes(module: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of parameters, gradients and optimizer state actually allocated."""
    total = 0
    for param in module.parameters() if module is not None else ():
        total += param.numel() * param.element_size()
        if param.grad is not None:
            total += param.grad.numel() * param.grad.element_size()
    for state in optimizer.state.values() if optimizer is not None else ():
        for value in state.values():
            if torch.is_tensor(value) and value.dim() > 0:
                total += value.numel() * value.element_size()
    return total
