"""`optimize --recompute`: the partition search with activation recomputation fixed or chosen.

With ``auto`` every option (no recomputation, every piece recomputed and, on up to
MAX_SINGLE_PIECES pieces, each piece alone) gets its own branch and bound
(optimize.optimize, whose tables cost a recomputed piece as the engine does), and the
fastest plan that fits the memory cap wins; a tie goes to fewer recomputed pieces,
so without a cap no recomputation is chosen (it only adds time). The chosen Optimum
says which option won and why (``Optimum.recompute_reason``) and what each option
gave (``Optimum.recompute_tried``).
"""

from __future__ import annotations

from dataclasses import replace

from .formats.text import fmt_s
from .optimize import InfeasibleError, Optimum, Problem, format_bytes, optimize
from .plan import recompute_pieces

MAX_SINGLE_PIECES = 4  # auto also tries each piece alone up to this many pieces


def recompute_label(pieces: tuple[int, ...], num_pieces: int) -> str:
    if not pieces:
        return "none"
    return "all" if len(pieces) == num_pieces else ",".join(map(str, pieces))


def options(num_pieces: int) -> list[tuple[int, ...]]:
    """What ``auto`` tries: none, all, and each piece alone (up to MAX_SINGLE_PIECES pieces)."""
    tried = [(), tuple(range(num_pieces))]
    if 1 < num_pieces <= MAX_SINGLE_PIECES:
        tried += [(piece,) for piece in range(num_pieces)]
    return tried


def optimize_recompute(problem: Problem, recompute: str, max_simulations: int) -> Optimum:
    """optimize(problem) with `recompute` ("auto", "none", "all" or pieces like "0,2")."""
    p = problem.num_pieces
    if recompute.strip() != "auto":
        pieces = recompute_pieces(recompute, p)
        optimum = optimize(replace(problem, recompute=pieces), max_simulations=max_simulations)
        return replace(optimum, recompute_reason=f"recompute {recompute_label(pieces, p)}: as given (--recompute)")
    found: list[Optimum] = []
    tried: list[dict] = []
    infeasible: dict[tuple[int, ...], InfeasibleError] = {}
    for pieces in options(p):
        label = recompute_label(pieces, p)
        try:
            optimum = optimize(replace(problem, recompute=pieces), max_simulations=max_simulations)
        except InfeasibleError as exc:
            infeasible[pieces] = exc
            tried.append({"recompute": label, "fits": False, "min_cap_bytes": exc.min_cap_bytes})
            continue
        found.append(optimum)
        tried.append({"recompute": label, "fits": True, "iteration_time_s": optimum.best.metrics.iteration_time_s,
                      "peak_memory_bytes": optimum.best.metrics.peak_memory_bytes})
    if not found:
        raise _none_fits(problem, infeasible)
    best = min(found, key=lambda o: (o.best.metrics.iteration_time_s, len(o.problem.recompute)))
    reason = _reason(best, found, infeasible, len(tried))
    return replace(best, recompute_reason=reason, recompute_tried=tuple(tried))


def _none_fits(problem: Problem, infeasible: dict[tuple[int, ...], InfeasibleError]) -> InfeasibleError:
    pieces, exc = min(infeasible.items(), key=lambda item: item[1].min_cap_bytes)
    cap = problem.memory_cap_bytes or 0
    label = recompute_label(pieces, problem.num_pieces)
    return InfeasibleError(
        f"no partition of {problem.describe()} fits --memory-cap {format_bytes(cap)} ({cap} bytes), with or "
        f"without recomputation; recompute {label} needs at least {format_bytes(exc.min_cap_bytes)} "
        f"(--memory-cap {exc.min_cap_bytes} --recompute {label}, partition {exc.partition})",
        exc.min_cap_bytes, exc.partition)


def _reason(best: Optimum, found: list[Optimum], infeasible: dict, count: int) -> str:
    problem = best.problem
    label = recompute_label(problem.recompute, problem.num_pieces)
    peak = best.best.metrics.peak_memory_bytes
    cap = problem.memory_cap_bytes
    if not problem.recompute:
        if cap is None:
            return "recompute none: no memory cap, and recomputation only adds time"
        return (f"recompute none: fits {format_bytes(cap)} (peak {format_bytes(peak)}), "
                f"the fastest of {count} options tried")
    head = f"recompute {label}: fits {format_bytes(cap or 0)} (peak {format_bytes(peak)})"
    if () in infeasible:
        return f"{head}; without it the best partition needs {format_bytes(infeasible[()].min_cap_bytes)}"
    plain = next(o for o in found if not o.problem.recompute)
    return (f"{head}; without it the best partition that fits takes "
            f"{fmt_s(plain.best.metrics.iteration_time_s)}, not {fmt_s(best.best.metrics.iteration_time_s)}")
