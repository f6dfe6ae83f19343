"""The execution spec: strict loading, writing, flags over --config, and the round trip
`--save-config` then `--config` giving the identical answer."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from pipesim.cli import main
from pipesim.spec import ExecutionSpec, SpecError, dump_spec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.toml"))


def run_json(capsys, *argv) -> tuple[int, object, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def without_wall_clock(data):
    if isinstance(data, dict):
        return {k: without_wall_clock(v) for k, v in data.items() if k != "wall_s"}
    if isinstance(data, list):
        return [without_wall_clock(v) for v in data]
    return data


@pytest.mark.parametrize("text, expected", [
    ("[execution]\nstagez = 4\n", "unknown key 'stagez'"),
    ("[exec]\nstages = 4\n", "unknown table [exec]"),
    ("stages = 4\n", "'stages' belongs in the [execution] table"),
    ("execution = 4\n", "execution must be a table"),
    ("[execution]\nstages = 0\n", "'stages' must be an integer in 1..1024"),
    ("[execution]\nstages = [2, true]\n", "'stages' must be an integer"),
    ("[execution]\nmicrobatches = []\n", "must not be an empty list"),
    ("[execution]\nschedule = \"pipedream\"\n", "unknown schedule 'pipedream'"),
    ("[execution]\nplacement = \"diagonal\"\n", "placement must be one of stage-major, replica-major"),
    ("[execution]\nrecompute = \"full\"\n", "recompute must be none, all or piece indices like 0,2, got 'full'"),
    ("[execution]\nrecompute = \"0,-1\"\n", "recompute must be none, all or piece indices"),
    ("[execution]\noptimizer = \"lamb\"\n", "optimizer must be one of sgd, adam"),
    ("[model]\nfile = \"m.toml\"\nlayers = 4\n", "as a file or as layers/width, not both"),
    ("[execution\n", "not valid TOML"),
    ("[execution]\nschedule = \"gpipe\"\nschedule_file = \"s.txt\"\n", "schedule or schedule_file, not both"),
])
def test_bad_spec_files_are_one_line_errors(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError, match=re.escape(expected)):
        load_spec(path)
    assert main(["predict", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipesim: error: ") and err.count("\n") == 1 and expected in err


def test_dump_then_load_is_the_same_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "prof").mkdir()
    (tmp_path / "prof" / "ü.json").write_text("{}")
    spec = ExecutionSpec(model_file="models/m \"1\".toml", profile="prof/ü.json", profile_sha256="ab" * 32,
                         stages=(1, 2, 4), chunks=(2,), schedule=("zb-h1", "zb-v"), microbatches=(8,),
                         batch_size=256, partition="0-9,10-31", partition_counts=(10, 22), optimizer="adam",
                         memory_cap="64MiB", rank_speed=("3:0.5", "1:2"), links=("2-3:1.25e8Bps",),
                         ranks_per_node=2)
    path = tmp_path / "sub" / "x.toml"
    path.parent.mkdir()
    path.write_text(dump_spec(spec, path, "pipesim predict --tab\t\"q\"\x7f"))
    assert 'file = "../models/m \\"1\\".toml"' in path.read_text()  # relative to the file
    with pytest.warns(UserWarning, match="has changed since the file was saved"):  # its sha256 is made up
        assert load_spec(path) == spec


def test_flags_override_the_config_and_layers_replace_its_model_file(tmp_path, capsys):
    path = tmp_path / "x.toml"
    path.write_text(f'[model]\nfile = "{REPO / "models/uneven.toml"}"\n[execution]\nstages = 4\nmicrobatches = 8\n')
    code, data, _ = run_json(capsys, "predict", "--config", str(path), "--stages", "2", "--json")
    assert code == 0 and data["num_stages"] == 2 and data["num_microbatches"] == 8 and data["model"] == "uneven16"
    code, data, _ = run_json(capsys, "predict", "--config", str(path), "--layers", "8", "--json")
    assert code == 0 and data["num_layers"] == 8 and data["spec"]["model"] == {"layers": 8, "width": 512}


@pytest.mark.parametrize("argv", [
    ["predict", "--model", "models/uneven.toml", "--stages", "2", "--schedule", "zb-v", "--microbatches", "4",
     "--rank-speed", "1:0.5", "--batch-size", "256"],
    ["predict", "--stages", "1,2,4", "--microbatches", "4,8", "--optimizer", "adam"],
    ["predict", "--stages", "4", "--partition", "0-9,10-15,16-23,24-31", "--schedule", "gpipe"],
    ["optimize", "--stages", "2", "--schedule", "1f1b,zb-h1", "--memory-cap", "64MiB", "--link", "0-1:1e9Bps"],
    ["sweep", "--stages", "1,2", "--microbatches", "2,4", "--partition", "even", "--jobs", "1", "--quiet"],
])
def test_save_config_then_config_gives_the_identical_answer(tmp_path, capsys, monkeypatch, argv):
    monkeypatch.chdir(REPO)
    saved = tmp_path / "run.toml"
    code, first, _ = run_json(capsys, *argv, "--save-config", str(saved), "--json")
    assert code == 0 and saved.is_file()
    extra = ["--jobs", "1", "--quiet"] if argv[0] == "sweep" else []
    code, again, _ = run_json(capsys, argv[0], "--config", str(saved), *extra, "--json")
    assert code == 0
    assert without_wall_clock(again) == without_wall_clock(first)
    spec = (first[0] if isinstance(first, list) else first)["spec"]
    assert spec["execution"]["data_parallel"] == 1 and len(spec["profile"]["sha256"]) == 64


def test_a_changed_profile_warns(tmp_path, capsys):
    profile = tmp_path / "p.json"
    profile.write_text((REPO / "pipesim/data/default.json").read_text())
    saved = tmp_path / "x.toml"
    assert main(["predict", "--profile", str(profile), "--save-config", str(saved)]) == 0
    assert main(["predict", "--config", str(saved)]) == 0
    assert "warning" not in capsys.readouterr().err
    profile.write_text(profile.read_text() + "\n")  # any changed byte is a changed profile
    assert main(["predict", "--config", str(saved)]) == 0
    err = capsys.readouterr().err
    assert "pipesim: warning:" in err and "has changed since the file was saved" in err


def test_a_spec_list_is_refused_where_the_command_takes_one_value(tmp_path, capsys):
    path = tmp_path / "x.toml"
    path.write_text("[execution]\nstages = [2, 4]\n")
    assert main(["optimize", "--config", str(path)]) == 2
    assert "optimize takes one stage count, got 2, 4" in capsys.readouterr().err


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_file_loads_and_predicts(path, capsys):
    spec = load_spec(path)
    assert spec == parse_spec(__import__("tomllib").loads(path.read_text()), str(path), path.parent)
    code, data, err = run_json(capsys, "predict", "--config", str(path), "--json")
    assert code == 0, err
    for item in data if isinstance(data, list) else [data]:
        assert item["iteration_time_s"] > 0
        assert item["spec"]["execution"]["recompute"] == "none"


def test_experiments_folder_has_examples():
    assert {"fc32-1f1b-p4.toml", "uneven-zbv.toml"} <= {p.name for p in EXPERIMENTS}


def test_schedule_takes_a_config(tmp_path, capsys):
    path = tmp_path / "x.toml"
    path.write_text(dump_spec(replace(ExecutionSpec(), stages=(2,), schedule=("gpipe",), microbatches=(2,)), path))
    assert main(["schedule", "--config", str(path)]) == 0
    assert capsys.readouterr().out.startswith("# pipesim schedule gpipe stages=2 chunks=1 microbatches=2")


def test_every_spec_flag_names_a_spec_field_and_every_command_has_a_handler():
    from pipesim.cli import _FLAGS, HANDLERS
    from pipesim.options import build_parser
    from pipesim.spec import field_names

    assert set(_FLAGS.values()) <= set(field_names())
    parser = build_parser(HANDLERS)
    commands = parser._subparsers._group_actions[0].choices
    assert set(commands) == set(HANDLERS)
    for name in ("predict", "run", "optimize", "sweep", "schedule"):
        dests = {action.dest for action in commands[name]._actions}
        assert {"config", "save_config", "stages", "microbatches", "schedule"} <= dests, name


def test_a_schedule_file_in_the_config_gives_way_to_a_schedule_flag_and_back(tmp_path, capsys):
    schedule = tmp_path / "s.txt"
    assert main(["schedule", "--stages", "2", "--microbatches", "4", "--out", str(schedule)]) == 0
    path = tmp_path / "x.toml"
    path.write_text('[execution]\nschedule_file = "s.txt"\n')
    code, data, _ = run_json(capsys, "predict", "--config", str(path), "--json")
    assert code == 0 and data["num_microbatches"] == 4 and data["spec"]["execution"]["schedule_file"]
    code, data, _ = run_json(capsys, "predict", "--config", str(path), "--schedule", "gpipe", "--json")
    assert code == 0 and data["schedule"] == "gpipe" and "schedule_file" not in data["spec"]["execution"]
    assert main(["sweep", "--config", str(path)]) == 2
    assert "sweep builds its schedules by name" in capsys.readouterr().err
