//! Running `fleetd` as operations teams do: SIGTERM stops it gracefully (a server DISCONNECT
//! to each session, exit 0, the store intact), a start that cannot work says why in one line,
//! and the log suits a pipe (no colour codes) or a log collector (`--log-format json`).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use fleet_tests::process::Fleetd;
use serde_json::json;
use tokio::io::AsyncReadExt;

use crate::FLEETD;

/// Runs `fleetd` to its end with `args` (after `--data-dir data --listen 127.0.0.1:0`).
fn run_to_end(data: &Path, args: &[&str]) -> Output {
    Command::new(FLEETD)
        .arg("--data-dir")
        .arg(data)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .output()
        .expect("fleetd runs")
}

fn stderr_lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_every_session_with_a_server_disconnect_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let mut fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let mut op = fleetd.operator().await;
    let station = fleetd.station(dir.path().join("TERM-1"), "TERM-1", "6.1.0");
    let fingerprint = op.wait_request("TERM-1").await;
    op.call(
        "acceptStation",
        json!({"serial": "TERM-1", "fingerprint": fingerprint}),
    )
    .await
    .expect("accepted");
    let mut v5 = fleetd.v5_station("TERM-2").await;

    let status = fleetd.terminate();
    assert!(status.success(), "exit status after SIGTERM: {status}");

    // What the server sent last, before it closed the connection cleanly (TLS close_notify,
    // not a reset): DISCONNECT 0x8B "server shutting down".
    let mut rest = Vec::new();
    let read = v5.read_to_end(&mut rest).await;
    assert!(read.is_ok(), "a clean TLS close, not {read:?}");
    assert_eq!(rest.first(), Some(&0xe0), "a server DISCONNECT: {rest:?}");
    assert_eq!(
        rest.get(2),
        Some(&0x8b),
        "reason Server shutting down: {rest:?}"
    );
    drop(op);
    station.handle.shutdown().await;

    // The store opens cleanly on the same data directory and holds the decision.
    let fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let op = fleetd.operator().await;
    let view = op
        .call("getStation", json!({"serial": "TERM-1"}))
        .await
        .expect("the station is kept");
    assert_ne!(view["state"], "unauthorized", "{view}");
}

#[test]
fn a_second_fleetd_on_the_same_data_directory_says_so_in_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let _first = Fleetd::start(FLEETD.as_ref(), &data);
    let second = run_to_end(&data, &[]);
    assert!(!second.status.success(), "{:?}", second.status);
    let lines = stderr_lines(&second);
    assert_eq!(lines.len(), 1, "exactly one line: {lines:#?}");
    assert!(
        lines[0].contains("another fleetd is using the data directory")
            && lines[0].contains("fleet-data"),
        "{lines:?}"
    );
}

/// The allocator variable fleetd re-executes itself with, its value, and a value an operator
/// might choose instead.
#[cfg(feature = "jemalloc")]
const ALLOCATOR: (&str, &str, &str) = ("_RJEM_MALLOC_CONF", "narenas:2", "narenas:1");
#[cfg(not(feature = "jemalloc"))]
const ALLOCATOR: (&str, &str, &str) = ("MALLOC_ARENA_MAX", "2", "1");

/// The environment of process `pid`, one `NAME=value` per entry.
fn environment_of(pid: u32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).expect("the process's environment");
    raw.split(|&byte| byte == 0)
        .filter(|entry| !entry.is_empty())
        .map(|entry| String::from_utf8_lossy(entry).into_owned())
        .collect()
}

#[test]
fn fleetd_tunes_its_allocator_unless_the_environment_already_does() {
    let (name, tuned, chosen) = ALLOCATOR;
    let dir = tempfile::tempdir().expect("tempdir");
    let by_fleetd = Fleetd::start_with(FLEETD.as_ref(), &dir.path().join("a"), |command| {
        // Any of the variables that override fleetd's own setting would stop the re-exec.
        for variable in [
            "_RJEM_MALLOC_CONF",
            "MALLOC_ARENA_MAX",
            "MALLOC_MMAP_THRESHOLD_",
            "GLIBC_TUNABLES",
        ] {
            command.env_remove(variable);
        }
    });
    let environment = environment_of(by_fleetd.pid());
    assert!(
        environment.contains(&format!("{name}={tuned}")),
        "{name} not set by fleetd: {environment:?}"
    );
    let by_operator = Fleetd::start_with(FLEETD.as_ref(), &dir.path().join("b"), |command| {
        command.env(name, chosen);
    });
    let environment = environment_of(by_operator.pid());
    assert!(
        environment.contains(&format!("{name}={chosen}")),
        "the operator's {name} not kept: {environment:?}"
    );
}

/// jemalloc reads fleetd's variable: a setting it does not know is reported on stderr.
#[cfg(feature = "jemalloc")]
#[test]
fn jemalloc_reads_the_variable_fleetd_sets() {
    let output = Command::new(FLEETD)
        .arg("--help")
        .env(ALLOCATOR.0, "no_such_setting:1")
        .output()
        .expect("fleetd runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("Invalid conf pair") && stderr.contains("no_such_setting"),
        "jemalloc did not read {}: {stderr}",
        ALLOCATOR.0
    );
}

