"""Partition descriptions: which layers each stage owns.

Three ways to say it:
  * layer counts per stage, ``8,8,8,8``;
  * inclusive layer ranges, ``0-9,10-15,16-23,24-31`` (a lone number is one layer);
  * ``balanced``: the contiguous cut that minimises the slowest stage's cost,
    found exactly by dynamic programming over cut points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import UserError


class PartitionError(UserError):
    """A partition that cannot be used; the message is one line for the user."""


@dataclass(frozen=True)
class Partition:
    bounds: tuple[tuple[int, int], ...]  # per stage: (first_layer, last_layer), inclusive

    @property
    def num_stages(self) -> int:
        return len(self.bounds)

    @property
    def counts(self) -> tuple[int, ...]:
        return tuple(last - first + 1 for first, last in self.bounds)

    def layers(self, stage: int) -> range:
        first, last = self.bounds[stage]
        return range(first, last + 1)

    def __str__(self) -> str:
        return ",".join(map(str, self.counts))

    @classmethod
    def from_counts(cls, counts: Sequence[int]) -> Partition:
        bounds, first = [], 0
        for count in counts:
            bounds.append((first, first + count - 1))
            first += count
        return cls(tuple(bounds))


def _int(token: str, text: str) -> int:
    try:
        return int(token)
    except ValueError:
        raise PartitionError(
            f"bad partition {text!r}: {token!r} is not a number "
            "(allowed: counts like 8,8,8,8, ranges like 0-9,10-31, or 'balanced')"
        ) from None


def _check_stage_count(found: int, num_layers: int, num_stages: int | None, text: str) -> None:
    if num_stages is not None and found != num_stages:
        raise PartitionError(f"partition {text!r} has {found} pieces but needs {num_stages} "
                             "(--stages x --chunks)")
    if found > num_layers:
        raise PartitionError(f"partition {text!r} has {found} pieces for only {num_layers} layers")


def _from_count_text(tokens: list[str], text: str, num_layers: int) -> Partition:
    counts = [_int(t, text) for t in tokens]
    if any(c < 1 for c in counts):
        raise PartitionError(f"partition {text!r}: every stage needs at least one layer")
    if sum(counts) != num_layers:
        raise PartitionError(
            f"partition {text!r}: counts sum to {sum(counts)}, the model has {num_layers} layers"
        )
    return Partition.from_counts(counts)


def _from_range_text(tokens: list[str], text: str, num_layers: int) -> Partition:
    bounds = []
    for token in tokens:
        first_text, _, last_text = token.partition("-")
        first = _int(first_text, text)
        last = _int(last_text, text) if last_text else first
        if last < first:
            raise PartitionError(f"partition {text!r}: range {token!r} is empty (last < first)")
        bounds.append((first, last))
    expected = 0
    for first, last in bounds:
        if first != expected:
            problem = "overlaps the previous range" if first < expected else f"skips layer {expected}"
            raise PartitionError(
                f"partition {text!r}: range {first}-{last} {problem}; "
                f"ranges must cover layers 0-{num_layers - 1} in order"
            )
        expected = last + 1
    if expected != num_layers:
        raise PartitionError(
            f"partition {text!r}: ranges end at layer {expected - 1}, the model's last layer is {num_layers - 1}"
        )
    return Partition(tuple(bounds))


def parse_partition(
    text: str,
    num_layers: int,
    num_stages: int | None = None,
    layer_costs: Sequence[float] | None = None,
    stage_layer_costs: Sequence[Sequence[float]] | None = None,
) -> Partition:
    """Parse a partition description. ``balanced`` needs ``num_stages`` (and uses
    ``stage_layer_costs`` per stage, or ``layer_costs`` for every stage, default:
    all layers cost the same)."""
    text = text.strip()
    if text == "balanced":
        if num_stages is None:
            raise PartitionError("partition 'balanced' needs a stage count")
        if stage_layer_costs is not None:
            check_stage_count(num_layers, num_stages)
            return balanced_per_stage(stage_layer_costs[:num_stages])
        costs = layer_costs if layer_costs is not None else [1.0] * num_layers
        return balanced(costs, num_stages)
    tokens = [t.strip() for t in text.split(",")]
    if not text or any(not t for t in tokens):
        raise PartitionError(f"bad partition {text!r}: empty stage (allowed: 8,8,8,8 or 0-9,10-31)")
    _check_stage_count(len(tokens), num_layers, num_stages, text)
    negative = [t for t in tokens if t.startswith("-")]
    if negative:
        raise PartitionError(f"partition {text!r}: {negative[0]!r} is negative; every stage needs at "
                             "least one layer (allowed: counts like 8,8,8,8 or ranges like 0-9,10-31)")
    if any("-" in t for t in tokens):
        return _from_range_text(tokens, text, num_layers)
    return _from_count_text(tokens, text, num_layers)


def balanced(layer_costs: Sequence[float], num_stages: int) -> Partition:
    """The contiguous partition minimising the most expensive stage (exact DP).

    Among cuts with the same slowest stage, the one found first wins: the
    smallest first stage whose remaining stages do as well.
    """
    prefix = [0.0]
    for cost in layer_costs:
        prefix.append(prefix[-1] + cost)
    return min_max_partition(len(layer_costs), num_stages,
                             lambda stage, first, last: prefix[last + 1] - prefix[first],
                             stage_band=lambda stage, firsts, width: _range_sums(prefix, firsts, width))


def balanced_per_stage(stage_layer_costs: Sequence[Sequence[float]]) -> Partition:
    """Like `balanced`, but stage s's layers cost ``stage_layer_costs[s]`` (a
    slower rank makes its layers dearer): minimises the slowest stage exactly."""
    prefixes = []
    for costs in stage_layer_costs:
        prefix = [0.0]
        for cost in costs:
            prefix.append(prefix[-1] + cost)
        prefixes.append(prefix)
    return min_max_partition(len(stage_layer_costs[0]), len(stage_layer_costs),
                             lambda stage, first, last: prefixes[stage][last + 1] - prefixes[stage][first],
                             stage_band=lambda stage, firsts, width: _range_sums(prefixes[stage], firsts, width))


def _range_sums(prefix: Sequence[float], firsts, width: int):
    """[row, k] -> prefix[first + k + 1] - prefix[first] (inf past the last layer)."""
    import numpy as np

    values = np.asarray(prefix, dtype=float)
    lasts = firsts[:, None] + np.arange(width)[None, :]
    sums = values[np.minimum(lasts, len(values) - 2) + 1] - values[firsts][:, None]
    return np.where(lasts < len(values) - 1, sums, np.inf)


def check_stage_count(num_layers: int, num_stages: int) -> None:
    if num_stages < 1:
        raise PartitionError(f"--stages must be >= 1, got {num_stages}")
    if num_stages > num_layers:
        raise PartitionError(f"cannot cut {num_layers} layers into {num_stages} pieces "
                             f"(--stages x --chunks; at most {num_layers})")


def min_max_partition(
    num_layers: int, num_stages: int, stage_cost: Callable[[int, int, int], float],
    stage_band: Callable | None = None,
) -> Partition:
    """The contiguous partition minimising max over stages of
    ``stage_cost(stage, first_layer, last_layer)`` (exact DP over cut points).

    Ties go to the smallest first stage whose remaining stages do as well.
    ``stage_band(stage, firsts, width)``: the same costs as a numpy array, row i for first
    layer firsts[i], column k for last layer firsts[i] + k (inf past the model's end); the
    programme then runs a stage at a time in numpy (1,024 layers on 64 stages: a second
    instead of minutes), with the same answer.
    """
    check_stage_count(num_layers, num_stages)
    n, p = num_layers, num_stages
    if stage_band is not None:
        return _min_max_vectorised(n, p, stage_cost, stage_band)
    # Bottom-up over stages (no recursion: thousands of stages are fine). `tail[start]` is the
    # cheapest max-stage-cost of layers start..n-1 in the stages after this one.
    tail = {start: stage_cost(p - 1, start, n - 1) for start in range(p - 1, n)}
    choices: list[dict[int, int]] = [{} for _ in range(p - 1)]
    for stage in range(p - 2, -1, -1):
        here: dict[int, float] = {}
        for start in ([0] if stage == 0 else range(stage, n - (p - stage) + 1)):
            best_cost, best_count = math.inf, 1
            for count in range(1, n - start - (p - stage) + 2):
                cost = max(stage_cost(stage, start, start + count - 1), tail[start + count])
                if cost < best_cost:  # ties: the smallest count found first wins
                    best_cost, best_count = cost, count
            here[start], choices[stage][start] = best_cost, best_count
        tail = here
    counts, start = [], 0
    for stage in range(p - 1):
        counts.append(choices[stage][start])
        start += counts[-1]
    return Partition.from_counts([*counts, n - start])


def _min_max_vectorised(n: int, p: int, stage_cost, stage_band) -> Partition:
    """min_max_partition's programme, one stage (and block of rows) per numpy step: for each
    first layer, the count minimising max(this stage, the best of the rest); argmin keeps the
    first (smallest) of equal counts, as the loop does."""
    import numpy as np

    width = n - p + 1  # the most layers a stage can hold
    tail = np.full(n + 1, np.inf)  # best max-cost of layers start.. in the stages after this one
    if p == 1:
        return Partition.from_counts([n])
    tail[p - 1 : n] = [stage_cost(p - 1, start, n - 1) for start in range(p - 1, n)]
    choices: list = [None] * (p - 1)
    for stage in range(p - 2, -1, -1):
        here, chosen = np.full(n + 1, np.inf), np.zeros(n + 1, dtype=np.int64)
        firsts_all = np.array([0]) if stage == 0 else np.arange(stage, n - (p - stage) + 1)
        step = max(1, (1 << 20) // width)
        for i in range(0, len(firsts_all), step):
            firsts = firsts_all[i : i + step]
            lasts = firsts[:, None] + np.arange(width)[None, :]
            room = lasts <= n - (p - stage)  # leave a layer for each later stage
            with np.errstate(invalid="ignore"):
                values = np.maximum(stage_band(stage, firsts, width), tail[np.minimum(lasts, n - 1) + 1])
            values = np.where(room, values, np.inf)
            best = values.argmin(axis=1)
            chosen[firsts], here[firsts] = best + 1, values[np.arange(len(firsts)), best]
        choices[stage], tail = chosen, here
    counts, start = [], 0
    for stage in range(p - 1):
        counts.append(int(choices[stage][start]))
        start += counts[-1]
    return Partition.from_counts([*counts, n - start])


def even_split(num_layers: int, num_stages: int) -> Partition:
    """Layer counts as equal as possible, the first stages taking one more."""
    check_stage_count(num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    return Partition.from_counts([base + (1 if stage < extra else 0) for stage in range(num_stages)])
