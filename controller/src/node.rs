//! The nodes of a cluster (`[cluster] role`): an edge (front door and router, no store) and a
//! controller (controller and store, no listener) on a NATS bus (`fleet_cluster`), or both in
//! one process. The single process, [`crate::Fleet`], stays the default.

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use fleet_broker::metrics::{Metrics, Probe, Readings};
use fleet_broker::{Broker, Registry};
use fleet_certs::data_dir;
use fleet_cluster::controller::{ClusterBus, ClusterSessions};
use fleet_cluster::edge::{Connection, EdgeLink};
use fleet_config::{Config, Role};
use fleet_protocol::{ClaimedClient, OPERATOR_CLIENT_ID_PREFIX};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::control::{Controller, ControllerAdmission};
use crate::fleet::{self, FleetProbe, StartError, DRAIN_GRACE, SESSIONS_GRACE};
use crate::store::Lease;

/// One node of a cluster: what its role runs.
pub struct Node {
    edge: Option<EdgeNode>,
    controller: Option<ControllerNode>,
}

impl Node {
    /// Starts what `[cluster] role` names (not `single`: that is [`crate::Fleet`]). A
    /// controller on a PostgreSQL store waits here while another holds the controller lock.
    pub async fn start(config: &Config) -> Result<Node, StartError> {
        Self::start_with_clock(config, Clock::system()).await
    }

    /// Like [`Node::start`], on the given clock (tests use a simulated one).
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Node, StartError> {
        let role = config.cluster.role;
        if role == Role::Single {
            return Err(StartError::Config(
                "cluster.role = \"single\" is not a node of a cluster".into(),
            ));
        }
        // One metrics endpoint per process: the edge's where there is an edge.
        let controller_metrics = !role.has_edge();
        let controller = match role.has_controller() {
            true => Some(ControllerNode::start(config, clock, controller_metrics).await?),
            false => None,
        };
        let edge = match role.has_edge() {
            true => Some(EdgeNode::start(config).await?),
            false => None,
        };
        Ok(Node { edge, controller })
    }

