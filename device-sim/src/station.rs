//! The station's run loop (the tokio shell around the state directory, the command parser and
//! the firmware download): boot, connect (over [`crate::link`], from a chosen source address
//! if given), ask for authorization, obey `cmd`, reboot.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_protocol::{Serial, StationLeaf, Topic};
use rumqttc::mqttbytes::v4::{
    Connect, ConnectReturnCode, LastWill, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use rumqttc::mqttbytes::QoS;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::command::Command;
use crate::firmware::{ChunkMessage, DiskPartFile, Download, Step, UpdateOrder};
use crate::link::{Link, LinkError};
use crate::state::{self, Identity, PendingUpdate, StationState};

/// Keepalive the station asks for; it pings once per keepalive.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long a clean disconnect may take before the connection is just dropped.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

/// How a station reaches the server.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// `HOST:PORT` (`[::1]:8883` for IPv6); HOST is also the TLS server name.
    pub server: String,
    /// The fleet CA certificate (PEM) that the server certificate must chain to.
    pub ca_pem: String,
    /// Pause before connecting again after a refusal or a lost connection; each pause is
    /// stretched by a random part of up to the same length again, so that a fleet that lost
    /// its connections together does not come back in lockstep.
    pub retry: Duration,
    /// Longest wait for the TCP, TLS and MQTT connect together. 5 s would be too short for a
    /// fleet reconnecting at once: 10,000 stations at 1,000 connections a second take 10 s,
    /// and each timed-out station would come back on top of the others.
    pub connect_timeout: Duration,
    /// Local source address to connect from (e.g. 127.0.0.2, to play a station behind that
    /// IP); the system's choice when `None`.
    pub source: Option<IpAddr>,
    /// A runtime to open connections on (TCP, TLS, CONNECT and CONNACK), after which the
    /// connection moves to the station's own runtime; `None` opens them where the station
    /// runs. The load tool keeps a fleet's handshakes off the runtime of its connected
    /// stations, whose latencies it measures.
    pub dialer: Option<tokio::runtime::Handle>,
}

impl SimConfig {
    /// A configuration with a 1 s retry, connecting from the system's choice of address.
    pub fn new(server: impl Into<String>, ca_pem: impl Into<String>) -> Self {
        SimConfig {
            server: server.into(),
            ca_pem: ca_pem.into(),
            retry: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(30),
            source: None,
            dialer: None,
        }
    }
}

/// `retry` stretched by a random fraction of itself (`[retry, 2 × retry)`).
fn jittered(retry: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh `RandomState` is randomly keyed: enough to spread reconnects, no crypto needed.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    retry + retry.mul_f64((random % 1_000) as f64 / 1_000.0)
}

