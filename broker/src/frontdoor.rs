//! The public listener: accepts TCP, terminates TLS (each handshake in its own task, with a
//! timeout), reads CONNECT, asks the controller for admission, then pumps packets between the
//! socket and the client's own in-process link into rumqttd's router, enforcing the client's
//! rights on every PUBLISH and SUBSCRIBE.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::{
    v4::V4, v5::V5, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect,
    DisconnectProperties, DisconnectReasonCode, LastWill, LastWillProperties, Packet, PingResp,
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelProperties,
    Publish, PublishProperties, QoS, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};
use rumqttd::protocol::{Error as CodecError, Protocol};
use rumqttd::{Notification, Router, RouterConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::acl::Rights;
use crate::admission::{
    Admission, ConnectInfo, Decision, MqttVersion, PresentedCertificate, Refusal, SessionControl,
};
use crate::bus::LocalBus;
use crate::flood::{ConnectionRate, PendingHandshakes};
use crate::frame;
use crate::registry::{self, Control, NewSession, Registry, SessionCaps, SharedRights};
use crate::tls::{self, ClientPolicy, TlsSetupError};

/// First packet id of the front door's own QoS 1 mailbox messages (see `Pump::mailbox_pkid`).
const MAILBOX_PKIDS_FROM: u16 = 0x8000;
/// Mailbox messages a client may leave unacknowledged before the next ones go at QoS 0.
const MAX_MAILBOX_UNACKED: usize = 64;

/// Client ids with this prefix are reserved for fleetd's own in-process links.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "fleetd-";

/// Everything the front door needs, already parsed and validated.
pub struct Settings {
    pub listen: SocketAddr,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
    pub fleet_ca: Vec<CertificateDer<'static>>,
    pub manufacturer_cas: Vec<CertificateDer<'static>>,
    pub allow_self_signed: bool,
    /// Live sessions at most; above it a CONNECT is refused with a proper CONNACK.
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    /// Keepalive applied to clients that ask for none (keepalive 0).
    pub idle_timeout: Duration,
    /// Bounded grace for delivering the final `cmd` before a cut.
    pub cut_grace: Duration,
    /// A write that does not finish in this time ends the session (a client that stops reading).
    pub write_timeout: Duration,
    /// New TCP connections per source address and minute; beyond it a connection is closed
    /// before its TLS handshake.
    pub connections_per_ip_per_minute: u32,
    /// Live sessions from one source address at most (the reserved slots come on top, for
    /// clients whose admission says `reserved`). Checked after admission; a client beyond it
    /// gets CONNACK 3 (3.1.1) or 0x97 Quota Exceeded (5).
    pub sessions_per_ip: usize,
    /// Slots of `max_connections` (and of `sessions_per_ip`) that only clients admitted with
    /// `reserved` (operators) may use. At most `max_connections - 1`: a larger value would
    /// leave no slot for anyone else, and is taken as that.
    pub reserved_sessions: usize,
    /// Unfinished TLS handshakes and CONNECT reads from one source address at once; beyond it
    /// the accept loop closes a new socket before any TLS work.
    pub handshakes_per_ip: usize,
    /// Messages queued to one session and not yet written; past it the session is ended.
    pub max_undelivered: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("TLS setup: {0}")]
    Tls(#[from] TlsSetupError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot attach to the router: {0}")]
    Link(String),
}

struct LinkRequest {
    client_id: String,
}

type LinkParts = (LinkTx, LinkRx, Notification);
type LinkFactory = Arc<dyn Fn(LinkRequest) -> Result<LinkParts, String> + Send + Sync>;

struct Shared {
    settings: SettingsRuntime,
    registry: Arc<Registry>,
    links: LinkFactory,
    policy: Arc<ClientPolicy>,
    acceptor: TlsAcceptor,
    open_sockets: AtomicUsize,
    /// Sockets in their TLS handshake or waiting for CONNECT, per source address.
    handshakes: Mutex<PendingHandshakes>,
    /// Publishes wills on behalf of clients whose own link is gone.
    will_link: Mutex<LinkTx>,
    /// Sessions' router links live now ([`Broker::router_links`]).
    router_links: AtomicUsize,
    shutdown: watch::Receiver<bool>,
}

struct SettingsRuntime {
    max_connections: usize,
    /// Sockets open at once, whatever their state: the process's descriptors are bounded.
    ///
    /// This cap cannot keep slots for operators the way `reserved_sessions` does for sessions:
    /// who a client is, is known only from its certificate, after the TLS handshake, and the cap
    /// must be applied before it. What keeps one source address from filling it with sockets
    /// that never finish their handshake is `handshakes_per_ip` ([`PendingHandshakes`]); a
    /// flood from many addresses fills it only until the handshake and connect timeouts close
    /// its sockets.
    max_sockets: usize,
    handshake_timeout: Duration,
    connect_timeout: Duration,
    max_packet_size: usize,
    idle_timeout: Duration,
    cut_grace: Duration,
    write_timeout: Duration,
    connections_per_ip_per_minute: u32,
    handshakes_per_ip: usize,
}

/// The running front door with its router.
pub struct Broker {
    shared: Arc<Shared>,
    listener: Mutex<Option<TcpListener>>,
    local_addr: SocketAddr,
    shutdown_tx: watch::Sender<bool>,
}

/// Pending connections the kernel queues for the listener before `accept`.
///
/// `TcpListener::bind` (mio) asks for a backlog of 128 only. When a site loses power, its
/// thousands of stations come back within seconds: past the backlog, Linux drops their SYNs
/// (or, with `tcp_abort_on_overflow`, resets them) and each one retries after a second or more,
/// which stretches the reconnect storm. The kernel caps the value at `net.core.somaxconn`
/// (4096 by default since Linux 5.4), so raise that too on older kernels.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the public listener with [`LISTEN_BACKLOG`]. Otherwise as `TcpListener::bind`:
/// `SO_REUSEADDR` on (a restarted fleetd rebinds while old connections are in `TIME_WAIT`), and
/// `IPV6_V6ONLY` left at the system's default, so `[::]` is dual-stack where the system says so
/// (`net.ipv6.bindv6only = 0`, Linux's default).
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn build_link(links: &LinkFactory, client_id: String) -> Result<LinkParts, BrokerError> {
    let links = links.clone();
    // `LinkBuilder::build` blocks the calling thread until the router answers: keep it off the
    // async workers.
    tokio::task::spawn_blocking(move || links(LinkRequest { client_id }))
        .await
        .map_err(|e| BrokerError::Link(e.to_string()))?
        .map_err(BrokerError::Link)
}

impl Broker {
    /// Builds the TLS configuration, starts the router and binds the listener. Clients are not
    /// accepted until [`Broker::serve`].
    pub async fn bind(settings: Settings) -> Result<Broker, BrokerError> {
        let provider = tls::provider();
        let policy = Arc::new(ClientPolicy::new(
            &settings.fleet_ca,
            &settings.manufacturer_cas,
            settings.allow_self_signed,
            &provider,
        )?);
        let server_config = tls::server_config(
            settings.server_chain,
            settings.server_key,
            policy.clone(),
            provider,
            settings.max_connections.clamp(256, 65_536),
        )?;

        let router = Router::new(
            0,
            RouterConfig {
                // fleetd's own links come on top of the clients.
                max_connections: settings.max_connections + 64,
                max_outgoing_packet_count: 200,
                max_segment_size: (settings.max_packet_size * 4).max(1 << 20),
                max_segment_count: 4,
                custom_segment: None,
                initialized_filters: None,
                shared_subscriptions_strategy: Default::default(),
            },
        );
        let router_tx = router.spawn();
        // The router's sender type names a private type: it only lives inside this closure.
        let links: LinkFactory = Arc::new(move |req: LinkRequest| {
            LinkBuilder::new(&req.client_id, router_tx.clone())
                // Sessions never outlive their connection: rights are decided per connection,
                // and a resumed session would carry subscriptions granted under old rights.
                .clean_session(true)
                // Without dynamic filters a publish to a topic nobody subscribed disconnects.
                .dynamic_filters(true)
                .build()
                .map_err(|e: LinkError| e.to_string())
        });

        let (will_tx, _will_rx, _) =
            build_link(&links, format!("{RESERVED_CLIENT_ID_PREFIX}wills")).await?;

        let listener = listen(settings.listen).map_err(|source| BrokerError::Bind {
            addr: settings.listen,
            source,
        })?;
        let local_addr = listener.local_addr().map_err(|source| BrokerError::Bind {
            addr: settings.listen,
            source,
        })?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            settings: SettingsRuntime {
                max_connections: settings.max_connections,
                // Sockets still in handshake or before CONNECT are bounded too, so that a flood
                // of idle sockets cannot exhaust the process's descriptors.
                max_sockets: settings.max_connections + settings.max_connections / 8 + 256,
                handshake_timeout: settings.handshake_timeout,
                connect_timeout: settings.connect_timeout,
                max_packet_size: settings.max_packet_size,
                idle_timeout: settings.idle_timeout,
                cut_grace: settings.cut_grace,
                write_timeout: settings.write_timeout,
                connections_per_ip_per_minute: settings.connections_per_ip_per_minute,
                handshakes_per_ip: settings.handshakes_per_ip,
            },
            registry: Arc::new(Registry::with_caps(
                settings.max_undelivered,
                SessionCaps {
                    max_sessions: settings.max_connections,
                    per_address: settings.sessions_per_ip,
                    reserved: settings
                        .reserved_sessions
                        .min(settings.max_connections.saturating_sub(1)),
                },
            )),
            links,
            policy,
            acceptor: TlsAcceptor::from(Arc::new(server_config)),
            open_sockets: AtomicUsize::new(0),
            handshakes: Mutex::new(PendingHandshakes::new(settings.handshakes_per_ip)),
            will_link: Mutex::new(will_tx),
            router_links: AtomicUsize::new(0),
            shutdown: shutdown_rx,
        });
        Ok(Broker {
            shared,
            listener: Mutex::new(Some(listener)),
            local_addr,
            shutdown_tx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// How many live sessions have a link into the router: only those that published or
    /// subscribed past their inbox and mailboxes (fleetd's own links are not counted).
    pub fn router_links(&self) -> usize {
        self.shared.router_links.load(Ordering::Relaxed)
    }

    /// The live sessions, for the controller ([`crate::SessionControl`]).
    pub fn sessions(&self) -> Arc<Registry> {
        self.shared.registry.clone()
    }

    /// An in-process link with every right, for the controller. `name` must be unique.
    pub async fn local_bus(&self, name: &str) -> Result<LocalBus, BrokerError> {
        let (tx, rx, _) = build_link(
            &self.shared.links,
            format!("{RESERVED_CLIENT_ID_PREFIX}{name}"),
        )
        .await?;
        Ok(LocalBus::new(tx, rx))
    }

    /// Starts accepting clients. Returns at once; the accept loop runs until [`Broker::shutdown`].
    pub fn serve(&self, admission: Arc<dyn Admission>) {
        let listener = self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(listener) = listener else {
            warn!("serve called twice");
            return;
        };
        let shared = self.shared.clone();
        tokio::spawn(accept_loop(listener, shared, admission));
    }

    /// Stops accepting and cuts every live session.
    pub fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
        self.shared.registry.cut_all();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct SocketSlot(Arc<Shared>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection counted in [`Shared::handshakes`] from its accept until its CONNECT is read, or
/// until it ends before.
struct HandshakeSlot {
    shared: Arc<Shared>,
    ip: IpAddr,
}

impl HandshakeSlot {
    /// The slot, or `None` when `ip` has as many unfinished handshakes as it may.
    fn begin(shared: &Arc<Shared>, ip: IpAddr) -> Option<HandshakeSlot> {
        let mut handshakes = shared.handshakes.lock().unwrap_or_else(|e| e.into_inner());
        handshakes.begin(ip).then(|| HandshakeSlot {
            shared: shared.clone(),
            ip,
        })
    }
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        let mut handshakes = self
            .shared
            .handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        handshakes.end(self.ip);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, admission: Arc<dyn Admission>) {
    let mut shutdown = shared.shutdown.clone();
    let mut rate = ConnectionRate::new(shared.settings.connections_per_ip_per_minute);
    loop {
        let accepted = tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            // A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6 addresses: show,
            // audit and whitelist them as the IPv4 addresses they are.
            Ok((tcp, peer)) => (tcp, SocketAddr::new(peer.ip().to_canonical(), peer.port())),
            Err(e) => {
                // Out of descriptors or a transient error: back off briefly instead of spinning.
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if !rate.admit(peer.ip(), std::time::Instant::now()) {
            // Closed before any TLS work; audited within the controller's refusal budget.
            let reason = format!(
                "connection rate of this address exceeded; retry in {:?}",
                rate.retry_after(peer.ip())
            );
            admission.refused("-", peer, &reason);
            continue;
        }
        // One address may not hold more of the sockets below than its share (see `max_sockets`).
        let Some(handshake) = HandshakeSlot::begin(&shared, peer.ip()) else {
            let reason = format!(
                "too many unfinished handshakes from this address (at most {})",
                shared.settings.handshakes_per_ip
            );
            admission.refused("-", peer, &reason);
            continue;
        };
        if shared.open_sockets.fetch_add(1, Ordering::Relaxed) >= shared.settings.max_sockets {
            shared.open_sockets.fetch_sub(1, Ordering::Relaxed);
            debug!(%peer, "socket cap reached, closing");
            continue;
        }
        let slot = SocketSlot(shared.clone());
        let _ = tcp.set_nodelay(true);
        let admission = admission.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let shared = _slot.0.clone();
            connection(shared, admission, tcp, peer, handshake).await;
        });
    }
    info!("front door stopped accepting");
}

/// The codec of the client's protocol version.
#[derive(Clone, Copy)]
struct Codec(MqttVersion);

impl Codec {
    fn read(&self, buf: &mut BytesMut, max: usize) -> Result<Packet, CodecError> {
        // rumqttd's decoder is not ours: a panic on hostile bytes must end this connection, not
        // the task. Fuzzing found one (a v5 CONNACK or UNSUBACK from a client hits
        // `unreachable!`); `drain_frames` refuses server-only packet types before decoding, and
        // this stays as insurance for what fuzzing has not found.
        let version = self.0;
        std::panic::catch_unwind(AssertUnwindSafe(|| match version {
            MqttVersion::V311 => V4.read_mut(buf, max),
            MqttVersion::V5 => V5.read_mut(buf, max),
        }))
        .unwrap_or(Err(CodecError::IncorrectPacketFormat))
    }

    fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, CodecError> {
        match self.0 {
            MqttVersion::V311 => V4.write(frame::strip_properties(packet), out),
            MqttVersion::V5 => V5.write(packet, out),
        }
    }
}

struct Will {
    topic: bytes::Bytes,
    payload: bytes::Bytes,
    retain: bool,
    /// On one of the session's inbox topics ([`Rights::inbox`]): handed to the admission, not
    /// to the router.
    inbox: bool,
    delay: Duration,
    /// What the will's properties say of the message (MQTT 5 §3.1.3.2): published with it,
    /// user properties in their order [MQTT-3.1.3-10].
    properties: Option<PublishProperties>,
}

/// The PUBLISH properties of a will published with `will` (its delay is the front door's).
fn will_publish_properties(will: &LastWillProperties) -> Option<PublishProperties> {
    let properties = PublishProperties {
        payload_format_indicator: will.payload_format_indicator,
        message_expiry_interval: will.message_expiry_interval,
        topic_alias: None,
        response_topic: will.response_topic.clone(),
        correlation_data: will.correlation_data.clone(),
        user_properties: will.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: will.content_type.clone(),
    };
    (properties != PublishProperties::default()).then_some(properties)
}

/// Read buffer of a session with no partial packet: enough for PINGREQ and most small packets.
const IDLE_READ_CAPACITY: usize = 256;
/// Read size while a packet is incomplete or data keeps coming.
const READ_CHUNK: usize = 4096;

/// Sizes the read buffer before each read. A session waits in `read_buf` most of its life with
/// this buffer allocated: with no partial packet in it, it is cut back to
/// [`IDLE_READ_CAPACITY`] (rustls already holds the bytes it decrypted, so a short read loses
/// nothing: the rest comes with the next read). A partial packet gets [`READ_CHUNK`] more.
fn fit_read_buffer(buf: &mut BytesMut) {
    if !buf.is_empty() {
        buf.reserve(READ_CHUNK);
    } else if buf.capacity() > IDLE_READ_CAPACITY {
        *buf = BytesMut::with_capacity(IDLE_READ_CAPACITY);
    } else {
        buf.reserve(IDLE_READ_CAPACITY);
    }
}

async fn read_more(
    reader: &mut ReadHalf<TlsStream<TcpStream>>,
    buf: &mut BytesMut,
) -> std::io::Result<()> {
    buf.reserve(READ_CHUNK);
    let n = reader.read_buf(buf).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn write_packet(
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
    codec: Codec,
    packet: Packet,
    write_timeout: Duration,
) -> Result<(), String> {
    write_packet_within(writer, codec, packet, write_timeout, None).await
}

/// Writes a packet that fits the client's Maximum Packet Size (MQTT 5; `None`: no limit), if
/// need be without its properties ([`fit`]); one that cannot fit is not written at all.
async fn write_packet_within(
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
    codec: Codec,
    packet: Packet,
    write_timeout: Duration,
    max_packet_size: Option<usize>,
) -> Result<(), String> {
    match fit(encode(codec, packet)?, max_packet_size) {
        Some(bytes) => write_raw(writer, &bytes, write_timeout).await,
        None => {
            debug!("a packet larger than the client's maximum packet size was not sent");
            Ok(())
        }
    }
}

fn encode(codec: Codec, packet: Packet) -> Result<BytesMut, String> {
    let mut out = BytesMut::with_capacity(64);
    codec
        .write(packet, &mut out)
        .map_err(|e| format!("encode: {e}"))?;
    Ok(out)
}

/// An encoded packet within the client's Maximum Packet Size [MQTT-3.1.2-24]: as it is, or
/// without its properties when those are only diagnostics (reason string, user properties:
/// [MQTT-3.2.2-19], [MQTT-3.14.2-3], …), or `None` when it cannot fit.
fn fit(encoded: BytesMut, max_packet_size: Option<usize>) -> Option<BytesMut> {
    match max_packet_size {
        Some(max) if encoded.len() > max => frame::without_properties(&encoded)
            .filter(|smaller| smaller.len() <= max)
            .map(|smaller| BytesMut::from(&smaller[..])),
        _ => Some(encoded),
    }
}

/// Writes encoded bytes and flushes them, within the write timeout.
async fn write_raw(
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
    bytes: &[u8],
    write_timeout: Duration,
) -> Result<(), String> {
    timeout(write_timeout, async {
        writer.write_all(bytes).await?;
        writer.flush().await
    })
    .await
    .map_err(|_| "write timed out".to_string())?
    .map_err(|e| format!("write: {e}"))
}

fn client_id_is_valid(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with(RESERVED_CLIENT_ID_PREFIX)
        && id
            .chars()
            .all(|c| c.is_ascii_graphic() && !matches!(c, '+' | '#' | '/' | '$'))
}

/// One client connection, from the TLS handshake to the end of its session. Each step is a
/// function of its own; a step that refuses the client has answered it and closed already.
async fn connection(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: HandshakeSlot,
) {
    let Some((tls, certificate)) = handshake(&shared, tcp, peer).await else {
        return;
    };
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut buf = BytesMut::with_capacity(4096);
    let Some((version, packet)) = read_connect(
        &shared,
        &*admission,
        &mut reader,
        &mut writer,
        &mut buf,
        peer,
    )
    .await
    else {
        return;
    };
    let Packet::Connect(connect, props, last_will, will_props, login) = packet else {
        return;
    };
    // The CONNECT is read: this connection no longer counts as an unfinished handshake.
    drop(pending);
    let client_id = connect.client_id.clone();
    let limits = ClientLimits::of(version, props.as_ref());
    let reply = Reply {
        codec: Codec(version),
        write_timeout: shared.settings.write_timeout,
        limits,
    };
    if props
        .as_ref()
        .is_some_and(|p| p.authentication_method.is_some())
    {
        // MQTT 5 §4.12 [MQTT-4.12.0-1]: the front door supports no extended authentication.
        let reason = "authentication method not supported";
        info!(%peer, client_id = %client_id_for_log(&client_id), "refused: {reason}");
        admission.refused(&client_id_for_log(&client_id), peer, reason);
        let connack = frame::reason_connack(ConnectReturnCode::BadAuthenticationMethod, reason);
        return reply.close_with(&mut writer, connack).await;
    }
    // Read: not kept in the state of this task for the session's life.
    drop(props);
    if let Some((refusal, reason)) = refusal_before_admission(&shared, &client_id, &certificate) {
        info!(%peer, client_id = %client_id_for_log(&client_id), ?refusal, "refused: {reason}");
        admission.refused(&client_id_for_log(&client_id), peer, &reason);
        return reply.refuse(&mut writer, refusal, &reason).await;
    }

    let session_id = shared.registry.next_session_id();
    let info = ConnectInfo {
        session_id,
        client_id: client_id.clone(),
        username: login.as_ref().map(|l| l.username.clone()),
        password: login.as_ref().map(|l| l.password.clone()),
        peer_addr: peer,
        certificate: certificate.ok().flatten(),
        version,
    };
    let (rights, reserved) = match admission.admit(info).await {
        Decision::Allow { rights, reserved } => (rights, reserved),
        Decision::Deny { refusal, reason } => {
            info!(%peer, client_id = %client_id_for_log(&client_id), "refused by the controller: {reason}");
            return reply.refuse(&mut writer, refusal, &reason).await;
        }
    };
    let will = will_within(last_will, will_props, &rights);
    let opening = Opening {
        client_id,
        session_id,
        peer,
        reserved,
    };
    let Some(session) =
        open_session(&shared, &admission, opening, rights, &reply, &mut writer).await
    else {
        return;
    };
    let (connack, keepalive) =
        success_connack(&shared.settings, version, connect.keep_alive, &limits);
    let written = reply.write(&mut writer, connack).await;
    run_session(
        shared,
        admission,
        session,
        will,
        written.is_ok(),
        keepalive,
        (reader, writer, buf),
    )
    .await;
}

/// The TLS handshake, within the handshake timeout, and the certificate policy applied to what
/// the client presented: `Err` is why its certificate is refused (answered after CONNECT).
async fn handshake(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(
    TlsStream<TcpStream>,
    Result<Option<PresentedCertificate>, String>,
)> {
    // The handshake's state (rustls's `ServerConnection` inside `Accept`) is boxed: it is over
    // before the session starts, and unboxed it would size the task of every idle connection.
    let handshake = Box::pin(timeout(
        shared.settings.handshake_timeout,
        shared.acceptor.accept(tcp),
    ));
    let tls = in_time(
        handshake.await,
        peer,
        "TLS handshake failed",
        "TLS handshake timed out",
    )?;
    // The verifier does not run on resumed sessions: apply the policy to the peer certificate
    // after every handshake.
    let certificate = match tls.get_ref().1.peer_certificates() {
        Some(chain) if !chain.is_empty() => shared
            .policy
            .classify_after_handshake(chain, UnixTime::now())
            .map(|trust| {
                Some(PresentedCertificate {
                    der: chain[0].to_vec(),
                    trust,
                })
            }),
        _ => Ok(None),
    };
    Some((tls, certificate))
}

/// The value of a step that had to finish in time; `None`, logged with `failed` or `late`, if
/// it failed or timed out.
fn in_time<T, E: std::fmt::Display>(
    outcome: Result<Result<T, E>, tokio::time::error::Elapsed>,
    peer: SocketAddr,
    failed: &str,
    late: &str,
) -> Option<T> {
    match outcome {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            debug!(%peer, "{failed}: {e}");
            None
        }
        Err(_) => {
            debug!(%peer, "{late}");
            None
        }
    }
}

/// Reads the CONNECT within the connect timeout: its protocol version first, then the whole
/// packet, checked on the raw frame where rumqttd's decoder is lenient. `None`: the client got
/// its answer (or nothing, as the standard wants) and the connection is closed.
async fn read_connect(
    shared: &Shared,
    admission: &dyn Admission,
    reader: &mut ReadHalf<TlsStream<TcpStream>>,
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
    buf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<(MqttVersion, Packet)> {
    let settings = &shared.settings;
    let deadline = Instant::now() + settings.connect_timeout;
    // Boxed, as the handshake: over before the session starts.
    let first = Box::pin(timeout(settings.connect_timeout, async {
        loop {
            match frame::connect_version(buf) {
                Ok(Some(v)) => break Ok(v),
                Ok(None) => read_more(reader, buf).await.map_err(|e| e.to_string())?,
                Err(frame::PreambleError::UnsupportedLevel(level)) => {
                    let _ = write_packet(
                        writer,
                        Codec(MqttVersion::V311),
                        frame::unsupported_version_connack(),
                        settings.write_timeout,
                    )
                    .await;
                    break Err(format!("unsupported protocol level {level}"));
                }
                Err(e) => break Err(e.to_string()),
            }
        }
    }))
    .await;
    let version = in_time(first, peer, "no usable CONNECT", "no CONNECT in time")?;
    let codec = Codec(version);
    loop {
        // What rumqttd's decoder does not look at (the reserved flag, a property twice, …) is
        // checked on the raw frame once all of it is here.
        if let Some(frame) = frame::complete_frame_len(buf).and_then(|len| buf.get(..len)) {
            if let Err(violation) = frame::check_connect(frame) {
                refuse_violation(shared, admission, writer, codec, peer, violation).await;
                return None;
            }
        }
        match codec.read(buf, settings.max_packet_size) {
            Ok(packet) => return Some((version, packet)),
            Err(CodecError::InsufficientBytes(_)) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match timeout(left, read_more(reader, buf)).await {
                    Ok(Ok(())) => {}
                    _ => return None,
                }
            }
            Err(e) => {
                debug!(%peer, "malformed CONNECT: {e}");
                let violation =
                    frame::Violation::Malformed("CONNECT not in the format of the standard");
                refuse_violation(shared, admission, writer, codec, peer, violation).await;
                return None;
            }
        }
    }
}

/// What refuses a CONNECT before the admission is asked (PROTOCOL §2: 5 / 0x87, a client id
/// of the wrong form included), with the reason to log and audit.
fn refusal_before_admission(
    shared: &Shared,
    client_id: &str,
    certificate: &Result<Option<PresentedCertificate>, String>,
) -> Option<(Refusal, String)> {
    if !client_id_is_valid(client_id) {
        Some((Refusal::NotAuthorized, "client id of the wrong form".into()))
    } else if shared.registry.len() >= shared.settings.max_connections
        && !shared.registry.is_connected(client_id)
    {
        // Before admission only the hard cap: who may use the reserved slots, and how many
        // sessions this address has, is decided once the admission has spoken (`register`).
        Some((Refusal::QuotaExceeded, "connection limit reached".into()))
    } else if let Err(reason) = certificate {
        Some((
            Refusal::NotAuthorized,
            format!("client certificate refused: {reason}"),
        ))
    } else {
        None
    }
}

/// The client's will, if it is within its rights at CONNECT (it is published on the client's
/// behalf), retained only if the client may retain.
fn will_within(
    last_will: Option<LastWill>,
    will_props: Option<LastWillProperties>,
    rights: &Rights,
) -> Option<Will> {
    let w = last_will?;
    let topic = std::str::from_utf8(&w.topic).ok()?;
    if !rights.may_publish(topic) {
        return None;
    }
    Some(Will {
        inbox: rights.is_inbox(topic),
        topic: w.topic,
        payload: w.message,
        retain: w.retain && rights.retain,
        delay: Duration::from_secs(
            will_props
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0)
                .into(),
        ),
        properties: will_props.as_ref().and_then(will_publish_properties),
    })
}

/// Who is being let in: what `open_session` needs besides the rights.
struct Opening {
    client_id: String,
    session_id: u64,
    peer: SocketAddr,
    reserved: bool,
}

/// A session that is registered and told to the admission (its router link comes later, if it
/// needs one: [`Pump::router_link`]).
struct OpenSession {
    client_id: String,
    session_id: u64,
    rights: SharedRights,
    control_rx: mpsc::UnboundedReceiver<Control>,
    undelivered: registry::Undelivered,
    /// Dropped once this session released its router link (see `Registry::register`).
    released_tx: tokio::sync::oneshot::Sender<()>,
    codec: Codec,
    limits: ClientLimits,
}

/// Registers the session (taking over an older one of the same client id) and tells the
/// admission it is open. `None`: refused, answered and undone.
async fn open_session(
    shared: &Shared,
    admission: &Arc<dyn Admission>,
    opening: Opening,
    rights: Rights,
    reply: &Reply,
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
) -> Option<OpenSession> {
    let Opening {
        client_id,
        session_id,
        peer,
        reserved,
    } = opening;
    let shared_rights: SharedRights = Arc::new(std::sync::RwLock::new(rights));
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let undelivered = registry::Undelivered::default();
    let (released_tx, released_rx) = tokio::sync::oneshot::channel::<()>();
    let session = NewSession {
        session_id,
        address: peer.ip(),
        reserved,
        rights: shared_rights.clone(),
        control: control_tx,
        released: released_rx,
        undelivered: undelivered.clone(),
    };
    let taken_over = match shared.registry.register(&client_id, session) {
        Ok(taken_over) => taken_over,
        Err(cap) => {
            let reason = cap.reason();
            info!(%peer, client_id = %client_id_for_log(&client_id), "refused: {reason}");
            admission.refused(&client_id_for_log(&client_id), peer, reason);
            // The admission counted the session as live when it allowed it.
            closed(admission, &client_id, session_id).await;
            reply.refuse(writer, Refusal::QuotaExceeded, reason).await;
            return None;
        }
    };
    if let Some(old_released) = taken_over {
        // Bounded: a stuck old session cannot hold the new one forever.
        let _ = timeout(Duration::from_secs(2), old_released).await;
    }
    let opened = {
        let (client_id, admission) = (client_id.clone(), Arc::clone(admission));
        // Off the async workers, as every synchronous call of the admission (`closed`).
        tokio::task::spawn_blocking(move || admission.session_opened(&client_id, session_id))
            .await
            .ok()
            .flatten()
    };
    match opened {
        Some(now) => registry::set(&shared_rights, now),
        None => {
            reply
                .refuse(writer, Refusal::NotAuthorized, "not authorized")
                .await;
            shared.registry.unregister(&client_id, session_id);
            closed(admission, &client_id, session_id).await;
            return None;
        }
    }
    Some(OpenSession {
        client_id,
        session_id,
        rights: shared_rights,
        control_rx,
        undelivered,
        released_tx,
        codec: reply.codec,
        limits: reply.limits,
    })
}

/// Runs an open session whose CONNACK was written (`connacked`) until it ends, then fires its
/// will if the end calls for it, releases its link and unregisters it.
async fn run_session(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    session: OpenSession,
    will: Option<Will>,
    connacked: bool,
    keepalive: Duration,
    (mut reader, mut writer, buf): (
        ReadHalf<TlsStream<TcpStream>>,
        WriteHalf<TlsStream<TcpStream>>,
        BytesMut,
    ),
) {
    let OpenSession {
        client_id,
        session_id,
        rights,
        control_rx,
        undelivered,
        released_tx,
        codec,
        limits,
    } = session;
    let mut pump = Pump {
        shared: shared.clone(),
        codec,
        version: codec.0,
        client_id: client_id.clone(),
        session_id,
        rights,
        admission: admission.clone(),
        undelivered,
        inbox_qos2: HashSet::new(),
        router_qos2: HashSet::new(),
        link_tx: None,
        link_rx: None,
        pending_subs: HashMap::new(),
        denied_qos2: HashSet::new(),
        closing: None,
        filters: Vec::new(),
        last_delivered: None,
        mailbox_pkid: MAILBOX_PKIDS_FROM,
        mailbox_unacked: HashSet::new(),
        aliases: frame::TopicAliases::default(),
        limits,
        flight: flight::RouterFlight::default(),
    };
    let end = if connacked {
        // Boxed: rustc lays the pump's future out beside this function's other states instead
        // of over them; boxed, an idle session's task is about 3.5 KiB smaller (12.4 KiB with
        // the pump inline, 4.8 KiB plus the pump's 4.2 KiB boxed).
        Box::pin(pump.run(&mut reader, &mut writer, buf, control_rx, keepalive)).await
    } else {
        End::Unclean
    };
    debug!(client_id = %client_id, ?end, "session ended");
    let _ = timeout(Duration::from_secs(1), writer.shutdown()).await;

    if let (Some(will), true) = (will, end.fires_will()) {
        fire_will(
            shared.clone(),
            admission.clone(),
            &client_id,
            session_id,
            will,
        )
        .await;
    }
    if let Some(mut link_tx) = pump.link_tx.take() {
        if end != End::LinkGone {
            release_link(&mut link_tx).await;
        }
        shared.router_links.fetch_sub(1, Ordering::Relaxed);
    }
    // A session that took this one over may build its link now.
    drop(released_tx);
    shared.registry.unregister(&client_id, session_id);
    closed(&admission, &client_id, session_id).await;
}

/// Tells the admission a session ended, on the blocking pool: its synchronous calls may wait
/// for the controller's lock, which a batch holds across its commit (an fsync), and must not
/// hold an async worker meanwhile.
async fn closed(admission: &Arc<dyn Admission>, client_id: &str, session_id: u64) {
    let (client_id, admission) = (client_id.to_owned(), Arc::clone(admission));
    let _ =
        tokio::task::spawn_blocking(move || admission.session_closed(&client_id, session_id)).await;
}

/// What an MQTT 5 client said in its CONNECT about what it accepts and expects.
#[derive(Debug, Clone, Copy)]
struct ClientLimits {
    /// Maximum Packet Size: no packet larger than this is sent to the client [MQTT-3.1.2-24].
    max_packet_size: Option<usize>,
    /// Session Expiry Interval of the CONNECT (0 when absent).
    session_expiry: u32,
    /// Receive Maximum: QoS 1 and 2 PUBLISHes the client takes unacknowledged at once
    /// [MQTT-3.3.4-9] (65,535 when absent; no limit under 3.1.1).
    receive_maximum: usize,
}

impl ClientLimits {
    fn of(version: MqttVersion, props: Option<&rumqttd::protocol::ConnectProperties>) -> Self {
        match (version, props) {
            (MqttVersion::V5, props) => ClientLimits {
                max_packet_size: props
                    .and_then(|p| p.max_packet_size)
                    .map(|max| usize::try_from(max).unwrap_or(usize::MAX)),
                session_expiry: props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
                // `check_connect` refused a Receive Maximum of 0.
                receive_maximum: usize::from(
                    props
                        .and_then(|p| p.receive_maximum)
                        .unwrap_or(u16::MAX)
                        .max(1),
                ),
            },
            (MqttVersion::V311, _) => ClientLimits {
                max_packet_size: None,
                session_expiry: 0,
                receive_maximum: usize::MAX,
            },
        }
    }
}

/// The CONNACK of an admitted client and the silence after which its session ends.
///
/// Under MQTT 5 it says what the front door offers: topic aliases up to
/// [`frame::TOPIC_ALIAS_MAXIMUM`], packets up to `max_packet_size`, no shared subscriptions, a
/// session that ends with the connection (Session Expiry Interval 0 when the client asked for
/// more: sessions never outlive their connection), and, to a client that asked for no
/// keepalive, the Server Keep Alive the front door enforces instead [MQTT-3.2.2-22].
fn success_connack(
    settings: &SettingsRuntime,
    version: MqttVersion,
    keep_alive: u16,
    limits: &ClientLimits,
) -> (Packet, Duration) {
    let ack = ConnAck {
        session_present: false,
        code: ConnectReturnCode::Success,
    };
    // MQTT: the server may close after one and a half keepalive periods of silence.
    let one_and_a_half = |secs: u16| Duration::from_millis(u64::from(secs) * 1500);
    if version == MqttVersion::V311 {
        let keepalive = match keep_alive {
            0 => settings.idle_timeout,
            k => one_and_a_half(k),
        };
        return (Packet::ConnAck(ack, None), keepalive);
    }
    // A client that asked for no keepalive is told the one that keeps `idle_timeout`.
    let server_keep_alive = (keep_alive == 0).then(|| {
        let secs = settings
            .idle_timeout
            .as_millis()
            .div_ceil(1500)
            .clamp(1, 65_535);
        u16::try_from(secs).unwrap_or(u16::MAX)
    });
    let keepalive = one_and_a_half(server_keep_alive.unwrap_or(keep_alive));
    let props = ConnAckProperties {
        session_expiry_interval: (limits.session_expiry > 0).then_some(0),
        max_packet_size: u32::try_from(settings.max_packet_size).ok(),
        topic_alias_max: Some(frame::TOPIC_ALIAS_MAXIMUM),
        shared_subscription_available: Some(0),
        server_keep_alive,
        ..ConnAckProperties::default()
    };
    (Packet::ConnAck(ack, Some(props)), keepalive)
}

/// Frees the client's session in the router (its will, if any, was handled by the front door).
async fn release_link(link_tx: &mut LinkTx) {
    let disconnect = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    let _ = link_tx.send(Packet::Disconnect(disconnect, None)).await;
}

/// How a CONNECT is answered before its session starts: in the client's protocol version,
/// within the write timeout and the client's Maximum Packet Size.
#[derive(Clone, Copy)]
struct Reply {
    codec: Codec,
    write_timeout: Duration,
    limits: ClientLimits,
}

impl Reply {
    /// Answers with the refusal's CONNACK and closes the connection.
    async fn refuse(
        &self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        refusal: Refusal,
        reason: &str,
    ) {
        let connack = frame::refusal_connack(self.codec.0, refusal, reason);
        self.close_with(writer, connack).await;
    }

    /// Writes a refusing CONNACK and closes.
    async fn close_with(&self, writer: &mut WriteHalf<TlsStream<TcpStream>>, connack: Packet) {
        let _ = self.write(writer, connack).await;
        let _ = writer.shutdown().await;
    }

    /// Writes a packet within the client's Maximum Packet Size ([`write_packet_within`]).
    async fn write(
        &self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        packet: Packet,
    ) -> Result<(), String> {
        write_packet_within(
            writer,
            self.codec,
            packet,
            self.write_timeout,
            self.limits.max_packet_size,
        )
        .await
    }
}

/// Refuses a CONNECT that breaks the standard: CONNACK 0x81 (Malformed Packet) or 0x82
/// (Protocol Error) under MQTT 5, which has them; under 3.1.1 the connection is closed
/// without one ([MQTT-3.1.4-1]). Audited like the front door's other refusals.
async fn refuse_violation(
    shared: &Shared,
    admission: &dyn Admission,
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
    codec: Codec,
    peer: SocketAddr,
    violation: frame::Violation,
) {
    info!(%peer, "refused: {violation}");
    admission.refused("-", peer, &violation.to_string());
    if codec.0 == MqttVersion::V5 {
        let connack = frame::reason_connack(violation.connack_code(), &violation.to_string());
        // The client's Maximum Packet Size is in the CONNECT refused: not to be trusted.
        let _ = write_packet(writer, codec, connack, shared.settings.write_timeout).await;
    }
    let _ = writer.shutdown().await;
}

/// Client ids come from the network: log them escaped and bounded.
fn client_id_for_log(id: &str) -> String {
    id.chars().take(64).flat_map(char::escape_default).collect()
}

/// Fires a session's will: at once, before the session is unregistered (so that a session
/// taking its client id over comes after it), or after its delay.
async fn fire_will(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    client_id: &str,
    session_id: u64,
    will: Will,
) {
    if will.delay.is_zero() {
        return publish_will(&shared, &*admission, client_id, session_id, will).await;
    }
    let client_id = client_id.to_owned();
    tokio::spawn(async move {
        tokio::time::sleep(will.delay).await;
        // A client that came back within the delay cancels its will (MQTT 5).
        if !crate::admission::SessionControl::is_connected(&*shared.registry, &client_id) {
            publish_will(&shared, &*admission, &client_id, session_id, will).await;
        }
    });
}

/// Publishes a will: to the admission if its topic is one of the session's inbox topics (as
/// the session's own PUBLISHes to it would be), else through the wills' link into the router
/// (the session's own link, if it had one, is gone or going).
async fn publish_will(
    shared: &Shared,
    admission: &dyn Admission,
    client_id: &str,
    session_id: u64,
    will: Will,
) {
    if will.inbox {
        let topic = String::from_utf8_lossy(&will.topic).into_owned();
        let payload = will.payload.to_vec();
        admission
            .message(client_id, session_id, topic, payload)
            .await;
        return;
    }
    let packet = Packet::Publish(
        Publish::new(will.topic, will.payload, will.retain),
        will.properties,
    );
    let mut link = shared.will_link.lock().unwrap_or_else(|e| e.into_inner());
    // `send` completes without waiting (it pushes to the router's channel).
    let _ = poll_once(link.send(packet));
}

/// Polls a future that is known to complete without suspending (rumqttd's `LinkTx::send` pushes
/// to a channel synchronously inside an `async fn`).
pub(crate) fn poll_once<F: std::future::Future>(fut: F) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client sent DISCONNECT: no will.
    Clean,
    /// MQTT 5 DISCONNECT 0x04: disconnect with will.
    CleanWithWill,
    /// Network error, timeout, protocol error.
    Unclean,
    /// The controller revoked the session.
    Cut,
    /// A new connection took over the client id: its will would race the new session's state.
    TakenOver,
    /// The router dropped the link.
    LinkGone,
    Shutdown,
}

impl End {
    fn fires_will(self) -> bool {
        matches!(
            self,
            End::CleanWithWill | End::Unclean | End::Cut | End::LinkGone | End::Shutdown
        )
    }
}

struct Pump {
    shared: Arc<Shared>,
    codec: Codec,
    version: MqttVersion,
    client_id: String,
    session_id: u64,
    rights: SharedRights,
    /// Takes the session's inbox messages ([`Rights::inbox`]).
    admission: Arc<dyn Admission>,
    /// Messages queued to this session by the registry and not taken yet.
    undelivered: registry::Undelivered,
    /// QoS 2 inbox messages already handed over: their PUBREL is answered here.
    inbox_qos2: HashSet<u16>,
    /// QoS 2 PUBLISHes forwarded to the router and not released yet: their PUBREL goes to the
    /// router, which drops a client for a PUBREL it does not know.
    router_qos2: HashSet<u16>,
    /// The session's link into the router, built on its first need ([`Pump::router_link`]):
    /// a device that only speaks to the controller never gets one.
    link_tx: Option<LinkTx>,
    /// The link's receiving side, polled by [`Pump::run`] while there is a link.
    link_rx: Option<LinkRx>,
    /// SUBSCRIBEs forwarded in part: per packet id, the codes of the denied filters by position
    /// (`None`: to be filled from the router's SUBACK).
    pending_subs: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 publishes refused under 3.1.1 (acknowledged, not forwarded): their PUBREL is
    /// answered here.
    denied_qos2: HashSet<u16>,
    /// Set by a cut: close after a message on this topic was written, or at the deadline.
    closing: Option<(Instant, Option<String>)>,
    /// Every filter granted to this session with its QoS: mailbox deliveries
    /// ([`crate::mailbox`]) go to it when one of them matches.
    filters: Vec<(String, u8)>,
    /// Next packet id for a QoS 1 mailbox message. They come from 0x8000–0xFFFF; rumqttd's
    /// router numbers its own deliveries 1–100, so a PUBACK says whose message it acknowledges.
    mailbox_pkid: u16,
    /// Packet ids of mailbox messages not acknowledged yet; their PUBACKs stay here.
    mailbox_unacked: HashSet<u16>,
    /// Topic of the last mailbox delivery handled: a cut waiting for it needs not wait.
    last_delivered: Option<String>,
    /// The client's topic aliases (MQTT 5).
    aliases: frame::TopicAliases,
    /// What the client's CONNECT said it accepts.
    limits: ClientLimits,
    /// The router's QoS 1 and 2 messages in flight to the client: with `mailbox_unacked`, what
    /// the client's Receive Maximum counts.
    flight: flight::RouterFlight,
}

enum Step {
    Continue,
    End(End),
}

impl Pump {
    /// How this session's packets are written: its codec, the write timeout and the client's
    /// Maximum Packet Size.
    fn reply(&self) -> Reply {
        Reply {
            codec: self.codec,
            write_timeout: self.shared.settings.write_timeout,
            limits: self.limits,
        }
    }

    async fn run(
        &mut self,
        reader: &mut ReadHalf<TlsStream<TcpStream>>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        mut buf: BytesMut,
        mut control: mpsc::UnboundedReceiver<Control>,
        keepalive: Duration,
    ) -> End {
        let mut shutdown = self.shared.shutdown.clone();
        let mut idle_deadline = Instant::now() + keepalive;
        // Frames that arrived together with the CONNECT.
        if let Step::End(end) = self.drain_frames(&mut buf, writer).await {
            return end;
        }
        loop {
            fit_read_buffer(&mut buf);
            let closing_at = self.closing.as_ref().map(|(at, _)| *at);
            tokio::select! {
                read = reader.read_buf(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => return End::Unclean,
                        Ok(_) => {}
                    }
                    idle_deadline = Instant::now() + keepalive;
                    if let Step::End(end) = self.drain_frames(&mut buf, writer).await {
                        return end;
                    }
                }
                next = from_router(&mut self.link_rx) => {
                    let notification = match next {
                        Ok(Some(n)) => n,
                        Ok(None) => continue,
                        Err(_) => return End::LinkGone,
                    };
                    if let Step::End(end) = self.outgoing(notification, writer).await {
                        return end;
                    }
                }
                c = control.recv() => {
                    match c {
                        Some(Control::TakenOver) => {
                            self.disconnect(writer, DisconnectReasonCode::SessionTakenOver, "session taken over").await;
                            return End::TakenOver;
                        }
                        Some(Control::Cut { last_topic: None }) | None => {
                            return self.cut_now(writer).await;
                        }
                        Some(Control::Cut { last_topic: Some(topic) }) => {
                            // The final message came through the mailbox, just before the cut:
                            // it is written already.
                            if self.last_delivered.take().as_deref() == Some(topic.as_str()) {
                                return self.cut_now(writer).await;
                            }
                            self.closing = Some((Instant::now() + self.shared.settings.cut_grace, Some(topic)));
                        }
                        Some(Control::Deliver { topic, payload }) => {
                            self.undelivered.taken(payload.len());
                            if let Step::End(end) = self.deliver(writer, topic, payload).await {
                                return end;
                            }
                        }
                        Some(Control::Overflow) => {
                            debug!(client_id = %self.client_id, "too many undelivered messages");
                            self.disconnect(writer, DisconnectReasonCode::QuotaExceeded, "too many undelivered messages: the client is not reading").await;
                            return End::Cut;
                        }
                    }
                }
                _ = sleep_until(idle_deadline) => {
                    debug!(client_id = %self.client_id, "keepalive expired");
                    return End::Unclean;
                }
                _ = sleep_until(closing_at.unwrap_or(idle_deadline)), if closing_at.is_some() => {
                    return self.cut_now(writer).await;
                }
                _ = shutdown.changed() => {
                    self.disconnect(writer, DisconnectReasonCode::ServerShuttingDown, "server shutting down").await;
                    return End::Shutdown;
                }
            }
        }
    }

    async fn disconnect(
        &self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        reason: DisconnectReasonCode,
        text: &str,
    ) {
        if let Some(packet) = frame::server_disconnect(self.version, reason, text) {
            let _ = self.reply().write(writer, packet).await;
        }
    }

    /// A mailbox message from the controller: written if a granted filter matches (at QoS 1,
    /// or the subscription's lower QoS), and, once the session is cut, only if it is the
    /// message the cut waits for.
    async fn deliver(
        &mut self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        topic: String,
        payload: Vec<u8>,
    ) -> Step {
        let last = self.is_final(topic.as_bytes());
        let qos = crate::mailbox::delivery_qos(&topic, self.filters.iter());
        // A cut session gets nothing more but the message its cut waits for.
        let Some(qos) = qos.filter(|_| self.closing.is_none() || last) else {
            self.last_delivered = Some(topic);
            return Step::Continue;
        };
        // The controller speaks at QoS 1 (PROTOCOL §3); a QoS 0 subscription gets QoS 0. A
        // client that leaves too many unacknowledged (64, or its Receive Maximum with what the
        // router has in flight to it) gets the rest at QoS 0.
        let step = if qos >= 1
            && self.mailbox_unacked.len() < MAX_MAILBOX_UNACKED
            && self.flight.in_flight() + self.mailbox_unacked.len() < self.limits.receive_maximum
        {
            let pkid = unused_mailbox_pkid(self.mailbox_pkid, &self.mailbox_unacked);
            let bytes = frame::publish_qos1(self.version, &topic, &payload, pkid);
            if self
                .limits
                .max_packet_size
                .is_some_and(|max| bytes.len() > max)
            {
                // Too large for the client: not sent, and taken as delivered [MQTT-3.1.2-25]
                // (its packet id was never used).
                debug!(client_id = %self.client_id, "a mailbox message exceeds the client's maximum packet size");
                Step::Continue
            } else {
                self.mailbox_pkid = next_mailbox_pkid(pkid);
                self.mailbox_unacked.insert(pkid);
                self.write_bytes(writer, &bytes).await
            }
        } else {
            let publish = Publish::new(topic.clone().into_bytes(), payload, false);
            self.write(writer, Packet::Publish(publish, None)).await
        };
        if last {
            return Step::End(self.cut_now(writer).await);
        }
        self.last_delivered = Some(topic);
        step
    }

    /// Whether a message on `topic` is the one a pending cut waits for.
    fn is_final(&self, topic: &[u8]) -> bool {
        self.closing
            .as_ref()
            .and_then(|(_, t)| t.as_deref())
            .is_some_and(|t| t.as_bytes() == topic)
    }

    /// Ends a cut session: DISCONNECT "not authorized" (under 5), then close.
    async fn cut_now(&self, writer: &mut WriteHalf<TlsStream<TcpStream>>) -> End {
        self.disconnect(
            writer,
            DisconnectReasonCode::NotAuthorized,
            "not authorized",
        )
        .await;
        End::Cut
    }

    /// Writes an encoded packet, within the write timeout.
    async fn write_bytes(
        &self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        bytes: &[u8],
    ) -> Step {
        let written = write_raw(writer, bytes, self.shared.settings.write_timeout).await;
        self.step_after_write(written)
    }

    /// Writes a packet within the client's Maximum Packet Size ([`write_packet_within`]).
    async fn write(&self, writer: &mut WriteHalf<TlsStream<TcpStream>>, packet: Packet) -> Step {
        let written = self.reply().write(writer, packet).await;
        self.step_after_write(written)
    }

    /// Writes a PUBLISH from the router (`last`: the one a pending cut waits for).
    ///
    /// One larger than the client's Maximum Packet Size is not sent, and the router is told it
    /// was delivered, as the standard has it: "Where a Packet is too large to send, the Server
    /// MUST discard it without sending it and then behave as if it had completed sending that
    /// Application Message" [MQTT-3.1.2-25]. One at QoS 1 or 2 waits while the client has as
    /// many unacknowledged as its Receive Maximum allows [MQTT-3.3.4-9]; nothing else waits for
    /// it [MQTT-3.3.4-10]. [`flight::RouterFlight`] keeps the order the router needs.
    async fn write_forward(
        &mut self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        publish: Publish,
        properties: Option<PublishProperties>,
        last: bool,
    ) -> Step {
        let mut bytes = match encode(self.codec, Packet::Publish(publish, properties)) {
            Ok(bytes) => bytes,
            Err(e) => return self.step_after_write(Err(e)),
        };
        // The front door never sends a PUBLISH twice: DUP is 0 whatever the publisher's was
        // [MQTT-3.3.1-3] (rumqttd's router keeps it).
        if let Some(first) = bytes.first_mut() {
            *first &= !0x08;
        }
        let within = self
            .limits
            .max_packet_size
            .is_none_or(|max| bytes.len() <= max);
        if !within {
            debug!(client_id = %self.client_id, size = bytes.len(), "a PUBLISH exceeds the client's maximum packet size: discarded");
        }
        // A cut session gets nothing more but the message its cut waits for: the others are
        // discarded as if sent.
        let fits = within && (self.closing.is_none() || last);
        let step = match frame::publish_qos_pkid(&bytes) {
            Some((qos @ 1..=2, pkid)) => {
                let room = self.router_room();
                let effects = self.flight.forwarded(pkid, qos, bytes, fits, last, room);
                self.carry_out(effects, writer).await
            }
            _ if fits => {
                return match self.write_bytes(writer, &bytes).await {
                    Step::Continue if last => Step::End(self.cut_now(writer).await),
                    step => step,
                };
            }
            _ => Step::Continue,
        };
        match step {
            // A discarded message counts as delivered: a cut waiting for it need not wait.
            Step::Continue if last && !fits => Step::End(self.cut_now(writer).await),
            step => step,
        }
    }

    /// What the client's Receive Maximum leaves to the router's messages.
    fn router_room(&self) -> usize {
        self.limits
            .receive_maximum
            .saturating_sub(self.mailbox_unacked.len())
    }

    /// Carries out what [`flight::RouterFlight`] asks: acknowledgements to the router, and
    /// writes to the client.
    async fn carry_out(
        &mut self,
        effects: Vec<flight::Effect>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        for effect in effects {
            let step = match effect {
                flight::Effect::Router(ack) => {
                    let packet = match ack {
                        flight::ToRouter::Acked(pkid) => Packet::PubAck(
                            PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            },
                            None,
                        ),
                        flight::ToRouter::Received(pkid) => Packet::PubRec(
                            PubRec {
                                pkid,
                                reason: PubRecReason::Success,
                            },
                            None,
                        ),
                        flight::ToRouter::Completed(pkid) => Packet::PubComp(
                            PubComp {
                                pkid,
                                reason: PubCompReason::Success,
                            },
                            None,
                        ),
                    };
                    self.forward(packet).await
                }
                flight::Effect::Write { bytes, last } => {
                    match self.write_bytes(writer, &bytes).await {
                        Step::Continue if last => Step::End(self.cut_now(writer).await),
                        step => step,
                    }
                }
            };
            if let Step::End(end) = step {
                return Step::End(end);
            }
        }
        Step::Continue
    }

    /// A client's PUBACK, PUBREC or PUBCOMP of a message from the router: it goes to the
    /// router, then what it frees (the turn of a discarded message, room in the Receive
    /// Maximum) is used.
    async fn acknowledged(
        &mut self,
        packet: Packet,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        let ack = match &packet {
            Packet::PubAck(ack, _) => Some(flight::ClientAck::Acked(ack.pkid)),
            Packet::PubComp(comp, _) => Some(flight::ClientAck::Completed(comp.pkid)),
            Packet::PubRec(rec, _) => Some(flight::ClientAck::Received {
                pkid: rec.pkid,
                // MQTT 5 §4.9: a PUBREC of 0x80 or more ends the message's flight.
                failed: !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ),
            }),
            _ => None,
        };
        if let Step::End(end) = self.forward(packet).await {
            return Step::End(end);
        }
        match ack {
            Some(ack) => {
                let room = self.router_room();
                let effects = self.flight.acknowledged(ack, room);
                self.carry_out(effects, writer).await
            }
            None => Step::Continue,
        }
    }

    /// A failed or timed-out write ends the session.
    fn step_after_write(&self, written: Result<(), String>) -> Step {
        match written {
            Ok(()) => Step::Continue,
            Err(e) => {
                debug!(client_id = %self.client_id, "{e}");
                Step::End(End::Unclean)
            }
        }
    }

    /// Decodes and handles every complete frame in `buf`.
    async fn drain_frames(
        &mut self,
        buf: &mut BytesMut,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        loop {
            if buf.first().is_some_and(|b| frame::server_only(*b)) {
                debug!(client_id = %self.client_id, "a packet only a server sends");
                self.disconnect(
                    writer,
                    DisconnectReasonCode::ProtocolError,
                    "protocol error",
                )
                .await;
                return Step::End(End::Unclean);
            }
            // What rumqttd's decoder does not look at, on the raw frame once all of it is here.
            if let Some(frame) = frame::complete_frame_len(buf).and_then(|len| buf.get(..len)) {
                if let Err(violation) = frame::check_frame(frame, self.version) {
                    debug!(client_id = %self.client_id, "{violation}");
                    self.disconnect(writer, violation.disconnect_code(), &violation.to_string())
                        .await;
                    return Step::End(End::Unclean);
                }
            }
            let peeked = frame::publish_qos_pkid(buf);
            let packet = match self.codec.read(buf, self.shared.settings.max_packet_size) {
                Ok(p) => p,
                Err(CodecError::InsufficientBytes(_)) => return Step::Continue,
                Err(CodecError::PayloadSizeLimitExceeded(_)) => {
                    self.disconnect(
                        writer,
                        DisconnectReasonCode::PacketTooLarge,
                        "packet too large",
                    )
                    .await;
                    return Step::End(End::Unclean);
                }
                Err(e) => {
                    debug!(client_id = %self.client_id, "malformed packet: {e}");
                    self.disconnect(
                        writer,
                        DisconnectReasonCode::MalformedPacket,
                        "malformed packet",
                    )
                    .await;
                    return Step::End(End::Unclean);
                }
            };
            if let Step::End(end) = self.incoming(packet, peeked, writer).await {
                return Step::End(end);
            }
        }
    }

    /// Hands an inbox PUBLISH to the admission, then acknowledges it: at QoS 1 the PUBACK
    /// means the controller has it.
    async fn hand_to_inbox(
        &mut self,
        publish: Publish,
        peeked: Option<(u8, u16)>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        let (qos, pkid) = peeked.unwrap_or((0, 0));
        // A QoS 2 message is handed over once (MQTT 4.3.3): a resent one before its PUBREL is
        // only acknowledged again.
        let duplicate = qos == 2 && self.inbox_qos2.contains(&pkid);
        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
        if !duplicate {
            let handled = self
                .admission
                .message(
                    &self.client_id,
                    self.session_id,
                    topic,
                    publish.payload.to_vec(),
                )
                .await;
            if !handled {
                // Not acknowledged: the client sends it again on its next connection.
                self.disconnect(
                    writer,
                    DisconnectReasonCode::UnspecifiedError,
                    "the message could not be stored; send it again",
                )
                .await;
                return Step::End(End::Unclean);
            }
        }
        match qos {
            1 => {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                self.write(writer, Packet::PubAck(ack, None)).await
            }
            2 => {
                self.inbox_qos2.insert(pkid);
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                self.write(writer, Packet::PubRec(rec, None)).await
            }
            _ => Step::Continue,
        }
    }

    /// Sends a packet into the router (acknowledgements of the router's messages, and what
    /// [`Pump::router_link`] made a link for).
    async fn forward(&mut self, packet: Packet) -> Step {
        let Some(link_tx) = self.link_tx.as_mut() else {
            // Nothing the router sent can be acknowledged without a link.
            return Step::Continue;
        };
        match link_tx.send(packet).await {
            Ok(_) => Step::Continue,
            Err(_) => Step::End(End::LinkGone),
        }
    }

    /// Builds the session's router link if it has none: before its first PUBLISH or SUBSCRIBE
    /// that the router must see (one to its inbox or mailboxes never needs it). A router that
    /// cannot take it ends the session with DISCONNECT 0x89 (Server busy).
    async fn router_link(&mut self, writer: &mut WriteHalf<TlsStream<TcpStream>>) -> Step {
        if self.link_tx.is_some() {
            return Step::Continue;
        }
        match build_link(&self.shared.links, self.client_id.clone()).await {
            Ok((link_tx, link_rx, notification)) => {
                // The router's CONNACK is a success; what it says of the session (topic
                // aliases) is not what the front door offers.
                drop(notification);
                self.link_tx = Some(link_tx);
                self.link_rx = Some(link_rx);
                self.shared.router_links.fetch_add(1, Ordering::Relaxed);
                Step::Continue
            }
            Err(e) => {
                warn!(client_id = %client_id_for_log(&self.client_id), "router refused the link: {e}");
                self.disconnect(
                    writer,
                    DisconnectReasonCode::ServerBusy,
                    "router unavailable",
                )
                .await;
                Step::End(End::Unclean)
            }
        }
    }

    async fn incoming(
        &mut self,
        packet: Packet,
        peeked: Option<(u8, u16)>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        match packet {
            Packet::Publish(_, Some(props)) if !props.subscription_identifiers.is_empty() => {
                // MQTT 5 §3.3.4: a client must not send subscription identifiers (and rumqttd's
                // encoder garbles a PUBLISH that carries them).
                self.protocol_error(writer, "protocol error").await
            }
            Packet::Publish(publish, props) => {
                self.on_publish(publish, props, peeked, writer).await
            }
            Packet::PubRel(pubrel, props) => self.on_pubrel(pubrel, props, writer).await,
            Packet::Subscribe(ref subscribe, _)
                if self.version == MqttVersion::V5
                    && subscribe
                        .filters
                        .iter()
                        .any(|f| f.path.starts_with("$share/")) =>
            {
                // The CONNACK said Shared Subscription Available 0 (MQTT 5 §3.2.2.3.13).
                self.disconnect(
                    writer,
                    DisconnectReasonCode::SharedSubscriptionNotSupported,
                    "shared subscriptions are not supported",
                )
                .await;
                Step::End(End::Unclean)
            }
            Packet::Subscribe(subscribe, props) => {
                self.on_subscribe(subscribe, props, writer).await
            }
            Packet::Unsubscribe(unsubscribe, props) => {
                self.on_unsubscribe(unsubscribe, props, writer).await
            }
            // The acknowledgement of a mailbox message is the front door's own.
            Packet::PubAck(ref ack, _) if self.mailbox_unacked.remove(&ack.pkid) => {
                let room = self.router_room();
                let effects = self.flight.room_freed(room);
                self.carry_out(effects, writer).await
            }
            Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => {
                self.acknowledged(packet, writer).await
            }
            Packet::PingReq(_) => self.write(writer, Packet::PingResp(PingResp)).await,
            Packet::Disconnect(disconnect, props) => {
                self.on_disconnect(disconnect, props, writer).await
            }
            // A second CONNECT, or a packet only a server sends: protocol error.
            _ => self.protocol_error(writer, "protocol error").await,
        }
    }

    /// Ends the session with DISCONNECT 0x82 (MQTT 5) saying `reason`.
    async fn protocol_error(
        &mut self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        reason: &str,
    ) -> Step {
        self.disconnect(writer, DisconnectReasonCode::ProtocolError, reason)
            .await;
        Step::End(End::Unclean)
    }

    /// A client's PUBLISH: to the controller's inbox, to the router, or refused.
    async fn on_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        peeked: Option<(u8, u16)>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        if self.version == MqttVersion::V5 {
            // The topic an alias stands for is the one rights are checked against and
            // the router sees; the router gets no alias.
            let alias = props.as_mut().and_then(|p| p.topic_alias.take());
            match self.aliases.resolve(&publish.topic, alias) {
                Ok(topic) => publish.topic = topic,
                Err(e) => {
                    debug!(client_id = %self.client_id, "{e}");
                    self.disconnect(writer, e.disconnect_code(), &e.to_string())
                        .await;
                    return Step::End(End::Unclean);
                }
            }
        }
        let (allowed, inbox, retain) = match std::str::from_utf8(&publish.topic) {
            Ok(topic) => {
                let rights = registry::read(&self.rights);
                (
                    rights.may_publish(topic),
                    rights.is_inbox(topic),
                    rights.retain,
                )
            }
            Err(_) => (false, false, false),
        };
        if allowed && inbox {
            return self.hand_to_inbox(publish, peeked, writer).await;
        }
        if allowed {
            // Without the right to retain, the message reaches today's subscribers
            // only: nothing planted now reaches whoever subscribes later.
            publish.retain &= retain;
            if let Some((2, pkid)) = peeked {
                // Handed to the router once [MQTT-4.3.3-10]: a QoS 2 message resent
                // before its PUBREL is only acknowledged again.
                if !self.router_qos2.insert(pkid) {
                    let rec = PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    };
                    return self.write(writer, Packet::PubRec(rec, None)).await;
                }
            }
            if let Step::End(end) = self.router_link(writer).await {
                return Step::End(end);
            }
            return self.forward(Packet::Publish(publish, props)).await;
        }
        self.deny_publish(&publish.topic, peeked, writer).await
    }

    /// Answers a PUBLISH outside the client's rights (PROTOCOL §4): dropped, acknowledged as
    /// 3.1.1 allows or refused with 0x87 under MQTT 5.
    async fn deny_publish(
        &mut self,
        topic: &[u8],
        peeked: Option<(u8, u16)>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        debug!(client_id = %self.client_id, topic = %String::from_utf8_lossy(topic).escape_default(), "publish denied");
        let (qos, pkid) = peeked.unwrap_or((0, 0));
        let v5 = self.version == MqttVersion::V5;
        match qos {
            1 => {
                // 3.1.1 has no refusal: acknowledge and drop. MQTT 5: 0x87.
                let reason = if v5 {
                    PubAckReason::NotAuthorized
                } else {
                    PubAckReason::Success
                };
                self.write(writer, Packet::PubAck(PubAck { pkid, reason }, None))
                    .await
            }
            2 => {
                let reason = if v5 {
                    PubRecReason::NotAuthorized
                } else {
                    self.denied_qos2.insert(pkid);
                    PubRecReason::Success
                };
                self.write(writer, Packet::PubRec(PubRec { pkid, reason }, None))
                    .await
            }
            _ => Step::Continue,
        }
    }

    /// A client's PUBREL: to the router if the router holds the message, else answered here.
    async fn on_pubrel(
        &mut self,
        pubrel: PubRel,
        props: Option<PubRelProperties>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        let pkid = pubrel.pkid;
        if self.router_qos2.remove(&pkid) {
            return self.forward(Packet::PubRel(pubrel, props)).await;
        }
        let denied = self.denied_qos2.remove(&pkid);
        let inbox = self.inbox_qos2.remove(&pkid);
        // [MQTT-4.3.3-11]: every PUBREL is answered with a PUBCOMP; one for a packet id
        // nobody knows says so under MQTT 5 (0x92), instead of reaching the router,
        // which would drop the client.
        let reason = if denied || inbox || self.version == MqttVersion::V311 {
            PubCompReason::Success
        } else {
            PubCompReason::PacketIdentifierNotFound
        };
        self.write(writer, Packet::PubComp(PubComp { pkid, reason }, None))
            .await
    }

    /// A client's SUBSCRIBE: each filter denied, answered here (mailboxes) or sent on to the
    /// router; one SUBACK with the codes in the filters' order either way.
    async fn on_subscribe(
        &mut self,
        mut subscribe: Subscribe,
        props: Option<SubscribeProperties>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        let denied_code = match self.version {
            MqttVersion::V311 => SubscribeReasonCode::Failure,
            MqttVersion::V5 => SubscribeReasonCode::NotAuthorized,
        };
        // Per filter: `Some(code)` is answered here (denied, or the client's own
        // mailbox, which the router never sees); `None` goes to the router.
        let slots: Vec<Option<SubscribeReasonCode>> = {
            let rights = registry::read(&self.rights);
            subscribe
                .filters
                .iter()
                .map(|f| {
                    if !rights.may_subscribe(&f.path) {
                        Some(denied_code)
                    } else if rights.is_mailbox(&f.path) {
                        Some(match f.qos {
                            QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                            QoS::AtLeastOnce => SubscribeReasonCode::QoS1,
                            QoS::ExactlyOnce => SubscribeReasonCode::QoS2,
                        })
                    } else {
                        None
                    }
                })
                .collect()
        };
        for (filter, slot) in subscribe.filters.iter().zip(&slots) {
            if *slot != Some(denied_code) {
                let qos = match filter.qos {
                    QoS::AtMostOnce => 0,
                    QoS::AtLeastOnce => 1,
                    QoS::ExactlyOnce => 2,
                };
                // A new SUBSCRIBE of a filter replaces the old one (MQTT 3.8.4).
                self.filters.retain(|(f, _)| *f != filter.path);
                self.filters.push((filter.path.clone(), qos));
            }
        }
        if slots.iter().all(Option::is_none) {
            if let Step::End(end) = self.router_link(writer).await {
                return Step::End(end);
            }
            return self.forward(Packet::Subscribe(subscribe, props)).await;
        }
        if slots.contains(&Some(denied_code)) {
            debug!(client_id = %self.client_id, "subscription denied");
        }
        if slots.iter().all(Option::is_some) {
            let ack = SubAck {
                pkid: subscribe.pkid,
                return_codes: slots.into_iter().flatten().collect(),
            };
            return self.write(writer, Packet::SubAck(ack, None)).await;
        }
        let mut it = slots.iter();
        subscribe
            .filters
            .retain(|_| it.next().is_some_and(Option::is_none));
        if let Step::End(end) = self.router_link(writer).await {
            return Step::End(end);
        }
        self.pending_subs.insert(subscribe.pkid, slots);
        self.forward(Packet::Subscribe(subscribe, props)).await
    }

    /// A client's UNSUBSCRIBE, always answered by the front door.
    async fn on_unsubscribe(
        &mut self,
        mut unsubscribe: Unsubscribe,
        props: Option<UnsubscribeProperties>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        // The front door answers every UNSUBSCRIBE itself, with one reason per filter
        // in their order [MQTT-3.10.4-4] to [MQTT-3.10.4-6], [MQTT-3.11.3-1]: the router
        // answers nothing for a filter it does not know, one UNSUBACK per filter it
        // removed, and never saw the mailbox filters.
        let asked = std::mem::take(&mut unsubscribe.filters);
        let granted = |f: &String| self.filters.iter().any(|(g, _)| g == f);
        let reasons = asked
            .iter()
            .map(|f| {
                if granted(f) {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }
            })
            .collect();
        // The router holds the granted filters that are not mailboxes.
        unsubscribe.filters = {
            let rights = registry::read(&self.rights);
            asked
                .iter()
                .filter(|f| granted(f) && !rights.is_mailbox(f))
                .cloned()
                .collect()
        };
        self.filters.retain(|(f, _)| !asked.contains(f));
        let ack = UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        };
        if !unsubscribe.filters.is_empty() {
            if let Step::End(end) = self.forward(Packet::Unsubscribe(unsubscribe, props)).await {
                return Step::End(end);
            }
        }
        self.write(writer, Packet::UnsubAck(ack, None)).await
    }

    /// A client's DISCONNECT: whether its will fires.
    async fn on_disconnect(
        &mut self,
        disconnect: Disconnect,
        props: Option<DisconnectProperties>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        let expiry = props.and_then(|p| p.session_expiry_interval).unwrap_or(0);
        if self.limits.session_expiry == 0 && expiry != 0 {
            // MQTT 5 §3.14.2.2.2: after none in CONNECT, a Session Expiry Interval in
            // DISCONNECT is a Protocol Error and not a valid DISCONNECT (the will fires).
            self.disconnect(
                writer,
                DisconnectReasonCode::ProtocolError,
                "session expiry interval in DISCONNECT after none in CONNECT",
            )
            .await;
            return Step::End(End::Unclean);
        }
        if disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
            Step::End(End::CleanWithWill)
        } else {
            Step::End(End::Clean)
        }
    }

    async fn outgoing(
        &mut self,
        notification: Notification,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        match notification {
            Notification::Unschedule => {
                let woken = match &self.link_rx {
                    Some(link_rx) => link_rx.wake().await.is_ok(),
                    None => false,
                };
                if !woken {
                    return Step::End(End::LinkGone);
                }
                Step::Continue
            }
            Notification::Disconnect(d, _) => {
                self.disconnect(writer, d.reason_code, "disconnected by the server")
                    .await;
                Step::End(End::LinkGone)
            }
            Notification::Forward(forward) => {
                let last = self.is_final(&forward.publish.topic);
                self.write_forward(writer, forward.publish, forward.properties, last)
                    .await
            }
            other => {
                let packet: Option<Packet> = other.into();
                match packet {
                    Some(Packet::SubAck(mut ack, props)) => {
                        if let Some(slots) = self.pending_subs.remove(&ack.pkid) {
                            let mut granted = ack.return_codes.into_iter();
                            ack.return_codes = slots
                                .into_iter()
                                .map(|slot| {
                                    slot.or_else(|| granted.next())
                                        .unwrap_or(SubscribeReasonCode::Failure)
                                })
                                .collect();
                        }
                        self.write(writer, Packet::SubAck(ack, props)).await
                    }
                    // The release of a message the client never got (too large for it): the
                    // front door completed it already.
                    Some(Packet::PubRel(rel, _)) if self.flight.swallows(rel.pkid) => {
                        Step::Continue
                    }
                    // The front door answers PINGREQ and UNSUBSCRIBE itself.
                    Some(Packet::PingResp(_) | Packet::UnsubAck(..)) | None => Step::Continue,
                    Some(packet) => self.write(writer, packet).await,
                }
            }
        }
    }
}

