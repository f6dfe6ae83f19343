"""Bounds and `optimize` for every schedule: the lower bound holds for every partition,
the memory formula is the engine's, and "proven optimal" is only said when true."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.bounds import Bounds, PartialPartition, bound_form
from pipesim.costs import ProfileCostModel
from pipesim.model import ModelSpec, fc_layer
from pipesim.optimize import (
    Problem,
    StageCosts,
    lower_bound_s,
    optimize,
    peak_memory_bytes,
    simulate_partition,
)
from pipesim.partition import Partition
from pipesim.profile import Affine, Link, Profile
from pipesim.schedule import SCHEDULES, ScheduleError, build_schedule, from_rows

REL = 1e-9


def all_partitions(num_layers: int, num_pieces: int):
    for cuts in itertools.combinations(range(1, num_layers), num_pieces - 1):
        edges = (0, *cuts, num_layers)
        yield Partition.from_counts([b - a for a, b in itertools.pairwise(edges)])


def profile(latency_s: float, bandwidth_Bps: float, optimizer_s_per_param: float) -> Profile:
    law = lambda k: Affine(1e-5 * k, 1e-7 * k, 0.0, 1e-9 * k)
    return Profile("iw", {"*": (law(1), law(2))}, split_backward={"*": (law(1.2), law(0.8))},
                   optimizer_s_per_param=optimizer_s_per_param,
                   intra_node=Link(latency_s, bandwidth_Bps), inter_node=Link(latency_s, bandwidth_Bps))


@st.composite
def problems(draw):
    name = draw(st.sampled_from(SCHEDULES))
    p = draw(st.integers(1, 3))
    chunks = {"interleaved-1f1b": draw(st.integers(2, 3)), "zb-h1": draw(st.integers(1, 2))}.get(name)
    pieces = p * (chunks or (2 if name in ("zb-v", "dualpipev") else 1))
    num_layers = draw(st.integers(pieces, pieces + 3))
    m = draw(st.integers(2 * p if name == "dualpipev" else 1, 6))
    widths = draw(st.lists(st.sampled_from([2, 8, 32, 96]), min_size=num_layers + 1, max_size=num_layers + 1))
    model = ModelSpec("chain", tuple(fc_layer(a, b) for a, b in itertools.pairwise(widths)))
    costs = ProfileCostModel(profile(draw(st.sampled_from([0.0, 1e-4])), draw(st.sampled_from([math.inf, 1e5])),
                                     draw(st.sampled_from([0.0, 1e-6]))),
                             rank_speed=tuple((r, 0.5) for r in range(p) if draw(st.booleans())))
    try:
        return Problem(model, name, p, m, m * draw(st.integers(1, 3)), costs, num_chunks=chunks)
    except ScheduleError:  # torch's rule on m for the 1F1B family
        m = p * max(1, m // p)
        return Problem(model, name, p, m, m, costs, num_chunks=chunks)


def brute_force(problem: Problem):
    return [(*simulate_partition(problem, problem.schedule, part), part)
            for part in all_partitions(problem.model.num_layers, problem.num_pieces)]


@settings(max_examples=120, deadline=None)
@given(problems())
def test_bounds_hold_for_every_schedule_and_partition(problem):
    table = StageCosts(problem)
    bounds = Bounds(table)
    everything = brute_force(problem)
    assert bounds.partial(PartialPartition()) <= min(t for t, _, _ in everything) * (1 + REL)
    for time_s, memory, part in everything:
        assert lower_bound_s(part, table) <= time_s * (1 + REL)
        assert peak_memory_bytes(part, table) == memory  # the engine's ledger, per rank
        for piece, (first, last) in enumerate(part.bounds):  # a piece alone never exceeds its rank
            assert table.memory_bytes(piece, first, last) <= memory[problem.schedule.rank_of(piece)]


@settings(max_examples=60, deadline=None)
@given(problems())
def test_proven_optimal_only_when_it_is(problem):
    optimum = optimize(problem)
    best = min(t for t, _, _ in brute_force(problem))
    if optimum.proven:
        assert optimum.best.metrics.iteration_time_s == pytest.approx(best, rel=REL)
    assert optimum.best.metrics.iteration_time_s >= best * (1 - REL)


def test_bound_form_is_read_from_the_actions_not_the_name():
    assert bound_form(build_schedule("gpipe", 3, 4)) == "gpipe"
    assert bound_form(build_schedule("1f1b", 3, 4)) == "1f1b"
    for name in ("interleaved-1f1b", "zb-h1", "zb-v", "dualpipev"):
        assert bound_form(build_schedule(name, 2, 4)) == "generic"
    renamed = from_rows([list(r) for r in build_schedule("1f1b", 3, 4).ranks], "my-own", {"placement": "loop"})
    assert bound_form(renamed) == "1f1b"
    other = from_rows([list(r) for r in build_schedule("zb-h1", 3, 3).ranks], "1f1b", {"placement": "loop"})
    assert bound_form(other) == "generic"  # named 1f1b, but not its action order


def test_optimize_searches_over_schedule_and_chunk_lists(capsys, tmp_path):
    import json

    from pipesim.cli import main

    law = {"s_per_param": 1e-9, "s_per_flop": 1e-11}
    path = tmp_path / "iw.json"
    path.write_text(json.dumps({"schema": "pipesim-profile", "version": 2, "name": "iw", "links": {"intra_node": {}},
                                "compute": {"fc": {"forward": law, "backward": law, "input": law, "weight": law}}}))
    argv = ["optimize", "--layers", "8", "--width", "64", "--stages", "2", "--microbatches", "4",
            "--batch-size", "16", "--profile", str(path), "--schedule", "1f1b,zb-h1", "--chunks", "1,2"]
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    searched = {(s["schedule"], s["num_chunks"]) for s in data["searched"]}
    assert searched == {("1f1b", 1), ("zb-h1", 1), ("zb-h1", 2)}
    assert "skipped 1f1b with --chunks 2" in err
    times = [s["iteration_time_s"] for s in data["searched"]]
    assert times == sorted(times) and data["iteration_time_s"] == times[0]
    assert main(argv) == 0
    assert "proven" in capsys.readouterr().out
