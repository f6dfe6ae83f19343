"""How much slower W is when it runs later than its own I, as in a zero-bubble pipeline.

fc 512 x 16 layers, micro-batch 64, one thread; run two copies at once (both cores busy, as in
calibration):  python benchmarks/iw_delay_probe.py A & python benchmarks/iw_delay_probe.py B; wait
Prints medians (ms) of: I and W back to back (micro_*), the steady state F(k) I(k) W(k-2) (*_zb),
W delayed by one (W_d1), and 1F1B F/B. Measured 2026-11-28: W 7.3 back to back, 7.9 delayed
by one, 8.1-8.5 delayed by two; I 6.8-6.9 in all. Source of microbench._time_split's pattern.
"""
import statistics as st
import sys
import time

import torch
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

torch.set_num_threads(1)
torch.manual_seed(0)
W, D, MB = 512, 16, 64
stack = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(W, W), torch.nn.ReLU()) for _ in range(D)])
params = list(stack.parameters())
clock = time.perf_counter
def fwd():
    x = torch.randn(MB, W).requires_grad_(True)
    return x, stack(x)
res = {k: [] for k in ["micro_I","micro_W","F_zb","I_zb","W_zb","F_1f1b","B_1f1b","I_d1","W_d1"]}
for rep in range(40):
    # (a) microbench style
    x, out = fwd()
    t0 = clock(); _, g = stage_backward_input([out], [torch.ones_like(out)], [x], stack.parameters()); t1 = clock()
    stage_backward_weight(stack.parameters(), g); t2 = clock()
    res["micro_I"].append(t1-t0); res["micro_W"].append(t2-t1)
    # (b) zero-bubble steady state: F(k), I(k), W(k-2)  (3 in flight)
    pend = []
    for k in range(8):
        t0 = clock(); x, out = fwd(); t1 = clock()
        _, g = stage_backward_input([out], [torch.ones_like(out)], [x], stack.parameters()); t2 = clock()
        res["F_zb"].append(t1-t0); res["I_zb"].append(t2-t1)
        pend.append(g)
        if len(pend) > 2:
            t0 = clock(); stage_backward_weight(stack.parameters(), pend.pop(0)); res["W_zb"].append(clock()-t0)
    for g in pend: stage_backward_weight(stack.parameters(), g)
    # (d) delay 1: F1 I1 F2 I2 W1 W2
    for k in range(4):
        x, out = fwd(); t0=clock(); _, g1 = stage_backward_input([out], [torch.ones_like(out)], [x], stack.parameters()); res["I_d1"].append(clock()-t0)
        x, out = fwd(); _, g2 = stage_backward_input([out], [torch.ones_like(out)], [x], stack.parameters())
        t0=clock(); stage_backward_weight(stack.parameters(), g1); res["W_d1"].append(clock()-t0)
        stage_backward_weight(stack.parameters(), g2)
    # (c) 1f1b steady: F(k) B(k-1)
    saved = []
    for k in range(8):
        t0 = clock(); x, out = fwd(); res["F_1f1b"].append(clock()-t0); saved.append(out)
        if len(saved) > 1:
            o = saved.pop(0); t0 = clock(); o.backward(torch.ones_like(o)); res["B_1f1b"].append(clock()-t0)
    for o in saved: o.backward(torch.ones_like(o))
    for p in params: p.grad = None
print(sys.argv[1], {k: round(st.median(v)*1000, 2) for k, v in res.items()})
