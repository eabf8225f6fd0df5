#!/usr/bin/env bash
# One connect storm against one fresh server, for alternating A/B measurements of fleetd's
# CPU per connection (issue 11): `compare.sh` runs all four servers once; this runs one, so
# that two fleetd builds (or fleetd and the bare loop) can be alternated in one hour.
# Usage: SERVER=fleetd|loop FLEETD=/path/to/fleetd N=4000 C=50 bench/storm-one.sh
#   PSTAT=1: `perf stat` counts the server's context switches and futex calls
#   (PSTAT_EVENTS=list: other events, such as syscalls:sys_enter_sendto).
#   THREADS=1 (by name; 2: one line a thread): each thread's CPU and voluntary / involuntary switches, from /proc.
#   RECONNECT= (empty): the first storm only. PERF=FILE: `perf record -g` of the server into FILE.
#   EXTRA_TOML='handshake_threads = 0': lines added to fleetd's [server] section.
# Prints one line: server, conn/s, server CPU ms/conn, RSS KiB/conn, reconnect conn/s.
set -euo pipefail
N="${N:-4000}"
C="${C:-50}"
SERVER="${SERVER:-fleetd}"
RECONNECT="${RECONNECT-1}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
FLEETD="${FLEETD:-$ROOT/target/release/fleetd}"
BIN="$HERE/target/release"
[ -x "$BIN/storm" ] || (cd "$HERE" && cargo build --release --bins)
# free_port, wait_port, wait_file, storm_fleetd_toml
. "$HERE/common.sh"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
WORK="$(mktemp -d /dev/shm/fleet-storm.XXXXXX)"
PID=""
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
"$BIN/mkcerts" "$WORK/certs" >/dev/null
CA="$WORK/certs/ca.pem"
P="$(free_port)"
if [ "$SERVER" = fleetd ]; then
    mkdir -p "$WORK/fleetd"
    storm_fleetd_toml "$P" "$WORK/fleetd/data" "$CA" "${EXTRA_TOML:-}" > "$WORK/fleetd/fleet.toml"
    "$FLEETD" --config "$WORK/fleetd/fleet.toml" >"$WORK/log" 2>&1 &
    PID=$!
    wait_file "$WORK/fleetd/data/ca.pem" || true
    SCA="$WORK/fleetd/data/ca.pem"; MODE=mqtt
else
    "$BIN/tls-loop-server" --listen "127.0.0.1:$P" --cert "$WORK/certs/server.pem" \
        --key "$WORK/certs/server.key" --ca "$CA" >"$WORK/log" 2>&1 &
    PID=$!
    SCA="$CA"; MODE=tls-only
fi
wait_port "$P"
sleep 0.5
if [ -n "${PSTAT:-}" ]; then
    perf stat -e "${PSTAT_EVENTS:-context-switches,task-clock,syscalls:sys_enter_futex}" -p "$PID" \
        -o "$WORK/pstat" &
    PERF_PID=$!
    sleep 0.3
fi
if [ -n "${PERF:-}" ]; then
    perf record -F 2000 -g -p "$PID" -o "$PERF" 2>/dev/null &
    PERF_PID=$!
    sleep 0.3
fi
"$BIN/storm" --addr "127.0.0.1:$P" --server-name localhost --server-ca "$SCA" \
    --issuer-cert "$CA" --issuer-key "$WORK/certs/ca.key" -n "$N" -c "$C" --mode "$MODE" \
    --server-pid "$PID" --serial-prefix "S$SERVER" ${RECONNECT:+--reconnect} > "$WORK/storm.json"
if [ -n "${THREADS:-}" ]; then
    python3 - "$PID" "$N" "$([ -n "$RECONNECT" ] && echo 2 || echo 1)" <<'PY'
import os, sys, collections
pid, n = sys.argv[1], int(sys.argv[2])
tick = os.sysconf("SC_CLK_TCK")
by = collections.defaultdict(lambda: [0, 0, 0, 0])
for t in os.listdir(f"/proc/{pid}/task"):
    stat = open(f"/proc/{pid}/task/{t}/stat").read()
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    f = stat[stat.rindex(")") + 2:].split()
    st = {l.split(":")[0]: l.split(":")[1].strip() for l in open(f"/proc/{pid}/task/{t}/status")}
    b = by[name.rstrip("0123456789-") + (f" {t}" if os.environ.get("THREADS") == "2" else "")]
    b[0] += 1
    b[1] += (int(f[11]) + int(f[12])) * 1000 / tick
    b[2] += int(st["voluntary_ctxt_switches"])
    b[3] += int(st["nonvoluntary_ctxt_switches"])
for name, (k, ms, v, iv) in sorted(by.items(), key=lambda x: -x[1][1]):
    d = n * int(sys.argv[3])
    print(f"  {name:<24} threads {k:>3}  cpu ms/conn {ms / d:.3f}  vcs/conn {v / d:.2f}  ivcs/conn {iv / d:.2f}", file=sys.stderr)
PY
fi
if [ -n "${PERF:-}" ]; then kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true; fi
if [ -n "${PSTAT:-}" ]; then
    kill -INT "$PERF_PID"; wait "$PERF_PID" 2>/dev/null || true
    grep -E "^ +[0-9]" "$WORK/pstat" | sed 's/^/  /' >&2
fi
python3 - "$WORK/storm.json" "$SERVER" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s, x = r.get("server", {}), r.get("reconnect") or {}
print(f"{sys.argv[2]} conn/s {r['connections_per_s']:.0f} cpu_ms/conn {s.get('cpu_ms_per_conn', float('nan')):.3f} "
      f"rss_kib/conn {s.get('rss_kib_per_conn', float('nan')):.1f} errors {r['errors_total']} "
      f"reconnect/s {x.get('connections_per_s', float('nan')):.0f} reconnect_cpu {x.get('cpu_ms_per_conn', float('nan')):.3f}")
PY
