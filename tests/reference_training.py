"""Plain single-process training: what pipeline training must equal (runner tests)."""

from __future__ import annotations

import numpy as np
import torch

from pipesim.model import ModelSpec
from pipesim.runner.stage import make_layer, synthetic_batch


def reference_parameters(model: ModelSpec, steps: int, optimizer: str, batch: int,
                         seed: int) -> dict[str, np.ndarray]:
    """`steps` steps on the whole mini-batch of `batch` samples; the parameters by name."""
    net = torch.nn.Sequential(*(make_layer(spec, i, seed) for i, spec in enumerate(model.layers)))
    if optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=0.001)
    for step in range(steps):
        x, y = synthetic_batch(step, batch, model.input_features, model.output_features, seed)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return {f"{i}.{name}": t.detach().numpy() for i, layer in enumerate(net)
            for name, t in layer[0].named_parameters()}
