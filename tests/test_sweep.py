"""pipesim sweep and pipesim report: grids, parallel runs, the recommendation, figures."""

from __future__ import annotations

import io
import json
import re

import pytest

from pipesim.cli import main
from pipesim.costs import ProfileCostModel
from pipesim.formats.jsondata import sweep_json
from pipesim.model import fc
from pipesim.plan import make_plan
from pipesim.predict import predict
from pipesim.profile import constant_profile
from pipesim.schedule import ScheduleError
from pipesim.sweep import PointResult, ProgressBar, Sweep, SweepPoint, grid, run_sweep

REL = 1e-9
PNG = b"\x89PNG\r\n\x1a\n"
CONSTANT = ProfileCostModel(constant_profile(1e-5, 2e-5))


def small_sweep(jobs=1, cap=None, mode="balanced", costs=CONSTANT):
    points = grid([1, 2, 4, 16], [1, 2, 4], ["gpipe", "1f1b"])
    return run_sweep(fc(8, 32), costs, points, 32, mode, cap, jobs=jobs)


def test_grid_order_and_unknown_schedule():
    points = grid([1, 2], [1, 4], ["gpipe", "1f1b"])
    assert points[:4] == [SweepPoint(1, 1, "gpipe"), SweepPoint(1, 4, "gpipe"), SweepPoint(2, 1, "gpipe"),
                          SweepPoint(2, 4, "gpipe")]
    assert len(points) == 8 and points[4].schedule == "1f1b"
    with pytest.raises(ScheduleError, match="unknown schedule 'zb'"):
        grid([1], [1], ["gpipe", "zb"])


def test_constant_costs_give_the_closed_form_speedup():
    """Balanced stages, free links, no optimizer: speedup = p m / (m + p - 1) exactly."""
    sweep = small_sweep()
    checked = 0
    for r in sweep.results:
        if r.ok:
            assert sweep.speedup(r) == pytest.approx(r.point.closed_form_speedup, rel=REL), r.point
            checked += 1
    assert checked == 18


def test_points_match_predict_and_impossible_points_are_skipped():
    costs = ProfileCostModel(constant_profile(1e-5, 2e-5, latency_s=1e-6, bandwidth_Bps=1e8,
                                              optimizer_s_per_param=1e-9))
    sweep = small_sweep(costs=costs)
    skipped = [r for r in sweep.results if not r.ok]
    assert {r.point.num_stages for r in skipped} == {16}  # 16 stages for 8 layers
    assert all("cannot cut 8 layers into 16 pieces" in r.skipped for r in skipped)
    for r in sweep.results:
        if r.ok:
            plan = make_plan(fc(8, 32), r.point.num_stages, r.point.num_microbatches, 32, r.point.schedule,
                             "balanced", costs)
            expected = predict(plan, costs, "")
            assert r.iteration_time_s == expected.metrics.iteration_time_s
            assert r.peak_memory_bytes == expected.metrics.peak_memory_bytes
            assert r.partition == plan.partition.counts


def test_parallel_processes_give_the_same_results():
    assert small_sweep(jobs=2).results == small_sweep(jobs=1).results


def point(p, m, time_s, peak_bytes, schedule="gpipe"):
    return PointResult(SweepPoint(p, m, schedule), (1,) * p, time_s, 0.0, (peak_bytes,) * p)


def test_recommended_is_the_fastest_point_under_the_cap():
    results = (point(1, 1, 4.0, 100), point(2, 1, 2.0, 300), point(4, 1, 1.0, 900), point(8, 1, 3.0, 50),
               PointResult(SweepPoint(16, 1, "gpipe"), skipped="cannot cut"))
    def recommended(cap):
        best = Sweep("m", 8, 8, "balanced", 4.0, cap, results).recommended()
        return best and best.point.num_stages
    assert recommended(None) == 4
    assert recommended(900) == 4
    assert recommended(899) == 2
    assert recommended(299) == 8
    assert recommended(49) is None