/// Something a station did or had done to it, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SimEvent {
    /// The station booted and is about to connect.
    Booted {
        /// Installed firmware.
        firmware: String,
        /// Fingerprint of its key (`None` for legacy firmware).
        fingerprint: Option<String>,
    },
    /// CONNACK accepted.
    Connected {
        /// A client certificate was presented (firmware 6.1.0 or later).
        with_certificate: bool,
    },
    /// CONNACK refused, e.g. `NotAuthorized`.
    Refused {
        /// The name of the return code (`NotAuthorized`, `ServiceUnavailable`, …).
        code: String,
        /// Why, as the server said it (the MQTT 5 Reason String), if it did.
        reason: Option<String>,
    },
    /// The connection was lost or could not be made.
    Disconnected {
        /// Why.
        reason: String,
        /// The server closed the connection before the TLS handshake was done (fleetd does,
        /// past a per-address limit): [`LinkError::ClosedBeforeTls`].
        closed_before_tls: bool,
    },
    /// `power_off()`: the connection was dropped without DISCONNECT.
    PoweredOff,
    /// A `cmd` arrived (sent before the event of what it did).
    Command {
        /// The `command` field.
        command: String,
        /// The whole payload.
        payload: Value,
    },
    /// `authorized` obeyed.
    Authorized,
    /// `rejected` obeyed.
    Rejected,
    /// `removed` obeyed; a reboot follows.
    Removed,
    /// `reset` applied locally; a reboot follows.
    ResetApplied,
    /// Firmware download: `offset` of `total` bytes stored, the next chunk asked for.
    UpdateProgress {
        /// Bytes stored.
        offset: u64,
        /// Image size.
        total: u64,
    },
    /// The image did not match its checksum; downloading again from 0.
    UpdateRestarted {
        /// Restarts so far.
        restarts: u32,
        /// Why.
        reason: String,
    },
    /// The image is installed; a reboot follows.
    UpdateInstalled {
        /// The new firmware.
        version: String,
    },
    /// The update was abandoned.
    UpdateFailed {
        /// Why.
        reason: String,
    },
    /// The station is rebooting.
    Rebooting,
    /// A local failure (state directory, TLS setup, server address).
    Error {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for SimEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimEvent::Booted {
                firmware,
                fingerprint: Some(fp),
            } => write!(f, "booted firmware {firmware}, fingerprint {fp}"),
            SimEvent::Booted {
                firmware,
                fingerprint: None,
            } => write!(f, "booted firmware {firmware} (legacy, no key pair)"),
            SimEvent::Connected { with_certificate } => {
                if *with_certificate {
                    write!(f, "connected with certificate")
                } else {
                    write!(f, "connected without certificate")
                }
            }
            SimEvent::Refused {
                code,
                reason: Some(reason),
            } => write!(f, "refused: {reason} ({code})"),
            SimEvent::Refused { code, reason: None } => write!(f, "refused: {code}"),
            SimEvent::Disconnected { reason, .. } => write!(f, "disconnected: {reason}"),
            SimEvent::PoweredOff => write!(f, "powered off"),
            SimEvent::Command { payload, .. } => write!(f, "command {payload}"),
            SimEvent::Authorized => write!(f, "authorized"),
            SimEvent::Rejected => write!(f, "rejected"),
            SimEvent::Removed => write!(f, "removed"),
            SimEvent::ResetApplied => write!(f, "reset applied"),
            SimEvent::UpdateProgress { offset, total } => {
                write!(f, "update progress {offset}/{total}")
            }
            SimEvent::UpdateRestarted { restarts, reason } => {
                write!(f, "update restarted ({restarts}): {reason}")
            }
            SimEvent::UpdateInstalled { version } => write!(f, "update installed: {version}"),
            SimEvent::UpdateFailed { reason } => write!(f, "update failed: {reason}"),
            SimEvent::Rebooting => write!(f, "rebooting"),
            SimEvent::Error { reason } => write!(f, "error: {reason}"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Reboot,
    PowerOff,
    PowerOn,
    Shutdown,
}

/// A cloneable remote control of a running station (for the local admin channel).
#[derive(Clone, Debug)]
pub struct StationControl {
    tx: mpsc::UnboundedSender<Control>,
}

impl StationControl {
    /// Disconnects cleanly and boots again, re-reading the state directory. False if the
    /// station's task has ended.
    pub fn reboot(&self) -> bool {
        self.tx.send(Control::Reboot).is_ok()
    }

    /// Drops the connection without DISCONNECT (the will fires) and stays off until
    /// [`StationControl::power_on`] or [`StationControl::reboot`].
    pub fn power_off(&self) -> bool {
        self.tx.send(Control::PowerOff).is_ok()
    }

    /// Boots a powered-off station.
    pub fn power_on(&self) -> bool {
        self.tx.send(Control::PowerOn).is_ok()
    }
}

/// An event and when the station's task emitted it: the load tool's latencies end here, not
/// when a task reading the events got round to it (under load, one more scheduling hop).
type Stamped = (SimEvent, Instant);

/// A running simulated station.
#[derive(Debug)]
pub struct StationHandle {
    /// What the station does, in order.
    events: mpsc::UnboundedReceiver<Stamped>,
    control: StationControl,
    task: JoinHandle<()>,
}

impl StationHandle {
    /// The next event; `None` once the station has shut down.
    pub async fn next_event(&mut self) -> Option<SimEvent> {
        self.events.recv().await.map(|(event, _)| event)
    }

    /// The next event with the moment the station emitted it; `None` once the station has
    /// shut down.
    pub async fn next_stamped_event(&mut self) -> Option<(SimEvent, Instant)> {
        self.events.recv().await
    }

    /// See [`StationControl::reboot`].
    pub fn reboot(&self) -> bool {
        self.control.reboot()
    }

    /// See [`StationControl::power_off`].
    pub fn power_off(&self) -> bool {
        self.control.power_off()
    }

    /// See [`StationControl::power_on`].
    pub fn power_on(&self) -> bool {
        self.control.power_on()
    }

    /// A remote control that outlives borrowing the handle.
    pub fn control(&self) -> StationControl {
        self.control.clone()
    }

    /// Disconnects cleanly and ends the station's task.
    pub async fn shutdown(self) {
        let _ = self.control.tx.send(Control::Shutdown);
        let _ = self.task.await;
    }
}

/// Boots the station kept in `dir` (made with [`StationState::init`]) and keeps it running
/// until shut down; must be called within a tokio runtime.
pub fn spawn_station(dir: impl Into<PathBuf>, config: SimConfig) -> StationHandle {
    let dir = dir.into();
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run_station(dir, config, control_rx, events_tx));
    StationHandle {
        events: events_rx,
        control: StationControl { tx: control_tx },
        task,
    }
}

pub use fleet_certs::split_server;

/// What the run loop does after a boot ends.
enum Next {
    Boot,
    Reboot,
    Retry,
    Off,
    Shutdown,
}

struct Emitter {
    serial: String,
    tx: mpsc::UnboundedSender<Stamped>,
}

impl Emitter {
    fn emit(&self, event: SimEvent) {
        let at = Instant::now();
        tracing::info!(serial = %self.serial, "{event}");
        // Nobody listening is fine: the station runs on.
        let _ = self.tx.send((event, at));
    }
}

async fn run_station(
    dir: PathBuf,
    config: SimConfig,
    mut control: mpsc::UnboundedReceiver<Control>,
    events: mpsc::UnboundedSender<Stamped>,
) {
    let serial = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut emitter = Emitter { serial, tx: events };
    let mut next = Next::Boot;
    // Kept across reboots while the key stays the same, so that a reconnect resumes its TLS
    // session like a real device's TLS stack would.
    let mut tls_cache: TlsCache = None;
    loop {
        next = match next {
            Next::Boot => boot(&dir, &config, &mut control, &mut emitter, &mut tls_cache).await,
            Next::Reboot => {
                emitter.emit(SimEvent::Rebooting);
                Next::Boot
            }
            Next::Retry => {
                tokio::select! {
                    () = tokio::time::sleep(jittered(config.retry)) => Next::Boot,
                    command = control.recv() => match command {
                        Some(Control::Reboot) => Next::Reboot,
                        Some(Control::PowerOn) => Next::Boot,
                        Some(Control::PowerOff) => {
                            emitter.emit(SimEvent::PoweredOff);
                            Next::Off
                        }
                        Some(Control::Shutdown) | None => Next::Shutdown,
                    },
                }
            }
            Next::Off => match control.recv().await {
                Some(Control::PowerOn | Control::Reboot) => Next::Boot,
                Some(Control::PowerOff) => Next::Off,
                Some(Control::Shutdown) | None => Next::Shutdown,
            },
            Next::Shutdown => return,
        };
    }
}

