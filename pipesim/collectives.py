"""The cost of a collective: the ring all-reduce of data parallelism.

A ring all-reduce of S bytes over D ranks is a reduce-scatter and an all-gather,
each D - 1 steps in which every rank sends S/D bytes to its ring neighbour and
receives as much from the other one. With a latency alpha and a bandwidth beta
per ring edge (the slowest edge sets the pace, every step waits for it) and
gamma seconds per byte for the reduction's additions (reduce-scatter only):

    t = 2 (D - 1) alpha + 2 (D - 1) / D * S / beta + (D - 1) / D * S * gamma

(Thakur, Rabenseifner and Gropp, "Optimization of collective communication
operations in MPICH", 2005; Patarasuk and Yuan 2009). D = 1 costs nothing.

Knows nothing of simpy or torch; the cost model (costs.py) picks alpha and beta
per edge: the profile's measured all-reduce link of that link class when it has
one, else its point-to-point link (what-if overrides apply on top).

One (alpha, beta) misses the sizes it was fitted on where a buffer leaves the cache:
on the 2-core reference VM by 30-44% at 16 and 64 MiB, where the gradients of the
data-parallel grid lie (13.6 and 33.6 MB). So for a ring of the group size and link
class that calibration timed, with no what-if on its edges, the cost model takes the
measured medians themselves (`measured_allreduce_s`), and the law elsewhere.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence

from .profile import Link


def ring_allreduce_s(nbytes: float, group_size: int, link: Link, reduce_s_per_byte: float = 0.0) -> float:
    """The ring law: seconds to all-reduce `nbytes` over `group_size` ranks on `link`."""
    if group_size < 1:
        raise ValueError(f"an all-reduce needs at least one rank, got {group_size}")
    if group_size == 1 or nbytes <= 0:
        return 0.0
    d = group_size
    share = (d - 1) / d * nbytes
    return 2 * (d - 1) * link.latency_s + 2 * share / link.bandwidth_Bps + share * reduce_s_per_byte


def measured_allreduce_s(nbytes: float, sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """An all-reduce of `nbytes` from calibration's medians at `sizes` (ascending): linear
    between two measured sizes, the smallest's time below them (latency-bound), and past the
    largest the last two sizes' slope."""
    if nbytes <= 0:
        return 0.0
    if nbytes <= sizes[0]:
        return float(seconds[0])
    i = min(bisect_left(sizes, nbytes), len(sizes) - 1)
    (s0, s1), (t0, t1) = sizes[i - 1 : i + 1], seconds[i - 1 : i + 1]
    return float(t0 + (t1 - t0) * (nbytes - s0) / (s1 - s0))


def ring_edges(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The ring's edges in the group's order: each rank sends to the next, the last to the first."""
    return [(ranks[i], ranks[(i + 1) % len(ranks)]) for i in range(len(ranks))] if len(ranks) > 1 else []


def ring_link(ranks: Sequence[int], edge_link: Callable[[int, int], Link]) -> Link:
    """The link that paces the ring: the largest latency and the smallest bandwidth of its edges."""
    links = [edge_link(a, b) for a, b in ring_edges(ranks)]
    if not links:
        return Link()
    return Link(max(link.latency_s for link in links), min(link.bandwidth_Bps for link in links))


# --- fitting the law to measured all-reduces (calibration) -------------------------------


def law_coefficients(group_size: int) -> tuple[float, float]:
    """(factor of alpha, factor of S/beta) in the ring law for `group_size` ranks."""
    d = group_size
    return 2.0 * (d - 1), 2.0 * (d - 1) / d


LARGE_BYTES = 1 << 20  # the bandwidth is fitted on messages of at least this size


def fit_allreduce(sizes: Sequence[int], medians_s: Sequence[float], group_size: int) -> Link:
    """alpha and beta of the ring law from median times per size. Like the point-to-point
    fit (calibrate.fit_link): beta from the large messages (>= 1 MiB; least squares on the
    relative error, with an intercept that absorbs a protocol switch), alpha from the
    smallest message; both >= 0. One line through every size would let the many small
    sizes set beta, and the large ones are what gradients are."""
    import numpy as np
    from scipy.optimize import nnls

    if group_size < 2 or len(sizes) < 2:
        raise ValueError("fitting the all-reduce needs a group of >= 2 ranks and >= 2 sizes")
    a_factor, b_factor = law_coefficients(group_size)
    order = np.argsort(sizes)
    size = np.asarray(sizes, dtype=float)[order]
    times = np.asarray(medians_s, dtype=float)[order]
    large = size >= LARGE_BYTES
    if large.sum() < 2:
        large = np.arange(len(size)) >= len(size) - 2
    rows = np.column_stack([np.ones(int(large.sum())), b_factor * size[large]])
    (_, inverse_beta), _ = nnls(rows / times[large, None], np.ones(int(large.sum())))
    beta = 1.0 / inverse_beta if inverse_beta > 0 else float("inf")
    alpha = max(float(times[0]) - b_factor * size[0] / beta, 0.0) / a_factor
    return Link(alpha, beta)


def law_errors(sizes: Sequence[int], medians_s: Sequence[float], group_size: int, link: Link) -> list[float]:
    """Relative error (predicted / measured - 1) of the ring law on `link`, per size."""
    return [ring_allreduce_s(n, group_size, link) / t - 1 for n, t in zip(sizes, medians_s)]


def calibrated_collectives(samples, link_class: str, p2p: dict) -> tuple[dict, dict]:
    """The profile's ``collectives`` table and its ``samples.allreduce`` record from measured
    all-reduces of one group (runner.records.AllreduceSample), of link class `link_class`;
    `p2p`: the fitted point-to-point link of that class, which the record compares with."""
    import statistics

    group = len(samples[0].ranks)
    sizes = [s.bytes for s in samples]
    medians = [statistics.median(s.times_s) for s in samples]
    fitted = fit_allreduce(sizes, medians, group)
    bandwidth = p2p.get("bandwidth_Bps")
    point = Link(p2p.get("latency_s", 0.0), float("inf") if bandwidth is None else bandwidth)
    record = {
        "group_size": group, "link_class": link_class,
        "call": "MPI_Iallreduce + MPI_Wait, in place (runner/collbench.py; profiles before 2026-12-08: MPI_Allreduce)",
        "fit": {"latency_s": fitted.latency_s, "bandwidth_Bps": fitted.bandwidth_Bps},
        "point_to_point": {"latency_s": point.latency_s, "bandwidth_Bps": bandwidth},
        "sizes": [{"bytes": n, "median_s": t, "error_fit": e1, "error_point_to_point": e2}
                  for n, t, e1, e2 in zip(sizes, medians, law_errors(sizes, medians, group, fitted),
                                          law_errors(sizes, medians, group, point))],
    }
    table = {link_class: {"latency_s": fitted.latency_s, "bandwidth_Bps": fitted.bandwidth_Bps
                          if fitted.bandwidth_Bps != float("inf") else None}}
    return table, record
