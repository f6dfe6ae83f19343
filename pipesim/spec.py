"""The execution spec: which model, which profile, and how to run it, as one file.

Calculon keeps the application, the system and the execution apart; pipesim has
files for the first two (models/*.toml, profiles) and this is the third. An
experiment file (experiments/*.toml) holds four tables, each optional::

    [model]                 # a model file, or the fc generator's parameters
    file = "../models/fc32.toml"        # or: layers = 32, width = 512
    [profile]
    path = "default"                    # the shipped profile, or a JSON file
    sha256 = "..."                      # written by --save-config; a changed profile warns
    [execution]
    stages = 4                          # or a list where the command takes lists
    chunks = 1
    schedule = "1f1b"                   # or schedule_file = "my.txt"
    microbatches = 8
    batch_size = 512
    partition = "balanced"              # as given: counts, ranges or balanced
    partition_counts = [8, 8, 8, 8]     # what it resolved to (written by --save-config)
    data_parallel = 1                   # D pipeline replicas: world = stages x D ranks
    placement = "stage-major"           # or "replica-major": how replicas' ranks are numbered
    allreduce = "law"                   # or "ring-steps": the all-reduce's steps message by message
    recompute = "none"                  # "all", or pieces like "0,2" (0 .. stages x chunks - 1)
    optimizer = "sgd"
    memory_cap = "64MiB"                # optimize and sweep
    [what_ifs]
    rank_speed = ["3:0.5"]
    links = ["2-3:1.25e8Bps"]
    ranks_per_node = 2

Keys are strict, like the model loader's. Paths in a file are relative to the
file's folder; in memory they are relative to the working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

from . import limits as lim
from .errors import UserError
from .tomlfile import read_toml

OPTIMIZERS = ("sgd", "adam")
TRANSPORTS = ("mpi", "gloo")  # as profile.TRANSPORTS (spec.py imports no profile code)
ALLREDUCE_MODELS = ("law", "ring-steps")  # how all-reduces are simulated (costs.ProfileCostModel.allreduce)
RECOMPUTE = ("none", "all")  # or piece indices like "0,2" (plan.recompute_pieces checks the range)


class SpecError(UserError):
    """An execution spec (file or flags) that cannot be used; one line for the user."""


@dataclass(frozen=True)
class ExecutionSpec:
    """Everything a command needs besides its own output options. None: the command's default.
    List-valued fields are tuples; a command that takes one value refuses a longer tuple."""

    model_file: str | None = None
    layers: int | None = None
    width: int | None = None
    profile: str = "default"
    profile_sha256: str | None = None
    transport: str = "mpi"
    stages: tuple[int, ...] | None = None
    chunks: tuple[int, ...] | None = None
    schedule: tuple[str, ...] | None = None
    schedule_file: str | None = None
    microbatches: tuple[int, ...] | None = None
    batch_size: int | None = None
    partition: str | None = None
    partition_counts: tuple[int, ...] | None = None
    data_parallel: int = 1
    placement: str | None = None  # None: stage-major
    allreduce: str | None = None  # None: the ring law (costs.ALLREDUCE_MODELS)
    recompute: str = "none"
    optimizer: str | None = None
    memory_cap: str | None = None
    rank_speed: tuple[str, ...] = ()
    links: tuple[str, ...] = ()
    ranks_per_node: int | None = None

    def merged(self, overrides: dict) -> ExecutionSpec:
        """This spec with the fields `overrides` names (flags given on the command line) replaced."""
        given = {k: v for k, v in overrides.items() if v is not None and v != ()}
        if "model_file" in given or "layers" in given or "width" in given:
            if "model_file" not in given:  # --layers/--width replace a file the config names
                given["model_file"] = None
        if "schedule" in given and "schedule_file" not in given:
            given["schedule_file"] = None
        if "schedule_file" in given and "schedule" not in given:
            given["schedule"] = None
        if "partition" in given and "partition_counts" not in given:
            given["partition_counts"] = None
        return check_spec(replace(self, **given))


# (table, key in the file) -> field; `kind`: int, ints (one or a list), str, strs, path
_LAYOUT: dict[str, dict[str, tuple[str, str]]] = {
    "model": {"file": ("model_file", "path"), "layers": ("layers", "int"), "width": ("width", "int")},
    "profile": {"path": ("profile", "profile"), "sha256": ("profile_sha256", "str"),
                "transport": ("transport", "str")},
    "execution": {"stages": ("stages", "ints"), "chunks": ("chunks", "ints"), "schedule": ("schedule", "strs"),
                  "schedule_file": ("schedule_file", "path"), "microbatches": ("microbatches", "ints"),
                  "batch_size": ("batch_size", "int"), "partition": ("partition", "str"),
                  "partition_counts": ("partition_counts", "ints"), "data_parallel": ("data_parallel", "int"),
                  "placement": ("placement", "str"), "allreduce": ("allreduce", "str"),
                  "recompute": ("recompute", "str"), "optimizer": ("optimizer", "str"),
                  "memory_cap": ("memory_cap", "str")},
    "what_ifs": {"rank_speed": ("rank_speed", "strs"), "links": ("links", "strs"),
                 "ranks_per_node": ("ranks_per_node", "int")},
}
_RANGES = {"layers": lim.MAX_LAYERS, "width": lim.MAX_WIDTH, "stages": lim.MAX_STAGES, "chunks": lim.MAX_STAGES,
           "microbatches": lim.MAX_BATCH_SIZE, "batch_size": lim.MAX_BATCH_SIZE,
           "partition_counts": lim.MAX_LAYERS, "data_parallel": lim.MAX_STAGES,
           "ranks_per_node": lim.MAX_RANKS_PER_NODE}


def _int(value, key: str, where: str) -> int:
    high = _RANGES[key]
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
        raise SpecError(f"{where}: {key!r} must be an integer in 1..{high}, got {value!r}")
    return value


def _str(value, key: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
    return value


def _value(kind: str, value, key: str, where: str, folder: Path):
    if kind == "int":
        return _int(value, key, where)
    if kind in ("ints", "strs"):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise SpecError(f"{where}: {key!r} must not be an empty list")
        one = _int if kind == "ints" else _str
        return tuple(one(item, key, where) for item in items)
    text = _str(value, key, where)
    if kind == "path" or (kind == "profile" and text != "default"):
        return normal_path(folder / text)
    return text


def normal_path(path: str | Path) -> str:
    """A path relative to the working directory when it lies below it, else absolute."""
    full = os.path.abspath(path)
    relative = os.path.relpath(full)
    return full if relative.startswith("..") else relative


def parse_spec(data: dict, where: str, folder: Path = Path(".")) -> ExecutionSpec:
    """A spec from parsed TOML (paths relative to `folder`); unknown tables or keys are refused."""
    values = {}
    for table, entries in data.items():
        home = [name for name, keys in _LAYOUT.items() if table in keys]
        if table not in _LAYOUT and home:
            raise SpecError(f"{where}: {table!r} belongs in the [{home[0]}] table")
        if table not in _LAYOUT:
            raise SpecError(f"{where}: unknown table [{table}] (allowed: {', '.join(_LAYOUT)})")
        if not isinstance(entries, dict):
            raise SpecError(f"{where}: {table} must be a table, written [{table}]")
        for key, value in entries.items():
            if key not in _LAYOUT[table]:
                raise SpecError(f"{where} [{table}]: unknown key {key!r} "
                                f"(allowed: {', '.join(_LAYOUT[table])})")
            name, kind = _LAYOUT[table][key]
            values[name] = _value(kind, value, key, f"{where} [{table}]", folder)
    return check_spec(ExecutionSpec(**values), where)


def check_spec(spec: ExecutionSpec, where: str = "the execution") -> ExecutionSpec:
    """What every command refuses, wherever the value came from."""
    from .schedule import SCHEDULES

    if spec.model_file and (spec.layers is not None or spec.width is not None):
        raise SpecError(f"{where}: give the model as a file or as layers/width, not both")
    if spec.schedule and spec.schedule_file:
        raise SpecError(f"{where}: give schedule or schedule_file, not both")
    for name in spec.schedule or ():
        if name not in SCHEDULES:
            raise SpecError(f"{where}: unknown schedule {name!r} (allowed: {', '.join(SCHEDULES)})")
    if spec.optimizer is not None and spec.optimizer not in OPTIMIZERS:
        raise SpecError(f"{where}: optimizer must be one of {', '.join(OPTIMIZERS)}, got {spec.optimizer!r}")
    from .dataparallel import PLACEMENTS

    if spec.placement is not None and spec.placement not in PLACEMENTS:
        raise SpecError(f"{where}: placement must be one of {', '.join(PLACEMENTS)}, got {spec.placement!r}")
    if spec.allreduce is not None and spec.allreduce not in ALLREDUCE_MODELS:
        raise SpecError(f"{where}: allreduce must be one of {', '.join(ALLREDUCE_MODELS)}, got {spec.allreduce!r}")
    if spec.transport not in TRANSPORTS:
        raise SpecError(f"{where}: transport must be one of {', '.join(TRANSPORTS)}, got {spec.transport!r}")
    if spec.recompute.strip() not in (*RECOMPUTE, "auto") and not all(  # auto: optimize's (recomputation.py)
            item.strip().isdigit() and len(item.strip()) <= 9 for item in spec.recompute.split(",")):
        raise SpecError(f"{where}: recompute must be none, all or piece indices like 0,2, got {spec.recompute!r} "
                        "(optimize also takes auto)")
    return spec


def load_spec(path: str | Path) -> ExecutionSpec:
    """An experiment file; a profile whose contents changed since it was saved warns."""
    path = Path(path)
    spec = parse_spec(read_toml(path, SpecError, "config"), str(path), path.parent)
    if spec.profile_sha256 is not None:
        now = profile_sha256(spec.profile)
        if now != spec.profile_sha256:
            warnings.warn(f"{path}: profile {spec.profile} has changed since the file was saved "
                          f"(sha256 {now[:12]}..., the file says {spec.profile_sha256[:12]}...); "
                          "answers may differ", stacklevel=2)
    return spec


def profile_sha256(source: str) -> str:
    """The sha256 of a profile file's bytes ("default": the profile shipped with pipesim)."""
    from importlib import resources

    from .profile import ProfileError

    if source == "default":
        data = resources.files("pipesim").joinpath("data/default.json").read_bytes()
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ProfileError(f"cannot read profile file {source}: {exc.strerror or exc}") from None
    return hashlib.sha256(data).hexdigest()


