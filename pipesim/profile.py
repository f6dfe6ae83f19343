"""The profile file: measured (or stated) costs, as versioned JSON.

Schema ``pipesim-profile`` version 1::

    {
      "schema": "pipesim-profile", "version": 1, "name": "...",
      "description": "...",                        # optional
      "compute": {                                 # per layer kind ("*" = any kind)
        "fc": {"forward":  {"fixed_s": 0.0, "s_per_param": 4e-10,
                            "s_per_sample": 0.0, "s_per_flop": 1e-11},
               "backward": {...}}
      },
      "action_overhead_s": 0.0,                    # per F or B action
      "optimizer": {"fixed_s": 0.0, "s_per_param": 0.0},
      "links": {"intra_node": {"latency_s": 0.0, "bandwidth_Bps": null},   # null = free
                "inter_node": {...}},              # optional, defaults to intra_node
      "metadata": {...}, "ranges": {...}, "samples": {...}, "noise": {...}   # optional, free-form
    }

Compute time of one layer for one micro-batch of b samples is
``fixed_s + s_per_param * params + b * (s_per_sample + s_per_flop * forward_flops_per_sample)``:
the parameter term is the cost of streaming the weights (it does not shrink
with the micro-batch), the FLOP term the arithmetic; ``s_per_sample`` alone
serves plain constants.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

SCHEMA = "pipesim-profile"
VERSION = 1
DEFAULT_PROFILE = "default"  # pipesim/data/default.json

_TOP_KEYS = {"schema", "version", "name", "description", "compute", "action_overhead_s",
             "optimizer", "links", "metadata", "ranges", "samples", "noise"}
_AFFINE_KEYS = {"fixed_s", "s_per_param", "s_per_sample", "s_per_flop"}


class ProfileError(ValueError):
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


@dataclass(frozen=True)
class Link:
    latency_s: float = 0.0
    bandwidth_Bps: float = math.inf

    def time_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_Bps


@dataclass(frozen=True)
class Profile:
    name: str
    compute: dict[str, tuple[Affine, Affine]]  # kind -> (forward, backward)
    action_overhead_s: float = 0.0
    optimizer_fixed_s: float = 0.0
    optimizer_s_per_param: float = 0.0
    intra_node: Link = Link()
    inter_node: Link = Link()
    description: str = ""
    ranges: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # metadata, samples, noise: carried, not used


def _number(table: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in table:
        if default is None:
            raise ProfileError(f"profile field {where}.{key} is missing")
        return default
    value = table[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ProfileError(f"profile field {where}.{key} must be a number >= 0, got {value!r}")
    return float(value)


def _table(data: dict, key: str, where: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict):
        raise ProfileError(f"profile field {(where + '.' if where else '') + key} must be an object")
    return value


def _affine(table: dict, where: str) -> Affine:
    unknown = sorted(set(table) - _AFFINE_KEYS)
    if unknown:
        raise ProfileError(f"profile field {where}.{unknown[0]} is unknown (allowed: {sorted(_AFFINE_KEYS)})")
    return Affine(**{key: _number(table, key, where, 0.0) for key in _AFFINE_KEYS})


def _link(table: dict, where: str) -> Link:
    bandwidth = table.get("bandwidth_Bps")
    if bandwidth is not None and (not isinstance(bandwidth, (int, float)) or bandwidth <= 0):
        raise ProfileError(f"profile field {where}.bandwidth_Bps must be > 0 or null, got {bandwidth!r}")
    return Link(_number(table, "latency_s", where, 0.0), math.inf if bandwidth is None else float(bandwidth))


def parse_profile(data: dict) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError("profile must be a JSON object")
    if data.get("schema") != SCHEMA:
        raise ProfileError(f"profile field schema must be {SCHEMA!r}, got {data.get('schema')!r}")
    if data.get("version") != VERSION:
        raise ProfileError(f"profile field version must be {VERSION}, got {data.get('version')!r}")
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise ProfileError(f"profile field {unknown[0]} is unknown (allowed: {sorted(_TOP_KEYS)})")
    if not isinstance(data.get("name"), str):
        raise ProfileError("profile field name is missing")
    compute = {}
    for kind in _table(data, "compute", ""):
        table, where = _table(data["compute"], kind, "compute"), f"compute.{kind}"
        compute[kind] = (_affine(_table(table, "forward", where), f"{where}.forward"),
                         _affine(_table(table, "backward", where), f"{where}.backward"))
    optimizer = _table(data, "optimizer", "") if "optimizer" in data else {}
    links = _table(data, "links", "")
    intra = _link(_table(links, "intra_node", "links"), "links.intra_node")
    inter = _link(_table(links, "inter_node", "links"), "links.inter_node") if "inter_node" in links else intra
    return Profile(
        name=data["name"],
        compute=compute,
        action_overhead_s=_number(data, "action_overhead_s", "", 0.0),
        optimizer_fixed_s=_number(optimizer, "fixed_s", "optimizer", 0.0),
        optimizer_s_per_param=_number(optimizer, "s_per_param", "optimizer", 0.0),
        intra_node=intra,
        inter_node=inter,
        description=data.get("description", ""),
        ranges=data.get("ranges", {}),
        extra={k: data[k] for k in ("metadata", "samples", "noise") if k in data},
    )


def load_profile(source: str | Path | None = None) -> Profile:
    """Load a profile file; None or "default" gives the profile shipped in the package."""
    if source in (None, DEFAULT_PROFILE):
        text = resources.files("pipesim").joinpath("data/default.json").read_text()
        where = "default profile"
    else:
        try:
            text = Path(source).read_text()
        except FileNotFoundError:
            raise ProfileError(f"profile file not found: {source}") from None
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
) -> Profile:
    """Plain constants for what-if studies and tests: every layer costs the same per sample."""
    return Profile(
        name=name,
        compute={"*": (Affine(s_per_sample=forward_s_per_sample),
                       Affine(s_per_sample=backward_s_per_sample))},
        action_overhead_s=action_overhead_s,
        optimizer_s_per_param=optimizer_s_per_param,
        intra_node=Link(latency_s, bandwidth_Bps),
        inter_node=Link(latency_s, bandwidth_Bps),
    )
