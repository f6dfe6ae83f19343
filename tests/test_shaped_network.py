"""validation/shaped_network.sh: a network namespace with a tc-shaped loopback,
Open MPI forced onto TCP over it, and the namespace gone afterwards.

The real tests need root and iproute2 (`ip`, `tc`; apt-get install iproute2);
the MPI one also needs mpi4py and mpiexec (the runner extra).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "validation" / "shaped_network.sh"

needs_root_and_iproute2 = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("ip") and shutil.which("tc")),
    reason="needs root and iproute2 (ip, tc): apt-get install iproute2",
)


def run_script(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def test_help_explains_usage():
    result = run_script("--help")
    assert result.returncode == 0
    assert "RATE -- COMMAND" in result.stdout and "iproute2" in result.stdout


@pytest.mark.parametrize("args", [(), ("800mbit",), ("800mbit", "--"), ("fast", "--", "true")])
def test_bad_usage_exits_2(args):
    assert run_script(*args).returncode == 2


@needs_root_and_iproute2
def test_command_runs_in_a_shaped_namespace_that_is_removed_afterwards():
    name = f"pipesim-test-{os.getpid()}"
    probe = "tc qdisc show dev lo; ip -o link show lo; echo btl=$OMPI_MCA_btl pml=$OMPI_MCA_pml; exit 7"
    result = run_script("--name", name, "800mbit", "--", "sh", "-c", probe)
    assert result.returncode == 7, result.stderr  # the command's own status
    assert re.search(r"qdisc tbf .* rate 800Mbit", result.stdout), result.stdout
    assert "mtu 9000" in result.stdout and "state UNKNOWN" in result.stdout  # lo is up
    assert "btl=tcp,self pml=ob1" in result.stdout
    assert name not in namespaces()
    assert f"deleted network namespace {name}" in result.stderr


@needs_root_and_iproute2
def test_mpi_messages_cross_the_shaped_loopback():
    pytest.importorskip("mpi4py", reason="the runner extra is not installed")
    mpiexec = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec")
    if not mpiexec:
        pytest.skip("no mpiexec (the runner extra is not installed)")
    pingpong = (
        "import time, numpy as np\n"
        "from mpi4py import MPI\n"
        "comm = MPI.COMM_WORLD; rank = comm.Get_rank(); peer = 1 - rank\n"
        "buf = np.zeros(4 << 20, np.uint8); times = []\n"
        "for _ in range(4):\n"
        "    start = time.perf_counter()\n"
        "    for turn in ((comm.Isend, comm.Irecv) if rank == 0 else (comm.Irecv, comm.Isend)):\n"
        "        turn(buf, peer).Wait()\n"
        "    times.append((time.perf_counter() - start) / 2)\n"
        "if rank == 0:\n"
        "    print('bandwidth_Bps', buf.nbytes / min(times[1:]))\n"
    )
    name = f"pipesim-test-mpi-{os.getpid()}"
    result = run_script("--name", name, "800mbit", "--", mpiexec, "--allow-run-as-root", "-n", "2",
                        sys.executable, "-c", pingpong)
    assert result.returncode == 0, result.stdout + result.stderr
    bandwidth = float(re.search(r"bandwidth_Bps (\S+)", result.stdout).group(1))
    # 800 Mbit/s = 1e8 B/s on the wire; the payload gets a little less (headers).
    assert 0.85e8 < bandwidth < 1.02e8, bandwidth
    sent = int(re.search(r"Sent (\d+) bytes", result.stderr).group(1))  # qdisc stats on exit
    assert sent > 8 * (4 << 20)  # every ping and pong went through the shaper
    assert name not in namespaces()
