"""optimize --ranks N: every P x D = N, every m dividing B/D, schedules, chunks and partition."""

from __future__ import annotations

import json
from dataclasses import replace

from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.model import fc
from pipesim.profile import Link, constant_profile
from pipesim.shapes import search_shapes, shapes_for


def test_every_shape_of_n_ranks_and_every_dividing_microbatch_count():
    shapes, notes = shapes_for(8, 16, 8, ("gpipe",), (None,))
    got = {(s.num_stages, s.data_parallel, s.num_microbatches) for s in shapes}
    want = {(p, 8 // p, m) for p in (1, 2, 4, 8) for m in range(1, 17) if (16 // (8 // p)) % m == 0}
    assert got == want
    shapes, notes = shapes_for(8, 16, 3, ("gpipe",), (None,))  # 3 layers: P = 4, 8 cannot exist
    assert {s.num_stages for s in shapes} == {1, 2} and len(notes) == 2


def costs(allreduce: Link) -> ProfileCostModel:
    profile = replace(constant_profile(1e-3, 2e-3, optimizer_s_per_param=1e-9),
                      collectives={"intra_node": allreduce})
    return ProfileCostModel(profile)


def test_the_best_shape_is_the_fastest_of_all_shapes_tried():
    search = search_shapes(fc(8, 32), costs(Link(1e-4, 1e9)), "c", 4, 32, ("gpipe", "1f1b"), (None,), None)
    times = [r.time_s for r in search.results if r.prediction is not None]
    assert search.best.time_s == min(times)
    assert search.best.shape.num_stages * search.best.shape.data_parallel == 4


def test_a_free_all_reduce_favours_replicas_and_a_slow_one_a_pipeline():
    model = fc(8, 32)
    free = search_shapes(model, costs(Link(0.0, float("inf"))), "c", 4, 32, ("1f1b",), (None,), None)
    assert (free.best.shape.num_stages, free.best.shape.data_parallel) == (1, 4)  # no bubble at all
    slow = search_shapes(model, costs(Link(1.0, 1e3)), "c", 4, 32, ("1f1b",), (None,), None)
    assert slow.best.shape.data_parallel == 1 and slow.best.prediction.exposed_allreduce_s == 0


def test_a_memory_cap_rules_out_shapes_that_do_not_fit():
    model = fc(8, 256)
    cap = costs(Link(0.0, 1.0)).static_bytes(sum(layer.params for layer in model.layers)) - 1  # one rank cannot hold the whole model
    capped = search_shapes(model, costs(Link(0.0, float("inf"))), "c", 4, 32, ("1f1b",), (None,), cap)
    assert capped.best.fits and capped.best.prediction.metrics.peak_memory_bytes <= cap
    assert capped.best.shape.num_stages > 1


def test_optimize_ranks_on_the_command_line(capsys):
    code = main(["optimize", "--ranks", "4", "--layers", "8", "--width", "64", "--batch-size", "32", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    data = json.loads(out)
    assert data["num_stages"] * data["data_parallel"] == 4 == data["ranks_searched"]
    assert [r["num_stages"] for r in data["best_per_stage_count"]] == [1, 2, 4]
    assert data["iteration_time_s"] == min(r["iteration_time_s"] for r in data["best_per_stage_count"])
    assert data["spec"]["execution"]["data_parallel"] == data["data_parallel"]
    code = main(["optimize", "--ranks", "4", "--layers", "8", "--width", "64", "--batch-size", "32"])
    text = capsys.readouterr().out
    assert code == 0 and "best: P=" in text and "why:" in text
