//! A whole cluster in the test process: a private NATS cluster of three servers, one
//! controller node (redb store, simulated clock) and edges, each edge with its own copy of the
//! controller's data directory (CA certificate, server certificate and key) and its own
//! listener on `127.0.0.1:0`, on a different NATS server where there are enough.

use std::path::{Path, PathBuf};

use fleet_certs::data_dir;
use fleet_config::{Config, FirmwareImage, Role};
use fleet_controller::clock::Clock;
use fleet_controller::Node;
use fleet_ctl::OperatorClient;
use tempfile::TempDir;

use crate::nats::NatsCluster;
use crate::{Operator, Station, TestPhone, FIRMWARE_SIZE, PATIENCE};

pub struct TestCluster {
    pub nats: NatsCluster,
    pub controller: Node,
    pub edges: Vec<Node>,
    pub dir: TempDir,
    pub clock: Clock,
    controller_dir: PathBuf,
}

fn node_config(dir: &Path, role: Role, node: &str, nats: Vec<String>) -> Config {
    let mut config = Config::default();
    config.server.data_dir = dir.join(node);
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    config.server.cut_grace_ms = 3000;
    config.cluster.role = role;
    config.cluster.node = node.to_owned();
    config.cluster.nats = nats;
    config
}

/// Starts edge `name` on the NATS servers `nats`, with its own copy of the shared files of
/// `controller_dir` and a metrics endpoint.
async fn start_edge(dir: &Path, controller_dir: &Path, name: &str, nats: Vec<String>) -> Node {
    let mut config = node_config(dir, Role::Edge, name, nats);
    config.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
    std::fs::create_dir_all(&config.server.data_dir).expect("edge dir");
    for file in [
        data_dir::CA_CERT_FILE,
        data_dir::SERVER_CERT_FILE,
        data_dir::SERVER_KEY_FILE,
    ] {
        std::fs::copy(controller_dir.join(file), config.server.data_dir.join(file))
            .expect("copy the shared files");
    }
    Node::start(&config).await.expect("the edge starts")
}

impl TestCluster {
    /// Another edge, `name`, on the NATS servers `nats` (not one of [`TestCluster::edges`]).
    pub async fn start_edge(&self, name: &str, nats: Vec<String>) -> Node {
        start_edge(self.dir.path(), &self.controller_dir, name, nats).await
    }

    /// A controller and `edges` edges, every edge hearing the controller when this returns.
    pub async fn start(edges: usize) -> TestCluster {
        // On the blocking pool: it waits for the servers' routes without holding a worker.
        let nats = tokio::task::spawn_blocking(|| NatsCluster::start(3))
            .await
            .expect("the NATS cluster starts");
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("firmware-6.1.0.bin");
        let bytes: Vec<u8> = (0..FIRMWARE_SIZE).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&image, bytes).expect("firmware image");
        let mut config = node_config(dir.path(), Role::Controller, "controller", nats.urls());
        config.firmware.images.push(FirmwareImage {
            version: "6.1.0".into(),
            file: image,
            sha256: None,
        });
        // `fleetd init`, once: a cluster's controller does not make a CA of its own.
        data_dir::ensure(&config.server.data_dir, &[]).expect("fleetd init");
        let clock = Clock::simulated();
        let controller = Node::start_with_clock(&config, clock.clone())
            .await
            .expect("the controller starts");
        let controller_dir = config.server.data_dir.clone();
        let mut started = Vec::new();
        for i in 0..edges {
            // Each edge on its own NATS server: traffic between them crosses the routes.
            let name = format!("edge-{i}");
            started
                .push(start_edge(dir.path(), &controller_dir, &name, vec![nats.url(i % 3)]).await);
        }
        let cluster = TestCluster {
            nats,
            controller,
            edges: started,
            dir,
            clock,
            controller_dir,
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while !cluster
            .edges
            .iter()
            .all(|e| e.edge_link().is_some_and(|link| link.controller_heard()))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the edges never heard the controller"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        cluster
    }

    /// `HOST:PORT` of edge `i`.
    pub fn edge(&self, i: usize) -> String {
        let addr = self.edges[i].local_addr().expect("an edge listens");
        format!("127.0.0.1:{}", addr.port())
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.controller_dir.join(data_dir::CA_CERT_FILE)).expect("ca.pem")
    }

    /// The `admin` operator of tenant `default`, connected through edge `i`.
    pub async fn operator_on(&self, i: usize) -> Operator {
        self.try_operator_on(i).await.expect("operator connects")
    }

    /// Like [`TestCluster::operator_on`], or why the edge refused it.
    pub async fn try_operator_on(&self, i: usize) -> Result<Operator, fleet_ctl::ClientError> {
        let read = |name: &str| {
            std::fs::read_to_string(self.controller_dir.join(name)).expect("admin's files")
        };
        let client = OperatorClient::connect(
            &self.edge(i),
            &self.ca_pem(),
            &read("admin.pem"),
            &read("admin.key"),
            "admin",
        )
        .await?;
        Ok(Operator::new(client, "default").await)
    }

    /// A simulated station booted against edge `i`, its state directory its serial's.
    pub fn station_on(&self, i: usize, serial: &str, firmware: &str) -> Station {
        Station::boot(
            self.station_dir(serial),
            serial,
            firmware,
            self.edge(i),
            self.ca_pem(),
        )
    }

    /// A phone with MAC `mac` (no PAP typed yet), connecting through edge `i` from
    /// `source`. The same `mac` on another edge is the same phone (one state directory).
    pub fn phone_on(&self, i: usize, mac: &str, source: &str) -> TestPhone {
        use fleet_sim::phone::{PhoneProfile, PhoneState, PhoneTarget};
        let dir = self.dir.path().join("phones").join(mac);
        if !dir.exists() {
            PhoneState::init(&dir, &PhoneProfile::new(mac)).expect("phone init");
        }
        TestPhone {
            mac: mac.to_owned(),
            dir,
            target: PhoneTarget::new(self.edge(i), self.ca_pem())
                .with_source(source.parse().expect("source address")),
        }
    }

    pub fn station_dir(&self, serial: &str) -> PathBuf {
        self.dir.path().join("stations").join(serial)
    }
}
