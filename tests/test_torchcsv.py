"""Schedules in torch's CSV: pipesim writes what torch's _load_csv reads, and reads back
what torch's _dump_csv writes; `pipesim schedule` and --schedule-file on the command line."""

from __future__ import annotations

import json
import logging

import pytest

from pipesim.cli import main
from pipesim.schedule import SCHEDULES, Schedule, ScheduleError, build_schedule
from pipesim.torchcsv import from_torch_csv, read_schedule_file, to_torch_csv

SHAPES = [(1, 2), (2, 4), (3, 6), (4, 8), (2, 7)]


def built(name: str, p: int, m: int) -> Schedule | None:
    try:
        return build_schedule(name, p, m)
    except ScheduleError:
        return None


@pytest.mark.parametrize("name", SCHEDULES)
def test_torch_csv_round_trip_in_pipesim(name):
    for p, m in SHAPES:
        schedule = built(name, p, m)
        if schedule is not None:
            again, notes = from_torch_csv(to_torch_csv(schedule), name=name)
            assert notes == [] and again.ranks == schedule.ranks
            shape = (again.num_stages, again.num_chunks, again.num_microbatches)
            assert shape == (schedule.num_stages, schedule.num_chunks, schedule.num_microbatches)
            if p > 1:  # with one rank, 'loop' and 'v' place the pieces alike
                assert again.placement == schedule.placement


def test_torch_cells_are_flattened_or_ignored_with_notes():
    text = "0F0,,1UNSHARD,(0F1;0B0)OVERLAP_F_B,0REDUCE_GRAD,0B1\n1F0,1B0,1SEND_B0,1F1,1B1\n"
    schedule, notes = from_torch_csv(text)
    assert [str(a) for a in schedule.ranks[0]] == ["0F0", "0F1", "0B0", "0B1"]
    assert [str(a) for a in schedule.ranks[1]] == ["1F0", "1B0", "1F1", "1B1"]
    assert len(notes) == 4 and any("OVERLAP_F_B" in n for n in notes) and any("REDUCE_GRAD" in n for n in notes)


# --- against the installed torch --------------------------------------------------

torch = pytest.importorskip("torch")
from test_torch_schedules import stand_in_stages
from torch.distributed.pipelining import schedules as ts


def torch_loads(path, p: int, v: int, m: int, placement: str) -> list[list[str]]:
    """Load a CSV into a torch runtime schedule (it validates and lowers it) and return its order."""
    cls = ts.ScheduleZBVZeroBubble if placement == "v" else ts.ScheduleLoopedBFS  # any m
    logging.disable(logging.WARNING)
    try:
        schedule = cls(stand_in_stages(p, v, placement), m)
        schedule._load_csv(str(path))
    finally:
        logging.disable(logging.NOTSET)
    return [[str(a) for a in actions if a is not None] for _, actions in sorted(schedule.pipeline_order.items())]


@pytest.mark.parametrize("name", SCHEDULES)
def test_torch_loads_pipesims_csv_unchanged(tmp_path, name):
    for p, m in SHAPES:
        schedule = built(name, p, m)
        if schedule is None:
            continue
        path = tmp_path / f"{name}-{p}-{m}.csv"
        path.write_text(to_torch_csv(schedule))
        assert torch_loads(path, p, schedule.num_chunks, m, schedule.placement) == [
            [str(a) for a in actions] for actions in schedule.ranks]


@pytest.mark.parametrize("cls, name", [(ts.ScheduleZBVZeroBubble, "zb-v"), (ts.ScheduleDualPipeV, "dualpipev"),
                                       (ts.ScheduleInterleaved1F1B, "interleaved-1f1b")])
def test_pipesim_reads_torchs_dumped_csv(tmp_path, cls, name):
    p, m = 3, 6
    logging.disable(logging.WARNING)
    try:
        theirs = cls(stand_in_stages(p, 2, "loop" if name == "interleaved-1f1b" else "v"), m)
    finally:
        logging.disable(logging.NOTSET)
    path = tmp_path / "torch.csv"
    theirs._dump_csv(str(path))  # the runtime classes dump the lowered (compute + comms) order
    schedule, _ = read_schedule_file(path)
    ours = build_schedule(name, p, m)
    assert schedule.ranks == ours.ranks and schedule.placement == ours.placement


# --- the command line ---------------------------------------------------------------


def test_schedule_command_prints_and_writes(capsys, tmp_path):
    assert main(["schedule", "--schedule", "zb-v", "--stages", "4", "--chunks", "2", "--microbatches", "8"]) == 0
    out = capsys.readouterr().out
    assert Schedule.from_text(out) == build_schedule("zb-v", 4, 8)
    path = tmp_path / "zbv.csv"
    assert main(["schedule", "--schedule", "zb-v", "--stages", "4", "--microbatches", "8",
                 "--format", "torch-csv", "--out", str(path)]) == 0
    assert from_torch_csv(path.read_text())[0].ranks == build_schedule("zb-v", 4, 8).ranks


@pytest.mark.parametrize("argv, expected", [
    (["--schedule", "zb-v", "--chunks", "3"], "exactly --chunks 2"),
    (["--schedule", "dualpipev", "--stages", "4", "--microbatches", "6"], ">= 2 x --stages = 8"),
    (["--schedule", "interleaved-1f1b", "--stages", "4", "--microbatches", "9"], "multiple of max"),
])
def test_schedule_command_refuses_in_one_line(capsys, argv, expected):
    assert main(["schedule", *argv]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_predict_reads_a_schedule_file_in_either_form(capsys, tmp_path):
    base = ["--layers", "8", "--width", "32", "--batch-size", "16", "--microbatches", "4", "--json",
            "--profile", "default"]
    main(["predict", *base, "--stages", "2", "--schedule", "1f1b"])
    want = json.loads(capsys.readouterr().out)["iteration_time_s"]
    for fmt in ("text", "torch-csv"):
        path = tmp_path / f"s.{fmt}"
        main(["schedule", "--schedule", "1f1b", "--stages", "2", "--microbatches", "4", "--format", fmt,
              "--out", str(path)])
        capsys.readouterr()
        assert main(["predict", *base, "--schedule-file", str(path)]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["iteration_time_s"] == want and got["num_stages"] == 2


def test_a_schedule_file_that_disagrees_is_one_line(capsys, tmp_path):
    path = tmp_path / "s.txt"
    path.write_text(build_schedule("1f1b", 2, 4).to_text())
    code = main(["predict", "--layers", "8", "--schedule-file", str(path), "--microbatches", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "has 4 for --microbatches, but --microbatches is 8" in err and err.count("\n") == 1