/// The TLS client configuration of the last boot, by the certificate it presents.
type TlsCache = Option<(Option<String>, Arc<rustls::ClientConfig>)>;

/// One boot: read the state directory, connect, run until the connection ends or the
/// station is told to reboot, power off or shut down.
async fn boot(
    dir: &Path,
    config: &SimConfig,
    control: &mut mpsc::UnboundedReceiver<Control>,
    emitter: &mut Emitter,
    tls_cache: &mut TlsCache,
) -> Next {
    let Some((state, identity)) = read_state(dir, emitter) else {
        return Next::Retry;
    };
    emitter.emit(SimEvent::Booted {
        firmware: state.record.firmware.clone(),
        fingerprint: identity.as_ref().map(|i| i.fingerprint.to_string()),
    });
    let Some(tls) = tls_config(config, identity.as_ref(), tls_cache, emitter) else {
        return Next::Off;
    };
    if split_server(&config.server).is_none() {
        emitter.emit(SimEvent::Error {
            reason: format!("server address {:?} is not HOST:PORT", config.server),
        });
        return Next::Off;
    }
    let serial = state.serial().clone();
    let firmware = state.record.firmware.clone();
    let mut session = Session::new(dir, serial, firmware, identity.is_none(), emitter);
    let connect = connect(config, tls, session.connect_packet());
    let Some(link) = session.connecting(connect, control).await else {
        return session.next.take().unwrap_or(Next::Retry);
    };
    session.run(link, control).await
}

/// The station's state and its key pair (made on the first boot of firmware that has one);
/// `None` once the reason they cannot be read is reported.
fn read_state(dir: &Path, emitter: &mut Emitter) -> Option<(StationState, Option<Identity>)> {
    let state = match StationState::open(dir) {
        Ok(state) => state,
        Err(e) => {
            emitter.emit(SimEvent::Error {
                reason: e.to_string(),
            });
            return None;
        }
    };
    emitter.serial = state.serial().to_string();
    let identity = match state.ensure_identity() {
        Ok(identity) => identity,
        Err(e) => {
            emitter.emit(SimEvent::Error {
                reason: e.to_string(),
            });
            return None;
        }
    };
    Some((state, identity))
}

/// The TLS client configuration that presents `identity`'s certificate (none for legacy
/// firmware): the cached one while the certificate stays the same; `None` once the reason it
/// cannot be made is reported.
fn tls_config(
    config: &SimConfig,
    identity: Option<&Identity>,
    tls_cache: &mut TlsCache,
    emitter: &Emitter,
) -> Option<Arc<rustls::ClientConfig>> {
    let presented = identity.map(|i| i.cert_pem.clone());
    match tls_cache {
        Some((cert, tls)) if *cert == presented => Some(tls.clone()),
        _ => match fleet_certs::client_config(
            &config.ca_pem,
            identity.map(|i| (i.cert_pem.as_str(), i.key_pem.as_str())),
        ) {
            Ok(tls) => {
                let tls = Arc::new(tls);
                *tls_cache = Some((presented, tls.clone()));
                Some(tls)
            }
            Err(e) => {
                emitter.emit(SimEvent::Error {
                    reason: format!("TLS configuration: {e}"),
                });
                None
            }
        },
    }
}

/// TCP (from the configured source address), TLS and `connect`, within the connect timeout,
/// on the configured dialer if there is one: the link and the CONNACK's return code.
async fn connect(
    config: &SimConfig,
    tls: Arc<rustls::ClientConfig>,
    connect: Connect,
) -> Result<(Link, (ConnectReturnCode, Option<String>)), LinkError> {
    let Some(dialer) = &config.dialer else {
        return connect_here(config, tls, connect).await;
    };
    let server = config.server.clone();
    let config = config.clone();
    let opening = dialer.spawn(async move {
        let (mut link, answer) = connect_here(&config, tls, connect).await?;
        link.detach()?;
        Ok::<_, LinkError>((link, answer))
    });
    let (mut link, answer) = opening.await.map_err(|e| LinkError::Connection {
        server,
        source: std::io::Error::other(format!("the dialer's task: {e}")),
    })??;
    link.attach()?;
    Ok((link, answer))
}

/// [`connect`] on the current runtime.
async fn connect_here(
    config: &SimConfig,
    tls: Arc<rustls::ClientConfig>,
    connect: Connect,
) -> Result<(Link, (ConnectReturnCode, Option<String>)), LinkError> {
    let limit = config.connect_timeout;
    let attempt = async {
        let mut link = Link::open(&config.server, config.source, tls, limit).await?;
        let answer = link.connect(connect).await?;
        Ok((link, answer))
    };
    crate::link::within(limit, "connection", attempt).await?
}

fn topic(serial: &Serial, leaf: StationLeaf) -> String {
    Topic::station(serial.clone(), leaf).to_string()
}

fn status_payload(online: bool, firmware: &str) -> Vec<u8> {
    json!({ "online": online, "firmware": firmware })
        .to_string()
        .into_bytes()
}

