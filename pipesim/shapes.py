"""With N ranks, how many stages, how many replicas, how many micro-batches?

``search_shapes`` tries every P x D = N, every micro-batch count m that divides
each replica's B/D samples, every schedule and chunk count given: each shape is
first predicted with the balanced cut (the contiguous cut minimising the slowest
piece, exact dynamic programming), then the best few shapes (``refine``) get
optimize's full partition search (branch and bound on the simulator). The answer
says why the best wins: its bubble, its exposed all-reduce and its memory,
against the best shape of every other stage count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UserError
from .model import ModelSpec

REFINE = 3  # shapes that get the full partition search


@dataclass(frozen=True)
class Shape:
    num_stages: int
    data_parallel: int
    num_microbatches: int
    schedule: str
    num_chunks: int | None = None

    def describe(self) -> str:
        chunks = f" x {self.num_chunks} chunks" if self.num_chunks and self.num_chunks > 1 else ""
        return (f"P={self.num_stages}{chunks} x D={self.data_parallel}, m={self.num_microbatches}, "
                f"{self.schedule}")


@dataclass(frozen=True)
class ShapeResult:
    shape: Shape
    prediction: Any = None  # predict.Prediction; None when skipped
    skipped: str = ""
    fits: bool = True
    optimized: bool = False  # the partition came from optimize's search (else the balanced cut)

    @property
    def time_s(self) -> float:
        return self.prediction.metrics.iteration_time_s if self.prediction is not None else float("inf")


@dataclass(frozen=True)
class ShapeSearch:
    ranks: int
    batch_size: int
    memory_cap_bytes: int | None
    results: tuple[ShapeResult, ...]  # every shape tried, fastest fitting first

    @property
    def best(self) -> ShapeResult:
        return self.results[0]

    def best_per_stage_count(self) -> dict[int, ShapeResult]:
        out: dict[int, ShapeResult] = {}
        for r in self.results:
            if r.prediction is not None and r.fits and r.shape.num_stages not in out:
                out[r.shape.num_stages] = r
        return dict(sorted(out.items()))


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def shapes_for(ranks: int, batch_size: int, num_layers: int, schedules: tuple[str, ...],
               chunks: tuple[int | None, ...]) -> tuple[list[Shape], list[str]]:
    """Every shape, and notes on what cannot exist (more pieces than layers, B/D not whole)."""
    from .builders import DEFAULT_CHUNKS

    out, notes = [], []
    for p in divisors(ranks):
        d = ranks // p
        if batch_size % d:
            notes.append(f"D={d}: --batch-size {batch_size} does not split into {d} replicas")
            continue
        for name in schedules:
            for v in chunks:
                if p * (v or DEFAULT_CHUNKS.get(name, 1)) > num_layers:
                    notes.append(f"P={p}, {name}: more pieces than the {num_layers} layers")
                    continue
                out += [Shape(p, d, m, name, v) for m in divisors(batch_size // d)]
    return out, notes


def search_shapes(model: ModelSpec, costs, profile_name: str, ranks: int, batch_size: int,
                  schedules: tuple[str, ...], chunks: tuple[int | None, ...], memory_cap_bytes: int | None,
                  placement: str = "stage-major", refine: int = REFINE, max_simulations: int = 40) -> ShapeSearch:
    shapes, _ = shapes_for(ranks, batch_size, model.num_layers, schedules, chunks)
    if not shapes:
        raise UserError(f"no shape of {ranks} ranks exists for {model.num_layers} layers and batch {batch_size}")
    results = [_balanced(model, costs, profile_name, s, batch_size, memory_cap_bytes, placement) for s in shapes]
    results.sort(key=_rank)
    refined = [_optimized(model, costs, profile_name, r, batch_size, memory_cap_bytes, placement,
                          max_simulations) for r in results[:refine]]
    results = sorted(refined + results[refine:], key=_rank)
    return ShapeSearch(ranks, batch_size, memory_cap_bytes, tuple(results))


def _rank(r: ShapeResult) -> tuple:
    return (r.prediction is None, not r.fits, r.time_s)


def _balanced(model, costs, profile_name, shape: Shape, batch: int, cap: int | None, placement: str) -> ShapeResult:
    from .dataparallel import Layout, replica_costs
    from .plan import make_plan
    from .predict import predict

    try:
        layout = Layout(shape.num_stages, shape.data_parallel, placement, getattr(costs, "ranks_per_node", None))
        plan = make_plan(model, shape.num_stages, shape.num_microbatches, batch, shape.schedule, "balanced",
                         replica_costs(costs, layout), shape.num_chunks, shape.data_parallel, placement)
        prediction = predict(plan, costs, profile_name)
    except UserError as exc:
        return ShapeResult(shape, skipped=str(exc))
    return ShapeResult(shape, prediction, fits=cap is None or prediction.metrics.peak_memory_bytes <= cap)


def _optimized(model, costs, profile_name, result: ShapeResult, batch: int, cap: int | None, placement: str,
               max_simulations: int) -> ShapeResult:
    from .optimize import Problem, optimize

    if result.prediction is None:
        return result
    s = result.shape
    try:
        problem = Problem(model, s.schedule, s.num_stages, s.num_microbatches, batch, costs, cap, profile_name,
                          s.num_chunks, s.data_parallel, placement)
        best = optimize(problem, max_simulations=max_simulations, max_expansions=2_000).best
    except UserError:
        return result
    if best.metrics.iteration_time_s >= result.time_s and result.fits:
        return result
    return ShapeResult(s, best, fits=True, optimized=True)
