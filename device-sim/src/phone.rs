//! Simulated phones: a state directory like a phone's flash (`phone.json`, `key.pem`,
//! `cert.pem`, `ca-from-server.pem`), PAP provisioning and certificate connections over the
//! simulator's own MQTT client ([`crate::link`]), which can bind a chosen local source address
//! to play a phone behind a given public IP.

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fleet_certs::{CertError, Fingerprint};
use fleet_protocol::payload::{ProvisionRequest, ProvisionResponse};
use fleet_protocol::{IdError, Mac, Topic};
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::link::{return_code, Link, LinkError};
use crate::state_file::{
    read_optional, remove_optional, write_atomically, write_private, FileError, Record, StateFile,
};

/// File name of the phone's state inside its directory.
pub const PHONE_FILE: &str = "phone.json";
/// File name of the phone's private key (PKCS#8 PEM, mode 0600).
pub const PHONE_KEY_FILE: &str = "key.pem";
/// File name of the certificate the fleet CA issued to the phone.
pub const PHONE_CERT_FILE: &str = "cert.pem";
/// File name of the CA certificate the server sent with the phone's certificate.
pub const SERVER_CA_FILE: &str = "ca-from-server.pem";
/// Vendor of a phone made without one.
pub const DEFAULT_VENDOR: &str = "Simphone";
/// Type of a phone made without one.
pub const DEFAULT_TYPE: &str = "SP-100";

/// Longest wait for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalive the phone asks for; a live session pings at half of it.
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// What went wrong with a phone: its state directory, or talking to the server. A refusal of
/// provisioning is a [`ProvisionOutcome`], not an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PhoneError {
    /// A file of the directory could not be read or written, `phone.json` is not valid, or
    /// the directory already holds a phone.
    #[error(transparent)]
    File(#[from] FileError),
    /// A MAC address is not of the form PROTOCOL §1 gives it.
    #[error(transparent)]
    Id(#[from] IdError),
    /// A key, CSR or certificate could not be made or read.
    #[error("phone key or certificate: {0}")]
    Certificate(#[from] CertError),
    /// `connect_provisioned` on a phone without a certificate.
    #[error("the phone is not provisioned (no key.pem and cert.pem)")]
    NotProvisioned,
    /// Talking to the server failed: the connection, the TLS handshake, MQTT, a time limit.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The server answered CONNECT with a refusal (4 wrong PAP, 5 not authorized).
    #[error("CONNECT refused with return code {code}")]
    Refused {
        /// The CONNACK return code.
        code: u8,
    },
    /// The server denied a SUBSCRIBE (SUBACK 0x80) the phone needs.
    #[error("subscription to {0} denied")]
    SubscribeDenied(String),
    /// The provisioning response is neither a certificate nor an error.
    #[error("malformed provisioning response: {0}")]
    BadResponse(String),
    /// A provisioning task of [`provision_many`] panicked or was cancelled.
    #[error("provisioning task failed: {0}")]
    Task(String),
}

/// What a new phone is made from (`fleet-sim phone init`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhoneProfile {
    /// MAC, in any form [`Mac`] accepts.
    pub mac: String,
    /// Vendor, as the phone reports it when it provisions.
    pub vendor: String,
    /// Type (model), as the phone reports it when it provisions.
    pub kind: String,
    /// The PAP the user typed, if any.
    pub pap: Option<String>,
}

impl PhoneProfile {
    /// A profile with [`DEFAULT_VENDOR`], [`DEFAULT_TYPE`] and no PAP.
    pub fn new(mac: impl Into<String>) -> Self {
        PhoneProfile {
            mac: mac.into(),
            vendor: DEFAULT_VENDOR.to_owned(),
            kind: DEFAULT_TYPE.to_owned(),
            pap: None,
        }
    }
}

/// The contents of `phone.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhoneRecord {
    /// The MAC.
    pub mac: Mac,
    /// Vendor.
    pub vendor: String,
    /// Type (model).
    #[serde(rename = "type")]
    pub kind: String,
    /// What the user typed as PAP; `None` when nothing was typed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pap: Option<String>,
    /// The configuration the server sent with the certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<Value>,
}

/// A phone's state directory, read.
pub type PhoneState = StateFile<PhoneRecord>;

impl Record for PhoneRecord {
    const FILE: &'static str = PHONE_FILE;
    const DEVICE: &'static str = "phone";
    type Error = PhoneError;
}

impl StateFile<PhoneRecord> {
    /// Creates `dir` (if needed) and a new `phone.json` in it; fails if one exists.
    pub fn init(dir: impl AsRef<Path>, profile: &PhoneProfile) -> Result<Self, PhoneError> {
        StateFile::create(dir.as_ref(), || {
            Ok(PhoneRecord {
                mac: profile.mac.parse()?,
                vendor: profile.vendor.clone(),
                kind: profile.kind.clone(),
                pap: profile.pap.clone(),
                configuration: None,
            })
        })
    }

    /// The MAC.
    pub fn mac(&self) -> &Mac {
        &self.record.mac
    }

