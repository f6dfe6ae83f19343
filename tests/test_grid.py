"""Validation grids as a base execution spec plus axes (grid.py), and the older [[groups]] form."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pipesim.grid import GridError, load_grid

REPO = Path(__file__).resolve().parents[1]

OLD = """
name = "t"
[[groups]]
layers = [8]
widths = [64]
batch_sizes = [32]
stages = [2]
microbatches = [2, 4]
partitions = ["balanced", "2,6"]
schedules = ["1f1b"]
[[groups]]
layers = [8]
widths = [64]
batch_sizes = [32]
stages = [2]
microbatches = [4]
partitions = ["balanced"]
schedules = ["gpipe", "zb-v"]
chunks = [2]
"""

NEW = """
name = "t"
[base.model]
layers = 8
width = 64
[base.execution]
batch_size = 32
stages = 2
schedule = "1f1b"
[[axes]]
microbatches = [2, 4]
partition = ["balanced", "2,6"]
[[axes]]
microbatches = 4
schedule = ["gpipe", "zb-v"]
chunks = [2]
"""


def load(tmp_path, text: str):
    path = tmp_path / "g.toml"
    path.write_text(text)
    return load_grid(path)


def test_base_plus_axes_gives_the_cases_of_the_groups_form(tmp_path):
    new, old = load(tmp_path, NEW), load(tmp_path, OLD)
    assert new.cases == old.cases
    assert len(new.cases) == 1 + 2 * 2 + 2  # the baseline, then each entry's product
    assert new.cases[-1].schedule == "zb-v" and new.cases[-1].chunks == 2


def test_a_base_alone_is_one_case_plus_its_baseline(tmp_path):
    grid = load(tmp_path, "[base.model]\nlayers = 8\nwidth = 16\n[base.execution]\nbatch_size = 16\n")
    assert [(c.stages, c.microbatches) for c in grid.cases] == [(1, 1), (2, 8)]


@pytest.mark.parametrize("text, message", [
    (NEW + "[[groups]]\nlayers = [4]\n", "not both"),
    (NEW.replace("microbatches = 4", "microbatch = 4"), "axes[1]: unknown key 'microbatch'"),
    (NEW.replace("stages = 2", "stages = 2\nbogus = 1"), "[base] [execution]: unknown key 'bogus'"),
    (NEW + "[base.what_ifs]\nranks_per_node = 2\n", "validation grids do not take ranks_per_node"),
    (NEW.replace("[base.model]\nlayers = 8\nwidth = 64", '[base.model]\nfile = "m.toml"'),
     "model file not found"),
    (NEW.replace("stages = 2", "stages = 2\noptimizer = \"adam\""), "measure with sgd"),
    (NEW.replace("microbatches = [2, 4]", "microbatches = [0]"), "microbatches must hold integers in"),
    ("axes = 3\n", "axes must be tables"),
])
def test_bad_base_or_axes_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(GridError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load(tmp_path, text)


@pytest.mark.parametrize("path", sorted((REPO / "validation").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_grid_is_in_the_base_and_axes_form(path):
    data = tomllib.loads(path.read_text())
    assert "groups" not in data and "base" in data and "axes" in data
    assert load_grid(path).cases


def test_a_grid_can_measure_a_model_file(tmp_path):
    """A model file in the base or an axis: its cases plan that model, are named by it,
    get their own one-rank baseline, and ask calibration for its widths."""
    from pipesim.costs import ProfileCostModel
    from pipesim.grid import calibration_cells, load_grid, plan_case
    from pipesim.profile import load_profile

    models = Path(__file__).resolve().parent.parent / "models"
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(
        "[base.model]\nlayers = 8\nwidth = 64\n[base.execution]\nbatch_size = 64\nstages = 2\n"
        "microbatches = 4\n[[axes]]\nschedule = [\"1f1b\"]\n"
        f"[[axes]]\nmodel_file = [\"{models / 'uneven.toml'}\"]\nschedule = [\"gpipe\"]\n")
    grid = load_grid(grid_file)
    labels = [c.label for c in grid.cases]
    assert labels == ["fc8x64 b64 p1 m1 gpipe [8]", "uneven16 b64 p1 m1 gpipe [16]",
                      "fc8x64 b64 p2 m4 1f1b [balanced]", "uneven16 b64 p2 m4 gpipe [balanced]"], labels
    costs = ProfileCostModel(load_profile("default"))
    plan = plan_case(grid.cases[-1], costs)
    assert plan.model.name == "uneven16" and plan.model.num_layers == 16
    assert calibration_cells(grid) == ((64, 256, 1024), (16, 64))


def test_a_data_parallel_axis_makes_replica_cases(tmp_path):
    from pipesim.costs import ProfileCostModel
    from pipesim.grid import plan_case
    from pipesim.profile import constant_profile

    path = tmp_path / "dp.toml"
    path.write_text("[base.model]\nlayers = 4\nwidth = 8\n[base.execution]\nbatch_size = 16\n"
                    "[[axes]]\nstages = [1]\ndata_parallel = [2]\nmicrobatches = [1, 2]\n"
                    "[[axes]]\nstages = [2]\nmicrobatches = [2]\n")
    grid = load_grid(path)
    assert [(c.stages, c.data_parallel, c.microbatches) for c in grid.cases] == \
        [(1, 1, 1), (1, 2, 1), (1, 2, 2), (2, 1, 2)]
    assert "p1 d2 m2" in grid.cases[2].label and grid.cases[0].is_baseline and not grid.cases[1].is_baseline
    plan = plan_case(grid.cases[2], ProfileCostModel(constant_profile(1e-3, 2e-3)))
    assert plan.world_size == 2 and plan.microbatch_size == 4
    path.write_text("[[axes]]\ndata_parallel = [0]\n")
    with pytest.raises(GridError, match="data_parallels must hold integers"):
        load_grid(path)


def test_a_recompute_axis_makes_cases_whose_plans_recompute(tmp_path):
    from pipesim.costs import ProfileCostModel
    from pipesim.grid import plan_case
    from pipesim.profile import constant_profile

    path = tmp_path / "rc.toml"
    path.write_text("[base.model]\nlayers = 4\nwidth = 8\n[base.execution]\nbatch_size = 16\nstages = 2\n"
                    "microbatches = 4\n[[axes]]\nrecompute = [\"none\", \"all\", \"1\"]\n")
    grid = load_grid(path)
    assert [c.recompute for c in grid.cases] == ["none", "none", "all", "1"]  # the baseline first
    assert grid.cases[2].label.endswith("recompute all") and "recompute" not in grid.cases[1].label
    costs = ProfileCostModel(constant_profile(1e-3, 2e-3))
    assert [plan_case(c, costs).recompute for c in grid.cases[1:]] == [(), (0, 1), (1,)]
    path.write_text("[[axes]]\nrecompute = [2]\n")
    with pytest.raises(GridError, match="recomputes must hold strings"):
        load_grid(path)
