#!/usr/bin/env bash
# Evidence that the README's test command passes on this machine, N times in a row:
# each run is a fresh clone of HEAD running `bash .ci/run` (the README command verbatim),
# started on a quiet machine. Prints one line per run: exit code, wall time, pytest's
# closing line, and the accuracy lines the suite measured.
# Usage: benchmarks/ci_repeat.sh [N=5] [LOG_DIR=out/ci-repeat]
set -uo pipefail
runs=${1:-5}
logs=$(realpath -m "${2:-out/ci-repeat}")
repo=$(git rev-parse --show-toplevel)
mkdir -p "$logs"
wait_quiet="$repo/../shared/tools/wait-quiet"
for i in $(seq 1 "$runs"); do
  clone=$(mktemp -d /tmp/pipesim-ci-XXXX)
  git clone -q "$repo" "$clone"
  [ -x "$wait_quiet" ] && "$wait_quiet" 600 >/dev/null
  start=$(date +%s)
  (cd "$clone" && CI=true bash .ci/run) >"$logs/run-$i.log" 2>&1 </dev/null
  code=$?
  wall=$(( $(date +%s) - start ))
  closing=$(grep -E '^[0-9]+ (passed|failed)' "$logs/run-$i.log" | tail -1)
  echo "run $i: exit $code, ${wall} s wall (install included); $closing"
  grep -E "^(quick grid|calibration here|fault|  fc)" "$logs/run-$i.log" | sed 's/^/    /'
  rm -rf "$clone"
done
