#!/usr/bin/env bash
# Operator flood (issue 9): the outside review's attack against a fresh fleetd. An operator of
# tenant `acme` fills its audit log, then floods fleetd with requests of `listAuditLog`
# commands, while an honest station connects every 200 ms from 127.0.0.2 and fleetd's RSS is
# sampled. Prints the JSON report of bench/src/bin/operator-flood.rs.
# Usage: bench/operator-flood.sh [operator-flood options, e.g. --seconds 30]   (from anywhere)
#   CONFIG=fleetd.toml   a configuration for fleetd (e.g. to lift the operator budget)
#   FLEETD=path/fleetd   another fleetd binary (e.g. an older commit's); NO_BUILD=1 skips builds
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [ -z "${NO_BUILD:-}" ]; then
    (cd "$ROOT" && cargo build --release -p fleet-controller --bin fleetd) >&2
    (cd "$HERE" && cargo build --release --bin operator-flood) >&2
fi
FLEETD="${FLEETD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/fleetd}"
TOOL="${CARGO_TARGET_DIR:-$HERE/target}/release/operator-flood"

WORK="$(mktemp -d /tmp/fleet-flood.XXXXXX)"
PID=""
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

PORT="$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')"
"$FLEETD" ${CONFIG:+--config "$CONFIG"} --data-dir "$WORK/data" --listen "127.0.0.1:$PORT" \
    >"$WORK/fleetd.out" 2>"$WORK/fleetd.err" &
PID=$!
for _ in $(seq 1 200); do
    grep -q "fleetd listening on" "$WORK/fleetd.out" 2>/dev/null && break
    sleep 0.05
done
grep -q "fleetd listening on" "$WORK/fleetd.out" || { echo "fleetd did not start" >&2; cat "$WORK/fleetd.err" >&2; exit 1; }
"$FLEETD" ${CONFIG:+--config "$CONFIG"} issue-operator attacker --tenant acme --data-dir "$WORK/data" >/dev/null

"$TOOL" --server "127.0.0.1:$PORT" --ca "$WORK/data/ca.pem" \
    --cert "$WORK/data/attacker.pem" --key "$WORK/data/attacker.key" --fleetd-pid "$PID" "$@"
