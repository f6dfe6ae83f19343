"""Model specifications: a network is a chain of layers with known costs.

Knows nothing of torch or simpy. A layer is one of the registry's kinds
(pipesim/layers: fc, conv2d, maxpool, avgpool, flatten, bottleneck, embedding,
transformer_block, lm_head) with its config and per-sample input shape; it states
what the simulator needs (parameters, forward FLOPs, bytes saved for backward and
kept from I to W, the bytes a cut after it sends) and what the runner needs to
build it (``LayerSpec.module``). ``load_model`` reads models/*.toml
(models/README.md describes them).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .layers import (
    DTYPE_BYTES,
    FLOAT32_BYTES,
    KINDS,
    LAYER_KINDS,
    MAX_LAYER_ELEMENTS,
    ModelError,
    ShapeError,
    get_kind,
)
from .limits import MAX_LAYERS, MAX_WIDTH
from .tomlfile import read_toml

__all__ = ["FLOAT32_BYTES", "LAYER_KINDS", "LayerRow", "LayerSpec", "ModelError", "ModelSpec", "fc", "fc_layer",
           "layer", "layer_table", "load_model", "parse_model"]


@dataclass(frozen=True)
class LayerSpec:
    """One layer: its kind and config (see pipesim/layers), its per-sample input and
    output, and what the simulator needs. Byte and FLOP counts are per sample.

    ``saved_bytes_per_sample`` counts what the layer keeps for backward beyond its input
    (its inner tensors, and its output when it saves it). Whether it saves its input
    (``saves_input``) matters at a stage's first layer and where the previous layer does
    not save its output; ``ModelSpec.stage_saved_bytes`` counts each tensor once.
    From I until W a piece keeps the gradients at its parametrised ops' outputs
    (``output_grad_bytes_per_sample``) and what F saved, less its last parametrised
    layer's ``tail_saved_bytes_per_sample`` and what the layers after that saved
    (``ModelSpec.stage_weight_bytes``).
    """

    kind: str
    config: tuple[tuple[str, Any], ...]
    input_shape: tuple[int, ...]
    input_dtype: str
    output_shape: tuple[int, ...]
    output_dtype: str
    params: int
    forward_flops_per_sample: float
    matmul_flops_per_sample: float
    output_bytes_per_sample: int
    saved_bytes_per_sample: int
    saves_input: bool
    saves_output: bool
    tail_saved_bytes_per_sample: int
    output_grad_bytes_per_sample: int  # kept from the layer's I until its W (see stage_weight_bytes)
    backward_scratch_bytes: int = 0  # held for a moment by its backward (layers/base.py Sizes)
    backward_scratch_bytes_per_sample: int = 0

    def scratch_bytes(self, microbatch_size: int) -> int:
        """What the layer's backward holds for a moment beyond its input and output gradients."""
        return max(self.backward_scratch_bytes, self.backward_scratch_bytes_per_sample * microbatch_size)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def input_bytes_per_sample(self) -> int:
        return math.prod(self.input_shape) * DTYPE_BYTES[self.input_dtype]

    @property
    def in_features(self) -> int:
        """An fc layer's in_features. Other kinds have none: the code that still reads
        features (the runner's RunConfig, fc calibration) must not take them for an fc."""
        return self._fc_option("in_features")

    @property
    def out_features(self) -> int:
        return self._fc_option("out_features")

    def _fc_option(self, name: str) -> int:
        if self.kind != "fc":
            raise ModelError(f"a {self.kind} layer has no {name}: only models of fc layers can be run or "
                             "calibrated so far (other kinds: issue 14)")
        return self.options[name]

    @property
    def cost_key(self) -> str:
        """What a cost model looks this layer up by: kind, config and input shape, e.g.
        ``conv2d(batch_norm=False,in_channels=3,kernel=3,out_channels=64,padding=1,stride=1)@3x32x32``."""
        options = ",".join(f"{k}={v}" for k, v in self.config)
        return f"{self.kind}({options})@{'x'.join(map(str, self.input_shape))}"

    def module(self, seed: int | None = None):
        """This layer as a torch.nn module (torch imported here) with torch's default
        initialisation, drawn from ``seed`` when given (the global RNG is left as it was),
        so that a layer is the same however the model is cut. Build it under
        ``torch.device("meta")`` to count without allocating."""
        build = KINDS[self.kind].build
        if seed is None:
            return build(self.options, self.input_shape)
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build(self.options, self.input_shape)


