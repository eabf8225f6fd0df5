//! Churn against a running fleetd: a fleet of stations that all reboot at once, resume their
//! TLS sessions and come back authorized, round after round, while a few are removed by the
//! operator and replaced by new ones. Shared by the process test of fleetd's memory under churn
//! (`controller/tests/process/churn.rs`) and the soak `bench/src/bin/churn.rs`.
//!
//! A station here does on every boot what a real one does (PROTOCOL §3): mutual TLS with its
//! own key, CONNECT as `station-<serial>` with an `offline` will, a retained `online` status,
//! the `cmd` subscription and an auth request; it is up once `authorized` came, and does
//! nothing more, so that a fleet of thousands costs its own process little. It is written on the
//! bare frames of [`crate::raw`] over its own TLS connection rather than with rumqttc (as
//! fleet-sim's stations are) for two reasons: it connects from a chosen loopback source address,
//! so that a fleet spreads over fleetd's per-address limits as real sites do, and it sees
//! whether its handshake resumed. Like a real station it keeps one TLS client configuration,
//! and so one session store, across its reboots.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_ctl::{response_data, ClientError};
use fleet_protocol::payload::StationCommand;
use fleet_protocol::{EventKind, Fingerprint, OperatorCommand, Serial, StationLeaf, Topic};
use fleet_sim::{fleet_serial, StationProfile, StationState};
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::raw::{connect_frame, frame, string, subscribe_frame, Will};
use crate::{station_topic, Operator};

/// Stations behind one source address (127.0.0.2, 127.0.0.3, …): fleetd's default `[limits]`
/// let 600 new connections a minute through from one address (a bucket that refills evenly) and
/// 256 handshakes at once, so 10 stations behind each can reboot together 60 times in a row,
/// and then every second. (With 50, a fleet of 1,000 in a release build ran out of the bucket
/// after 18 rounds of 2 s.)
pub const STATIONS_PER_SOURCE: usize = 10;

/// The `[limits]` a churn needs of fleetd beyond its defaults: the operator accepts hundreds or
/// thousands of stations in a few envelopes, and its own command rate is not what is measured.
pub const CHURN_CONFIG: &str = "\
[limits]
operator_commands_per_second = 1000000
operator_command_burst = 1000000
";

/// Firmware of the stations: the first with a key pair.
const FIRMWARE: &str = "6.1.0";
/// Keepalive the stations ask for. They send no PINGREQ: a session lasts one round, far less
/// than one and a half keepalives.
const KEEP_ALIVE_SECS: u16 = 600;
/// Largest packet a station reads; fleetd's `cmd` messages are a few dozen bytes.
const MAX_PACKET: usize = 64 * 1024;
/// Commands per request envelope: fleetd's default `limits.max_commands_per_request`.
const ENVELOPE: usize = 100;
/// After this long without a station event, the operator asks for the stations it waits for.
const QUIET: Duration = Duration::from_secs(2);

/// Why a churn could not go on.
#[derive(Debug)]
pub enum ChurnError {
    /// A station could not be made, or did not come up.
    Station {
        /// Its serial.
        serial: String,
        /// What happened.
        what: String,
    },
    /// The operator's commands failed, or the stations never showed up waiting.
    Operator(String),
}

impl fmt::Display for ChurnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChurnError::Station { serial, what } => write!(f, "station {serial}: {what}"),
            ChurnError::Operator(what) => write!(f, "operator: {what}"),
        }
    }
}

impl std::error::Error for ChurnError {}

/// One station: its key, its source address and its TLS client configuration.
pub struct ChurnStation {
    serial: Serial,
    fingerprint: Fingerprint,
    source: IpAddr,
    /// Kept across reboots: its session store is what resumes.
    connector: TlsConnector,
    /// Its auth request (PROTOCOL §3), the same on every boot.
    request: Vec<u8>,
}

