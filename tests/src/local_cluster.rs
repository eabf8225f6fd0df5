//! A whole cluster of processes, as `deploy/local-cluster.sh up` starts it (three NATS servers,
//! PostgreSQL, two controllers, two edges), read from its `cluster.json` and stopped with
//! `down` when dropped; and a TCP balancer in front of the edges, as a customer would put one,
//! for the tests that `kill -9` an edge or a controller.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use std::time::Duration;

use fleet_ctl::OperatorClient;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::process::operator_of;
use crate::{Operator, Station};

/// The script under test.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/local-cluster.sh")
}

/// A cluster started by `deploy/local-cluster.sh up`; `down` when dropped.
pub struct LocalCluster {
    /// The cluster's directory (`DIR`), kept until the end of the test.
    pub dir: tempfile::TempDir,
    /// `cluster.json`, as the script wrote it.
    pub json: Value,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("down")
            .arg(self.dir.path())
            .output();
    }
}

impl LocalCluster {
    /// `up` with the `fleetd` at `fleetd`; panics, with the script's own words, unless the
    /// cluster answers.
    pub fn up(fleetd: &Path) -> LocalCluster {
        let dir = tempfile::Builder::new()
            .prefix("fleet-cluster-")
            .tempdir()
            .expect("tempdir");
        // PostgreSQL runs as `postgres` when the tests run as root: it must reach DIR.
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(dir.path(), mode).expect("DIR reachable");
        let output = Command::new(script())
            .arg("up")
            .arg(dir.path())
            .env("FLEETD", fleetd)
            .output()
            .expect("deploy/local-cluster.sh runs");
        let mut cluster = LocalCluster {
            json: Value::Null,
            dir,
        };
        assert!(
            output.status.success(),
            "local-cluster.sh up failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let text =
            std::fs::read_to_string(cluster.dir.path().join("cluster.json")).expect("cluster.json");
        cluster.json = serde_json::from_str(&text).expect("cluster.json is JSON");
        cluster
    }

    /// The edges' addresses, `HOST:PORT`.
    pub fn edges(&self) -> Vec<String> {
        self.json["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|e| e.as_str().expect("an address").to_owned())
            .collect()
    }

    /// The operators' files (`ca.pem`, `admin.pem`, `admin.key`).
    pub fn data_dir(&self) -> PathBuf {
        PathBuf::from(self.json["data_dir"].as_str().expect("data_dir"))
    }

    /// The fleet CA, PEM.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("ca.pem")).expect("ca.pem")
    }

    /// The process ids of `role` (`nats`, `postgres`, `edges`, `controllers`).
    pub fn pids(&self, role: &str) -> Vec<u32> {
        self.json["pids"][role]
            .as_array()
            .unwrap_or_else(|| panic!("pids.{role}"))
            .iter()
            .map(|p| u32::try_from(p.as_u64().expect("a pid")).expect("a pid"))
            .collect()
    }

    /// `local-cluster.sh postgres stop|start DIR`: PostgreSQL stopped under the cluster, or
    /// started again on its port.
    pub fn postgres(&self, action: &str) {
        let output = Command::new(script())
            .args(["postgres", action])
            .arg(self.dir.path())
            .output()
            .expect("deploy/local-cluster.sh runs");
        assert!(
            output.status.success(),
            "local-cluster.sh postgres {action}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// `kill -9` of the `i`th process of `role`.
    pub fn kill(&self, role: &str, i: usize) {
        let pid = self.pids(role)[i];
        let status = Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -9 {pid} ({role} {i})");
    }

    /// The `admin` operator connected through `edge`.
    pub async fn operator_on(&self, edge: &str) -> Operator {
        operator_of(edge, &self.data_dir()).await
    }

    /// An operator through `edge` once one answers (a controller serves): tries again, every
    /// 100 ms, for [`crate::process::PROCESS_PATIENCE`].
    pub async fn answering_operator(&self, edge: &str) -> Operator {
        let deadline = std::time::Instant::now() + crate::process::PROCESS_PATIENCE;
        loop {
            if let Some(client) = self.answer_through(edge, Duration::from_secs(10)).await {
                let mut operator = Operator::new(client, "default").await;
                operator.patience = crate::process::PROCESS_PATIENCE;
                return operator;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no operator answered through {edge}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One try: the `admin` operator connects through `edge` and its `listStations` is
    /// answered within `timeout`; the client, if so.
    pub async fn answer_through(&self, edge: &str, timeout: Duration) -> Option<OperatorClient> {
        let dir = self.data_dir();
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).expect(f);
        let client = OperatorClient::connect(
            edge,
            &read("ca.pem"),
            &read("admin.pem"),
            &read("admin.key"),
            "admin",
        )
        .await
        .ok()?
        .with_timeout(timeout);
        let answer = client.call("listStations", serde_json::json!({"limit": 1}));
        answer.await.ok().map(|_| client)
    }

    /// A simulated station in `dir`, booted against `server` (an edge or a [`Balancer`]).
    pub fn station(&self, dir: PathBuf, serial: &str, server: &str) -> Station {
        Station::boot(dir, serial, "6.1.0", server.to_owned(), self.ca_pem())
    }
}

/// A TCP balancer on `127.0.0.1:0`: each connection goes to the first backend that accepts it,
/// in order, and its bytes are copied both ways until either side closes. With the first edge
/// killed, devices that connect again reach the second, as behind any TCP load balancer.
pub struct Balancer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Balancer {
    pub async fn start(backends: Vec<String>) -> Balancer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let backends = Arc::new(backends);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let backends = backends.clone();
                tokio::spawn(async move {
                    for backend in backends.iter() {
                        if let Ok(mut server) = TcpStream::connect(backend).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                            return;
                        }
                    }
                });
            }
        });
        Balancer { addr, task }
    }

    /// `HOST:PORT`.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }
}
