"""Model specifications: a network is a chain of layers with known costs.

Knows nothing of torch or simpy. A layer states what the simulator needs
(parameters, forward FLOPs, activation bytes) and what the runner needs to
build it (kind and shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .limits import MAX_LAYERS, MAX_WIDTH
from .tomlfile import read_toml

FLOAT32_BYTES = 4
LAYER_KINDS = ("fc",)  # fc = Linear + ReLU


class ModelError(UserError):
    """A model spec that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer. Byte and FLOP counts are per sample.

    ``saved_bytes_per_sample`` counts what the layer keeps for backward beyond
    its input (the input is the previous layer's output and is counted there;
    a stage also keeps its own input, see ``ModelSpec.stage_saved_bytes``).
    """

    kind: str
    in_features: int
    out_features: int
    params: int
    forward_flops_per_sample: float
    output_bytes_per_sample: int
    saved_bytes_per_sample: int
    output_grad_bytes_per_sample: int = 0  # kept from the layer's I until its W (see stage_weight_bytes)

    @property
    def input_bytes_per_sample(self) -> int:
        return self.in_features * FLOAT32_BYTES


def fc_layer(in_features: int, out_features: int) -> LayerSpec:
    """Linear(in, out) + ReLU in float32.

    Linear saves its input (counted as the previous layer's output) and ReLU
    saves its result, so each layer adds one output's worth of saved bytes.
    """
    if not (1 <= in_features <= MAX_WIDTH and 1 <= out_features <= MAX_WIDTH):
        raise ModelError(f"fc layer features must be in 1..{MAX_WIDTH}, got {in_features}x{out_features}")
    out_bytes = out_features * FLOAT32_BYTES
    return LayerSpec(
        kind="fc",
        in_features=in_features,
        out_features=out_features,
        params=in_features * out_features + out_features,
        forward_flops_per_sample=2.0 * in_features * out_features + out_features,
        output_bytes_per_sample=out_bytes,
        saved_bytes_per_sample=out_bytes,
        output_grad_bytes_per_sample=out_bytes,
    )


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

    def stage_saved_bytes(self, first: int, last: int) -> int:
        """Bytes per sample a stage of layers first..last keeps for backward."""
        layers = self.layers[first : last + 1]
        return layers[0].input_bytes_per_sample + sum(x.saved_bytes_per_sample for x in layers)

    def stage_weight_bytes(self, first: int, last: int) -> int:
        """Bytes per sample a piece keeps from its I (input gradient) until its W
        (weight gradients): what the weight gradients need, each layer's input
        and the gradient of its output, which I computes. What only I needed
        (here the last ReLU's saved output) is freed at I; the rest at W.
        For fc layers the ledger therefore grows at I: the output gradients
        W needs outweigh the one saved output I frees."""
        layers = self.layers[first : last + 1]
        return sum(x.input_bytes_per_sample + x.output_grad_bytes_per_sample for x in layers)

    def describe(self) -> str:
        widths = sorted({layer.out_features for layer in self.layers})
        width = str(widths[0]) if len(widths) == 1 else f"{widths[0]}..{widths[-1]}"
        return f"{self.name}: {self.num_layers} fc layers, width {width}, {self.params:,} params"


def fc(num_layers: int = 32, width: int = 512, name: str | None = None) -> ModelSpec:
    """The network the project grew from: N equal fully connected layers."""
    if not 1 <= num_layers <= MAX_LAYERS:
        raise ModelError(f"--layers must be in 1..{MAX_LAYERS}, got {num_layers}")
    if not 1 <= width <= MAX_WIDTH:
        raise ModelError(f"--width must be in 1..{MAX_WIDTH}, got {width}")
    layers = tuple(fc_layer(width, width) for _ in range(num_layers))
    return ModelSpec(name or f"fc{num_layers}x{width}", layers)


# --- TOML loading -------------------------------------------------------------

_TOP_KEYS = {"name", "fc", "layers"}
_FC_KEYS = {"num_layers", "width"}
_LAYER_KEYS = {"kind", "in_features", "out_features", "repeat"}


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


def _layers_from_table(entries: list, where: str) -> tuple[LayerSpec, ...]:
    if not isinstance(entries, list):
        raise ModelError(f"{where}: layers must be an array of tables, written [[layers]]")
    layers: list[LayerSpec] = []
    for index, entry in enumerate(entries):
        at = f"{where} layers[{index}]"
        _check_keys(entry, _LAYER_KEYS, at)
        kind = entry.get("kind")
        if kind not in LAYER_KINDS:
            raise ModelError(f"{at}: kind must be one of {', '.join(LAYER_KINDS)}, got {kind!r}")
        in_f = _require_int(entry, "in_features", at)
        out_f = _require_int(entry, "out_features", at)
        repeat = _require_int(entry, "repeat", at) if "repeat" in entry else 1
        if repeat > 1 and in_f != out_f:
            raise ModelError(f"{at}: repeat needs in_features == out_features")
        if len(layers) + repeat > MAX_LAYERS:
            raise ModelError(f"{at}: the model would have {len(layers) + repeat:,} layers, beyond the "
                             f"limit of {MAX_LAYERS:,}")
        if layers and layers[-1].out_features != in_f:
            raise ModelError(
                f"{at}: in_features {in_f} does not match the previous layer's "
                f"out_features {layers[-1].out_features}"
            )
        layers.extend(fc_layer(in_f, out_f) for _ in range(repeat))
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
        _check_keys(data["fc"], _FC_KEYS, f"{where} [fc]")
        return fc(
            _require_int(data["fc"], "num_layers", f"{where} [fc]"),
            _require_int(data["fc"], "width", f"{where} [fc]"),
            name=name,
        )
    layers = _layers_from_table(data["layers"], where)
    if not layers:
        raise ModelError(f"{where}: [[layers]] is empty")
    return ModelSpec(name, layers)


def load_model(path: str | Path) -> ModelSpec:
    return parse_model(read_toml(path, ModelError, "model"), where=str(path))