impl ChurnStation {
    /// Makes station `serial` in the state directory `dir` as fleet-sim makes one (a key pair,
    /// MACs derived from the serial), behind `source`, trusting fleetd by `ca_pem`.
    pub fn make(
        dir: &Path,
        serial: &str,
        source: IpAddr,
        ca_pem: &str,
    ) -> Result<ChurnStation, ChurnError> {
        let failed = |what: String| ChurnError::Station {
            serial: serial.to_owned(),
            what,
        };
        let state = StationState::init(dir, &StationProfile::new(serial, FIRMWARE))
            .map_err(|e| failed(e.to_string()))?;
        let identity = state
            .ensure_identity()
            .map_err(|e| failed(e.to_string()))?
            .ok_or_else(|| failed(format!("firmware {FIRMWARE} made no key pair")))?;
        let tls = fleet_certs::client_config(
            ca_pem,
            Some((identity.cert_pem.as_str(), identity.key_pem.as_str())),
        )
        .map_err(|e| failed(format!("TLS configuration: {e}")))?;
        let record = &state.record;
        let request = json!({
            "serial": record.serial.as_str(),
            "model": record.model,
            "firmware": record.firmware,
            "mac_streaming": record.mac_streaming.as_str(),
            "mac_control": record.mac_control.as_str(),
        });
        Ok(ChurnStation {
            serial: record.serial.clone(),
            fingerprint: identity.fingerprint,
            source,
            connector: TlsConnector::from(Arc::new(tls)),
            request: request.to_string().into_bytes(),
        })
    }

    /// One boot against `server`: the connection once fleetd said `authorized`, within
    /// `patience`.
    pub async fn boot(
        &self,
        server: SocketAddr,
        patience: Duration,
    ) -> Result<Session, ChurnError> {
        let what = match tokio::time::timeout(patience, self.come_up(server)).await {
            Ok(Ok(session)) => return Ok(session),
            Ok(Err(what)) => what,
            Err(_) => format!("not authorized within {patience:?}"),
        };
        Err(ChurnError::Station {
            serial: self.serial.to_string(),
            what,
        })
    }

    async fn come_up(&self, server: SocketAddr) -> Result<Session, String> {
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        socket
            .bind(SocketAddr::new(self.source, 0))
            .map_err(|e| format!("bind to {}: {e}", self.source))?;
        let tcp = socket
            .connect(server)
            .await
            .map_err(|e| format!("TCP connect: {e}"))?;
        let name = ServerName::IpAddress(server.ip().into());
        let mut stream = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);

        let serial = self.serial.as_str();
        let status = station_topic(serial, StationLeaf::Status);
        let offline = status_payload(false);
        let will = Will {
            topic: &status,
            payload: &offline,
            retain: true,
        };
        let connect = connect_frame(&self.serial.client_id(), KEEP_ALIVE_SECS, Some(&will));
        send(&mut stream, &connect).await?;
        match read_packet(&mut stream).await? {
            (0x20, body) if body.get(1) == Some(&0) => {}
            (0x20, body) => return Err(format!("CONNACK refused: code {:?}", body.get(1))),
            (first, _) => return Err(format!("packet {first:#04x} before the CONNACK")),
        }
        let cmd = station_topic(serial, StationLeaf::Cmd);
        let mut announce = publish_frame(&status, status_payload(true).as_bytes(), true, 2);
        announce.extend(subscribe_frame(&cmd));
        let request = station_topic(serial, StationLeaf::AuthRequest);
        announce.extend(publish_frame(&request, &self.request, false, 3));
        send(&mut stream, &announce).await?;
        loop {
            let (first, body) = read_packet(&mut stream).await?;
            // Only a PUBLISH matters; the rest acknowledges the station's own packets.
            if first >> 4 != 3 {
                continue;
            }
            let publish = Publish::parse(first, &body).ok_or("a malformed PUBLISH")?;
            if let Some(id) = publish.packet_id {
                let mut puback = vec![0x40, 2];
                puback.extend(id.to_be_bytes());
                send(&mut stream, &puback).await?;
            }
            if publish.topic != cmd {
                continue;
            }
            let told = serde_json::from_slice(publish.payload)
                .ok()
                .and_then(|v: Value| StationCommand::from_json(&v).ok());
            return match told {
                Some(StationCommand::Authorized) => Ok(Session { stream, resumed }),
                other => Err(format!("told {other:?} instead of authorized")),
            };
        }
    }
}

/// A station's status payload (PROTOCOL §3).
fn status_payload(online: bool) -> String {
    json!({ "online": online, "firmware": FIRMWARE }).to_string()
}

/// A QoS 1 PUBLISH with packet id `id`.
fn publish_frame(topic: &str, payload: &[u8], retain: bool, id: u16) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend(id.to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x32 | u8::from(retain), body)
}

async fn send(stream: &mut TlsStream<TcpStream>, bytes: &[u8]) -> Result<(), String> {
    stream
        .write_all(bytes)
        .await
        .map_err(|e| format!("write: {e}"))
}

