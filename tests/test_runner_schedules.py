"""The runner with every schedule: several pieces per rank, I and W apart, messages from
the lowered schedule. Pipeline training equals single-process training (rtol 1e-5) for
every schedule x uneven partitions x P in {1, 2, 4} x the chunk counts each takes; all
configurations run in one MPI job of 4 ranks (each on the first P ranks), so the
suite stays fast."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the runner extra is not installed")

import itertools

import reference_training

from pipesim.model import ModelSpec, fc_layer
from pipesim.plan import make_plan
from pipesim.runner.config import RunBatch, RunConfig
from pipesim.runner.launch import launch
from pipesim.runner.records import RunBatchResult

STEPS, BATCH, SEED = 3, 8, 5

CASES = [  # (schedule, ranks, chunks, micro-batches, partition of P x V pieces, optimizer)
    ("gpipe", 1, 1, 2, "12", "sgd"),
    ("interleaved-1f1b", 1, 2, 2, "5,7", "sgd"),
    ("zb-h1", 1, 1, 4, "12", "adam"),
    ("zb-v", 1, 2, 2, "7,5", "sgd"),
    ("dualpipev", 1, 2, 2, "4,8", "sgd"),
    ("gpipe", 2, 1, 4, "3,9", "sgd"),
    ("1f1b", 2, 1, 4, "8,4", "adam"),
    ("interleaved-1f1b", 2, 2, 4, "2,4,3,3", "sgd"),
    ("interleaved-1f1b", 2, 3, 2, "1,2,3,2,2,2", "sgd"),
    ("zb-h1", 2, 1, 4, "5,7", "sgd"),
    ("zb-h1", 2, 2, 4, "3,1,4,4", "adam"),
    ("zb-v", 2, 2, 4, "1,5,4,2", "sgd"),
    ("zb-v", 2, 2, 8, "3,3,3,3", "adam"),
    ("dualpipev", 2, 2, 4, "2,3,3,4", "sgd"),
    ("gpipe", 4, 1, 4, "1,5,3,3", "sgd"),
    ("1f1b", 4, 1, 8, "3,1,2,6", "sgd"),
    ("interleaved-1f1b", 4, 2, 4, "1,2,1,2,1,2,1,2", "sgd"),
    ("zb-h1", 4, 1, 4, "2,4,3,3", "sgd"),
    ("zb-v", 4, 2, 8, "2,1,1,2,2,1,1,2", "sgd"),
    ("dualpipev", 4, 2, 8, "1,1,2,2,1,1,2,2", "adam"),
]


def model12() -> ModelSpec:
    widths = [12, 16, 16, 8, 24, 12, 12, 20, 6, 10, 14, 8, 9]
    return ModelSpec("uneven12", tuple(fc_layer(a, b) for a, b in itertools.pairwise(widths)))


def reference_parameters(model: ModelSpec, steps: int, optimizer: str) -> dict[str, np.ndarray]:
    return reference_training.reference_parameters(model, steps, optimizer, BATCH, SEED)


def plan_of(case):
    name, ranks, chunks, microbatches, partition, _ = case
    return make_plan(model12(), ranks, microbatches, BATCH, name, partition, num_chunks=chunks)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case in one MPI job of 4 ranks; parameters saved per case."""
    out = tmp_path_factory.mktemp("runs")
    configs = [RunConfig.from_plan(plan_of(case), iterations=STEPS, warmup=0, seed=SEED, optimizer=case[5],
                                   params_path=str(out / f"{i}.npz"), progress=False)
               for i, case in enumerate(CASES)]
    gathered = launch(RunBatch(tuple(configs)), RunBatchResult, 4, log=lambda _: None)
    assert gathered is not None and len(gathered.runs) == len(CASES)
    return out, gathered.runs


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-p{c[1]}-v{c[2]}-m{c[3]}-{c[4]}"
                                                            for c in CASES])
def test_pipeline_training_equals_single_process(results, index):
    out, _runs = results
    got = dict(np.load(out / f"{index}.npz"))
    want = reference_parameters(model12(), STEPS, CASES[index][5])
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    untrained = reference_parameters(model12(), 0, CASES[index][5])
    assert any(not np.allclose(untrained[n], want[n]) for n in want)  # training moved them


def test_each_rank_ran_its_lowered_actions_in_order(results):
    from pipesim.runner.results import from_result

    _, runs = results
    for case, result in zip(CASES, runs):
        plan = plan_of(case)
        timeline = from_result(plan, result).representative
        for rank, actions in enumerate(plan.schedule.ranks):
            ran = [s.name for s in sorted(timeline.rank_spans(rank, ("F", "B", "I", "W")), key=lambda s: s.start_s)]
            assert ran == [str(a) for a in actions], case
            assert [s for s in timeline.memory if s.rank == rank][-1].activation_bytes == 0, case
