"""Partition descriptions: counts, ranges, balanced, and their errors."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesim.partition import Partition, PartitionError, balanced, parse_partition

# --- counts and ranges --------------------------------------------------------


def test_counts():
    part = parse_partition("8,8,8,8", 32)
    assert part.bounds == ((0, 7), (8, 15), (16, 23), (24, 31))
    assert part.counts == (8, 8, 8, 8)
    assert part.num_stages == 4
    assert list(part.layers(1)) == list(range(8, 16))
    assert str(part) == "8,8,8,8"


def test_uneven_counts_with_spaces_and_stage_count():
    part = parse_partition(" 1, 30 ,1 ", 32, num_stages=3)
    assert part.bounds == ((0, 0), (1, 30), (31, 31))


def test_ranges():
    part = parse_partition("0-9,10-15,16-23,24-31", 32)
    assert part.bounds == ((0, 9), (10, 15), (16, 23), (24, 31))
    assert part.counts == (10, 6, 8, 8)
    assert str(part) == "10,6,8,8"


def test_single_layer_range_token():
    part = parse_partition("0-30,31", 32)
    assert part.bounds == ((0, 30), (31, 31))
    part = parse_partition("0,1-2,3", 4)
    assert part.bounds == ((0, 0), (1, 2), (3, 3))


def test_single_stage():
    assert parse_partition("32", 32).bounds == ((0, 31),)
    assert parse_partition("0-31", 32, num_stages=1).bounds == ((0, 31),)


def test_from_counts():
    assert Partition.from_counts([2, 1, 3]).bounds == ((0, 1), (2, 2), (3, 5))


# --- balanced -----------------------------------------------------------------


def test_balanced_equal_costs():
    assert parse_partition("balanced", 32, num_stages=4).counts == (8, 8, 8, 8)
    assert parse_partition("balanced", 12, num_stages=3).counts == (4, 4, 4)
    assert parse_partition("balanced", 5, num_stages=5).counts == (1, 1, 1, 1, 1)
    assert parse_partition("balanced", 7, num_stages=1).counts == (7,)


def test_balanced_uneven_costs():
    # (2,4): max(6, 4) = 6 beats (1,5): 7 and (3,3): 7
    costs = [3.0, 3.0, 1.0, 1.0, 1.0, 1.0]
    assert balanced(costs, 2).counts == (2, 4)
    assert parse_partition("balanced", 6, num_stages=2, layer_costs=costs).counts == (2, 4)
    # one heavy layer gets a stage of its own
    assert balanced([1.0, 1.0, 10.0, 1.0, 1.0], 3).counts == (2, 1, 2)


def test_balanced_equal_costs_uneven_split_is_optimal():
    part = parse_partition("balanced", 10, num_stages=4)
    assert sum(part.counts) == 10 and part.num_stages == 4
    assert max(part.counts) == 3


def brute_force_bottleneck(costs, stages):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        edges = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in zip(edges, edges[1:]))
        best = worst if best is None else min(best, worst)
    return best


def stage_costs(costs, part):
    return [sum(costs[first : last + 1]) for first, last in part.bounds]


def check_valid(part, n, stages):
    assert part.num_stages == stages
    assert part.bounds[0][0] == 0 and part.bounds[-1][1] == n - 1
    assert all(first <= last for first, last in part.bounds)
    assert all(b[0] == a[1] + 1 for a, b in zip(part.bounds, part.bounds[1:]))


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_balanced_matches_brute_force_integer_costs(data):
    costs = data.draw(st.lists(st.integers(1, 20).map(float), min_size=1, max_size=9))
    stages = data.draw(st.integers(1, len(costs)))
    part = balanced(costs, stages)
    check_valid(part, len(costs), stages)
    assert max(stage_costs(costs, part)) == brute_force_bottleneck(costs, stages)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_balanced_matches_brute_force_float_costs(data):
    costs = data.draw(st.lists(st.floats(0.001, 100.0), min_size=1, max_size=8))
    stages = data.draw(st.integers(1, len(costs)))
    part = balanced(costs, stages)
    check_valid(part, len(costs), stages)
    assert max(stage_costs(costs, part)) == pytest.approx(brute_force_bottleneck(costs, stages), rel=1e-9)


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, num_layers, num_stages, expected",
    [
        ("8,8,8", 32, None, "counts sum to 24, the model has 32 layers"),
        ("8,8,8,9", 32, None, "counts sum to 33"),
        ("8,,8", 16, None, "empty stage"),
        ("8,8,", 16, None, "empty stage"),
        ("", 16, None, "empty stage"),
        ("0,16,16", 32, None, "at least one layer"),
        ("-8,20,20", 32, None, "is negative"),
        ("0-9,5-31", 32, None, "overlaps the previous range"),
        ("0-9,9-31", 32, None, "overlaps the previous range"),
        ("0-9,20-31", 32, None, "skips layer 10"),
        ("1-31", 32, None, "skips layer 0"),
        ("0-9,10-20", 32, None, "ranges end at layer 20, the model's last layer is 31"),
        ("0-9,10-40", 32, None, "ranges end at layer 40"),
        ("0-9,15-10,11-31", 32, None, "is empty (last < first)"),
        ("1,1,1,1", 3, None, "4 pieces for only 3 layers"),
        ("0,1,2,3", 3, None, "4 pieces for only 3 layers"),
        ("a,b", 32, None, "'a' is not a number"),
        ("8.5,23.5", 32, None, "'8.5' is not a number"),
        ("0-x,10-31", 32, None, "'x' is not a number"),
        ("8,8,8,8", 32, 2, "has 4 pieces but needs 2"),
        ("0-15,16-31", 32, 4, "has 2 pieces but needs 4"),
        ("balanced", 32, None, "needs a stage count"),
        ("balanced", 3, 4, "cannot cut 3 layers into 4 pieces"),
        ("balanced", 3, 0, "--stages must be >= 1"),
    ],
)
def test_invalid_partitions(text, num_layers, num_stages, expected):
    with pytest.raises(PartitionError) as info:
        parse_partition(text, num_layers, num_stages)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_cli_bad_partition_is_one_line_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "pipesim", "predict", "--layers", "32", "--partition", "8,8,8"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pipesim: error:")
    assert "counts sum to 24" in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_main_bad_partition_returns_2(capsys):
    from pipesim.cli import main

    assert main(["predict", "--partition", "0-9,5-31"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overlaps" in err


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_vectorised_min_max_programme_gives_the_loops_answer(data):
    """min_max_partition with a stage_band (numpy, a stage at a time) equals the plain loop,
    ties included (equal costs are common: the smallest first stage wins in both)."""
    from pipesim.partition import _range_sums, min_max_partition

    n = data.draw(st.integers(1, 24))
    p = data.draw(st.integers(1, n))
    costs = [data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.1, 3.7]), min_size=n, max_size=n))
             for _ in range(p)]
    prefixes = []
    for row in costs:
        prefix = [0.0]
        for cost in row:
            prefix.append(prefix[-1] + cost)
        prefixes.append(prefix)

    def cost(stage, first, last):
        return prefixes[stage][last + 1] - prefixes[stage][first]

    loop = min_max_partition(n, p, cost)
    vectorised = min_max_partition(n, p, cost, stage_band=lambda s, firsts, w: _range_sums(prefixes[s], firsts, w))
    assert vectorised == loop
