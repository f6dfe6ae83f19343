"""Per compute action of real runs (2 ranks, 20 iterations after 5 warm-up, shipped profile):
its time over the profile's, split by whether the rank waited for a message just before it
(a wait span ending at the action's start). Prints medians; reports/contention.md has a run."""
import statistics as st

from pipesim.costs import ProfileCostModel
from pipesim.engine import compute_s, stage_shapes
from pipesim.model import fc
from pipesim.plan import make_plan
from pipesim.profile import load_profile
from pipesim.runner.results import measure
from pipesim.schedule import Kind

costs = ProfileCostModel(load_profile("calibration/reference-2core.json"))
for layers, width, batch, m, sched in [(16, 640, 200, 5, "1f1b"), (16, 640, 200, 5, "gpipe"),
                                       (12, 448, 252, 7, "1f1b"), (32, 512, 512, 8, "1f1b")]:
    model = fc(layers, width)
    plan = make_plan(model, 2, m, batch, sched, "balanced")
    got = measure(plan, log=lambda _: None, iterations=20, warmup=5, seed=1, optimizer="sgd")
    shapes = stage_shapes(model, plan.partition)
    mbs = batch // m
    ratios = {}
    for tl in got.timelines:
        spans = sorted(tl.spans, key=lambda s: (s.rank, s.start_s))
        waits = {(s.rank, round(s.end_s, 7)) for s in spans if s.kind == "wait"}
        first_done = set()
        for s in spans:
            if s.kind not in ("F", "B"):
                continue
            want = compute_s(costs, shapes[s.stage], Kind[s.kind], mbs, s.rank)
            after = any(abs(s.start_s - e) < 2e-4 for (r, e) in waits if r == s.rank)
            key = (s.kind, "after wait" if after else "back to back")
            ratios.setdefault(key, []).append((s.end_s - s.start_s) / want)
    print(f"fc{layers}x{width} b{batch} p2 m{m} {sched}: " + ", ".join(
        f"{k[0]} {k[1]} {st.median(v):.3f} (n={len(v)})" for k, v in sorted(ratios.items())), flush=True)
