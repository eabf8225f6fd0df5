#!/usr/bin/env bash
# A whole fleetgate cluster on loopback, for trying it (README, "Scaling out"):
#
#   deploy/local-cluster.sh up DIR     three routed NATS servers, one PostgreSQL cluster in DIR,
#                                      two controllers (the second a standby) and two edges, each
#                                      on a free port; returns once an operator's command through
#                                      every edge is answered, having written DIR/cluster.json
#   deploy/local-cluster.sh down DIR   stops everything `up` started in DIR (DIR stays)
#   deploy/local-cluster.sh postgres stop|start DIR
#                                      stops PostgreSQL under the running cluster, or starts it
#                                      again on the same port
#
# DIR/cluster.json, the shape scripts and tests rely on:
#   {"edges": ["127.0.0.1:P", "127.0.0.1:Q"],        where devices and operators connect
#    "data_dir": "DIR/operator",                      ca.pem, admin.pem and admin.key
#    "metrics": ["127.0.0.1:M", "127.0.0.1:N"],       the edges' /metrics and /healthz
#    "pids": {"nats": [..3], "postgres": [postmaster], "edges": [..2], "controllers": [..2]}}
# (lists in the same order as the addresses; the controllers' first is the one that serves).
#
# Which fleetd: $FLEETD, else `fleetd` beside this repository's release or debug build, else
# on PATH. Readiness: each edge's /healthz (its metrics endpoint, on a free port) answers 200
# (it hears a controller and its bus), then, with fleetctl ($FLEETCTL, beside fleetd, or on
# PATH), an operator's command through each edge is answered.
# $EXTRA_CONFIG names a TOML file appended to every node's configuration (other sections than
# [server], [cluster] and [store], e.g. [limits] for a benchmark).
# PostgreSQL's server binaries: $PG_BIN, else /usr/lib/postgresql/*/bin. Run as root, the
# PostgreSQL server runs as the `postgres` user, which must be able to reach DIR.
#
# Logs: DIR/logs/<process>.log. Nothing listens beyond 127.0.0.1; nothing talks TLS to NATS or
# PostgreSQL (ARCHITECTURE.md: loopback or a private network only).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PATIENCE=${PATIENCE:-60}

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

usage() {
    echo "usage: $0 up|down DIR, or $0 postgres stop|start DIR" >&2
    exit 2
}

