#!/usr/bin/env bash
# The cost of a cluster (issue 14's figures), side by side in one run: the same onboarding
# (`fleet-sim load`, N stations and P phones, with a reconnect storm) against
# (a) one fleetd process (the default: redb), then
# (b) deploy/local-cluster.sh's cluster: two edges, two controllers (one serves) on
#     PostgreSQL, three NATS servers; the devices alternate between the edges.
# Each report gives accept -> authorized latencies, the storm rate, and CPU per onboarded
# device: fleetd's for (a), every cluster process's and their total for (b), with each edge's
# CPU per connection. Usage: N=2000 P=200 bench/cluster-load.sh
set -euo pipefail

N="${N:-2000}"
P="${P:-200}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BIN="${BIN:-}"
if [ -z "$BIN" ]; then
    (cd "$ROOT" && cargo build --release --bin fleetd --bin fleetctl --bin fleet-sim)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
export FLEETD="$BIN/fleetd" FLEETCTL="$BIN/fleetctl"
ulimit -n "$(ulimit -Hn)"

WORK="$(mktemp -d /tmp/fleet-cluster-load.XXXXXX)"
chmod 755 "$WORK"
SINGLE_PID=""
cleanup() {
    [ -z "$SINGLE_PID" ] || kill "$SINGLE_PID" 2>/dev/null || true
    "$ROOT/deploy/local-cluster.sh" down "$WORK/cluster" >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The operator's command budget would set the onboarding's pace (as in BENCHMARKS.md's "How").
cat >"$WORK/limits.toml" <<'XEOF'
[limits]
operator_commands_per_second = 100000
operator_command_burst = 100000
XEOF
export EXTRA_CONFIG="$WORK/limits.toml"

echo "== (a) one fleetd process, $N stations + $P phones"
"$FLEETD" --config "$WORK/limits.toml" --data-dir "$WORK/single" --listen 127.0.0.1:0 \
    >"$WORK/single.out" 2>"$WORK/single.log" &
SINGLE_PID=$!
for _ in $(seq 600); do
    grep -q '^fleetd listening on ' "$WORK/single.out" 2>/dev/null && break
    kill -0 "$SINGLE_PID" 2>/dev/null || { cat "$WORK/single.log" >&2; exit 1; }
    sleep 0.1
done
ADDR="$(sed -n 's/^fleetd listening on //p' "$WORK/single.out")"
"$BIN/fleet-sim" load --server "$ADDR" --data-dir "$WORK/single" --stations "$N" --phones "$P" \
    --reconnect --fleetd-pid "$SINGLE_PID" --state-dir "$WORK/devices-a" --json "$WORK/single.json"
kill "$SINGLE_PID"
wait "$SINGLE_PID" 2>/dev/null || true
SINGLE_PID=""

echo "== (b) the cluster: two edges, $N stations + $P phones"
"$ROOT/deploy/local-cluster.sh" up "$WORK/cluster"
"$BIN/fleet-sim" load --cluster "$WORK/cluster/cluster.json" --stations "$N" --phones "$P" \
    --reconnect --state-dir "$WORK/devices-b" --json "$WORK/cluster.json"
echo "reports: $WORK/single.json $WORK/cluster.json (KEEP=1 keeps them)"
