#!/usr/bin/env bash
# 4- and 8-stage validation on the lent 16-core machine (issue 16), as one
# script for the device tool: ranks bound to cores (pipesim adds --bind-to core
# for one-thread ranks that fit), a profile calibrated there with as many busy
# ranks as each grid uses, and the noise floor measured before any error.
# Wheels the machine lacks travel in .whl (see calibration/README.md):
#   device run --carry .whl 'bash validation/device_check.sh [RANKS ...]'   (default: 4 8)
# One pipeline size takes about 8 minutes there (calibration 1.5, validation 6.5).
# Each stage's results are packed into $OUT as soon as it ends, so a run cut
# off by its time limit still returns what it finished.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}
WORK=/tmp/device-work
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/device-check.log") 2>&1
log() { echo "== $(date +%T) $*"; }
log "machine: $(nproc) cores; $(nvidia-smi -L 2>/dev/null | head -1)"
lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L3)" || true
PY=$(command -v python3)
$PY -m pip install -q --no-index --no-deps .whl/*.whl || exit 1
$PY -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
BIN=$(dirname "$PY")
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
log "where 8 one-thread ranks land"
"$BIN/mpiexec" -n 8 --bind-to core --report-bindings true 2>&1 | head -8
steal() { awk '/^cpu /{print $9}' /proc/stat; }
for ranks in ${*:-4 8}; do
  steal0=$(steal)
  log "calibrate --ranks $ranks"
  "$BIN/pipesim" calibrate --ranks "$ranks" --widths 384,512,768 --microbatch-sizes 32,64,128,256,512 \
     --repeats 12 --out "$WORK/device-16core-${ranks}rank.json" 2>&1 | grep -v "^  step"
  log "validate manycore-$ranks"
  "$BIN/pipesim" validate --grid "validation/manycore-$ranks.toml" \
     --profile "$WORK/device-16core-${ranks}rank.json" --tolerance 1 --out "$WORK/reports" 2>&1 | grep -v "^\["
  log "steal time during the $ranks-rank stage: $(( $(steal) - steal0 )) ticks of 1/100 s (all cores)"
  tar -C "$WORK" -czf "$OUT/device-${ranks}rank.tar.gz" "device-16core-${ranks}rank.json" reports
done
log "done"
