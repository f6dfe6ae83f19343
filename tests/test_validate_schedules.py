"""Validation grids with chunk counts and schedule files (no MPI here)."""

from __future__ import annotations

from pipesim.costs import ProfileCostModel
from pipesim.profile import constant_profile
from pipesim.schedule import build_schedule
from pipesim.torchcsv import to_torch_csv
from pipesim.validate import load_grid, plan_case

COSTS = ProfileCostModel(constant_profile(1e-6, 2e-6, input_s_per_sample=1e-6, weight_s_per_sample=1e-6))


def test_grid_groups_take_chunks(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('name = "g"\n[[groups]]\nlayers = [8]\nwidths = [16]\nbatch_sizes = [16]\nstages = [2]\n'
                    'microbatches = [4]\npartitions = ["balanced"]\nschedules = ["zb-h1"]\nchunks = [1, 2]\n')
    grid = load_grid(path)
    cases = [c for c in grid.cases if not c.is_baseline]
    assert [c.chunks for c in cases] == [1, 2]
    assert cases[1].label.endswith("zb-h1 v2 [balanced]")
    plans = [plan_case(c, COSTS) for c in cases]
    assert [p.partition.num_stages for p in plans] == [2, 4]


def test_the_shipped_schedules_grid_loads_and_plans():
    from pipesim.profile import load_profile

    costs = ProfileCostModel(load_profile())
    grid = load_grid("validation/schedules.toml")
    names = {c.schedule for c in grid.cases}
    assert names >= {"gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v", "dualpipev"}
    for case in grid.cases:
        assert plan_case(case, costs).num_stages == case.stages


def test_grid_cases_read_schedule_files(tmp_path):
    schedule = build_schedule("zb-v", 2, 4)
    (tmp_path / "zbv.csv").write_text(to_torch_csv(schedule))
    (tmp_path / "zbv.txt").write_text(schedule.to_text())
    path = tmp_path / "g.toml"
    path.write_text(f'[[groups]]\nlayers = [8]\nwidths = [16]\nbatch_sizes = [16]\nstages = [2]\n'
                    f'microbatches = [4]\npartitions = ["2,2,2,2"]\n'
                    f'schedules = ["{tmp_path / "zbv.csv"}", "{tmp_path / "zbv.txt"}"]\n')
    for case in [c for c in load_grid(path).cases if not c.is_baseline]:
        plan = plan_case(case, COSTS)
        assert plan.schedule.ranks == schedule.ranks and plan.schedule.placement == "v"
