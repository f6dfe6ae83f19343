"""rank 0 times F and B of a 16 MiB fc stack while rank 1 idles (sleeps), busy-polls MPI, loops F or loops B."""
import statistics
import sys
import time

import torch
from mpi4py import MPI

torch.set_num_threads(1)
comm = MPI.COMM_WORLD; rank = comm.Get_rank()
W, L, MB = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
stack = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(W, W), torch.nn.ReLU()) for _ in range(L)])
x = torch.randn(MB, W)
def fwd():
    return stack(x.requires_grad_(True)).sum()
def fb():
    out = fwd(); t0 = time.perf_counter(); out.backward(); return time.perf_counter() - t0
def one_f():
    t0 = time.perf_counter(); out = fwd(); return time.perf_counter() - t0, out
for _ in range(5): fb()
for other in ("sleep", "poll", "F", "B", "FB"):
    comm.Barrier()
    if rank == 0:
        fs, bs = [], []
        end = time.perf_counter() + 1.5
        while time.perf_counter() < end:
            tf, out = one_f(); t0 = time.perf_counter(); out.backward(); bs.append(time.perf_counter() - t0); fs.append(tf)
        comm.send(True, dest=1)
        print(f"W{W} L{L} mb{MB} other={other:5s}: F {statistics.median(fs)*1e3:7.3f} ms  B {statistics.median(bs)*1e3:7.3f} ms  n={len(fs)}", flush=True)
    else:
        req = comm.irecv(source=0)
        if other == "sleep":
            while True:
                done, _ = req.test()
                if done: break
                time.sleep(0.005)
        elif other == "poll":
            req.wait()
        else:
            while True:
                done, _ = req.test()
                if done: break
                if other in ("F", "FB"):
                    out = fwd()
                    if other == "FB": out.backward()
                else:
                    out = fwd(); out.backward()  # B needs an F; counts as mostly B time
