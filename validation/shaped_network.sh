#!/usr/bin/env bash
# Run a command over a real, slower network: a private network namespace whose
# loopback is shaped with tc (tbf), and Open MPI forced onto TCP over it.
# See --help.
set -euo pipefail

PROG=$(basename "$0")

usage() {
    cat <<EOF
Usage: $PROG [options] RATE -- COMMAND [ARG...]

Run COMMAND in a fresh network namespace whose loopback is shaped to RATE with
tc's token bucket filter (tbf), with Open MPI forced onto its TCP transport
over that loopback, so every MPI message between the ranks pays for RATE.

  RATE        a tc rate: 800mbit, 1gbit, 400mbit, ... (SI units: 800mbit =
              800e6 bit/s = 100e6 B/s). Careful: in tc, "mbps" means
              megaBYTES per second, and a bare number means bit/s.

Options:
  --mtu BYTES     the loopback's MTU (default: 9000, jumbo frames; Linux's own
                  65536 forces a bucket so large that messages up to ~100 KiB
                  pass unshaped; 1500 costs the 2 cores too much CPU)
  --burst BYTES   tbf bucket size (default: max(2 MTUs, 100 us at RATE)); it
                  must hold a whole packet, and the larger it is, the more of
                  a message sent after a pause passes faster than RATE
  --limit BYTES   tbf queue size (default: max(8 MiB, 50 ms at RATE)); large
                  enough that TCP is throttled by the rate, not by drops
  --name NAME     namespace name (default: pipesim-PID)
  -h, --help      this text

Example:
  $PROG 800mbit -- pipesim calibrate --out calibration/shaped-100MBps.json

What it sets for COMMAND (Open MPI 4/5 read MCA parameters from these):
  OMPI_MCA_pml=ob1                    no UCX/libfabric: use the BTLs
  OMPI_MCA_btl=tcp,self               no shared memory between the ranks
  OMPI_MCA_btl_tcp_if_include=lo      TCP over the (shaped) loopback
  OMPI_MCA_oob_tcp_if_include=lo, PRTE_MCA_oob_tcp_if_include=lo
                                      the launcher's own traffic, too

Notes:
  * The namespace has only its loopback: COMMAND cannot reach the network.
  * Both directions of the loopback share the one qdisc: RATE is the total of
    all traffic at once (a half-duplex link), not RATE each way. Ping-pong
    (pipesim calibrate) is unaffected; a pipeline sending activations one way
    while gradients go the other shares RATE between them.
  * The namespace is deleted on exit, on error and on Ctrl-C. The exit status
    is COMMAND's (or 2 for bad usage, 3 for a missing requirement).
  * Needs root (ip netns, tc) and iproute2: apt-get install iproute2
EOF
}

die() { echo "$PROG: $1" >&2; exit "${2:-2}"; }

