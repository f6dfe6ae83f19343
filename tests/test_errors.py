"""Every bad input is one line `pipesim: error: ...` and exit 2 (issue 10): the inputs a new
user tried, the exit codes, options that have no effect, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipesim import workflows
from pipesim.cli import main
from pipesim.costs import WhatIfError
from pipesim.errors import UserError
from pipesim.model import ModelError
from pipesim.optimize import InfeasibleError, OptimizeError
from pipesim.partition import PartitionError
from pipesim.profile import ProfileError
from pipesim.runner.launch import RunFailed, RunnerUnavailable
from pipesim.schedule import ScheduleError
from pipesim.spec import SpecError
from pipesim.validate import GridError, load_grid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = json.loads((REPO / "pipesim/data/default.json").read_text())
SMALL = ["--layers", "8", "--width", "256", "--batch-size", "16", "--microbatches", "2"]  # no extrapolation


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code, out, err, expected=""):
    assert code == 2, err
    assert err.startswith("pipesim: error: ") and err.count("\n") == 1, err
    assert expected in err


@pytest.mark.parametrize("error", [ModelError, PartitionError, ScheduleError, ProfileError, GridError,
                                   WhatIfError, OptimizeError, InfeasibleError, SpecError,
                                   RunnerUnavailable])
def test_every_user_error_class_is_a_user_error(error):
    assert issubclass(error, UserError)
    assert not issubclass(RunFailed, UserError)  # a failed run is exit 1, not a user error


def profile_file(tmp_path, change) -> str:
    data = json.loads(json.dumps(DEFAULT_PROFILE))
    change(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))  # json writes NaN and Infinity, as a hand-edited file may
    return str(path)


def _set(path: str, value):
    def change(data):
        *parents, key = path.split(".")
        for name in parents:
            data = data[name]
        data[key] = value
    return change


@pytest.mark.parametrize("field, value, expected", [
    ("links.intra_node.bandwidth_Bps", float("nan"), "links.intra_node.bandwidth_Bps"),
    ("links.intra_node.bandwidth_Bps", 1e-320, "links.intra_node.bandwidth_Bps"),
    ("links.intra_node.latency_s", float("nan"), "links.intra_node.latency_s"),
    ("links.intra_node.latency_s", float("inf"), "links.intra_node.latency_s"),
    ("action_overhead_s", float("nan"), "action_overhead_s"),
    ("action_overhead_s", float("inf"), "action_overhead_s"),
    ("action_overhead_s", 10**400, "action_overhead_s"),
])
def test_profile_numbers_must_be_finite(tmp_path, capsys, field, value, expected):
    profile = profile_file(tmp_path, _set(field, value))
    assert_one_error(*run_main(capsys, "predict", "--profile", profile, "--json"), expected)


def test_profile_table_entries_must_be_finite(tmp_path, capsys):
    def change(data):
        data["compute"]["fc"]["forward"]["seconds"][1][2] = float("nan")
    profile = profile_file(tmp_path, change)
    assert_one_error(*run_main(capsys, "predict", "--profile", profile),
                     "compute.fc.forward.seconds[1][2]")

    def optimizer(data):
        data["optimizer"]["seconds"][0] = float("inf")
    assert_one_error(*run_main(capsys, "predict", "--profile", profile_file(tmp_path, optimizer)),
                     "optimizer.seconds[0]")


def test_a_profile_that_costs_nothing_is_an_error_not_a_division_by_zero(tmp_path, capsys):
    def zero(data):
        data.update(compute={"*": {"forward": {}, "backward": {}}}, action_overhead_s=0, optimizer={},
                    links={"intra_node": {}})
        data.pop("ranges")
        data.pop("kinds")  # measured kinds would cost their layers: the shipped profile's fc layers among them
    assert_one_error(*run_main(capsys, "predict", "--profile", profile_file(tmp_path, zero)),
                     "no finite, positive time")


@pytest.mark.parametrize("argv, expected", [
    (["predict", "--link", "2-3:nanBps"], "the bandwidth (Bps) must be a finite number"),
    (["optimize", "--link", "1-2:nanBps"], "the bandwidth (Bps) must be a finite number"),
    (["predict", "--link", "2-3:1e-320Bps"], "[1, 1e+18]"),
    (["predict", "--link", "2-3:nans"], "the latency (s)"),
    (["predict", "--link", "2-3:1e9Bps,infs"], "the latency (s)"),
    (["predict", "--rank-speed", "3:1e-320"], "the factor must be a finite number in [1e-06, 1e+06]"),
    (["predict", "--rank-speed", "3:nan"], "the factor"),
    (["predict", "--rank-speed", "99999999999999999999:0.5"], "ranks 0-1023"),
    (["predict", "--ranks-per-node", "-1"], "argument --ranks-per-node: must be in 1..1024"),
    (["predict", "--ranks-per-node", "0"], "argument --ranks-per-node"),
    (["sweep", "--jobs", "0"], "argument --jobs: must be in 1..256"),
    (["sweep", "--jobs", "-1"], "argument --jobs"),
    (["optimize", "--max-simulations", "-5"], "argument --max-simulations: must be in 1..100000"),
    (["run", "--stages", "0"], "argument --stages: must be in 1..1024"),
    (["calibrate", "--ranks", "0"], "argument --ranks: must be in 2..1024"),
    (["calibrate", "--ranks", "1"], "argument --ranks"),
    (["validate", "--tolerance", "nan"], "argument --tolerance"),
    (["predict", "--layers", "x"], "argument --layers: expected an integer, got 'x'"),
    (["predict", "--memory"], "unrecognized arguments" if sys.version_info < (3, 12) else "--memory"),
    (["optimize", "--memory-cap", "0.1"], "bad memory size '0.1'"),
    (["predict", "--partition", "8,-8,16,16"], "'-8' is negative"),
    (["predict", "--stages", "2,4", "--partition", "8,8,8,8"], "explicit --partition"),
    (["predict", "--stages", "1500"], "must be in 1..1024"),
    (["optimize", "--stages", "2000"], "must be in 1..1024"),
    (["predict", "--microbatches", "3"], "--batch-size 512 must be a positive multiple of --microbatches 3"),
    (["sweep", "--microbatches", "3", "--quiet"], "every point of the sweep was skipped"),
])
def test_bad_arguments_are_one_line(capsys, argv, expected):
    assert_one_error(*run_main(capsys, *argv), expected)


def test_usage_errors_name_the_command(capsys):
    assert_one_error(*run_main(capsys, "predict", "--schedule", "zb"), "see 'pipesim predict --help'")
    assert_one_error(*run_main(capsys), "required")


@pytest.mark.parametrize("content, expected", [
    (b"\x00\x01\x02\xff", "is not UTF-8 text"),
    ('name = "x\xff"\n'.encode("latin-1"), "is not UTF-8 text"),
    (b'name = 5\n[fc]\nnum_layers = 4\nwidth = 8\n', "'name' must be a non-empty string, got 5"),
    (b'name = "x"\n[fc]\nnum_layers = 100000000\nwidth = 8\n', "'num_layers' must be an integer in 1..100000"),
    (b'name = "x"\n[[layers]]\nkind = "fc"\nin_features = 8\nout_features = 8\nrepeat = 100000000\n',
     "'repeat' must be an integer in 1..100000"),
    ((b'name = "x"\n[[layers]]\nkind = "fc"\nin_features = 8\nout_features = 8\nrepeat = 60000\n'
     b'[[layers]]\nkind = "fc"\nin_features = 8\nout_features = 8\nrepeat = 60000\n'), "beyond the limit of 100,000"),
])
def test_bad_model_files_are_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "m.toml"
    path.write_bytes(content)
    assert_one_error(*run_main(capsys, "predict", "--model", str(path)), expected)


@pytest.mark.parametrize("option", ["--model", "--profile"])
def test_a_folder_or_a_missing_file_is_one_line(tmp_path, capsys, option):
    assert_one_error(*run_main(capsys, "predict", option, str(tmp_path)), "is a directory, not a file")
    assert_one_error(*run_main(capsys, "predict", option, str(tmp_path / "nope")), "file not found")
    binary = tmp_path / "b"
    binary.write_bytes(b"\xff\xfe\x00")
    assert_one_error(*run_main(capsys, "predict", option, str(binary)), "not UTF-8 text")


@pytest.mark.parametrize("text, expected", [
    ('[[groups]]\nlayers = ["a"]\n', "layers must hold integers"),
    ('[[groups]]\nlayers = [4]\nwidths = [8]\nbatch_sizes = [8]\nstages = [0]\n', "stages must hold integers"),
    (('iterations = "many"\n[[groups]]\nlayers = [4]\nwidths = [8]\nbatch_sizes = [8]\nstages = [2]\n'
     'microbatches = [2]\npartitions = ["balanced"]\nschedules = ["gpipe"]\n'), "iterations must be an integer"),
    ('groups = 3\n', "groups must be tables"),
    (('[[groups]]\nlayers = [4]\nwidths = [8]\nbatch_sizes = [8]\nstages = [2]\nmicrobatches = [2]\n'
     'partitions = [3]\nschedules = ["gpipe"]\n'), "partitions must hold strings"),
    (('[[groups]]\nlayers = [4]\nwidths = [8]\nbatch_sizes = [8]\nstages = [2]\nmicrobatches = [2]\n'
     'partitions = ["balanced"]\nschedules = ["zb"]\n'), "schedules must hold gpipe, 1f1b"),
])
def test_bad_grids_are_grid_errors(tmp_path, text, expected):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(GridError, match=expected):
        load_grid(path)


def test_validate_plans_every_case_before_launching(tmp_path, capsys):
    path = tmp_path / "g.toml"
    path.write_text('[[groups]]\nlayers = [4]\nwidths = [8]\nbatch_sizes = [8]\nstages = [2]\n'
                    'microbatches = [2]\npartitions = ["9,9"]\nschedules = ["gpipe"]\n')
    assert_one_error(*run_main(capsys, "validate", "--grid", str(path)), "counts sum to 18")


# --- output files -----------------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["predict", "--trace", "/nonexistent/x.json"], "folder /nonexistent does not exist"),
    (["predict", "--gantt", "out.txt"], "a figure is written as .png, .svg, .pdf"),
    (["run", "--gantt", "out.txt"], "a figure is written as"),
    (["run", "--trace", "/nonexistent/x.json"], "folder /nonexistent does not exist"),
    (["calibrate", "--out", "/dev/null/x.json"], "is a file"),
])
def test_bad_output_paths_are_found_before_any_work(capsys, argv, expected):
    assert_one_error(*run_main(capsys, *argv), expected)


def test_output_folders_that_are_files(tmp_path, capsys):
    a_file = tmp_path / "f"
    a_file.write_text("")
    for argv in (["sweep", "--stages", "1", "--microbatches", "1", "--quiet", "--plots", str(a_file)],
                 ["optimize", "--plots", str(a_file / "sub")],
                 ["report", "--out", str(a_file)]):
        assert_one_error(*run_main(capsys, *argv), "is a file, not a folder")
    assert_one_error(*run_main(capsys, "predict", "--trace", str(tmp_path)), "is a folder; name a file")


def test_gantt_without_a_suffix_writes_png_and_says_so(tmp_path, capsys):
    code, _, err = run_main(capsys, "predict", *SMALL, "--stages", "2", "--gantt", str(tmp_path / "out"))
    assert code == 0
    assert f"wrote {tmp_path / 'out.png'}" in err
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "out").exists()


# --- options with no effect ---------------------------------------------------------


@pytest.mark.parametrize("argv, expected", [
    (["predict", "--link", "0-3:1e9Bps"], "--link 0-3: ranks 0 and 3 never exchange a message"),
    (["predict", "--ranks-per-node", "100"], "--ranks-per-node 100 puts all 4 ranks on one node"),
    (["predict", "--model", str(REPO / "models/fc32.toml"), "--layers", "8"], "--layers is ignored"),
])
def test_options_without_effect_warn_once(capsys, argv, expected):
    code, out, err = run_main(capsys, *argv)
    assert code == 0 and out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pipesim: warning: ") and expected in lines[0]


def test_neighbour_links_and_spread_nodes_do_not_warn(capsys):
    code, _, err = run_main(capsys, "predict", "--link", "2-3:1e9Bps", "--ranks-per-node", "2")
    assert code == 0 and err == ""


# --- exit codes -----------------------------------------------------------------


def test_ctrl_c_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(workflows, "predict", interrupted)
    code, out, err = run_main(capsys, "predict")
    assert code == 130 and out == "" and err == "pipesim: interrupted\n"


def pipesim(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "pipesim", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, check=False, **kwargs)


@pytest.mark.parametrize("args", [
    ["predict", "--trace", "/nonexistent/x.json"],
    ["predict", "--gantt", "/proc/x.png"],  # /proc exists but takes no new files, even for root
    ["report", "--out", "/proc/x"],
    ["predict", "--stages", "0"],
])
def test_unwritable_outputs_and_bad_input_exit_2_in_a_real_process(args):
    done = pipesim(*args, *SMALL)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("pipesim: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert done.stdout == ""


def test_help_and_success_exit_0():
    assert pipesim("predict", "--help").returncode == 0
    assert pipesim("predict", *SMALL, "--stages", "2").returncode == 0


def _as_in_a_terminal() -> None:
    """SIGINT as a terminal leaves it: a shell's background job (CI runners, `cmd &`) starts
    with SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_a_long_prediction_exits_130_in_one_line():
    # About 2 million actions, a slow link making the event simulation run: some seconds of
    # work, interrupted after the start-up.
    process = subprocess.Popen([sys.executable, "-m", "pipesim", "predict", "--layers", "256", "--width", "256",
                                "--stages", "256", "--microbatches", "4096", "--batch-size", "4096",
                                "--link", "0-1:1e4Bps"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_as_in_a_terminal)
    time.sleep(3)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    *before, last = err.splitlines()  # warnings printed before the interrupt may precede it
    assert last == "pipesim: interrupted" and out == ""
    assert all(line.startswith("pipesim: warning: ") for line in before), err


def test_sigint_leaves_no_rank_running(tmp_path):
    pytest.importorskip("torch", reason="the runner extra is not installed")
    pytest.importorskip("mpi4py", reason="the runner extra is not installed")
    # Like Ctrl-C in a terminal: SIGINT to the whole process group (pipesim, mpiexec, ranks).
    process = subprocess.Popen([sys.executable, "-m", "pipesim", "run", "--stages", "2", "--layers", "4",
                                "--width", "64", "--batch-size", "8", "--microbatches", "2",
                                "--iterations", "100000", "--warmup", "0"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=_as_in_a_terminal)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _ranks_of(process.pid):
        time.sleep(0.2)
    assert _ranks_of(process.pid), "the ranks never started"
    time.sleep(1)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert err.rstrip().endswith("pipesim: interrupted")
    time.sleep(1)
    assert not _ranks_of(process.pid)


def _ranks_of(session: int) -> list[str]:
    """Worker processes in the session of the pipesim process we started."""
    found = subprocess.run(["pgrep", "-s", str(session), "-f", "pipesim.runner.worker"],
                           capture_output=True, text=True, check=False)
    return found.stdout.split()
