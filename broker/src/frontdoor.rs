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
    v4::V4, v5::V5, Disconnect, DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason,
    PubComp, PubCompReason, PubRec, PubRecReason, Publish, QoS, SubAck, SubscribeReasonCode,
    UnsubAck, UnsubAckReason,
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
    delay: Duration,
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
    let mut out = BytesMut::with_capacity(64);
    codec
        .write(packet, &mut out)
        .map_err(|e| format!("encode: {e}"))?;
    write_raw(writer, &out, write_timeout).await
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

async fn connection(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: HandshakeSlot,
) {
    let settings = &shared.settings;
    // The handshake's state (rustls's `ServerConnection` inside `Accept`) and the CONNECT read
    // below are boxed: they are over before the session starts, and unboxed they would size the
    // task of every idle connection.
    let handshake = Box::pin(timeout(
        settings.handshake_timeout,
        shared.acceptor.accept(tcp),
    ));
    let tls = match handshake.await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            debug!(%peer, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            return;
        }
    };
    // The verifier does not run on resumed sessions: apply the policy to the peer certificate
    // after every handshake.
    let certificate = match tls.get_ref().1.peer_certificates() {
        Some(chain) if !chain.is_empty() => {
            match shared
                .policy
                .classify_after_handshake(chain, UnixTime::now())
            {
                Ok(trust) => Ok(Some(PresentedCertificate {
                    der: chain[0].to_vec(),
                    trust,
                })),
                Err(reason) => Err(reason),
            }
        }
        _ => Ok(None),
    };
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut buf = BytesMut::with_capacity(4096);

    // CONNECT, within the connect timeout.
    let deadline = Instant::now() + settings.connect_timeout;
    let first = Box::pin(timeout(settings.connect_timeout, async {
        loop {
            match frame::connect_version(&buf) {
                Ok(Some(v)) => break Ok(v),
                Ok(None) => read_more(&mut reader, &mut buf)
                    .await
                    .map_err(|e| e.to_string())?,
                Err(frame::PreambleError::UnsupportedLevel(level)) => {
                    let _ = write_packet(
                        &mut writer,
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
    let version = match first {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => {
            debug!(%peer, "no usable CONNECT: {e}");
            return;
        }
        Err(_) => {
            debug!(%peer, "no CONNECT in time");
            return;
        }
    };
    let codec = Codec(version);
    let connect = loop {
        match codec.read(&mut buf, settings.max_packet_size) {
            Ok(packet) => break packet,
            Err(CodecError::InsufficientBytes(_)) => {
                match timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    read_more(&mut reader, &mut buf),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    _ => return,
                }
            }
            Err(e) => {
                debug!(%peer, "malformed CONNECT: {e}");
                return;
            }
        }
    };
    let Packet::Connect(connect, _props, last_will, will_props, login) = connect else {
        return;
    };
    // The CONNECT is read: this connection no longer counts as an unfinished handshake.
    drop(pending);
    let client_id = connect.client_id.clone();

    let refuse = |refusal: Refusal, reason: String| async move {
        info!(%peer, client_id = %client_id_for_log(&connect.client_id), ?refusal, "refused: {reason}");
        (refusal, reason)
    };
    // PROTOCOL §2: every refused CONNECT gets 5 / 0x87, a client id of the wrong form included.
    let refusal = if !client_id_is_valid(&client_id) {
        Some(refuse(Refusal::NotAuthorized, "client id of the wrong form".into()).await)
    } else if shared.registry.len() >= settings.max_connections
        && !shared.registry.is_connected(&client_id)
    {
        // Before admission only the hard cap: who may use the reserved slots, and how many
        // sessions this address has, is decided once the admission has spoken (`register`).
        Some(refuse(Refusal::QuotaExceeded, "connection limit reached".into()).await)
    } else if let Err(reason) = &certificate {
        Some(
            refuse(
                Refusal::NotAuthorized,
                format!("client certificate refused: {reason}"),
            )
            .await,
        )
    } else {
        None
    };
    if let Some((refusal, reason)) = refusal {
        admission.refused(&client_id_for_log(&client_id), peer, &reason);
        return refuse_and_close(&mut writer, codec, refusal, &reason, settings.write_timeout)
            .await;
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
            return refuse_and_close(&mut writer, codec, refusal, &reason, settings.write_timeout)
                .await;
        }
    };

    let will = last_will.map(|w| Will {
        topic: w.topic,
        payload: w.message,
        retain: w.retain,
        delay: Duration::from_secs(
            will_props
                .as_ref()
                .and_then(|p| p.delay_interval)
                .unwrap_or(0)
                .into(),
        ),
    });
    // A will is published on the client's behalf: it must be within its rights at CONNECT.
    let will = will
        .filter(|w| std::str::from_utf8(&w.topic).is_ok_and(|t| rights.may_publish(t)))
        .map(|w| Will {
            retain: w.retain && rights.retain,
            ..w
        });

    let shared_rights: SharedRights = Arc::new(std::sync::RwLock::new(rights));
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    let undelivered = registry::Undelivered::default();
    // Dropped once this session released its router link (see `Registry::register`).
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
            admission.session_closed(&client_id, session_id);
            return refuse_and_close(
                &mut writer,
                codec,
                Refusal::QuotaExceeded,
                reason,
                settings.write_timeout,
            )
            .await;
        }
    };
    if let Some(old_released) = taken_over {
        // Bounded: a stuck old session cannot hold the new one forever.
        let _ = timeout(Duration::from_secs(2), old_released).await;
    }

    let (mut link_tx, link_rx, notification) =
        match build_link(&shared.links, client_id.clone()).await {
            Ok(parts) => parts,
            Err(e) => {
                warn!(client_id = %client_id, "router refused the link: {e}");
                let reason = "router unavailable";
                refuse_and_close(
                    &mut writer,
                    codec,
                    Refusal::ServerUnavailable,
                    reason,
                    settings.write_timeout,
                )
                .await;
                shared.registry.unregister(&client_id, session_id);
                admission.session_closed(&client_id, session_id);
                return;
            }
        };
    match admission.session_opened(&client_id, session_id) {
        Some(now) => registry::set(&shared_rights, now),
        None => {
            let reason = "not authorized";
            refuse_and_close(
                &mut writer,
                codec,
                Refusal::NotAuthorized,
                reason,
                settings.write_timeout,
            )
            .await;
            release_link(&mut link_tx).await;
            shared.registry.unregister(&client_id, session_id);
            admission.session_closed(&client_id, session_id);
            return;
        }
    }
    let connack: Option<Packet> = notification.into();
    let connack = match connack {
        Some(Packet::ConnAck(mut ack, props)) => {
            ack.session_present = false;
            Packet::ConnAck(ack, props)
        }
        _ => Packet::ConnAck(
            rumqttd::protocol::ConnAck {
                session_present: false,
                code: rumqttd::protocol::ConnectReturnCode::Success,
            },
            None,
        ),
    };
    let keepalive = match connect.keep_alive {
        0 => settings.idle_timeout,
        // MQTT: the server may close after one and a half keepalive periods of silence.
        k => Duration::from_millis(u64::from(k) * 1500),
    };

    let mut pump = Pump {
        shared: shared.clone(),
        codec,
        version,
        client_id: client_id.clone(),
        session_id,
        rights: shared_rights,
        admission: admission.clone(),
        undelivered,
        inbox_qos2: HashSet::new(),
        link_tx,
        pending_subs: HashMap::new(),
        denied_qos2: HashSet::new(),
        closing: None,
        filters: Vec::new(),
        last_delivered: None,
        mailbox_pkid: MAILBOX_PKIDS_FROM,
        mailbox_unacked: HashSet::new(),
    };
    let end = match write_packet(&mut writer, codec, connack, settings.write_timeout).await {
        // Boxed: rustc lays the pump's future out beside this function's other states instead
        // of over them; boxed, an idle session's task is about 3.5 KiB smaller (12.4 KiB with
        // the pump inline, 4.8 KiB plus the pump's 4.2 KiB boxed).
        Ok(()) => {
            Box::pin(pump.run(
                &mut reader,
                &mut writer,
                buf,
                link_rx,
                control_rx,
                keepalive,
            ))
            .await
        }
        Err(_) => End::Unclean,
    };
    debug!(client_id = %client_id, ?end, "session ended");
    let _ = timeout(Duration::from_secs(1), writer.shutdown()).await;

    if let (Some(will), true) = (will, end.fires_will()) {
        publish_will(shared.clone(), client_id.clone(), will);
    }
    if end != End::LinkGone {
        release_link(&mut pump.link_tx).await;
    }
    // A session that took this one over may build its link now.
    drop(released_tx);
    shared.registry.unregister(&client_id, session_id);
    admission.session_closed(&client_id, session_id);
}

/// Frees the client's session in the router (its will, if any, was handled by the front door).
async fn release_link(link_tx: &mut LinkTx) {
    let disconnect = Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
    };
    let _ = link_tx.send(Packet::Disconnect(disconnect, None)).await;
}

/// Answers a CONNECT with the refusal's CONNACK and closes the connection.
async fn refuse_and_close(
    writer: &mut WriteHalf<TlsStream<TcpStream>>,
    codec: Codec,
    refusal: Refusal,
    reason: &str,
    write_timeout: Duration,
) {
    let connack = frame::refusal_connack(codec.0, refusal, reason);
    let _ = write_packet(writer, codec, connack, write_timeout).await;
    let _ = writer.shutdown().await;
}

/// Client ids come from the network: log them escaped and bounded.
fn client_id_for_log(id: &str) -> String {
    id.chars().take(64).flat_map(char::escape_default).collect()
}

fn publish_will(shared: Arc<Shared>, client_id: String, will: Will) {
    let publish = move |shared: &Shared| {
        let packet = Packet::Publish(
            Publish::new(will.topic.clone(), will.payload.clone(), will.retain),
            None,
        );
        let mut link = shared.will_link.lock().unwrap_or_else(|e| e.into_inner());
        // `send` completes without waiting (it pushes to the router's channel).
        let fut = link.send(packet);
        let _ = poll_once(fut);
    };
    if will.delay.is_zero() {
        publish(&shared);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(will.delay).await;
            // A client that came back within the delay cancels its will (MQTT 5).
            let back =
                crate::admission::SessionControl::is_connected(&*shared.registry, &client_id);
            if !back {
                publish(&shared);
            }
        });
    }
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
    link_tx: LinkTx,
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
}

