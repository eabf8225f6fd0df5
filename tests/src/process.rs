//! `fleetd` as a process, for the tests that SIGKILL it or read its memory: start it on a data
//! directory, read the address it bound, connect its `admin` operator, read its resident set
//! size, kill it. The caller names the binary: only the package that defines `fleetd`
//! (fleet-controller) is given its path by cargo (`CARGO_BIN_EXE_fleetd`), which also
//! guarantees that it was built.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::time::Duration;

use fleet_ctl::OperatorClient;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{Operator, Station};

/// How long a process test waits for any one expected thing: a restarted process warms up on
/// a store that grows with every cycle.
pub const PROCESS_PATIENCE: Duration = Duration::from_secs(30);

/// A running `fleetd` process; killed when dropped.
pub struct Fleetd {
    child: Child,
    /// `127.0.0.1:<port>`, the address it bound.
    pub server: String,
    data: PathBuf,
}

impl Drop for Fleetd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Fleetd {
    /// Starts the `fleetd` at `bin` on `data` at an ephemeral port; panics unless it starts
    /// cleanly.
    pub fn start(bin: &Path, data: &Path) -> Fleetd {
        Fleetd::spawn(Command::new(bin), data)
    }

    /// Like [`Fleetd::start`], with the configuration file `config` (TOML), written beside the
    /// data directory (`<data>.toml`); `--data-dir` and `--listen` still override it.
    pub fn start_with_config(bin: &Path, data: &Path, config: &str) -> Fleetd {
        let file = data.with_extension("toml");
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).expect("folder of the configuration file");
        }
        std::fs::write(&file, config).expect("configuration file");
        let mut command = Command::new(bin);
        command.arg("--config").arg(&file);
        Fleetd::spawn(command, data)
    }

    /// Like [`Fleetd::start`], with `configure` applied to the command last (more arguments,
    /// another `RUST_LOG`, a piped stderr: [`Fleetd::take_stderr`]).
    pub fn start_with(bin: &Path, data: &Path, configure: impl FnOnce(&mut Command)) -> Fleetd {
        let mut command = Command::new(bin);
        command
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        configure(&mut command);
        Fleetd::spawned(command, data)
    }

    fn spawn(mut command: Command, data: &Path) -> Fleetd {
        command
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        Fleetd::spawned(command, data)
    }

    /// Starts the `fleetd` at `bin` on `data` with the configuration `config`, as
    /// [`Fleetd::start_with_config`] does, without waiting for it to listen: a standby on a
    /// PostgreSQL store listens only once it serves ([`Starting::serving`]).
    pub fn launch_with_config(bin: &Path, data: &Path, config: &str) -> Starting {
        let file = data.with_extension("toml");
        std::fs::write(&file, config).expect("configuration file");
        let mut command = Command::new(bin);
        command
            .arg("--config")
            .arg(&file)
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("fleetd starts");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, line) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(stdout).read_line(&mut first);
            let _ = tx.send(first);
        });
        Starting {
            child: Some(child),
            line,
            data: data.to_owned(),
        }
    }

    fn spawned(mut command: Command, data: &Path) -> Fleetd {
        let mut child = command.spawn().expect("fleetd starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("fleetd prints its address");
        let server = line
            .trim()
            .strip_prefix("fleetd listening on ")
            .unwrap_or_else(|| panic!("fleetd did not start cleanly: {line:?}"))
            .to_owned();
        Fleetd {
            child,
            server,
            data: data.to_owned(),
        }
    }

    /// Whether it has exited already (its status), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("wait for fleetd")
    }

    /// SIGKILL: no shutdown path runs. Returns once the process is reaped.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    /// SIGTERM (what systemd, Docker and `kill` send), then waits for the process to exit, at
    /// most [`PROCESS_PATIENCE`]; its exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("kill -TERM runs");
        assert!(status.success(), "kill -TERM {}: {status}", self.pid());
        let deadline = std::time::Instant::now() + PROCESS_PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for fleetd") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "fleetd did not exit within {PROCESS_PATIENCE:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its stderr, if it was piped ([`Fleetd::start_with`]); taken once.
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.child.stderr.take()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its resident set size now, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid()).expect("fleetd's VmRSS in /proc")
    }

    /// How many threads it runs now.
    pub fn threads(&self) -> u64 {
        threads(self.pid()).expect("fleetd's Threads in /proc")
    }

    /// The fleet CA of the data directory, PEM.
    pub fn ca_pem(&self) -> String {
        read(&self.data, "ca.pem")
    }

    /// A new MQTT 5 station `serial` (a self-signed key of its own) connected over TLS and
    /// admitted (waiting for approval), through the raw client ([`crate::raw`]).
    pub async fn v5_station(&self, serial: &str) -> TlsStream<TcpStream> {
        let key = fleet_certs::self_signed_station(serial).expect("station key");
        let config =
            fleet_certs::client_config(&self.ca_pem(), Some((&key.cert_pem, &key.key_pem)))
                .expect("TLS configuration");
        let connector = TlsConnector::from(std::sync::Arc::new(config));
        let tcp = TcpStream::connect(&self.server).await.expect("tcp");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let mut stream = connector.connect(name, tcp).await.expect("TLS handshake");
        let client_id = crate::serial(serial).client_id();
        let (code, reason) = crate::raw::connect_v5(&mut stream, &client_id).await;
        assert_eq!(code, 0, "admitted: {reason}");
        stream
    }

    /// The `admin` operator of the data directory, hearing tenant `default`'s events.
    pub async fn operator(&self) -> Operator {
        operator_of(&self.server, &self.data).await
    }

    /// A simulated station in its own state directory `dir`, booted against this process.
    pub fn station(&self, dir: PathBuf, serial: &str, firmware: &str) -> Station {
        Station::boot(dir, serial, firmware, self.server.clone(), self.ca_pem())
    }
}