/// The next notification of the session's router link; pending forever while it has none.
async fn from_router(link_rx: &mut Option<LinkRx>) -> Result<Option<Notification>, LinkError> {
    match link_rx {
        Some(link_rx) => link_rx.next().await,
        None => std::future::pending().await,
    }
}

fn next_mailbox_pkid(pkid: u16) -> u16 {
    if pkid == u16::MAX {
        MAILBOX_PKIDS_FROM
    } else {
        pkid + 1
    }
}

/// The first packet id from `from` on (0x8000 to 0xFFFF, then round again) that no
/// unacknowledged mailbox message has [MQTT-2.2.1-4]. At most [`MAX_MAILBOX_UNACKED`] are in use,
/// so one is found within that many steps.
fn unused_mailbox_pkid(from: u16, in_use: &HashSet<u16>) -> u16 {
    let mut pkid = from.max(MAILBOX_PKIDS_FROM);
    for _ in 0..=MAX_MAILBOX_UNACKED {
        if !in_use.contains(&pkid) {
            break;
        }
        pkid = next_mailbox_pkid(pkid);
    }
    pkid
}

/// What rumqttd's router has in flight to one client, and what the front door does about it.
/// Pure: the pump hands it events and carries out the effects it returns.
///
/// Two rules meet here. The router takes acknowledgements only in the order it sent the
/// messages ("We don't support out of order acks", rumqttd iobufs.rs: PUBACKs and PUBRECs in
/// the order of the PUBLISHes, PUBCOMPs in the order of the PUBRECs) and drops the client
/// otherwise. And the front door answers some messages for the client: one too large for the
/// client's Maximum Packet Size is discarded and completed as if sent [MQTT-3.1.2-25]; one that
/// finds no room in the client's Receive Maximum waits [MQTT-3.3.4-9]. So a discarded message's
/// acknowledgement goes to the router only when every message before it is acknowledged, and a
/// waiting message keeps its place.
mod flight {
    use std::collections::{HashSet, VecDeque};

