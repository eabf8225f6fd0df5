//! The contract between the front door and whoever decides who may connect (the controller).
//!
//! The broker knows nothing about stations or phones: it hands the controller what the client
//! presented (CONNECT fields, peer address, the verified certificate) and receives a
//! [`Decision`]. Later the controller changes live sessions through [`SessionControl`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::acl::Rights;

/// MQTT protocol level of a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MqttVersion {
    V311,
    V5,
}

/// How the presented client certificate was verified (after every handshake, resumed ones
/// included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Trust {
    /// Chains to the fleet CA (operators, provisioned phones).
    FleetCa,
    /// Chains to a configured manufacturer CA (stations).
    ManufacturerCa,
    /// Self-signed; its signature is valid under its own key. Proof of possession is the handshake.
    SelfSigned,
}

/// The leaf certificate a client presented, DER, and how it was verified.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresentedCertificate {
    pub der: Vec<u8>,
    pub trust: Trust,
}

/// Everything the front door knows about a client at CONNECT time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectInfo {
    /// Unique per accepted connection; lets `session_closed` ignore a session already replaced.
    pub session_id: u64,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub peer_addr: SocketAddr,
    pub certificate: Option<PresentedCertificate>,
    pub version: MqttVersion,
}

/// Why a CONNECT is refused. Mapped to MQTT 3.1.1 return codes and MQTT 5 reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// 3.1.1: 5, v5: 0x87.
    NotAuthorized,
    /// 3.1.1: 4, v5: 0x86.
    BadUserNameOrPassword,
    /// 3.1.1: 2, v5: 0x85.
    ClientIdentifierNotValid,
    /// 3.1.1: 3, v5: 0x88.
    ServerUnavailable,
    /// 3.1.1: 3, v5: 0x97.
    QuotaExceeded,
}

/// The controller's answer to a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// `reserved`: the client may use the connection slots kept for operators
    /// (`Settings::reserved_sessions`), so that a flood of devices never locks them out.
    Allow {
        rights: Rights,
        reserved: bool,
    },
    Deny {
        refusal: Refusal,
        reason: Reason,
    },
}

/// Why a CONNECT is refused: for the log (and the audit), and for the client. MQTT 5 clients
/// read `client` as the CONNACK's Reason String (3.1.1 clients get the return code only); the
/// decider words it so that it tells no secret (no password, no key but the client's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    pub log: String,
    pub client: String,
}

impl Reason {
    pub fn new(log: impl Into<String>, client: impl Into<String>) -> Reason {
        Reason {
            log: log.into(),
            client: client.into(),
        }
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Decides admissions; implemented by the controller.
pub trait Admission: Send + Sync + 'static {
    /// Called once per CONNECT, after TLS and after the front door's own checks (connection cap,
    /// well-formed client id). The session is not live until this returns `Allow`.
    fn admit(&self, info: ConnectInfo) -> BoxFuture<'_, Decision>;

    /// Called once an admitted session is registered, just before its CONNACK, on tokio's
    /// blocking pool (it may wait for a lock held across a disk write): returns the
    /// session's rights as they are now, or the refusal its CONNACK carries instead (the
    /// session is cut at once): `NotAuthorized` when a decision took the device's rights away
    /// meanwhile, `ServerUnavailable` when no controller answered. This closes the race
    /// between an admission and a decision (reject, reset, remove) taken while it was under way:
    /// a decision taken after this call finds the session registered and cuts it.
    fn session_opened(&self, client_id: &str, session_id: u64) -> Result<Rights, Refusal>;

    /// [`Admission::session_opened`] on the caller's async worker, if it can be answered
    /// without waiting (no lock held across a disk write, no read over the network); `None`
    /// otherwise, and then the front door calls `session_opened` on the blocking pool. A
    /// hand-off to the pool costs a connect storm two thread switches per connection.
    fn try_session_opened(
        &self,
        client_id: &str,
        session_id: u64,
    ) -> Option<Result<Rights, Refusal>> {
        let _ = (client_id, session_id);
        None
    }

    /// Called when the front door refuses a CONNECT on its own (client id of the wrong form,
    /// connection cap, certificate refused on re-check), so that the refusal is audited too.
    fn refused(&self, client_id: &str, peer_addr: SocketAddr, reason: &str);

    /// Called when an admitted session ends, for whatever reason; on tokio's blocking pool,
    /// like `session_opened`.
    fn session_closed(&self, client_id: &str, session_id: u64);

    /// [`Admission::session_closed`] on the caller's async worker if it can be done without
    /// waiting, as [`Admission::try_session_opened`]; false: not done, the front door calls
    /// `session_closed` on the blocking pool.
    fn try_session_closed(&self, client_id: &str, session_id: u64) -> bool {
        let _ = (client_id, session_id);
        false
    }

    /// A PUBLISH of session `session_id` to one of its inbox topics ([`Rights::inbox`]). The
    /// front door acknowledges it (PUBACK, or PUBREC/PUBCOMP at QoS 2) once this future has
    /// completed with `true`, and reads nothing more from that client meanwhile: a slow
    /// controller slows the sender down instead of queueing without bound. `false` (the message
    /// could not be handled durably) ends the session unacknowledged, so that the client sends
    /// it again.
    fn message(
        &self,
        client_id: &str,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, bool> {
        let _ = (client_id, session_id, topic, payload);
        Box::pin(async { true })
    }
}

/// How the controller changes live sessions; implemented by the front door.
pub trait SessionControl: Send + Sync + 'static {
    /// Replace the rights of a live session at once. Returns false when no such session is live.
    fn set_rights(&self, client_id: &str, rights: Rights) -> bool;

    /// [`SessionControl::set_rights`] only if the live session of `client_id` is `session_id`
    /// (the one the caller checked), never a session that took the client id over meanwhile.
    fn set_rights_of(&self, client_id: &str, session_id: u64, rights: Rights) -> bool {
        let _ = session_id;
        self.set_rights(client_id, rights)
    }

    /// Revoke a live session now: from this call on it may neither publish nor subscribe. The
    /// socket is closed once a message on `last_topic` has been written to the client, or after
    /// a short bounded grace. Returns false when no such session is live.
    fn cut(&self, client_id: &str, last_topic: Option<String>) -> bool;

    /// Whether a session with this client id is live.
    fn is_connected(&self, client_id: &str) -> bool;

    /// Delivers a message on one of `client_id`'s mailbox topics ([`crate::mailbox`]) straight
    /// to its session, at QoS 0, if it subscribed to it. Messages to one session are written in
    /// the order of these calls, and a `cut` after a `deliver` comes after it. Returns false
    /// when no such session is live.
    fn deliver(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool;

    /// Like [`SessionControl::deliver`], but only to the session `session_id` (an answer to a
    /// request goes to the session that asked, never to one that took its client id over).
    /// A session with more than its bound of undelivered messages is ended instead (it is not
    /// reading), so nothing is lost silently: either it is written to that session, or the
    /// session ends. Returns false when the message was not queued.
    fn deliver_to(&self, client_id: &str, session_id: u64, topic: String, payload: Vec<u8>)
        -> bool;
}
