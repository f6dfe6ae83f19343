"""The profile file: measured (or stated) costs, as versioned JSON.

Schema ``pipesim-profile`` version 5 (versions 1 to 4 still load: version 1
lacks the input/weight split, so the zero-bubble schedules are refused with it;
versions 1 and 2 lack the measured all-reduce, so data parallelism's ring law
uses their point-to-point links, with a warning; they lack the ``kinds``
section, so they cost fc layers only, and ``transports``, so only MPI can be
predicted with them; versions 1 to 3 lack a link's ``rendezvous_bytes``, so every
message moves on its own, as over shared memory; versions 1 to 4 lack ``cold_start``,
so an action costs the same whether or not its rank waited before it)::

    {
      "schema": "pipesim-profile", "version": 5, "name": "...",
      "description": "...",                        # optional
      "compute": {                                 # per layer kind ("*" = any kind)
        "fc": {"forward":  {"fixed_s": 0.0, "s_per_param": 4e-10,      # an affine law ...
                            "s_per_sample": 0.0, "s_per_flop": 1e-11},
               "backward": {"widths": [256, 1024],                     # ... or a measured table
                            "microbatch_sizes": [4, 64],
                            "seconds": [[5e-5, 2e-4], [5e-4, 2e-3]]},  # [width][micro-batch size]
               "input": {...}, "weight": {...}}   # version 2: the backward split into I and W
      },
      "action_overhead_s": 0.0,                    # per F or B action
      "optimizer": {"fixed_s": 0.0, "s_per_param": 0.0},  # or {"params": [...], "seconds": [...]}
      "links": {"intra_node": {"latency_s": 0.0, "bandwidth_Bps": null,    # null = free
                               "duplex": true,    # false: both directions share one channel
                               "rendezvous_bytes": 65536},  # version 4, optional (see Link)
                "inter_node": {...}},              # optional, defaults to intra_node
      "collectives": {"intra_node": {"latency_s": 1e-5, "bandwidth_Bps": 5e9},  # version 3: the ring
                      "inter_node": {...}, "reduce_s_per_byte": 0.0},  # all-reduce's alpha, beta per class
      "transports": {"gloo": {"links": {...},      # version 3, optional: torch.distributed over
                              "action_overhead_s": 0.0}},   # gloo (calibrate --transport gloo);
                                                   # the top-level links and overhead are MPI's
      "ranges": {"fc": {"width": [256, 1024], "microbatch_size": [4, 512]}},  # measured; optional
      "kinds": {...},      # version 3, optional: other layer kinds by shape (kindcosts.py)
      "cold_start": {"width": 512, "microbatch_size": 32,   # version 5, optional: what an F
                     "stack_bytes": [1048576, ...],        # (or B, I, W) of a piece with this
                     "forward_s": [1e-5, ...], "backward_s": [...]},  # many bytes of weights
                           # costs more when its rank waited for a message just before it (ColdStart)
      "metadata": {...}, "samples": {...}, "noise": {...}   # optional, free-form
    }

Compute time of one layer for one micro-batch of b samples is
``fixed_s + s_per_param * params + b * (s_per_sample + s_per_flop * forward_flops_per_sample)``:
the parameter term is the cost of streaming the weights (it does not shrink
with the micro-batch), the FLOP term the arithmetic; ``s_per_sample`` alone
serves plain constants. A measured table is interpolated: piecewise linearly
in the micro-batch size (extended linearly past the ends), and across widths
by interpolating time per parameter in log width (the nearest width's time
per parameter outside the measured widths).
"""

from __future__ import annotations

import json
import math
from bisect import bisect_left
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import UserError, read_user_text
from .limits import BANDWIDTH_BPS, MAX_SECONDS, check_number

SCHEMA = "pipesim-profile"
VERSION = 5
READABLE_VERSIONS = (1, 2, 3, 4, 5)
TRANSPORTS = ("mpi", "gloo")  # mpi: the top-level links and overhead
CALIBRATE_HINT = "`pipesim calibrate` measures them"
DEFAULT_PROFILE = "default"  # pipesim/data/default.json

