"""The runner's memory probe (pipesim/runner/memory_probe.py) and its agreement with the ledger."""

from __future__ import annotations

import sys

import pytest

from pipesim.runner.memory_probe import MMAP_THRESHOLD_BYTES, running_peak_bytes, status_bytes

STATUS = "Name:\tpython\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nThreads:\t4\n"


def test_status_fields_are_read_in_bytes():
    assert status_bytes("VmRSS", STATUS) == 1024 * 1024
    assert status_bytes("VmHWM", STATUS) == 2048 * 1024
    assert status_bytes("VmSwap", STATUS) is None


def test_the_running_peak_follows_time_order_not_list_order():
    changes = [(3, -100), (1, 100), (2, 50), (4, 10)]
    assert running_peak_bytes(changes) == 150
    assert running_peak_bytes([]) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
def test_the_step_ledger_matches_what_torch_allocates_and_what_becomes_resident():
    pytest.importorskip("torch", reason="the runner extra is not installed")
    from pipesim.engine import stage_shapes
    from pipesim.ledger import step_peak_bytes
    from pipesim.model import fc
    from pipesim.plan import make_plan
    from pipesim.runner.results import measure_memory

    plan = make_plan(fc(16, 512), 2, 6, 384, "1f1b", "balanced")
    measured = measure_memory(plan, lambda _: None, warmup=2, profile_memory=True)
    predicted = step_peak_bytes(plan.schedule, stage_shapes(plan.model, plan.partition), plan.microbatch_size,
                                plan.batch_size)
    for rank, m in enumerate(measured):
        assert m is not None and m.mmap_threshold_bytes == MMAP_THRESHOLD_BYTES
        # torch's own allocation events: the ledger counts every tensor of the step
        assert m.profiler_peak_bytes == pytest.approx(predicted[rank], rel=0.02)
        # the resident set adds page rounding, small heap blocks and MPI's buffers; receive
        # buffers become resident only when their message lands
        assert m.rss_increase_bytes == pytest.approx(predicted[rank], rel=0.15)
