"""An action right after its rank waited for a message costs the profile's cold start more
(profile.ColdStart): closed forms on both engine paths, the profile field and the fit."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pipesim.costs import ProfileCostModel
from pipesim.engine import simulate
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import ColdStart, Link, ProfileError, constant_profile, parse_profile
from pipesim.schedule import build_schedule
from pipesim.timeline import compute_metrics

U = 1e-3  # one layer's forward for one sample; backward 2U
MODEL = fc(4, 16)  # 4 layers of 16 x 16 + 16 parameters: 1088 bytes each
PIECE_BYTES = 2 * (16 * 16 + 16) * 4
COLD = ColdStart((PIECE_BYTES,), (3e-4,), (5e-4,))


def step(schedule, m, cold, path="auto", latency=0.0):
    profile = replace(constant_profile(U, 2 * U, latency), cold_start=cold)
    if latency:
        profile = replace(profile, intra_node=Link(latency), inter_node=Link(latency))
    return simulate(build_schedule(schedule, 2, m), Partition.from_counts([2, 2]), MODEL,
                    ProfileCostModel(profile), 1, path=path)


def spans(timeline):
    return {(s.rank, s.kind, s.microbatch): s for s in timeline.spans if s.kind in ("F", "B")}


@pytest.mark.parametrize("path", ["fast", "des"])
def test_only_actions_that_waited_pay_the_cold_start(path):
    """GPipe, 2 ranks, 2 micro-batches. Rank 1's first F waits for its activation and pays
    0.3 ms; its second activation arrives (2f + latency) before that F ends, so the second F
    does not wait. Rank 0's first B waits for its gradient and pays 0.5 ms; its second B and
    rank 1's Bs do not wait."""
    got = spans(step("gpipe", 2, COLD, path, latency=1e-4))
    f, b, lat = 2 * U, 4 * U, 1e-4
    assert got[1, "F", 0].start_s == pytest.approx(f + lat)
    assert got[1, "F", 0].duration_s == pytest.approx(f + 3e-4)
    assert got[1, "F", 1].duration_s == pytest.approx(f)
    assert got[1, "B", 1].duration_s == pytest.approx(b)  # right after its own F: no message
    assert got[1, "B", 0].duration_s == pytest.approx(b)
    waited = [s for s in got.values() if s.rank == 0 and s.kind == "B"]
    first, second = sorted(waited, key=lambda s: s.start_s)
    assert first.duration_s == pytest.approx(b + 5e-4)
    assert second.duration_s == pytest.approx(b)  # its gradient was there when its first B ended
    assert all(s.duration_s == pytest.approx(f) for s in got.values() if s.rank == 0 and s.kind == "F")


def test_both_paths_agree_and_without_it_nothing_changes():
    for schedule, m in (("gpipe", 4), ("1f1b", 5), ("1f1b", 1)):
        fast, des = step(schedule, m, COLD, "fast", 1e-4), step(schedule, m, COLD, "des", 1e-4)
        assert compute_metrics(fast).iteration_time_s == pytest.approx(compute_metrics(des).iteration_time_s)
        plain = step(schedule, m, None, "auto", 1e-4)
        assert compute_metrics(fast).iteration_time_s > compute_metrics(plain).iteration_time_s


def test_cold_start_by_bytes():
    cold = ColdStart((1 << 20, 1 << 24), (1e-5, 2e-4), (2e-5, 4e-4))
    assert cold.seconds(False, 0) == 0.0
    assert cold.seconds(False, 1 << 19) == pytest.approx(5e-6)  # from (0, 0) to the first size
    assert cold.seconds(True, 1 << 24) == pytest.approx(4e-4)
    assert cold.seconds(True, 1 << 25) == pytest.approx(8e-4)  # the largest size's seconds per byte


def test_profile_field():
    base = {"schema": "pipesim-profile", "name": "x",
            "compute": {"*": {"forward": {"s_per_sample": 1e-6}, "backward": {"s_per_sample": 1e-6}}},
            "links": {"intra_node": {}}}
    table = {"width": 512, "microbatch_size": 32, "stack_bytes": [1 << 20, 1 << 24],
             "forward_s": [0.0, 1e-4], "backward_s": [1e-5, 2e-4]}
    assert parse_profile({**base, "version": 5, "cold_start": table}).cold_start == \
        ColdStart((1 << 20, 1 << 24), (0.0, 1e-4), (1e-5, 2e-4))
    with pytest.raises(ProfileError, match="cold_start needs version 5"):
        parse_profile({**base, "version": 4, "cold_start": table})
    for bad in ({"stack_bytes": [1 << 24, 1 << 20]}, {"forward_s": [1e-4]}, {"stack_bytes": []},
                {"backward_s": [1e-5, -1.0]}):
        with pytest.raises(ProfileError, match="cold_start"):
            parse_profile({**base, "version": 5, "cold_start": {**table, **bad}})


def test_fit_takes_each_ranks_own_difference_and_a_running_maximum():
    from pipesim.calibrate import fit_cold_start
    from pipesim.runner.records import ColdSample

    def sample(rank, nbytes, warm, cold):
        return ColdSample(rank, 512, 32, 1, nbytes, (warm,) * 3, (2 * warm,) * 3, (cold,) * 3, (2 * cold,) * 3)

    samples = [sample(0, 1000, 1.0, 1.1), sample(1, 1000, 2.0, 2.1),  # rank 1 slower: still +0.1
               sample(0, 4000, 1.0, 1.05), sample(1, 4000, 1.0, 1.05),  # less than the smaller stack's
               sample(0, 9000, 1.0, 0.9), sample(1, 9000, 1.0, 1.5)]
    fitted = fit_cold_start(samples)
    assert fitted["stack_bytes"] == [1000, 4000, 9000]
    assert fitted["forward_s"] == pytest.approx([0.1, 0.1, 0.2])
    assert fitted["backward_s"] == pytest.approx([0.2, 0.2, 0.4])
    assert fit_cold_start([]) is None


def test_a_replica_sees_the_cold_start_and_the_rendezvous_of_its_global_ranks():
    from pipesim.dataparallel import ReplicaCosts
    from pipesim.schedule import Kind

    profile = replace(constant_profile(U, 2 * U, 1e-5), cold_start=COLD,
                      intra_node=Link(1e-5, 1e9, True, 64), inter_node=Link(1e-5, 1e9, True, 64))
    base = ProfileCostModel(profile, rank_speed=((3, 2.0),))
    replica = ReplicaCosts(base, (2, 3))
    layers = MODEL.layers[:2]
    assert replica.cold_start_s(layers, Kind.B, rank=1) == pytest.approx(base.cold_start_s(layers, Kind.B, rank=3))
    assert replica.cold_start_s(layers, Kind.B, rank=1) == pytest.approx(5e-4 / 2)  # rank 3 runs twice as fast
    assert replica.handshake_s(0, 1, 64) == 1e-5 and replica.handshake_s(0, 1, 63) is None
    assert replica.mpi_window_s == base.mpi_window_s
