"""The runner's memory probe (pipesim/runner/memory_probe.py) and its agreement with the ledger."""

from __future__ import annotations

import sys
from pathlib import Path

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


MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and clear_refs are Linux's")
@pytest.mark.parametrize(("model", "batch", "microbatches", "schedule", "partition", "recompute"), [
    ("fc16x512", 384, 6, "1f1b", "balanced", "none"),
    # its 4 MiB layers sit low on rank 0: their weight gradients set the backward's peak
    ("uneven.toml", 512, 8, "1f1b", "balanced", "none"),
    # 3x3 convolutions' backward holds two weight-sized buffers; the last rank's peak is one
    ("vgg16-mini.toml", 32, 4, "gpipe", "14,8", "none"),
    # a transformer block's backward: the softmax's attention-sized temporaries; the loss's
    # backward (two logits-sized gradients) before the layers', and before a recomputed piece runs again
    ("gpt2-mini.toml", 8, 4, "1f1b", "3,3", "none"),
    ("gpt2-mini.toml", 8, 4, "1f1b", "3,3", "all"),
    # split backward: W holds two neighbouring layers' weight gradients
    ("fc8x512", 64, 2, "zb-h1", "balanced", "none"),
])
def test_the_step_ledger_matches_what_torch_allocates_and_what_becomes_resident(model, batch, microbatches, schedule,
                                                                                  partition, recompute):
    pytest.importorskip("torch", reason="the runner extra is not installed")
    from pipesim.engine import stage_shapes
    from pipesim.ledger import step_peak_bytes
    from pipesim.model import fc, load_model
    from pipesim.plan import make_plan
    from pipesim.runner.results import measure_memory

    if model.startswith("fc"):
        layers, width = map(int, model[2:].split("x"))
        spec = fc(layers, width)
    else:
        spec = load_model(MODELS / model)
    plan = make_plan(spec, 2, microbatches, batch, schedule, partition, recompute=recompute)
    measured = measure_memory(plan, lambda _: None, warmup=2, profile_memory=True)
    predicted = step_peak_bytes(plan.schedule, stage_shapes(plan.model, plan.partition, plan.recompute),
                                plan.microbatch_size,
                                plan.batch_size)
    for rank, m in enumerate(measured):
        assert m is not None and m.mmap_threshold_bytes == MMAP_THRESHOLD_BYTES
        # torch's own allocation events: the ledger counts every tensor of the step
        assert m.profiler_peak_bytes == pytest.approx(predicted[rank], rel=0.02)
        # the resident set adds page rounding, small heap blocks and MPI's buffers; receive
        # buffers become resident only when their message lands
        assert m.rss_increase_bytes == pytest.approx(predicted[rank], rel=0.15)
