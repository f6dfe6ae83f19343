"""Costs by layer kind and shape: the profile's ``kinds`` section (version 3).

For every kind `pipesim calibrate --model` measured, the profile holds the shapes it
measured (a layer's ``cost_key``: kind, config and input shape) with their per-layer
seconds at each micro-batch size, and one fitted law per direction (forward, backward,
input gradient I, weight gradients W)::

    "kinds": {
      "conv2d": {
        "laws": {"forward": {"fixed_s": 0.0, "s_per_param": 0.0, "s_per_flop": 1e-11, "s_per_byte": 1e-10},
                 "backward": {...}, "input": {...}, "weight": {...}},
        "shapes": [{"key": "conv2d(...)@3x32x32", "params": 448, "flops_per_sample": 9.1e5,
                    "bytes_per_sample": 1.8e5, "microbatch_sizes": [1, 4, 16],
                    "forward": [..], "backward": [..], "input": [..], "weight": [..]}]
      }
    }

A layer whose key was measured costs what was measured (piecewise linear in the
micro-batch size, extended linearly past the ends, as the fc tables are). Any other
shape of a measured kind costs what the law says,
``fixed_s + s_per_param * params + b * (s_per_flop * flops + s_per_byte * bytes)`` per
layer and micro-batch of b samples, where ``flops`` are the layer's forward FLOPs per
sample and ``bytes`` the bytes it moves per sample (its input, its output and what it
saves for backward): such a cost is *extrapolated*, and `Extrapolation` says how far
(the FLOPs ratio to the largest shape of the kind that was measured).

Knows nothing of torch or simpy; scipy only in `fit_law` (calibration).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError
from .limits import MAX_SECONDS, check_number
from .model import LayerSpec
from .profile import Profile, ProfileError, Table, piecewise
from .schedule import Kind

DIRECTIONS = ("forward", "backward", "input", "weight")  # F, B, I, W
DIRECTION_OF = {Kind.F: "forward", Kind.B: "backward", Kind.I: "input", Kind.W: "weight"}
_LAW_KEYS = ("fixed_s", "s_per_param", "s_per_flop", "s_per_byte")
_SHAPE_KEYS = {"key", "params", "flops_per_sample", "bytes_per_sample", "microbatch_sizes", *DIRECTIONS}


def moved_bytes_per_sample(layer: LayerSpec) -> int:
    """What a layer reads and writes per sample, roughly: its input, its output and what it saves."""
    return layer.input_bytes_per_sample + layer.output_bytes_per_sample + layer.saved_bytes_per_sample


@dataclass(frozen=True)
class KindLaw:
    """Per-layer seconds of one direction of one kind, from its size."""

    fixed_s: float = 0.0
    s_per_param: float = 0.0
    s_per_flop: float = 0.0
    s_per_byte: float = 0.0

    def time_s(self, samples: int, params: int, flops_per_sample: float, bytes_per_sample: float) -> float:
        return (self.fixed_s + self.s_per_param * params
                + samples * (self.s_per_flop * flops_per_sample + self.s_per_byte * bytes_per_sample))

    def to_json(self) -> dict[str, float]:
        return {key: float(getattr(self, key)) for key in _LAW_KEYS}


@dataclass(frozen=True)
class MeasuredShape:
    """One measured layer shape: per-layer seconds per direction at each micro-batch size."""

    key: str
    params: int
    flops_per_sample: float
    bytes_per_sample: float
    microbatch_sizes: tuple[int, ...]
    seconds: dict[str, tuple[float, ...]]  # direction -> one per micro-batch size

    def time_s(self, direction: str, samples: int) -> float:
        return piecewise(self.microbatch_sizes, self.seconds[direction], samples)

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "params": self.params, "flops_per_sample": self.flops_per_sample,
                "bytes_per_sample": self.bytes_per_sample, "microbatch_sizes": list(self.microbatch_sizes),
                **{d: list(self.seconds[d]) for d in DIRECTIONS}}


@dataclass(frozen=True)
class KindCosts:
    """What a profile knows of one kind: its measured shapes and its laws."""

    kind: str
    laws: dict[str, KindLaw]
    shapes: tuple[MeasuredShape, ...]
    _by_key: dict[str, MeasuredShape] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._by_key.update((s.key, s) for s in self.shapes)

    def measured(self, key: str) -> MeasuredShape | None:
        return self._by_key.get(key)

    @property
    def largest(self) -> MeasuredShape:
        """The measured shape with the most forward FLOPs per sample (the most bytes on a tie)."""
        return max(self.shapes, key=lambda s: (s.flops_per_sample, s.bytes_per_sample))

    @property
    def microbatch_range(self) -> tuple[int, int]:
        sizes = [b for s in self.shapes for b in s.microbatch_sizes]
        return min(sizes), max(sizes)

    def layer_s(self, layer: LayerSpec, direction: str, samples: int) -> float:
        shape = self.measured(layer.cost_key)
        if shape is not None:
            return shape.time_s(direction, samples)
        return max(self.laws[direction].time_s(samples, layer.params, layer.forward_flops_per_sample,
                                               moved_bytes_per_sample(layer)), 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"laws": {d: self.laws[d].to_json() for d in DIRECTIONS},
                "shapes": [s.to_json() for s in self.shapes]}


@dataclass(frozen=True)
class Extrapolation:
    """A layer whose cost was not measured at its shape: where it came from and how far."""

    layer: int  # index in the model
    kind: str
    source: str  # "law" (the kind's fitted law) or "fc table" (outside the measured widths)
    ratio: float  # the layer's forward FLOPs (or bytes moved) over those of the largest measured shape
    reference: str  # that largest measured shape of its kind
    measure: str = "FLOPs"  # what `ratio` compares: "FLOPs", or "bytes" for kinds without arithmetic

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "kind": self.kind, "source": self.source,
                f"{self.measure.lower()}_ratio": self.ratio, "largest_measured": self.reference}


def priced_by_shape(profile: Profile, kind: str) -> KindCosts | None:
    """The kind's measured shapes and law, where the profile's ``compute`` does not name the
    kind itself (fc keeps its width tables where a profile has them)."""
    return None if kind in profile.compute else profile.kinds.get(kind)


def missing_kinds(profile: Profile, layers: Sequence[LayerSpec]) -> list[str]:
    """The layer kinds of `layers` the profile cannot cost, in order of appearance."""
    if "*" in profile.compute:
        return []
    known = set(profile.compute) | set(profile.kinds)
    return [kind for kind in dict.fromkeys(layer.kind for layer in layers) if kind not in known]


def _against(layer: LayerSpec, index: int, source: str, ref: MeasuredShape) -> Extrapolation:
    """How far `layer` is from the largest measured shape: in FLOPs, or in bytes moved for
    kinds that do no arithmetic (flatten)."""
    if ref.flops_per_sample > 0 and layer.forward_flops_per_sample > 0:
        return Extrapolation(index, layer.kind, source, layer.forward_flops_per_sample / ref.flops_per_sample,
                             ref.key)
    moved = moved_bytes_per_sample(layer)
    return Extrapolation(index, layer.kind, source, moved / ref.bytes_per_sample if ref.bytes_per_sample else 1.0,
                         ref.key, "bytes")


def extrapolations(profile: Profile, layers: Sequence[LayerSpec]) -> tuple[Extrapolation, ...]:
    """The layers (by index) whose costs no measurement of their shape gives: a kind's law, or
    an fc layer outside the widths of the profile's fc table; with how far they reach."""
    found = []
    fc_widths = profile.ranges.get("fc", {}).get("width")
    fc_table = isinstance(profile.compute.get("fc", (None,))[0], Table)
    for index, layer in enumerate(layers):
        by_shape = priced_by_shape(profile, layer.kind)
        if by_shape is not None:
            if by_shape.measured(layer.cost_key) is None:
                found.append(_against(layer, index, "law", by_shape.largest))
        elif layer.kind == "fc" and fc_table and fc_widths:
            width = (math.sqrt(1 + 4 * layer.params) - 1) / 2  # of the square layer this size
            if not fc_widths[0] - 0.5 <= width <= fc_widths[1] + 0.5:
                w = int(fc_widths[1])
                found.append(Extrapolation(index, "fc", "fc table",
                                           layer.forward_flops_per_sample / (2.0 * w * w + w), f"fc width {w}"))
    return tuple(found)