/// Reads one MQTT packet: its first byte and its body.
async fn read_packet(stream: &mut TlsStream<TcpStream>) -> Result<(u8, Vec<u8>), String> {
    let read = |e: std::io::Error| format!("read: {e}");
    let first = stream.read_u8().await.map_err(read)?;
    let mut length = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = stream.read_u8().await.map_err(read)?;
        length |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            if length > MAX_PACKET {
                return Err(format!("a packet of {length} bytes"));
            }
            let mut body = vec![0; length];
            stream.read_exact(&mut body).await.map_err(read)?;
            return Ok((first, body));
        }
    }
    Err("a remaining length of more than 4 bytes".into())
}

/// A PUBLISH as a station reads it.
struct Publish<'a> {
    topic: &'a str,
    packet_id: Option<u16>,
    payload: &'a [u8],
}

impl<'a> Publish<'a> {
    fn parse(first: u8, body: &'a [u8]) -> Option<Publish<'a>> {
        let length = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
        let topic = std::str::from_utf8(body.get(2..2 + length)?).ok()?;
        let rest = body.get(2 + length..)?;
        let (packet_id, payload) = match (first >> 1) & 3 {
            0 => (None, rest),
            _ => (
                Some(u16::from_be_bytes([*rest.first()?, *rest.get(1)?])),
                rest.get(2..)?,
            ),
        };
        Some(Publish {
            topic,
            packet_id,
            payload,
        })
    }
}

/// A station's live connection, held until its next reboot.
pub struct Session {
    stream: TlsStream<TcpStream>,
    resumed: bool,
}

impl Session {
    /// Whether its TLS handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.resumed
    }

    /// Ends it as a reboot does: DISCONNECT and TLS close_notify; then reads until fleetd has
    /// closed the connection too (within `patience`), so that the session is over on both sides.
    pub async fn disconnect(mut self, patience: Duration) {
        let _ = self.stream.write_all(&[0xe0, 0]).await;
        let _ = self.stream.shutdown().await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(patience, self.stream.read_to_end(&mut rest)).await;
    }
}

/// What one round did.
#[derive(Clone, Debug, PartialEq)]
pub struct Round {
    /// Stations that rebooted and came back authorized.
    pub rebooted: usize,
    /// Of them, those whose TLS handshake resumed.
    pub resumed: usize,
    /// Stations removed, and as many new ones onboarded.
    pub replaced: usize,
    /// How long the round took.
    pub seconds: f64,
}

/// `percent` % of `stations`, rounded, and at least one unless `percent` is 0: how many are
/// replaced in a round.
pub fn replacements(stations: usize, percent: f64) -> usize {
    if percent <= 0.0 {
        return 0;
    }
    ((stations as f64 * percent / 100.0).round() as usize).max(1)
}

/// The source address of the `index`-th station: [`STATIONS_PER_SOURCE`] behind each of
/// 127.0.0.2, 127.0.0.3, … (127.0.0.1 is left to the operator).
fn source(index: usize) -> IpAddr {
    let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    let offset = u32::try_from(index / STATIONS_PER_SOURCE).unwrap_or(u32::MAX);
    IpAddr::V4(Ipv4Addr::from(first.saturating_add(offset)))
}

type Boot = JoinHandle<Result<(Arc<ChurnStation>, Session), ChurnError>>;

/// A fleet of stations held up against one fleetd.
pub struct Churn {
    server: SocketAddr,
    ca_pem: String,
    dir: PathBuf,
    prefix: String,
    /// Stations made so far (the number of the last serial).
    made: usize,
    /// Every station of the fleet, up.
    up: Vec<(Arc<ChurnStation>, Session)>,
    /// How long a station may take to come up or go down, and the operator to see one wait.
    pub patience: Duration,
    /// Most stations booting at once.
    pub in_flight: usize,
}

impl Churn {
    /// An empty fleet for the fleetd at `server` (trusted by `ca_pem`), its stations kept
    /// in `dir` with serials `<prefix>-00001`, …
    pub fn new(server: SocketAddr, ca_pem: String, dir: PathBuf, prefix: &str) -> Churn {
        Churn {
            server,
            ca_pem,
            dir,
            prefix: prefix.to_owned(),
            made: 0,
            up: Vec::new(),
            patience: Duration::from_secs(60),
            in_flight: 1000,
        }
    }

    /// Stations up.
    pub fn len(&self) -> usize {
        self.up.len()
    }

