"""The cost model: what each piece of work costs, in seconds and bytes.

The engine asks only this interface; it never sees FLOPs or profiles.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from typing import Any, ClassVar, Protocol, assert_never

from .errors import UserError
from .kindcosts import DIRECTION_OF, Extrapolation, extrapolations, missing_kinds, priced_by_shape
from .limits import BANDWIDTH_BPS, MAX_SECONDS, MAX_STAGES, RANK_SPEED, check_number
from .model import FLOAT32_BYTES, LayerSpec, ModelSpec
from .profile import CALIBRATE_HINT, Affine, Link, Profile, ProfileError, Table, piecewise
from .schedule import Kind
from .spec import ALLREDUCE_MODELS  # the ring law (collectives.py), or its steps (ringsteps.py)

# Optimizer state in parameter-sized tensors.
OPTIMIZER_STATE_COPIES = {"sgd": 1, "adam": 2}  # SGD with momentum: 1 buffer; Adam: 2


def _warn_outside_range(profile: Profile, kind: str, width: int, microbatch_size: int) -> None:
    measured = profile.ranges.get(kind, {})
    for name, value in (("width", width), ("microbatch_size", microbatch_size)):
        low, high = measured.get(name, (value, value))
        if not low <= value <= high:
            _warn_once(f"profile {profile.name!r} measured {kind} {name} {low}..{high}; "
                       f"{value} is extrapolated by the fitted model")


KINDS_HINT = "`pipesim calibrate --model MODEL.toml` measures the kinds and shapes a model holds"


@cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=2)


class CostModel(Protocol):
    def compute_s(self, layers: Sequence[LayerSpec], kind: Kind, microbatch_size: int,
                  rank: int | None = None) -> float: ...
    def transfer_s(self, src: int, dst: int, nbytes: int) -> float: ...
    def link_id(self, src: int, dst: int) -> Hashable: ...
    def optimizer_s(self, params: int, rank: int | None = None) -> float: ...
    def static_bytes(self, params: int) -> int: ...
    def allreduce_s(self, ranks: Sequence[int], nbytes: int) -> float: ...
    # optional: handshake_s(src, dst, nbytes) -> float | None and mpi_window_s (ProfileCostModel's);
    # a model without them moves every message as soon as it is sent; cold_start_s(layers, kind,
    # rank) -> float: the extra cost of an action right after its rank waited (none without it)


class WhatIfError(UserError):
    """A rank-speed or link override that cannot be used; one line for the user."""


@dataclass(frozen=True)
class LinkOverride:
    """A what-if link between two ranks (both directions): None keeps the profile's value."""

    latency_s: float | None = None
    bandwidth_Bps: float | None = None

    def apply(self, link: Link) -> Link:
        return replace(link, latency_s=link.latency_s if self.latency_s is None else self.latency_s,
                       bandwidth_Bps=link.bandwidth_Bps if self.bandwidth_Bps is None else self.bandwidth_Bps)