def summarize(extrapolations: Sequence[Extrapolation]) -> list[str]:
    """One line per kind: how many layers, and how far beyond the largest measured shape."""
    lines = []
    for kind in dict.fromkeys(e.kind for e in extrapolations):
        mine = [e for e in extrapolations if e.kind == kind]
        low, high = min(e.ratio for e in mine), max(e.ratio for e in mine)
        span = f"{high:.3g}x" if math.isclose(low, high) else f"{low:.3g}x to {high:.3g}x"
        lines.append(f"{len(mine)} {kind} layer(s) from the {mine[0].source}: {span} the {mine[0].measure} of "
                     f"the largest measured ({mine[0].reference})")
    return lines


# --- the profile section ----------------------------------------------------------------


def _number(value: Any, where: str, high: float = MAX_SECONDS) -> float:
    try:
        return check_number(f"profile field {where}", value, 0.0, high)
    except UserError as exc:
        raise ProfileError(str(exc)) from None


def _object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ProfileError(f"profile field {where} must be an object")
    return value


def _law(table: Any, where: str) -> KindLaw:
    table = _object(table, where)
    unknown = sorted(set(table) - set(_LAW_KEYS))
    if unknown:
        raise ProfileError(f"profile field {where}.{unknown[0]} is unknown (allowed: {list(_LAW_KEYS)})")
    return KindLaw(**{key: _number(table.get(key, 0.0), f"{where}.{key}") for key in _LAW_KEYS})


