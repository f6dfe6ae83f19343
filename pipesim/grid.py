"""Validation grids (validation/*.toml): a base execution spec plus axes.

The base is an execution spec in the experiment files' format (spec.py); each
``[[axes]]`` entry varies some of its execution fields, and the grid is the
union of every entry's product over the base::

    name = "quick"
    iterations = 20          # measured iterations per case and round
    warmup = 5
    rounds = 2               # every case measured once per round, rounds interleaved
    network = "loopback"     # a label; for a shaped network run validate inside
                             # validation/shaped_network.sh
    [base.model]
    layers = 32
    width = 512
    [base.execution]
    batch_size = 512
    stages = 2
    schedule = "1f1b"
    partition = "balanced"

    [[axes]]
    microbatches = [4, 8]
    partition = ["balanced", "8,24", "24,8"]
    [[axes]]
    microbatches = [8]
    schedule = ["gpipe", "my-schedule.txt"]   # a name or a schedule file (pipesim text or torch CSV)
    chunks = [1, 2]                           # chunks per rank (default: each schedule's own)
    [[axes]]
    model_file = ["../models/uneven.toml"]    # a model file (relative to the grid) instead of fc layers x width

Axes keys: model_file, layers, width, batch_size, stages, microbatches,
partition, schedule, chunks, data_parallel, recompute (``models = [...]``,
``data_parallels = [...]``, ``recomputes = [...]`` in the older form; data_parallel D runs D
pipeline replicas, P x D ranks; recompute is none, all or piece indices like "0,2"). For every
(model, batch size) a single-rank baseline case is added, so that measured and
predicted speedups can be compared. The first form,
``[[groups]]`` of plural lists (``widths = [512]``, ``batch_sizes = [512]``...),
is still read.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from .costs import ProfileCostModel
from .errors import UserError
from .limits import MAX_BATCH_SIZE, MAX_LAYERS, MAX_STAGES, MAX_WIDTH
from .model import ModelSpec, fc, load_model
from .plan import Plan, make_plan
from .schedule import SCHEDULES, Schedule
from .tomlfile import read_toml

_GRID_KEYS = {"name", "iterations", "warmup", "rounds", "network", "groups", "base", "axes"}
_GROUP_KEYS = {"layers", "widths", "batch_sizes", "stages", "microbatches", "partitions", "schedules", "chunks",
               "models", "data_parallels", "recomputes"}


class GridError(UserError):
    """A grid file that cannot be used; one line for the user."""


@cache
def _model_file(path: str) -> ModelSpec:
    return load_model(path)


@dataclass(frozen=True)
class Case:
    layers: int
    width: int
    batch_size: int
    stages: int
    microbatches: int
    partition: str
    schedule: str  # a schedule's name or a schedule file
    chunks: int = 0  # chunks per rank; 0: the schedule's own
    model_file: str = ""  # a model file (models/*.toml) instead of fc layers x width
    data_parallel: int = 1  # pipeline replicas: stages x data_parallel ranks
    recompute: str = "none"  # pieces that recompute their activations (plan.recompute_pieces)

    def model(self) -> ModelSpec:
        return _model_file(self.model_file) if self.model_file else fc(self.layers, self.width)

    @property
    def model_name(self) -> str:
        return self.model().name

    @property
    def label(self) -> str:
        chunks = f" v{self.chunks}" if self.chunks else ""
        replicas = f" d{self.data_parallel}" if self.data_parallel > 1 else ""
        recompute = f" recompute {self.recompute}" if self.recompute != "none" else ""
        return (f"{self.model_name} b{self.batch_size} p{self.stages}{replicas} m{self.microbatches} "
                f"{self.schedule}{chunks} [{self.partition}]{recompute}")

    @property
    def model_key(self) -> tuple[str, int]:
        return self.model_name, self.batch_size

    @property
    def is_baseline(self) -> bool:
        return self.stages == 1 and self.microbatches == 1 and self.data_parallel == 1


@dataclass(frozen=True)
class Grid:
    name: str
    iterations: int
    warmup: int
    rounds: int
    network: str
    cases: tuple[Case, ...]


_INT_RANGES = {"layers": (1, MAX_LAYERS), "widths": (1, MAX_WIDTH), "batch_sizes": (1, MAX_BATCH_SIZE),
               "stages": (1, MAX_STAGES), "microbatches": (1, MAX_BATCH_SIZE),
               "chunks": (1, MAX_STAGES), "data_parallels": (1, MAX_STAGES)}


def _list(group: dict, key: str, where: str) -> list:
    value = group.get(key)
    if not isinstance(value, list) or not value:
        raise GridError(f"{where}: {key} must be a non-empty list")
    for item in value:
        if key in _INT_RANGES:
            low, high = _INT_RANGES[key]
            if not isinstance(item, int) or isinstance(item, bool) or not low <= item <= high:
                raise GridError(f"{where}: {key} must hold integers in {low}..{high}, got {item!r}")
        elif key == "schedules" and not (item in SCHEDULES or isinstance(item, str) and Path(item).is_file()):
            raise GridError(f"{where}: schedules must hold {', '.join(SCHEDULES)} or a schedule file that "
                            f"exists, got {item!r}")
        elif not isinstance(item, str):
            raise GridError(f"{where}: {key} must hold strings like \"balanced\" or \"8,24\", got {item!r}")
    return value


def _setting(data: dict, key: str, default, low: int, path: Path):
    """A top-level grid setting: an integer >= low (iterations, warmup, rounds) or a string."""
    value = data.get(key, default)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise GridError(f"{path}: {key} must be a string, got {value!r}")
        return value
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= 100_000:
        raise GridError(f"{path}: {key} must be an integer in {low}..100000, got {value!r}")
    return value


def _relative(model_file: str, grid: Path) -> str:
    """A grid's model file, relative to the grid's folder unless absolute; it must load."""
    path = str(model_file if Path(model_file).is_absolute() else grid.parent / model_file)
    try:
        _model_file(path)
    except UserError as exc:
        raise GridError(f"{grid}: {exc}") from None
    return path


def load_grid(path: str | Path) -> Grid:
    path = Path(path)
    data = read_toml(path, GridError, "grid")
    unknown = sorted(set(data) - _GRID_KEYS)
    if unknown:
        raise GridError(f"{path}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_GRID_KEYS))})")
    cases: list[Case] = []
    groups = data.get("groups", [])
    if "base" in data or "axes" in data:
        if "groups" in data:
            raise GridError(f"{path}: give [base] and [[axes]], or the older [[groups]], not both")
        groups = _groups_of(data.get("base", {}), data.get("axes", [{}]), path)
    if not isinstance(groups, list) or not all(isinstance(group, dict) for group in groups):
        raise GridError(f"{path}: groups must be tables, written [[groups]]")
    for index, group in enumerate(groups):
        where = f"{path} groups[{index}]"
        unknown = sorted(set(group) - _GROUP_KEYS)
        if unknown:
            raise GridError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(_GROUP_KEYS))})")
        lists = [_list(group, key, where) for key in ("layers", "widths", "batch_sizes", "stages",
                                                       "microbatches", "partitions", "schedules")]
        lists.append(_list(group, "chunks", where) if "chunks" in group else [0])
        lists.append([_relative(item, path) for item in _list(group, "models", where)] if "models" in group else [""])
        lists.append(_list(group, "data_parallels", where) if "data_parallels" in group else [1])
        lists.append([str(r) for r in _list(group, "recomputes", where)] if "recomputes" in group else ["none"])
        for values in itertools.product(*lists):
            case = Case(*values)
            if case not in cases:
                cases.append(case)
    if not cases:
        raise GridError(f"{path}: no cases (add [[groups]])")
    for first in {c.model_key: c for c in reversed(cases)}.values():
        layers = first.model().num_layers
        baseline = Case(first.layers, first.width, first.batch_size, 1, 1, str(layers), "gpipe", 0,
                        first.model_file)
        if baseline not in cases:
            cases.insert(0, baseline)
    return Grid(_setting(data, "name", path.stem, 0, path), _setting(data, "iterations", 20, 1, path),
                _setting(data, "warmup", 5, 0, path), _setting(data, "rounds", 2, 1, path),
                _setting(data, "network", "loopback", 0, path), tuple(cases))


def calibration_cells(grid: Grid) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The fc widths and micro-batch sizes a grid's cases compute at: what
    `pipesim calibrate --widths ... --microbatch-sizes ...` must measure so
    that every cost the grid uses is a measured cell."""
    widths = sorted({layer.out_features for c in grid.cases for layer in c.model().layers})
    sizes = sorted({c.batch_size // (c.microbatches * c.data_parallel) for c in grid.cases})
    return tuple(widths), tuple(sizes)


def plan_case(case: Case, costs: ProfileCostModel) -> Plan:
    from .plan import load_schedule_file

    schedule: str | Schedule = case.schedule
    if schedule not in SCHEDULES:  # a schedule file
        schedule, _ = load_schedule_file(case.schedule, case.stages, case.chunks or None, case.microbatches,
                                         case.schedule)
    if case.data_parallel > 1:
        from .dataparallel import Layout, replica_costs

        replica = replica_costs(costs, Layout(case.stages, case.data_parallel, ranks_per_node=costs.ranks_per_node))
        return make_plan(case.model(), case.stages, case.microbatches, case.batch_size, schedule, case.partition,
                         replica, case.chunks or None, case.data_parallel, recompute=case.recompute)
    return make_plan(case.model(), case.stages, case.microbatches, case.batch_size,
                     schedule, case.partition, costs, case.chunks or None, recompute=case.recompute)




# --- base spec + axes -> groups ---------------------------------------------------------

# axis key (a spec field) -> the group key of the [[groups]] form
_AXES = {"model_file": "models", "layers": "layers", "width": "widths", "batch_size": "batch_sizes", "stages": "stages",
         "microbatches": "microbatches", "partition": "partitions", "schedule": "schedules", "chunks": "chunks",
         "data_parallel": "data_parallels", "recompute": "recomputes"}
_DEFAULTS = {"layers": 32, "width": 512, "batch_size": 512, "stages": 2, "microbatches": 8,
             "partition": "balanced", "schedule": "1f1b", "data_parallel": 1, "recompute": "none"}
_UNUSED = ("profile", "profile_sha256", "schedule_file", "partition_counts", "memory_cap",
           "rank_speed", "links", "ranks_per_node", "placement")


def _groups_of(base: dict, axes: list, path: Path) -> list[dict]:
    """The [base] spec and each [[axes]] entry as one group of the [[groups]] form."""
    from dataclasses import asdict

    from .spec import SpecError, parse_spec

    if not isinstance(base, dict):
        raise GridError(f"{path}: base must be a table of spec tables, written [base.model], [base.execution]")
    try:
        spec = asdict(parse_spec(base, f"{path} [base]", path.parent))
    except SpecError as exc:
        raise GridError(str(exc)) from None
    for name in _UNUSED:
        if spec[name] not in (None, (), "default"):
            raise GridError(f"{path} [base]: validation grids do not take {name} (the runner measures "
                            "fc layers of the given layers and width on this machine)")
    if spec["optimizer"] not in (None, "sgd"):
        raise GridError(f"{path} [base]: validation grids measure with sgd, got {spec['optimizer']!r}")
    if not isinstance(axes, list) or not all(isinstance(axis, dict) for axis in axes):
        raise GridError(f"{path}: axes must be tables, written [[axes]]")
    groups = []
    for index, axis in enumerate(axes):
        unknown = sorted(set(axis) - set(_AXES))
        if unknown:
            raise GridError(f"{path} axes[{index}]: unknown key {unknown[0]!r} (allowed: {', '.join(_AXES)})")
        group = {}
        for key, group_key in _AXES.items():
            value = axis.get(key, spec[key])
            if value is None and key in _DEFAULTS:
                value = _DEFAULTS[key]
            if value is not None:
                group[group_key] = list(value) if isinstance(value, (list, tuple)) else [value]
        groups.append(group)
    return groups
