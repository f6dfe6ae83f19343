"""The program every MPI rank runs: ``python -m pipesim.runner.worker JOB.json``.

A job file (runner/config.py) names the job (``run``: the pipeline; ``runs``:
several; ``calibrate``: the micro-benchmarks), its config, and where rank 0
writes the gathered result (runner/records.py). A malformed job file is one
line, ``pipesim: error: ...``, and exit code 2 on every rank. An exception on
any rank prints that rank's traceback and aborts the whole MPI job, so nothing
hangs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, assert_never

from ..errors import UserError
from ..wire import to_dict
from . import allocator
from .config import GlooBenchConfig, JobConfig, MicrobenchConfig, RunBatch, RunConfig, load_job_file
from .records import GlooResult, MicrobenchResult, RankRun, RunBatchResult, RunResult


def _local_rank() -> int:
    """This rank's index on its node, as the MPI launcher or Slurm tells it."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def clock_offsets(comm: Any, clock: Callable[[], float], rounds: int = 20) -> list[float]:
    """Offset of each rank's clock from rank 0's (subtract it to align).

    Ranks on rank 0's host share its monotonic clock (offset 0); others are
    estimated by ping-pong, keeping the round trip with the smallest delay.
    """
    hosts = comm.allgather(socket.gethostname())
    offsets = [0.0] * comm.Get_size()
    for peer in range(1, comm.Get_size()):
        if hosts[peer] == hosts[0]:
            continue
        if comm.Get_rank() == 0:
            best_delay_s = math.inf
            for _ in range(rounds):
                sent = clock()
                remote = comm.sendrecv(None, dest=peer, source=peer)
                back = clock()
                if back - sent < best_delay_s:
                    best_delay_s, offsets[peer] = back - sent, remote - (sent + back) / 2
        elif comm.Get_rank() == peer:
            for _ in range(rounds):
                comm.sendrecv(clock(), dest=0, source=0)
    return comm.bcast(offsets, root=0)


def execute_run(config: RunConfig, comm: Any) -> RunResult | None:
    """Run the configured steps on this rank; rank 0 returns everything gathered."""
    import torch

    from .interpreter import StageWorker, clock

    torch.set_num_threads(config.threads_per_rank)
    plan = config.plan()
    if comm.Get_size() != plan.world_size:
        raise RuntimeError(f"the MPI world has {comm.Get_size()} ranks; the plan needs {plan.world_size}")
    device = config.device
    if device == "cuda":
        device = f"cuda:{_local_rank() % torch.cuda.device_count()}"
    pipeline, sync, replica = comm, None, 0
    if plan.data_parallel > 1:
        from .dataparallel import GradientSync, communicators

        pipeline, group, replica, _ = communicators(comm, plan.layout())
        sync = GradientSync(group, replica, plan.data_parallel)
    worker = StageWorker(plan, pipeline, config.optimizer, config.seed, device, sync, config.eval_mode)
    if comm.Get_rank() == config.fail_on_rank:
        raise RuntimeError(f"injected fault on rank {config.fail_on_rank} (fail_on_rank)")
    total = config.warmup + config.iterations
    records = []
    for iteration in range(total):
        step = worker.step(iteration)
        if iteration >= config.warmup:
            records.append(step.record() if sync is None else _global_record(step.record(), plan, replica))
        done = iteration + 1
        if config.progress and comm.Get_rank() == 0 and (done == config.warmup or done % 10 == 0 or done == total):
            print(f"  step {done}/{total} ({config.warmup} warm-up)", file=sys.stderr, flush=True)
    step_memory = None
    if config.memory_probe:  # after the timed steps: the probe changes glibc's settings
        from .memory_probe import probe_step

        step_memory = probe_step(lambda: worker.step(total), worker.device if worker.cuda else None,
                                 config.profile_memory)
    offsets = clock_offsets(comm, clock)
    mine = RankRun(
        rank=comm.Get_rank(),
        host=socket.gethostname(),
        device=device,
        static_bytes=worker.static_bytes(),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        records=tuple(records),
        clock_offset_s=offsets[comm.Get_rank()],
        step_memory=step_memory,
    )
    everyone: list[RankRun] | None = comm.gather(mine, root=0)
    params = comm.gather(worker.parameters(), root=0) if config.params_path else None
    if everyone is None:  # not rank 0
        return None
    if params is not None:
        import numpy as np

        merged: dict = {}
        for part in params:  # every replica holds the same parameters: check, keep one copy
            for name, value in part.items():
                if name in merged and not np.array_equal(merged[name], value):
                    raise RuntimeError(f"replicas hold different values of parameter {name}")
                merged[name] = value
        np.savez(config.params_path, **merged)
    return RunResult(tuple(sorted(everyone, key=lambda r: r.rank)), mpi_version())


def _global_record(record: Any, plan: Any, replica: int) -> Any:
    from .dataparallel import to_global

    return to_global(record, plan.layout(), replica)


def execute_runs(batch: RunBatch, comm: Any) -> RunBatchResult | None:
    """Several runs in one MPI job: each runs on the first P ranks of the world,
    the others wait. Rank 0 returns every result."""
    from mpi4py import MPI

    results = []
    for run in batch.runs:
        ranks = run.plan().world_size
        sub = comm.Split(0 if comm.Get_rank() < ranks else MPI.UNDEFINED, comm.Get_rank())
        if sub != MPI.COMM_NULL:
            result = execute_run(run, sub)
            sub.Free()
            if result is not None:
                results.append(result)
        comm.Barrier()
    return RunBatchResult(tuple(results)) if comm.Get_rank() == 0 else None


def mpi_version() -> str:
    from mpi4py import MPI

    return MPI.Get_library_version().split(",")[0].strip()


def execute(config: JobConfig, comm: Any) -> RunResult | RunBatchResult | MicrobenchResult | GlooResult | None:
    """Run the job `config` describes on this rank; rank 0 returns the gathered result."""
    allocator.keep_freed_memory()  # calibration and runs alike: freed tensors stay in the heap
    match config:
        case RunConfig():
            return execute_run(config, comm)
        case RunBatch():
            return execute_runs(config, comm)
        case MicrobenchConfig():
            from .microbench import execute as execute_microbench

            return execute_microbench(config, comm)
        case GlooBenchConfig():
            from .gloo import execute as execute_gloo

            return execute_gloo(config, comm)
        case _:
            assert_never(config)


def main(argv: list[str]) -> int:
    try:  # before MPI starts: every rank reads the same file, so every rank fails alike
        job = load_job_file(argv[0])
    except UserError as exc:
        if os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("PMI_RANK", "0")) == "0":
            print(f"pipesim: error: {exc}", file=sys.stderr, flush=True)
        return 2
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        result = execute(job.config, comm)
        if result is not None:
            with open(job.result_path, "w") as handle:
                json.dump(to_dict(result), handle)
    except BaseException:  # noqa: BLE001 - any failure must end the whole job
        lines = traceback.format_exc().rstrip().splitlines()
        print("\n".join(f"[rank {comm.Get_rank()}] {line}" for line in lines), file=sys.stderr, flush=True)
        comm.Abort(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