_TOP_KEYS = {"schema", "version", "name", "description", "compute", "action_overhead_s",
             "optimizer", "links", "metadata", "ranges", "samples", "noise", "collectives", "kinds",
             "transports", "cold_start"}
_AFFINE_KEYS = {"fixed_s", "s_per_param", "s_per_sample", "s_per_flop"}
_TABLE_KEYS = {"widths", "microbatch_sizes", "seconds"}


class ProfileError(UserError):
    """A malformed profile; the message names the field."""


@dataclass(frozen=True)
class Affine:
    fixed_s: float = 0.0
    s_per_param: float = 0.0
    s_per_sample: float = 0.0
    s_per_flop: float = 0.0

    def time_s(self, samples: int, params: int, flops_per_sample: float) -> float:
        per_sample = self.s_per_sample + self.s_per_flop * flops_per_sample
        return self.fixed_s + self.s_per_param * params + samples * per_sample


def piecewise(xs: tuple[int, ...], ys: tuple[float, ...], x: float) -> float:
    """Linear interpolation through (xs, ys), extended linearly past both ends."""
    if len(xs) == 1:
        return ys[0] * x / xs[0]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    slope = (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1])
    return max(ys[i - 1] + slope * (x - xs[i - 1]), 0.0)


@dataclass(frozen=True)
class Table:
    """Measured per-layer times of square fc layers: seconds[width][micro-batch size]."""

    widths: tuple[int, ...]
    microbatch_sizes: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]

    def time_s(self, samples: int, params: int, flops_per_sample: float) -> float:
        width = (math.sqrt(1 + 4 * params) - 1) / 2  # the square layer (w*w + w params) of this size
        per_param = [piecewise(self.microbatch_sizes, row, samples) / (w * w + w)
                     for w, row in zip(self.widths, self.seconds)]
        if width <= self.widths[0] or len(self.widths) == 1:
            return per_param[0] * params
        if width >= self.widths[-1]:
            return per_param[-1] * params
        i = bisect_left(self.widths, width)
        lo, hi = math.log(self.widths[i - 1]), math.log(self.widths[i])
        weight = (math.log(width) - lo) / (hi - lo)
        return (per_param[i - 1] * (1 - weight) + per_param[i] * weight) * params


@dataclass(frozen=True)
class Link:
    """``rendezvous_bytes`` (version 4): a message of at least this many bytes does not move on
    its own. The send only announces it; it moves once the receiver has entered an MPI call
    after the announcement arrived (to match it) and then the sender has entered one after the
    reply arrived. That is MPI's rendezvous protocol without asynchronous progress, e.g. Open
    MPI over TCP. None: every message moves as soon as it is sent (shared memory, where the
    receiver copies it in one go, or a transport that progresses on its own)."""

    latency_s: float = 0.0
    bandwidth_Bps: float = math.inf
    duplex: bool = True  # False: both directions between two ranks share one channel
    rendezvous_bytes: int | None = None

    def handshake(self, nbytes: int) -> bool:
        """Whether a message of `nbytes` waits for both ranks' MPI calls before it moves."""
        return self.rendezvous_bytes is not None and nbytes >= self.rendezvous_bytes

    def time_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class ColdStart:
    """What an action costs more when its rank waited for a message just before it, by the
    bytes of its piece's weights: measured (calibrate) as the time of a stack's F (or B) right
    after the rank waited while the other rank computed, less its time back to back, at a few
    stack sizes of one width and micro-batch size. Between the measured sizes (and from 0
    bytes, 0 seconds) linear in bytes, beyond the largest at its seconds per byte."""

    stack_bytes: tuple[int, ...]
    forward_s: tuple[float, ...]
    backward_s: tuple[float, ...]

    def seconds(self, backward: bool, nbytes: int) -> float:
        ys = self.backward_s if backward else self.forward_s
        if nbytes >= self.stack_bytes[-1]:
            return ys[-1] * nbytes / self.stack_bytes[-1]
        return piecewise((0, *self.stack_bytes), (0.0, *ys), nbytes)