#[test]
fn a_configuration_error_is_one_line_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let config = dir.path().join("fleetgate.toml");
    for (text, key) in [
        ("[log]\nlevle = \"info\"\n", "levle"),
        ("[server]\nmax_connections = \"many\"\n", "max_connections"),
        ("[log]\nlevel = \"loud\"\n", "log.level"),
        ("[metrics]\nlisten = \"0.0.0.0:9464\"\n", "metrics.listen"),
    ] {
        std::fs::write(&config, text).expect("configuration file");
        let output = run_to_end(&data, &["--config", config.to_str().expect("utf-8 path")]);
        assert!(!output.status.success(), "{text}: {:?}", output.status);
        let lines = stderr_lines(&output);
        assert_eq!(lines.len(), 1, "{text}: exactly one line: {lines:#?}");
        assert!(
            lines[0].contains(key) && lines[0].contains("fleetgate.toml"),
            "{text}: {lines:?}"
        );
    }
}

/// Starts fleetd with `args` and the log filter `rust_log` through a pipe, runs `during`
/// against it, stops it with SIGTERM and returns what it logged.
fn log_of_a_run(
    data: &Path,
    args: &[&str],
    rust_log: &str,
    during: impl FnOnce(&Fleetd),
) -> String {
    let mut fleetd = Fleetd::start_with(FLEETD.as_ref(), data, |command| {
        command
            .args(args)
            .env("RUST_LOG", rust_log)
            .stderr(Stdio::piped());
    });
    let mut stderr = fleetd.take_stderr().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    during(&fleetd);
    assert!(fleetd.terminate().success());
    reader.join().expect("the log is read")
}

/// A TLS handshake by `openssl s_client` that sends the IP address `127.0.0.1` as SNI, as
/// mosquitto does; whether it was established.
fn handshake_with_an_ip_as_sni(fleetd: &Fleetd, data: &Path) -> bool {
    let output = Command::new("openssl")
        .args(["s_client", "-brief", "-connect", &fleetd.server])
        .args(["-servername", "127.0.0.1", "-CAfile"])
        .arg(data.join("ca.pem"))
        .stdin(Stdio::null())
        .output()
        .expect("openssl runs (the process tests need the openssl command)");
    let said = String::from_utf8_lossy(&output.stderr).into_owned()
        + &String::from_utf8_lossy(&output.stdout);
    said.contains("CONNECTION ESTABLISHED")
}

#[test]
fn the_log_through_a_pipe_has_no_colour_codes_and_json_lines_parse() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let text = log_of_a_run(&data, &[], "info", |_| {});
    assert!(text.contains("fleetd ready"), "{text}");
    assert!(!text.contains("\x1b["), "no ANSI codes: {text:?}");

    let json = log_of_a_run(&data, &["--log-format", "json"], "info", |_| {});
    let lines: Vec<&str> = json.lines().collect();
    assert!(lines.len() >= 3, "ready, shutting down, stopped: {json}");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(
            value["level"].is_string() && value["fields"].is_object(),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l.contains("SIGTERM: shutting down")),
        "{json}"
    );
}

#[test]
fn a_client_that_sends_an_ip_address_as_sni_connects_and_is_not_warned_about() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let log = log_of_a_run(&data, &[], "info", |fleetd| {
        assert!(handshake_with_an_ip_as_sni(fleetd, &data), "handshake");
    });
    assert!(!log.contains("Illegal SNI"), "{log}");
    // rustls does warn, and it is the directive that keeps it out: asked for, it is there.
    let log = log_of_a_run(&data, &[], "info,rustls::msgs::handshake=warn", |fleetd| {
        assert!(handshake_with_an_ip_as_sni(fleetd, &data), "handshake");
    });
    assert!(log.contains("Illegal SNI"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_does_not_go_back_after_a_clean_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let mut fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let mut op = fleetd.operator().await;
    let station = fleetd.station(dir.path().join("SEEN-1"), "SEEN-1", "6.1.0");
    let fingerprint = op.wait_request("SEEN-1").await;
    op.call(
        "acceptStation",
        json!({"serial": "SEEN-1", "fingerprint": fingerprint}),
    )
    .await
    .expect("accepted");
    op.wait_state("SEEN-1", "running").await;
    // The station's record says when it last asked; its session ends in a later second.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    station.handle.shutdown().await;
    let offline = op
        .wait_view("SEEN-1", "offline", |v| v["online"] == false)
        .await;
    let before = offline["last_seen"].as_str().expect("last_seen").to_owned();
    assert!(
        before.len() == "2026-01-01T00:00:00Z".len(),
        "a time in whole seconds: {offline}"
    );
    drop(op);

    assert!(fleetd.terminate().success(), "a clean stop");
    let fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let op = fleetd.operator().await;
    let after = op.station("SEEN-1").await;
    let after = after["last_seen"].as_str().expect("last_seen").to_owned();
    // RFC 3339 UTC in whole seconds: the same length, so the text orders as the time.
    assert!(
        after >= before,
        "last_seen went back after the restart: {before} -> {after}"
    );
}
