"""What one layer's backward holds for a moment beyond the gradients at its input and output:
the weight-gradient temporaries (torch makes a parameter's gradient whole, then adds it into
.grad), which the step ledger (pipesim/ledger.py) counts as LayerSpec.backward_scratch_bytes.

For every distinct layer of the given models, one thread, .grad already allocated (as in the
runner's steps after the first): run the layer's forward on a micro-batch, then its backward
under torch's profiler (profile_memory=True), and take the peak of the allocations less what
the backward leaves (its input gradient) and less the gradient at its output, made here as a
fresh tensor. The layer's saved tensors are freed during the backward, so

    measured = peak - (input gradient + output gradient)  (+ what it saved and freed before the peak)

is what the ledger's walk charges as scratch + the activation gradients' temporaries.

Usage: python benchmarks/backward_scratch_probe.py [MODEL.toml ...] [--microbatch N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipesim.model import fc, load_model
from pipesim.runner.memory_probe import profiler_changes, running_peak_bytes

KIB = 1024


def sample_input(layer, mbs: int) -> torch.Tensor:
    shape = (mbs, *layer.input_shape)
    if layer.input_dtype == "int64":
        return torch.randint(0, 16, shape)
    return torch.randn(shape)


def probe(layer, mbs: int) -> tuple[int, int]:
    """(profiler peak over the backward, bytes of the input and output gradients)."""
    module = layer.module(seed=0)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    x = sample_input(layer, mbs)
    grads_in = x.is_floating_point()
    for _ in range(3):
        xi = x.clone().requires_grad_(grads_in)
        out = module(xi)
        gradient = torch.ones_like(out)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            out.backward(gradient)
        peak = running_peak_bytes(profiler_changes(prof))
    size = out.numel() * 4 + (x.numel() * 4 if grads_in else 0)
    return peak, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="model TOML files (default: the shipped mini models and fc)")
    parser.add_argument("--microbatch", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = Path(__file__).resolve().parents[1] / "models"
    models = [load_model(p) for p in args.models] or [
        fc(2, 1024), load_model(root / "uneven.toml"), load_model(root / "vgg16-mini.toml"),
        load_model(root / "resnet50-mini.toml"), load_model(root / "gpt2-mini.toml")]
    print(f"micro-batch {args.microbatch}; KiB")
    print(f"{'layer':70s} {'peak':>9s} {'grads':>9s} {'peak-grads':>10s} {'scratch':>9s} {'params':>9s}")
    seen = set()
    for model in models:
        for layer in model.layers:
            if layer.cost_key in seen:
                continue
            seen.add(layer.cost_key)
            peak, grads = probe(layer, args.microbatch)
            scratch = getattr(layer, "backward_scratch_bytes", 0)
            print(f"{layer.cost_key[:70]:70s} {peak / KIB:9.1f} {grads / KIB:9.1f} {(peak - grads) / KIB:10.1f} "
                  f"{scratch / KIB:9.1f} {layer.params * 4 / KIB:9.1f}", flush=True)


if __name__ == "__main__":
    main()