# --- arguments ---------------------------------------------------------------
burst="" limit="" mtu=9000 name="pipesim-$$" rate=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --burst) [[ $# -ge 2 ]] || die "--burst needs a value"; burst=$2; shift 2 ;;
        --mtu) [[ $# -ge 2 ]] || die "--mtu needs a value"; mtu=$2; shift 2 ;;
        --limit) [[ $# -ge 2 ]] || die "--limit needs a value"; limit=$2; shift 2 ;;
        --name) [[ $# -ge 2 ]] || die "--name needs a value"; name=$2; shift 2 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) [[ -z "$rate" ]] || die "expected -- after RATE (see --help)"; rate=$1; shift ;;
    esac
done
[[ -n "$rate" ]] || { usage >&2; exit 2; }
[[ $# -gt 0 ]] || die "no COMMAND after -- (see --help)"
for v in "$burst" "$limit" "$mtu"; do
    [[ -z "$v" || "$v" =~ ^[0-9]+$ ]] || die "--mtu, --burst and --limit take a number of bytes, not '$v'"
done
[[ $mtu -ge 1280 && $mtu -le 65536 ]] || die "--mtu must be between 1280 and 65536"
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || die "bad namespace name '$name'"

# RATE in bytes per second, as tc reads it (tc(8), "RATES").
rate_Bps=$(awk -v r="$rate" 'BEGIN {
    if (!match(r, /^[0-9]+(\.[0-9]+)?/)) exit 1
    n = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    split("bit:1 kbit:1e3 mbit:1e6 gbit:1e9 tbit:1e12 kibit:1024 mibit:1048576 gibit:1073741824 tibit:1099511627776", a, " ")
    for (i in a) { split(a[i], kv, ":"); bits[kv[1]] = kv[2] }
    split("bps:1 kbps:1e3 mbps:1e6 gbps:1e9 tbps:1e12 kibps:1024 mibps:1048576 gibps:1073741824 tibps:1099511627776", b, " ")
    for (i in b) { split(b[i], kv, ":"); bytes[kv[1]] = kv[2] }
    if (u == "") v = n / 8
    else if (u in bits) v = n * bits[u] / 8
    else if (u in bytes) v = n * bytes[u]
    else exit 1
    if (v <= 0) exit 1
    printf "%.0f", v }') || die "cannot read RATE '$rate' (examples: 800mbit, 1gbit, 50mbps = 50 MB/s)"

# --- requirements ------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces and tc); try: sudo $0 ..." 3
for tool in ip tc; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found: apt-get install iproute2" 3
done

# Defaults. A token bucket lets a message that fits in it pass at once, so the
# bucket is kept small: 2 packets (tc rounds it down a little; a packet larger
# than the bucket would be dropped), or 100 us of traffic at high rates. The
# queue holds ~50 ms, more than TCP keeps queued (no drops, so no retransmits).
[[ -n "$burst" ]] || burst=$(awk -v r="$rate_Bps" -v m="$mtu" 'BEGIN { b = r / 10000; if (b < 2 * (m + 14)) b = 2 * (m + 14); printf "%.0f", b }')
[[ -n "$limit" ]] || limit=$(awk -v r="$rate_Bps" 'BEGIN { l = r / 20; if (l < 8388608) l = 8388608; printf "%.0f", l }')

# --- the namespace -----------------------------------------------------------
created=0
cleanup() {
    local status=$?
    trap - EXIT INT TERM HUP
    if [[ $created -eq 1 ]]; then
        echo "$PROG: qdisc on exit:" >&2
        ip netns exec "$name" tc -s qdisc show dev lo 2>/dev/null | sed 's/^/    /' >&2 || true
        # Anything COMMAND left running in the namespace would keep it alive.
        pids=$(ip netns pids "$name" 2>/dev/null || true)
        if [[ -n "$pids" ]]; then
            echo "$PROG: killing processes left in $name: $pids" >&2
            kill $pids 2>/dev/null || true
            sleep 1
            kill -9 $pids 2>/dev/null || true
        fi
        if ip netns delete "$name"; then
            echo "$PROG: deleted network namespace $name" >&2
        else
            echo "$PROG: could not delete network namespace $name: run 'ip netns delete $name'" >&2
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
# Before COMMAND starts, a signal just ends the script (and cleanup runs);
# while it runs, the signal is noted and handled below, next to COMMAND.
child="" signalled="" signals=0
on_signal() {
    [[ -n "$child" ]] || exit $((128 + $2))
    signalled=$1 signals=$((signals + 1))
}
trap 'on_signal INT 2' INT
trap 'on_signal TERM 15' TERM
trap 'on_signal HUP 1' HUP

if ip netns list | awk '{print $1}' | grep -qxF -- "$name"; then
    die "network namespace $name already exists (pick another with --name)" 3
fi
ip netns add "$name" || die "could not create network namespace $name" 3
created=1
ip netns exec "$name" ip link set lo mtu "$mtu" up
ip netns exec "$name" tc qdisc add dev lo root tbf rate "$rate" burst "$burst" limit "$limit" \
    || die "tc could not shape lo with tbf rate $rate burst $burst limit $limit" 3

echo "$PROG: network namespace $name, loopback up with mtu $mtu, shaped with:" >&2
echo "    tc qdisc add dev lo root tbf rate $rate burst $burst limit $limit  ($rate_Bps B/s)" >&2
ip netns exec "$name" tc qdisc show dev lo | sed 's/^/    /' >&2

export OMPI_MCA_pml=ob1
export OMPI_MCA_btl=tcp,self
export OMPI_MCA_btl_tcp_if_include=lo
export OMPI_MCA_oob_tcp_if_include=lo
export PRTE_MCA_oob_tcp_if_include=lo
echo "$PROG: Open MPI: OMPI_MCA_pml=ob1 OMPI_MCA_btl=tcp,self OMPI_MCA_btl_tcp_if_include=lo" \
     "OMPI_MCA_oob_tcp_if_include=lo PRTE_MCA_oob_tcp_if_include=lo" >&2
echo "$PROG: running in $name: $*" >&2

# Not exec: this script must outlive COMMAND to delete the namespace. COMMAND
# runs in the background (with default signal handling) and we wait for it, so
# that a signal reaches us at once. Ctrl-C at a terminal reaches COMMAND too:
# we give it a few seconds to stop by itself (pipesim stops its mpiexec);
# a signal sent to this script alone is forwarded as SIGTERM; a second one
# kills COMMAND. Whatever is left in the namespace is killed by cleanup.
( trap - INT QUIT TERM HUP; exec ip netns exec "$name" "$@" ) &
child=$!
status=0 handled=0
while :; do
    status=0
    wait "$child" || status=$?
    kill -0 "$child" 2>/dev/null || break  # COMMAND has ended: $status is its own
    # wait was interrupted by a signal, COMMAND still runs
    while [[ $handled -lt $signals ]]; do
        handled=$((handled + 1))
        if [[ $handled -ge 2 ]]; then
            echo "$PROG: $signalled again: killing COMMAND" >&2
            kill -KILL "$child" 2>/dev/null || true
        elif [[ $signalled == INT ]]; then
            echo "$PROG: interrupted: waiting up to 5 s for COMMAND to stop" >&2
            for _ in $(seq 50); do kill -0 "$child" 2>/dev/null || break; sleep 0.1; done
            kill -TERM "$child" 2>/dev/null || true
        else
            echo "$PROG: got SIG$signalled: stopping COMMAND" >&2
            kill -TERM "$child" 2>/dev/null || true
        fi
    done
done
echo "$PROG: command exited with status $status" >&2
exit "$status"
