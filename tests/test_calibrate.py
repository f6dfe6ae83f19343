"""The calibration fits on synthetic data with known answers (no MPI, no torch)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import replace

import numpy as np
import pytest

from pipesim.calibrate import (
    DEFAULT_MESSAGE_SIZES,
    CalibrationSettings,
    _fit_links,
    build_profile,
    calibrate,
    compute_table,
    cv,
    fit_compute,
    fit_link,
    fit_nonnegative,
    fit_optimizer,
    link_classes,
    optimizer_table,
)
from pipesim.profile import Link, Table, parse_profile
from pipesim.runner.records import (
    ComputeSample,
    LinkSample,
    MicrobenchResult,
    OptimizerSample,
    RankSamples,
)
from pipesim.wire import from_dict, to_dict

LATENCY, BANDWIDTH = 2e-6, 1e8
SIZES = [1 << k for k in range(0, 27, 2)]  # 1 B .. 64 MiB
assert SIZES[0] == 1 and SIZES[-1] == 64 << 20


def one_way(n: int, latency: float = LATENCY, bandwidth: float = BANDWIDTH) -> float:
    return latency + n / bandwidth


def link_samples(pair=(0, 1), latency=LATENCY, bandwidth=BANDWIDTH, noise=0.0, rng=None, repeats=1):
    samples = []
    for n in SIZES:
        t = one_way(n, latency, bandwidth)
        times = [t * (1 + rng.uniform(-noise, noise)) if noise else t for _ in range(repeats)]
        samples.append(LinkSample(tuple(pair), n, tuple(times)))
    return samples


def compute_sample(**fields) -> ComputeSample:
    """A sample with the fields a test cares about; the rest zero or empty."""
    defaults = {"rank": 0, "width": 0, "microbatch_size": 0, "depth": 4, "params_per_layer": 0,
                "flops_per_sample_per_layer": 0.0, "forward_s": (), "backward_s": (), "input_s": (),
                "weight_s": (), "saved_bytes_per_sample_per_layer": 0.0}
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return ComputeSample(**{**defaults, **given})


# --- fit_nonnegative --------------------------------------------------------------


def test_fit_nonnegative_exact():
    features = np.array([[1.0, x] for x in (1.0, 10.0, 100.0, 1000.0)])
    coef, worst = fit_nonnegative(features, features @ np.array([0.5, 0.25]))
    assert coef == pytest.approx([0.5, 0.25], rel=1e-9)
    assert worst < 1e-9


def test_fit_nonnegative_clips_at_zero():
    # The best unconstrained intercept is negative; the fit keeps it at 0 and
    # reports the relative error that costs.
    xs = np.array([1.0, 2.0, 4.0, 8.0])
    coef, worst = fit_nonnegative(np.column_stack([np.ones_like(xs), xs]), 2.0 * xs - 0.5)
    assert coef[0] == pytest.approx(0.0, abs=1e-9)  # lsq_linear stops a hair inside the bound
    assert coef[1] > 0
    assert all(c >= 0 for c in coef)
    assert worst > 0.05


# --- links ----------------------------------------------------------------------


def test_fit_link_exact():
    link, worst = fit_link(link_samples())
    assert link["latency_s"] == pytest.approx(LATENCY, rel=0.01)
    assert link["bandwidth_Bps"] == pytest.approx(BANDWIDTH, rel=0.01)
    assert worst < 1e-6


def test_fit_link_default_message_sizes_exact():
    samples = [LinkSample((0, 1), n, (one_way(n),)) for n in DEFAULT_MESSAGE_SIZES]
    link, _ = fit_link(samples)
    assert link["latency_s"] == pytest.approx(LATENCY, rel=0.01)
    assert link["bandwidth_Bps"] == pytest.approx(BANDWIDTH, rel=0.01)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fit_link_noisy(seed):
    rng = np.random.default_rng(seed)
    link, worst = fit_link(link_samples(noise=0.03, rng=rng, repeats=5))
    assert link["latency_s"] == pytest.approx(LATENCY, rel=0.05)
    assert link["bandwidth_Bps"] == pytest.approx(BANDWIDTH, rel=0.05)
    assert worst < 0.1


def test_fit_link_uses_the_median_of_repeats():
    # One wild outlier per size must not move the fit.
    samples = [replace(s, one_way_s=(s.one_way_s[0], s.one_way_s[0], 50 * s.one_way_s[0]))
               for s in link_samples()]
    link, _ = fit_link(samples)
    assert link["latency_s"] == pytest.approx(LATENCY, rel=0.01)
    assert link["bandwidth_Bps"] == pytest.approx(BANDWIDTH, rel=0.01)


def test_fit_link_size_independent_time_is_practically_free():
    samples = [LinkSample((0, 1), n, (LATENCY,)) for n in SIZES]
    link, _ = fit_link(samples)
    assert link["latency_s"] == pytest.approx(LATENCY, rel=0.01)
    # None (free) or so large that 64 MiB costs nothing next to the latency.
    assert link["bandwidth_Bps"] is None or (64 << 20) / link["bandwidth_Bps"] < 1e-3 * LATENCY


def test_link_classes_several_hosts():
    classes = link_classes(["n1", "n1", "n2", "n2"], [(0, 1), (1, 2), (2, 3)])
    assert classes == {(0, 1): "intra_node", (1, 2): "inter_node", (2, 3): "intra_node"}


def test_link_classes_one_host_and_all_hosts():
    pairs = [(0, 1), (1, 2), (2, 3)]
    assert set(link_classes(["h"] * 4, pairs).values()) == {"intra_node"}
    assert set(link_classes(["a", "b", "c", "d"], pairs).values()) == {"inter_node"}
    # Not by neighbourhood: ranks 0 and 2 share a host, 0 and 1 do not.
    assert link_classes(["a", "b", "a"], [(0, 2), (0, 1)]) == {(0, 2): "intra_node", (0, 1): "inter_node"}


def rank(r: int, processor: str, links: list[LinkSample]) -> RankSamples:
    return RankSamples(r, "host", processor, (), (), tuple(links))


def test_fit_links_every_pair_crosses_nodes():
    ranks = [rank(0, "n1", link_samples((0, 1))), rank(1, "n2", link_samples((1, 2))),
             rank(2, "n3", [])]
    links, worst, noise = _fit_links(ranks)
    assert links["intra_node"] == links["inter_node"]
    assert links["inter_node"]["latency_s"] == pytest.approx(LATENCY, rel=0.01)
    assert links["inter_node"]["bandwidth_Bps"] == pytest.approx(BANDWIDTH, rel=0.01)
    assert set(worst) == set(noise) == {"inter_node"}
    profile = parse_profile({"schema": "pipesim-profile", "version": 1, "name": "x",
                             "compute": {}, "links": links})
    assert profile.intra_node == profile.inter_node


def test_fit_links_two_hosts_two_classes():
    intra = {"latency": 1e-6, "bandwidth": 1e10}
    inter = {"latency": 2e-5, "bandwidth": 1e9}
    ranks = [rank(0, "n1", link_samples((0, 1), **intra)),
             rank(1, "n1", link_samples((1, 2), **inter)),
             rank(2, "n2", link_samples((2, 3), **intra)),
             rank(3, "n2", [])]
    links, worst, noise = _fit_links(ranks[::-1])  # order of the list must not matter
    assert links["intra_node"]["latency_s"] == pytest.approx(1e-6, rel=0.01)
    assert links["intra_node"]["bandwidth_Bps"] == pytest.approx(1e10, rel=0.01)
    assert links["inter_node"]["latency_s"] == pytest.approx(2e-5, rel=0.01)
    assert links["inter_node"]["bandwidth_Bps"] == pytest.approx(1e9, rel=0.01)
    assert worst["intra_node"] < 1e-6 and worst["inter_node"] < 1e-6
    assert noise == {"intra_node": 0.0, "inter_node": 0.0}  # one repeat each: cv 0
    profile = parse_profile({"schema": "pipesim-profile", "version": 1, "name": "x",
                             "compute": {}, "links": links})
    assert profile.intra_node == Link(pytest.approx(1e-6, rel=0.01), pytest.approx(1e10, rel=0.01))
    assert profile.inter_node.time_s(1 << 20) > profile.intra_node.time_s(1 << 20)


def test_fit_links_ranks_sorted_by_rank_number():
    # Ranks 0 and 1 share host "a"; rank 2 is on "b". Listed out of order, the
    # processor names must still be matched by rank number.
    ranks = [rank(2, "b", []), rank(0, "a", link_samples((0, 1), latency=1e-6)),
             rank(1, "a", link_samples((1, 2), latency=3e-5))]
    links, _, _ = _fit_links(ranks)
    assert links["intra_node"]["latency_s"] == pytest.approx(1e-6, rel=0.01)
    assert links["inter_node"]["latency_s"] == pytest.approx(3e-5, rel=0.01)


def test_fit_links_noise_is_the_median_cv():
    samples = [LinkSample((0, 1), n, (t * 0.9, t, t * 1.1)) for n, t in ((n, one_way(n)) for n in SIZES)]
    _, _, noise = _fit_links([rank(0, "h", samples), rank(1, "h", [])])
    assert noise["intra_node"] == pytest.approx(cv([0.9, 1.0, 1.1]), rel=1e-9)
    assert "inter_node" not in noise


# --- compute ----------------------------------------------------------------------

WIDTHS = (256, 384, 512, 768, 1024)
MB_SIZES = (4, 8, 16, 32, 64, 128, 256, 512)
FORWARD = {"fixed_s": 1e-5, "s_per_param": 4e-10, "s_per_flop": 1e-11}
BACKWARD = {"fixed_s": 3e-5, "s_per_param": 8e-10, "s_per_flop": 2e-11}


def affine_s(coef: dict, params: int, b: int, flops: float) -> float:
    return coef["fixed_s"] + coef["s_per_param"] * params + b * coef["s_per_flop"] * flops


def compute_samples(noise=0.0, rng=None, repeats=1) -> list[ComputeSample]:
    samples = []
    for w in WIDTHS:
        params, flops = w * w + w, 2.0 * w * w + w
        for b in MB_SIZES:
            f, bw = affine_s(FORWARD, params, b, flops), affine_s(BACKWARD, params, b, flops)
            jitter = (lambda: 1 + rng.uniform(-noise, noise)) if noise else (lambda: 1.0)
            samples.append(compute_sample(width=w, microbatch_size=b, params_per_layer=params,
                                          flops_per_sample_per_layer=flops,
                                          forward_s=[f * jitter() for _ in range(repeats)],
                                          backward_s=[bw * jitter() for _ in range(repeats)]))
    return samples


@pytest.mark.parametrize("direction, truth", [("forward", FORWARD), ("backward", BACKWARD)])
def test_fit_compute_exact(direction, truth):
    coef, worst = fit_compute(compute_samples(), direction)
    for key in ("fixed_s", "s_per_param", "s_per_flop"):
        assert coef[key] == pytest.approx(truth[key], rel=1e-6), key
    assert coef["s_per_sample"] == 0.0
    assert worst < 1e-9


@pytest.mark.parametrize("direction, truth", [("forward", FORWARD), ("backward", BACKWARD)])
def test_fit_compute_noisy(direction, truth):
    coef, worst = fit_compute(compute_samples(0.03, np.random.default_rng(7), repeats=5), direction)
    assert coef["s_per_param"] == pytest.approx(truth["s_per_param"], rel=0.05)
    assert coef["s_per_flop"] == pytest.approx(truth["s_per_flop"], rel=0.05)
    assert worst < 0.1


def test_fit_compute_result_is_a_valid_law():
    coef, _ = fit_compute(compute_samples(), "forward")
    profile = parse_profile({"schema": "pipesim-profile", "version": 1, "name": "x",
                             "compute": {"fc": {"forward": {k: float(v) for k, v in coef.items()},
                                                "backward": {}}},
                             "links": {"intra_node": {}}})
    forward, _ = profile.compute["fc"]
    params, flops = 512 * 512 + 512, 2.0 * 512 * 512 + 512
    assert forward.time_s(32, params, flops) == pytest.approx(affine_s(FORWARD, params, 32, flops),
                                                              rel=1e-6)


def test_compute_table_pools_ranks_and_takes_medians():
    samples = [
        compute_sample(rank=0, width=512, microbatch_size=8, forward_s=[1.0, 2.0, 3.0], backward_s=[5.0]),
        compute_sample(rank=1, width=512, microbatch_size=8, forward_s=[10.0], backward_s=[7.0, 9.0]),
    ]
    table = compute_table(samples, "forward")
    # Pooled [1, 2, 3, 10] -> 2.5; not the median of medians (6) nor the mean (4).
    assert table == {"widths": [512], "microbatch_sizes": [8], "seconds": [[2.5]]}
    assert compute_table(samples, "backward")["seconds"] == [[7.0]]


def test_compute_table_shape_and_order():
    widths, sizes = (1024, 256, 512), (16, 4)  # measured out of order
    samples = [compute_sample(rank=r, width=w, microbatch_size=b, forward_s=[w * 1e-6 + b * 1e-3 + r * 1e-9],
                              backward_s=[2 * (w * 1e-6 + b * 1e-3)])
               for r in (1, 0) for b in sizes for w in widths]
    table = compute_table(samples, "forward")
    assert table["widths"] == [256, 512, 1024]
    assert table["microbatch_sizes"] == [4, 16]
    assert len(table["seconds"]) == 3 and all(len(row) == 2 for row in table["seconds"])
    for i, w in enumerate(table["widths"]):
        for j, b in enumerate(table["microbatch_sizes"]):
            assert table["seconds"][i][j] == pytest.approx(w * 1e-6 + b * 1e-3 + 0.5e-9, rel=1e-12)
    back = compute_table(samples, "backward")
    assert back["seconds"][2][1] == pytest.approx(2 * (1024e-6 + 16e-3), rel=1e-12)
    # The table is what the profile's measured law reads.
    profile = parse_profile({"schema": "pipesim-profile", "version": 1, "name": "x",
                             "compute": {"fc": {"forward": table, "backward": back}},
                             "links": {"intra_node": {}}})
    assert isinstance(profile.compute["fc"][0], Table)
    assert profile.compute["fc"][0].seconds[1] == tuple(table["seconds"][1])


# --- optimizer --------------------------------------------------------------------


def test_fit_optimizer_affine():
    samples = [OptimizerSample(p, (1e-4 + 3e-9 * p,)) for p in (10**4, 10**5, 10**6, 10**7)]
    coef, worst = fit_optimizer(samples)
    assert coef["fixed_s"] == pytest.approx(1e-4, rel=1e-6)
    assert coef["s_per_param"] == pytest.approx(3e-9, rel=1e-6)
    assert worst < 1e-9


def test_optimizer_table_pools_and_sorts():
    samples = [OptimizerSample(4000, (4.0, 6.0)), OptimizerSample(1000, (1.0, 2.0, 3.0)),
               OptimizerSample(1000, (10.0,)), OptimizerSample(2000, (2.0,))]
    table = optimizer_table(samples)
    assert table == {"params": [1000, 2000, 4000], "seconds": [2.5, 2.0, 5.0]}
    profile = parse_profile({"schema": "pipesim-profile", "version": 1, "name": "x",
                             "compute": {}, "links": {"intra_node": {}}, "optimizer": table})
    assert profile.optimizer_table == ((1000, 2000, 4000), (2.5, 2.0, 5.0))


# --- cv -------------------------------------------------------------------------


def test_cv():
    assert cv([1.0, 2.0, 3.0]) == pytest.approx(0.5, rel=1e-12)
    assert cv([2.0, 4.0]) == pytest.approx(math.sqrt(2) / 3, rel=1e-12)
    assert cv([5.0, 5.0, 5.0]) == 0.0
    assert cv([7.0]) == 0.0
    assert cv([1.0, 2.0, 3.0]) == pytest.approx(statistics.stdev([1, 2, 3]) / 2, rel=1e-12)
    assert cv([10.0, 20.0, 30.0]) == pytest.approx(cv([1.0, 2.0, 3.0]), rel=1e-12)  # scale-free


@pytest.mark.parametrize("factor,duplex", [(1.05, True), (1.3, True), (1.9, False), (2.1, False)])
def test_fit_link_tells_a_shared_channel_from_a_duplex_link(factor, duplex):
    samples = link_samples()
    samples[-1] = replace(samples[-1], both_ways_s=(statistics.median(samples[-1].one_way_s) * factor,) * 3)
    link, _ = fit_link(samples)
    assert link["duplex"] is duplex


def test_fit_link_without_exchange_says_nothing_of_duplex():
    link, _ = fit_link(link_samples())
    assert "duplex" not in link and parse_profile_link(link).duplex is True


def parse_profile_link(link: dict) -> Link:
    data = {"schema": "pipesim-profile", "version": 1, "name": "x", "compute": {},
            "links": {"intra_node": link}}
    return parse_profile(data).intra_node


# --- the workflow, with the ranks' results typed ------------------------------------


def microbench_result() -> MicrobenchResult:
    """Two ranks on one host: exact compute laws (I and W each half of B), an affine
    optimizer, and link samples from rank 0 (the left one of the only pair)."""
    compute = [replace(s, input_s=tuple(t / 2 for t in s.backward_s),
                       weight_s=tuple(t / 2 for t in s.backward_s), saved_bytes_per_sample_per_layer=4.0 * s.width)
               for s in compute_samples(repeats=2)]
    optimizer = tuple(OptimizerSample(p, (1e-4 + 3e-9 * p,) * 2) for p in (10**4, 10**5, 10**6))
    ranks = (RankSamples(0, "h", "h", tuple(compute), optimizer, tuple(link_samples(repeats=2))),
             RankSamples(1, "h", "h", tuple(replace(s, rank=1) for s in compute), optimizer, ()))
    return MicrobenchResult(ranks, "Open MPI v5", "2.13.0")


def test_profile_from_typed_samples_that_crossed_as_json():
    raw = from_dict(MicrobenchResult, json.loads(json.dumps(to_dict(microbench_result()))))
    assert raw == microbench_result()
    settings = CalibrationSettings(widths=WIDTHS, microbatch_sizes=MB_SIZES, message_sizes=tuple(SIZES))
    data = build_profile(settings, "typed", raw, [1e-5, 2e-5, 4e-5])
    profile = parse_profile(data)
    assert data["action_overhead_s"] == 2e-5
    assert data["metadata"]["processors"] == ["h", "h"] and data["metadata"]["mpi"] == "Open MPI v5"
    assert profile.intra_node.latency_s == pytest.approx(LATENCY, rel=0.01)
    fit = data["samples"]["affine_fit"]["forward"]
    assert fit["s_per_flop"] == pytest.approx(FORWARD["s_per_flop"], rel=1e-6)
    assert data["samples"]["saved_bytes_per_sample_per_layer"] == sorted(4 * w for w in WIDTHS)
    assert data["samples"]["links"][0] == {"pair": [0, 1], "bytes": 1, "median_s": one_way(1)}
    assert len(data["samples"]["compute"]) == 2 * len(WIDTHS) * len(MB_SIZES)  # per rank


def test_calibrate_on_a_rank_other_than_0_takes_part_and_returns_none(monkeypatch):
    """Started by mpiexec (`mpiexec -n 2 pipesim calibrate`), rank 1 gets no result from
    either job; it used to index into that None and crash."""
    from pipesim.runner import launch as launch_module
    from pipesim.runner import results as results_module

    jobs = []
    monkeypatch.setattr(launch_module, "launch", lambda config, result_type, *_, **__: jobs.append(config))
    monkeypatch.setattr(results_module, "measure", lambda plan, log, **_: jobs.append(plan))
    settings = CalibrationSettings(widths=(16,), repeats=2)
    assert calibrate(settings, "x", log=lambda _: None) is None
    assert jobs[0] == settings.microbench() and jobs[1].num_stages == settings.ranks  # both jobs ran here
