"""Schedules in and out: pipesim's text form and torch's compute-only CSV.

torch's ``PipelineScheduleMulti._load_csv`` reads one row per rank, one action
per cell (``0F0``, ``2I3``, ``1W0``, ``0B1``; an empty cell is a bubble), so a
schedule pipesim writes runs in torch unchanged. Reading torch's CSV back,
``(0F3;3B1)OVERLAP_F_B`` is flattened into its sub-actions (F then B),
``UNSHARD``/``RESHARD`` are ignored (no FSDP here), ``REDUCE_GRAD`` is ignored
until data parallelism exists, and SEND/RECV cells are dropped (pipesim lowers
the schedule itself); each with a note.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import assert_never

from .schedule import Action, Kind, Schedule, ScheduleError, from_rows, is_compute

FORMATS = ("text", "torch-csv")
_IGNORED = {
    "UNSHARD": "UNSHARD/RESHARD actions are ignored (pipesim models no FSDP sharding)",
    "RESHARD": "UNSHARD/RESHARD actions are ignored (pipesim models no FSDP sharding)",
    "REDUCE_GRAD": "REDUCE_GRAD actions are ignored until pipesim models data parallelism",
    "SEND_F": "SEND/RECV actions are dropped: pipesim adds its own messages when it lowers the schedule",
    "SEND_B": "SEND/RECV actions are dropped: pipesim adds its own messages when it lowers the schedule",
    "RECV_F": "SEND/RECV actions are dropped: pipesim adds its own messages when it lowers the schedule",
    "RECV_B": "SEND/RECV actions are dropped: pipesim adds its own messages when it lowers the schedule",
}
_TORCH_CELL = re.compile(r"^(\d+)(UNSHARD|RESHARD|REDUCE_GRAD|SEND_F|SEND_B|RECV_F|RECV_B)(\d*)$")
_OVERLAP = re.compile(r"^\((.*)\)OVERLAP_F_B$")


def torch_token(action: Action) -> str:
    """An action as torch's ``_Action.__repr__`` writes it."""
    match action.kind:
        case Kind.F | Kind.B | Kind.I | Kind.W:
            return f"{action.piece}{action.kind}{action.microbatch}"
        case Kind.SEND | Kind.RECV:
            return f"{action.piece}{action.kind}_{action.direction}{action.microbatch}"
        case Kind.ALLREDUCE:
            return f"{action.piece}REDUCE_GRAD"
        case _:
            assert_never(action.kind)


def to_torch_csv(schedule: Schedule) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for actions in schedule.ranks:
        writer.writerow([torch_token(a) for a in actions])
    return out.getvalue()


def _cell(text: str, notes: set[str]) -> list[Action]:
    text = text.strip()
    if not text:
        return []  # a bubble
    if match := _OVERLAP.match(text):
        notes.add("OVERLAP_F_B pairs are flattened into their sub-actions (F then B, no overlap on a CPU)")
        return [a for part in match[1].split(";") for a in _cell(part, notes)]
    if match := _TORCH_CELL.match(text):
        notes.add(_IGNORED[match[2]])
        return []
    action = Action.parse(text)
    if not is_compute(action.kind):
        notes.add(_IGNORED[f"{action.kind}_{action.direction}"])
        return []
    return [action]


def from_torch_csv(text: str, name: str = "torch-csv") -> tuple[Schedule, list[str]]:
    """A schedule from torch's compute-only CSV, and the notes on what was flattened or ignored."""
    notes: set[str] = set()
    rows = [tuple(a for cell in row for a in _cell(cell, notes)) for row in csv.reader(io.StringIO(text))]
    while rows and not rows[-1]:
        rows.pop()
    return from_rows(rows, name), sorted(notes)


def read_schedule_file(path: str | Path) -> tuple[Schedule, list[str]]:
    """pipesim's text form (lines ``rank R: ...``) or torch's CSV, told apart by content."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ScheduleError(f"cannot read --schedule-file {path}: {exc.strerror}") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if lines and all(line.lstrip().startswith("rank ") and ":" in line for line in lines):
        return Schedule.from_text(text, name=Path(path).stem), []
    return from_torch_csv(text, name=Path(path).stem)


def render(schedule: Schedule, fmt: str) -> str:
    if fmt == "text":
        return schedule.to_text() + "\n"
    if fmt == "torch-csv":
        return to_torch_csv(schedule)
    raise ScheduleError(f"unknown --format {fmt!r} (allowed: {', '.join(FORMATS)})")