@functools.lru_cache(maxsize=4096)
def _layer(kind: str, config: tuple[tuple[str, Any], ...], input_shape: tuple[int, ...]) -> LayerSpec:
    entry = KINDS[kind]
    sizes = entry.sizes(dict(config), input_shape)
    if sizes.params > MAX_LAYER_ELEMENTS or math.prod(sizes.output_shape) > MAX_LAYER_ELEMENTS:
        raise ShapeError(f"{kind} layer is too large: beyond {MAX_LAYER_ELEMENTS:,} parameters or output elements")
    out_bytes = math.prod(sizes.output_shape) * DTYPE_BYTES[sizes.output_dtype]
    return LayerSpec(
        kind=kind, config=config, input_shape=input_shape, input_dtype=entry.input_dtype,
        output_shape=sizes.output_shape, output_dtype=sizes.output_dtype, params=sizes.params,
        forward_flops_per_sample=sizes.forward_flops, matmul_flops_per_sample=sizes.matmul_flops,
        output_bytes_per_sample=out_bytes,
        saved_bytes_per_sample=sizes.internal_saved_bytes + (out_bytes if sizes.saves_output else 0),
        saves_input=sizes.saves_input, saves_output=sizes.saves_output,
        tail_saved_bytes_per_sample=sizes.tail_saved_bytes,
        output_grad_bytes_per_sample=sizes.weight_grad_bytes,
        backward_scratch_bytes=sizes.backward_scratch_bytes,
        backward_scratch_bytes_per_sample=sizes.backward_scratch_bytes_per_sample,
    )


def layer(kind: str, input_shape: tuple[int, ...] | None = None, where: str = "layer", **fields) -> LayerSpec:
    """A layer of a registered kind from its fields; the input shape comes from the kind
    itself where it can state it (fc, embedding), else it must be given."""
    entry = get_kind(kind, where)
    config = entry.config(fields, where)
    if input_shape is None:
        if entry.own_input is None:
            raise ModelError(f"{where}: a {kind} layer needs an input shape (give the model an input_shape)")
        input_shape = entry.own_input(config)
    try:
        return _layer(kind, tuple(sorted(config.items())), tuple(input_shape))
    except ShapeError as exc:
        raise ShapeError(f"{where}: {exc}") from None


