"""Fuzzing the command line in-process (hypothesis): generated arguments and generated
model, profile and grid files. Every case either succeeds (exit 0, stdout JSON that a
strict parser reads, every number finite) or is a user error (exit 2, exactly one line
`pipesim: error: ...`, after warnings only). A traceback here is a bug in pipesim.

CI cost: 3,900 cases in about 30 s on the reference machine (2-core VM); the example
counts below are the knob.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.errors import UserError
from pipesim.profile import load_profile
from pipesim.validate import load_grid, plan_case

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = json.loads((REPO / "pipesim/data/default.json").read_text())
EXAMPLES = int(os.environ.get("PIPESIM_FUZZ_EXAMPLES", "0")) or None  # override every count (bug hunts)


def fuzz(max_examples: int):
    return settings(max_examples=EXAMPLES or max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# --- the oracle ---------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_numbers(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite_numbers(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite_numbers(v) for v in value)
    return True


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def check_outcome(argv: list[str], expect_json: bool = True) -> int:
    code, out, err = run_cli(argv)
    event(f"exit {code}")  # pytest --hypothesis-show-statistics: how many cases succeed
    lines = err.splitlines()
    if code == 0:
        if expect_json:
            data = json.loads(out, parse_constant=_reject_constant)  # NaN, Infinity: not JSON
            assert _finite_numbers(data), out
        else:  # the human-readable tables
            assert out and not re.search(r"\b(nan|inf)\b", out, re.IGNORECASE), out
        assert not any(line.startswith("pipesim: error") or "Traceback" in line for line in lines), err
    else:
        assert code == 2, (argv, err)
        assert out == "", out
        assert lines and lines[-1].startswith("pipesim: error: "), (argv, err)
        assert all(line.startswith("pipesim: warning: ") for line in lines[:-1]), (argv, err)
    return code


# --- generated values ------------------------------------------------------------------

def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values about nine times in ten, so that whole commands succeed often enough to be tested."""
    return st.integers(0, 9).flatmap(lambda k: invalid if k == 9 else valid)


SMALL_INT = st.integers(-3, 40)
EDGE_NUMBER_TEXT = st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e-320", "1e400", "0", "-0",
                                    "-1", "0.5", "1e9", "", "x", "1_0", " 3", "99999999999999999999"])
INT_TEXT = mostly(st.integers(1, 40).map(str), st.one_of(SMALL_INT.map(str), EDGE_NUMBER_TEXT))
FLOAT_TEXT = mostly(st.floats(0.01, 100).map(repr),
                    st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), EDGE_NUMBER_TEXT))