    /// Whether no station is up.
    pub fn is_empty(&self) -> bool {
        self.up.is_empty()
    }

    /// Makes `count` new stations, boots them and has `op` accept each once it asks.
    pub async fn onboard(&mut self, op: &mut Operator, count: usize) -> Result<(), ChurnError> {
        let stations = self.make(count).await?;
        let waiting = stations
            .iter()
            .map(|s| (s.serial.clone(), s.fingerprint))
            .collect();
        let boots = self.boot_all(stations.into_iter().map(|s| (s, None)).collect());
        if let Err(e) = accept_when_asked(op, waiting, self.patience).await {
            // A station that failed to come up says more than the wait for it.
            for boot in boots.into_iter().filter(|b| b.is_finished()) {
                joined(boot).await?;
            }
            return Err(e);
        }
        for boot in boots {
            self.up.push(joined(boot).await?);
        }
        Ok(())
    }

    /// One round: the `replace` oldest stations go down and are removed by `op`; every other
    /// station reboots, all at once, and comes back; then `replace` new ones are onboarded.
    pub async fn round(&mut self, op: &mut Operator, replace: usize) -> Result<Round, ChurnError> {
        let started = Instant::now();
        let replace = replace.min(self.up.len());
        let mut gone = Vec::with_capacity(replace);
        for (station, session) in self.up.drain(..replace) {
            session.disconnect(self.patience).await;
            gone.push(OperatorCommand::RemoveStation {
                serial: station.serial.clone(),
            });
        }
        for envelope in gone.chunks(ENVELOPE) {
            run(op, envelope).await?;
        }
        let rebooting = std::mem::take(&mut self.up);
        let rebooted = rebooting.len();
        let boots = self.boot_all(rebooting.into_iter().map(|(t, s)| (t, Some(s))).collect());
        let mut resumed = 0;
        for boot in boots {
            let (station, session) = joined(boot).await?;
            resumed += usize::from(session.resumed);
            self.up.push((station, session));
        }
        self.onboard(op, replace).await?;
        Ok(Round {
            rebooted,
            resumed,
            replaced: replace,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Every station goes down cleanly.
    pub async fn disconnect_all(&mut self) {
        let patience = self.patience;
        let downs: Vec<_> = self
            .up
            .drain(..)
            .map(|(_, session)| tokio::spawn(session.disconnect(patience)))
            .collect();
        for down in downs {
            let _ = down.await;
        }
    }

    async fn make(&mut self, count: usize) -> Result<Vec<Arc<ChurnStation>>, ChurnError> {
        let first = self.made + 1;
        self.made += count;
        let (dir, prefix, ca_pem) = (self.dir.clone(), self.prefix.clone(), self.ca_pem.clone());
        // Key pairs and files: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            (first..first + count)
                .map(|index| {
                    let serial = fleet_serial(&prefix, index);
                    let dir = dir.join(&serial);
                    ChurnStation::make(&dir, &serial, source(index), &ca_pem).map(Arc::new)
                })
                .collect()
        })
        .await
        .map_err(|e| ChurnError::Operator(format!("making stations: {e}")))?
    }

    /// Boots every station at once (at most [`Churn::in_flight`] connecting), each after its
    /// old session, if any, went down.
    fn boot_all(&self, stations: Vec<(Arc<ChurnStation>, Option<Session>)>) -> Vec<Boot> {
        let permits = Arc::new(Semaphore::new(
            self.in_flight.clamp(1, Semaphore::MAX_PERMITS),
        ));
        let (server, patience) = (self.server, self.patience);
        stations
            .into_iter()
            .map(|(station, old)| {
                let permits = Arc::clone(&permits);
                tokio::spawn(async move {
                    if let Some(old) = old {
                        old.disconnect(patience).await;
                    }
                    // The semaphore is never closed: acquiring only waits.
                    let _permit = permits.acquire_owned().await.ok();
                    let session = station.boot(server, patience).await?;
                    Ok((station, session))
                })
            })
            .collect()
    }
}

async fn joined(boot: Boot) -> Result<(Arc<ChurnStation>, Session), ChurnError> {
    boot.await
        .map_err(|e| ChurnError::Operator(format!("a station's task failed: {e}")))?
}

/// Runs `commands` in one request envelope; their data, or the first that failed.
async fn run(op: &Operator, commands: &[OperatorCommand]) -> Result<Vec<Value>, ChurnError> {
    let entries = commands.iter().map(OperatorCommand::to_json).collect();
    let failed = |e: ClientError| ChurnError::Operator(e.to_string());
    let responses = op.client.request(entries).await.map_err(failed)?;
    let mut data = Vec::with_capacity(responses.len());
    for (response, command) in responses.into_iter().zip(commands) {
        let name = command.name().as_str();
        data.push(
            response_data(response).map_err(|e| ChurnError::Operator(format!("{name}: {e}")))?,
        );
    }
    Ok(data)
}

/// Accepts each station of `waiting` (by serial, with its key) once `op` has seen it wait with
/// that key: from the tenant's station events, or, after a quiet spell, by asking for it. Fails
/// when none is seen for `patience`.
async fn accept_when_asked(
    op: &mut Operator,
    mut waiting: HashMap<Serial, Fingerprint>,
    patience: Duration,
) -> Result<(), ChurnError> {
    let mut deadline = Instant::now() + patience;
    while !waiting.is_empty() {
        let mut asked = Vec::new();
        while let Ok((topic, event)) = op.events.try_recv() {
            asked.extend(take_waiting(&mut waiting, waiting_in(&topic, &event)));
        }
        if asked.is_empty() {
            match tokio::time::timeout(QUIET, op.events.recv()).await {
                Ok(Some((topic, event))) => {
                    asked.extend(take_waiting(&mut waiting, waiting_in(&topic, &event)));
                }
                Ok(None) => return Err(ChurnError::Operator("the event stream closed".into())),
                Err(_) => asked = ask(op, &mut waiting).await?,
            }
        }
        if asked.is_empty() {
            if Instant::now() >= deadline {
                let example = waiting.keys().next().map(Serial::to_string);
                return Err(ChurnError::Operator(format!(
                    "{} stations never asked to be authorized within {patience:?} (e.g. {})",
                    waiting.len(),
                    example.unwrap_or_default()
                )));
            }
            continue;
        }
        deadline = Instant::now() + patience;
        for envelope in asked.chunks(ENVELOPE) {
            run(op, envelope).await?;
        }
    }
    Ok(())
}

/// The station a tenant event shows waiting for authorization, with its key's fingerprint.
fn waiting_in(topic: &str, event: &Value) -> Option<(Serial, Fingerprint)> {
    if !matches!(
        Topic::parse(topic),
        Some(Topic::Event(_, EventKind::Stations))
    ) || event.get("event")? != "state"
    {
        return None;
    }
    seen_waiting(event.get("station")?)
}

/// The station of a view (an event's `station`, `getStation`'s data) if it is waiting for
/// authorization with a key.
fn seen_waiting(view: &Value) -> Option<(Serial, Fingerprint)> {
    if view.get("state")? != "unauthorized" {
        return None;
    }
    let serial = Serial::parse(view.get("serial")?.as_str()?).ok()?;
    let fingerprint = view.get("fingerprint")?.as_str()?.parse().ok()?;
    Some((serial, fingerprint))
}

/// The accept of `seen` if it is a station of `waiting` with the key it was made with; taken
/// out of `waiting`.
fn take_waiting(
    waiting: &mut HashMap<Serial, Fingerprint>,
    seen: Option<(Serial, Fingerprint)>,
) -> Option<OperatorCommand> {
    let (serial, fingerprint) = seen?;
    if waiting.get(&serial) != Some(&fingerprint) {
        return None;
    }
    waiting.remove(&serial);
    Some(OperatorCommand::AcceptStation {
        serial,
        fingerprint,
    })
}

/// Asks for one envelope's worth of the stations of `waiting`; the accepts of those waiting.
async fn ask(
    op: &Operator,
    waiting: &mut HashMap<Serial, Fingerprint>,
) -> Result<Vec<OperatorCommand>, ChurnError> {
    let commands = waiting
        .keys()
        .take(ENVELOPE)
        .map(|serial| OperatorCommand::GetStation {
            serial: serial.clone(),
        })
        .map(|command| command.to_json())
        .collect();
    let responses = op
        .client
        .request(commands)
        .await
        .map_err(|e| ChurnError::Operator(e.to_string()))?;
    // A station not known yet is `not_found`: it has not asked.
    let views: Vec<Value> = responses
        .into_iter()
        .filter_map(|response| response_data(response).ok())
        .collect();
    Ok(views
        .iter()
        .filter_map(|view| take_waiting(waiting, seen_waiting(view)))
        .collect())
}
