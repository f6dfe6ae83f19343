"""`--allreduce ring-steps`: the ring all-reduce step by step in one event simulation of the
world, with a network interface per node shared by all inter-node messages (ringsteps.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipesim.cli import main
from pipesim.collectives import ring_allreduce_s
from pipesim.costs import LinkOverride, ProfileCostModel, WhatIfError
from pipesim.dataparallel import Layout
from pipesim.model import ModelSpec, fc_layer
from pipesim.plan import make_plan
from pipesim.predict import simulate_plan
from pipesim.profile import Link, constant_profile
from pipesim.ringsteps import Network, run_world
from pipesim.timeline import compute_metrics

REL = 1e-12
ALPHA, BETA, GAMMA = 2e-4, 1e5, 3e-7  # the all-reduce's link and its additions


def widening_model(p: int, per_stage: int = 2) -> ModelSpec:
    """Stage s has `per_stage` layers of width 4 * (s + 1): equal compute per sample under a
    constant profile, parameters (so all-reduces) growing with s."""
    widths = [4 * (s + 1) for s in range(p) for _ in range(per_stage)]
    return ModelSpec("widening", tuple(fc_layer(a, b) for a, b in zip([widths[0]] + widths, widths)))


def ring_profile(f: float = 0.0, b: float = 0.0, gamma: float = GAMMA, **links):
    link = Link(ALPHA, BETA)
    return replace(constant_profile(f, b, **links), collectives={"intra_node": link, "inter_node": link},
                   reduce_s_per_byte=gamma)


def allreduce_spans(timeline, rank: int) -> list:
    return [s for s in timeline.spans if s.rank == rank and s.kind == "allreduce"]


# --- one all-reduce: the steps add up to the law --------------------------------------------


@pytest.mark.parametrize("d", [2, 3, 4, 5])
@pytest.mark.parametrize("ranks_per_node", [None, 1])
def test_with_free_compute_one_all_reduce_takes_the_ring_law(d, ranks_per_node):
    """P = 1, D ranks, compute and optimizer free: the step is the all-reduce, 2(D-1) steps of
    alpha + (S/D)/beta plus the reduce-scatter's additions, whether the ranks share a node or
    each has its own network interface (each interface then carries one ring edge per direction)."""
    model = widening_model(1, 1)
    plan = make_plan(model, 1, 1, d, "gpipe", "1", data_parallel=d)
    costs = ProfileCostModel(ring_profile(), allreduce="ring-steps", ranks_per_node=ranks_per_node)
    timeline = simulate_plan(plan, costs)
    nbytes = model.layers[0].params * 4
    law = ring_allreduce_s(nbytes, d, Link(ALPHA, BETA), GAMMA)
    by_steps = 2 * (d - 1) * (ALPHA + nbytes / d / BETA) + (d - 1) * nbytes / d * GAMMA
    assert law == pytest.approx(by_steps, rel=REL)
    assert compute_metrics(timeline).iteration_time_s == pytest.approx(law, rel=REL)
    for rank in range(d):
        (span,) = allreduce_spans(timeline, rank)
        assert span.start_s == 0.0 and span.end_s == pytest.approx(law, rel=REL)
    assert timeline.engine_path == "des"
    assert timeline.exposed_allreduce_s() == pytest.approx(law, rel=REL)


def test_a_slow_edge_paces_the_ring_as_the_law_says():
    """One slow ring edge (a --link what-if on global ranks 1-2): every step waits for it."""
    plan = make_plan(widening_model(1, 1), 1, 1, 4, "gpipe", "1", data_parallel=4)
    law = ProfileCostModel(ring_profile(gamma=0.0), link_overrides=(((1, 2), LinkOverride(1e-3, 2e4)),))
    slow = compute_metrics(simulate_plan(plan, law)).iteration_time_s
    assert slow > ring_allreduce_s(plan.stage_layers(0)[0].params * 4, 4, Link(ALPHA, BETA))
    steps = replace(law, allreduce="ring-steps")
    assert compute_metrics(simulate_plan(plan, steps)).iteration_time_s == pytest.approx(slow, rel=REL)


# --- the network interface ------------------------------------------------------------------


def test_an_interface_carries_one_message_at_a_time_per_direction():
    net = Network(Layout(2, 2, ranks_per_node=2))  # node 0: ranks 0, 1; node 1: ranks 2, 3
    assert net.path(0, 1, "a") == (("link", "a"),)  # inside a node: no interface
    assert net.reserve(0.0, net.path(0, 2, "a"), 1.0) == (0.0, 1.0)
    assert net.reserve(0.0, net.path(1, 3, "b"), 1.0) == (1.0, 2.0)  # node 0's way out is busy
    assert net.reserve(0.0, net.path(2, 0, "c"), 1.0) == (0.0, 1.0)  # the other direction is not
    assert net.reserve(0.5, net.path(0, 1, "d"), 1.0) == (0.5, 1.5)  # nor is a link inside node 0
    assert net.interface_busy_s() == {("out", 0): 2.0, ("in", 1): 2.0, ("out", 1): 1.0, ("in", 0): 1.0}


@pytest.mark.parametrize("ranks_per_node", [None, 8])
def test_ranks_on_one_node_use_no_interface(ranks_per_node):
    plan = make_plan(widening_model(2), 2, 4, 32, "1f1b", "2,2", data_parallel=4)
    costs = ProfileCostModel(ring_profile(1e-3, 2e-3, latency_s=1e-5, bandwidth_Bps=1e6),
                             allreduce="ring-steps", ranks_per_node=ranks_per_node)
    timeline, network = run_world(plan, costs, plan.layout(ranks_per_node))
    assert network.interface_busy_s() == {}
    two_nodes = replace(costs, ranks_per_node=4)
    assert run_world(plan, two_nodes, plan.layout(4))[1].interface_busy_s()  # the rings cross nodes
    assert compute_metrics(timeline).iteration_time_s == pytest.approx(
        compute_metrics(simulate_plan(plan, replace(costs, ranks_per_node=None))).iteration_time_s, rel=REL)


T_GRAD = 4e-3  # the pipeline's gradient message to stage 0: 100 floats at 1e5 B/s (one sample)


def contention_case(ranks_per_node):
    """P = 2, D = 2, 1F1B, stage-major: replica 0 on global ranks 0, 1 and replica 1 on 2, 3.
    Stage 1's all-reduce (ranks 1 and 3) starts as rank 3 sends its last gradient to rank 2;
    stage 0's starts a long backward (50 ms) later, when stage 1's has ended."""
    model = ModelSpec("two", (fc_layer(1, 100), fc_layer(100, 1)))
    plan = make_plan(model, 2, 2, 4, "1f1b", "1,1", data_parallel=2)
    assert model.layers[1].input_bytes_per_sample * plan.microbatch_size / 1e5 == pytest.approx(T_GRAD)
    costs = ProfileCostModel(ring_profile(1e-3, 5e-2, gamma=0.0, bandwidth_Bps=1e5),
                             allreduce="ring-steps", ranks_per_node=ranks_per_node)
    return plan, costs, 2 * (ALPHA + model.layers[1].params * 4 / 2 / BETA)


def test_a_pipeline_message_through_the_same_interface_delays_the_ring_step():
    """3 ranks per node: nodes {0, 1, 2} and {3}. Rank 3's last gradient (to rank 2) and its
    first ring step (to rank 1) both leave node 1: the step waits for the gradient, and stage
    1's all-reduce ends T_GRAD later than on one node, where the two use separate links only."""
    plan, costs, law = contention_case(3)
    shared = simulate_plan(plan, costs)
    alone = simulate_plan(plan, replace(costs, ranks_per_node=None))
    ready = max(s.end_s for s in alone.spans if s.rank == 3 and s.kind == "B")
    for rank in (1, 3):
        assert [(s.start_s, s.end_s) for s in allreduce_spans(alone, rank)] == \
            [(ready, pytest.approx(ready + law, rel=REL))]
        assert [(s.start_s, s.end_s) for s in allreduce_spans(shared, rank)] == \
            [(ready, pytest.approx(ready + T_GRAD + law, rel=REL))]


