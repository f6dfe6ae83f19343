"""Every action kind fed to every dispatcher over kinds: a kind nobody handles
reaches ``assert_never`` (an AssertionError) and fails here, never silently."""

from __future__ import annotations

import pytest

from pipesim import engine, lowering, schedule, torchcsv
from pipesim.costs import ProfileCostModel
from pipesim.model import fc
from pipesim.partition import Partition
from pipesim.profile import constant_profile
from pipesim.schedule import Action, Kind, MessageKey

SHAPE = engine.stage_shapes(fc(2, 8), Partition.from_counts([1, 1]))[0]
COSTS = ProfileCostModel(constant_profile(1.0, 2.0, input_s_per_sample=1.0, weight_s_per_sample=1.0))
LOWERED = lowering.lower(schedule.build_schedule("1f1b", 2, 1))


def action(kind: Kind) -> Action:
    return Action(0, kind, 0, Kind.F if kind in (Kind.SEND, Kind.RECV) else None, 1, 0)


DISPATCHERS = {
    "schedule.is_compute": lambda k: schedule.is_compute(k),
    "schedule.needs_input": lambda k: schedule.needs_input(action(k), 2),
    "schedule.makes_output": lambda k: schedule.makes_output(action(k), 2),
    "schedule.local_prerequisites": lambda k: schedule.local_prerequisites(action(k)),
    "LoweredSchedule.key": lambda k: LOWERED.key(action(k)),
    "engine.role": lambda k: engine.role(k),
    "engine.ledger_change": lambda k: engine.ledger_change(k, SHAPE),
    "engine.message_bytes_per_sample": lambda k: engine.message_bytes_per_sample(MessageKey(0, k, 0), [SHAPE]),
    "ProfileCostModel.law": lambda k: COSTS.law("fc", k),
    "torchcsv.torch_token": lambda k: torchcsv.torch_token(action(k)),
}


def _runner_handler():
    pytest.importorskip("mpi4py")
    from pipesim.runner.interpreter import handler

    return handler


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("name", [*DISPATCHERS, "runner.handler"])
def test_every_kind_reaches_a_decision(name, kind):
    dispatch = DISPATCHERS.get(name) or _runner_handler()
    try:
        dispatch(kind)
    except AssertionError:  # assert_never: nobody handles this kind
        raise
    except (ValueError, TypeError):  # a deliberate refusal ("not compute", "not a message")
        pass


def test_a_kind_nobody_handles_fails_loudly():
    """The mechanism the test above relies on: an unknown value reaches assert_never."""
    with pytest.raises(AssertionError):
        engine.role("REDUCE_SCATTER")