/// A `fleetd` process that has not said where it listens yet ([`Fleetd::launch_with_config`]);
/// killed when dropped.
pub struct Starting {
    child: Option<Child>,
    line: std::sync::mpsc::Receiver<String>,
    data: PathBuf,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Starting {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether it has exited already (its status), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("wait for fleetd")
    }

    /// Waits (at most `patience`) until it listens, and returns it as a running [`Fleetd`];
    /// panics if it does not, or says something else.
    pub fn serving(mut self, patience: Duration) -> Fleetd {
        let line = match self.line.recv_timeout(patience) {
            Ok(line) => line,
            Err(_) => panic!("fleetd {} did not listen within {patience:?}", self.pid()),
        };
        let server = line
            .trim()
            .strip_prefix("fleetd listening on ")
            .unwrap_or_else(|| panic!("fleetd did not start cleanly: {line:?}"))
            .to_owned();
        let child = self.child.take().expect("a child until now");
        Fleetd {
            child,
            server,
            data: self.data.clone(),
        }
    }
}

fn read(data: &Path, file: &str) -> String {
    std::fs::read_to_string(data.join(file)).expect(file)
}

/// The `admin` operator of the fleetd at `server` whose data directory is `data` (its
/// `ca.pem`, `admin.pem` and `admin.key`), hearing tenant `default`'s events, with
/// [`PROCESS_PATIENCE`].
pub async fn operator_of(server: &str, data: &Path) -> Operator {
    let client = OperatorClient::connect(
        server,
        &read(data, "ca.pem"),
        &read(data, "admin.pem"),
        &read(data, "admin.key"),
        "admin",
    )
    .await
    .expect("operator connects");
    let mut operator = Operator::new(client, "default").await;
    operator.patience = PROCESS_PATIENCE;
    operator
}

/// The thread count of process `pid` (`Threads` of `/proc/<pid>/status`); `None` when there
/// is no such process.
pub fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Threads:"))
        .and_then(|count| count.trim().parse().ok())
}

/// The resident set size of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`); `None`
/// when there is no such process.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    fleet_sim::load::parse_vm_rss(&status)
}

/// `command`'s answer, asked again while the operator's connection is lost (its client
/// reconnects by itself) or the answer is late, for at most [`PROCESS_PATIENCE`]: right after
/// a failover or a store's return, a request in flight may be lost with its connection. An
/// answer that is an error (the controller refused the command) fails the test at once.
pub async fn call_until_answered(
    op: &Operator,
    command: &str,
    args: serde_json::Value,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + PROCESS_PATIENCE;
    loop {
        match op.call(command, args.clone()).await {
            Ok(answer) => return answer,
            Err(e @ fleet_ctl::ClientError::CommandFailed { .. }) => panic!("{command}: {e}"),
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "{command}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Audit records of successful `acceptStation`/`rejectStation`, counted by device (the audit
/// is read through [`call_until_answered`]).
pub async fn decisions(op: &Operator) -> std::collections::BTreeMap<String, usize> {
    let audit = call_until_answered(op, "listAuditLog", serde_json::json!({"limit": 1000})).await;
    let mut decided = std::collections::BTreeMap::new();
    for record in audit["records"].as_array().expect("records") {
        let action = record["action"].as_str().unwrap_or_default();
        if (action == "acceptStation" || action == "rejectStation") && record["outcome"] == "ok" {
            let device = record["device"].as_str().unwrap_or_default().to_owned();
            *decided.entry(device).or_default() += 1;
        }
    }
    decided
}

/// What a failover must keep: each acknowledged decision (`serial` → `authorized` or
/// `rejected`) is the station's state now, recorded once in the audit log, and no decision
/// was applied twice.
pub async fn assert_decisions_kept(
    op: &Operator,
    acknowledged: &std::collections::BTreeMap<String, &str>,
) {
    for (serial, outcome) in acknowledged {
        let view = op.station(serial).await;
        match *outcome {
            "authorized" => assert!(
                view["state"] == "running" || view["state"] == "not_running",
                "{serial}: {view}"
            ),
            other => assert_eq!(view["state"], other, "{serial}: {view}"),
        }
    }
    let decided = decisions(op).await;
    for (serial, count) in &decided {
        assert_eq!(*count, 1, "{serial} was decided {count} times");
    }
    for serial in acknowledged.keys() {
        assert_eq!(
            decided.get(serial),
            Some(&1),
            "{serial}'s decision is recorded"
        );
    }
}

/// Boots station `serial` again from its state directory `dir` against `server` (trusted by
/// `ca_pem`): an authorized one is told so; a rejected one stays rejected.
pub async fn assert_comes_back_with_state(
    op: &Operator,
    (server, ca_pem): (String, String),
    dir: PathBuf,
    serial: &str,
    outcome: &str,
) {
    let mut config = fleet_sim::SimConfig::new(server, ca_pem);
    config.retry = Duration::from_millis(200);
    let mut station = Station {
        serial: serial.to_owned(),
        handle: fleet_sim::spawn_station(&dir, config),
        dir,
    };
    if outcome == "authorized" {
        station.wait_event(fleet_sim::SimEvent::Authorized).await;
    } else {
        let view = op.station(serial).await;
        assert_eq!(view["state"], "rejected", "{serial} stays rejected: {view}");
    }
    station.handle.shutdown().await;
}