def test_recommended_of_a_real_capped_sweep_fits():
    free = small_sweep()
    peaks = sorted(r.peak_memory_bytes for r in free.results if r.ok)
    cap = peaks[len(peaks) // 2]
    capped = small_sweep(cap=cap)
    best = capped.recommended()
    fitting = [r for r in capped.results if r.ok and r.peak_memory_bytes <= cap]
    assert best.peak_memory_bytes <= cap
    assert best.iteration_time_s == min(r.iteration_time_s for r in fitting)
    assert len(fitting) < sum(r.ok for r in capped.results)


def test_recommended_breaks_ties_towards_fewer_stages():
    results = tuple(point(p, 1, 1.0, 10) for p in (4, 2, 8))
    assert Sweep("m", 8, 8, "balanced", 1.0, None, results).recommended().point.num_stages == 2


def test_optimized_partitions_are_never_slower():
    costs = ProfileCostModel(constant_profile(1e-5, 2e-5, latency_s=1e-5, bandwidth_Bps=1e7,
                                              optimizer_s_per_param=1e-8), rank_speed=((1, 0.5),))
    balanced, optimized = small_sweep(costs=costs), small_sweep(costs=costs, mode="optimized")
    for a, b in zip(balanced.results, optimized.results):
        if a.ok:
            assert b.iteration_time_s <= a.iteration_time_s * (1 + REL)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar():
    quiet = io.StringIO()
    bar = ProgressBar(4, quiet)
    for _ in range(4):
        bar.advance()
    bar.close()
    assert quiet.getvalue().count("\n") == 1 and "4/4 configurations" in quiet.getvalue()
    assert "\r" not in quiet.getvalue()
    live = Terminal()
    bar = ProgressBar(4, live)
    bar.advance()
    assert live.getvalue() == "\r[#######.......................]   1/4 configurations"
    bar.advance()
    bar.close()
    assert live.getvalue().count("\r") == 3 and live.getvalue().endswith(" s\n")


def test_sweep_cli_json_and_plots(capsys, tmp_path):
    code = main(["sweep", "--layers", "8", "--width", "32", "--stages", "1,2,4", "--microbatches", "1,4",
                 "--schedule", "gpipe,1f1b", "--batch-size", "16", "--memory-cap", "1MiB", "--json",
                 "--plots", str(tmp_path), "--jobs", "2"])
    out, err = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert data["memory_cap_bytes"] == 2**20 and len(data["points"]) == 12
    point = data["points"][0]
    for key in ("num_stages", "num_microbatches", "schedule", "iteration_time_s", "speedup",
                "closed_form_speedup", "peak_memory_bytes", "fits_memory_cap", "partition"):
        assert key in point, key
    assert data["recommended"]["iteration_time_s"] == min(
        p["iteration_time_s"] for p in data["points"] if p["fits_memory_cap"])
    assert "12/12 configurations" in err
    for name in ("sweep-fc8x32-speedup.png", "sweep-fc8x32-heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG


def test_sweep_cli_text(capsys):
    code = main(["sweep", "--layers", "4", "--width", "256", "--stages", "1,2,8", "--microbatches", "2",
                 "--batch-size", "8", "--quiet", "--jobs", "1"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "recommended" in out and "skipped: cannot cut 4 layers into 8 pieces" in out


def test_sweep_cli_bad_schedule_exits_2(capsys):
    assert main(["sweep", "--schedule", "gpipe,zb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipesim: error:") and err.count("\n") == 1 and "unknown schedule 'zb'" in err


def test_report_writes_a_page_with_its_figures(capsys, tmp_path):
    code = main(["report", "--layers", "8", "--width", "32", "--stages", "2", "--microbatches", "4",
                 "--batch-size", "16", "--sweep-stages", "1,2", "--sweep-microbatches", "1,4",
                 "--memory-cap", "4MiB", "--rank-speed", "1:0.5", "--jobs", "1", "--out", str(tmp_path)])
    capsys.readouterr()
    assert code == 0
    page = (tmp_path / "report-fc8x32.md").read_text()
    assert "## Best partition" in page and "## Sweep" in page and "Recommended" in page
    assert "rank 1 at 0.5x speed" in page
    figures = [re.fullmatch(r"!\[.*\]\((.+)\)", line)[1] for line in page.splitlines() if line.startswith("![")]
    assert len(figures) == 4
    for name in figures:
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert any(name.startswith("optimize-") for name in figures)
    assert any(name.startswith("sweep-") for name in figures)


def test_sweep_json_of_skipped_points():
    sweep = run_sweep(fc(2, 8), CONSTANT, grid([4], [1], ["1f1b"]), 4, jobs=1)
    assert sweep_json(sweep)["points"][0]["skipped"].startswith("cannot cut")
    assert sweep_json(sweep)["recommended"] is None
