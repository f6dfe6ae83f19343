"""The cost model: what each piece of work costs, in seconds and bytes.

The engine asks only this interface; it never sees FLOPs or profiles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

from .model import FLOAT32_BYTES, LayerSpec
from .profile import Affine, Link, Profile, ProfileError, Table, piecewise

# Optimizer state in parameter-sized tensors.
OPTIMIZER_STATE_COPIES = {"sgd": 1, "adam": 2}  # SGD with momentum: 1 buffer; Adam: 2


def _warn_outside_range(profile: Profile, kind: str, width: int, microbatch_size: int) -> None:
    measured = profile.ranges.get(kind, {})
    for name, value in (("width", width), ("microbatch_size", microbatch_size)):
        low, high = measured.get(name, (value, value))
        if not low <= value <= high:
            _warn_once(f"profile {profile.name!r} measured {kind} {name} {low}..{high}; "
                       f"{value} is extrapolated by the fitted model")


@lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=2)


class CostModel(Protocol):
    def compute_s(self, layers: Sequence[LayerSpec], kind: str, microbatch_size: int) -> float: ...
    def transfer_s(self, src: int, dst: int, nbytes: int) -> float: ...
    def link_id(self, src: int, dst: int) -> Hashable: ...
    def optimizer_s(self, params: int) -> float: ...
    def static_bytes(self, params: int) -> int: ...


@dataclass(frozen=True)
class ProfileCostModel:
    """Costs read from a Profile.

    ``ranks_per_node``: None puts all ranks on one node (intra-node links);
    otherwise rank r sits on node r // ranks_per_node. Each direction between
    two ranks is its own link: transfers on it are serialised.
    """

    profile: Profile
    optimizer: str = "sgd"
    ranks_per_node: int | None = None

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_STATE_COPIES:
            raise ProfileError(
                f"unknown optimizer {self.optimizer!r} (allowed: {', '.join(OPTIMIZER_STATE_COPIES)})"
            )

    def _coefficients(self, kind: str) -> tuple[Affine | Table, Affine | Table]:
        compute = self.profile.compute
        if kind in compute:
            return compute[kind]
        if "*" in compute:
            return compute["*"]
        raise ProfileError(
            f"profile {self.profile.name!r} has no costs for layer kind {kind!r} "
            f"(it has: {', '.join(compute)})"
        )

    def layer_s(self, layer: LayerSpec, kind: str, microbatch_size: int) -> float:
        width = round((math.sqrt(1 + 4 * layer.params) - 1) / 2)  # of the square layer this size
        _warn_outside_range(self.profile, layer.kind, width, microbatch_size)
        forward, backward = self._coefficients(layer.kind)
        affine = forward if kind == "F" else backward
        return affine.time_s(microbatch_size, layer.params, layer.forward_flops_per_sample)

    def compute_s(self, layers: Sequence[LayerSpec], kind: str, microbatch_size: int) -> float:
        work = sum(self.layer_s(layer, kind, microbatch_size) for layer in layers)
        return work + self.profile.action_overhead_s

    def _link(self, src: int, dst: int) -> Link:
        if self.ranks_per_node is None or src // self.ranks_per_node == dst // self.ranks_per_node:
            return self.profile.intra_node
        return self.profile.inter_node

    def transfer_s(self, src: int, dst: int, nbytes: int) -> float:
        return self._link(src, dst).time_s(nbytes)

    def link_id(self, src: int, dst: int) -> Hashable:
        return (src, dst)

    def optimizer_s(self, params: int) -> float:
        if self.profile.optimizer_table is not None:
            return piecewise(*self.profile.optimizer_table, params)
        return self.profile.optimizer_fixed_s + params * self.profile.optimizer_s_per_param

    def static_bytes(self, params: int) -> int:
        """Parameters + gradients + optimizer state, float32."""
        return params * FLOAT32_BYTES * (2 + OPTIMIZER_STATE_COPIES[self.optimizer])