    /// The edge's listener, if this node has one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.edge.as_ref().map(|e| e.broker.local_addr())
    }

    /// The address the metrics endpoint bound (`[metrics] listen`), if it has one: the edge's
    /// when this node has an edge (with `role = "both"` the edge's is the node's only one),
    /// else the controller's.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        match (&self.edge, &self.controller) {
            (Some(edge), _) => edge.metrics_addr,
            (None, Some(controller)) => controller.metrics_addr,
            (None, None) => None,
        }
    }

    /// The controller, if this node runs it.
    pub fn controller(&self) -> Option<&Arc<Controller>> {
        self.controller.as_ref().map(|c| &c.controller)
    }

    /// The edge's link to the controller, if this node has an edge.
    pub fn edge_link(&self) -> Option<&Arc<EdgeLink>> {
        self.edge.as_ref().map(|e| &e.link)
    }

    /// The edge's sessions, if this node has an edge.
    pub fn sessions(&self) -> Option<Arc<Registry>> {
        self.edge.as_ref().map(|e| e.broker.sessions())
    }

    /// Resolves once this node's controller was deposed (its PostgreSQL store taken over by
    /// another); never for a node without a controller.
    pub async fn deposed(&self) -> String {
        fleet::deposed(self.controller.as_ref().and_then(|c| c.lease.clone())).await
    }

    /// True while the controller's store writer runs (always false without a controller).
    pub fn store_writer_alive(&self) -> Arc<AtomicBool> {
        match &self.controller {
            Some(c) => c.writer_alive.clone(),
            None => Arc::new(AtomicBool::new(false)),
        }
    }

    /// Stops gracefully: the edge's sessions end (their wills reach the controller over the
    /// bus while it still serves), then the controller handles what is queued and stops.
    pub async fn stop(mut self) {
        if let Some(edge) = self.edge.take() {
            edge.stop().await;
        }
        if let Some(controller) = self.controller.take() {
            controller.stop().await;
        }
    }

    /// Stops at once (tests).
    pub fn shutdown(&self) {
        if let Some(edge) = &self.edge {
            edge.shutdown();
        }
        if let Some(controller) = &self.controller {
            controller.shutdown();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A front door and its router, on the bus.
struct EdgeNode {
    broker: Broker,
    link: Arc<EdgeLink>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    metrics_addr: Option<SocketAddr>,
}

/// What an edge's metrics scrape reads: its sessions by the kind their client ids claim, and
/// whether a controller is heard; `/healthz` names the bus or the controller when either is
/// missing (the edge then refuses new devices).
struct EdgeProbe {
    link: Arc<EdgeLink>,
    sessions: Arc<Registry>,
    connection: Arc<Connection>,
}

impl Probe for EdgeProbe {
    fn read(&self) -> Readings {
        let mut sessions = [0i64; 4];
        for (client_id, _) in self.sessions.live_sessions() {
            let kind = match ClaimedClient::of(&client_id) {
                ClaimedClient::Station(_) => 0,
                ClaimedClient::Phone(_) => 1,
                ClaimedClient::Other if client_id.starts_with(OPERATOR_CLIENT_ID_PREFIX) => 2,
                ClaimedClient::Other => 3,
            };
            sessions[kind] += 1;
        }
        Readings {
            sessions,
            controller_heard: i64::from(self.link.controller_heard()),
            ..Readings::default()
        }
    }

    fn dead(&self) -> Vec<&'static str> {
        let mut dead = Vec::new();
        if self.connection.lost() {
            dead.push("bus");
        }
        if !self.link.running() {
            dead.push("bus link");
        }
        if !self.link.controller_heard() {
            dead.push("controller");
        }
        dead
    }
}

/// Reads a file of the shared data directory that an edge needs and must not make itself:
/// every node starts from copies of the same one (README, "Scaling out").
fn shared_file(config: &Config, name: &str) -> Result<String, StartError> {
    let path = config.server.data_dir.join(name);
    std::fs::read_to_string(&path).map_err(|e| {
        StartError::Config(format!(
            "an edge needs {} from the cluster's data directory (copy it from where `fleetd \
             init` made it): {e}",
            path.display()
        ))
    })
}

impl EdgeNode {
    async fn start(config: &Config) -> Result<EdgeNode, StartError> {
        let cluster = &config.cluster;
        let settings = fleet::front_door_settings(
            config,
            &shared_file(config, data_dir::SERVER_CERT_FILE)?,
            &shared_file(config, data_dir::SERVER_KEY_FILE)?,
            &shared_file(config, data_dir::CA_CERT_FILE)?,
        )?;
        let connection = Arc::new(Connection::default());
        let on_event = connection.clone();
        let probed = connection.clone();
        let client = fleet_cluster::connect(
            &cluster.nats,
            &format!("fleetd edge {}", cluster.node),
            move |event| on_event.on_event(event),
        )
        .await
        .map_err(|e| StartError::Config(format!("cluster.nats: {e}")))?;
        let link = EdgeLink::new(client, &cluster.node, cluster.request_timeout());
        let broker = Broker::bind(settings).await?;
        // Session ids name one session across the cluster: each edge counts from a random
        // base of its own (2^63 of them; a collision needs two equal 64-bit draws).
        broker
            .sessions()
            .number_sessions_from(fleet_cluster::random_u64() >> 1);
        let bus = broker.local_bus("edge").await?;
        let (stop, stopped) = watch::channel(false);
        let metrics_addr = match config.metrics.listen {
            Some(addr) => {
                let probe = EdgeProbe {
                    link: link.clone(),
                    sessions: broker.sessions(),
                    connection: probed,
                };
                Some(fleet::serve_metrics(addr, broker.metrics(), probe, stopped.clone()).await?)
            }
            None => None,
        };
        let task = tokio::spawn(
            link.clone()
                .run(broker.sessions(), bus, connection, stopped),
        );
        broker.serve(link.clone());
        info!(node = %cluster.node, listen = %broker.local_addr(), "edge ready");
        Ok(EdgeNode {
            broker,
            link,
            stop,
            task,
            metrics_addr,
        })
    }

    async fn stop(self) {
        self.broker.shutdown();
        if !self.broker.sessions_ended(SESSIONS_GRACE).await {
            warn!("some sessions did not end in time");
        }
        // The sessions' ends (and their wills) reach the controller before the link goes.
        self.link.flush(DRAIN_GRACE).await;
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(DRAIN_GRACE, self.task).await;
    }

    fn shutdown(&self) {
        self.broker.shutdown();
        let _ = self.stop.send(true);
    }
}

/// The controller and its store, on the bus; no listener.
struct ControllerNode {
    controller: Arc<Controller>,
    bus_task: Option<JoinHandle<()>>,
    bus_stop: watch::Sender<bool>,
    serve_task: JoinHandle<()>,
    serve_stop: watch::Sender<bool>,
    metrics_stop: watch::Sender<bool>,
    writer_alive: Arc<AtomicBool>,
    lease: Option<watch::Receiver<Lease>>,
    metrics_addr: Option<SocketAddr>,
}

impl ControllerNode {
    /// Starts the controller; it serves `[metrics] listen` when `with_metrics` (not when an
    /// edge in the same process does).
    async fn start(
        config: &Config,
        clock: Clock,
        with_metrics: bool,
    ) -> Result<ControllerNode, StartError> {
        let server = &config.server;
        let cluster = &config.cluster;
        // The controller holds the CA's key (it signs phones' certificates): `fleetd init`'s
        // data directory, copied. It never makes a CA of its own: a second controller that did
        // would, after a failover, sign phones with a CA that the edges do not trust.
        for name in [data_dir::CA_CERT_FILE, data_dir::CA_KEY_FILE] {
            let path = server.data_dir.join(name);
            if !path.exists() {
                return Err(StartError::Config(format!(
                    "a cluster's controller needs {} from the cluster's data directory: make it \
                     once with `fleetd init` and copy it to every controller",
                    path.display()
                )));
            }
        }
        let files = data_dir::ensure(&server.data_dir, &server.server_names)?;
        let policy = fleet::firmware_policy(config)?;
        let images = fleet::firmware_images(config)?;
        // A standby waits here for the controller lock, before it says anything on the bus.
        let store = fleet::open_store(config).await?;
        let writer_alive = store.writer_alive();
        let lease = store.lease();
        let metrics = Arc::new(Metrics::new());
        let (sessions, outbound) = ClusterSessions::new();
        let fleet::Wired {
            controller,
            bus_task,
            bus_stop,
        } = fleet::wire_controller(
            config,
            &files,
            (store, metrics.clone()),
            (policy, images, clock),
            sessions.clone(),
            ClusterBus::new(&sessions),
        )?;
        let reconnected = Arc::new(Connection::default());
        let on_event = reconnected.clone();
        let client = fleet_cluster::connect(
            &cluster.nats,
            &format!("fleetd controller {}", cluster.node),
            move |event| on_event.on_event(event),
        )
        .await
        .map_err(|e| StartError::Config(format!("cluster.nats: {e}")))?;
        let (serve_stop, serve_stopped) = watch::channel(false);
        let admission = Arc::new(ControllerAdmission(controller.clone()));
        let serve_task = tokio::spawn(async move {
            if let Err(e) = fleet_cluster::controller::serve(
                client,
                admission,
                sessions,
                outbound,
                reconnected,
                serve_stopped,
            )
            .await
            {
                warn!("the controller cannot serve the bus: {e}");
            }
        });
        let (metrics_stop, metrics_stopped) = watch::channel(false);
        let mut metrics_addr = None;
        if let Some(addr) = config.metrics.listen.filter(|_| with_metrics) {
            let probe = FleetProbe {
                controller: controller.clone(),
                sessions: Arc::new(Registry::default()),
                writer_alive: writer_alive.clone(),
            };
            metrics_addr = Some(fleet::serve_metrics(addr, metrics, probe, metrics_stopped).await?);
        }
        info!(node = %cluster.node, "controller ready");
        Ok(ControllerNode {
            controller,
            bus_task: Some(bus_task),
            bus_stop,
            serve_task,
            serve_stop,
            metrics_stop,
            writer_alive,
            lease,
            metrics_addr,
        })
    }

    async fn stop(mut self) {
        let _ = self.metrics_stop.send(true);
        // What the edges left (the wills of the sessions they ended) is in the inbox by now.
        let _ = self.bus_stop.send(true);
        if let Some(task) = self.bus_task.take() {
            if tokio::time::timeout(DRAIN_GRACE, task).await.is_err() {
                warn!("the controller did not finish its inbox in time");
            }
        }
        // The bus's last answers and events leave before the process ends (bounded).
        let _ = self.serve_stop.send(true);
        let _ = tokio::time::timeout(DRAIN_GRACE, &mut self.serve_task).await;
        let controller = self.controller.clone();
        let _ = tokio::task::spawn_blocking(move || controller.record_sightings()).await;
    }

    fn shutdown(&self) {
        let _ = self.metrics_stop.send(true);
        let _ = self.serve_stop.send(true);
        self.serve_task.abort();
        if let Some(task) = &self.bus_task {
            task.abort();
        }
    }
}