    /// The provisioned certificate and key as (certificate PEM, key PEM), if both exist.
    pub fn identity(&self) -> Result<Option<(String, String)>, PhoneError> {
        let key = read_optional(&self.dir().join(PHONE_KEY_FILE))?;
        let cert = read_optional(&self.dir().join(PHONE_CERT_FILE))?;
        Ok(cert.zip(key))
    }
}

/// The user types a new PAP (`Some`), e.g. after Reset Authentication, or clears it (`None`).
pub fn set_pap(dir: impl AsRef<Path>, pap: Option<String>) -> Result<(), PhoneError> {
    PhoneState::update(dir, |record| record.pap = pap)?;
    Ok(())
}

/// Factory reset: deletes the key, the certificate, the server's CA, the configuration and the
/// PAP. The phone keeps only its MAC, vendor and type.
pub fn factory_reset(dir: impl AsRef<Path>) -> Result<(), PhoneError> {
    let dir = dir.as_ref();
    for file in [PHONE_KEY_FILE, PHONE_CERT_FILE, SERVER_CA_FILE] {
        remove_optional(&dir.join(file))?;
    }
    PhoneState::update(dir, |record| {
        record.pap = None;
        record.configuration = None;
    })?;
    Ok(())
}

/// Whether the phone holds a key and a certificate for it (what a provisioning stores).
pub fn is_provisioned(dir: impl AsRef<Path>) -> bool {
    let dir = dir.as_ref();
    dir.join(PHONE_KEY_FILE).is_file() && dir.join(PHONE_CERT_FILE).is_file()
}

/// Where and how a phone reaches the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PhoneTarget {
    /// `HOST:PORT` (`[::1]:8883` for IPv6); HOST is also the TLS server name.
    pub server: String,
    /// The fleet CA certificate (PEM) the server certificate must chain to.
    pub ca_pem: String,
    /// Local source address to bind (e.g. 127.0.0.2), so the server sees the phone there.
    pub source: Option<IpAddr>,
}

impl PhoneTarget {
    /// A target without a chosen source address.
    pub fn new(server: impl Into<String>, ca_pem: impl Into<String>) -> Self {
        PhoneTarget {
            server: server.into(),
            ca_pem: ca_pem.into(),
            source: None,
        }
    }

    /// The same target, seen from `source`.
    pub fn with_source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }
}

/// How one provisioning attempt ended, when nothing went wrong on the way.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProvisionOutcome {
    /// The phone stored its certificate and configuration and said `provision/complete`.
    Provisioned,
    /// CONNECT refused: 4 wrong PAP, 5 not authorized (locked, blocked, or otherwise refused).
    Refused {
        /// The CONNACK return code.
        code: u8,
        /// Why, as the server said it (the MQTT 5 Reason String), if it did.
        reason: Option<String>,
    },
    /// The provisioning response was `{"error", "code"}`.
    Failed {
        /// The machine code.
        code: String,
        /// The text.
        error: String,
    },
}

impl fmt::Display for ProvisionOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProvisionOutcome::Provisioned => f.write_str("provisioned"),
            ProvisionOutcome::Refused {
                code,
                reason: Some(reason),
            } => write!(f, "refused: {reason} ({code})"),
            ProvisionOutcome::Refused { code: 4, .. } => {
                f.write_str("refused: bad user name or password (4)")
            }
            ProvisionOutcome::Refused { code: 5, .. } => f.write_str("refused: not authorized (5)"),
            ProvisionOutcome::Refused { code, .. } => write!(f, "refused with code {code}"),
            ProvisionOutcome::Failed { code, error } => write!(f, "failed: {error} ({code})"),
        }
    }
}

/// The CONNECT of an unprovisioned phone: client id `phone-<mac>`, username `<mac>`,
/// password = `password` or empty, clean session.
///
/// MQTT 3.1.1 has no way to tell an empty password from none on the wire as rumqttc writes it:
/// an empty password is left out (password flag clear), which servers read as "".
pub fn pap_connect(mac: &Mac, password: Option<&str>) -> Connect {
    let mut connect = certificate_connect(mac);
    connect.set_login(mac.as_str(), password.unwrap_or(""));
    connect
}

/// The CONNECT of a provisioned phone: client id `phone-<mac>`, no username or password.
pub fn certificate_connect(mac: &Mac) -> Connect {
    let mut connect = Connect::new(mac.client_id());
    connect.keep_alive = KEEP_ALIVE.as_secs().try_into().unwrap_or(u16::MAX);
    connect.clean_session = true;
    connect
}

/// TCP from the target's source address, then TLS trusting the target's CA and presenting
/// `identity` (certificate PEM, key PEM) if given.
async fn open_link(
    target: &PhoneTarget,
    identity: Option<(&str, &str)>,
) -> Result<Link, PhoneError> {
    let tls = fleet_certs::client_config(&target.ca_pem, identity)?;
    let link = Link::open(
        &target.server,
        target.source,
        Arc::new(tls),
        HANDSHAKE_TIMEOUT,
    )
    .await?;
    Ok(link)
}

