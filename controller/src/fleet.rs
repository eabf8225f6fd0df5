//! Wires one fleet service together: data directory and certificates, store, firmware catalog,
//! the front door with its router, and the controller on its in-process link. `fleetd` and the
//! integration tests both start the system through [`Fleet::start`].

use std::io::Read;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fleet_broker::{Broker, Bus, Settings};
use fleet_certs::data_dir::{self, FleetFiles};
use fleet_config::Config;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tracing::warn;

use crate::clock::Clock;
use crate::control::{
    ControlSettings, Controller, ControllerAdmission, Inbox, InboxItem, Publication, MAX_BATCH,
};
use crate::firmware::{parse_version, Catalog, FirmwareImage, FirmwarePolicy};
use crate::store::Store;

/// Name of the store file inside the data directory.
pub const STORE_FILE: &str = "fleet.redb";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("data directory: {0}")]
    Certificates(#[from] fleet_certs::CertError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("front door: {0}")]
    Broker(#[from] fleet_broker::BrokerError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("firmware image {path}: {reason}")]
    Firmware { path: PathBuf, reason: String },
}

/// A running fleet service.
pub struct Fleet {
    broker: Broker,
    controller: Arc<Controller>,
    bus_task: JoinHandle<()>,
    pub files: FleetFiles,
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

impl Fleet {
    /// Starts the whole service as configured. The listener is bound when this returns.
    pub async fn start(config: &Config) -> Result<Fleet, StartError> {
        Self::start_with_clock(config, Clock::system()).await
    }

    /// Like [`Fleet::start`], on the given clock (tests use a simulated one).
    pub async fn start_with_clock(config: &Config, clock: Clock) -> Result<Fleet, StartError> {
        let server = &config.server;
        let files = data_dir::ensure(&server.data_dir, &server.server_names)?;
        let mut manufacturer_cas = Vec::new();
        for path in &server.manufacturer_cas {
            let pem = std::fs::read_to_string(path).map_err(|e| {
                StartError::Config(format!("manufacturer CA {}: {e}", path.display()))
            })?;
            manufacturer_cas.extend(fleet_certs::certs_from_pem(&pem)?);
        }
        let policy = FirmwarePolicy {
            min_firmware: parse_version(&config.stations.min_firmware).ok_or_else(|| {
                StartError::Config("stations.min_firmware is not a version".into())
            })?,
            update_from: parse_version(&config.stations.update_from).ok_or_else(|| {
                StartError::Config("stations.update_from is not a version".into())
            })?,
        };
        let mut images = Vec::new();
        for image in &config.firmware.images {
            images.push(load_image(
                &image.version,
                &image.file,
                image.sha256.as_deref(),
            )?);
        }
        let store = Store::open(&server.data_dir.join(STORE_FILE))?;

        let settings = Settings {
            listen: server.listen,
            server_chain: fleet_certs::certs_from_pem(&files.server.cert_pem)?,
            server_key: fleet_certs::key_from_pem(&files.server.key_pem)?,
            fleet_ca: fleet_certs::certs_from_pem(files.ca.cert_pem())?,
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
        };
        let broker = Broker::bind(settings).await?;
        let bus = broker.local_bus("controller").await?;
        let signing_ca = fleet_certs::FleetCa::from_pem(files.ca.cert_pem(), &files.ca.key_pem())?;
        let (controller, outbox) = Controller::new(
            store,
            Arc::new(signing_ca),
            broker.sessions(),
            fleet_certs::OperatorRegistry::new(&server.data_dir),
            ControlSettings::from_config(config, policy, Catalog::new(images), clock),
        )?;
        let inbox = controller
            .take_inbox()
            .ok_or_else(|| StartError::Config("the controller's inbox is taken".into()))?;
        let bus_task = tokio::spawn(run_bus(bus, controller.clone(), outbox, inbox));
        broker.serve(Arc::new(ControllerAdmission(controller.clone())));
        Ok(Fleet {
            broker,
            controller,
            bus_task,
            files,
        })
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

    /// Stops accepting, cuts every session and stops the controller.
    pub fn shutdown(&self) {
        self.broker.shutdown();
        self.bus_task.abort();
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The controller's MQTT side: handles what arrives from the front door's inbox (devices'
/// messages and operator requests, straight from their sessions: the controller subscribes to
/// nothing in the router), publishes what the controller produced, in order.
async fn run_bus<B: Bus>(
    mut bus: B,
    controller: Arc<Controller>,
    mut outbox: tokio::sync::mpsc::UnboundedReceiver<Publication>,
    inbox: Inbox,
) {
    let Inbox {
        mut requests,
        mut devices,
    } = inbox;
    // Stations that waited unseen for too long are deleted, and sightings written; every minute.
    let mut sweep = tokio::time::interval(Duration::from_secs(60));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            // In this order: operators' requests (a reject is never queued behind a storm of
            // devices), then what earlier batches publish (events reach operators before more
            // is decided, and the outbox stays bounded), the sweep, and devices' messages.
            biased;
            Some(item) = requests.recv() => item,
            Some(p) = outbox.recv() => {
                if let Err(e) = bus.publish(&p.topic, p.payload, false) {
                    warn!("controller cannot publish: {e}");
                    return;
                }
                continue;
            }
            _ = sweep.tick() => {
                let expire = || {
                    controller.expire_pending();
                    controller.record_sightings();
                };
                match tokio::runtime::Handle::current().runtime_flavor() {
                    tokio::runtime::RuntimeFlavor::CurrentThread => expire(),
                    _ => tokio::task::block_in_place(expire),
                };
                continue;
            }
            Some(item) = devices.recv() => item,
        };
        // Whatever else has arrived is handled with it: one transaction, one fsync for the
        // whole batch (see `Controller::handle_batch`).
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            // Operators' requests first: a reject never waits behind a storm of devices.
            match requests.try_recv().or_else(|_| devices.try_recv()) {
                Ok(item) => batch.push(item),
                Err(_) => break,
            }
        }
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
}