/// One connection's worth of station behaviour. The handlers only queue what they send
/// (`outbox`); the run loop writes it.
struct Session<'a> {
    dir: &'a Path,
    serial: Serial,
    firmware: String,
    legacy: bool,
    emitter: &'a Emitter,
    download: Option<Download<DiskPartFile>>,
    chunk_subscribed: bool,
    /// Packets to write, in order.
    outbox: Vec<Packet>,
    next_pkid: u16,
    /// A PINGREQ went out and its PINGRESP has not come yet.
    ping_outstanding: bool,
    /// How the boot ends, once that is decided.
    next: Option<Next>,
}

impl<'a> Session<'a> {
    fn new(
        dir: &'a Path,
        serial: Serial,
        firmware: String,
        legacy: bool,
        emitter: &'a Emitter,
    ) -> Self {
        Session {
            dir,
            serial,
            firmware,
            legacy,
            emitter,
            download: None,
            chunk_subscribed: false,
            outbox: Vec::new(),
            next_pkid: 1,
            ping_outstanding: false,
            next: None,
        }
    }

    /// The station's CONNECT: its client id, a clean session, an "offline" status as its will.
    fn connect_packet(&self) -> Connect {
        let mut connect = Connect::new(self.serial.client_id());
        connect.keep_alive = KEEP_ALIVE.as_secs().try_into().unwrap_or(u16::MAX);
        connect.clean_session = true;
        connect.last_will = Some(LastWill::new(
            topic(&self.serial, StationLeaf::Status),
            status_payload(false, &self.firmware),
            QoS::AtLeastOnce,
            true,
        ));
        connect
    }