/// One complete provisioning attempt (PROTOCOL §3): CONNECT with the PAP from `phone.json`
/// (empty when there is none), SUBSCRIBE `…/provision/response`, a fresh key (stored 0600 as
/// `key.pem`, replacing any old key and certificate) and PUBLISH its CSR on
/// `…/provision/request`, wait for the response; on a certificate store `cert.pem`,
/// `ca-from-server.pem` and the configuration, PUBLISH `…/provision/complete` and wait for its
/// PUBACK; then DISCONNECT.
pub async fn provision(
    dir: impl AsRef<Path>,
    target: &PhoneTarget,
) -> Result<ProvisionOutcome, PhoneError> {
    let dir = dir.as_ref();
    let state = PhoneState::open(dir)?;
    let mac = state.record.mac.clone();
    let mut link = open_link(target, None).await?;
    let (code, reason) = link
        .connect(pap_connect(&mac, state.record.pap.as_deref()))
        .await?;
    let code = return_code(code);
    if code != 0 {
        return Ok(ProvisionOutcome::Refused { code, reason });
    }
    let outcome = provision_connected(dir, &state, &mut link).await;
    link.disconnect().await;
    outcome
}

async fn provision_connected(
    dir: &Path,
    state: &PhoneState,
    link: &mut Link,
) -> Result<ProvisionOutcome, PhoneError> {
    let mac = &state.record.mac;
    let response_topic = Topic::PhoneProvisionResponse(mac.clone()).to_string();
    let mut inbox = Vec::new();
    if link.subscribe(&response_topic, &mut inbox).await? == 0x80 {
        return Err(PhoneError::SubscribeDenied(response_topic));
    }

    // A new key makes any certificate the phone had useless: drop it before asking.
    let (key_pem, csr_pem) = fleet_certs::phone_key_and_csr(mac.as_str())?;
    remove_optional(&dir.join(PHONE_CERT_FILE))?;
    write_private(&dir.join(PHONE_KEY_FILE), &key_pem)?;
    let request = ProvisionRequest {
        csr: csr_pem,
        vendor: state.record.vendor.clone(),
        kind: state.record.kind.clone(),
    }
    .to_json();
    link.publish(
        &Topic::PhoneProvisionRequest(mac.clone()).to_string(),
        Bytes::from(request.to_string()),
        &mut inbox,
    )
    .await?;

    // The response may have come while the phone waited for its PUBACK.
    let response = match inbox.iter().position(|p| p.topic == response_topic) {
        Some(index) => inbox.swap_remove(index),
        None => {
            link.wait_for("provisioning response", &mut inbox, |packet| match packet {
                Packet::Publish(publish) if publish.topic == response_topic => {
                    Some(publish.clone())
                }
                _ => None,
            })
            .await?
        }
    };
    let (certificate, ca, config) =
        match ProvisionResponse::parse(&response.payload).map_err(PhoneError::BadResponse)? {
            ProvisionResponse::Issued {
                certificate,
                ca,
                config,
            } => (certificate, ca, config),
            ProvisionResponse::Refused { error, code } => {
                return Ok(ProvisionOutcome::Failed { code, error })
            }
        };
    check_certificate_for_key(&certificate, &key_pem)?;
    fleet_certs::certs_from_pem(&ca)?;
    write_atomically(&dir.join(PHONE_CERT_FILE), certificate.as_bytes())?;
    write_atomically(&dir.join(SERVER_CA_FILE), ca.as_bytes())?;
    PhoneState::update(dir, |record| record.configuration = config)?;

    link.publish(
        &Topic::PhoneProvisionComplete(mac.clone()).to_string(),
        Bytes::from_static(b"{}"),
        &mut inbox,
    )
    .await?;
    Ok(ProvisionOutcome::Provisioned)
}

/// Refuses a certificate that is not for the phone's own key: storing it would leave a phone
/// that cannot connect.
fn check_certificate_for_key(cert_pem: &str, key_pem: &str) -> Result<(), PhoneError> {
    let issued = fleet_certs::certificate_pem_fingerprint(cert_pem)?;
    let key = fleet_certs::key_from_pem(key_pem)?;
    let signing_key = fleet_certs::crypto_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| PhoneError::Certificate(CertError::Tls(e)))?;
    let own = signing_key
        .public_key()
        .map(|spki| Fingerprint::of_spki_der(&spki));
    if own == Some(issued) {
        Ok(())
    } else {
        Err(PhoneError::BadResponse(
            "the certificate is not for the phone's key".into(),
        ))
    }
}

/// One unprovisioned CONNECT (client id `phone-<mac>`, username `<mac>`, password `password`
/// or empty), then DISCONNECT if accepted; returns the CONNACK return code. For brute-force
/// tests: it neither reads nor changes the stored PAP.
pub async fn connect_raw(
    dir: impl AsRef<Path>,
    target: &PhoneTarget,
    password: Option<&str>,
) -> Result<u8, PhoneError> {
    let state = PhoneState::open(dir)?;
    let mut link = open_link(target, None).await?;
    let (code, _) = link
        .connect(pap_connect(&state.record.mac, password))
        .await?;
    let code = return_code(code);
    if code == 0 {
        link.disconnect().await;
    }
    Ok(code)
}

