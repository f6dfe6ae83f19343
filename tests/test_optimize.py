"""pipesim optimize: exact against brute force, memory caps, what-ifs, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.cli import main
from pipesim.costs import (
    LinkOverride,
    ProfileCostModel,
    WhatIfError,
    parse_link_override,
    parse_rank_speed,
)
from pipesim.engine import simulate
from pipesim.model import ModelSpec, fc, fc_layer, load_model
from pipesim.optimize import (
    InfeasibleError,
    OptimizeError,
    Problem,
    StageCosts,
    lower_bound_s,
    optimize,
    parse_bytes,
    peak_memory_bytes,
    search,
    simulate_partition,
)
from pipesim.partition import Partition, even_split
from pipesim.plan import make_plan
from pipesim.profile import Affine, Link, Profile, constant_profile
from pipesim.schedule import build_schedule
from pipesim.timeline import compute_metrics

REPO = Path(__file__).resolve().parents[1]
REL = 1e-9


def all_partitions(num_layers: int, num_stages: int):
    for cuts in itertools.combinations(range(1, num_layers), num_stages - 1):
        edges = (0, *cuts, num_layers)
        yield Partition.from_counts([b - a for a, b in zip(edges, edges[1:])])


def brute_force(problem: Problem) -> list[tuple[float, tuple[int, ...], Partition]]:
    """(simulated time, per-rank peak memory, partition) of every partition."""
    schedule = problem.build_schedule()
    return [(*simulate_partition(problem, schedule, part), part)
            for part in all_partitions(problem.model.num_layers, problem.num_stages)]


def per_param_profile(latency_s=0.0, bandwidth_Bps=math.inf, optimizer_s_per_param=0.0, overhead_s=0.0,
                      fixed_s=0.0):
    """Costs that grow with parameters and FLOPs, so layer widths matter."""
    return Profile("per-param", {"*": (Affine(fixed_s, 1e-7, 0.0, 1e-9), Affine(fixed_s, 2e-7, 0.0, 2e-9))},
                   action_overhead_s=overhead_s, optimizer_s_per_param=optimizer_s_per_param,
                   intra_node=Link(latency_s, bandwidth_Bps), inter_node=Link(latency_s, bandwidth_Bps))


# --- the search is exact: brute force oracle ----------------------------------------


@st.composite
def problems(draw):
    num_layers = draw(st.integers(1, 9))
    p = draw(st.integers(1, min(num_layers, 5)))
    m = draw(st.integers(1, 6))
    widths = draw(st.lists(st.sampled_from([2, 8, 16, 48, 96]), min_size=num_layers + 1, max_size=num_layers + 1))
    model = ModelSpec("chain", tuple(fc_layer(a, b) for a, b in zip(widths, widths[1:])))
    profile = per_param_profile(
        latency_s=draw(st.sampled_from([0.0, 1e-4])),
        bandwidth_Bps=draw(st.sampled_from([math.inf, 1e6, 1e5])),
        optimizer_s_per_param=draw(st.sampled_from([0.0, 1e-7, 1e-6])),
        overhead_s=draw(st.sampled_from([0.0, 2e-5])),
        fixed_s=draw(st.sampled_from([0.0, 1e-4])),
    )
    speeds = tuple((r, draw(st.sampled_from([0.25, 0.5, 2.0]))) for r in range(p) if draw(st.booleans()))
    links = tuple(((r, r + 1), LinkOverride(bandwidth_Bps=draw(st.sampled_from([1e4, 1e7]))))
                  for r in range(p - 1) if draw(st.booleans()))
    costs = ProfileCostModel(profile, rank_speed=speeds, link_overrides=links)
    schedule = draw(st.sampled_from(["gpipe", "1f1b"]))
    batch = m * draw(st.integers(1, 4))
    return Problem(model, schedule, p, m, batch, costs), draw(st.integers(0, 3))


@settings(max_examples=150, deadline=None)
@given(problems())
def test_optimize_matches_brute_force(drawn):
    problem, cap_choice = drawn
    everything = brute_force(problem)
    peaks = sorted(max(memory) for _, memory, _ in everything)
    cap = [None, peaks[0] - 1, peaks[len(peaks) // 2], peaks[0]][cap_choice]
    problem = Problem(problem.model, problem.schedule, problem.num_stages, problem.num_microbatches,
                      problem.batch_size, problem.costs, cap)
    feasible = [(t, part) for t, memory, part in everything if cap is None or max(memory) <= cap]
    if not feasible:
        with pytest.raises(InfeasibleError) as info:
            optimize(problem)
        assert info.value.min_cap_bytes == peaks[0]
        return
    optimum = optimize(problem)
    assert optimum.proven
    assert optimum.best.metrics.iteration_time_s == pytest.approx(min(t for t, _ in feasible), rel=REL)
    assert cap is None or optimum.best.metrics.peak_memory_bytes <= cap


@settings(max_examples=80, deadline=None)
@given(problems())
def test_lower_bound_and_memory_formula_hold_for_every_partition(drawn):
    problem, _ = drawn
    table = StageCosts(problem)
    for time_s, memory, part in brute_force(problem):
        assert lower_bound_s(part, table) <= time_s * (1 + REL)
        assert peak_memory_bytes(part, table) == memory  # the engine's ledger is the truth


def test_balanced_stages_bound_is_tight():
    """Closed form: balanced stages, free links, no optimizer: (m + p - 1)(f + b) exactly."""
    problem = Problem(fc(12, 16), "1f1b", 4, 6, 24, ProfileCostModel(constant_profile(1e-3, 2e-3)))
    part = Partition.from_counts([3, 3, 3, 3])
    expected = (6 + 4 - 1) * 3 * 4 * 3e-3
    assert lower_bound_s(part, StageCosts(problem)) == pytest.approx(expected, rel=REL)
    assert simulate_partition(problem, problem.build_schedule(), part)[0] == pytest.approx(expected, rel=REL)


# --- memory caps ----------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5e9", 1_500_000_000), ("800MB", 800_000_000),
    ("1.5 GiB", 3 * 2**29), ("4096", 4096), ("64KiB", 65536),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "2GB/s", "lots", "-1GiB", "0", "1e999", "2 gib", "1..5MiB"])
def test_parse_bytes_rejects(text):
    with pytest.raises(OptimizeError, match="memory size"):
        parse_bytes(text)


def test_infeasible_cap_names_the_smallest_cap_that_works():
    problem = Problem(load_model(REPO / "models/uneven.toml"), "1f1b", 4, 8, 512,
                      ProfileCostModel(per_param_profile()))
    smallest = min(max(memory) for _, memory, _ in brute_force(problem))
    tight = Problem(*[getattr(problem, f) for f in ("model", "schedule", "num_stages", "num_microbatches",
                                                    "batch_size", "costs")], memory_cap_bytes=smallest - 1)
    with pytest.raises(InfeasibleError) as info:
        optimize(tight)
    message = str(info.value)
    assert info.value.min_cap_bytes == smallest
    assert f"--memory-cap {smallest}" in message and "smallest cap that works" in message
    assert "\n" not in message
    ok = Problem(*[getattr(tight, f) for f in ("model", "schedule", "num_stages", "num_microbatches",
                                               "batch_size", "costs")], memory_cap_bytes=smallest)
    assert optimize(ok).best.metrics.peak_memory_bytes == smallest


def test_cap_moves_the_optimum_to_a_partition_that_fits():
    # activations dominate memory and 1F1B's first stage holds two micro-batches, the second one:
    # the fastest cut (4,4) is not the leanest
    problem = Problem(fc(8, 16), "1f1b", 2, 8, 512, ProfileCostModel(constant_profile(1e-4, 2e-4)))
    free = optimize(problem)
    assert free.best.plan.partition.counts == (4, 4)
    cap = free.best.metrics.peak_memory_bytes - 1
    capped = optimize(Problem(problem.model, "1f1b", 2, 8, 512, problem.costs, cap))
    assert capped.best.metrics.peak_memory_bytes <= cap
    assert capped.best.metrics.iteration_time_s > free.best.metrics.iteration_time_s
    assert capped.best.plan.partition.counts[0] < 4
    assert not capped.even_fits


# --- the uneven model -----------------------------------------------------------------


@pytest.mark.parametrize("stages", [2, 4])
def test_uneven_model_beats_the_even_split(stages):
    model = load_model(REPO / "models/uneven.toml")
    problem = Problem(model, "1f1b", stages, 8, 512, ProfileCostModel(per_param_profile(5e-6, 5e9)))
    optimum = optimize(problem)
    assert optimum.proven
    assert optimum.even.plan.partition == even_split(16, stages)
    assert optimum.gain_over_even > 1.3
    assert optimum.best.plan.partition != optimum.even.plan.partition
    if stages == 2:
        assert optimum.best.plan.partition.counts == (6, 10)  # the wide block split 2 : 1


# --- what-ifs: rank speed and links ---------------------------------------------------


def spans_by_rank(timeline, kinds=("F", "B", "optimizer")):
    return {r: [s.duration_s for s in timeline.spans if s.rank == r and s.kind in kinds]
            for r in range(timeline.num_ranks)}


def test_half_speed_doubles_that_ranks_compute_spans():
    model, part, schedule = fc(8, 16), Partition.from_counts([2, 2, 2, 2]), build_schedule("1f1b", 4, 4)
    profile = constant_profile(1e-4, 2e-4, optimizer_s_per_param=1e-8, action_overhead_s=1e-5)
    plain = simulate(schedule, part, model, ProfileCostModel(profile), 8)
    slow = simulate(schedule, part, model, ProfileCostModel(profile, rank_speed=((2, 0.5),)), 8)
    before, after = spans_by_rank(plain), spans_by_rank(slow)
    for rank in range(4):
        factor = 2.0 if rank == 2 else 1.0
        assert after[rank] == pytest.approx([d * factor for d in before[rank]], rel=REL)
    assert compute_metrics(slow).iteration_time_s > compute_metrics(plain).iteration_time_s


def test_link_override_changes_transfers_both_ways():
    model, part, schedule = fc(4, 16), Partition.from_counts([1, 1, 1, 1]), build_schedule("gpipe", 4, 2)
    profile = constant_profile(1e-4, 2e-4, latency_s=1e-6, bandwidth_Bps=1e9)
    nbytes = 16 * 4 * 8
    costs = ProfileCostModel(profile, link_overrides=(parse_link_override("1-2:1.25e6Bps"),))
    timeline = simulate(schedule, part, model, costs, 8)
    for s in (s for s in timeline.spans if s.kind == "send"):
        bandwidth = 1.25e6 if {s.rank, s.peer} == {1, 2} else 1e9
        assert s.duration_s == pytest.approx(1e-6 + nbytes / bandwidth, rel=REL), s
    latency_only = ProfileCostModel(profile, link_overrides=(parse_link_override("2-1:5e-3s"),))
    assert latency_only.transfer_s(2, 1, nbytes) == pytest.approx(5e-3 + nbytes / 1e9, rel=REL)
    assert latency_only.transfer_s(1, 2, nbytes) == pytest.approx(5e-3 + nbytes / 1e9, rel=REL)
    assert latency_only.transfer_s(0, 1, nbytes) == pytest.approx(1e-6 + nbytes / 1e9, rel=REL)
    both = ProfileCostModel(profile, link_overrides=(parse_link_override("0-1:2e6Bps,1e-3s"),))
    assert both.transfer_s(1, 0, nbytes) == pytest.approx(1e-3 + nbytes / 2e6, rel=REL)


@pytest.mark.parametrize("text, expected", [
    ("3:0.5", ((3, 0.5),)), ("0:2,3:0.25", ((0, 2.0), (3, 0.25))), (" 1 : 1.5 ", ((1, 1.5),)),
])
def test_parse_rank_speed(text, expected):
    assert parse_rank_speed(text) == expected


@pytest.mark.parametrize("text", ["3", "a:0.5", "3:fast", "3:0", "3:-1", "-1:0.5", "3:inf"])
def test_parse_rank_speed_rejects(text):
    with pytest.raises(WhatIfError, match="rank-speed"):
        parse_rank_speed(text)


@pytest.mark.parametrize("text", ["1:1e9Bps", "1-1:1e9Bps", "1-2:1e9", "1-2:fastBps", "1-2:0Bps",
                                  "1-2:1e9Bps,2e9Bps", "x-2:1s", "1-2:-1s"])
def test_parse_link_rejects(text):
    with pytest.raises(WhatIfError, match="--link"):
        parse_link_override(text)


def test_duplicate_rank_speed_is_rejected():
    with pytest.raises(WhatIfError, match="twice"):
        ProfileCostModel(constant_profile(1.0, 1.0), rank_speed=((1, 0.5), (1, 2.0)))


def test_optimizer_gives_a_slow_rank_fewer_layers():
    costs = ProfileCostModel(constant_profile(1e-4, 2e-4), rank_speed=((1, 0.5),))
    optimum = optimize(Problem(fc(12, 16), "1f1b", 2, 8, 64, costs))
    assert optimum.best.plan.partition.counts == (8, 4)  # 8 units on rank 0 = 4 units at half speed
    assert optimum.gain_over_even > 1.2
    # `balanced` in predict sees the slow rank too
    plan = make_plan(fc(12, 16), 2, 8, 64, "1f1b", "balanced", costs)
    assert plan.partition.counts == (8, 4)


def test_optimizer_cuts_away_from_a_slow_link():
    # a wide activation leaves layer 1; cutting there sends 64 floats per sample instead of 4
    model = ModelSpec("hourglass", (fc_layer(4, 4), fc_layer(4, 64), fc_layer(64, 4), fc_layer(4, 4)))
    fast = ProfileCostModel(constant_profile(1e-4, 2e-4))
    assert optimize(Problem(model, "1f1b", 2, 4, 32, fast)).best.plan.partition.counts == (2, 2)
    slow = ProfileCostModel(constant_profile(1e-4, 2e-4), link_overrides=(parse_link_override("0-1:1e5Bps"),))
    counts = optimize(Problem(model, "1f1b", 2, 4, 32, slow)).best.plan.partition.counts
    assert counts in ((1, 3), (3, 1))


def test_search_budget_reports_an_unproven_result():
    problem = Problem(fc(32, 64), "1f1b", 16, 8, 64, ProfileCostModel(per_param_profile(1e-5, 1e8)))
    candidates, proven, remaining = search(problem, max_simulations=3, max_expansions=50)
    assert not proven
    assert 1 <= len(candidates) <= 3
    assert remaining <= min(c.iteration_time_s for c in candidates)


# --- command line -----------------------------------------------------------------------


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_json_fields(capsys):
    code, out, _ = run_main(capsys, "optimize", "--model", str(REPO / "models/uneven.toml"), "--stages", "2",
                            "--memory-cap", "1GiB", "--json")
    assert code == 0
    data = json.loads(out)
    for key in ("partition", "iteration_time_s", "speedup", "baseline_time_s", "peak_memory_bytes", "ranks",
                "memory_cap_bytes", "proven_optimal", "gain_over_even", "even_split", "candidates",
                "partitions_total", "partitions_simulated"):
        assert key in data, key
    assert data["memory_cap_bytes"] == 2**30
    assert data["partitions_total"] == 15
    assert sum(data["partition"]) == 16 and len(data["partition"]) == 2
    even = data["even_split"]
    assert even["partition"] == [8, 8] and even["fits_memory_cap"] is True
    assert data["gain_over_even"] == pytest.approx(even["iteration_time_s"] / data["iteration_time_s"])
    assert data["iteration_time_s"] <= even["iteration_time_s"]
    assert data["candidates"][0]["partition"] == data["partition"]
    assert data["speedup"] == pytest.approx(data["baseline_time_s"] / data["iteration_time_s"])


def test_optimize_text_and_what_ifs(capsys):
    code, out, _ = run_main(capsys, "optimize", "--layers", "12", "--width", "64", "--stages", "3",
                            "--rank-speed", "2:0.5", "--link", "0-1:1e8Bps,2e-6s")
    assert code == 0
    assert "optimized" in out and "even split" in out
    assert "rank 2 at 0.5x speed" in out and "link 0-1" in out


def test_optimize_infeasible_exits_2_with_the_smallest_cap(capsys):
    code, out, err = run_main(capsys, "optimize", "--layers", "8", "--width", "64", "--stages", "2",
                              "--memory-cap", "1KiB")
    assert code == 2 and out == ""
    assert err.startswith("pipesim: error: no partition") and "smallest cap that works" in err
    assert err.count("\n") == 1
    smallest = int(err.split("--memory-cap ")[-1].split(",")[0])
    code, out, _ = run_main(capsys, "optimize", "--layers", "8", "--width", "64", "--stages", "2",
                            "--memory-cap", str(smallest), "--json")
    assert code == 0 and json.loads(out)["peak_memory_bytes"] == smallest


@pytest.mark.parametrize("argv, expected", [
    (["--memory-cap", "lots"], "bad memory size 'lots'"),
    (["--rank-speed", "9:0.5"], "names rank 9"),
    (["--link", "0-1:fast"], "bad --link"),
    (["--stages", "40"], "cannot cut 32 layers into 40 pieces"),
])
def test_optimize_user_errors_exit_2(capsys, argv, expected):
    code, out, err = run_main(capsys, "optimize", *argv)
    assert code == 2 and out == ""
    assert expected in err and err.count("\n") == 1


def test_predict_accepts_what_ifs(capsys, tmp_path):
    # without the cold start: a slower rank 1 makes rank 0 wait, and waiting costs rank 0 too
    data = json.loads((Path(REPO) / "pipesim" / "data" / "default.json").read_text())
    data.pop("cold_start", None)
    (tmp_path / "warm.json").write_text(json.dumps(data))
    base = ["predict", "--layers", "8", "--width", "64", "--stages", "2", "--partition", "4,4", "--json",
            "--profile", str(tmp_path / "warm.json")]
    _, out, _ = run_main(capsys, *base)
    plain = json.loads(out)
    _, out, _ = run_main(capsys, *base, "--rank-speed", "1:0.5")
    slow = json.loads(out)
    assert slow["iteration_time_s"] > plain["iteration_time_s"]
    assert slow["ranks"][1]["busy_s"] == pytest.approx(2 * plain["ranks"][1]["busy_s"], rel=1e-6)
    assert slow["ranks"][0]["busy_s"] == pytest.approx(plain["ranks"][0]["busy_s"], rel=1e-6)
    _, out, _ = run_main(capsys, *base, "--link", "0-1:1e6Bps")
    assert json.loads(out)["iteration_time_s"] > plain["iteration_time_s"]


def test_optimize_and_sweep_do_not_import_torch():
    code = ("import sys; from pipesim.cli import main; "
            "main(['optimize','--layers','8','--stages','2','--json']); "
            "main(['sweep','--layers','8','--stages','1,2','--microbatches','1,2','--json','--quiet']); "
            "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr


def test_a_search_longer_than_a_second_reports_progress_on_stderr():
    import io

    from pipesim.optimize import _Progress

    class State:
        best_s, expansions, simulated = 0.25, 12, {1: None}

    quiet, loud = io.StringIO(), io.StringIO()
    _Progress("x", quiet, after_s=3600).tick(State())
    progress = _Progress("64 layers", loud, after_s=0.0)
    progress.tick(State())
    progress.close()
    assert quiet.getvalue() == ""
    assert loud.getvalue() == "optimize 64 layers: 12 expansions, 1 simulated, best 250.000 ms, 0 s\n"


def test_a_cost_model_whose_stages_do_not_add_up_is_asked_per_range_with_the_same_answer():
    """Without `additive_layers` the bounds ask the cost model for every layer range (slow,
    exact); with costs that do add up, both ways give the same figures and partition."""
    import numpy as np

    class PerRange(ProfileCostModel):
        additive_layers = False

    model = load_model(str(Path(__file__).parent.parent / "models" / "uneven.toml"))
    profile = constant_profile(1e-4, 2e-4, 1e-5, 1e9, 1e-9, 1e-5)
    problems = [Problem(model, "1f1b", 3, 6, 12, costs) for costs in (ProfileCostModel(profile), PerRange(profile))]
    summed, ranged = (StageCosts(problem) for problem in problems)
    assert summed.additive and not ranged.additive
    firsts = np.arange(model.num_layers + 1)
    for stage in range(3):
        a, b = summed.compute_matrix(stage, firsts, 6), ranged.compute_matrix(stage, firsts, 6)
        assert np.array_equal(np.isinf(a), np.isinf(b))
        assert np.allclose(a[~np.isinf(a)], b[~np.isinf(b)], rtol=1e-12, atol=0)
    best = [optimize(problem).best for problem in problems]
    assert best[0].plan.partition == best[1].plan.partition
    assert best[0].metrics.iteration_time_s == pytest.approx(best[1].metrics.iteration_time_s, rel=1e-12)