    use bytes::BytesMut;

    /// An acknowledgement the front door sends to the router for the client.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum ToRouter {
        /// PUBACK.
        Acked(u16),
        /// PUBREC.
        Received(u16),
        /// PUBCOMP.
        Completed(u16),
    }

    #[derive(Debug, PartialEq, Eq)]
    pub(super) enum Effect {
        Router(ToRouter),
        /// Write this PUBLISH to the client (`last`: the one a pending cut waits for).
        Write {
            bytes: BytesMut,
            last: bool,
        },
    }

    /// A client's acknowledgement of a message from the router.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum ClientAck {
        /// PUBACK.
        Acked(u16),
        /// PUBREC; `failed`: a reason code of 0x80 or more, which ends the message's flight.
        Received { pkid: u16, failed: bool },
        /// PUBCOMP.
        Completed(u16),
    }

    #[derive(Debug)]
    enum Fate {
        /// Written to the client; its acknowledgement is the client's.
        Written,
        /// Too large for the client: never written, acknowledged here in its turn.
        Discarded,
        /// Waiting for room in the client's Receive Maximum.
        Waiting { bytes: BytesMut, last: bool },
    }

    #[derive(Debug)]
    struct Unacked {
        pkid: u16,
        qos: u8,
        fate: Fate,
    }

    #[derive(Debug, Default)]
    pub(super) struct RouterFlight {
        /// QoS 1 and 2 messages not acknowledged (PUBACK, PUBREC) yet, in the router's order.
        unacked: VecDeque<Unacked>,
        /// QoS 2 messages received (PUBREC) and not completed (PUBCOMP) yet, in PUBREC order;
        /// `true`: discarded, completed here.
        unreleased: VecDeque<(u16, bool)>,
        /// Discarded QoS 2 messages whose PUBREL from the router the client must not see.
        swallow: HashSet<u16>,
    }

    impl RouterFlight {
        /// Messages written to the client and not acknowledged yet (what its Receive Maximum
        /// counts: MQTT 5 §4.9).
        pub(super) fn in_flight(&self) -> usize {
            let unacked = self
                .unacked
                .iter()
                .filter(|m| matches!(m.fate, Fate::Written))
                .count();
            let unreleased = self.unreleased.iter().filter(|(_, d)| !d).count();
            unacked + unreleased
        }

        /// A QoS 1 or 2 PUBLISH from the router, encoded in `bytes`. `fits`: within the
        /// client's Maximum Packet Size; `room`: how many messages the client's Receive Maximum
        /// leaves to the router (besides the front door's own).
        pub(super) fn forwarded(
            &mut self,
            pkid: u16,
            qos: u8,
            bytes: BytesMut,
            fits: bool,
            last: bool,
            room: usize,
        ) -> Vec<Effect> {
            let fate = if fits {
                Fate::Waiting { bytes, last }
            } else {
                Fate::Discarded
            };
            self.unacked.push_back(Unacked { pkid, qos, fate });
            self.settle(room)
        }

        /// The client acknowledged a message; its acknowledgement goes to the router (by the
        /// caller, first), then the effects.
        pub(super) fn acknowledged(&mut self, ack: ClientAck, room: usize) -> Vec<Effect> {
            match ack {
                ClientAck::Acked(pkid) | ClientAck::Received { pkid, failed: true } => {
                    self.remove_unacked(pkid);
                }
                ClientAck::Received {
                    pkid,
                    failed: false,
                } => {
                    if self.remove_unacked(pkid) {
                        self.unreleased.push_back((pkid, false));
                    }
                }
                ClientAck::Completed(pkid) => {
                    if let Some(at) = self.unreleased.iter().position(|(p, _)| *p == pkid) {
                        self.unreleased.remove(at);
                    }
                }
            }
            self.settle(room)
        }

        /// The client's Receive Maximum has room again (it acknowledged one of the front
        /// door's own messages).
        pub(super) fn room_freed(&mut self, room: usize) -> Vec<Effect> {
            self.settle(room)
        }

        /// Whether a PUBREL from the router is for a discarded message (not for the client).
        pub(super) fn swallows(&mut self, pkid: u16) -> bool {
            self.swallow.remove(&pkid)
        }

        fn remove_unacked(&mut self, pkid: u16) -> bool {
            match self.unacked.iter().position(|m| m.pkid == pkid) {
                Some(at) => self.unacked.remove(at).is_some(),
                None => false,
            }
        }

        /// Acknowledges the discarded messages whose turn it is, then writes waiting ones while
        /// there is room, in order.
        fn settle(&mut self, room: usize) -> Vec<Effect> {
            let mut effects = Vec::new();
            while let Some(Unacked {
                fate: Fate::Discarded,
                ..
            }) = self.unacked.front()
            {
                let Some(m) = self.unacked.pop_front() else {
                    break;
                };
                if m.qos == 1 {
                    effects.push(Effect::Router(ToRouter::Acked(m.pkid)));
                } else {
                    effects.push(Effect::Router(ToRouter::Received(m.pkid)));
                    self.swallow.insert(m.pkid);
                    self.unreleased.push_back((m.pkid, true));
                }
            }
            while let Some(&(pkid, true)) = self.unreleased.front() {
                self.unreleased.pop_front();
                effects.push(Effect::Router(ToRouter::Completed(pkid)));
            }
            let mut in_flight = self.in_flight();
            for m in self.unacked.iter_mut() {
                if !matches!(m.fate, Fate::Waiting { .. }) {
                    continue;
                }
                if in_flight >= room {
                    break;
                }
                if let Fate::Waiting { bytes, last } = std::mem::replace(&mut m.fate, Fate::Written)
                {
                    effects.push(Effect::Write { bytes, last });
                    in_flight += 1;
                }
            }
            effects
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use proptest::prelude::*;

        fn bytes(n: u8) -> BytesMut {
            BytesMut::from(&[n][..])
        }

        fn router_acks(effects: &[Effect]) -> Vec<ToRouter> {
            effects
                .iter()
                .filter_map(|e| match e {
                    Effect::Router(a) => Some(*a),
                    Effect::Write { .. } => None,
                })
                .collect()
        }

        #[test]
        fn a_discarded_message_is_acknowledged_in_its_turn() {
            let mut flight = RouterFlight::default();
            let e = flight.forwarded(1, 1, bytes(1), true, false, 10);
            assert!(matches!(&e[..], [Effect::Write { .. }]));
            // Discarded behind an unacknowledged one: its PUBACK waits.
            assert_eq!(flight.forwarded(2, 1, bytes(2), false, false, 10), vec![]);
            assert_eq!(
                router_acks(&flight.acknowledged(ClientAck::Acked(1), 10)),
                [ToRouter::Acked(2)]
            );
            // At the head, at once; a QoS 2 one is received and completed, and its PUBREL
            // swallowed.
            assert_eq!(
                router_acks(&flight.forwarded(3, 2, bytes(3), false, false, 10)),
                [ToRouter::Received(3), ToRouter::Completed(3)]
            );
            assert!(flight.swallows(3));
            assert!(!flight.swallows(3));
            assert_eq!(flight.in_flight(), 0);
        }

        #[test]
        fn completions_keep_the_order_of_receipts() {
            let mut flight = RouterFlight::default();
            flight.forwarded(1, 2, bytes(1), true, false, 10);
            let received = ClientAck::Received {
                pkid: 1,
                failed: false,
            };
            assert_eq!(flight.acknowledged(received, 10), vec![]);
            // Discarded after 1 was received: received at once, completed after 1 is.
            assert_eq!(
                router_acks(&flight.forwarded(2, 2, bytes(2), false, false, 10)),
                [ToRouter::Received(2)]
            );
            assert_eq!(flight.in_flight(), 1, "1 awaits its PUBCOMP");
            assert_eq!(
                router_acks(&flight.acknowledged(ClientAck::Completed(1), 10)),
                [ToRouter::Completed(2)]
            );
        }

        #[test]
        fn messages_wait_for_room_in_the_receive_maximum_and_keep_their_order() {
            let mut flight = RouterFlight::default();
            let mut written = Vec::new();
            for pkid in 1..=4u16 {
                for e in flight.forwarded(pkid, 1, bytes(pkid as u8), true, pkid == 4, 2) {
                    if let Effect::Write { bytes, .. } = e {
                        written.push(bytes[0]);
                    }
                }
            }
            assert_eq!(written, [1, 2]);
            assert_eq!(flight.in_flight(), 2);
            let e = flight.acknowledged(ClientAck::Acked(1), 2);
            assert!(matches!(&e[..], [Effect::Write { bytes, last: false }] if bytes[0] == 3));
            // Room freed elsewhere (a mailbox message acknowledged): nothing, still full.
            assert_eq!(flight.room_freed(2), vec![]);
            let e = flight.acknowledged(ClientAck::Acked(2), 2);
            assert!(matches!(&e[..], [Effect::Write { bytes, last: true }] if bytes[0] == 4));
        }

        #[derive(Debug, Clone)]
        enum Op {
            Forward { qos: u8, fits: bool },
            AckNext,
            CompleteNext,
            ShrinkRoom,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                (1u8..3, any::<bool>()).prop_map(|(qos, fits)| Op::Forward { qos, fits }),
                Just(Op::AckNext),
                Just(Op::CompleteNext),
                Just(Op::ShrinkRoom),
            ]
        }

        proptest! {
            /// Whatever the router sends and the client acknowledges (in order, as clients do),
            /// the router gets its PUBACKs and PUBRECs in the order of its PUBLISHes and its
            /// PUBCOMPs in the order of the PUBRECs; the client never has more written and
            /// unacknowledged than the room; and the client gets the messages that fit in the
            /// router's order.
            #[test]
            fn the_router_sees_its_order_and_the_client_its_room(
                ops in proptest::collection::vec(op(), 0..80),
                start_room in 1usize..4,
            ) {
                let mut flight = RouterFlight::default();
                let mut room = start_room;
                let mut next_pkid = 1u16;
                let mut sent = Vec::new(); // (pkid, qos, fits) in router order
                let mut to_router: Vec<ToRouter> = Vec::new();
                let mut client_unacked: VecDeque<(u16, u8)> = VecDeque::new();
                let mut client_received: VecDeque<u16> = VecDeque::new();
                let mut written = Vec::new();
                for op in ops {
                    let effects = match op {
                        Op::Forward { qos, fits } => {
                            let pkid = next_pkid;
                            next_pkid += 1;
                            sent.push((pkid, qos, fits));
                            let b = BytesMut::from(&pkid.to_be_bytes()[..]);
                            flight.forwarded(pkid, qos, b, fits, false, room)
                        }
                        Op::AckNext => match client_unacked.pop_front() {
                            Some((pkid, 1)) => {
                                to_router.push(ToRouter::Acked(pkid));
                                flight.acknowledged(ClientAck::Acked(pkid), room)
                            }
                            Some((pkid, _)) => {
                                to_router.push(ToRouter::Received(pkid));
                                client_received.push_back(pkid);
                                flight.acknowledged(ClientAck::Received { pkid, failed: false }, room)
                            }
                            None => vec![],
                        },
                        Op::CompleteNext => match client_received.pop_front() {
                            Some(pkid) => {
                                to_router.push(ToRouter::Completed(pkid));
                                flight.acknowledged(ClientAck::Completed(pkid), room)
                            }
                            None => vec![],
                        },
                        Op::ShrinkRoom => {
                            room = room.saturating_sub(1).max(1);
                            flight.room_freed(room)
                        }
                    };
                    let mut wrote = false;
                    for effect in effects {
                        match effect {
                            Effect::Router(ack) => to_router.push(ack),
                            Effect::Write { bytes, .. } => {
                                wrote = true;
                                let pkid = u16::from_be_bytes([bytes[0], bytes[1]]);
                                let qos = sent.iter().find(|(p, ..)| *p == pkid).map(|s| s.1).unwrap_or(0);
                                client_unacked.push_back((pkid, qos));
                                written.push(pkid);
                            }
                        }
                    }
                    if wrote {
                        prop_assert!(flight.in_flight() <= room, "written beyond the room");
                    }
                }
                let acks: Vec<u16> = to_router.iter().filter_map(|a| match a {
                    ToRouter::Acked(p) | ToRouter::Received(p) => Some(*p),
                    ToRouter::Completed(_) => None,
                }).collect();
                let order: Vec<u16> = sent.iter().map(|s| s.0).collect();
                prop_assert_eq!(&acks[..], &order[..acks.len()]);
                let recs: Vec<u16> = to_router.iter().filter_map(|a| match a {
                    ToRouter::Received(p) => Some(*p),
                    _ => None,
                }).collect();
                let comps: Vec<u16> = to_router.iter().filter_map(|a| match a {
                    ToRouter::Completed(p) => Some(*p),
                    _ => None,
                }).collect();
                prop_assert_eq!(&comps[..], &recs[..comps.len()]);
                let fitting: Vec<u16> = sent.iter().filter(|s| s.2).map(|s| s.0).collect();
                prop_assert_eq!(&written[..], &fitting[..written.len()]);
            }
        }
    }
}