/// How a live [`PhoneSession`] ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The server closed the connection (or sent DISCONNECT).
    ClosedByServer,
    /// The connection failed.
    Failed(PhoneError),
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ClosedByServer => f.write_str("the server closed the connection"),
            SessionEnd::Failed(e) => write!(f, "connection failed: {e}"),
        }
    }
}

/// A provisioned phone's live MQTT session, connected with its certificate.
pub struct PhoneSession {
    link: Link,
    mac: Mac,
    inbox: Vec<Publish>,
}

impl fmt::Debug for PhoneSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PhoneSession")
            .field("mac", &self.mac)
            .field("server", &self.link.server())
            .finish_non_exhaustive()
    }
}

/// Connects with `cert.pem`/`key.pem` (client id `phone-<mac>`, no username or password).
/// `Err(PhoneError::Refused { code })` on a refused CONNACK; a server that refuses the
/// certificate during or right after the TLS handshake gives a [`LinkError`] instead.
pub async fn connect_provisioned(
    dir: impl AsRef<Path>,
    target: &PhoneTarget,
) -> Result<PhoneSession, PhoneError> {
    let state = PhoneState::open(dir)?;
    let (cert_pem, key_pem) = state.identity()?.ok_or(PhoneError::NotProvisioned)?;
    let mut link = open_link(target, Some((&cert_pem, &key_pem))).await?;
    let (code, _) = link.connect(certificate_connect(&state.record.mac)).await?;
    let code = return_code(code);
    if code != 0 {
        return Err(PhoneError::Refused { code });
    }
    Ok(PhoneSession {
        link,
        mac: state.record.mac,
        inbox: Vec::new(),
    })
}

impl PhoneSession {
    /// The phone's MAC.
    pub fn mac(&self) -> &Mac {
        &self.mac
    }

    /// SUBSCRIBE `filter` at QoS 1; returns the SUBACK code (0, 1, 2 granted; 0x80 denied).
    pub async fn subscribe(&mut self, filter: &str) -> Result<u8, PhoneError> {
        Ok(self.link.subscribe(filter, &mut self.inbox).await?)
    }