enum Step {
    Continue,
    End(End),
}

impl Pump {
    async fn run(
        &mut self,
        reader: &mut ReadHalf<TlsStream<TcpStream>>,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        mut buf: BytesMut,
        mut link_rx: LinkRx,
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
                next = link_rx.next() => {
                    let notification = match next {
                        Ok(Some(n)) => n,
                        Ok(None) => continue,
                        Err(_) => return End::LinkGone,
                    };
                    if let Step::End(end) = self.outgoing(notification, &link_rx, writer).await {
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
                            self.undelivered.fetch_sub(1, Ordering::AcqRel);
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
            let _ = write_packet(
                writer,
                self.codec,
                packet,
                self.shared.settings.write_timeout,
            )
            .await;
        }
    }

    /// A mailbox message from the controller: written at QoS 0 if a granted filter matches.
    async fn deliver(
        &mut self,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
        topic: String,
        payload: Vec<u8>,
    ) -> Step {
        let Some(qos) = crate::mailbox::delivery_qos(&topic, self.filters.iter()) else {
            self.last_delivered = Some(topic);
            return Step::Continue;
        };
        let last = self.is_final(topic.as_bytes());
        // The controller speaks at QoS 1 (PROTOCOL §3); a QoS 0 subscription gets QoS 0. A
        // client that leaves too many unacknowledged gets the rest at QoS 0.
        let step = if qos >= 1 && self.mailbox_unacked.len() < MAX_MAILBOX_UNACKED {
            let pkid = self.mailbox_pkid;
            self.mailbox_pkid = if pkid == u16::MAX {
                MAILBOX_PKIDS_FROM
            } else {
                pkid + 1
            };
            self.mailbox_unacked.insert(pkid);
            let bytes = frame::publish_qos1(self.version, &topic, &payload, pkid);
            self.write_bytes(writer, &bytes).await
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

    async fn write(&self, writer: &mut WriteHalf<TlsStream<TcpStream>>, packet: Packet) -> Step {
        let written = write_packet(
            writer,
            self.codec,
            packet,
            self.shared.settings.write_timeout,
        )
        .await;
        self.step_after_write(written)
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
            self.admission
                .message(
                    &self.client_id,
                    self.session_id,
                    topic,
                    publish.payload.to_vec(),
                )
                .await;
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

    async fn forward(&mut self, packet: Packet) -> Step {
        match self.link_tx.send(packet).await {
            Ok(_) => Step::Continue,
            Err(_) => Step::End(End::LinkGone),
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
                self.disconnect(
                    writer,
                    DisconnectReasonCode::ProtocolError,
                    "protocol error",
                )
                .await;
                Step::End(End::Unclean)
            }
            Packet::Publish(mut publish, props) => {
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
                    return self.forward(Packet::Publish(publish, props)).await;
                }
                debug!(client_id = %self.client_id, topic = %String::from_utf8_lossy(&publish.topic).escape_default(), "publish denied");
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
            Packet::PubRel(pubrel, props) => {
                if self.denied_qos2.remove(&pubrel.pkid) || self.inbox_qos2.remove(&pubrel.pkid) {
                    let comp = PubComp {
                        pkid: pubrel.pkid,
                        reason: PubCompReason::Success,
                    };
                    self.write(writer, Packet::PubComp(comp, None)).await
                } else {
                    self.forward(Packet::PubRel(pubrel, props)).await
                }
            }
            Packet::Subscribe(mut subscribe, props) => {
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
                self.pending_subs.insert(subscribe.pkid, slots);
                self.forward(Packet::Subscribe(subscribe, props)).await
            }
            Packet::Unsubscribe(mut unsubscribe, props) => {
                self.filters
                    .retain(|(f, _)| !unsubscribe.filters.contains(f));
                // The router never saw the mailbox filters (and answers nothing for a filter it
                // does not know): they are acknowledged here.
                let asked = unsubscribe.filters.len();
                {
                    let rights = registry::read(&self.rights);
                    unsubscribe.filters.retain(|f| !rights.is_mailbox(f));
                }
                if unsubscribe.filters.is_empty() {
                    let ack = UnsubAck {
                        pkid: unsubscribe.pkid,
                        reasons: vec![UnsubAckReason::Success; asked],
                    };
                    return self.write(writer, Packet::UnsubAck(ack, None)).await;
                }
                self.forward(Packet::Unsubscribe(unsubscribe, props)).await
            }
            // The acknowledgement of a mailbox message is the front door's own.
            Packet::PubAck(ref ack, _) if self.mailbox_unacked.remove(&ack.pkid) => Step::Continue,
            Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => {
                self.forward(packet).await
            }
            Packet::PingReq(_) => self.write(writer, Packet::PingResp(PingResp)).await,
            Packet::Disconnect(disconnect, _) => {
                if disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
                    Step::End(End::CleanWithWill)
                } else {
                    Step::End(End::Clean)
                }
            }
            // A second CONNECT, or a packet only a server sends: protocol error.
            _ => {
                self.disconnect(
                    writer,
                    DisconnectReasonCode::ProtocolError,
                    "protocol error",
                )
                .await;
                Step::End(End::Unclean)
            }
        }
    }

    async fn outgoing(
        &mut self,
        notification: Notification,
        link_rx: &LinkRx,
        writer: &mut WriteHalf<TlsStream<TcpStream>>,
    ) -> Step {
        match notification {
            Notification::Unschedule => {
                if link_rx.wake().await.is_err() {
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
                let step = self
                    .write(writer, Packet::Publish(forward.publish, forward.properties))
                    .await;
                if last {
                    return Step::End(self.cut_now(writer).await);
                }
                step
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
                    // The front door answers PINGREQ itself.
                    Some(Packet::PingResp(_)) | None => Step::Continue,
                    Some(packet) => self.write(writer, packet).await,
                }
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