/// Rights for fleetd's own links (never for a network client).
pub fn service_rights() -> Rights {
    Rights::danger_everything()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_accepts_on_ipv4_and_ipv6() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let addr: SocketAddr = addr.parse().expect("literal address");
            let listener = match listen(addr) {
                Ok(l) => l,
                // A host without IPv6 cannot run the second half.
                Err(_) if addr.is_ipv6() => continue,
                Err(e) => panic!("bind {addr}: {e}"),
            };
            let local = listener.local_addr().expect("local address");
            let (client, accepted) = tokio::join!(TcpStream::connect(local), listener.accept());
            client.expect("connect");
            accepted.expect("accept");
        }
    }

    #[test]
    fn an_idle_session_keeps_a_small_read_buffer() {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        fit_read_buffer(&mut buf);
        assert!(buf.capacity() <= IDLE_READ_CAPACITY);
        // A partial packet: room for the rest.
        buf.extend_from_slice(&[0x30, 0x80]);
        fit_read_buffer(&mut buf);
        assert!(buf.capacity() - buf.len() >= READ_CHUNK);
    }

    #[tokio::test]
    async fn an_unspecified_ipv6_listener_is_dual_stack_where_the_system_says_so() {
        let dual_stack =
            std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|v| v.trim() == "0");
        let Ok(listener) = listen("[::]:0".parse().expect("literal address")) else {
            return;
        };
        if !dual_stack {
            return;
        }
        let port = listener.local_addr().expect("local address").port();
        let (client, accepted) = tokio::join!(
            TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))),
            listener.accept()
        );
        client.expect("an IPv4 client reaches the [::] listener");
        let (_, peer) = accepted.expect("accept");
        assert!(peer.ip().to_canonical().is_ipv4());
    }
}
