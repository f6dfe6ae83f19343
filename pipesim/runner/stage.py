"""Torch modules and synthetic data, built from the same ModelSpec the simulator uses.

Every layer is initialised from its global index, so a stage holds exactly the
parameters the whole model would hold for those layers, however it is cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..model import LayerSpec


def make_layer(spec: LayerSpec, index: int, seed: int) -> nn.Module:
    """Linear + ReLU with PyTorch's default uniform init, seeded by layer index."""
    if spec.kind != "fc":
        raise ValueError(f"the runner cannot build layer kind {spec.kind!r}")
    linear = nn.Linear(spec.in_features, spec.out_features)
    generator = torch.Generator().manual_seed(seed * 100_003 + index)
    bound = 1.0 / math.sqrt(spec.in_features)
    with torch.no_grad():
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
    return nn.Sequential(linear, nn.ReLU())


def make_stage(layers: Sequence[LayerSpec], first_index: int, seed: int) -> nn.Sequential:
    return nn.Sequential(*(make_layer(spec, first_index + i, seed) for i, spec in enumerate(layers)))


def synthetic_batch(iteration: int, batch_size: int, in_features: int, out_features: int,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and MSE targets of one mini-batch; the same on every rank."""
    generator = torch.Generator().manual_seed(seed * 7919 + iteration)
    inputs = torch.randn(batch_size, in_features, generator=generator)
    targets = torch.randn(batch_size, out_features, generator=generator)
    return inputs, targets


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float = 0.01) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr * 0.1)
    raise ValueError(f"unknown optimizer {name!r} (allowed: sgd, adam)")
    raise ValueError(f"unknown optimizer {name!r}")


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
