"""pipesim's builders against torch 2.13's own schedule classes.

torch builds its ``pipeline_order`` in the constructor, with no process group,
when given stand-in stage objects; we compare after dropping its ``None``
bubbles and flattening DualPipeV's OVERLAP_F_B pairs into their F and B.
Every (p, chunks, m) torch accepts must give the same per-rank compute order,
and every one it refuses pipesim must refuse too.
"""

from __future__ import annotations

import itertools
import logging
import types

import pytest

pytest.importorskip("torch")

from torch.distributed.pipelining import schedules as ts
from torch.distributed.pipelining.schedules import generate_rank_to_stage_mapping

from pipesim.schedule import ScheduleError, build_schedule

CASES = {  # pipesim name: (torch class, placement, chunk counts)
    "interleaved-1f1b": (ts.ScheduleInterleaved1F1B, "loop", (2, 3, 4)),
    "zb-h1": (ts.ScheduleInterleavedZeroBubble, "loop", (1, 2, 3)),
    "zb-v": (ts.ScheduleZBVZeroBubble, "v", (2,)),
    "dualpipev": (ts.ScheduleDualPipeV, "v", (2,)),
}


def stand_in_stages(p: int, v: int, style: str) -> list:
    """What the schedule constructors read of rank 0's stages."""
    pieces = generate_rank_to_stage_mapping(p, p * v, style=style)[0]
    return [types.SimpleNamespace(num_stages=p * v, group_size=p, group_rank=0, stage_index=i, submod=None)
            for i in pieces]


def torch_order(cls, p: int, v: int, m: int, style: str) -> list[list[str]] | None:
    logging.disable(logging.WARNING)
    try:
        schedule = cls(stand_in_stages(p, v, style), m)
    except ValueError:
        return None
    finally:
        logging.disable(logging.NOTSET)
    flat = [[str(sub) for a in actions if a is not None for sub in (a.sub_actions or (a,))]
            for _, actions in sorted(schedule.pipeline_order.items())]
    return flat


def pipesim_order(name: str, p: int, v: int, m: int) -> list[list[str]] | None:
    try:
        return [[str(a) for a in actions] for actions in build_schedule(name, p, m, v).ranks]
    except ScheduleError:
        return None


@pytest.mark.parametrize("name", CASES)
def test_same_per_rank_compute_order_as_torch(name):
    cls, style, chunk_counts = CASES[name]
    accepted = 0
    for p, v, m in itertools.product(range(1, 7), chunk_counts, range(1, 17)):
        theirs, ours = torch_order(cls, p, v, m, style), pipesim_order(name, p, v, m)
        assert ours == theirs, f"{name} p={p} chunks={v} m={m}"
        accepted += theirs is not None
    assert accepted >= 50  # the comparison covered real schedules, not only refusals