def _shape(table: Any, where: str) -> MeasuredShape:
    table = _object(table, where)
    if set(table) != _SHAPE_KEYS:
        raise ProfileError(f"profile field {where} needs exactly {sorted(_SHAPE_KEYS)}")
    if not isinstance(table["key"], str):
        raise ProfileError(f"profile field {where}.key must be a string")
    sizes = table["microbatch_sizes"]
    if (not isinstance(sizes, list) or not sizes or sizes != sorted(set(sizes))
            or not all(isinstance(b, int) and not isinstance(b, bool) and 0 < b <= 1 << 40 for b in sizes)):
        raise ProfileError(f"profile field {where}.microbatch_sizes must be increasing integers in 1..2**40")
    seconds = {}
    for d in DIRECTIONS:
        values = table[d]
        if not isinstance(values, list) or len(values) != len(sizes):
            raise ProfileError(f"profile field {where}.{d} must hold one number per micro-batch size")
        seconds[d] = tuple(_number(v, f"{where}.{d}[{i}]") for i, v in enumerate(values))
    return MeasuredShape(table["key"], int(_number(table["params"], f"{where}.params", 2.0**62)),
                         _number(table["flops_per_sample"], f"{where}.flops_per_sample", 1e300),
                         _number(table["bytes_per_sample"], f"{where}.bytes_per_sample", 1e300),
                         tuple(sizes), seconds)


def parse_kinds(data: Any) -> dict[str, KindCosts]:
    """The ``kinds`` section of a profile (version 3)."""
    kinds = {}
    for kind, table in _object(data, "kinds").items():
        where = f"kinds.{kind}"
        table = _object(table, where)
        if set(table) != {"laws", "shapes"}:
            raise ProfileError(f"profile field {where} needs exactly ['laws', 'shapes']")
        laws = _object(table["laws"], f"{where}.laws")
        if set(laws) != set(DIRECTIONS):
            raise ProfileError(f"profile field {where}.laws needs exactly {list(DIRECTIONS)}")
        shapes = table["shapes"]
        if not isinstance(shapes, list) or not shapes:
            raise ProfileError(f"profile field {where}.shapes must be a non-empty list")
        kinds[kind] = KindCosts(kind, {d: _law(laws[d], f"{where}.laws.{d}") for d in DIRECTIONS},
                                tuple(_shape(s, f"{where}.shapes[{i}]") for i, s in enumerate(shapes)))
    return kinds


# --- fitting (calibration) -----------------------------------------------------------------


def _independent_columns(features, order: Sequence[int]) -> list[int]:
    """Columns taken in `order` while each adds to the rank (relative scale): with too few
    shapes to tell FLOPs from bytes (one transformer block shape, say) the law keeps the
    columns listed first."""
    import numpy as np

    scaled = features / np.maximum(np.abs(features).max(axis=0), 1e-300)
    chosen: list[int] = []
    for column in order:
        trial = chosen + [column]
        if np.linalg.matrix_rank(scaled[:, trial], tol=1e-9) == len(trial):
            chosen = trial
    return chosen


def fit_law(points: Iterable[tuple[int, int, float, float, float]]) -> tuple[KindLaw, float]:
    """Nonnegative least squares on relative error over (micro-batch size, params, flops per
    sample, bytes per sample, seconds) points; returns the law and its worst relative error.
    Points with zero seconds (no weights, no W) are left out; none left: the zero law."""
    import numpy as np
    from scipy.optimize import lsq_linear

    rows = [(b, p, f, m, t) for b, p, f, m, t in points if t > 0]
    if not rows:
        return KindLaw(), 0.0
    data = np.array(rows, dtype=float)
    b, params, flops, moved, times = data.T
    features = np.column_stack([np.ones_like(b), params, b * flops, b * moved])
    # preference when the shapes cannot tell them apart: fixed, FLOPs, then params, then bytes
    columns = _independent_columns(features, (0, 2, 1, 3))
    weights = 1.0 / times
    solved = lsq_linear(features[:, columns] * weights[:, None], np.ones_like(times), bounds=(0, np.inf))
    coefficients = np.zeros(4)
    coefficients[columns] = solved.x
    worst = float(np.max(np.abs(features @ coefficients / times - 1)))
    return KindLaw(*(float(c) for c in coefficients)), worst
