"""The registry's building blocks: a kind's fields, its sizes, and the kind itself.

Knows nothing of torch: a kind's ``build`` imports torch itself, when called.
All sizes are per sample; shapes leave the batch dimension out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..limits import MAX_WIDTH

Shape = tuple[int, ...]
Config = Mapping[str, Any]

DTYPE_BYTES = {"float32": 4, "int64": 8}
FLOAT32_BYTES = DTYPE_BYTES["float32"]

MAX_LAYER_ELEMENTS = 1 << 40
"""Parameters of one layer, or elements of one sample's output: 4 TiB in float32, beyond any
real layer, and it keeps every byte count, FLOP count and time a finite float."""


class ModelError(UserError):
    """A model spec that cannot be used; the message is one line for the user."""


class ShapeError(ModelError):
    """A layer that cannot take the input it is given; the loader adds where it is."""


@dataclass(frozen=True)
class Field:
    """One key of a kind's TOML table: an integer in low..high, a bool, or one of choices."""

    name: str
    type: type = int
    default: Any = None  # None: required
    low: int = 1
    high: int = MAX_WIDTH
    choices: tuple[str, ...] = ()

    def check(self, value: Any, where: str) -> Any:
        if self.choices:
            if value not in self.choices:
                raise ModelError(f"{where}: {self.name!r} must be one of {', '.join(self.choices)}, got {value!r}")
        elif self.type is bool:
            if not isinstance(value, bool):
                raise ModelError(f"{where}: {self.name!r} must be true or false, got {value!r}")
        elif not isinstance(value, int) or isinstance(value, bool) or not self.low <= value <= self.high:
            raise ModelError(f"{where}: {self.name!r} must be an integer in {self.low}..{self.high}, got {value!r}")
        return value


@dataclass(frozen=True)
class Sizes:
    """What a layer costs, per sample, given its config and input shape.

    Saved bytes (what F keeps for backward, every tensor once, parameters excluded) are
    split so that a stage can count a tensor shared by two layers once: the layer's input
    (``saves_input``), its output (``saves_output``) and everything in between
    (``internal_saved_bytes``).

    I and W follow torch's split backward (``stage_backward_input`` /
    ``stage_backward_weight``, what the runner calls): I keeps the gradients at the
    parametrised ops' outputs (``weight_grad_bytes``, summed as the runner counts them) and
    the autograd graph below the piece's last parametrised op, so of what F saved it frees
    only what that last op's successors saved: the last parametrised layer's
    ``tail_saved_bytes`` (e.g. its final ReLU's result) and everything saved by the
    parameter-free layers after it. W frees the rest. (``ModelSpec.stage_weight_bytes``.)

    A backward also holds temporaries for a moment (``backward_scratch_bytes``, and
    ``backward_scratch_bytes_per_sample`` x micro-batch size, whichever is larger) besides
    the gradients at the layer's input and output.
    """

    output_shape: Shape
    output_dtype: str
    params: int
    matmul_flops: float  # 2 x multiply-adds of linear, convolution and batched matmul ops
    elementwise_flops: float  # 1 per output element of activations, norms, adds; pooling: per window element
    saves_input: bool
    saves_output: bool
    internal_saved_bytes: int
    tail_saved_bytes: int  # saved after the layer's last parametrised op (read only for layers with parameters)
    weight_grad_bytes: int
    # What its backward holds for a moment beyond the gradients at its input and output
    # (the step ledger's walk, pipesim/ledger.py): the larger of a fixed part, a weight
    # gradient made whole before it is added into .grad (and torch's CPU convolution's
    # second weight-sized buffer), and a per-sample part (activation-sized temporaries).
    # Measured per kind by benchmarks/backward_scratch_probe.py.
    backward_scratch_bytes: int = 0
    backward_scratch_bytes_per_sample: int = 0

    @property
    def forward_flops(self) -> float:
        return self.matmul_flops + self.elementwise_flops


@dataclass(frozen=True)
class LayerKind:
    """One registry entry. ``sizes`` and ``build`` take the checked config and the input
    shape; ``sizes`` raises ShapeError for an input it cannot take. ``own_input`` gives the
    input (shape, dtype) a kind can state by itself (fc, embedding), so that a model may
    start with it; other kinds get theirs from the previous layer or the model's input_shape."""

    name: str
    fields: tuple[Field, ...]
    sizes: Callable[[Config, Shape], Sizes]
    build: Callable[[Config, Shape], Any]
    input_dtype: str = "float32"
    own_input: Callable[[Config], Shape] | None = None
    repeat_rule: str = "an output shape equal to its input shape"

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def config(self, table: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The kind's fields from a TOML table (kind and repeat already removed): every
        key known, every value checked, defaults filled in."""
        unknown = sorted(set(table) - set(self.keys))
        if unknown:
            allowed = ", ".join(sorted({*self.keys, "kind", "repeat"}))
            raise ModelError(f"{where}: unknown key {unknown[0]!r} for kind {self.name} (allowed: {allowed})")
        config = {}
        for f in self.fields:
            if f.name not in table and f.default is None:
                raise ModelError(f"{where}: missing field {f.name!r}")
            config[f.name] = f.check(table[f.name], where) if f.name in table else f.default
        return config


def numel(shape: Shape) -> int:
    return math.prod(shape)


def float_bytes(*shapes_or_counts: Shape | int) -> int:
    """float32 bytes of the given shapes (or element counts), summed."""
    return FLOAT32_BYTES * sum(x if isinstance(x, int) else numel(x) for x in shapes_or_counts)


def expect_rank(shape: Shape, rank: int, what: str) -> None:
    if len(shape) != rank:
        raise ShapeError(f"expects a {what} input, got shape {shape}")


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    """Output length of a convolution or pooling window along one axis (floor mode)."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise ShapeError(f"window {kernel} (stride {stride}, padding {padding}) does not fit an input of {size}")
    return out
