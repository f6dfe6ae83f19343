"""MPI's rendezvous without asynchronous progress (a link's ``rendezvous_bytes``): a large
message moves only once the receiver, then the sender, have entered an MPI call after the
handshake's control message reached them. Closed forms on a 2-rank GPipe pipeline."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import Link, ProfileError, constant_profile, parse_profile
from pipesim.schedule import build_schedule
from pipesim.timeline import compute_metrics

U = 1e-3  # one layer's forward for one sample
H = 1e-5  # latency: one control message
NBYTES = 16 * 4  # an activation of fc(12, 16), one sample
BANDWIDTH = NBYTES / (1e-3 - H)  # a message takes T = 1 ms


def step(counts, m, rendezvous_bytes, schedule="gpipe", backward=1e-4, overhead=0.0):
    profile = constant_profile(U, backward, H, BANDWIDTH, action_overhead_s=overhead)
    link = Link(H, BANDWIDTH, True, rendezvous_bytes)
    profile = replace(profile, intra_node=link, inter_node=link)
    return simulate(build_schedule(schedule, 2, m), Partition.from_counts(counts), fc(12, 16),
                    ProfileCostModel(profile), microbatch_size=1)


def activation_sends(timeline):
    return sorted((s for s in timeline.spans if s.kind == "send" and s.rank == 0), key=lambda s: s.microbatch)


def test_a_message_moves_after_the_receivers_then_the_senders_next_mpi_call():
    T = H + NBYTES / BANDWIDTH
    timeline = step([2, 10], 3, rendezvous_bytes=0)
    assert timeline.engine_path == "des"
    a0, a1, a2 = activation_sends(timeline)
    # a0 is sent at 2U; the receiver (idle) replies at once, but the sender is in F1 until 4U
    assert a0.start_s == pytest.approx(4 * U) and a0.end_s == pytest.approx(4 * U + T)
    # a1 is sent at 4U and matched at once; the reply finds the sender in F2 until 6U
    assert a1.start_s == pytest.approx(6 * U)
    # a2 is sent at 6U; the receiver computes its F of micro-batch 0 (10U from a0's arrival)
    # and matches at its end; the sender, idle by then, pushes when the reply arrives
    assert a2.start_s == pytest.approx(4 * U + T + 10 * U + H)
    assert a2.end_s == pytest.approx(a2.start_s + T)


@pytest.mark.parametrize("overhead, moves_at_once", [(0.0, False), (3 * H, True), (H, False)])
def test_a_reply_within_the_next_receives_test_is_taken_at_once(overhead, moves_at_once):
    """1F1B, rank 1: B of micro-batch 0 sends its gradient, then F of micro-batch 1 tests its
    receive first (for the per-action overhead): a reply back within that window (2 control
    messages, the receiver being idle) moves the gradient at once; otherwise at F's end."""
    timeline = step([6, 6], 2, rendezvous_bytes=0, schedule="1f1b", backward=2 * U, overhead=overhead)
    spans = {(s.rank, s.kind, s.microbatch): s for s in timeline.spans}
    grad0, b0, f1 = spans[1, "send", 0], spans[1, "B", 0], spans[1, "F", 1]
    assert f1.start_s == pytest.approx(b0.end_s)  # its activation was there: no wait between
    assert grad0.start_s == pytest.approx(b0.end_s + 2 * H if moves_at_once else f1.end_s)


def test_without_rendezvous_messages_move_when_sent():
    timeline = step([2, 10], 3, rendezvous_bytes=None)
    assert timeline.engine_path == "fast"
    assert [s.start_s for s in activation_sends(timeline)] == pytest.approx([2 * U, 4 * U, 6 * U])


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_messages_below_the_threshold_are_unchanged(schedule):
    eager = step([6, 6], 4, rendezvous_bytes=NBYTES + 1, schedule=schedule)
    plain = step([6, 6], 4, rendezvous_bytes=None, schedule=schedule)
    assert compute_metrics(eager).iteration_time_s == compute_metrics(plain).iteration_time_s


@pytest.mark.parametrize("schedule, m", [("gpipe", 4), ("1f1b", 4), ("1f1b", 7)])
def test_the_handshake_only_delays(schedule, m):
    """Every message starts no earlier than it did without the handshake plus two control
    messages, and the step is no shorter; every rank's actions keep their order."""
    slow = step([5, 7], m, rendezvous_bytes=NBYTES, schedule=schedule)
    fast = step([5, 7], m, rendezvous_bytes=None, schedule=schedule)
    assert compute_metrics(slow).iteration_time_s > compute_metrics(fast).iteration_time_s
    by_key = {(s.rank, s.microbatch, s.direction): s for s in fast.spans if s.kind == "send"}
    for s in slow.spans:
        if s.kind == "send":
            assert s.start_s >= by_key[s.rank, s.microbatch, s.direction].start_s + 2 * H - 1e-12


def test_profile_field_needs_version_4_and_a_byte_count():
    base = {"schema": "pipesim-profile", "name": "x",
            "compute": {"*": {"forward": {"s_per_sample": 1e-6}, "backward": {"s_per_sample": 1e-6}}}}
    link = {"latency_s": 1e-5, "bandwidth_Bps": 1e8, "rendezvous_bytes": 65536}
    loaded = parse_profile({**base, "version": 4, "links": {"intra_node": link}})
    assert loaded.intra_node.rendezvous_bytes == 65536 and loaded.inter_node.rendezvous_bytes == 65536
    assert parse_profile({**base, "version": 3, "links": {"intra_node": {"latency_s": 0}}}).intra_node \
        .rendezvous_bytes is None
    with pytest.raises(ProfileError, match="rendezvous_bytes needs version 4"):
        parse_profile({**base, "version": 3, "links": {"intra_node": link}})
    for bad in (-1, 1.5, True, "64k"):
        with pytest.raises(ProfileError, match="rendezvous_bytes must be a byte count"):
            parse_profile({**base, "version": 4, "links": {"intra_node": {**link, "rendezvous_bytes": bad}}})


def test_a_what_if_link_keeps_the_rendezvous():
    from pipesim.costs import LinkOverride

    link = Link(H, BANDWIDTH, True, 1000)
    assert LinkOverride(bandwidth_Bps=1e6).apply(link) == Link(H, 1e6, True, 1000)
    assert math.isinf(Link().bandwidth_Bps) and not Link().handshake(1 << 30)


def _probe(nbytes, waits):
    from pipesim.runner.records import ProgressSample

    idle = (nbytes / 1e8,) * 3
    return ProgressSample((0, 1), nbytes, 0.01, idle, tuple(t + (0.0099 if waits else 0.0) for t in idle))


@pytest.mark.parametrize("waiting, expected", [
    ({}, None),  # shared memory: nothing waits
    ({65536, 131072, 262144, 524288}, 65536),
    ({1024, 262144, 524288}, 262144),  # a lone small size that waited does not set the threshold
    ({1024, 2048, 4096, 524288, 131072}, 524288),
])
def test_the_threshold_is_where_every_larger_size_waited(waiting, expected):
    from pipesim.calibrate import fit_rendezvous

    sizes = [1 << k for k in range(10, 20)]
    assert fit_rendezvous([_probe(n, n in waiting) for n in sizes]) == expected