@dataclass(frozen=True)
class Transport:
    """Links and per-action overhead of one transport other than MPI (version 3)."""

    intra_node: Link
    inter_node: Link
    action_overhead_s: float


@dataclass(frozen=True)
class Profile:
    name: str
    compute: dict[str, tuple[Affine | Table, Affine | Table]]  # kind -> (forward, backward)
    split_backward: dict = field(default_factory=dict)  # kind -> (input, weight) laws (version 2)
    action_overhead_s: float = 0.0
    optimizer_fixed_s: float = 0.0
    optimizer_s_per_param: float = 0.0
    optimizer_table: tuple[tuple[int, ...], tuple[float, ...]] | None = None  # (params, seconds)
    intra_node: Link = Link()
    inter_node: Link = Link()
    collectives: dict[str, Link] = field(default_factory=dict)  # all-reduce's link per class (version 3)
    reduce_s_per_byte: float = 0.0  # the all-reduce's additions (collectives.py)
    # link class -> (group size, bytes, median seconds) of the all-reduces calibration timed
    # (samples.allreduce, version 3): the cost between them (collectives.measured_allreduce_s)
    allreduce_sizes: dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]] = field(default_factory=dict)
    description: str = ""
    ranges: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # metadata, samples, noise: carried (samples.allreduce also parsed)
    kinds: dict = field(default_factory=dict)  # kind -> kindcosts.KindCosts (version 3)
    transports: dict[str, Transport] = field(default_factory=dict)  # besides MPI (the fields above)
    cold_start: ColdStart | None = None  # an action right after a wait (version 5)

    def with_transport(self, transport: str) -> Profile:
        """This profile with the links and per-action overhead of `transport` in place of MPI's."""
        if transport == "mpi":
            return self
        if transport not in TRANSPORTS:
            raise ProfileError(f"unknown transport {transport!r} (allowed: {', '.join(TRANSPORTS)})")
        if transport not in self.transports:
            raise ProfileError(f"profile {self.name!r} has no {transport} costs; "
                               f"`pipesim calibrate --transport {transport}` measures them")
        chosen = self.transports[transport]
        return replace(self, intra_node=chosen.intra_node, inter_node=chosen.inter_node,
                       action_overhead_s=chosen.action_overhead_s, transports={},
                       name=f"{self.name} ({transport})")

    @property
    def measured_on(self) -> str:
        """Where and when calibration measured this profile, for the user to compare with theirs."""
        meta = self.extra.get("metadata") or {}
        if not meta:
            return "no machine recorded (not measured by pipesim calibrate)"
        return (f"{meta.get('host', '?')} ({meta.get('cpu_model', '?')}, {meta.get('cores', '?')} cores) "
                f"on {str(meta.get('date', '?'))[:10]}")


