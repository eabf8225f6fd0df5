//! Wires one fleet service together: data directory and certificates, store, firmware catalog,
//! the front door with its router, and the controller on its in-process link. `fleetd` and the
//! integration tests both start the system through [`Fleet::start`].

use std::io::Read;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_broker::metrics::{self, Metrics, Probe, Readings, SESSION_KINDS};
use fleet_broker::{Broker, Bus, Registry, Settings};
use fleet_certs::data_dir::{self, FleetFiles};
use fleet_config::Config;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::clock::Clock;
use crate::control::{
    ControlSettings, Controller, ControllerAdmission, Inbox, InboxItem, Published, MAX_BATCH,
};
use crate::firmware::{parse_version, Catalog, FirmwareImage, FirmwarePolicy};
use crate::store::{Lease, Store, StoreError};

/// Threads of the blocking pool at most on the runtime that runs sessions and the controller
/// (fleetd's own): session ends, router links, sweeps and firmware reads wait there, and a
/// batch's `block_in_place` hands its worker's place to one of its threads. The openings'
/// runtime has its own pool ([`fleet_broker::frontdoor::OPENINGS_BLOCKING_THREADS`]).
pub const SESSIONS_BLOCKING_THREADS: usize = 16;

/// Name of the store file inside the data directory.
pub const STORE_FILE: &str = "fleet.redb";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory: {0}")]
    Certificates(#[from] fleet_certs::CertError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error(
        "another fleetd is using the data directory {}: stop it first, or give this one \
         another --data-dir",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("metrics endpoint: cannot listen on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("front door: {0}")]
    Broker(#[from] fleet_broker::BrokerError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("firmware image {path}: {reason}")]
    Firmware { path: PathBuf, reason: String },
}

/// How long [`Fleet::stop`] waits for the sessions to end: each writes its server DISCONNECT
/// and hands its will to the controller. A session still writing to a client that does not
/// read by then (its write may take up to `server.write_timeout_ms`) ends with the process.
pub const SESSIONS_GRACE: Duration = Duration::from_secs(5);

/// How long [`Fleet::stop`] then waits for the controller to handle what the sessions left in
/// its inbox (their wills) and to publish what that produced.
pub const DRAIN_GRACE: Duration = Duration::from_secs(3);

/// How long [`Fleet::stop`] then waits for the last write of the sightings
/// ([`Controller::record_sightings`]); a store too slow for that loses at most a minute of
/// `last_seen`.
pub const SIGHTINGS_GRACE: Duration = Duration::from_secs(1);

/// A running fleet service.
pub struct Fleet {
    broker: Broker,
    controller: Arc<Controller>,
    bus_task: Option<JoinHandle<()>>,
    /// Tells the bus task to stop once its queues are empty ([`Fleet::stop`]).
    bus_stop: watch::Sender<bool>,
    /// Stops the metrics endpoint.
    metrics_stop: watch::Sender<bool>,
    metrics_addr: Option<SocketAddr>,
    writer_alive: Arc<AtomicBool>,
    /// A PostgreSQL store's standing with the controller lock ([`Fleet::deposed`]).
    lease: Option<watch::Receiver<Lease>>,
    pub files: FleetFiles,
}

/// How a [`Fleet::stop`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    /// Every session ended within [`SESSIONS_GRACE`].
    pub sessions_ended: bool,
    /// The controller handled everything queued within [`DRAIN_GRACE`].
    pub inbox_drained: bool,
}

fn load_image(
    version: &str,
    path: &Path,
    sha256: Option<&str>,
) -> Result<FirmwareImage, StartError> {
    let err = |reason: String| StartError::Firmware {
        path: path.to_owned(),
        reason,
    };
    let version = parse_version(version)
        .ok_or_else(|| err(format!("version {version:?} is not a version")))?;
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(|e| err(e.to_string()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hex::encode(hasher.finalize());
    if let Some(expected) = sha256 {
        if !expected.eq_ignore_ascii_case(&digest) {
            return Err(err(format!(
                "SHA-256 is {digest}, the configuration says {expected}"
            )));
        }
    }
    Ok(FirmwareImage {
        version,
        sha256: digest,
        size,
        path: path.to_owned(),
    })
}

/// The front door's settings from the configuration and the data directory's server
/// certificate, its key and the fleet CA's certificate (PEM).
pub(crate) fn front_door_settings(
    config: &Config,
    server_cert_pem: &str,
    server_key_pem: &str,
    ca_pem: &str,
) -> Result<Settings, StartError> {
    let server = &config.server;
    let mut manufacturer_cas = Vec::new();
    for path in &server.manufacturer_cas {
        let pem = std::fs::read_to_string(path)
            .map_err(|e| StartError::Config(format!("manufacturer CA {}: {e}", path.display())))?;
        manufacturer_cas.extend(fleet_certs::certs_from_pem(&pem)?);
    }
    Ok(Settings {
        listen: server.listen,
        server_chain: fleet_certs::certs_from_pem(server_cert_pem)?,
        server_key: fleet_certs::key_from_pem(server_key_pem)?,
        fleet_ca: fleet_certs::certs_from_pem(ca_pem)?,
        manufacturer_cas,
        allow_self_signed: server.allow_self_signed_stations,
        max_connections: server.max_connections as usize,
        handshake_timeout: server.handshake_timeout(),
        connect_timeout: server.connect_timeout(),
        max_packet_size: server.max_packet_size,
        idle_timeout: server.idle_timeout(),
        cut_grace: server.cut_grace(),
        write_timeout: server.write_timeout(),
        connections_per_ip_per_minute: config.limits.connections_per_ip_per_minute,
        sessions_per_ip: config.limits.sessions_per_ip as usize,
        reserved_sessions: config.limits.reserved_operator_sessions as usize,
        handshakes_per_ip: config.limits.handshakes_per_ip as usize,
        max_undelivered: config.limits.max_undelivered_messages as usize,
        handshake_threads: server.handshake_threads as usize,
    })
}

/// `[firmware] images`, each read whole and its SHA-256 checked.
pub(crate) fn firmware_images(config: &Config) -> Result<Vec<FirmwareImage>, StartError> {
    config
        .firmware
        .images
        .iter()
        .map(|image| load_image(&image.version, &image.file, image.sha256.as_deref()))
        .collect()
}

/// `[stations]`' versions as the firmware policy.
pub(crate) fn firmware_policy(config: &Config) -> Result<FirmwarePolicy, StartError> {
    Ok(FirmwarePolicy {
        min_firmware: parse_version(&config.stations.min_firmware)
            .ok_or_else(|| StartError::Config("stations.min_firmware is not a version".into()))?,
        update_from: parse_version(&config.stations.update_from)
            .ok_or_else(|| StartError::Config("stations.update_from is not a version".into()))?,
    })
}

/// Opens the store that the configuration names: the PostgreSQL database of `[store] url`, or
/// `fleet.redb` in the data directory. On the blocking pool: a PostgreSQL store waits there
/// while another fleetd holds the database's controller lock (this one is the standby), and
/// the caller may drop the wait (fleetd does on SIGTERM).
pub(crate) async fn open_store(config: &Config) -> Result<Store, StartError> {
    let data_dir = config.server.data_dir.clone();
    let url = config.store.url.clone();
    let cache_bytes = config.store.cache_bytes();
    let opened = tokio::task::spawn_blocking(move || match &url {
        Some(url) => Store::open_postgres(url).map_err(|e| {
            StartError::Config(format!(
                "store.url = {:?}: {e}",
                fleet_config::redacted_url(url)
            ))
        }),
        None => {
            Store::open_with_cache(&data_dir.join(STORE_FILE), cache_bytes).map_err(|e| match e {
                StoreError::AlreadyOpen(_) => StartError::InUse(data_dir.clone()),
                e => e.into(),
            })
        }
    })
    .await;
    opened.map_err(|e| StartError::Config(format!("the store's opening failed: {e}")))?
}

/// A controller on its store, with the task that feeds it ([`run_bus`]) running.
pub(crate) struct Wired {
    pub(crate) controller: Arc<Controller>,
    pub(crate) bus_task: JoinHandle<()>,
    pub(crate) bus_stop: watch::Sender<bool>,
}

/// Makes the controller on `store` (its commits timed into `metrics`), with the fleet CA of
/// `files` to sign with, the firmware policy and images, and `sessions` to change live
/// sessions through; starts [`run_bus`] on `bus`. The single process and a cluster's
/// controller node both start theirs here.
pub(crate) fn wire_controller<B: Bus>(
    config: &Config,
    files: &FleetFiles,
    (store, metrics): (Store, Arc<Metrics>),
    (policy, images, clock): (FirmwarePolicy, Vec<FirmwareImage>, Clock),
    sessions: Arc<dyn fleet_broker::SessionControl>,
    bus: B,
) -> Result<Wired, StartError> {
    store.time_commits(metrics.clone());
    let signing_ca = fleet_certs::FleetCa::from_pem(files.ca.cert_pem(), &files.ca.key_pem())?;
    let mut control_settings =
        ControlSettings::from_config(config, policy, Catalog::new(images), clock);
    control_settings.metrics = metrics.clone();
    let (controller, outbox) = Controller::new(
        store,
        Arc::new(signing_ca),
        sessions,
        fleet_certs::OperatorRegistry::new(&config.server.data_dir),
        control_settings,
    )?;
    let inbox = controller
        .take_inbox()
        .ok_or_else(|| StartError::Config("the controller's inbox is taken".into()))?;
    let (bus_stop, bus_stopped) = watch::channel(false);
    let bus_task = tokio::spawn(run_bus(
        bus,
        controller.clone(),
        outbox,
        inbox,
        (metrics, bus_stopped),
    ));
    Ok(Wired {
        controller,
        bus_task,
        bus_stop,
    })
}

impl Fleet {
    /// Starts the whole service as configured. The listener is bound when this returns.
    pub async fn start(config: &Config) -> Result<Fleet, StartError> {
        Self::start_with_clock(config, Clock::system()).await
    }

    /// Like [`Fleet::start`], on the given clock (tests use a simulated one).
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Fleet, StartError> {
        let server = &config.server;
        let files = data_dir::ensure(&server.data_dir, &server.server_names)?;
        let settings = front_door_settings(
            config,
            &files.server.cert_pem,
            &files.server.key_pem,
            files.ca.cert_pem(),
        )?;
        let policy = firmware_policy(config)?;
        let images = firmware_images(config)?;
        let store = open_store(config).await?;
        let writer_alive = store.writer_alive();
        let lease = store.lease();

        let broker = Broker::bind(settings).await?;
        let metrics = broker.metrics();
        let bus = broker.local_bus("controller").await?;
        let Wired {
            controller,
            bus_task,
            bus_stop,
        } = wire_controller(
            config,
            &files,
            (store, metrics.clone()),
            (policy, images, clock),
            broker.sessions(),
            bus,
        )?;
        broker.serve(Arc::new(ControllerAdmission(controller.clone())));
        let (metrics_stop, metrics_stopped) = watch::channel(false);
        let probe = FleetProbe {
            controller: controller.clone(),
            sessions: broker.sessions(),
            writer_alive: writer_alive.clone(),
        };
        let metrics_addr = match config.metrics.listen {
            Some(addr) => Some(serve_metrics(addr, metrics, probe, metrics_stopped).await?),
            None => None,
        };
        Ok(Fleet {
            broker,
            controller,
            bus_task: Some(bus_task),
            bus_stop,
            metrics_stop,
            metrics_addr,
            writer_alive,
            lease,
            files,
        })
    }

    /// Resolves, with the reason, once another fleetd has taken over this one's PostgreSQL
    /// database (`store/lease.rs`): this one must stop serving, its state in memory is no
    /// longer the truth and its store writes nothing. Never, for the redb store.
    pub async fn deposed(&self) -> String {
        deposed(self.lease.clone()).await
    }

    /// The address the metrics endpoint bound (`[metrics] listen`), if it has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The metrics the front door and the controller count into.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.broker.metrics()
    }

    /// True while the store's writer thread runs: it ends once the store is dropped, after
    /// committing what was queued (after [`Fleet::stop`], when the last user of the controller
    /// is gone).
    pub fn store_writer_alive(&self) -> Arc<AtomicBool> {
        self.writer_alive.clone()
    }

    /// Shuts down gracefully, in at most [`SESSIONS_GRACE`] + [`DRAIN_GRACE`] +
    /// [`SIGHTINGS_GRACE`] (9 s): stops
    /// accepting, ends every session with a server DISCONNECT and fires its will (a station's
    /// `status` will reaches the controller), lets the controller handle and commit what is
    /// left in its inbox and publish what that produced, and stops the metrics endpoint. The
    /// store is closed (its writer thread finishes what is queued and ends) when the returned
    /// value's caller drops the last handle to the controller: the `Fleet` itself is consumed
    /// here.
    pub async fn stop(mut self) -> Stopped {
        self.broker.shutdown();
        let _ = self.metrics_stop.send(true);
        let sessions_ended = self.broker.sessions_ended(SESSIONS_GRACE).await;
        // The bus task stops once its queues are empty: the wills are in them by now.
        let _ = self.bus_stop.send(true);
        let inbox_drained = match self.bus_task.take() {
            Some(task) => matches!(tokio::time::timeout(DRAIN_GRACE, task).await, Ok(Ok(()))),
            None => true,
        };
        // Last, when the sessions have ended: the sightings since the last sweep, so that a
        // station's `last_seen` does not go back after the restart.
        let controller = self.controller.clone();
        let sightings = tokio::task::spawn_blocking(move || controller.record_sightings());
        if tokio::time::timeout(SIGHTINGS_GRACE, sightings)
            .await
            .is_err()
        {
            tracing::warn!("the last sightings were not written in time");
        }
        Stopped {
            sessions_ended,
            inbox_drained,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.broker.local_addr()
    }

    /// Live sessions with a router link ([`Broker::router_links`]).
    pub fn router_links(&self) -> usize {
        self.broker.router_links()
    }

    pub fn controller(&self) -> &Arc<Controller> {
        &self.controller
    }

    /// Stops at once, without waiting for anything (tests; `fleetd` uses [`Fleet::stop`]):
    /// stops accepting, tells every session to end and aborts the controller's bus task.
    pub fn shutdown(&self) {
        self.broker.shutdown();
        let _ = self.metrics_stop.send(true);
        if let Some(task) = &self.bus_task {
            task.abort();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Resolves, with the reason, once the PostgreSQL store of `lease` was taken over by another
/// fleetd; never without a lease (the redb store).
pub(crate) async fn deposed(lease: Option<watch::Receiver<Lease>>) -> String {
    let Some(mut lease) = lease else {
        return std::future::pending().await;
    };
    loop {
        if let Lease::Deposed(why) = &*lease.borrow_and_update() {
            return why.clone();
        }
        if lease.changed().await.is_err() {
            // The store is gone (after `stop`): nothing will ever change.
            return std::future::pending().await;
        }
    }
}

/// Binds the metrics endpoint on `addr` and serves it until `stop`; the address it bound.
pub(crate) async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    probe: impl Probe,
    stop: watch::Receiver<bool>,
) -> Result<SocketAddr, StartError> {
    let listener = metrics::bind(addr)
        .await
        .map_err(|source| StartError::Metrics { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| StartError::Metrics { addr, source })?;
    tokio::spawn(metrics::serve(listener, metrics, Arc::new(probe), stop));
    info!(listen = %bound, "metrics endpoint ready (/metrics, /healthz)");
    Ok(bound)
}

/// What a metrics scrape reads: the controller's gauges, the sessions the front door has
/// that the controller does not know as a station, phone or operator, and whether the store's
/// writer runs.
pub(crate) struct FleetProbe {
    pub(crate) controller: Arc<Controller>,
    pub(crate) sessions: Arc<Registry>,
    pub(crate) writer_alive: Arc<AtomicBool>,
}

impl Probe for FleetProbe {
    fn read(&self) -> Readings {
        let mut readings = self.controller.readings();
        let known: i64 = readings.sessions.iter().sum();
        let registered = i64::try_from(self.sessions.len()).unwrap_or(i64::MAX);
        if let Some(other) = readings.sessions.get_mut(SESSION_KINDS.len() - 1) {
            *other = (registered - known).max(0);
        }
        readings
    }

    fn dead(&self) -> Vec<&'static str> {
        match self.writer_alive.load(Ordering::Relaxed) {
            true => Vec::new(),
            false => vec!["store writer"],
        }
    }
}

/// The controller's MQTT side: handles what arrives from the front door's inbox (devices'
/// messages and operator requests, straight from their sessions: the controller subscribes to
/// nothing in the router), publishes what the controller produced, in order. Once `stop` turns
/// true and nothing is queued, it publishes what is left and returns.
pub(crate) async fn run_bus<B: Bus>(
    mut bus: B,
    controller: Arc<Controller>,
    mut outbox: Published,
    inbox: Inbox,
    (metrics, mut stop): (Arc<Metrics>, watch::Receiver<bool>),
) {
    let Inbox {
        mut requests,
        mut devices,
    } = inbox;
    // Stations that waited unseen for too long are deleted, and sightings written; every minute.
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sweeping: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let (first, from_operator) = tokio::select! {
            // In this order: operators' requests (a reject is never queued behind a storm of
            // devices), then what earlier batches publish (all of it at once; in a storm it
            // waits up to a tick, `Published`, and devices' batches may be decided meanwhile),
            // the sweep, and devices' messages.
            biased;
            Some(item) = requests.recv() => (item, true),
            published = outbox.recv_all() => {
                for p in published {
                    if let Err(e) = bus.publish(&p.topic, p.payload, false) {
                        warn!("controller cannot publish: {e}");
                        return;
                    }
                }
                continue;
            }
            _ = sweep.tick() => {
                // On the blocking pool, not in this task: the sightings of 10,000 stations
                // are a commit of 10,000 rows, and an operator's reject must not wait for it.
                // A sweep still running when the next is due (a slow disk) is not doubled.
                if sweeping.as_ref().is_none_or(|s| s.is_finished()) {
                    let controller = Arc::clone(&controller);
                    let expire = move || {
                        controller.expire_pending();
                        controller.record_sightings();
                    };
                    sweeping = match tokio::runtime::Handle::current().runtime_flavor() {
                        tokio::runtime::RuntimeFlavor::CurrentThread => {
                            expire();
                            None
                        }
                        _ => Some(tokio::task::spawn_blocking(expire)),
                    };
                }
                continue;
            }
            Some(item) = devices.recv() => (item, false),
            // Last: only when nothing else is ready, i.e. everything queued was handled.
            _ = stop.wait_for(|stop| *stop) => break,
        };
        // Whatever else has arrived is handled with it: one transaction, one fsync for the
        // whole batch (see `Controller::handle_batch`).
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            // Operators' requests first: a reject never waits behind a storm of devices. A
            // batch that starts with a request takes requests only: its answers, cuts and
            // `authorized` wait for no device's messages, which come in the next batch.
            let next = requests.try_recv().or_else(|none| match from_operator {
                true => Err(none),
                false => devices.try_recv(),
            });
            match next {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
        metrics.batch(batch.len());
        let handle = || controller.handle_batch(batch.iter().map(InboxItem::incoming));
        // The batch ends with an fsync: let the runtime move the front door's tasks to
        // another worker meanwhile (not possible on a current-thread runtime, as in some
        // tests).
        let committed = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::CurrentThread => handle(),
            _ => tokio::task::block_in_place(handle),
        };
        // The batch is committed: the devices' inbox messages may be acknowledged (or, if it
        // failed, their sessions end unacknowledged and they send them again).
        for arrived in batch {
            arrived.handled(committed);
        }
    }
    // A sweep under way finishes its commit before the store is closed.
    if let Some(sweep) = sweeping.take() {
        let _ = sweep.await;
    }
    for p in outbox.close() {
        if let Err(e) = bus.publish(&p.topic, p.payload, false) {
            warn!("controller cannot publish: {e}");
            break;
        }
    }
}
