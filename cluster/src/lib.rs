//! fleetgate past one machine: stateless edges and a controller that talk over a NATS bus.
//!
//! The front door and the controller already meet at two small interfaces of the broker:
//! [`fleet_broker::Admission`] (the front door asks; the controller decides) and
//! [`fleet_broker::SessionControl`] (the controller changes live sessions). In a cluster the
//! two sides run in different processes, and this crate carries both interfaces over NATS:
//! - [`edge::EdgeLink`] is an edge's `Admission`: every call is a NATS request to the
//!   controller, answered after the controller has decided (an admission, a device's inbox
//!   message, the rights of an opened session). No answer in time is a refusal ("server
//!   unavailable") or an unacknowledged message, never an open door.
//! - [`controller::ClusterSessions`] is the controller's `SessionControl`: it knows which edge
//!   holds which session (from the sessions the edges opened through it) and sends each change
//!   to that edge, in the order the controller made them; a cut is a request that the edge
//!   answers once the session's rights are withdrawn, and nothing the controller says after it
//!   leaves before that answer, so an operator hears of a reject only after the cut.
//! - [`controller::ClusterBus`] is the controller's [`fleet_broker::Bus`]: its publications
//!   (events) go to every edge's router, so an operator on any edge hears them.
//!
//! Subjects are in [`subject`]; what travels is JSON ([`wire`]).

pub mod controller;
pub mod edge;
pub mod wire;

use std::time::Duration;

/// The bus's subjects.
pub mod subject {
    /// Edge → controller, request: a CONNECT to decide ([`crate::wire::Admit`]).
    pub const ADMIT: &str = "fleet.ctl.admit";
    /// Edge → controller, request: an admitted session is registered ([`crate::wire::Opened`]).
    pub const OPENED: &str = "fleet.ctl.opened";
    /// Edge → controller: a session ended ([`crate::wire::Closed`]).
    pub const CLOSED: &str = "fleet.ctl.closed";
    /// Edge → controller: the front door refused a CONNECT by itself ([`crate::wire::Refused`]).
    pub const REFUSED: &str = "fleet.ctl.refused";
    /// Edge → controller, request: a PUBLISH to an inbox topic ([`crate::wire::Message`]).
    pub const MESSAGE: &str = "fleet.ctl.message";
    /// Controller → everyone, every [`crate::BEAT`]: the serving controller's instance.
    pub const CONTROLLER_BEAT: &str = "fleet.ctl.beat";
    /// Edge → controllers, every [`crate::BEAT`]: the edge's name and incarnation.
    pub const EDGE_BEAT: &str = "fleet.edge.beat";
    /// Controller → every edge: a publication for the routers ([`crate::wire::Event`]).
    pub const EVENTS: &str = "fleet.events";

    /// Controller → one edge: changes to the sessions it holds ([`crate::wire::ToEdge`]).
    pub fn edge(node: &str) -> String {
        format!("fleet.edge.{node}.sessions")
    }
}

/// The queue group of the controllers' subscriptions: should two controllers ever listen at
/// once (a deposed one that has not exited yet), each request reaches one of them only.
pub const CONTROLLERS: &str = "fleet-controllers";

/// How often the controller and the edges say they are there.
pub const BEAT: Duration = Duration::from_secs(1);

/// An edge not heard of for this long is gone: the controller forgets its sessions.
pub const EDGE_SILENCE: Duration = Duration::from_secs(10);

/// No controller heard of for this long: an edge says so in its log (admissions fail anyway,
/// for want of an answer).
pub const CONTROLLER_SILENCE: Duration = Duration::from_secs(3);

/// How long the controller waits for an edge to confirm a cut before it goes on (the edge is
/// gone or cut off; it ends every session it holds when it is back, see `edge.rs`).
pub const CUT_PATIENCE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot reach the NATS servers {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("NATS: {0}")]
    Nats(String),
}

