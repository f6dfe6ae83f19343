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
"""

from __future__ import annotations

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


def ring_edges(ranks: Sequence[int]) -> list[tuple[int, int]]:
    """The ring's edges in the group's order: each rank sends to the next, the last to the first."""
    return [(ranks[i], ranks[(i + 1) % len(ranks)]) for i in range(len(ranks))] if len(ranks) > 1 else []


def ring_link(ranks: Sequence[int], edge_link: Callable[[int, int], Link]) -> Link:
    """The link that paces the ring: the largest latency and the smallest bandwidth of its edges."""
    links = [edge_link(a, b) for a, b in ring_edges(ranks)]
    if not links:
        return Link()
    return Link(max(link.latency_s for link in links), min(link.bandwidth_Bps for link in links))
