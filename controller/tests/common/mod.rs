//! Shared by the tests that run `fleetd` as a process: start it on a data directory, read the
//! address it bound, connect its `admin` operator.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use fleet_ctl::OperatorClient;

/// A running `fleetd` process; killed when dropped.
pub(crate) struct Fleetd {
    pub(crate) child: Child,
    pub(crate) server: String,
}

impl Drop for Fleetd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `fleetd` on `data` at an ephemeral port; panics unless it starts cleanly.
pub(crate) fn start_fleetd(data: &Path) -> Fleetd {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetd"))
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
    Fleetd { child, server }
}

/// The `admin` operator of the data directory.
pub(crate) async fn operator(fleetd: &Fleetd, data: &Path) -> OperatorClient {
    let read = |f: &str| std::fs::read_to_string(data.join(f)).expect(f);
    OperatorClient::connect(
        &fleetd.server,
        &read("ca.pem"),
        &read("admin.pem"),
        &read("admin.key"),
        "admin",
    )
    .await
    .expect("operator connects")
}