POWERS = st.sampled_from([1, 2, 4, 8])
LIST_TEXT = mostly(st.lists(POWERS, min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
                   st.one_of(st.lists(SMALL_INT, min_size=1, max_size=3).map(lambda v: ",".join(map(str, v))),
                             EDGE_NUMBER_TEXT))
PARTITION = mostly(st.just("balanced"),
                   st.one_of(LIST_TEXT, st.lists(st.tuples(SMALL_INT, SMALL_INT), min_size=1, max_size=4).map(
                       lambda v: ",".join(f"{a}-{b}" for a, b in v)), st.text("0123456789,-balnced ", max_size=12)))
RANK_SPEED = mostly(st.builds(lambda r, f: f"{r}:{f}", st.integers(0, 3), st.floats(0.1, 10)),
                    st.builds(lambda r, f: f"{r}:{f}", st.one_of(SMALL_INT.map(str), EDGE_NUMBER_TEXT), FLOAT_TEXT))
LINK = mostly(st.builds(lambda a, v: f"{a}-{a + 1}:{v}Bps", st.integers(0, 2), st.floats(1e6, 1e10)),
              st.builds(lambda a, b, v, unit: f"{a}-{b}:{v}{unit}", SMALL_INT, SMALL_INT, FLOAT_TEXT,
                        st.sampled_from(["Bps", "s", "", "Bps,1e-6s"])))
MEMORY_CAP = mostly(st.sampled_from(["64MiB", "1GiB", "1e9", "1.5e8", "4MiB"]),
                    st.one_of(st.sampled_from(["0.5", "0", "nanMiB", "1e400", "2XB"]), FLOAT_TEXT))


def options(**choices) -> st.SearchStrategy[list[str]]:
    """Any subset of the options, each with a generated value (None: a flag)."""
    def flatten(chosen: dict) -> list[str]:
        argv = []
        for name, value in chosen.items():
            argv += [name] if value is None else [name, value]
        return argv
    return st.fixed_dictionaries({}, optional=choices).map(flatten)


PLAN = dict(**{"--layers": INT_TEXT, "--width": mostly(st.sampled_from(["8", "256", "512"]), INT_TEXT),
               "--batch-size": mostly(st.sampled_from(["8", "16", "64", "512"]), INT_TEXT),
               "--schedule": st.sampled_from(["gpipe", "1f1b", "zb"]),
               "--optimizer": st.sampled_from(["sgd", "adam"]),
               "--rank-speed": RANK_SPEED, "--link": LINK, "--ranks-per-node": INT_TEXT})


# --- the commands --------------------------------------------------------------------


@fuzz(1000)
@given(argv=options(**PLAN, **{"--stages": LIST_TEXT, "--microbatches": LIST_TEXT, "--partition": PARTITION}),
       trace=st.sampled_from([None, "ok", "folder", "missing"]), as_json=mostly(st.just(True), st.just(False)))
def test_predict(work, argv, trace, as_json):
    where = {"ok": str(work / "t.json"), "folder": str(work), "missing": str(work / "no" / "t.json")}
    extra = ["--trace", where[trace]] if trace else []
    check_outcome(["predict", *argv, *extra, *(["--json"] if as_json else [])], expect_json=as_json)


@fuzz(500)
@given(argv=options(**PLAN, **{"--stages": st.one_of(st.integers(0, 6).map(str), EDGE_NUMBER_TEXT),
                               "--microbatches": INT_TEXT, "--memory-cap": MEMORY_CAP,
                               "--max-simulations": st.one_of(st.integers(-1, 20).map(str), EDGE_NUMBER_TEXT)}),
       layers=st.integers(1, 16), as_json=mostly(st.just(True), st.just(False)))
def test_optimize(argv, layers, as_json):
    check_outcome(["optimize", "--layers", str(layers), *argv, *(["--json"] if as_json else [])], as_json)


@fuzz(300)
@given(argv=options(**{**PLAN, "--stages": LIST_TEXT, "--microbatches": LIST_TEXT, "--memory-cap": MEMORY_CAP,
                       "--schedule": st.sampled_from(["gpipe", "1f1b", "gpipe,1f1b", "zb", ""]),
                       "--partition": st.sampled_from(["balanced", "even", "optimized", "x"])}),
       layers=st.integers(1, 12), as_json=mostly(st.just(True), st.just(False)))
def test_sweep(argv, layers, as_json):
    check_outcome(["sweep", "--layers", str(layers), *argv, "--jobs", "1", "--quiet",
                   *(["--json"] if as_json else [])], as_json)


# --- the loaders ---------------------------------------------------------------------

VALUE = st.one_of(SMALL_INT, st.sampled_from([0, -1, 10**5, 10**5 + 1, 2**20 + 1, 2**63 - 1]),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5), st.booleans())
COUNT = mostly(st.integers(1, 40), VALUE)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def toml_text(top: dict, tables: dict[str, dict], arrays: dict[str, list[dict]]) -> str:
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, table in tables.items():
        lines += [f"[{name}]"] + [f"{key} = {toml_value(value)}" for key, value in table.items()]
    for name, entries in arrays.items():
        for entry in entries:
            lines += [f"[[{name}]]"] + [f"{key} = {toml_value(value)}" for key, value in entry.items()]
    return "\n".join(lines) + "\n"


FEATURES = mostly(st.just(256), VALUE)  # equal widths chain; mismatches are errors
LAYER = mostly(st.fixed_dictionaries({"kind": st.just("fc"), "in_features": FEATURES, "out_features": FEATURES},
                                     optional={"repeat": COUNT}),
               st.fixed_dictionaries({}, optional={"kind": mostly(st.just("fc"), VALUE), "in_features": FEATURES,
                                                   "out_features": FEATURES, "repeat": COUNT, "bias": VALUE}))
FC_MODEL = (st.fixed_dictionaries({"fc": st.fixed_dictionaries({"num_layers": COUNT, "width": FEATURES})}),
            st.just({}))  # (tables, arrays of tables)
LAYERS_MODEL = (st.just({}), st.fixed_dictionaries({"layers": st.lists(LAYER, min_size=1, max_size=4)}))
ANY_MODEL = (st.fixed_dictionaries({}, optional={"fc": st.fixed_dictionaries(
    {}, optional={"num_layers": COUNT, "width": FEATURES, "depth": VALUE})}),
    st.fixed_dictionaries({}, optional={"layers": st.lists(LAYER, max_size=4)}))