def fc_layer(in_features: int, out_features: int, activation: str = "relu") -> LayerSpec:
    """Linear(in, out) + ReLU (or no activation) in float32.

    Linear saves its input (counted as the previous layer's output) and ReLU
    saves its result, so each layer adds one output's worth of saved bytes.
    """
    if not (1 <= in_features <= MAX_WIDTH and 1 <= out_features <= MAX_WIDTH):
        raise ModelError(f"fc layer features must be in 1..{MAX_WIDTH}, got {in_features}x{out_features}")
    return layer("fc", in_features=in_features, out_features=out_features, activation=activation)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: tuple[LayerSpec, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def input_features(self) -> int:
        return self.layers[0].in_features

    @property
    def output_features(self) -> int:
        return self.layers[-1].out_features

    def boundary_saved(self, index: int, first: int, last: int) -> bool:
        """Whether a stage of layers first..last keeps the output of layer ``index``
        (``first - 1``: the stage's input): its producer saves it, or its consumer does."""
        return ((first <= index <= last and self.layers[index].saves_output)
                or (first <= index + 1 <= last and self.layers[index + 1].saves_input))

    def stage_saved_bytes(self, first: int, last: int) -> int:
        """Bytes per sample a stage of layers first..last keeps for backward: each layer's
        own saved bytes (its output included when it saves it), the stage's input when the
        first layer saves it, and a layer's output that only the next layer saves, each
        tensor once."""
        layers = self.layers[first : last + 1]
        total = layers[0].input_bytes_per_sample if layers[0].saves_input else 0
        for x, after in itertools.pairwise(layers):
            if after.saves_input and not x.saves_output:
                total += x.output_bytes_per_sample
        return total + sum(x.saved_bytes_per_sample for x in layers)

    @property
    def loss(self) -> str:
        """The loss the runner trains the model's output with: cross-entropy behind a
        classifier or language-model head (an lm_head, or an fc layer without activation),
        else mean squared error (the fc models' regression)."""
        last = self.layers[-1]
        head = last.kind == "lm_head" or (last.kind == "fc" and last.options.get("activation") == "none")
        return "cross_entropy" if head else "mse"

    @property
    def loss_saved_bytes_per_sample(self) -> int:
        """What the loss keeps for backward that no layer keeps. Cross-entropy is log-softmax
        then NLL: log-softmax saves its result, one float per logit (S x V per sample for a
        language model: 206 MB at GPT-2 small's 1024 tokens and 50,257 words); NLL saves that
        same result and the targets, which exist before the step. Mean squared error saves the
        output (counted here when the last layer does not save it) and the target."""
        last = self.layers[-1]
        if self.loss == "cross_entropy":
            return math.prod(last.output_shape) * FLOAT32_BYTES
        return 0 if last.saves_output else last.output_bytes_per_sample

    @property
    def loss_backward_bytes_per_sample(self) -> int:
        """What the loss's backward holds for a moment (the ledger's B and I of the last piece,
        beside the layers' walk): cross-entropy makes NLL's gradient and then log-softmax's,
        each one float per logit, while its saved result is still held (measured with
        benchmarks/memory_grid.py: gpt2-mini on one rank, 16 MiB at micro-batch 8). Mean
        squared error's gradient is the output's, which the walk counts already."""
        if self.loss == "cross_entropy":
            return 2 * math.prod(self.layers[-1].output_shape) * FLOAT32_BYTES
        return 0

    @property
    def target_bytes_per_sample(self) -> int:
        """The target a sample's loss compares with (runner/stage.synthetic_batch): one int64
        class label or next-token id per output position for cross-entropy, the output's own
        shape in float32 for mean squared error."""
        last = self.layers[-1]
        if self.loss == "cross_entropy":
            return 8 * math.prod(last.output_shape[:-1])
        return last.output_bytes_per_sample

    def piece_saved_bytes(self, first: int, last: int) -> int:
        """What the ledger holds per sample from a piece's F until its B (or I): its layers'
        saved bytes (stage_saved_bytes) and, on the last piece, the loss's."""
        loss = self.loss_saved_bytes_per_sample if last == self.num_layers - 1 else 0
        return self.stage_saved_bytes(first, last) + loss

    def stage_weight_bytes(self, first: int, last: int) -> int:
        """Bytes per sample a piece keeps from its I (input gradient) until its W (weight
        gradients), as torch's split backward does (pipesim/layers/base.py Sizes): the
        gradients at its parametrised ops' outputs, which I computes, and the autograd graph
        below its last parametrised op. I frees what that op's successors saved (for fc, the
        last ReLU's result); the rest goes at W. A piece without parameters keeps nothing.
        For fc layers the ledger therefore grows at I: the output gradients W needs outweigh
        the one saved output I frees."""
        last_weighted = next((i for i in range(last, first - 1, -1) if self.layers[i].params), None)
        if last_weighted is None:
            return 0
        kept = self.stage_saved_bytes(first, last_weighted) - self.layers[last_weighted].tail_saved_bytes_per_sample
        return kept + sum(x.output_grad_bytes_per_sample for x in self.layers[first : last_weighted + 1])

    def describe(self) -> str:
        if all(layer.kind == "fc" for layer in self.layers):
            widths = sorted({layer.out_features for layer in self.layers})
            width = str(widths[0]) if len(widths) == 1 else f"{widths[0]}..{widths[-1]}"
            return f"{self.name}: {self.num_layers} fc layers, width {width}, {self.params:,} params"
        counts: dict[str, int] = {}
        for x in self.layers:
            counts[x.kind] = counts.get(x.kind, 0) + 1
        kinds = ", ".join(f"{n} {kind}" for kind, n in counts.items())
        return f"{self.name}: {self.num_layers} layers ({kinds}), {self.params:,} params"


@dataclass(frozen=True)
class LayerRow:
    """One line of a model's per-layer table (per sample), for writing partitions by hand.

    ``saved_bytes_per_sample`` attributes each saved tensor to the layer that produces it
    (row 0 also holds the model's input if it is saved), so the rows sum to what one stage
    holding the whole model saves. ``message_bytes_per_sample`` is what a cut after the
    layer sends each way (its output forward, that output's gradient backward); None after
    the last layer."""

    index: int
    kind: str
    output_shape: tuple[int, ...]
    params: int
    forward_flops_per_sample: float
    saved_bytes_per_sample: int
    message_bytes_per_sample: int | None


def layer_table(model: ModelSpec) -> tuple[LayerRow, ...]:
    last = model.num_layers - 1
    rows = []
    for i, x in enumerate(model.layers):
        inner = x.saved_bytes_per_sample - (x.output_bytes_per_sample if x.saves_output else 0)
        saved = inner + (x.output_bytes_per_sample if model.boundary_saved(i, 0, last) else 0)
        if i == 0 and x.saves_input:
            saved += x.input_bytes_per_sample
        rows.append(LayerRow(i, x.kind, x.output_shape, x.params, x.forward_flops_per_sample, saved,
                             x.output_bytes_per_sample if i < last else None))
    return tuple(rows)


def fc(num_layers: int = 32, width: int = 512, name: str | None = None) -> ModelSpec:
    """The network the project grew from: N equal fully connected layers."""
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ModelError(f"--layers must be in 1..{MAX_LAYERS}, got {num_layers}")
    if not 1 <= width <= MAX_WIDTH:
        raise ModelError(f"--width must be in 1..{MAX_WIDTH}, got {width}")
    layers = (fc_layer(width, width),) * num_layers
    return ModelSpec(name or f"fc{num_layers}x{width}", layers)


# --- TOML loading -------------------------------------------------------------

_TOP_KEYS = {"name", "fc", "layers", "input_shape"}
_FC_KEYS = {"num_layers", "width"}


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ModelError(f"{where}: expected a table, got {table!r}")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ModelError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


_INT_LIMITS = {"num_layers": MAX_LAYERS, "repeat": MAX_LAYERS}  # others are features: MAX_WIDTH


def _require_int(table: dict, key: str, where: str) -> int:
    if key not in table:
        raise ModelError(f"{where}: missing field {key!r}")
    value, high = table[key], _INT_LIMITS.get(key, MAX_WIDTH)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise ModelError(f"{where}: {key!r} must be an integer in 1..{high}, got {value!r}")
    return value


def _input_shape(data: dict, where: str) -> tuple[int, ...] | None:
    if "input_shape" not in data:
        return None
    shape = data["input_shape"]
    if (not isinstance(shape, list) or not 1 <= len(shape) <= 4
            or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_WIDTH for n in shape)):
        raise ModelError(f"{where}: 'input_shape' must be a list of 1 to 4 integers in 1..{MAX_WIDTH} "
                         f"(per sample, e.g. [3, 224, 224]), got {shape!r}")
    return tuple(shape)