/// Connects to the bus as `name` (shown in the NATS servers' monitoring), with every server of
/// `servers` to try and to fall back on; async-nats reconnects by itself when one goes away.
pub async fn connect(
    servers: &[String],
    name: &str,
    events: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, ClusterError> {
    let events = std::sync::Arc::new(events);
    // What may be shown of the servers: never a password or a token.
    let shown = || {
        servers
            .iter()
            .map(|s| fleet_config::redacted_url(s))
            .collect::<Vec<_>>()
            .join(", ")
    };
    // async-nats logs the addresses it connects to (at debug): they hold no credentials, which
    // are handed over apart below.
    let addrs: Vec<async_nats::ServerAddr> = servers
        .iter()
        .map(|s| fleet_config::without_userinfo(s).parse())
        .collect::<Result<_, _>>()
        .map_err(|e: std::io::Error| ClusterError::Connect {
            servers: shown(),
            reason: e.to_string(),
        })?;
    let mut options = async_nats::ConnectOptions::new();
    // async-nats does not read credentials from a URL itself: `USER:PASSWORD@` or `TOKEN@`
    // of the first URL that names any (the configuration checked that they all agree).
    if let Some(userinfo) = servers.iter().find_map(|s| fleet_config::nats_userinfo(s)) {
        options = match userinfo.split_once(':') {
            Some((user, password)) => {
                options.user_and_password(percent_decoded(user), percent_decoded(password))
            }
            None => options.token(percent_decoded(userinfo)),
        };
    }
    options
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .event_callback(move |event| {
            let events = events.clone();
            async move { events(event) }
        })
        .connect(addrs)
        .await
        .map_err(|e| ClusterError::Connect {
            servers: shown(),
            reason: e.to_string(),
        })
}

/// `text` with its `%XX` escapes decoded (a URL's user information may escape `:`, `@` or
/// `/`); an escape that is not one stays as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a node's NATS connection tells it (an edge's link, the controller's `serve`): the bus
/// coming back after a loss, or messages dropped, mean that what was sent meanwhile may be
/// lost. For [`connect`]'s event callback ([`Connection::on_event`]).
#[derive(Default)]
pub struct Connection {
    lost: std::sync::atomic::AtomicBool,
    pub(crate) back: tokio::sync::Notify,
    /// The NATS client dropped messages of this node's subscriptions (a slow consumer).
    pub(crate) missed: tokio::sync::Notify,
}

impl Connection {
    /// Whether the bus is lost now (it dropped and has not come back).
    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// For [`connect`]'s event callback.
    pub fn on_event(&self, event: async_nats::Event) {
        use std::sync::atomic::Ordering;
        match event {
            async_nats::Event::Disconnected => {
                tracing::warn!("the bus is lost: no device is admitted until it is back");
                self.lost.store(true, Ordering::SeqCst);
            }
            async_nats::Event::Connected => {
                if self.lost.swap(false, Ordering::SeqCst) {
                    tracing::info!("the bus is back");
                    self.back.notify_one();
                }
            }
            // Messages were dropped: an order (a cut) may be among them.
            async_nats::Event::SlowConsumer(sid) => {
                tracing::warn!(sid, "bus: messages were dropped (slow consumer)");
                self.missed.notify_one();
            }
            // A wrong password or token, a permission denied: the node cannot work, say so.
            async_nats::Event::ServerError(e) => {
                tracing::warn!("bus: the NATS server refuses: {e}")
            }
            async_nats::Event::ClientError(e) => tracing::warn!("bus: {e}"),
            other => tracing::debug!("bus: {other}"),
        }
    }
}

/// A random 64-bit number (a controller's instance, an edge's incarnation, the base of its
/// session ids).
pub fn random_u64() -> u64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    // The system's generator does not fail on the systems fleetd runs on; if it ever did,
    // the time is still unique enough for an instance name.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return nanos ^ u64::from(std::process::id()) << 32;
    }
    u64::from_le_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::percent_decoded;

    #[test]
    fn credentials_of_a_url_are_percent_decoded() {
        assert_eq!(percent_decoded("s3cret"), "s3cret");
        assert_eq!(percent_decoded("a%3Ab%40c%2F"), "a:b@c/");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz%4"), "%zz%4");
    }
}