MODEL_TEXT = st.one_of(*(st.builds(toml_text, mostly(st.just({"name": "m"}), st.fixed_dictionaries(
    {}, optional={"name": VALUE, "colour": VALUE})), *shape) for shape in (FC_MODEL, LAYERS_MODEL, ANY_MODEL)))


@fuzz(800)
@given(text=mostly(MODEL_TEXT, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
       raw=st.booleans(), stages=st.sampled_from(["1", "2", "4"]))
def test_model_files(work, text, raw, stages):
    path = work / "model.toml"
    path.write_bytes(text.encode("latin-1" if raw else "utf-8", errors="replace"))
    check_outcome(["predict", "--model", str(path), "--stages", stages, "--batch-size", "16",
                   "--microbatches", "4", "--json"])


NUMERIC_FIELDS = ["action_overhead_s", "links.intra_node.latency_s", "links.intra_node.bandwidth_Bps",
                  "links.inter_node", "links.intra_node.duplex", "compute.fc.forward.seconds.0.0",
                  "compute.fc.backward.seconds.1", "compute.fc.forward.widths.0",
                  "compute.fc.forward.microbatch_sizes.0", "optimizer.seconds.0", "optimizer.params.1",
                  "ranges.fc.width.0", "ranges.fc", "compute.fc.forward", "compute", "name", "version",
                  "links.intra_node", "optimizer"]
PROFILE_VALUE = st.one_of(VALUE, st.none(), st.builds(list), st.builds(dict), st.builds(lambda: {"fixed_s": 1e-4}),
                          st.integers(-(10**400), 10**400))


def _set(data, path: str, value) -> None:
    *parents, key = path.split(".")
    for name in parents:
        if isinstance(data, list) and name.isdigit() and int(name) < len(data):
            data = data[int(name)]
        elif isinstance(data, dict) and name in data:
            data = data[name]
        else:
            return
    if isinstance(data, list) and key.isdigit() and int(key) < len(data):
        data[int(key)] = value
    elif isinstance(data, dict):
        data[key] = value


@fuzz(800)
@given(changes=st.lists(st.tuples(st.sampled_from(NUMERIC_FIELDS), mostly(st.floats(0, 1e-3), PROFILE_VALUE)),
                        min_size=1, max_size=3),
       garbage=mostly(st.none(), st.binary(max_size=30)), ranks_per_node=st.sampled_from([[], ["--ranks-per-node", "1"]]))
def test_profile_files(work, changes, garbage, ranks_per_node):
    data = json.loads(json.dumps(DEFAULT_PROFILE))
    for path, value in changes:
        _set(data, path, value)
    profile = work / "profile.json"
    profile.write_bytes(garbage if garbage is not None else json.dumps(data).encode())
    code = check_outcome(["predict", "--profile", str(profile), "--stages", "2", "--layers", "8", "--width", "256",
                          "--batch-size", "64", "--microbatches", "4", *ranks_per_node, "--json"])
    if code == 0:  # what the command accepted, the loader accepts
        load_profile(profile)


GRID_LIST = st.lists(VALUE, min_size=1, max_size=2)
GROUP = st.fixed_dictionaries({}, optional={
    "layers": st.one_of(st.just([4, 8]), GRID_LIST), "widths": st.one_of(st.just([256]), GRID_LIST),
    "batch_sizes": st.one_of(st.just([16]), GRID_LIST), "stages": st.one_of(st.just([1, 2]), GRID_LIST),
    "microbatches": st.one_of(st.just([2, 4]), GRID_LIST),
    "partitions": st.one_of(st.just(["balanced"]), st.lists(PARTITION, min_size=1, max_size=2), GRID_LIST),
    "schedules": st.one_of(st.just(["gpipe", "1f1b"]), GRID_LIST), "colour": VALUE})
GRID_TEXT = st.builds(toml_text,
                      st.fixed_dictionaries({}, optional={"name": VALUE, "iterations": VALUE, "warmup": VALUE,
                                                          "rounds": VALUE, "network": VALUE}),
                      st.just({}), st.fixed_dictionaries({"groups": st.lists(GROUP, max_size=2)}))


@fuzz(500)
@given(text=GRID_TEXT)
def test_grid_files(work, text):
    path = work / "grid.toml"
    path.write_text(text)
    costs = ProfileCostModel(load_profile())
    try:
        grid = load_grid(path)
        for case in grid.cases:  # what `validate` does before it launches anything
            plan_case(case, costs)
    except UserError as exc:
        assert "\n" not in str(exc)