@dataclass(frozen=True)
class ProfileCostModel:
    """Costs read from a Profile.

    ``ranks_per_node``: None puts all ranks on one node (intra-node links);
    otherwise rank r sits on node r // ranks_per_node. Each direction between
    two ranks is its own link: transfers on it are serialised.

    What-ifs for heterogeneous clusters: ``rank_speed`` holds (rank, factor)
    pairs, and compute on that rank (F, B, I, W and the optimizer step) takes
    1/factor as long (ranks are global ranks); ``link_overrides`` holds ((a, b), LinkOverride) pairs
    that replace the profile's link between ranks a and b, both directions.
    """

    profile: Profile
    optimizer: str = "sgd"
    ranks_per_node: int | None = None
    rank_speed: tuple[tuple[int, float], ...] = ()
    link_overrides: tuple[tuple[tuple[int, int], LinkOverride], ...] = ()
    allreduce: str = "law"  # how data parallelism's all-reduces are simulated (ALLREDUCE_MODELS)

    # What the engine and the optimizer may assume (fastpath.py, stagecosts.py):
    runtime_inputs: ClassVar[frozenset[str]] = frozenset()  # no cost depends on what happens during the run
    additive_layers: ClassVar[bool] = True  # compute_s(layers) = per-action overhead + a sum over the layers

    _layer_seconds: dict[Any, float] = field(default_factory=dict, init=False, repr=False,
                                              compare=False)  # layer_s's answers, not part of the model

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZER_STATE_COPIES:
            raise ProfileError(
                f"unknown optimizer {self.optimizer!r} (allowed: {', '.join(OPTIMIZER_STATE_COPIES)})"
            )
        for rank, factor in self.rank_speed:
            if rank < 0 or not factor > 0 or math.isinf(factor):
                raise WhatIfError(f"rank speed {rank}:{factor} needs a rank >= 0 and a finite factor > 0")
        if self.ranks_per_node is not None and self.ranks_per_node < 1:
            raise WhatIfError(f"--ranks-per-node must be >= 1, got {self.ranks_per_node}")
        if self.allreduce not in ALLREDUCE_MODELS:
            raise WhatIfError(f"unknown --allreduce {self.allreduce!r} (allowed: {', '.join(ALLREDUCE_MODELS)})")
        ranks = [rank for rank, _ in self.rank_speed]
        if len(set(ranks)) != len(ranks):
            raise WhatIfError(f"--rank-speed names a rank twice: {sorted(ranks)}")

    def speed(self, rank: int | None) -> float:
        """The compute speed factor of `rank` (1.0 unless a what-if says otherwise)."""
        for named, factor in self.rank_speed:
            if named == rank:
                return factor
        return 1.0

    def check_ranks(self, num_ranks: int) -> None:
        """What-ifs must name ranks that exist in a pipeline of `num_ranks`."""
        named = [r for r, _ in self.rank_speed] + [r for pair, _ in self.link_overrides for r in pair]
        beyond = [r for r in named if r >= num_ranks]
        if beyond:
            raise WhatIfError(f"what-if names rank {beyond[0]}, but the pipeline has ranks 0-{num_ranks - 1}")

    def _coefficients(self, kind: str) -> tuple[Affine | Table, Affine | Table]:
        compute = self.profile.compute
        if kind in compute:
            return compute[kind]
        if "*" in compute:
            return compute["*"]
        raise ProfileError(
            f"profile {self.profile.name!r} has no costs for layer kind {kind!r} "
            f"(it has: {', '.join([*compute, *self.profile.kinds])}); {KINDS_HINT}"
        )

    def _split(self, kind: str) -> tuple[Affine | Table, Affine | Table]:
        split = self.profile.split_backward
        for key in (kind, "*"):
            if key in split:
                return split[key]
        raise ProfileError(
            f"profile {self.profile.name!r} has no input/weight-gradient (I/W) costs for layer kind {kind!r}, "
            f"which zero-bubble schedules need; {CALIBRATE_HINT} (or choose gpipe, 1f1b, interleaved-1f1b)")

    def law(self, layer_kind: str, kind: Kind) -> Affine | Table:
        """The cost law of one action kind for one layer kind."""
        match kind:
            case Kind.F:
                return self._coefficients(layer_kind)[0]
            case Kind.B:
                return self._coefficients(layer_kind)[1]
            case Kind.I:
                return self._split(layer_kind)[0]
            case Kind.W:
                return self._split(layer_kind)[1]
            case Kind.SEND | Kind.RECV:
                raise ValueError(f"{kind} is a message, not compute: its cost is transfer_s")
            case Kind.ALLREDUCE:
                raise ValueError(f"{kind} is a collective, not compute: its cost is allreduce_s")
            case _:
                assert_never(kind)

    def layer_s(self, layer: LayerSpec, kind: Kind, microbatch_size: int) -> float:
        """One layer's time, worked out once per distinct (layer kind, config, input shape,
        action kind, micro-batch size): the simulator and the optimizer ask for the same
        layers again and again (the answer is the same number every time)."""
        key = (layer.kind, layer.config, layer.input_shape, kind, microbatch_size)
        seconds = self._layer_seconds.get(key)
        if seconds is None:
            seconds = self._layer_seconds[key] = self._price(layer, Kind(kind), microbatch_size)
        return seconds

    def _price(self, layer: LayerSpec, kind: Kind, microbatch_size: int) -> float:
        """From the profile's ``compute`` laws (fc tables), else by shape (kindcosts.py)."""
        by_shape = priced_by_shape(self.profile, layer.kind)
        if by_shape is not None:
            if kind not in DIRECTION_OF:
                raise ValueError(f"{kind} is a message, not compute: its cost is transfer_s")
            low, high = by_shape.microbatch_range
            if not low <= microbatch_size <= high:
                _warn_once(f"profile {self.profile.name!r} measured {layer.kind} at micro-batch sizes "
                           f"{low}..{high}; other sizes are extrapolated linearly")
            return by_shape.layer_s(layer, DIRECTION_OF[kind], microbatch_size)
        width = round((math.sqrt(1 + 4 * layer.params) - 1) / 2)  # of the square layer this size
        _warn_outside_range(self.profile, layer.kind, width, microbatch_size)
        return self.law(layer.kind, kind).time_s(microbatch_size, layer.params, layer.forward_flops_per_sample)

    def check_kinds(self, model: ModelSpec, model_file: str | None = None) -> None:
        """A one-line error naming the kinds of `model` the profile lacks, and what measures them."""
        missing = missing_kinds(self.profile, model.layers)
        if missing:
            command = f"pipesim calibrate --model {model_file or 'MODEL.toml'} --out PROFILE.json"
            raise ProfileError(f"profile {self.profile.name!r} has no costs for layer kind(s) {', '.join(missing)} "
                               f"of model {model.name}; `{command}` measures them (then --profile PROFILE.json)")

    def extrapolations(self, layers: Sequence[LayerSpec]) -> tuple[Extrapolation, ...]:
        """The layers whose costs no measurement of their shape gives (kindcosts.extrapolations)."""
        return extrapolations(self.profile, layers)

    def compute_s(self, layers: Sequence[LayerSpec], kind: Kind, microbatch_size: int,
                  rank: int | None = None) -> float:
        work = sum(self.layer_s(layer, kind, microbatch_size) for layer in layers)
        return (work + self.profile.action_overhead_s) / self.speed(rank)

    def cold_start_s(self, layers: Sequence[LayerSpec], kind: Kind, rank: int | None = None) -> float:
        """What `kind` on these layers costs more when its rank waited for a message just before
        it: its weights left the shared cache meanwhile (profile ``cold_start``; 0 without)."""
        if self.profile.cold_start is None or kind not in DIRECTION_OF:
            return 0.0
        nbytes = sum(layer.params for layer in layers) * FLOAT32_BYTES
        return self.profile.cold_start.seconds(kind != Kind.F, nbytes) / self.speed(rank)

    def same_node(self, src: int, dst: int) -> bool:
        return self.ranks_per_node is None or src // self.ranks_per_node == dst // self.ranks_per_node

    def _overridden(self, link: Link, src: int, dst: int) -> Link:
        for pair, override in self.link_overrides:
            if pair in ((src, dst), (dst, src)):
                link = override.apply(link)
        return link

    def _link(self, src: int, dst: int) -> Link:
        link = self.profile.intra_node if self.same_node(src, dst) else self.profile.inter_node
        return self._overridden(link, src, dst)

    def _link_class(self, src: int, dst: int) -> str:
        return "intra_node" if self.same_node(src, dst) else "inter_node"

    def collective_link(self, src: int, dst: int) -> Link:
        """One edge of an all-reduce ring: the profile's measured all-reduce link of the edge's
        class (intra_node, inter_node) when it has one, else its point-to-point link; what-ifs on top."""
        name = self._link_class(src, dst)
        link = self.profile.collectives.get(name)
        if link is None:
            _warn_once(f"profile {self.profile.name!r} has no measured {name} all-reduce (profiles before "
                       "version 3 lack it): the ring law uses its point-to-point link; `pipesim calibrate` "
                       "measures it")
            return self._link(src, dst)
        return self._overridden(link, src, dst)

    @property
    def reduce_s_per_byte(self) -> float:
        """Seconds per byte of the all-reduce's additions (0 when the profile has none)."""
        return self.profile.reduce_s_per_byte

    def allreduce_s(self, ranks: Sequence[int], nbytes: int) -> float:
        """A ring all-reduce of `nbytes` over global `ranks`, in ring order (collectives.py): the
        profile's measured sizes where they apply (_measured_sizes), else the ring law."""
        from .collectives import measured_allreduce_s, ring_allreduce_s, ring_link

        measured = self._measured_sizes(ranks)
        if measured is not None:
            return measured_allreduce_s(nbytes, *measured)
        return ring_allreduce_s(nbytes, len(ranks), ring_link(ranks, self.collective_link),
                                self.profile.reduce_s_per_byte)

    def _measured_sizes(self, ranks: Sequence[int]) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
        """Calibration's all-reduce medians, when the ring is what it timed: as many ranks, every
        edge of its link class, and no what-if on any edge's all-reduce link."""
        from .collectives import ring_edges

        edges = ring_edges(ranks)
        classes = {self._link_class(a, b) for a, b in edges}
        if len(classes) != 1:
            return None
        name = classes.pop()
        entry = self.profile.allreduce_sizes.get(name)
        link = self.profile.collectives.get(name)
        if entry is None or entry[0] != len(ranks) or link is None:
            return None
        if any(self.collective_link(a, b) != link for a, b in edges):
            return None  # a what-if changed an edge: the law prices it
        return entry[1], entry[2]

    def transfer_s(self, src: int, dst: int, nbytes: int) -> float:
        return self._link(src, dst).time_s(nbytes)

    def handshake_s(self, src: int, dst: int, nbytes: int) -> float | None:
        """None when a message of `nbytes` moves as soon as it is sent; else it waits for the
        rendezvous (Link.rendezvous_bytes), whose two control messages each take this long."""
        link = self._link(src, dst)
        return link.latency_s if link.handshake(nbytes) else None

    @property
    def mpi_window_s(self) -> float:
        """How long a rank is inside MPI (testing a receive) before an action that takes a
        message starts computing: the per-action overhead, where the runner calls MPI_Test."""
        return self.profile.action_overhead_s

    def link_id(self, src: int, dst: int) -> Hashable:
        """Transfers with the same id are serialised: one per direction, or one
        for both directions when the link is not duplex (a shared channel)."""
        return (src, dst) if self._link(src, dst).duplex else (min(src, dst), max(src, dst))

    def optimizer_s(self, params: int, rank: int | None = None) -> float:
        if self.profile.optimizer_table is not None:
            seconds = piecewise(*self.profile.optimizer_table, params)
        else:
            seconds = self.profile.optimizer_fixed_s + params * self.profile.optimizer_s_per_param
        return seconds / self.speed(rank)

    def static_bytes(self, params: int) -> int:
        """Parameters + gradients + optimizer state, float32."""
        return params * FLOAT32_BYTES * (2 + OPTIMIZER_STATE_COPIES[self.optimizer])