# --- writing ------------------------------------------------------------------------


def spec_tables(spec: ExecutionSpec, folder: Path | None = None) -> dict[str, dict]:
    """The spec as the file's tables (None fields left out; one-element lists as scalars).
    With `folder`, paths are written relative to it (the file's own folder)."""
    def out(name: str, kind: str):
        value = getattr(spec, name)
        if value is None or value == ():
            return None
        if kind in ("path", "profile") and folder is not None and not (kind == "profile" and value == "default"):
            return _path_from(folder, value)
        if name in _SCALAR_WHEN_ONE and len(value) == 1:
            return value[0]
        return list(value) if isinstance(value, tuple) else value

    tables: dict[str, dict] = {}
    for table, entries in _LAYOUT.items():
        values = {key: out(name, kind) for key, (name, kind) in entries.items()}
        tables[table] = {k: v for k, v in values.items() if v is not None}
    return {k: v for k, v in tables.items() if v}


_SCALAR_WHEN_ONE = {"stages", "chunks", "schedule", "microbatches"}


def _path_from(folder: Path, path: str) -> str:
    """`path` as a file in `folder` names it: relative when the two share a top-level
    folder (experiments/ and models/ of one checkout), else absolute."""
    target, base = os.path.abspath(path), os.path.abspath(folder)
    shared = os.path.commonpath([target, base])
    return os.path.relpath(target, base) if shared != os.path.dirname(shared) else target


def _toml_value(value) -> str:
    if isinstance(value, bool):
        raise TypeError("no booleans in a spec")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):  # a TOML basic string: JSON's escapes, plus DEL
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"


def dump_spec(spec: ExecutionSpec, path: str | Path, command: str = "") -> str:
    """The spec as TOML text for file `path` (the types are flat: integers, strings and
    lists of them, so a few lines do what a TOML writer package would)."""
    command = "".join(c if c.isprintable() else "?" for c in command)  # a comment holds no control characters
    lines = [f"# pipesim execution spec{f', saved by: {command}' if command else ''}",
             "# load it with --config; flags given beside it override its fields"]
    for table, entries in spec_tables(spec, Path(path).parent).items():
        lines += ["", f"[{table}]"] + [f"{key} = {_toml_value(value)}" for key, value in entries.items()]
    return "\n".join(lines) + "\n"


def spec_json(spec: ExecutionSpec) -> dict:
    """The spec as `--json` embeds it: the file's tables, paths relative to the working directory."""
    return spec_tables(spec)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in fields(ExecutionSpec))
