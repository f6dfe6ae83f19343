"""The layer-kind registry: one entry per kind of layer a model may list.

Each entry (``LayerKind``, see base.py) holds the kind's TOML fields and their checks, a
function from (config, per-sample input shape) to ``Sizes`` (output shape and dtype,
parameters, forward FLOPs, what F saves for backward and what I and W each keep), a
builder of its torch.nn module (torch imported only then), and, through
``model.LayerSpec.cost_key``, the key a cost model looks it up by (kind, config, input
shape). Adding a kind means writing its entry and listing it in ``KINDS``; nothing else.
"""

from __future__ import annotations

from .base import (
    DTYPE_BYTES,
    FLOAT32_BYTES,
    MAX_LAYER_ELEMENTS,
    Config,
    Field,
    LayerKind,
    ModelError,
    Shape,
    ShapeError,
    Sizes,
)
from .dense import EMBEDDING, FC, LM_HEAD, TRANSFORMER_BLOCK
from .vision import AVGPOOL, BOTTLENECK, CONV2D, FLATTEN, MAXPOOL

KINDS: dict[str, LayerKind] = {k.name: k for k in (FC, CONV2D, MAXPOOL, AVGPOOL, FLATTEN, BOTTLENECK, EMBEDDING,
                                                  TRANSFORMER_BLOCK, LM_HEAD)}
LAYER_KINDS = tuple(KINDS)

__all__ = ["DTYPE_BYTES", "FLOAT32_BYTES", "KINDS", "LAYER_KINDS", "MAX_LAYER_ELEMENTS", "Config", "Field",
           "LayerKind", "ModelError", "Shape", "ShapeError", "Sizes", "get_kind"]


def get_kind(name: object, where: str) -> LayerKind:
    if name not in KINDS:
        raise ModelError(f"{where}: kind must be one of {', '.join(LAYER_KINDS)}, got {name!r}")
    return KINDS[name]
