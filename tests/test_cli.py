"""The predict command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipesim.cli import main
from pipesim.profile import load_profile

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def python(*args, timeout=120):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


RANK_FIELDS = {"rank", "first_layer", "last_layer", "busy_s", "idle_s", "peak_memory_bytes"}


def test_predict_json_fields(capsys):
    code, out, _ = run_main(capsys, "predict", "--layers", "32", "--stages", "4", "--json")
    assert code == 0
    data = json.loads(out)
    assert isinstance(data, dict)
    for key in ("iteration_time_s", "baseline_time_s", "speedup", "bubble_fraction",
                "throughput_samples_per_s", "schedule", "num_stages", "num_microbatches",
                "partition", "ranks", "profile"):
        assert key in data, key
    assert data["schedule"] == "1f1b"
    assert data["num_stages"] == 4
    assert data["num_microbatches"] == 8
    assert data["partition"] == [8, 8, 8, 8]
    assert data["profile"] == load_profile(None).name == "reference-2core"
    assert data["iteration_time_s"] > 0 and data["baseline_time_s"] > 0
    assert data["speedup"] == pytest.approx(data["baseline_time_s"] / data["iteration_time_s"])
    assert data["throughput_samples_per_s"] == pytest.approx(data["batch_size"] / data["iteration_time_s"])
    assert data["microbatch_size"] * 8 == data["batch_size"]
    assert 0 < data["bubble_fraction"] < 1
    ranks = data["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert [(r["first_layer"], r["last_layer"]) for r in ranks] == [(0, 7), (8, 15), (16, 23), (24, 31)]
    for r in ranks:
        assert RANK_FIELDS <= set(r)
        assert r["busy_s"] + r["idle_s"] == pytest.approx(data["iteration_time_s"])
        assert r["peak_memory_bytes"] > 0
    # 1F1B holds fewer micro-batches downstream
    assert ranks[0]["peak_memory_bytes"] > ranks[3]["peak_memory_bytes"]


def test_predict_json_with_options(capsys):
    code, out, _ = run_main(capsys, "predict", "--layers", "12", "--width", "64", "--schedule", "gpipe",
                            "--partition", "0-1,2-11", "--microbatches", "4", "--batch-size", "8",
                            "--json")
    assert code == 0
    data = json.loads(out)
    assert data["schedule"] == "gpipe"
    assert data["partition"] == [2, 10]
    assert (data["num_stages"], data["num_microbatches"], data["microbatch_size"]) == (2, 4, 2)
    assert [(r["first_layer"], r["last_layer"]) for r in data["ranks"]] == [(0, 1), (2, 11)]


def test_predict_model_file(capsys):
    code, out, _ = run_main(capsys, "predict", "--model", str(REPO / "models" / "fc32.toml"), "--json")
    assert code == 0
    data = json.loads(out)
    assert data["model"] == "fc32" and data["num_layers"] == 32


def test_sweep_json_is_a_list(capsys):
    code, out, _ = run_main(capsys, "predict", "--stages", "1,2,4", "--microbatches", "2,8",
                            "--batch-size", "64", "--json")
    assert code == 0
    data = json.loads(out)
    assert isinstance(data, list)
    assert [(d["num_stages"], d["num_microbatches"]) for d in data] == [
        (1, 2), (1, 8), (2, 2), (2, 8), (4, 2), (4, 8)]
    assert [d["partition"] for d in data] == [[32], [32], [16, 16], [16, 16], [8, 8, 8, 8], [8, 8, 8, 8]]


def test_sweep_table(capsys):
    code, out, _ = run_main(capsys, "predict", "--stages", "1,2,4", "--microbatches", "2,8",
                            "--batch-size", "64")
    assert code == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    lines = out.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["stages", "micro"])
    rows = [line.split() for line in lines[header + 1 :]]
    assert [(int(r[0]), int(r[1])) for r in rows] == [(1, 2), (1, 8), (2, 2), (2, 8), (4, 2), (4, 8)]
    assert [r[-1] for r in rows] == ["32", "32", "16,16", "16,16", "8,8,8,8", "8,8,8,8"]


def test_single_prediction_text(capsys):
    code, out, _ = run_main(capsys, "predict")
    assert code == 0
    assert "iteration time" in out and "speedup" in out and "bubble fraction" in out
    assert "partition 8,8,8,8" in out


def test_trace_file(capsys, tmp_path):
    trace = tmp_path / "trace.json"
    code, _, err = run_main(capsys, "predict", "--stages", "2", "--microbatches", "4", "--trace", str(trace))
    assert code == 0
    assert str(trace) in err
    data = json.loads(trace.read_text())
    events = data["traceEvents"]
    assert isinstance(events, list)
    compute = [e for e in events if e["ph"] == "X" and e["cat"] in ("F", "B")]
    assert sorted(e["name"] for e in compute) == sorted(
        f"{s}{k}{mb}" for s in range(2) for k in "FB" for mb in range(4))
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in compute)


def test_trace_needs_single_configuration(capsys, tmp_path):
    code, _, err = run_main(capsys, "predict", "--stages", "2,4", "--trace", str(tmp_path / "t.json"))
    assert code == 2
    assert "single configuration" in err
    assert not (tmp_path / "t.json").exists()


def test_predict_does_not_import_torch_or_mpi():
    result = python("-c", "import sys; from pipesim.cli import main; main(['predict','--json']); "
                    "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules, "
                    "[m for m in ('torch', 'mpi4py') if m in sys.modules]")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_stages"] == 4


def test_module_help():
    result = python("-m", "pipesim", "--help")
    assert result.returncode == 0, result.stderr
    assert "predict" in result.stdout
    result = python("-m", "pipesim", "predict", "--help")
    assert result.returncode == 0, result.stderr
    assert "--partition" in result.stdout and "--trace" in result.stdout


def test_bad_profile_path_exits_2():
    result = python("-m", "pipesim", "predict", "--profile", "/nonexistent/profile.json")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "profile file not found: /nonexistent/profile.json" in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_profile_content_exits_2(capsys, tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    code, _, err = run_main(capsys, "predict", "--profile", str(path))
    assert code == 2 and "not valid JSON" in err
    path.write_text(json.dumps({"schema": "pipesim-profile", "version": 6, "name": "x"}))
    code, _, err = run_main(capsys, "predict", "--profile", str(path))
    assert code == 2 and "version must be one of (1, 2, 3, 4, 5)" in err


@pytest.mark.parametrize("argv, expected", [
    (["--microbatches", "3", "--batch-size", "128"], "--batch-size 128 must be a positive multiple of --microbatches 3"),
    (["--layers", "0"], "argument --layers: must be in 1..100000, got 0"),
    (["--stages", "8", "--layers", "4"], "cannot cut 4 layers into 8 pieces"),
    (["--stages", "2,4", "--partition", "8,8,8,8"], "explicit --partition"),
])
def test_user_errors_exit_2(capsys, argv, expected):
    code, out, err = run_main(capsys, "predict", *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("pipesim: error:") and expected in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("field,value", [("optimizer", 3), ("compute", {"fc": 1}),
                                         ("links", {"intra_node": {}, "inter_node": 5})])
def test_wrongly_typed_profile_tables_name_the_field(tmp_path, field, value):
    from pipesim.profile import ProfileError, load_profile

    data = json.loads((Path(__file__).parents[1] / "pipesim/data/default.json").read_text())
    data[field] = value
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match=field):
        load_profile(path)


def test_gantt_png_is_written(tmp_path, capsys):
    path = tmp_path / "g.png"
    code, _, err = run_main(capsys, "predict", "--stages", "2", "--microbatches", "2", "--gantt", str(path))
    assert code == 0 and "wrote" in err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_shipped_profile_is_the_committed_reference_calibration():
    shipped = (REPO / "pipesim/data/default.json").read_text()
    assert shipped == (REPO / "calibration/reference-2core.json").read_text()
    assert json.loads(shipped)["metadata"]["cores"] == 2


def test_ranks_per_node_puts_slow_links_between_nodes(tmp_path, capsys):
    data = json.loads((REPO / "pipesim/data/default.json").read_text())
    data["links"]["inter_node"] = {"latency_s": 1e-3, "bandwidth_Bps": 1e7}
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps(data))
    args = ["predict", "--stages", "4", "--profile", str(profile), "--json"]
    _, one_node, _ = run_main(capsys, *args)
    _, two_nodes, _ = run_main(capsys, *args, "--ranks-per-node", "2")
    _, four_nodes, _ = run_main(capsys, *args, "--ranks-per-node", "1")
    times = [json.loads(out)["iteration_time_s"] for out in (one_node, two_nodes, four_nodes)]
    assert times[0] < times[1] < times[2]


def test_predict_names_the_machine_its_profile_was_measured_on(capsys, tmp_path):
    meta = json.loads((REPO / "pipesim/data/default.json").read_text())["metadata"]
    _, out, _ = run_main(capsys, "predict", "--stages", "2")
    assert f"measured on {meta['host']} ({meta['cpu_model']}, {meta['cores']} cores)" in out
    assert "pipesim calibrate" in out
    _, out, _ = run_main(capsys, "predict", "--stages", "2", "--json")
    assert json.loads(out)["profile_measured_on"].startswith(meta["host"])
    bare = tmp_path / "bare.json"  # a hand-written profile has no metadata: say so
    data = json.loads((REPO / "pipesim/data/default.json").read_text())
    del data["metadata"]
    bare.write_text(json.dumps(data))
    _, out, _ = run_main(capsys, "predict", "--stages", "2", "--profile", str(bare))
    assert "no machine recorded" in out
