"""Where a case's costs come from (pipesim/heldout.py): measured cells, interpolated, extrapolated."""

from __future__ import annotations

import dataclasses

import pytest

from pipesim.heldout import (
    EXTRAPOLATED,
    FITTED,
    INTERPOLATED,
    MEASURED,
    case_sources,
    held_out_paragraph,
    on_axis,
    worst,
)
from pipesim.model import fc
from pipesim.plan import make_plan
from pipesim.profile import Profile, Table, constant_profile

MiB = 2**20


def tabled_profile(stack_bytes=16 * MiB) -> Profile:
    """Tables measured at widths 256 and 512, micro-batch sizes 8 and 32; optimizer at two sizes."""
    table = Table((256, 512), (8, 32), ((1e-4, 4e-4), (4e-4, 1.6e-3)))
    return Profile("tabled", {"fc": (table, table)}, optimizer_table=((1000, 10_000_000), (1e-4, 1e-2)),
                   extra={"metadata": {"settings": {"stack_bytes": stack_bytes}}})


def sources(layers, width, batch, stages, m, partition="balanced", profile=None):
    plan = make_plan(fc(layers, width), stages, m, batch, "1f1b", partition)
    return case_sources(plan, profile or tabled_profile())


@pytest.mark.parametrize(("value", "measured", "tolerance", "status"), [
    (256, (256, 512), 0.0, MEASURED), (300, (256, 512), 0.0, INTERPOLATED),
    (1024, (256, 512), 0.0, EXTRAPOLATED), (100, (256, 512), 0.0, EXTRAPOLATED),
    (17 * MiB, (16 * MiB,), 0.10, MEASURED), (18 * MiB, (16 * MiB,), 0.10, EXTRAPOLATED),
])
def test_a_value_is_on_between_or_beyond_the_measured_ones(value, measured, tolerance, status):
    assert on_axis(value, measured, tolerance) == status


def test_worst_orders_the_statuses():
    assert worst([MEASURED, INTERPOLATED, FITTED]) == INTERPOLATED
    assert worst([MEASURED, EXTRAPOLATED, INTERPOLATED]) == EXTRAPOLATED
    assert worst([]) == MEASURED


def test_each_piece_is_placed_against_the_tables():
    # 32 layers of 512 cut in two: 16 x 512^2 floats = 16 MiB a piece, micro-batches of 32
    on_cells = sources(32, 512, 256, 2, 8)
    assert on_cells.status == MEASURED and on_cells.working_set_status == MEASURED
    assert [p.working_set_bytes for p in on_cells.pieces] == [16 * (512 * 512 + 512) * 4] * 2
    between = sources(32, 384, 240, 2, 10)  # width 384, micro-batches of 24
    assert between.status == INTERPOLATED
    assert {(p.width_status, p.microbatch_status) for p in between.pieces} == {(INTERPOLATED, INTERPOLATED)}
    beyond = sources(8, 1024, 64, 2, 1)  # width 1024 and micro-batches of 64 beyond the tables
    assert beyond.status == EXTRAPOLATED
    skewed = sources(32, 512, 256, 2, 8, "8,24")  # 8 and 24 MiB: off the 16 MiB stacks, cells still measured
    assert skewed.status == MEASURED and skewed.working_set_status == EXTRAPOLATED


def test_fitted_laws_are_placed_against_the_profile_ranges():
    profile = dataclasses.replace(constant_profile(1e-6, 2e-6), ranges={"fc": {"width": [256, 1024],
                                                                             "microbatch_size": [4, 64]}})
    assert sources(8, 512, 64, 2, 2, profile=profile).status == FITTED
    assert sources(8, 2048, 64, 2, 2, profile=profile).status == EXTRAPOLATED


def test_the_optimizer_step_is_placed_against_its_measured_sizes():
    assert sources(2, 16, 64, 1, 1).optimizer_status == EXTRAPOLATED  # 544 parameters < 1000
    assert sources(8, 512, 64, 2, 2).optimizer_status == INTERPOLATED


def test_the_paragraph_counts_what_the_cases_used():
    cases = [sources(32, 512, 256, 2, 8), sources(32, 384, 240, 2, 10), sources(8, 1024, 64, 2, 1)]
    text = held_out_paragraph(cases, tabled_profile())
    assert "1 measured, 1 interpolated, 1 extrapolated (of 3 cases" in text
    assert "Of 6 pieces, 4 are off the measured widths and 4 off the measured micro-batch sizes" in text
    assert "(16 MiB)" in text and "no case below is that probe" in text
    probe = make_plan(fc(8, 256), 2, 8, 32, "1f1b", "4,4")
    assert "1 case(s) below are that probe" in held_out_paragraph([case_sources(probe, tabled_profile())],
                                                                   tabled_profile())


@pytest.mark.parametrize(("batch", "m", "mbs_status"), [(16, 2, MEASURED), (24, 2, INTERPOLATED), (256, 2, EXTRAPOLATED)])
def test_pieces_of_kinds_timed_by_shape_say_where_their_costs_came_from(batch, m, mbs_status):
    """vgg16-mini against the shipped profile, which timed its layers by shape at micro-batch
    sizes 1..64: its conv pieces are measured shapes; its classifier's fc layers, narrower
    than the fc table, are extrapolated; the micro-batch size is on, between or beyond the
    timed sizes. (A piece of such kinds once made case_sources raise a missing-kind error.)"""
    from pipesim.model import load_model
    from pipesim.profile import load_profile

    model, profile = load_model("models/vgg16-mini.toml"), load_profile("default")
    plan = make_plan(model, 2, m, batch, "1f1b", "11,11")
    first, second = case_sources(plan, profile).pieces
    assert (first.width_status, first.microbatch_status) == (MEASURED, mbs_status)
    assert second.width_status == EXTRAPOLATED  # its fc layers are narrower than the fc table
