#!/usr/bin/env bash
# What one idle station costs fleetd's heap, item by item (issue 11, item 4): fleetd runs under
# heaptrack, N stations onboard slowly (few in flight, so that the heap's peak is the fleet at
# rest, not a storm's transient state), then fleetd stops and heaptrack's peak is broken down
# by who allocated it. Needs heaptrack (Debian: apt-get install heaptrack).
# Usage: N=1000 bench/idle-heap.sh   (from anywhere)
#        FLEETD=/path/to/fleetd SIM=/path/to/fleet-sim bench/idle-heap.sh   (binaries built elsewhere;
#        fleetd built with --no-default-features: heaptrack sees glibc's malloc, not jemalloc)
set -euo pipefail

N="${N:-1000}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
command -v heaptrack >/dev/null || { echo "heaptrack is missing (apt-get install heaptrack)" >&2; exit 1; }
# fleetd without jemalloc (its default allocator), in a target folder of its own so that the
# release build beside it keeps jemalloc.
if [ -z "${FLEETD:-}" ]; then
    (cd "$ROOT" && cargo build --release -p fleet-controller --bin fleetd --no-default-features \
        --target-dir "$ROOT/target/glibc")
fi
if [ -z "${SIM:-}" ]; then
    (cd "$ROOT" && cargo build --release -p fleet-sim --bin fleet-sim)
fi
FLEETD="${FLEETD:-$ROOT/target/glibc/release/fleetd}"
if grep -q _rjem_malloc "$FLEETD"; then
    echo "$FLEETD uses jemalloc, which heaptrack does not see: build it with --no-default-features" >&2
    exit 1
fi
SIM="${SIM:-$ROOT/target/release/fleet-sim}"
WORK="$(mktemp -d /tmp/fleet-heap.XXXXXX)"
trap '[ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
PORT="$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')"
cat > "$WORK/fleetd.toml" <<TOML
[server]
data_dir = "$WORK/data"
listen = "127.0.0.1:$PORT"

[limits]
# One operator accepts the whole fleet.
operator_commands_per_second = 1000000
operator_command_burst = 1000000
TOML
# glibc's allocator tuned as fleetd tunes it: fleetd would otherwise re-execute itself to do so,
# and heaptrack would trace only the process that exits at once.
MALLOC_ARENA_MAX=2 MALLOC_MMAP_THRESHOLD_=131072 RUST_LOG="${RUST_LOG:-info,fleet_broker::memory=debug}" \
    heaptrack -o "$WORK/fleetd" "$FLEETD" --config "$WORK/fleetd.toml" \
    >"$WORK/fleetd.log" 2>&1 &
for _ in $(seq 1 200); do [ -f "$WORK/data/ca.pem" ] && break; sleep 0.05; done
sleep 1
PID="$(pgrep -f "^$FLEETD --config $WORK/fleetd.toml")"
"$SIM" load --server "127.0.0.1:$PORT" --data-dir "$WORK/data" \
    --stations "$N" --concurrency 5 --accept-batch 5 --state-dir "$WORK/states" \
    --fleetd-pid "$PID" --json "$WORK/report.json" >&2
kill -INT "$PID"
for _ in $(seq 1 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
sleep 1
heaptrack_print -f "$WORK"/fleetd.*zst -p 0 -a 0 -T 0 -l 0 -F "$WORK/peak.txt" \
    --flamegraph-cost-type peak >/dev/null
python3 - "$WORK/peak.txt" "$N" <<'PY'
import collections, sys
n = int(sys.argv[2])
# The first key a stack contains names its item (order matters: the most specific first).
items = [
    ("Router::new", "rumqttd's router, made at start (whatever the fleet)"),
    ("Cell$LT$T$C$S$GT$::new", "the connection's tokio task (its future)"),
    ("DeframerVecBuffer", "rustls: TLS read buffer (DeframerVecBuffer, 4 KiB while idle)"),
    ("fleet_broker::tls_stream", "front door: TLS stream's buffers (none while idle)"),
    ("ServerConnection", "rustls: ServerConnection"),
    ("rustls", "rustls: other"),
    ("ControlQueue", "front door: the session's control queue"),
    ("fit_read_buffer", "front door: MQTT read buffer"),
    ("Registry::register", "front door: registry entry"),
    ("fleet_broker::session", "front door: session state"),
    ("fleet_broker::frontdoor::connection", "front door: connection, other"),
    ("admission::register", "controller: live session entry"),
    ("station_rights", "controller: the session's rights"),
    ("Outbox::publish", "controller: events on their way out (transient)"),
    ("redb", "store: redb's cache"),
    ("fleet_controller", "controller: other"),
    ("rumqttd", "rumqttd: other (its log, the operator's link)"),
    ("tokio", "tokio: other"),
]
by = collections.Counter()
total = 0
for line in open(sys.argv[1]):
    stack, _, size = line.rstrip().rpartition(" ")
    size = int(size)
    total += size
    by[next((name for key, name in items if key in stack), "other")] += size
print(f"heap at its peak: {total / 2**20:.1f} MiB for {n} idle stations, "
      f"{total / n / 1024:.1f} KiB each (fixed costs included)")
print("| item | MiB | bytes per station |")
print("|---|---:|---:|")
for name, size in by.most_common():
    print(f"| {name} | {size / 2**20:.2f} | {size / n:,.0f} |")
PY
grep 'fleet_broker::memory' "$WORK/fleetd.log" | sed 's/\x1b\[[0-9;]*m//g' || true