# The first executable of the arguments, or nothing.
first_executable() {
    local candidate
    for candidate in "$@"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

find_fleetd() {
    first_executable "${FLEETD:-}" "$REPO/target/release/fleetd" "$REPO/target/debug/fleetd" \
        "$(command -v fleetd || true)" ||
        die "no fleetd: build it (cargo build --release) or set FLEETD=/path/to/fleetd"
}

find_fleetctl() {
    first_executable "${FLEETCTL:-}" "$(dirname "$1")/fleetctl" "$(command -v fleetctl || true)" ||
        true
}

find_pg_bin() {
    local dir
    for dir in "${PG_BIN:-}" /usr/lib/postgresql/*/bin; do
        if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            echo "$dir"
            return 0
        fi
    done
    die "no PostgreSQL server binaries (apt-get install postgresql, or set PG_BIN)"
}

# Runs PostgreSQL's programs as `postgres` when we are root (it refuses to run as root).
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

# Waits until `$2` (a file) has a line matching the extended regex `$3`, and prints its first
# match; gives up when the process `$1` has exited or after $PATIENCE seconds.
wait_line() {
    local pid=$1 file=$2 pattern=$3 waited=0
    while true; do
        if [ -f "$file" ] && grep -Eq "$pattern" "$file"; then
            grep -Em1 "$pattern" "$file"
            return 0
        fi
        if ! alive "$pid"; then
            return 1
        fi
        if [ "$waited" -ge $((PATIENCE * 10)) ]; then
            return 1
        fi
        sleep 0.1
        waited=$((waited + 1))
    done
}

# A port on 127.0.0.1 that nothing listens on now (another process may take it before it is
# bound: the caller tries again).
free_port() {
    local port
    while true; do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
}

# Starts `$2...` in the background with its output in DIR/logs/$1.log (stdout in $1.out), and
# records its pid in DIR/run/$1.pid.
launch() {
    local name=$1
    shift
    "$@" >"$DIR/logs/$name.out" 2>"$DIR/logs/$name.log" </dev/null &
    echo $! >"$DIR/run/$name.pid"
}

pid_of() {
    cat "$DIR/run/$1.pid"
}

start_nats() {
    local i routes="" line port password
    # Clients must authenticate: a password of this cluster's own, in a file only we read
    # (on the command line, `ps` would show it), and in the nodes' configurations (0600).
    password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    printf 'authorization {\n  user: fleet\n  password: "%s"\n}\n' "$password" >"$DIR/nats-auth.conf"
    for i in 0 1 2; do
        local args=(-c "$DIR/nats-auth.conf" -a 127.0.0.1 -p -1 --cluster_name fleet-local
            --cluster nats://127.0.0.1:-1 --no_advertise)
        if [ -n "$routes" ]; then
            args+=(--routes "$routes")
        fi
        launch "nats-$i" nats-server "${args[@]}"
        line=$(wait_line "$(pid_of "nats-$i")" "$DIR/logs/nats-$i.log" \
            'Listening for client connections on') || die "nats-$i did not start: see $DIR/logs/nats-$i.log"
        port=${line##*:}
        echo "nats://fleet:$password@127.0.0.1:$port" >>"$DIR/run/nats.urls"
        # The others route to the first; NATS tells each about the rest (a full mesh).
        if [ -z "$routes" ]; then
            line=$(wait_line "$(pid_of nats-0)" "$DIR/logs/nats-0.log" \
                'Listening for route connections on') || die "nats-0 has no route port"
            routes="nats://127.0.0.1:${line##*:}"
        fi
    done
}

# Starts the PostgreSQL server of DIR with the options `up` chose (DIR/run/postgres.opts).
pg_start() {
    as_pg "$1/pg_ctl" -D "$DIR/postgres/data" -l "$DIR/postgres/server.log" -w -t "$PATIENCE" \
        -o "$(cat "$DIR/run/postgres.opts")" start >>"$DIR/logs/pg_ctl.log" 2>&1
}

start_postgres() {
    local bin=$1 pg="$DIR/postgres" port try
    mkdir -p "$pg"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$pg"
        as_pg test -w "$pg" || die "the postgres user cannot write $pg: choose a DIR it can reach"
    fi
    # The database user has a password of this cluster's own (no `trust`: any local user could
    # rewrite the store); it is in the controllers' configurations (0600) only.
    local password
    password=$(od -An -tx1 -N16 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$password" >"$pg/pwfile"
    [ "$(id -u)" != 0 ] || chown postgres: "$pg/pwfile"
    as_pg "$bin/initdb" -D "$pg/data" -U fleet --auth=scram-sha-256 --pwfile="$pg/pwfile" \
        -E UTF8 --locale=C --no-sync >"$DIR/logs/initdb.log" 2>&1 ||
        die "initdb failed: see $DIR/logs/initdb.log"
    rm -f "$pg/pwfile"
    for try in 1 2 3; do
        port=$(free_port)
        echo "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$pg -c fsync=on -c max_connections=200" \
            >"$DIR/run/postgres.opts"
        if pg_start "$bin"; then
            head -1 "$pg/data/postmaster.pid" >"$DIR/run/postgres.pid"
            PGPASSWORD=$password "$bin/createdb" -h 127.0.0.1 -p "$port" -U fleet fleet ||
                die "createdb failed"
            echo "postgres://fleet:$password@127.0.0.1:$port/fleet" >"$DIR/run/postgres.url"
            return 0
        fi
        echo "local-cluster: PostgreSQL did not start on port $port (try $try)" >&2
    done
    die "PostgreSQL did not start: see $pg/server.log"
}

# The configuration of node `$1` with role `$2`; a controller gets the store.
node_config() {
    local node=$1 role=$2 nats
    nats=$(sed 's/.*/"&"/' "$DIR/run/nats.urls" | paste -sd, -)
    cat <<XEOF
# Written by deploy/local-cluster.sh.
[server]
data_dir = "$DIR/$node"
listen = "127.0.0.1:0"

[cluster]
role = "$role"
node = "$node"
nats = [$nats]
XEOF
    if [ "$role" = edge ]; then
        cat <<XEOF

[metrics]
listen = "127.0.0.1:0"
XEOF
    fi
    if [ "$role" = controller ]; then
        cat <<XEOF

[store]
url = "$(cat "$DIR/run/postgres.url")"
XEOF
    fi
    if [ -n "${EXTRA_CONFIG:-}" ]; then
        echo
        cat "$EXTRA_CONFIG"
    fi
}

# Waits until a standby controller waits for the controller lock in PostgreSQL.
wait_standby() {
    local bin=$1 url waited=0 count
    url=$(cat "$DIR/run/postgres.url")
    while true; do
        count=$("$bin/psql" "$url" -Atc "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted" 2>/dev/null || echo 0)
        if [ "$count" -ge 1 ]; then
            return 0
        fi
        alive "$(pid_of controller-1)" ||
            die "controller-1 exited: see $DIR/logs/controller-1.log"
        [ "$waited" -lt $((PATIENCE * 10)) ] || die "controller-1 never waited for the lock"
        sleep 0.1
        waited=$((waited + 1))
    done
}

# The status code of GET /healthz at 127.0.0.1:$1 (plain HTTP, bash's /dev/tcp), or 0.
healthz() {
    local status
    status=$(
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 0
        printf 'GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        head -1 <&3
    ) 2>/dev/null || true
    status=${status#HTTP/* }
    echo "${status%% *}" | tr -dc '0-9'
}

# Waits until edge `$1`'s /healthz at port `$2` answers 200, within the patience.
wait_healthy() {
    local waited=0
    until [ "$(healthz "$2")" = 200 ]; do
        [ "$waited" -lt $((PATIENCE * 10)) ] || die "$1 never healthy: see $DIR/logs/$1.log"
        sleep 0.1
        waited=$((waited + 1))
    done
}

# An operator's command through edge `$2` is answered (fleetctl `$1`), within the patience.
wait_answer() {
    local ctl=$1 edge=$2 waited=0
    while ! "$ctl" --server "$edge" --data-dir "$DIR/operator" --timeout 2 stations list \
        >/dev/null 2>&1; do
        [ "$waited" -lt "$PATIENCE" ] || die "no answer through $edge"
        sleep 1
        waited=$((waited + 1))
    done
}

json_list() {
    local first=1 item
    printf '['
    for item in "$@"; do
        [ $first = 1 ] || printf ', '
        printf '%s' "$item"
        first=0
    done
    printf ']'
}

up() {
    [ ! -e "$DIR/run" ] || die "$DIR has a cluster already (down it first, or choose another DIR)"
    command -v nats-server >/dev/null || die "no nats-server (apt-get install nats-server)"
    local fleetd fleetctl pg_bin node line edges=() edge_pids=() controller_pids=() nats_pids=()
    local metrics=() probe
    fleetd=$(find_fleetd)
    fleetctl=$(find_fleetctl "$fleetd")
    pg_bin=$(find_pg_bin)
    # Configurations hold the bus's password: nothing of DIR's but DIR itself is for others.
    umask 077
    mkdir -p "$DIR/logs" "$DIR/run"
    DIR=$(cd "$DIR" && pwd)
    # If anything below fails, what was started is stopped again.
    trap 'status=$?; [ $status = 0 ] || down >/dev/null 2>&1 || true' EXIT

    # The shared files, once (README, "Scaling out"): the controllers get all of them (they
    # sign phones' certificates with the CA key and read the operators); the edges only the CA
    # certificate and the server's certificate and key; operators the CA certificate and the
    # admin's files.
    "$fleetd" --data-dir "$DIR/shared" init >/dev/null
    for node in controller-0 controller-1; do
        cp -a "$DIR/shared" "$DIR/$node"
    done
    for node in edge-0 edge-1; do
        mkdir -p "$DIR/$node" && chmod 700 "$DIR/$node"
        cp -a "$DIR/shared/ca.pem" "$DIR/shared/server.pem" "$DIR/shared/server.key" "$DIR/$node/"
    done
    mkdir -p "$DIR/operator" && chmod 700 "$DIR/operator"
    cp -a "$DIR/shared/ca.pem" "$DIR/shared/admin.pem" "$DIR/shared/admin.key" "$DIR/operator/"

    start_nats
    start_postgres "$pg_bin"

    for node in controller-0 controller-1 edge-0 edge-1; do
        node_config "$node" "${node%-*}" >"$DIR/$node.toml"
    done
    launch controller-0 "$fleetd" --config "$DIR/controller-0.toml"
    wait_line "$(pid_of controller-0)" "$DIR/logs/controller-0.out" 'serving' >/dev/null ||
        die "controller-0 did not serve: see $DIR/logs/controller-0.log"
    launch controller-1 "$fleetd" --config "$DIR/controller-1.toml"
    wait_standby "$pg_bin"
    for node in edge-0 edge-1; do
        launch "$node" "$fleetd" --config "$DIR/$node.toml"
        line=$(wait_line "$(pid_of "$node")" "$DIR/logs/$node.out" '^fleetd listening on ') ||
            die "$node did not listen: see $DIR/logs/$node.log"
        edges+=("\"${line#fleetd listening on }\"")
        edge_pids+=("$(pid_of "$node")")
        probe=$(wait_line "$(pid_of "$node")" "$DIR/logs/$node.log" \
            'metrics endpoint ready.*listen=127\.0\.0\.1:[0-9]+') ||
            die "$node has no metrics endpoint: see $DIR/logs/$node.log"
        probe=$(echo "$probe" | grep -Eo 'listen=127\.0\.0\.1:[0-9]+')
        metrics+=("\"${probe#listen=}\"")
        wait_healthy "$node" "${probe##*:}"
        if [ -n "$fleetctl" ]; then
            wait_answer "$fleetctl" "${line#fleetd listening on }"
        fi
    done
    controller_pids=("$(pid_of controller-0)" "$(pid_of controller-1)")
    nats_pids=("$(pid_of nats-0)" "$(pid_of nats-1)" "$(pid_of nats-2)")

    cat >"$DIR/cluster.json.new" <<XEOF
{
  "edges": $(json_list "${edges[@]}"),
  "data_dir": "$DIR/operator",
  "metrics": $(json_list "${metrics[@]}"),
  "pids": {
    "nats": $(json_list "${nats_pids[@]}"),
    "postgres": [$(pid_of postgres)],
    "edges": $(json_list "${edge_pids[@]}"),
    "controllers": $(json_list "${controller_pids[@]}")
  }
}
XEOF
    mv "$DIR/cluster.json.new" "$DIR/cluster.json"
    trap - EXIT
    echo "local-cluster: up in $DIR: edges $(json_list "${edges[@]}"), operators' files in $DIR/operator"
}

# Whether process `$1` runs (an exited one that nobody reaped yet does not).
alive() {
    kill -0 "$1" 2>/dev/null && ! grep -qE '^[0-9]+ \(.*\) Z' "/proc/$1/stat" 2>/dev/null
}

# Sends SIGTERM to the process of `$1` (a name in DIR/run), waits for it, SIGKILL after 10 s;
# only if that pid still runs a program of ours (`$2`): a process killed meanwhile may have
# left its pid to another.
stop_process() {
    local file="$DIR/run/$1.pid" program=$2 pid waited=0
    [ -f "$file" ] || return 0
    pid=$(cat "$file")
    if ! tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -q -- "$program"; then
        rm -f "$file"
        return 0
    fi
    if kill -TERM "$pid" 2>/dev/null; then
        while alive "$pid" && [ "$waited" -lt 100 ]; do
            sleep 0.1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$file"
}

down() {
    [ -d "$DIR/run" ] || die "$DIR has no cluster"
    DIR=$(cd "$DIR" && pwd)
    local name
    # Edges first (their sessions' wills reach a controller), then the controllers, the bus,
    # the store.
    for name in edge-0 edge-1 controller-1 controller-0; do
        stop_process "$name" "--config $DIR/$name.toml"
    done
    for name in nats-0 nats-1 nats-2; do
        stop_process "$name" nats-server
    done
    if [ -f "$DIR/postgres/data/postmaster.pid" ]; then
        as_pg "$(find_pg_bin)/pg_ctl" -D "$DIR/postgres/data" -w -m fast stop >/dev/null 2>&1 || true
    fi
    rm -f "$DIR/run/postgres.pid"
    rm -rf "$DIR/run"
    echo "local-cluster: down in $DIR"
}

# `postgres stop|start DIR`: stops PostgreSQL under the running cluster, or starts it again on
# the same port (to try what the cluster does without its store).
postgres() {
    [ -f "$DIR/run/postgres.opts" ] || die "$DIR has no cluster"
    local bin
    bin=$(find_pg_bin)
    case $1 in
    stop) as_pg "$bin/pg_ctl" -D "$DIR/postgres/data" -w -m fast stop >>"$DIR/logs/pg_ctl.log" 2>&1 ;;
    start)
        pg_start "$bin" || die "PostgreSQL did not start: see $DIR/postgres/server.log"
        local old new
        old=$(cat "$DIR/run/postgres.pid")
        new=$(head -1 "$DIR/postgres/data/postmaster.pid")
        echo "$new" >"$DIR/run/postgres.pid"
        # cluster.json names the running postmaster.
        sed -i "s/\"postgres\": \[$old\]/\"postgres\": [$new]/" "$DIR/cluster.json"
        ;;
    *) usage ;;
    esac
}

# DIR goes into TOML and JSON strings and PostgreSQL's options unquoted.
check_dir() {
    case $1 in
    *[[:space:]\"\\\']*) die "DIR must not hold spaces, quotes or backslashes: $1" ;;
    esac
}

case $# in
2)
    check_dir "$2"
    DIR=$2
    case $1 in
    up)
        mkdir -p "$DIR"
        up
        ;;
    down) down ;;
    *) usage ;;
    esac
    ;;
3)
    [ "$1" = postgres ] || usage
    check_dir "$3"
    DIR=$3
    postgres "$2"
    ;;
*) usage ;;
esac
