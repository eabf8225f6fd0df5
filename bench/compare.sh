#!/usr/bin/env bash
# Side-by-side connect storm (issue 4, item 3): the same N mTLS clients against
# (a) fleetd, (b) rumqttd's own TLS listener, (c) mosquitto (require_certificate), and
# (d) a bare rustls mutual-TLS accept loop. One server at a time, each started fresh.
# Usage: N=2000 C=50 bench/compare.sh   (from anywhere)
#        FLEETD=/path/to/fleetd bench/compare.sh   (a fleetd built elsewhere, e.g. an older commit)
set -euo pipefail

N="${N:-2000}"
C="${C:-50}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"

if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    $SUDO apt-get install -y mosquitto >/dev/null || { $SUDO apt-get update && $SUDO apt-get install -y mosquitto; }
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
# Debian enables the mosquitto service on install; the bench starts its own.
$SUDO systemctl stop mosquitto >/dev/null 2>&1 || true

if [ -z "${FLEETD:-}" ]; then
    (cd "$ROOT" && cargo build --release -p fleet-controller --bin fleetd)
    FLEETD="$ROOT/target/release/fleetd"
fi
(cd "$HERE" && cargo build --release --bins)
BIN="$HERE/target/release"

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

WORK="$(mktemp -d /tmp/fleet-bench.XXXXXX)"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN/mkcerts" "$WORK/certs" >/dev/null
CA="$WORK/certs/ca.pem"; CAKEY="$WORK/certs/ca.key"
SCERT="$WORK/certs/server.pem"; SKEY="$WORK/certs/server.key"

# free_port, wait_port, wait_file, storm_fleetd_toml
. "$HERE/common.sh"
stop_server() {
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# run NAME PORT SERVER_CA MODE : storm against the server already started as $SERVER_PID.
run() {
    local name="$1" port="$2" server_ca="$3" mode="$4"
    wait_port "$port"
    sleep 0.5
    echo "== $name (port $port, pid $SERVER_PID)" >&2
    "$BIN/storm" --addr "127.0.0.1:$port" --server-name localhost --server-ca "$server_ca" \
        --issuer-cert "$CA" --issuer-key "$CAKEY" -n "$N" -c "$C" --mode "$mode" \
        --server-pid "$SERVER_PID" --serial-prefix "${name//[^A-Za-z0-9]/}" --reconnect \
        > "$WORK/$name.json"
    cat "$WORK/$name.json" >&2
    stop_server
}

# (a) fleetd: the test CA is the manufacturer CA, so every client's CA-chained certificate is a station.
P="$(free_port)"
mkdir -p "$WORK/fleetd"
storm_fleetd_toml "$P" "$WORK/fleetd/data" "$CA" > "$WORK/fleetd/fleet.toml"
"$FLEETD" --config "$WORK/fleetd/fleet.toml" >"$WORK/fleetd/log" 2>&1 &
SERVER_PID=$!
# fleetd makes its data directory (fleet CA, server certificate) at start.
wait_file "$WORK/fleetd/data/ca.pem" || true
run fleetd "$P" "$WORK/fleetd/data/ca.pem" mqtt

# (b) rumqttd's own TLS listener, client-certificate verification on.
P="$(free_port)"
"$BIN/rumqttd-tls" --listen "127.0.0.1:$P" --cert "$SCERT" --key "$SKEY" --ca "$CA" \
    >"$WORK/rumqttd.log" 2>&1 &
SERVER_PID=$!
run rumqttd "$P" "$CA" mqtt

# (c) mosquitto, require_certificate.
P="$(free_port)"
cat > "$WORK/mosquitto.conf" <<CONF
per_listener_settings false
allow_anonymous true
persistence false
log_dest stderr
log_type error
max_connections -1
listener $P 127.0.0.1
cafile $CA
certfile $SCERT
keyfile $SKEY
require_certificate true
use_identity_as_username false
CONF
chmod 755 "$WORK" "$WORK/certs"; chmod 644 "$WORK/certs/"*
"$MOSQUITTO" -c "$WORK/mosquitto.conf" >"$WORK/mosquitto.log" 2>&1 &
SERVER_PID=$!
run mosquitto "$P" "$CA" mqtt

# (d) bare rustls mutual-TLS accept loop: the floor TLS sets on this machine.
P="$(free_port)"
"$BIN/tls-loop-server" --listen "127.0.0.1:$P" --cert "$SCERT" --key "$SKEY" --ca "$CA" \
    >"$WORK/tls-loop.log" 2>&1 &
SERVER_PID=$!
run tls-loop "$P" "$CA" tls-only

python3 - "$WORK" "$N" "$C" <<'PY'
import json, sys
work, n, c = sys.argv[1], sys.argv[2], sys.argv[3]
rows = []
for name in ["fleetd", "rumqttd", "mosquitto", "tls-loop"]:
    r = json.load(open(f"{work}/{name}.json"))
    s = r.get("server", {})
    rows.append((name, r["connections_per_s"], r["connect_ms"]["p50"], r["connect_ms"]["p99"],
                 s.get("cpu_ms_per_conn", float("nan")), s.get("rss_kib_per_conn", float("nan")),
                 r["errors_total"], r["connected"]))
f = rows[0]
def ratio(a, b):
    return f"{a / b:.2f}x" if b else "-"
recon = []
for name in ["fleetd", "rumqttd", "mosquitto", "tls-loop"]:
    r = json.load(open(f"{work}/{name}.json"))
    x = r.get("reconnect") or {}
    recon.append((name, x.get("connections_per_s", float("nan")), x.get("resumed", 0),
                  x.get("connected", 0), x.get("cpu_ms_per_conn", float("nan")),
                  x.get("errors_total", 0), r["connections_per_s"]))
print(f"N={n} clients, concurrency {c}, mTLS with CA-chained client certificates (P-256)")
print(f"| server | conn/s | p50 ms | p99 ms | CPU ms/conn | RSS KiB/conn | errors | conn/s vs fleetd | p99 vs fleetd | CPU vs fleetd | RSS vs fleetd |")
print(f"|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for (name, cps, p50, p99, cpu, rss, err, ok) in rows:
    print(f"| {name} | {cps:.0f} | {p50:.2f} | {p99:.2f} | {cpu:.3f} | {rss:.1f} | {err} | "
          f"{ratio(cps, f[1])} | {ratio(p99, f[3])} | {ratio(cpu, f[4])} | {ratio(rss, f[5])} |")
print()
print("Reconnect storm: every client disconnects cleanly, then all connect again with their TLS session")
print("| server | reconnect conn/s | resumed | CPU ms/conn | errors | vs its own full-handshake storm |")
print("|---|---:|---:|---:|---:|---:|")
for (name, cps, resumed, ok, cpu, err, full) in recon:
    print(f"| {name} | {cps:.0f} | {resumed} of {ok} | {cpu:.3f} | {err} | {ratio(cps, full)} |")
PY
