"""Plain single-process training: what pipeline training must equal (runner tests)."""

from __future__ import annotations

import numpy as np
import torch

from pipesim.model import ModelSpec
from pipesim.runner.stage import (
    layer_parameters,
    loss_fn,
    make_layer,
    make_optimizer,
    synthetic_batch,
)


def reference_parameters(model: ModelSpec, steps: int, optimizer: str, batch: int,
                         seed: int, eval_mode: bool = False) -> dict[str, np.ndarray]:
    """`steps` steps on the whole mini-batch of `batch` samples; the parameters by name.
    `eval_mode`: batch-norm normalises by its running statistics (RunConfig.eval_mode)."""
    net = torch.nn.Sequential(*(make_layer(spec, i, seed) for i, spec in enumerate(model.layers)))
    net.train(not eval_mode)
    opt = make_optimizer(optimizer, net.parameters())
    loss = loss_fn(model)
    for step in range(steps):
        x, y = synthetic_batch(step, batch, model, seed)
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    named = {}
    for i, (layer, spec) in enumerate(zip(net, model.layers, strict=True)):
        named.update(layer_parameters(layer, spec, i))
    return {name: t.detach().numpy() for name, t in named.items()}
