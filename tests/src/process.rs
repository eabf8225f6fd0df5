//! `fleetd` as a process, for the tests that SIGKILL it: start it on a data directory, read the
//! address it bound, connect its `admin` operator, kill it. The caller names the binary: only
//! the package that defines `fleetd` (fleet-controller) is given its path by cargo
//! (`CARGO_BIN_EXE_fleetd`), which also guarantees that it was built.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fleet_ctl::OperatorClient;

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
        let mut child = Command::new(bin)
            .arg("--data-dir")
            .arg(data)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("fleetd starts");
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

    /// SIGKILL: no shutdown path runs. Returns once the process is reaped.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reaped");
    }

    /// The fleet CA of the data directory, PEM.
    pub fn ca_pem(&self) -> String {
        self.read("ca.pem")
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.data.join(file)).expect(file)
    }

    /// The `admin` operator of the data directory, hearing tenant `default`'s events.
    pub async fn operator(&self) -> Operator {
        let client = OperatorClient::connect(
            &self.server,
            &self.ca_pem(),
            &self.read("admin.pem"),
            &self.read("admin.key"),
            "admin",
        )
        .await
        .expect("operator connects");
        let mut operator = Operator::new(client, "default").await;
        operator.patience = PROCESS_PATIENCE;
        operator
    }

    /// A simulated station in its own state directory `dir`, booted against this process.
    pub fn station(&self, dir: PathBuf, serial: &str, firmware: &str) -> Station {
        Station::boot(dir, serial, firmware, self.server.clone(), self.ca_pem())
    }
}
