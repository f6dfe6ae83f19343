"""The step ledger (pipesim/ledger.py) against closed forms for fc pipelines of two stages."""

from __future__ import annotations

import pytest

from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate, stage_shapes
from pipesim.ledger import saved_peak_bytes, step_peak_bytes
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import constant_profile
from pipesim.schedule import build_schedule
from pipesim.timeline import compute_metrics


def closed_form(schedule: str, layers: int, width: int, mbs: int, m: int) -> tuple[int, int]:
    """Two balanced stages of fc layers (Linear+ReLU: each saves its input and its output).
    Per micro-batch: an activation a = 4 w b bytes, what F saves S = a (k + 1) (the input and
    k outputs), of which the input is a buffer counted already. At the step's start rank 0
    holds the input copy (4 w B) and m gradient receive buffers; rank 1 the target copy and m
    activation receive buffers. The peak is at the start of a B: micro-batches in flight
    (m for GPipe; 2 and 1 for 1F1B) x (S - a), plus the B's temporaries: the last layer's
    weight gradient (4 (w^2 + w)) and two activation gradients, less (rank 1) the last
    output, which autograd frees during B as no send holds it."""
    k, a = layers // 2, 4 * width * mbs
    saved, batch_bytes = a * (k + 1), 4 * width * mbs * m
    in_flight = (m, m) if schedule == "gpipe" else (min(2, m), 1)
    weight_grad = 4 * (width * width + width)
    start = batch_bytes + m * a
    return (start + in_flight[0] * (saved - a) + weight_grad + 2 * a,
            start + in_flight[1] * (saved - a) + weight_grad + a)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize(("layers", "width", "mbs", "m"), [(4, 8, 2, 3), (8, 16, 4, 5), (32, 512, 64, 8)])
def test_two_stage_step_ledger_matches_the_closed_form(schedule, layers, width, mbs, m):
    model, part = fc(layers, width), Partition.from_counts([layers // 2] * 2)
    shapes = stage_shapes(model, part)
    assert step_peak_bytes(build_schedule(schedule, 2, m), shapes, mbs, mbs * m) == \
        closed_form(schedule, layers, width, mbs, m)


def test_the_simulated_peak_memory_is_static_plus_the_step_ledger():
    model, part, mbs = fc(8, 16), Partition.from_counts([4, 4]), 4
    schedule = build_schedule("1f1b", 2, 6)
    timeline = simulate(schedule, part, model, ProfileCostModel(constant_profile(1e-3, 2e-3)), mbs)
    step = step_peak_bytes(schedule, stage_shapes(model, part), mbs, mbs * 6)
    saved = saved_peak_bytes(schedule, stage_shapes(model, part), mbs)
    for rank in compute_metrics(timeline).ranks:
        assert rank.peak_memory_bytes == timeline.static_bytes[rank.rank] + step[rank.rank]
        assert rank.peak_activation_bytes == saved[rank.rank]  # the saved-activation ledger, kept apart


def test_one_rank_holds_no_buffers_beyond_its_input_and_target():
    model, part, mbs = fc(4, 8), Partition.from_counts([4]), 16
    shapes = stage_shapes(model, part)
    a = 4 * 8 * mbs
    saved = a * 5  # the input and four outputs
    weight_grad = 4 * (8 * 8 + 8)
    # inputs + targets, the one micro-batch's saved activations less its input (an input copy),
    # the backward's temporaries less the last output that autograd frees
    assert step_peak_bytes(build_schedule("gpipe", 1, 1), shapes, mbs, mbs) == (2 * a + saved - a + weight_grad + a,)


@pytest.mark.parametrize("m", [1, 4])
def test_an_allreduce_holds_a_gradient_sized_scratch_to_the_steps_end(m):
    """Data parallelism, one stage: after the last B only the input and target copies remain,
    and Open MPI's all-reduce then allocates a buffer of the gradient's size."""
    model, batch = fc(6, 256), 64
    schedule = build_schedule("1f1b", 1, m)
    shapes = stage_shapes(model, Partition.from_counts([6]))
    mbs = batch // m
    plain = step_peak_bytes(schedule, shapes, mbs, batch)[0]
    copies = (shapes[0].input_bytes_per_sample + shapes[0].target_bytes_per_sample) * batch
    gradient = sum(layer.params for layer in model.layers) * 4
    assert step_peak_bytes(schedule, shapes, mbs, batch, allreduce=True)[0] == max(plain, copies + gradient)
    assert gradient > plain  # the case the RSS showed: the scratch sets the peak



def test_the_backward_walk_peaks_at_a_large_layer_below_the_top():
    """fc 8->32->32->8, micro-batch 2, per sample 4 bytes a feature. At each layer from the
    top: its weight gradient (4 (in x out + out)) + its input and output gradients, less
    what the layers above saved and its own ReLU result, all freed by then.
    Top: 1056 + 2 (128 + 32 - 32) = 1312; middle: 4224 + 2 (128 + 128 - 32 - 128) = 4416;
    bottom: 1152 + 2 (32 + 128 - 32 - 128 - 128) = 896."""
    from pipesim.ledger import backward_walk_bytes
    from pipesim.model import fc_layer

    layers = (fc_layer(8, 32), fc_layer(32, 32), fc_layer(32, 8))
    assert backward_walk_bytes(layers, 2, output_sent=0) == 4416
    # a send holding the top's output keeps it: nothing of it is freed along the walk
    assert backward_walk_bytes(layers, 2, output_sent=1) == 4416 + 2 * 32


def test_the_weight_pass_holds_two_neighbours_weight_gradients():
    """torch's stage_backward_weight still holds the previous layer's weight gradients while
    it computes the next layer's: the most of two neighbours' 4 (in x out + out) bytes."""
    from pipesim.ledger import weight_pass_bytes
    from pipesim.model import fc_layer

    layers = (fc_layer(8, 32), fc_layer(32, 32), fc_layer(32, 8))  # 1152, 4224, 1056 bytes
    assert weight_pass_bytes(layers, 2) == 1152 + 4224
    assert weight_pass_bytes(layers[2:], 2) == 1056