def test_with_separate_interfaces_the_ring_step_is_not_delayed():
    """A node per replica (2 ranks per node): the gradients stay inside the nodes, and each
    interface carries only one stage group's ring steps at a time here: no delay."""
    plan, costs, law = contention_case(2)
    separate, network = run_world(plan, costs, plan.layout(2))
    alone = simulate_plan(plan, replace(costs, ranks_per_node=None))
    assert network.interface_busy_s()[("out", 1)] > 0  # the rings do cross the interfaces
    for rank in range(4):
        assert [(s.start_s, s.end_s) for s in allreduce_spans(separate, rank)] == \
            [(a.start_s, pytest.approx(a.end_s, rel=REL)) for a in allreduce_spans(alone, rank)]
    assert allreduce_spans(separate, 3)[0].end_s - allreduce_spans(separate, 3)[0].start_s == \
        pytest.approx(law, rel=REL)


# --- the closed form holds step by step ---------------------------------------------


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m, d", [(1, 4, 2), (2, 4, 2), (3, 2, 4), (4, 8, 2), (4, 3, 3)])
@pytest.mark.parametrize("ranks_per_node", [None, 1])
def test_step_is_the_slowest_stage_finish_plus_its_all_reduce_and_optimizer(name, p, m, d, ranks_per_node):
    """Free pipeline links, uniform stages: stage s finishes its backward at
    (m + p - 1)(F + B) - s B, and the step is max_s (finish_s + allreduce_s + optimizer_s)."""
    f, b, opt = 1e-3, 2.5e-3, 1e-6
    mbs = 2
    profile = replace(ring_profile(f, b), optimizer_s_per_param=opt)
    costs = ProfileCostModel(profile, allreduce="ring-steps", ranks_per_node=ranks_per_node)
    model = widening_model(p)
    plan = make_plan(model, p, m, mbs * m * d, name, ",".join(["2"] * p), data_parallel=d)
    timeline = simulate_plan(plan, costs)
    F, B = 2 * mbs * f, 2 * mbs * b
    expected = 0.0
    for s in range(p):
        params = sum(layer.params for layer in plan.stage_layers(s))
        finish = (m + p - 1) * (F + B) - s * B
        allreduce = ring_allreduce_s(params * 4, d, Link(ALPHA, BETA), GAMMA)
        expected = max(expected, finish + allreduce + opt * params)
    metrics = compute_metrics(timeline)
    assert metrics.iteration_time_s == pytest.approx(expected, rel=REL)
    assert metrics.iteration_time_s > (m + p - 1) * (F + B) + ALPHA  # the all-reduce is exposed
    assert len(metrics.ranks) == p * d
    assert simulate_plan(plan, costs, "fast") is None  # ring-steps has no fast path