    /// PUBLISH at QoS 1 and wait for the PUBACK. (A 3.1.1 server acknowledges a denied
    /// PUBLISH too, and drops it.)
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: impl Into<Bytes>,
    ) -> Result<(), PhoneError> {
        self.link
            .publish(topic, payload.into(), &mut self.inbox)
            .await?;
        Ok(())
    }

    /// The next message for the phone (topic, payload), within `limit` (at most 30 s);
    /// `Ok(None)` if none came.
    pub async fn next_message(
        &mut self,
        limit: Duration,
    ) -> Result<Option<(String, Bytes)>, PhoneError> {
        if !self.inbox.is_empty() {
            let publish = self.inbox.remove(0);
            return Ok(Some((publish.topic, publish.payload)));
        }
        let wait = self
            .link
            .wait_for("message", &mut self.inbox, |packet| match packet {
                Packet::Publish(publish) => Some((publish.topic.clone(), publish.payload.clone())),
                _ => None,
            });
        match tokio::time::timeout(limit, wait).await {
            Ok(Ok(message)) => Ok(Some(message)),
            Ok(Err(LinkError::Timeout { .. })) | Err(_) => Ok(None),
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Resolves when the session ends: the server closes the connection (e.g. after Reset
    /// Authentication) or it fails. Meanwhile it keeps the session alive with pings and
    /// acknowledges and keeps messages for [`PhoneSession::next_message`]. Cancel-safe.
    pub async fn closed(&mut self) -> SessionEnd {
        let mut ping = tokio::time::interval(KEEP_ALIVE / 2);
        ping.reset();
        loop {
            tokio::select! {
                packet = self.link.recv("the end of the session") => match packet {
                    Ok(Packet::Publish(publish)) => {
                        if let Err(e) = self.link.acknowledge(&publish).await {
                            return session_end(e);
                        }
                        self.inbox.push(publish);
                    }
                    Ok(Packet::Disconnect) => return SessionEnd::ClosedByServer,
                    Ok(_) => {}
                    Err(e) => return session_end(e),
                },
                _ = ping.tick() => {
                    if let Err(e) = self.link.send(&Packet::PingReq).await {
                        return session_end(e);
                    }
                }
            }
        }
    }

    /// DISCONNECT and close.
    pub async fn disconnect(self) {
        self.link.disconnect().await;
    }
}

fn session_end(error: LinkError) -> SessionEnd {
    if error.is_closed_by_server() {
        SessionEnd::ClosedByServer
    } else {
        SessionEnd::Failed(error.into())
    }
}

/// The MAC of phone number `index` (1-based) of a batch: `prefix` followed by `index` in hex,
/// 12 digits in all.
pub fn phone_mac(prefix: &str, index: usize) -> Result<Mac, PhoneError> {
    let prefix = prefix.to_ascii_lowercase();
    let width = 12usize.saturating_sub(prefix.len());
    Ok(Mac::parse(&format!("{prefix}{index:0width$x}"))?)
}

/// Provisions `count` phones, `base_dir/<mac>` each (made with no PAP if new: the caller's
/// source address is meant to be whitelisted), MACs [`phone_mac`]`(mac_prefix, 1..=count)`, at
/// most `concurrency` at a time. Results in MAC order.
pub async fn provision_many(
    base_dir: impl AsRef<Path>,
    count: usize,
    mac_prefix: &str,
    vendor: &str,
    kind: &str,
    target: &PhoneTarget,
    concurrency: usize,
) -> Vec<(String, Result<ProvisionOutcome, PhoneError>)> {
    let base_dir = base_dir.as_ref();
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let target = Arc::new(target.clone());
    let mut tasks = Vec::with_capacity(count);
    for index in 1..=count {
        let mac = match phone_mac(mac_prefix, index) {
            Ok(mac) => mac,
            Err(e) => {
                tasks.push((format!("{mac_prefix}#{index}"), Err(e)));
                continue;
            }
        };
        let dir = base_dir.join(mac.as_str());
        let profile = PhoneProfile {
            mac: mac.to_string(),
            vendor: vendor.to_owned(),
            kind: kind.to_owned(),
            pap: None,
        };
        let permits = Arc::clone(&permits);
        let target = Arc::clone(&target);
        let task = tokio::spawn(async move {
            // The semaphore is never closed, so acquiring only waits.
            let _permit = permits.acquire_owned().await;
            if !PhoneState::exists(&dir) {
                PhoneState::init(&dir, &profile)?;
            }
            provision(&dir, &target).await
        });
        tasks.push((mac.to_string(), Ok(task)));
    }
    let mut results = Vec::with_capacity(count);
    for (mac, task) in tasks {
        let result = match task {
            Ok(task) => task
                .await
                .unwrap_or_else(|e| Err(PhoneError::Task(e.to_string()))),
            Err(e) => Err(e),
        };
        results.push((mac, result));
    }
    results
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::net::SocketAddr;

    use bytes::BytesMut;
    use fleet_protocol::Filter;
    use rumqttc::mqttbytes::v4::{ConnAck, ConnectReturnCode, PubAck, SubscribeReasonCode};
    use rumqttc::mqttbytes::QoS;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::link::{decode, encode};

    fn profile() -> PhoneProfile {
        PhoneProfile {
            mac: "00:11:AA:BB:CC:DD".into(),
            vendor: "Yealink".into(),
            kind: "T54W".into(),
            pap: Some("123456".into()),
        }
    }

    #[test]
    fn macs_are_normalised_and_checked() {
        assert_eq!(
            "00-11-AA-bb-cc-dd".parse::<Mac>().unwrap().as_str(),
            "0011aabbccdd"
        );
        assert!("0011aabbccd".parse::<Mac>().is_err());
        assert!("0011aabbccdg".parse::<Mac>().is_err());
        assert_eq!(phone_mac("02aa00", 1).unwrap().as_str(), "02aa00000001");
        assert_eq!(phone_mac("02AA00", 0x10).unwrap().as_str(), "02aa00000010");
        assert!(phone_mac("02aa00", 0x100_0000).is_err());
        assert!(phone_mac("zz", 1).is_err());
    }

    #[test]
    fn state_directory_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let state = PhoneState::init(dir.path(), &profile()).unwrap();
        assert_eq!(state.mac().as_str(), "0011aabbccdd");
        let text = fs::read_to_string(dir.path().join(PHONE_FILE)).unwrap();
        let json: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["mac"], "0011aabbccdd");
        assert_eq!(json["type"], "T54W");
        assert_eq!(json["pap"], "123456");
        assert_eq!(PhoneState::open(dir.path()).unwrap(), state);
        assert!(matches!(
            PhoneState::init(dir.path(), &profile()),
            Err(PhoneError::File(FileError::AlreadyInitialized { .. }))
        ));
        set_pap(dir.path(), Some("654321".into())).unwrap();
        let state = PhoneState::open(dir.path()).unwrap();
        assert_eq!(state.record.pap.as_deref(), Some("654321"));
        assert!(!is_provisioned(dir.path()));
        assert_eq!(state.identity().unwrap(), None);
    }

    #[test]
    fn factory_reset_keeps_only_mac_vendor_and_type() {
        let dir = tempfile::tempdir().unwrap();
        PhoneState::init(dir.path(), &profile()).unwrap();
        let (key, _) = fleet_certs::phone_key_and_csr("0011aabbccdd").unwrap();
        write_private(&dir.path().join(PHONE_KEY_FILE), &key).unwrap();
        fs::write(dir.path().join(PHONE_CERT_FILE), "cert").unwrap();
        fs::write(dir.path().join(SERVER_CA_FILE), "ca").unwrap();
        PhoneState::update(dir.path(), |r| {
            r.configuration = Some(serde_json::json!({"sip": "x"}))
        })
        .unwrap();
        assert!(is_provisioned(dir.path()));

        factory_reset(dir.path()).unwrap();
        assert!(!is_provisioned(dir.path()));
        for file in [PHONE_KEY_FILE, PHONE_CERT_FILE, SERVER_CA_FILE] {
            assert!(!dir.path().join(file).exists(), "{file}");
        }
        let record = PhoneState::open(dir.path()).unwrap().record;
        assert_eq!(
            record,
            PhoneRecord {
                mac: "0011aabbccdd".parse().unwrap(),
                vendor: "Yealink".into(),
                kind: "T54W".into(),
                pap: None,
                configuration: None,
            }
        );
        // Twice is fine.
        factory_reset(dir.path()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn the_key_is_readable_by_the_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PHONE_KEY_FILE);
        write_private(&path, "secret").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn pap_connect_decodes_with_username_and_password() {
        let mac: Mac = "0011aabbccdd".parse().unwrap();
        let mut bytes = encode(&Packet::Connect(pap_connect(&mac, Some("123456")))).unwrap();
        let Some(Packet::Connect(connect)) = decode(&mut bytes).unwrap() else {
            panic!("not a CONNECT");
        };
        assert!(bytes.is_empty());
        assert_eq!(connect.client_id, mac.client_id());
        assert!(connect.clean_session);
        let login = connect.login.unwrap();
        assert_eq!(login.username, "0011aabbccdd");
        assert_eq!(login.password, "123456");

        // No PAP: the username alone, read back as an empty password.
        let mut bytes = encode(&Packet::Connect(pap_connect(&mac, None))).unwrap();
        let Some(Packet::Connect(connect)) = decode(&mut bytes).unwrap() else {
            panic!("not a CONNECT");
        };
        let login = connect.login.unwrap();
        assert_eq!(login.username, "0011aabbccdd");
        assert_eq!(login.password, "");

        let mut bytes = encode(&Packet::Connect(certificate_connect(&mac))).unwrap();
        let Some(Packet::Connect(connect)) = decode(&mut bytes).unwrap() else {
            panic!("not a CONNECT");
        };
        assert_eq!(connect.client_id, mac.client_id());
        assert_eq!(connect.login, None);
    }

    #[test]
    fn a_certificate_for_another_key_is_refused() {
        let ca = fleet_certs::FleetCa::generate("fleetgate CA").unwrap();
        let (key, csr) = fleet_certs::phone_key_and_csr("0011aabbccdd").unwrap();
        let (other_key, _) = fleet_certs::phone_key_and_csr("0011aabbccdd").unwrap();
        let issued = ca
            .issue_client_from_csr(&csr, "0011aabbccdd", "phone", "default")
            .unwrap();
        check_certificate_for_key(&issued.cert_pem, &key).unwrap();
        assert!(matches!(
            check_certificate_for_key(&issued.cert_pem, &other_key),
            Err(PhoneError::BadResponse(_))
        ));
    }

    /// A stand-in for fleetd: TLS with optional client certificates, scripted MQTT.
    mod fake_server {
        use super::*;
        use rumqttc::mqttbytes::v4::SubAck;
        use rustls::server::WebPkiClientVerifier;
        use rustls::{RootCertStore, ServerConfig};
        use tokio::net::TcpListener;
        use tokio_rustls::server::TlsStream as ServerTls;
        use tokio_rustls::TlsAcceptor;

        pub(super) struct Fake {
            pub(super) ca: fleet_certs::FleetCa,
            pub(super) listener: TcpListener,
            acceptor: TlsAcceptor,
        }

        pub(super) struct Conn {
            pub(super) tls: ServerTls<TcpStream>,
            buf: BytesMut,
        }

        impl Fake {
            pub(super) async fn start() -> Fake {
                let ca = fleet_certs::FleetCa::generate("fleetgate CA").unwrap();
                let server = ca
                    .issue_server(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
                    .unwrap();
                let mut roots = RootCertStore::empty();
                roots
                    .add(
                        fleet_certs::certs_from_pem(ca.cert_pem())
                            .unwrap()
                            .remove(0),
                    )
                    .unwrap();
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    fleet_certs::crypto_provider(),
                )
                .allow_unauthenticated()
                .build()
                .unwrap();
                let config = ServerConfig::builder_with_provider(fleet_certs::crypto_provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_client_cert_verifier(verifier)
                    .with_single_cert(
                        fleet_certs::certs_from_pem(&server.cert_pem).unwrap(),
                        fleet_certs::key_from_pem(&server.key_pem).unwrap(),
                    )
                    .unwrap();
                Fake {
                    ca,
                    listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                    acceptor: TlsAcceptor::from(Arc::new(config)),
                }
            }

            pub(super) fn target(&self) -> PhoneTarget {
                let port = self.listener.local_addr().unwrap().port();
                PhoneTarget::new(format!("127.0.0.1:{port}"), self.ca.cert_pem())
                    .with_source("127.0.0.2".parse().unwrap())
            }

            pub(super) async fn accept(&self) -> (Conn, SocketAddr) {
                let (tcp, peer) = self.listener.accept().await.unwrap();
                let tls = self.acceptor.accept(tcp).await.unwrap();
                let conn = Conn {
                    tls,
                    buf: BytesMut::new(),
                };
                (conn, peer)
            }
        }

        impl Conn {
            pub(super) async fn recv(&mut self) -> Packet {
                loop {
                    if let Some(packet) = decode(&mut self.buf).unwrap() {
                        return packet;
                    }
                    assert!(self.tls.read_buf(&mut self.buf).await.unwrap() > 0, "EOF");
                }
            }

            pub(super) async fn send(&mut self, packet: Packet) {
                self.tls.write_all(&encode(&packet).unwrap()).await.unwrap();
                self.tls.flush().await.unwrap();
            }

            pub(super) async fn connack(&mut self, code: ConnectReturnCode) -> Connect {
                let Packet::Connect(connect) = self.recv().await else {
                    panic!("expected CONNECT")
                };
                self.send(Packet::ConnAck(ConnAck::new(code, false))).await;
                connect
            }

            pub(super) async fn suback(&mut self, code: SubscribeReasonCode) -> String {
                let Packet::Subscribe(subscribe) = self.recv().await else {
                    panic!("expected SUBSCRIBE")
                };
                self.send(Packet::SubAck(SubAck::new(subscribe.pkid, vec![code])))
                    .await;
                subscribe.filters[0].path.clone()
            }

            pub(super) async fn puback(&mut self) -> Publish {
                let Packet::Publish(publish) = self.recv().await else {
                    panic!("expected PUBLISH")
                };
                self.send(Packet::PubAck(PubAck::new(publish.pkid))).await;
                publish
            }

            pub(super) async fn publish(&mut self, topic: &str, payload: Value) {
                let mut publish = Publish::new(topic, QoS::AtLeastOnce, payload.to_string());
                publish.pkid = 9;
                self.send(Packet::Publish(publish)).await;
            }
        }
    }

    #[tokio::test]
    async fn provision_then_connect_with_the_certificate_until_the_server_cuts_it() {
        use fake_server::Fake;
        let fake = Fake::start().await;
        let target = fake.target();
        let dir = tempfile::tempdir().unwrap();
        PhoneState::init(dir.path(), &profile()).unwrap();

        let mac: Mac = "0011aabbccdd".parse().unwrap();
        let data_topic = |rest: &str| Topic::PhoneData(mac.clone(), rest.into()).to_string();
        let server = async {
            let (mut conn, peer) = fake.accept().await;
            assert_eq!(peer.ip(), IpAddr::from([127, 0, 0, 2]));
            let connect = conn.connack(ConnectReturnCode::Success).await;
            assert_eq!(connect.client_id, mac.client_id());
            let login = connect.login.unwrap();
            assert_eq!(
                (login.username.as_str(), login.password.as_str()),
                ("0011aabbccdd", "123456")
            );
            let filter = conn
                .suback(SubscribeReasonCode::Success(QoS::AtLeastOnce))
                .await;
            assert_eq!(
                filter,
                Topic::PhoneProvisionResponse(mac.clone()).to_string()
            );
            let request = conn.puback().await;
            assert_eq!(
                request.topic,
                Topic::PhoneProvisionRequest(mac.clone()).to_string()
            );
            let request: Value = serde_json::from_slice(&request.payload).unwrap();
            assert_eq!(request["vendor"], "Yealink");
            assert_eq!(request["type"], "T54W");
            let issued = fake
                .ca
                .issue_client_from_csr(
                    request["csr"].as_str().unwrap(),
                    "0011aabbccdd",
                    "phone",
                    "default",
                )
                .unwrap();
            conn.publish(
                &filter,
                serde_json::json!({
                    "certificate": issued.cert_pem,
                    "ca": fake.ca.cert_pem(),
                    "config": {"sip": {"user": "100"}},
                }),
            )
            .await;
            let Packet::PubAck(ack) = conn.recv().await else {
                panic!("expected PUBACK")
            };
            assert_eq!(ack.pkid, 9);
            let complete = conn.puback().await;
            assert_eq!(
                complete.topic,
                Topic::PhoneProvisionComplete(mac.clone()).to_string()
            );
            assert_eq!(&complete.payload[..], b"{}");
            assert_eq!(conn.recv().await, Packet::Disconnect);
        };
        let (outcome, ()) = tokio::join!(provision(dir.path(), &target), server);
        assert_eq!(outcome.unwrap(), ProvisionOutcome::Provisioned);
        assert!(is_provisioned(dir.path()));
        assert_eq!(
            fs::read_to_string(dir.path().join(SERVER_CA_FILE)).unwrap(),
            fake.ca.cert_pem()
        );
        let state = PhoneState::open(dir.path()).unwrap();
        assert_eq!(state.record.configuration.unwrap()["sip"]["user"], "100");

        let server = async {
            let (mut conn, _) = fake.accept().await;
            let presented = conn
                .tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c[0].to_vec());
            let connect = conn.connack(ConnectReturnCode::Success).await;
            assert_eq!(connect.client_id, mac.client_id());
            assert_eq!(connect.login, None);
            conn.suback(SubscribeReasonCode::Success(QoS::AtLeastOnce))
                .await;
            let data = conn.puback().await;
            assert_eq!(data.topic, data_topic("hello"));
            (conn, presented)
        };
        let client = async {
            let mut session = connect_provisioned(dir.path(), &target).await.unwrap();
            assert_eq!(
                session
                    .subscribe(&Filter::PhoneData(mac.clone()).to_string())
                    .await
                    .unwrap(),
                1
            );
            session.publish(&data_topic("hello"), "hi").await.unwrap();
            session
        };
        let (mut session, (conn, presented)) = tokio::join!(client, server);
        let cert = fs::read_to_string(dir.path().join(PHONE_CERT_FILE)).unwrap();
        assert_eq!(
            presented,
            Some(fleet_certs::certs_from_pem(&cert).unwrap()[0].to_vec())
        );
        // The server cuts the session, as after Reset Authentication.
        drop(conn);
        let end = tokio::time::timeout(Duration::from_secs(5), session.closed())
            .await
            .unwrap();
        assert!(matches!(end, SessionEnd::ClosedByServer), "{end}");
    }

    #[tokio::test]
    async fn refusals_and_error_responses_are_outcomes() {
        use fake_server::Fake;
        let fake = Fake::start().await;
        let target = fake.target();
        let dir = tempfile::tempdir().unwrap();
        PhoneState::init(dir.path(), &PhoneProfile::new("0011aabbccdd")).unwrap();

        let server = async {
            let (mut conn, _) = fake.accept().await;
            let connect = conn.connack(ConnectReturnCode::BadUserNamePassword).await;
            assert_eq!(connect.login.unwrap().password, "");
        };
        let (outcome, ()) = tokio::join!(provision(dir.path(), &target), server);
        assert_eq!(
            outcome.unwrap(),
            ProvisionOutcome::Refused {
                code: 4,
                reason: None
            }
        );

        let server = async {
            let (mut conn, _) = fake.accept().await;
            let connect = conn.connack(ConnectReturnCode::NotAuthorized).await;
            assert_eq!(connect.login.unwrap().password, "000000");
        };
        let (code, ()) = tokio::join!(connect_raw(dir.path(), &target, Some("000000")), server);
        assert_eq!(code.unwrap(), 5);

        let server = async {
            let (mut conn, _) = fake.accept().await;
            conn.connack(ConnectReturnCode::Success).await;
            let filter = conn
                .suback(SubscribeReasonCode::Success(QoS::AtLeastOnce))
                .await;
            // The answer overtakes the PUBACK of the request.
            let Packet::Publish(request) = conn.recv().await else {
                panic!("expected PUBLISH")
            };
            conn.publish(
                &filter,
                serde_json::json!({"error": "phone unknown", "code": "not_found"}),
            )
            .await;
            conn.send(Packet::PubAck(PubAck::new(request.pkid))).await;
            let Packet::PubAck(_) = conn.recv().await else {
                panic!("expected PUBACK")
            };
            assert_eq!(conn.recv().await, Packet::Disconnect);
        };
        let (outcome, ()) = tokio::join!(provision(dir.path(), &target), server);
        assert_eq!(
            outcome.unwrap(),
            ProvisionOutcome::Failed {
                code: "not_found".into(),
                error: "phone unknown".into()
            }
        );
        assert!(!is_provisioned(dir.path()));

        let server = async {
            let (mut conn, _) = fake.accept().await;
            conn.connack(ConnectReturnCode::Success).await;
            conn.suback(SubscribeReasonCode::Failure).await;
        };
        let (outcome, ()) = tokio::join!(provision(dir.path(), &target), server);
        assert!(matches!(outcome, Err(PhoneError::SubscribeDenied(_))));

        assert!(matches!(
            connect_provisioned(dir.path(), &target).await,
            Err(PhoneError::NotProvisioned)
        ));
    }

    #[test]
    fn outcomes_read_well() {
        assert_eq!(
            ProvisionOutcome::Refused {
                code: 4,
                reason: None
            }
            .to_string(),
            "refused: bad user name or password (4)"
        );
        assert_eq!(
            ProvisionOutcome::Refused {
                code: 5,
                reason: Some("authentication blocked: Reset Authentication is needed".into())
            }
            .to_string(),
            "refused: authentication blocked: Reset Authentication is needed (5)"
        );
        assert_eq!(
            ProvisionOutcome::Failed {
                code: "wrong_state".into(),
                error: "blocked".into()
            }
            .to_string(),
            "failed: blocked (wrong_state)"
        );
    }
}
