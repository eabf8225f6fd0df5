#!/usr/bin/env bash
# One `fleet-sim load` against one fresh fleetd (issue 11's A, B and D runs), with the
# stations' state on tmpfs, and the report's key figures on one line.
# Usage: FLEETD=/path/to/fleetd bench/load-one.sh A|B|D [more fleet-sim load arguments, none
#   of those the run already gives: clap refuses a repeated option]
#   A: --stations 10000 --phones 500 --concurrency 200 --accept-batch 100 --reconnect --cut-sample 10
#   B: --stations 10000 --accept-batch 100 --hold-accepts --cut-sample 10
#   D: --stations 2000, against a fleetd with no configuration but its address and data directory
#   EXTRA_TOML='handshake_threads = 0': lines added to fleetd's [server] section (A and B).
#   KEEP=DIR: the report (report.json) and fleetd's log are copied to DIR.
set -euo pipefail
RUN="${1:?A, B or D}"
shift
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
FLEETD="${FLEETD:-$ROOT/target/release/fleetd}"
SIM="${SIM:-$ROOT/target/release/fleet-sim}"
# free_port, wait_port, wait_file
. "$HERE/common.sh"
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
WORK="$(mktemp -d /dev/shm/fleet-load.XXXXXX)"
PID=""
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP"; cp "$WORK"/report.json "$WORK"/log "$WORK"/sim.log "$KEEP"/ 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
P="$(free_port)"
case "$RUN" in
    A) ARGS=(--stations 10000 --phones 500 --concurrency 200 --accept-batch 100 --reconnect --cut-sample 10) ;;
    B) ARGS=(--stations 10000 --accept-batch 100 --hold-accepts --cut-sample 10) ;;
    D) ARGS=(--stations 2000) ;;
    *) echo "A, B or D" >&2; exit 2 ;;
esac
if [ "$RUN" = D ]; then
    "$FLEETD" --listen "127.0.0.1:$P" --data-dir "$WORK/data" >"$WORK/log" 2>&1 &
else
    cat > "$WORK/fleetd.toml" <<TOML
[server]
data_dir = "$WORK/data"
listen = "127.0.0.1:$P"
cut_grace_ms = 2000
${EXTRA_TOML:-}

[limits]
# the simulated operator accepts 10,000 stations as fast as fleetd takes it
operator_commands_per_second = 1000000
operator_command_burst = 1000000
TOML
    "$FLEETD" --config "$WORK/fleetd.toml" >"$WORK/log" 2>&1 &
fi
PID=$!
wait_file "$WORK/data/ca.pem" && wait_port "$P"
"$SIM" load --server "127.0.0.1:$P" --data-dir "$WORK/data" "${ARGS[@]}" "$@" \
    --state-dir "$WORK/states" --fleetd-pid "$PID" --json "$WORK/report.json" >/dev/null 2>"$WORK/sim.log" \
    || { tail -60 "$WORK/sim.log" >&2; exit 1; }
python3 - "$WORK/report.json" "$RUN" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
a, c, s = r["accept_to_authorized_ms"], r["reject_to_cut_ms"], r.get("reconnect") or {}
f = lambda x: "-" if x is None else f"{x:.1f}"
storm = s.get("connects_per_s")
line = (f"{sys.argv[2]}: onboarded/s {r['onboarded_per_s']:.0f} accept p50/p99 {f(a['p50'])}/{f(a['p99'])} ms "
        f"reject->cut p99 {f(c['p99'])} ms KiB/device {f(r.get('fleetd_rss_kib_per_device'))} "
        f"errors {sum(r['errors'].values())}")
if storm:
    line += f" storm/s {storm:.0f} onboarding/storm {r['onboarded_per_s'] / storm:.2f}"
print(line)
PY