# --- what-if text forms (the command line's --rank-speed and --link) -----------


def _float(token: str, what: str, allowed: str, low: float, high: float, low_open: bool = False) -> float:
    try:
        value = float(token)
    except ValueError:
        raise WhatIfError(f"bad {what}: {token!r} is not a number (allowed: {allowed})") from None
    try:
        return check_number(what, value, low, high, low_open)
    except UserError as exc:
        raise WhatIfError(f"bad {exc}") from None


def _rank(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 9 and int(text) < MAX_STAGES else None


_RANK_SPEED_FORM = "RANK:FACTOR like 3:0.5, several as 2:0.5,3:0.8"
_LINK_FORM = "A-B:BANDWIDTHBps and/or A-B:LATENCYs, like 1-2:1.25e9Bps or 1-2:1.25e9Bps,5e-6s"


def parse_rank_speed(text: str) -> tuple[tuple[int, float], ...]:
    """``3:0.5`` (rank 3 computes at half speed); several separated by commas."""
    pairs = []
    for item in text.split(","):
        rank_text, colon, factor_text = item.strip().partition(":")
        rank = _rank(rank_text)
        if not colon or rank is None:
            raise WhatIfError(f"bad --rank-speed {text!r} (allowed: {_RANK_SPEED_FORM}, ranks 0-{MAX_STAGES - 1})")
        factor = _float(factor_text, f"--rank-speed {text!r}: the factor", _RANK_SPEED_FORM, *RANK_SPEED)
        pairs.append((rank, factor))
    return tuple(pairs)


def parse_link_override(text: str) -> tuple[tuple[int, int], LinkOverride]:
    """``1-2:1.25e9Bps``, ``1-2:5e-6s`` or ``1-2:1.25e9Bps,5e-6s``: the link between ranks 1 and 2."""
    pair_text, colon, values_text = text.strip().partition(":")
    a_text, dash, b_text = pair_text.partition("-")
    a, b = _rank(a_text), _rank(b_text)
    if not colon or not dash or a is None or b is None:
        raise WhatIfError(f"bad --link {text!r} (allowed: {_LINK_FORM}, ranks 0-{MAX_STAGES - 1})")
    if a == b:
        raise WhatIfError(f"bad --link {text!r}: a link joins two different ranks")
    values: dict[str, float] = {}
    for token in values_text.split(","):
        token = token.strip()
        unit = "bandwidth_Bps" if token.endswith("Bps") else "latency_s" if token.endswith("s") else None
        if unit is None or unit in values:
            raise WhatIfError(f"bad --link {text!r}: {token!r} (allowed: {_LINK_FORM})")
        if unit == "bandwidth_Bps":
            number = _float(token[:-3], f"--link {text!r}: the bandwidth (Bps)", _LINK_FORM, *BANDWIDTH_BPS)
        else:
            number = _float(token[:-1], f"--link {text!r}: the latency (s)", _LINK_FORM, 0.0, MAX_SECONDS)
        values[unit] = number
    return (min(a, b), max(a, b)), LinkOverride(**values)
