"""Run bad inputs through a pipesim binary; classify each outcome (issue 10).

    python reports/bad-inputs/repro.py PATH/TO/pipesim > out/bad-inputs.txt

Recorded with a core-only install (`pip install -c constraints.txt -e .`, no torch), so that
run/calibrate/validate stop at their checks: before.txt on the code before issue 10 (bfb6767),
final.txt after it. The files this script names lie beside it.
"""
import os
import subprocess
import sys
from pathlib import Path

BIN = sys.argv[1]
R = str(Path(__file__).resolve().parent)
REPO = str(Path(__file__).resolve().parents[2])
CASES = [
 # silently accepted
 "optimize --link 1-2:nanBps", "predict --link 2-3:nanBps", f"predict --profile {R}/nanbw.json --json",
 f"predict --profile {R}/nanlat.json --json", f"predict --profile {R}/nanover.json --json",
 f"predict --profile {R}/nantable.json --json", f"predict --profile {R}/infover.json",
 "predict --rank-speed 3:1e-320", "predict --link 2-3:1e-320Bps", "predict --ranks-per-node -1",
 "sweep --jobs 0 --stages 1,2 --microbatches 1 --quiet", "optimize --max-simulations -5", "predict --link 0-3:1e9Bps",
 "run --stages 0", "sweep --microbatches 3 --quiet", "predict --rank-speed 1:inf", "predict --link 0-1:infs",
 f"predict --profile {R}/zero.json", "predict --ranks-per-node 100", "predict --stages 4 --link 0-2:1e9Bps",
 "predict --layers 32 --stages 4 --batch-size 4 --microbatches 8", "calibrate --ranks 0",
 "predict --model models/fc32.toml --layers 0",
 # tracebacks
 "predict --trace /nonexistent/x.json", "predict --gantt /proc/x.png", f"predict --gantt {R}/out.txt",
 "optimize --plots /proc/x", "report --out /proc/x --sweep-stages 1 --sweep-microbatches 1",
 f"sweep --plots {R}/bin.toml --stages 1 --microbatches 1 --quiet",
 f"predict --model {R}/bin.toml", f"predict --model {R}/latin.toml", f"predict --model {R}/adir",
 f"predict --profile {R}/bin.json", f"predict --profile {R}/adir", "predict --ranks-per-node 0",
 "sweep --jobs -1 --stages 1 --microbatches 1,2 --quiet", "predict --layers 2000 --width 8 --stages 1500 --microbatches 1 --batch-size 1",
 f"validate --grid {R}/bin.toml", f"validate --grid {R}/adir",
 # hangs
 "predict --layers 100000000 --stages 2", "predict --layers 100000 --stages 50000",
 "predict --microbatches 10000000 --batch-size 10000000", f"predict --model {R}/bigrepeat.toml",
 f"predict --model {R}/biglayers.toml", "optimize --layers 5000 --stages 100",
 "sweep --layers 4000 --stages 1000,2000 --microbatches 1000 --quiet", f"predict --model {R}/bigwidth.toml",
 "predict --width 100000000000",
 # misleading
 "predict --partition 8,-8,16,16", f"predict --model {R}/name5.toml", "calibrate", "validate",
 "run", f"predict --gantt {R}/out",
]
for case in CASES:
    try:
        p = subprocess.run([BIN, *case.split()], capture_output=True, text=True, timeout=int(os.environ.get("T", "20")), cwd=REPO)
        err = p.stderr.strip().splitlines()
        tb = any("Traceback" in l for l in err)
        kind = "TRACEBACK" if tb else ("OK" if p.returncode == 0 else "ERR")
        last = [l for l in err if l.startswith("pipesim:") or "Error" in l][-1:] or err[-1:]
        out = p.stdout
        nan = ("nan" in out.lower() or "inf " in out.lower() or "NaN" in out)
        print(f"{kind:9} rc={p.returncode} lines={len(err)} {'NAN/INF ' if nan else ''}| {case} | {last[0][:150] if last else ''}")
    except subprocess.TimeoutExpired:
        print(f"HANG      | {case}")
