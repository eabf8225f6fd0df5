#!/usr/bin/env bash
# Controller failover in a cluster (issue 14's figure): on `deploy/local-cluster.sh`'s cluster,
# K times (default 10): kill -9 the controller that serves, time from the kill to the first
# operator command answered through an edge (`fleetctl stations list`, run again every 20 ms,
# each run waiting 1 s at most), then start the killed one again as the new standby and wait
# until it waits for the lock. Prints each time and p50/p99 (nearest rank).
# Usage: K=10 bench/cluster-failover.sh     (FLEETD/FLEETCTL: default the release build)
set -euo pipefail

K="${K:-10}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
if [ -z "${FLEETD:-}" ]; then
    (cd "$ROOT" && cargo build --release -p fleet-controller --bin fleetd -p fleet-ctl --bin fleetctl)
    FLEETD="${CARGO_TARGET_DIR:-$ROOT/target}/release/fleetd"
fi
FLEETCTL="${FLEETCTL:-$(dirname "$FLEETD")/fleetctl}"
export FLEETD FLEETCTL

DIR="$(mktemp -d /tmp/fleet-failover.XXXXXX)"
chmod 755 "$DIR"
cleanup() {
    "$ROOT/deploy/local-cluster.sh" down "$DIR" >/dev/null 2>&1 || true
    [ -n "${KEEP:-}" ] || rm -rf "$DIR"
}
trap cleanup EXIT
"$ROOT/deploy/local-cluster.sh" up "$DIR"
EDGE="$(sed -n 's/.*"edges": \["\([^"]*\)".*/\1/p' "$DIR/cluster.json")"
OPS="$DIR/operator"
PG_URL="$(cat "$DIR/run/postgres.url")"
PG_BIN="${PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | tail -1)}"

# Runs `$@` until it succeeds, every 20 ms, for at most 60 s.
until_within_a_minute() {
    local tries=0
    until "$@"; do
        tries=$((tries + 1))
        [ "$tries" -lt 3000 ] || { echo "gave up on: $*" >&2; exit 1; }
        sleep 0.02
    done
}
answered() { "$FLEETCTL" --server "$EDGE" --data-dir "$OPS" --timeout 1 stations list >/dev/null 2>&1; }
standby_waits() { [ "$(waiting)" -ge 1 ]; }

now_ms() { date +%s%3N; }
waiting() {
    "$PG_BIN/psql" "$PG_URL" -Atc \
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted" 2>/dev/null || echo 0
}

serving=0 # controller-0 serves first (local-cluster.sh starts it first)
times=()
for i in $(seq 1 "$K"); do
    pid="$(cat "$DIR/run/controller-$serving.pid")"
    start="$(now_ms)"
    kill -9 "$pid"
    until_within_a_minute answered
    took=$(($(now_ms) - start))
    times+=("$took")
    echo "kill $i: controller-$serving killed, first answer after ${took} ms"
    # The killed one comes back as the standby; the other serves now.
    "$FLEETD" --config "$DIR/controller-$serving.toml" \
        >"$DIR/logs/controller-$serving.out" 2>>"$DIR/logs/controller-$serving.log" </dev/null &
    echo $! >"$DIR/run/controller-$serving.pid"
    disown
    until_within_a_minute standby_waits
    serving=$((1 - serving))
done

sorted=($(printf '%s\n' "${times[@]}" | sort -n))
rank() { # nearest rank of percentile $1
    local r=$(((${#sorted[@]} * $1 + 99) / 100))
    [ "$r" -ge 1 ] || r=1
    echo "${sorted[$((r - 1))]}"
}
echo "failover over $K kills: p50 $(rank 50) ms, p99 $(rank 99) ms, max ${sorted[-1]} ms"