    /// Waits for `connect` to end, obeying the controls meanwhile; the link once the CONNACK
    /// accepts the station, or `None` with `next` set (a refusal or a failure is reported).
    async fn connecting(
        &mut self,
        connect: impl std::future::Future<
            Output = Result<(Link, (ConnectReturnCode, Option<String>)), LinkError>,
        >,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Option<Link> {
        tokio::pin!(connect);
        loop {
            let command = tokio::select! {
                connected = &mut connect => break self.on_connect(connected),
                command = control.recv() => command,
            };
            self.next = match command {
                Some(Control::PowerOn) => continue,
                Some(Control::Reboot) => Some(Next::Reboot),
                Some(Control::PowerOff) => {
                    self.emitter.emit(SimEvent::PoweredOff);
                    Some(Next::Off)
                }
                Some(Control::Shutdown) | None => {
                    self.emit_shut_down();
                    Some(Next::Shutdown)
                }
            };
            return None;
        }
    }

    fn on_connect(
        &mut self,
        connected: Result<(Link, (ConnectReturnCode, Option<String>)), LinkError>,
    ) -> Option<Link> {
        match connected {
            Ok((link, (ConnectReturnCode::Success, _))) => return Some(link),
            // The server closes a refused connection itself.
            Ok((_, (code, reason))) => self.emitter.emit(SimEvent::Refused {
                code: format!("{code:?}"),
                reason,
            }),
            Err(e) => self.emitter.emit(SimEvent::Disconnected {
                reason: e.to_string(),
                closed_before_tls: matches!(e, LinkError::ClosedBeforeTls { .. }),
            }),
        }
        self.next = Some(Next::Retry);
        None
    }

    fn emit_shut_down(&self) {
        self.emitter.emit(SimEvent::Disconnected {
            reason: "shut down".to_owned(),
            closed_before_tls: false,
        });
    }

    /// Runs the connection until it ends or the station is told to reboot, power off or shut
    /// down.
    async fn run(
        &mut self,
        mut link: Link,
        control: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Next {
        self.emitter.emit(SimEvent::Connected {
            with_certificate: !self.legacy,
        });
        self.next = self.on_connected();
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
        loop {
            if let Some(next) = self.next.take() {
                self.disconnect_cleanly(link).await;
                return next;
            }
            if let Err(e) = self.flush(&mut link).await {
                return self.on_connection_lost(e);
            }
            tokio::select! {
                packet = link.recv("a packet") => match packet {
                    Ok(packet) => self.next = self.on_packet(packet),
                    Err(e) => return self.on_connection_lost(e),
                },
                _ = ping.tick() => {
                    if self.ping_outstanding {
                        let silence = LinkError::Timeout { waiting_for: "PINGRESP", limit: KEEP_ALIVE };
                        return self.on_connection_lost(silence);
                    }
                    self.ping_outstanding = true;
                    self.outbox.push(Packet::PingReq);
                }
                command = control.recv() => match command {
                    Some(Control::Reboot) => self.next = Some(Next::Reboot),
                    Some(Control::PowerOff) => {
                        // Dropping the link closes the socket without DISCONNECT.
                        drop(link);
                        self.emitter.emit(SimEvent::PoweredOff);
                        return Next::Off;
                    }
                    Some(Control::PowerOn) => {}
                    Some(Control::Shutdown) | None => {
                        self.disconnect_cleanly(link).await;
                        self.emit_shut_down();
                        return Next::Shutdown;
                    }
                },
            }
        }
    }

    /// Writes what the handlers queued.
    async fn flush(&mut self, link: &mut Link) -> Result<(), LinkError> {
        if self.outbox.is_empty() {
            return Ok(());
        }
        let packets = std::mem::take(&mut self.outbox);
        link.send_all(&packets).await
    }

    /// A packet from the server; `Some` when the boot ends.
    fn on_packet(&mut self, packet: Packet) -> Option<Next> {
        match packet {
            Packet::Publish(publish) => {
                if publish.qos == QoS::AtLeastOnce {
                    self.outbox.push(Packet::PubAck(PubAck::new(publish.pkid)));
                }
                self.on_publish(&publish.topic, &publish.payload)
            }
            Packet::SubAck(ack) => {
                if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                    tracing::warn!(serial = %self.serial, "subscription denied: {ack:?}");
                }
                None
            }
            Packet::PingResp => {
                self.ping_outstanding = false;
                None
            }
            Packet::PubAck(_) => None,
            other => {
                tracing::debug!(serial = %self.serial, "ignoring {other:?}");
                None
            }
        }
    }

    /// The connection is lost. A `cmd` that came with the broker cutting the station
    /// (rejected, reset, removed) was read and obeyed before: the link hands out every whole
    /// packet it read before it reports the end.
    fn on_connection_lost(&mut self, error: LinkError) -> Next {
        self.emitter.emit(SimEvent::Disconnected {
            reason: error.to_string(),
            closed_before_tls: false,
        });
        Next::Retry
    }

    fn pkid(&mut self) -> u16 {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        pkid
    }

    fn publish(&mut self, leaf: StationLeaf, retain: bool, payload: Vec<u8>) {
        let mut publish = Publish::new(topic(&self.serial, leaf), QoS::AtLeastOnce, payload);
        publish.retain = retain;
        publish.pkid = self.pkid();
        self.outbox.push(Packet::Publish(publish));
    }

    fn subscribe(&mut self, leaf: StationLeaf) {
        let mut subscribe = Subscribe::new(topic(&self.serial, leaf), QoS::AtLeastOnce);
        subscribe.pkid = self.pkid();
        self.outbox.push(Packet::Subscribe(subscribe));
    }

    fn subscribe_chunks(&mut self) {
        if !self.chunk_subscribed {
            self.subscribe(StationLeaf::FirmwareChunk);
            self.chunk_subscribed = true;
        }
    }

    fn error(&self, reason: String) {
        self.emitter.emit(SimEvent::Error { reason });
    }

    /// CONNACK: announce, subscribe, ask for authorization, resume a download.
    fn on_connected(&mut self) -> Option<Next> {
        self.publish(
            StationLeaf::Status,
            true,
            status_payload(true, &self.firmware),
        );
        self.subscribe(StationLeaf::Cmd);
        let state = match StationState::open(self.dir) {
            Ok(state) => state,
            Err(e) => {
                self.error(e.to_string());
                return None;
            }
        };
        if self.legacy || state.record.pending_update.is_some() {
            self.subscribe_chunks();
        }
        let record = &state.record;
        let request = json!({
            "serial": record.serial.as_str(),
            "model": record.model,
            "firmware": record.firmware,
            "mac_streaming": record.mac_streaming,
            "mac_control": record.mac_control,
        });
        self.publish(
            StationLeaf::AuthRequest,
            false,
            request.to_string().into_bytes(),
        );
        let pending = state.record.pending_update?;
        let mut sha256 = [0u8; 32];
        if hex::decode_to_slice(&pending.sha256, &mut sha256).is_err() {
            self.forget_update(&pending.version, "unreadable pending update".to_owned());
            return None;
        }
        let order = UpdateOrder {
            version: pending.version,
            sha256,
            size: pending.size,
        };
        self.start_download(order, pending.restarts)
    }

    fn on_publish(&mut self, topic_name: &str, payload: &[u8]) -> Option<Next> {
        match Topic::parse(topic_name) {
            Some(Topic::StationCmd(serial)) if serial == self.serial => self.on_command(payload),
            Some(Topic::StationFirmwareChunk(serial)) if serial == self.serial => {
                self.on_chunk(payload)
            }
            _ => {
                tracing::debug!(serial = %self.serial, "ignoring message on {topic_name}");
                None
            }
        }
    }

    fn on_command(&mut self, payload: &[u8]) -> Option<Next> {
        let (command, value) = match Command::parse(payload) {
            Ok(parsed) => parsed,
            Err(e) => {
                tracing::warn!(serial = %self.serial, "ignoring malformed command: {e}");
                return None;
            }
        };
        let name = value
            .get("command")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        self.emitter.emit(SimEvent::Command {
            command: name,
            payload: value,
        });
        match command {
            Command::Authorized => {
                match StationState::update(self.dir, |r| r.authorized = true) {
                    Ok(_) => self.emitter.emit(SimEvent::Authorized),
                    Err(e) => self.error(e.to_string()),
                }
                None
            }
            Command::Rejected => {
                // The broker cuts the station; it keeps asking after its retry pause.
                self.emitter.emit(SimEvent::Rejected);
                None
            }
            Command::Removed => {
                match StationState::update(self.dir, |r| r.authorized = false) {
                    Ok(_) => self.emitter.emit(SimEvent::Removed),
                    Err(e) => self.error(e.to_string()),
                }
                Some(Next::Reboot)
            }
            Command::Reset {
                delete_authentication,
                delete_configuration,
            } => {
                match state::local_reset(self.dir, delete_configuration, delete_authentication) {
                    Ok(()) => self.emitter.emit(SimEvent::ResetApplied),
                    Err(e) => self.error(e.to_string()),
                }
                Some(Next::Reboot)
            }
            Command::Update(order) => self.on_update(order),
            Command::Unknown(name) => {
                tracing::warn!(serial = %self.serial, "ignoring unknown command {name:?}");
                None
            }
        }
    }

    fn on_update(&mut self, order: UpdateOrder) -> Option<Next> {
        let sha256 = order.sha256_hex();
        let mut restarts = 0;
        let mut stale = Vec::new();
        let saved = StationState::update(self.dir, |record| {
            match &record.pending_update {
                Some(p)
                    if p.version == order.version && p.sha256 == sha256 && p.size == order.size =>
                {
                    restarts = p.restarts;
                }
                other => {
                    // A different image: what is stored belongs to nothing.
                    if let Some(p) = other {
                        stale.push(p.version.clone());
                    }
                    stale.push(order.version.clone());
                    record.pending_update = Some(PendingUpdate {
                        version: order.version.clone(),
                        sha256: sha256.clone(),
                        size: order.size,
                        restarts: 0,
                    });
                }
            }
        });
        if let Err(e) = saved {
            self.emitter.emit(SimEvent::UpdateFailed {
                reason: e.to_string(),
            });
            return None;
        }
        for version in stale {
            if let Err(e) = state::remove_file_if_present(&state::part_file(self.dir, &version)) {
                self.error(e.to_string());
            }
        }
        self.start_download(order, restarts)
    }

    fn start_download(&mut self, order: UpdateOrder, restarts: u32) -> Option<Next> {
        self.subscribe_chunks();
        let part = DiskPartFile::new(state::part_file(self.dir, &order.version));
        let mut download = Download::new(order, part, restarts);
        let step = download.start();
        self.download = Some(download);
        self.apply(step)
    }

    fn on_chunk(&mut self, payload: &[u8]) -> Option<Next> {
        let message = match ChunkMessage::parse(payload) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(serial = %self.serial, "ignoring malformed chunk: {e}");
                return None;
            }
        };
        let Some(download) = self.download.as_mut() else {
            tracing::debug!(serial = %self.serial, "chunk without a download in progress");
            return None;
        };
        let step = download.on_chunk(message);
        self.apply(step)
    }

    fn apply(&mut self, step: std::io::Result<Step>) -> Option<Next> {
        let version = self.download.as_ref().map(|d| d.order().version.clone())?;
        let step = match step {
            Ok(step) => step,
            Err(e) => Step::Failed {
                reason: format!("part file: {e}"),
            },
        };
        match step {
            Step::Request {
                request,
                offset,
                total,
            } => {
                self.emitter
                    .emit(SimEvent::UpdateProgress { offset, total });
                self.send_request(&request);
                None
            }
            Step::Restart {
                request,
                restarts,
                reason,
            } => {
                if let Err(e) = StationState::update(self.dir, |record| {
                    if let Some(pending) = record.pending_update.as_mut() {
                        pending.restarts = restarts;
                    }
                }) {
                    self.error(e.to_string());
                }
                self.emitter
                    .emit(SimEvent::UpdateRestarted { restarts, reason });
                self.send_request(&request);
                None
            }
            Step::Ignored { reason } => {
                tracing::debug!(serial = %self.serial, "chunk ignored: {reason}");
                None
            }
            Step::Complete => {
                self.download = None;
                let installed = StationState::update(self.dir, |record| {
                    record.firmware = version.clone();
                    record.pending_update = None;
                });
                if let Err(e) = installed {
                    self.emitter.emit(SimEvent::UpdateFailed {
                        reason: format!("cannot install: {e}"),
                    });
                    return None;
                }
                if let Err(e) = state::remove_file_if_present(&state::part_file(self.dir, &version))
                {
                    self.error(e.to_string());
                }
                self.emitter.emit(SimEvent::UpdateInstalled { version });
                Some(Next::Reboot)
            }
            Step::Failed { reason } => {
                self.forget_update(&version, reason);
                None
            }
        }
    }

    fn forget_update(&mut self, version: &str, reason: String) {
        self.download = None;
        if let Err(e) = StationState::update(self.dir, |record| record.pending_update = None) {
            self.error(e.to_string());
        }
        if let Err(e) = state::remove_file_if_present(&state::part_file(self.dir, version)) {
            self.error(e.to_string());
        }
        self.emitter.emit(SimEvent::UpdateFailed { reason });
    }

    fn send_request(&mut self, request: &crate::firmware::ChunkRequest) {
        match serde_json::to_vec(request) {
            Ok(payload) => self.publish(StationLeaf::FirmwareRequest, false, payload),
            Err(e) => self.error(format!("cannot encode chunk request: {e}")),
        }
    }

    /// Says "offline" and DISCONNECTs, so that the will does not fire.
    async fn disconnect_cleanly(&mut self, mut link: Link) {
        self.publish(
            StationLeaf::Status,
            true,
            status_payload(false, &self.firmware),
        );
        self.outbox.push(Packet::Disconnect);
        let packets = std::mem::take(&mut self.outbox);
        let said = tokio::time::timeout(DISCONNECT_GRACE, async {
            // A connection that breaks now ends anyway.
            let _ = link.send_all(&packets).await;
            link.close().await;
        })
        .await;
        if said.is_err() {
            tracing::debug!(serial = %self.serial, "clean disconnect timed out");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::state::{StationProfile, KEY_FILE};
    use sha2::{Digest, Sha256};

    /// A session that is never connected: what it sends stays in its outbox, where the test
    /// reads it (the fake transport).
    fn fake_session<'a>(dir: &'a Path, emitter: &'a Emitter, legacy: bool) -> Session<'a> {
        let state = StationState::open(dir).unwrap();
        Session::new(
            dir,
            state.serial().clone(),
            state.record.firmware,
            legacy,
            emitter,
        )
    }

    /// (topic, payload) of everything sent; subscriptions as ("SUBSCRIBE <filter>", null).
    fn sent(session: &mut Session<'_>) -> Vec<(String, Value)> {
        session
            .outbox
            .drain(..)
            .filter_map(|packet| match packet {
                Packet::Publish(p) => {
                    Some((p.topic.clone(), serde_json::from_slice(&p.payload).unwrap()))
                }
                Packet::Subscribe(s) => {
                    Some((format!("SUBSCRIBE {}", s.filters[0].path), Value::Null))
                }
                _ => None,
            })
            .collect()
    }

    /// Topic `leaf` of station `serial`.
    fn of(serial: &str, leaf: StationLeaf) -> String {
        topic(&serial.parse().unwrap(), leaf)
    }

    fn emitter() -> (Emitter, mpsc::UnboundedReceiver<Stamped>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Emitter {
                serial: "test".into(),
                tx,
            },
            rx,
        )
    }

    fn events(rx: &mut mpsc::UnboundedReceiver<Stamped>) -> Vec<SimEvent> {
        std::iter::from_fn(|| rx.try_recv().ok().map(|(event, _)| event)).collect()
    }

    fn image() -> Vec<u8> {
        (0..40_000u32).map(|i| (i % 253) as u8).collect()
    }

    fn update_command(image: &[u8]) -> Vec<u8> {
        json!({
            "command": "update",
            "version": "6.1.0",
            "sha256": hex::encode(Sha256::digest(image)),
            "size": image.len(),
        })
        .to_string()
        .into_bytes()
    }

    /// The controller's answer to a `firmware/request`.
    fn chunk_for(image: &[u8], request: &Value) -> Vec<u8> {
        let offset = request["offset"].as_u64().unwrap() as usize;
        let end = (offset + request["length"].as_u64().unwrap() as usize).min(image.len());
        ChunkMessage::Data {
            version: request["version"].as_str().unwrap().into(),
            offset: offset as u64,
            total: image.len() as u64,
            data: image[offset..end].to_vec(),
        }
        .to_json()
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_legacy_station_announces_itself_and_asks_for_authorization() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("OLD-1");
        StationState::init(&dir, &StationProfile::new("OLD-1", "6.0.5")).unwrap();
        let (emitter, _rx) = emitter();
        let mut session = fake_session(&dir, &emitter, true);
        assert!(session.on_connected().is_none());
        let sent = sent(&mut session);
        let topics: Vec<&str> = sent.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(
            topics,
            [
                of("OLD-1", StationLeaf::Status),
                format!("SUBSCRIBE {}", of("OLD-1", StationLeaf::Cmd)),
                format!("SUBSCRIBE {}", of("OLD-1", StationLeaf::FirmwareChunk)),
                of("OLD-1", StationLeaf::AuthRequest),
            ]
        );
        assert_eq!(sent[0].1, json!({"online": true, "firmware": "6.0.5"}));
        let request = &sent[3].1;
        assert_eq!(request["serial"], "OLD-1");
        assert_eq!(request["model"], "MC-Station");
        assert_eq!(request["firmware"], "6.0.5");
        assert_eq!(request["mac_streaming"].as_str().unwrap().len(), 12);
        assert_eq!(request["mac_control"].as_str().unwrap().len(), 12);
    }

    #[test]
    fn update_downloads_resumes_after_a_reboot_and_installs() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("OLD-2");
        StationState::init(&dir, &StationProfile::new("OLD-2", "6.0.5")).unwrap();
        let image = image();
        let (emitter, mut rx) = emitter();

        // First boot: the update starts, one chunk arrives, then the power goes.
        let mut session = fake_session(&dir, &emitter, true);
        session.on_connected();
        sent(&mut session);
        assert!(session
            .on_publish(&of("OLD-2", StationLeaf::Cmd), &update_command(&image))
            .is_none());
        let (topic, request) = sent(&mut session).pop().unwrap();
        assert_eq!(topic, of("OLD-2", StationLeaf::FirmwareRequest));
        assert_eq!(
            request,
            json!({"version": "6.1.0", "offset": 0, "length": 16384})
        );
        session.on_publish(
            &of("OLD-2", StationLeaf::FirmwareChunk),
            &chunk_for(&image, &request),
        );
        drop(session);
        assert_eq!(
            std::fs::metadata(dir.join("firmware-6.1.0.part"))
                .unwrap()
                .len(),
            16384
        );

        // Second boot: it resumes where the part file ends.
        let mut session = fake_session(&dir, &emitter, true);
        assert!(session.on_connected().is_none());
        let mut request = sent(&mut session).pop().unwrap().1;
        assert_eq!(request["offset"], 16384);
        // A duplicate of an old chunk is ignored.
        let stale = chunk_for(
            &image,
            &json!({"version": "6.1.0", "offset": 0, "length": 16384}),
        );
        assert!(session
            .on_publish(&of("OLD-2", StationLeaf::FirmwareChunk), &stale)
            .is_none());
        assert!(sent(&mut session).is_empty());
        let next = loop {
            let chunk = chunk_for(&image, &request);
            if let Some(next) = session.on_publish(&of("OLD-2", StationLeaf::FirmwareChunk), &chunk)
            {
                break next;
            }
            request = sent(&mut session).pop().unwrap().1;
        };
        assert!(matches!(next, Next::Reboot));
        let state = StationState::open(&dir).unwrap();
        assert_eq!(state.record.firmware, "6.1.0");
        assert_eq!(state.record.pending_update, None);
        assert!(!dir.join("firmware-6.1.0.part").exists());
        let events = events(&mut rx);
        assert!(events.contains(&SimEvent::UpdateInstalled {
            version: "6.1.0".into()
        }));
        assert!(events.contains(&SimEvent::UpdateProgress {
            offset: 32768,
            total: 40000
        }));
        // The next boot makes a key pair: the station now asks as a 6.1.0 station.
        assert!(state.ensure_identity().unwrap().is_some());
    }

    #[test]
    fn a_corrupt_image_is_fetched_again_then_given_up() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("OLD-3");
        StationState::init(&dir, &StationProfile::new("OLD-3", "6.0.5")).unwrap();
        let image = image();
        let mut corrupt = image.clone();
        corrupt[100] ^= 1;
        let (emitter, mut rx) = emitter();
        let mut session = fake_session(&dir, &emitter, true);
        session.on_publish(&of("OLD-3", StationLeaf::Cmd), &update_command(&image));
        let mut answered = 0;
        while let Some((_, request)) = sent(&mut session).pop() {
            answered += 1;
            assert!(answered < 100, "download does not end");
            session.on_publish(
                &of("OLD-3", StationLeaf::FirmwareChunk),
                &chunk_for(&corrupt, &request),
            );
        }
        let events = events(&mut rx);
        let restarts = events
            .iter()
            .filter(|e| matches!(e, SimEvent::UpdateRestarted { .. }))
            .count();
        assert_eq!(restarts, 3);
        assert!(matches!(events.last(), Some(SimEvent::UpdateFailed { .. })));
        let state = StationState::open(&dir).unwrap();
        assert_eq!(state.record.firmware, "6.0.5");
        assert_eq!(state.record.pending_update, None);
    }

    #[test]
    fn commands_change_the_state_directory() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("ST-1");
        StationState::init(&dir, &StationProfile::new("ST-1", "6.1.0")).unwrap();
        StationState::open(&dir).unwrap().ensure_identity().unwrap();
        let (emitter, mut rx) = emitter();
        let mut session = fake_session(&dir, &emitter, false);
        let cmd = &of("ST-1", StationLeaf::Cmd);

        assert!(session
            .on_publish(cmd, br#"{"command":"authorized"}"#)
            .is_none());
        assert!(StationState::open(&dir).unwrap().record.authorized);
        assert!(session
            .on_publish(cmd, br#"{"command":"rejected"}"#)
            .is_none());
        assert!(session.on_publish(cmd, b"garbage").is_none());
        assert!(session.on_publish(cmd, br#"{"command":"fly"}"#).is_none());
        assert!(session.on_publish(cmd, br#"{"command":"reset"}"#).is_none());
        let reset =
            br#"{"command":"reset","delete_authentication":true,"delete_configuration":true}"#;
        assert!(matches!(session.on_publish(cmd, reset), Some(Next::Reboot)));
        assert!(!dir.join(KEY_FILE).exists());
        assert!(!StationState::open(&dir).unwrap().record.authorized);

        StationState::update(&dir, |r| r.authorized = true).unwrap();
        assert!(matches!(
            session.on_publish(cmd, br#"{"command":"removed"}"#),
            Some(Next::Reboot)
        ));
        assert!(!StationState::open(&dir).unwrap().record.authorized);

        let names: Vec<String> = events(&mut rx)
            .into_iter()
            .filter(|e| !matches!(e, SimEvent::Command { .. }))
            .map(|e| e.to_string())
            .collect();
        assert_eq!(
            names,
            ["authorized", "rejected", "reset applied", "removed"]
        );
    }

    /// A 6.1.0 station's directory (kept while the `TempDir` lives), and a CA for its config.
    fn station_dir(serial: &str) -> (tempfile::TempDir, PathBuf, fleet_certs::FleetCa) {
        let dir = tempfile::tempdir().unwrap();
        let station_dir = dir.path().join(serial);
        StationState::init(&station_dir, &crate::StationProfile::new(serial, "6.1.0")).unwrap();
        let ca = fleet_certs::FleetCa::generate("test CA").unwrap();
        (dir, station_dir, ca)
    }

    #[tokio::test]
    async fn a_station_connects_from_its_source_address_and_tells_a_close_before_tls() {
        let (_dir, station_dir, ca) = station_dir("ST-8");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut config = SimConfig::new(
            listener.local_addr().unwrap().to_string(),
            ca.cert_pem().to_owned(),
        );
        config.source = Some("127.0.0.3".parse().unwrap());
        let mut handle = spawn_station(&station_dir, config);
        // As fleetd past a per-address limit: accept, then close before any TLS.
        let (tcp, peer) = listener.accept().await.unwrap();
        assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 3]));
        drop(tcp);
        let lost = loop {
            match handle.next_event().await.unwrap() {
                SimEvent::Booted { .. } => {}
                other => break other,
            }
        };
        assert!(
            matches!(
                lost,
                SimEvent::Disconnected {
                    closed_before_tls: true,
                    ..
                }
            ),
            "{lost:?}"
        );
        handle.power_off();
        handle.shutdown().await;
    }

    #[tokio::test]
    async fn a_station_without_server_reports_and_retries() {
        let (_dir, station_dir, ca) = station_dir("ST-9");
        // A port nobody listens on: bind, note the port, close.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = SimConfig {
            server: format!("127.0.0.1:{port}"),
            ca_pem: ca.cert_pem().to_owned(),
            retry: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(30),
            source: None,
            dialer: None,
        };
        let mut handle = spawn_station(&station_dir, config);
        let booted = handle.next_event().await.unwrap();
        assert!(
            matches!(
                booted,
                SimEvent::Booted {
                    fingerprint: Some(_),
                    ..
                }
            ),
            "{booted:?}"
        );
        let lost = handle.next_event().await.unwrap();
        assert!(
            matches!(
                lost,
                SimEvent::Disconnected {
                    closed_before_tls: false,
                    ..
                }
            ),
            "{lost:?}"
        );
        // It boots again by itself.
        let again = handle.next_event().await.unwrap();
        assert!(matches!(again, SimEvent::Booted { .. }), "{again:?}");
        handle.power_off();
        handle.shutdown().await;
    }
}
