"""The program every MPI rank runs: ``python -m pipesim.runner.worker JOB.json``.

A job file names the job (``run``: the pipeline; ``calibrate``: the
micro-benchmarks), its config, and where rank 0 writes the gathered result. An exception on any rank prints that rank's traceback and aborts
the whole MPI job, so nothing hangs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import sys
import traceback

from .config import RunConfig


def _local_rank() -> int:
    """This rank's index on its node, as the MPI launcher or Slurm tells it."""
    for name in ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def clock_offsets(comm, clock, rounds: int = 20) -> list[float]:
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


def execute_run(config_dict: dict, comm) -> dict | None:
    """Run the configured steps on this rank; rank 0 returns everything gathered."""
    import torch

    from .interpreter import StageWorker, clock

    config = RunConfig.from_dict(config_dict)
    torch.set_num_threads(config.threads_per_rank)
    plan = config.plan()
    if comm.Get_size() != plan.num_stages:
        raise RuntimeError(f"the MPI world has {comm.Get_size()} ranks; the plan needs {plan.num_stages}")
    device = config.device
    if device == "cuda":
        device = f"cuda:{_local_rank() % torch.cuda.device_count()}"
    worker = StageWorker(plan, comm, config.optimizer, config.seed, device)
    if comm.Get_rank() == config.fail_on_rank:
        raise RuntimeError(f"injected fault on rank {config.fail_on_rank} (fail_on_rank)")
    total = config.warmup + config.iterations
    records = []
    for iteration in range(total):
        record = worker.step(iteration)
        if iteration >= config.warmup:
            records.append(record)
        done = iteration + 1
        if config.progress and comm.Get_rank() == 0 and (done == config.warmup or done % 10 == 0 or done == total):
            print(f"  step {done}/{total} ({config.warmup} warm-up)", file=sys.stderr, flush=True)
    mine = {
        "rank": comm.Get_rank(),
        "host": socket.gethostname(),
        "device": device,
        "static_bytes": worker.static_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "records": [vars(r) for r in records],
    }
    offsets = clock_offsets(comm, clock)
    everyone = comm.gather(mine, root=0)
    params = comm.gather(worker.parameters(), root=0) if config.params_path else None
    if comm.Get_rank() != 0:
        return None
    if params is not None:
        import numpy as np

        np.savez(config.params_path, **{k: v for part in params for k, v in part.items()})
    for entry in everyone:
        entry["clock_offset_s"] = offsets[entry["rank"]]
    return {"ranks": everyone, "mpi": mpi_version()}


def execute_runs(config_dict: dict, comm) -> dict | None:
    """Several runs in one MPI job (tests batch their configurations so): each runs
    on the first P ranks of the world, the others wait. Rank 0 returns every result."""
    from mpi4py import MPI

    results = []
    for run in config_dict["runs"]:
        ranks = RunConfig.from_dict(run).plan().num_stages
        sub = comm.Split(0 if comm.Get_rank() < ranks else MPI.UNDEFINED, comm.Get_rank())
        result = None
        if sub != MPI.COMM_NULL:
            result = execute_run(run, sub)
            sub.Free()
        results.append(result)
        comm.Barrier()
    return {"runs": results} if comm.Get_rank() == 0 else None


def mpi_version() -> str:
    from mpi4py import MPI

    return MPI.Get_library_version().split(",")[0].strip()


def execute_calibrate(config_dict: dict, comm) -> dict | None:
    from .microbench import execute

    return execute(config_dict, comm)


JOBS = {"run": execute_run, "runs": execute_runs, "calibrate": execute_calibrate}


def main(argv: list[str]) -> int:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    try:
        with open(argv[0]) as handle:
            job = json.load(handle)
        result = JOBS[job["job"]](job["config"], comm)
        if result is not None:
            with open(job["result_path"], "w") as handle:
                json.dump(result, handle)
    except BaseException:  # noqa: BLE001 - any failure must end the whole job
        lines = traceback.format_exc().rstrip().splitlines()
        print("\n".join(f"[rank {comm.Get_rank()}] {line}" for line in lines), file=sys.stderr, flush=True)
        comm.Abort(1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