def _one_entry(entry: object, shape: tuple[int, ...] | None, at: str) -> tuple[LayerSpec, int]:
    """One [[layers]] table: its layer (given the previous output shape) and its repeat."""
    if not isinstance(entry, dict):
        raise ModelError(f"{at}: expected a table, got {entry!r}")
    entry = dict(entry)
    kind = get_kind(entry.pop("kind", None), at)
    repeat = _require_int(entry, "repeat", at) if "repeat" in entry else 1
    entry.pop("repeat", None)
    spec = layer(kind.name, shape, where=at, **entry)
    if repeat > 1 and (spec.output_shape, spec.output_dtype) != (spec.input_shape, spec.input_dtype):
        raise ModelError(f"{at}: repeat needs {kind.repeat_rule}")
    return spec, repeat


def _layers_from_table(entries: list, where: str, shape: tuple[int, ...] | None) -> tuple[LayerSpec, ...]:
    if not isinstance(entries, list):
        raise ModelError(f"{where}: layers must be an array of tables, written [[layers]]")
    layers: list[LayerSpec] = []
    for index, entry in enumerate(entries):
        at = f"{where} layers[{index}]"
        spec, repeat = _one_entry(entry, layers[-1].output_shape if layers else shape, at)
        if layers and layers[-1].output_dtype != spec.input_dtype:
            raise ModelError(f"{at}: a {spec.kind} layer takes {spec.input_dtype} input, but the previous "
                             f"layer gives {layers[-1].output_dtype}")
        if len(layers) + repeat > MAX_LAYERS:
            raise ModelError(f"{at}: the model would have {len(layers) + repeat:,} layers, beyond the "
                             f"limit of {MAX_LAYERS:,}")
        layers.extend([spec] * repeat)
    return tuple(layers)


def parse_model(data: dict, where: str = "model") -> ModelSpec:
    """Build a ModelSpec from a parsed TOML table (see models/*.toml)."""
    _check_keys(data, _TOP_KEYS, where)
    if "name" not in data:
        raise ModelError(f"{where}: missing field 'name'")
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise ModelError(f"{where}: 'name' must be a non-empty string, got {name!r}")
    if ("fc" in data) == ("layers" in data):
        raise ModelError(f"{where}: give exactly one of [fc] or [[layers]]")
    if "fc" in data:
        if "input_shape" in data:
            raise ModelError(f"{where}: input_shape goes with [[layers]]; [fc] states its width")
        _check_keys(data["fc"], _FC_KEYS, f"{where} [fc]")
        return fc(
            _require_int(data["fc"], "num_layers", f"{where} [fc]"),
            _require_int(data["fc"], "width", f"{where} [fc]"),
            name=name,
        )
    layers = _layers_from_table(data["layers"], where, _input_shape(data, where))
    if not layers:
        raise ModelError(f"{where}: [[layers]] is empty")
    return ModelSpec(name, layers)


def load_model(path: str | Path) -> ModelSpec:
    return parse_model(read_toml(path, ModelError, "model"), where=str(path))