# --- the option ----------------------------------------------------------------------------


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_an_unknown_allreduce_model_is_refused():
    with pytest.raises(WhatIfError, match="unknown --allreduce 'tree'"):
        ProfileCostModel(constant_profile(1.0, 1.0), allreduce="tree")


@pytest.mark.parametrize("command", ["predict", "optimize", "sweep"])
def test_predict_optimize_and_sweep_take_allreduce(capsys, command):
    extra = ("--quiet", "--jobs", "1") if command == "sweep" else ()
    argv = (command, "--layers", "8", "--width", "64", "--stages", "2", "--microbatches", "4",
            "--data-parallel", "2", "--ranks-per-node", "2", "--link", "0-2:1e8Bps", "--link", "1-3:1e8Bps",
            *extra, "--json")
    code, law, _ = run_main(capsys, *argv)
    assert code == 0
    code, steps, _ = run_main(capsys, *argv, "--allreduce", "ring-steps")
    assert code == 0
    if command == "sweep":
        times = [json.loads(out)["points"][0]["iteration_time_s"] for out in (law, steps)]
    else:
        times = [json.loads(out)["iteration_time_s"] for out in (law, steps)]
        assert json.loads(steps)["spec"]["execution"]["allreduce"] == "ring-steps"
    assert all(t > 0 for t in times)


def test_allreduce_round_trips_through_a_config_file_and_bad_values_are_one_line(tmp_path, capsys):
    path = tmp_path / "steps.toml"
    code, first, _ = run_main(capsys, "predict", "--layers", "8", "--stages", "2", "--data-parallel", "2",
                              "--allreduce", "ring-steps", "--json", "--save-config", str(path))
    assert code == 0 and 'allreduce = "ring-steps"' in path.read_text()
    code, second, _ = run_main(capsys, "predict", "--config", str(path), "--json")
    assert code == 0 and json.loads(first)["iteration_time_s"] == json.loads(second)["iteration_time_s"]
    path.write_text(path.read_text().replace('"ring-steps"', '"tree"'))
    code, _, err = run_main(capsys, "predict", "--config", str(path))
    assert code == 2 and err.count("\n") == 1 and "allreduce must be one of law, ring-steps" in err


def test_one_replica_warns_that_ring_steps_has_no_effect(capsys):
    code, _, err = run_main(capsys, "predict", "--layers", "8", "--stages", "2", "--allreduce", "ring-steps")
    assert code == 0 and "one replica has no all-reduce (the option has no effect)" in err