def _field(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ProfileError(f"profile field {_field(where, unknown[0])} is unknown (allowed: {sorted(allowed)})")


def _number(table: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in table:
        if default is None:
            raise ProfileError(f"profile field {_field(where, key)} is missing")
        return default
    return _finite(table[key], _field(where, key), 0.0, MAX_SECONDS)


def _finite(value, name: str, low: float, high: float, low_open: bool = False) -> float:
    """A finite number in range, or a ProfileError naming the field (NaN and Infinity included)."""
    try:
        return check_number(f"profile field {name}", value, low, high, low_open)
    except UserError as exc:
        raise ProfileError(str(exc)) from None


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ProfileError(f"profile field {_field(where, key)} must be an object")
    return value


def _is_range(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _ranges(data: dict) -> dict:
    """{"fc": {"width": [low, high], ...}, "message_bytes": [low, high]}: what was measured."""
    ranges = _table(data, "ranges", "") if "ranges" in data else {}
    for key, value in ranges.items():
        values = value.values() if isinstance(value, dict) else [value]
        if not all(_is_range(v) and all(abs(x) <= 1e300 for x in v) for v in values):  # NaN fails too
            raise ProfileError(f"profile field ranges.{key} must hold [low, high] pairs of finite numbers")
    return ranges


def _table_law(table: dict, where: str) -> Table:
    unknown = sorted(set(table) - _TABLE_KEYS)
    if unknown or _TABLE_KEYS - set(table):
        raise ProfileError(f"profile field {where} needs exactly {sorted(_TABLE_KEYS)}")
    widths, sizes, seconds = table["widths"], table["microbatch_sizes"], table["seconds"]
    for key, values in (("widths", widths), ("microbatch_sizes", sizes)):
        if (not isinstance(values, list) or not values
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 1 << 40 for v in values)
                or values != sorted(set(values))):
            raise ProfileError(f"profile field {where}.{key} must be increasing integers in 1..2**40")
    if (not isinstance(seconds, list) or len(seconds) != len(widths)
            or any(not isinstance(row, list) or len(row) != len(sizes) for row in seconds)
            or any(not isinstance(v, (int, float)) for row in seconds for v in row)):
        raise ProfileError(f"profile field {where}.seconds must be a widths x microbatch_sizes "
                           "array of numbers >= 0")
    rows = tuple(tuple(_finite(v, f"{where}.seconds[{i}][{j}]", 0.0, MAX_SECONDS) for j, v in enumerate(row))
                 for i, row in enumerate(seconds))
    return Table(tuple(widths), tuple(sizes), rows)


def _optimizer_table(table: dict) -> tuple[tuple[int, ...], tuple[float, ...]]:
    _check_keys(table, {"params", "seconds"}, "optimizer")
    params, seconds = table.get("params"), table.get("seconds")
    if (not isinstance(params, list) or not isinstance(seconds, list) or len(params) != len(seconds)
            or not params
            or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 60 for v in params)
            or params != sorted(set(params))):
        raise ProfileError("profile field optimizer needs increasing 'params' and as many 'seconds' >= 0")
    return tuple(params), tuple(_finite(v, f"optimizer.seconds[{i}]", 0.0, MAX_SECONDS)
                                for i, v in enumerate(seconds))


def _law(table: dict, where: str) -> Affine | Table:
    return _table_law(table, where) if "seconds" in table else _affine(table, where)


def _affine(table: dict, where: str) -> Affine:
    _check_keys(table, _AFFINE_KEYS, where)
    return Affine(**{key: _number(table, key, where, 0.0) for key in _AFFINE_KEYS})


def _link(table: dict, where: str, version: int = VERSION) -> Link:
    _check_keys(table, {"latency_s", "bandwidth_Bps", "duplex", "rendezvous_bytes"}, where)
    bandwidth = table.get("bandwidth_Bps")
    if bandwidth is not None:
        bandwidth = _finite(bandwidth, f"{where}.bandwidth_Bps (or null: free)", *BANDWIDTH_BPS)
    duplex = table.get("duplex", True)
    if not isinstance(duplex, bool):
        raise ProfileError(f"profile field {where}.duplex must be true or false, got {duplex!r}")
    rendezvous = table.get("rendezvous_bytes")
    if rendezvous is not None:
        if version < 4:
            raise ProfileError(f"profile field {where}.rendezvous_bytes needs version 4, the file says {version}")
        if isinstance(rendezvous, bool) or not isinstance(rendezvous, int) or rendezvous < 0:
            raise ProfileError(f"profile field {where}.rendezvous_bytes must be a byte count >= 0 or null, "
                               f"got {rendezvous!r}")
    return Link(_number(table, "latency_s", where, 0.0),
                math.inf if bandwidth is None else float(bandwidth), duplex, rendezvous)


def parse_profile(data: dict) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError("profile must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ProfileError(f"profile field schema must be {SCHEMA!r}, got {data.get('schema')!r}")
    if data.get("version") not in READABLE_VERSIONS:
        raise ProfileError(f"profile field version must be one of {READABLE_VERSIONS}, "
                           f"got {data.get('version')!r}")
    _check_keys(data, _TOP_KEYS, "")
    if not isinstance(data.get("name"), str):
        raise ProfileError("profile field name is missing")
    compute, split = {}, {}
    for kind in _table(data, "compute", ""):
        table, where = _table(data["compute"], kind, "compute"), f"compute.{kind}"
        _check_keys(table, {"forward", "backward", "input", "weight"}, where)
        compute[kind] = (_law(_table(table, "forward", where), f"{where}.forward"),
                         _law(_table(table, "backward", where), f"{where}.backward"))
        if "input" in table or "weight" in table:
            split[kind] = (_law(_table(table, "input", where), f"{where}.input"),
                           _law(_table(table, "weight", where), f"{where}.weight"))
    optimizer = _table(data, "optimizer", "") if "optimizer" in data else {}
    optimizer_table = _optimizer_table(optimizer) if "seconds" in optimizer else None
    if optimizer_table is None:
        _check_keys(optimizer, {"fixed_s", "s_per_param"}, "optimizer")
    kinds = {}
    if "kinds" in data:
        from .kindcosts import parse_kinds

        kinds = parse_kinds(data["kinds"])
    intra, inter = _links(_table(data, "links", ""), "links", data["version"])
    collectives, reduce_s_per_byte = _collectives(data)
    cold_start = _cold_start(data) if "cold_start" in data else None
    return Profile(
        cold_start=cold_start,
        name=data["name"],
        compute=compute,
        split_backward=split,
        action_overhead_s=_number(data, "action_overhead_s", "", 0.0),
        optimizer_table=optimizer_table,
        optimizer_fixed_s=_number(optimizer, "fixed_s", "optimizer", 0.0),
        optimizer_s_per_param=_number(optimizer, "s_per_param", "optimizer", 0.0),
        intra_node=intra,
        inter_node=inter,
        collectives=collectives,
        reduce_s_per_byte=reduce_s_per_byte,
        allreduce_sizes=_allreduce_sizes(data),
        description=data.get("description", ""),
        ranges=_ranges(data),
        extra={k: data[k] for k in ("metadata", "samples", "noise") if k in data},
        kinds=kinds,
        transports=_transports(data),
    )


def _collectives(data: dict) -> tuple[dict[str, Link], float]:
    """The all-reduce's link per class (version 3); none in older versions."""
    if "collectives" not in data:
        return {}, 0.0
    if data["version"] < 3:
        raise ProfileError(f"profile field collectives needs version 3, the file says {data['version']}")
    table = _table(data, "collectives", "")
    _check_keys(table, {"intra_node", "inter_node", "reduce_s_per_byte"}, "collectives")
    links = {name: _link(_table(table, name, "collectives"), f"collectives.{name}")
             for name in ("intra_node", "inter_node") if name in table}
    return links, _number(table, "reduce_s_per_byte", "collectives", 0.0)


def _allreduce_sizes(data: dict) -> dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]]:
    """The all-reduces calibration timed (samples.allreduce: its group size, link class and
    median seconds per size), which the cost model interpolates between; none without them."""
    samples = data.get("samples")
    record = samples.get("allreduce") if isinstance(samples, dict) else None
    if not record:
        return {}
    try:
        group, link_class = int(record["group_size"]), str(record["link_class"])
        points = sorted((int(s["bytes"]), float(s["median_s"])) for s in record["sizes"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ProfileError(f"profile field samples.allreduce is malformed ({exc!r}): it needs group_size, "
                           "link_class and sizes of bytes and median_s") from None
    if group < 2 or len(points) < 2 or any(n <= 0 or not 0 < t < math.inf for n, t in points) \
            or len({n for n, _ in points}) < len(points):
        raise ProfileError("profile field samples.allreduce needs a group of >= 2 ranks and >= 2 distinct "
                           "sizes with positive bytes and seconds")
    return {link_class: (group, tuple(n for n, _ in points), tuple(t for _, t in points))}


def _cold_start(data: dict) -> ColdStart:
    if data["version"] < 5:
        raise ProfileError(f"profile field cold_start needs version 5, the file says {data['version']}")
    table = _table(data, "cold_start", "")
    _check_keys(table, {"width", "microbatch_size", "stack_bytes", "forward_s", "backward_s"}, "cold_start")
    sizes: Any = table.get("stack_bytes")
    columns: list[Any] = [table.get("forward_s"), table.get("backward_s")]
    if (not isinstance(sizes, list) or not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0
                                                         for b in sizes)
            or sizes != sorted(set(sizes)) or any(not isinstance(c, list) or len(c) != len(sizes) for c in columns)):
        raise ProfileError("profile field cold_start must hold increasing positive stack_bytes and one forward_s "
                           "and one backward_s each")
    forward, backward = ([_finite(x, f"cold_start.{name}", 0.0, MAX_SECONDS) for x in column]
                         for name, column in zip(("forward_s", "backward_s"), columns))
    return ColdStart(tuple(sizes), tuple(forward), tuple(backward))


def _links(links: dict, where: str, version: int) -> tuple[Link, Link]:
    _check_keys(links, {"intra_node", "inter_node"}, where)
    intra = _link(_table(links, "intra_node", where), f"{where}.intra_node", version)
    inter = (_link(_table(links, "inter_node", where), f"{where}.inter_node", version) if "inter_node" in links
             else intra)
    return intra, inter


def _transports(data: dict) -> dict[str, Transport]:
    if "transports" in data and data["version"] < 3:
        raise ProfileError(f"profile field transports needs version 3, not {data['version']}")
    found = {}
    for name in _table(data, "transports", "") if "transports" in data else ():
        where = f"transports.{name}"
        if name not in TRANSPORTS[1:]:
            raise ProfileError(f"profile field {where}: unknown transport (allowed: {', '.join(TRANSPORTS[1:])})")
        table = _table(data["transports"], name, "transports")
        _check_keys(table, {"links", "action_overhead_s", "metadata"}, where)
        intra, inter = _links(_table(table, "links", where), f"{where}.links", data["version"])
        found[name] = Transport(intra, inter, _number(table, "action_overhead_s", where, 0.0))
    return found


def load_profile(source: str | Path | None = None) -> Profile:
    """Load a profile file; None or "default" gives the profile shipped in the package."""
    if source in (None, DEFAULT_PROFILE):
        text = resources.files("pipesim").joinpath("data/default.json").read_text()
        where = "default profile"
    else:
        text = read_user_text(source, ProfileError, "profile")
        where = str(source)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{where}: not valid JSON: {exc}") from None
    return parse_profile(data)


def constant_profile(
    forward_s_per_sample: float,
    backward_s_per_sample: float,
    latency_s: float = 0.0,
    bandwidth_Bps: float = math.inf,
    optimizer_s_per_param: float = 0.0,
    action_overhead_s: float = 0.0,
    name: str = "constants",
    input_s_per_sample: float | None = None,
    weight_s_per_sample: float | None = None,
) -> Profile:
    """Plain constants for what-if studies and tests: every layer costs the same per sample.
    I and W costs only when both are given (else zero-bubble schedules are refused)."""
    split = {}
    if input_s_per_sample is not None and weight_s_per_sample is not None:
        split = {"*": (Affine(s_per_sample=input_s_per_sample), Affine(s_per_sample=weight_s_per_sample))}
    return Profile(
        name=name,
        compute={"*": (Affine(s_per_sample=forward_s_per_sample),
                       Affine(s_per_sample=backward_s_per_sample))},
        split_backward=split,
        action_overhead_s=action_overhead_s,
        optimizer_s_per_param=optimizer_s_per_param,
        intra_node=Link(latency_s, bandwidth_Bps),
        inter_node=Link(latency_s, bandwidth_Bps),
    )
