# Shell helpers the bench scripts share (sourced by compare.sh, storm-one.sh, load-one.sh).

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# Waits up to 10 s until something listens on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "server on port $1 did not come up" >&2; return 1
}

# Waits up to 5 s for FILE (fleetd makes its data directory, fleet CA included, at start).
wait_file() { for _ in $(seq 1 100); do [ -f "$1" ] && return 0; sleep 0.05; done; return 1; }

# The fleetd configuration of a connect storm: PORT DATA_DIR MANUFACTURER_CA [EXTRA [server]
# LINES]. The storm's clients all come from 127.0.0.1 with certificates of the manufacturer CA.
storm_fleetd_toml() {
    cat <<TOML
[server]
listen = "127.0.0.1:$1"
data_dir = "$2"
manufacturer_cas = ["$3"]
max_connections = 20000
${4:-}

[limits]
connections_per_ip_per_minute = 1000000
failed_auth_per_ip = 1000000
TOML
}
