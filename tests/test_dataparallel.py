"""Data parallelism x pipeline: placement, the all-reduce in the schedule, the ring law,
closed forms for the step, fast path = event simulation, and the command line."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from pipesim.cli import main
from pipesim.collectives import ring_allreduce_s, ring_link
from pipesim.costs import ProfileCostModel, parse_link_override
from pipesim.dataparallel import DataParallelError, Layout, check_shape
from pipesim.lowering import LoweredSchedule, lower
from pipesim.model import ModelSpec, fc_layer
from pipesim.plan import make_plan
from pipesim.predict import simulate_plan
from pipesim.profile import Link, constant_profile
from pipesim.schedule import Kind, build_schedule, gradients_ready
from pipesim.timeline import compute_metrics

REL = 1e-9


# --- placement ---------------------------------------------------------------------


def test_stage_major_puts_a_replicas_pipeline_on_consecutive_ranks():
    layout = Layout(num_stages=4, data_parallel=2, ranks_per_node=4)
    assert layout.replica_ranks(1) == (4, 5, 6, 7)
    assert layout.group(2) == (2, 6)
    assert [layout.describe(g) for g in (0, 5)] == [{"replica": 0, "stage": 0, "node": 0},
                                                     {"replica": 1, "stage": 1, "node": 1}]


def test_replica_major_puts_a_stage_group_on_consecutive_ranks():
    layout = Layout(num_stages=4, data_parallel=2, placement="replica-major", ranks_per_node=2)
    assert layout.replica_ranks(1) == (1, 3, 5, 7)
    assert layout.group(2) == (4, 5)
    assert layout.describe(5) == {"replica": 1, "stage": 2, "node": 2}
    for g in range(layout.world_size):  # a bijection
        assert layout.global_rank(layout.replica_of(g), layout.stage_of(g)) == g


@pytest.mark.parametrize("batch, d, m, message", [
    (512, 3, 4, "--batch-size 512 must be a multiple of --data-parallel 3"),
    (512, 2, 512, "--microbatches 512 must divide the 256 samples"),
])
def test_shapes_that_do_not_divide_are_refused(batch, d, m, message):
    with pytest.raises(DataParallelError, match=message):
        check_shape(batch, d, m)


def test_an_unknown_placement_is_refused():
    with pytest.raises(DataParallelError, match="unknown placement 'diagonal'"):
        Layout(2, 2, "diagonal")


# --- the all-reduce in the schedule language ------------------------------------------


@pytest.mark.parametrize("name, chunks", [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved-1f1b", 2),
                                          ("zb-v", 2)])
def test_each_piece_all_reduces_once_right_after_its_last_gradient(name, chunks):
    schedule = build_schedule(name, 2, 4, chunks)
    lowered = lower(schedule, allreduce=True)
    ready = gradients_ready(schedule)
    for rank, actions in enumerate(lowered.ranks):
        reduces = [i for i, a in enumerate(actions) if a.kind == Kind.ALLREDUCE]
        assert sorted(actions[i].piece for i in reduces) == sorted(schedule.pieces_of(rank))
        for i in reduces:
            piece = actions[i].piece
            before = [a for a in actions[:i] if a.kind not in (Kind.SEND, Kind.ALLREDUCE)]
            last = before[-1]
            assert last == schedule.ranks[rank][ready[piece]]
            assert last.piece == piece and last.kind == (Kind.W if name.startswith("zb") else Kind.B)
            assert not any(a.piece == piece and a.kind in (Kind.B, Kind.W) for a in actions[i:])
    assert LoweredSchedule.from_text(lowered.to_text()) == lowered
    assert Kind.ALLREDUCE not in {a.kind for row in lower(schedule).ranks for a in row}


# --- the ring law ----------------------------------------------------------------------


def test_ring_law():
    link = Link(1e-5, 1e9)
    assert ring_allreduce_s(8e6, 1, link) == 0.0
    assert ring_allreduce_s(8e6, 2, link) == pytest.approx(2 * 1e-5 + 2 * 0.5 * 8e6 / 1e9, rel=REL)
    assert ring_allreduce_s(8e6, 4, link, 1e-10) == pytest.approx(
        6 * 1e-5 + 2 * 0.75 * 8e6 / 1e9 + 0.75 * 8e6 * 1e-10, rel=REL)


def test_the_slowest_edge_paces_the_ring_and_what_ifs_name_global_ranks():
    profile = replace(constant_profile(1.0, 1.0), collectives={"intra_node": Link(1e-5, 1e9),
                                                               "inter_node": Link(1e-4, 1e8)})
    costs = ProfileCostModel(profile, ranks_per_node=2)
    assert ring_link((0, 1), costs.collective_link) == Link(1e-5, 1e9)
    assert ring_link((0, 1, 2), costs.collective_link) == Link(1e-4, 1e8)  # 1-2 and 2-0 cross nodes
    slow = ProfileCostModel(profile, link_overrides=(parse_link_override("1-3:1e7Bps"),))
    assert slow.allreduce_s((1, 3), 1000) == pytest.approx(2 * 1e-5 + 1000 / 1e7, rel=REL)
    assert slow.allreduce_s((0, 2), 1000) == pytest.approx(2 * 1e-5 + 1000 / 1e9, rel=REL)


def test_without_a_measured_collective_the_ring_uses_the_point_to_point_link():
    costs = ProfileCostModel(constant_profile(1.0, 1.0, latency_s=3e-6, bandwidth_Bps=2e9))
    assert costs.allreduce_s((0, 1, 2), 3000) == pytest.approx(4 * 3e-6 + 2 * (2 / 3) * 3000 / 2e9, rel=REL)


# --- closed forms ---------------------------------------------------------------------

ALPHA, BETA = 2e-4, 1e5  # the all-reduce's link (slow: the last, widest stage's all-reduce decides);
# pipeline links are free


def widening_model(p: int, per_stage: int = 2) -> ModelSpec:
    """Stage s has `per_stage` layers of width 4 * (s + 1): compute is per sample (equal per
    stage under a constant profile), parameters grow with s (so do the all-reduces)."""
    widths = [4 * (s + 1) for s in range(p) for _ in range(per_stage)]
    return ModelSpec("widening", tuple(fc_layer(a, b) for a, b in zip([widths[0]] + widths, widths)))


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p, m, d", [(1, 4, 2), (2, 4, 2), (3, 2, 4), (4, 8, 2), (4, 3, 3)])
def test_step_is_the_slowest_stage_finish_plus_its_all_reduce_and_optimizer(name, p, m, d):
    f, b, opt = 1e-3, 2.5e-3, 1e-6
    mbs = 2
    profile = replace(constant_profile(f, b, optimizer_s_per_param=opt), collectives={"intra_node": Link(ALPHA, BETA)})
    costs = ProfileCostModel(profile)
    model = widening_model(p)
    plan = make_plan(model, p, m, mbs * m * d, name, ",".join(["2"] * p), data_parallel=d)
    timeline = simulate_plan(plan, costs)
    F, B = 2 * mbs * f, 2 * mbs * b
    expected = 0.0
    for s in range(p):
        params = sum(layer.params for layer in plan.stage_layers(s))
        finish = (m + p - 1) * (F + B) - s * B
        allreduce = 2 * (d - 1) * ALPHA + 2 * (d - 1) / d * params * 4 / BETA
        expected = max(expected, finish + allreduce + opt * params)
    metrics = compute_metrics(timeline)
    assert metrics.iteration_time_s == pytest.approx(expected, rel=REL)
    assert metrics.iteration_time_s > (m + p - 1) * (F + B) + ALPHA  # the all-reduce is exposed
    assert len(metrics.ranks) == p * d
    assert timeline.engine_path == "fast"
    assert simulate_plan(plan, costs, "des").metrics().iteration_time_s == pytest.approx(expected, rel=REL)


def test_the_all_reduce_waits_for_the_slowest_replica():
    """Global rank 2 (replica 1, stage 0) at half speed: stage 0's all-reduce, and so rank 0's
    optimizer step, starts when rank 2 has finished its backwards."""
    profile = replace(constant_profile(1e-3, 2e-3), collectives={"intra_node": Link(ALPHA, BETA)})
    costs = ProfileCostModel(profile, rank_speed=((2, 0.5),))
    plan = make_plan(widening_model(2), 2, 4, 16, "1f1b", "2,2", data_parallel=2)
    timeline = simulate_plan(plan, costs)
    spans = timeline.spans
    slow_end = max(s.end_s for s in spans if s.rank == 2 and s.kind == "B")
    fast_end = max(s.end_s for s in spans if s.rank == 0 and s.kind == "B")
    assert slow_end > fast_end
    reduce0 = [s for s in spans if s.rank == 0 and s.kind == "allreduce"]
    assert len(reduce0) == 1 and reduce0[0].start_s == pytest.approx(slow_end, rel=REL)
    optimizer0 = next(s for s in spans if s.rank == 0 and s.kind == "optimizer")
    assert optimizer0.start_s == pytest.approx(reduce0[0].end_s, rel=REL)
    assert any(s.rank == 0 and s.name == "wait for all-reduces" for s in spans)


@pytest.mark.parametrize("name, chunks, placement", [("1f1b", 1, "stage-major"), ("zb-h1", 1, "replica-major"),
                                                     ("interleaved-1f1b", 2, "stage-major"),
                                                     ("zb-v", 2, "replica-major")])
def test_fast_path_and_event_simulation_agree_with_data_parallelism(name, chunks, placement):
    profile = replace(constant_profile(1e-3, 2e-3, 1e-5, 1e8, 1e-8, input_s_per_sample=1e-3,
                                       weight_s_per_sample=1e-3),
                      collectives={"intra_node": Link(1e-4, 1e9), "inter_node": Link(1e-3, 1e8)})
    costs = ProfileCostModel(profile, ranks_per_node=2, rank_speed=((3, 0.7),))
    plan = make_plan(widening_model(4, 2), 2, 4, 32, name, "balanced", num_chunks=chunks, data_parallel=2,
                     placement=placement)
    fast, des = simulate_plan(plan, costs, "fast"), simulate_plan(plan, costs, "des")
    assert fast is not None and fast.engine_path == "fast" and des.engine_path == "des"
    key = lambda s: (s.rank, s.kind, s.stage, s.microbatch, s.start_s)
    assert [(s.rank, s.kind, s.stage, s.microbatch) for s in sorted(fast.spans, key=key)] == \
        [(s.rank, s.kind, s.stage, s.microbatch) for s in sorted(des.spans, key=key)]
    for a, b in zip(sorted(fast.spans, key=key), sorted(des.spans, key=key)):
        assert a.start_s == pytest.approx(b.start_s, rel=1e-12, abs=1e-15)
        assert a.end_s == pytest.approx(b.end_s, rel=1e-12, abs=1e-15)
    assert fast.metrics() == des.metrics()


def test_one_replica_is_the_plain_pipeline_without_all_reduces():
    costs = ProfileCostModel(constant_profile(1e-3, 2e-3))
    plain = make_plan(widening_model(2), 2, 4, 16, "1f1b", "2,2")
    assert plain.lowered == lower(plain.schedule)
    timeline = simulate_plan(plain, costs)
    assert not [s for s in timeline.spans if s.kind == "allreduce"]
    assert compute_metrics(timeline).iteration_time_s == pytest.approx((4 + 1) * 2 * 4 * (1e-3 + 2e-3), rel=REL)


# --- the command line --------------------------------------------------------------------


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_names_replica_stage_and_node_of_every_global_rank(capsys):
    code, out, _ = run_main(capsys, "predict", "--layers", "8", "--width", "64", "--stages", "2",
                            "--data-parallel", "2", "--microbatches", "4", "--ranks-per-node", "2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["world_size"] == 4 and data["data_parallel"] == 2 and data["placement"] == "stage-major"
    assert [(r["rank"], r["replica"], r["stage"], r["node"]) for r in data["ranks"]] == \
        [(0, 0, 0, 0), (1, 0, 1, 0), (2, 1, 0, 1), (3, 1, 1, 1)]
    assert data["microbatch_size"] == 512 // 2 // 4
    assert data["exposed_allreduce_s"] > 0
    assert data["spec"]["execution"]["data_parallel"] == 2


def test_predict_text_shows_the_replica_table(capsys):
    code, out, _ = run_main(capsys, "predict", "--layers", "8", "--width", "64", "--stages", "2",
                            "--data-parallel", "2", "--placement", "replica-major")
    assert code == 0
    assert "replica stage node" in out and "2 x 2 stages = 4 ranks (replica-major)" in out


@pytest.mark.parametrize("argv, message", [
    (("--data-parallel", "3"), "--batch-size 512 must be a multiple of --data-parallel 3"),
    (("--data-parallel", "2", "--microbatches", "512"), "--microbatches 512 must divide the 256 samples"),
    (("--data-parallel", "2", "--rank-speed", "4:0.5"), "names rank 4, but the pipeline has ranks 0-3"),
    (("--data-parallel", "2", "--placement", "diagonal"), "invalid choice: 'diagonal'"),
    (("--data-parallel", "600"), "= 1200 ranks; at most 1024"),
])
def test_bad_data_parallel_shapes_are_one_line_errors(capsys, argv, message):
    code, _, err = run_main(capsys, "predict", "--layers", "8", "--stages", "2", *argv)
    assert code == 2
    assert err.startswith("pipesim: error: ") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize("command", ["optimize", "sweep"])
def test_optimize_and_sweep_take_data_parallel(capsys, command):
    extra = ("--quiet", "--jobs", "1", "--stages", "2", "--microbatches", "4") if command == "sweep" else \
        ("--stages", "2", "--microbatches", "4")
    code, out, _ = run_main(capsys, command, "--layers", "8", "--width", "64", "--data-parallel", "2", *extra,
                            "--json")
    assert code == 0
    data = json.loads(out)
    if command == "optimize":
        assert data["data_parallel"] == 2 and len(data["ranks"]) == 4
    else:
        assert data["points"][0]["iteration_time_s"] > 0


def test_a_config_file_with_data_parallel_round_trips(tmp_path, capsys):
    path = tmp_path / "dp.toml"
    code, first, _ = run_main(capsys, "predict", "--layers", "8", "--stages", "2", "--data-parallel", "2",
                              "--placement", "replica-major", "--json", "--save-config", str(path))
    assert code == 0 and 'placement = "replica-major"' in path.read_text()
    code, second, _ = run_main(capsys, "predict", "--config", str(path), "--json")
    assert code == 0
    assert json.loads(first)["iteration_time_s"] == json.loads(second)["iteration_time_s"]
    assert not math.isnan(json.loads(second)["iteration_time_s"])


def test_schedule_lowered_shows_the_all_reduces(capsys):
    code, out, _ = run_main(capsys, "schedule", "--lowered", "--data-parallel", "2", "--stages", "2",
                            "--microbatches", "2", "--schedule", "zb-h1")
    assert code == 0
    rows = [line.split(": ")[1].split() for line in out.splitlines()[1:]]
    assert [row[-1] for row in rows] == ["0ALLREDUCE", "1ALLREDUCE"]
    assert rows[1][-2] == "1W1"  # after the last W, for a zero-bubble schedule
    assert LoweredSchedule.from_text(out).ranks[0][-1].kind == Kind.ALLREDUCE


def test_trace_and_gantt_show_the_all_reduces(capsys, tmp_path):
    code, _, _ = run_main(capsys, "predict", "--layers", "8", "--width", "64", "--stages", "2", "--data-parallel", "2",
                          "--gantt", str(tmp_path / "g.png"), "--trace", str(tmp_path / "t.json"))
    assert code == 0 and (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    reduces = [e for e in events if e.get("cat") == "allreduce"]
    assert sorted(e["tid"] for e in reduces) == [f"all-reduce, rank {r}" for r in range(4)]
