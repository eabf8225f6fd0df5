//! The public listener: accepts TCP, terminates TLS (each handshake in its own task, with a
//! timeout), reads CONNECT, asks the controller for admission, then pumps packets between the
//! socket and the client's own in-process link into rumqttd's router, enforcing the client's
//! rights on every PUBLISH and SUBSCRIBE.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::Error as CodecError;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode, LastWill,
    LastWillProperties, Packet, Publish, PublishProperties,
};
use rumqttd::{Notification, Router, RouterConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, error, info, warn};

use crate::acl::Rights;
use crate::admission::{
    Admission, ConnectInfo, Decision, MqttVersion, PresentedCertificate, Refusal, SessionControl,
};
use crate::bus::LocalBus;
use crate::flood::{ConnectionRate, PendingHandshakes};
use crate::frame;
use crate::handover::Handover;
use crate::metrics::{AcceptingGuard, Metrics, RefusedConnect};
use crate::registry::{self, Control, NewSession, Registry, SessionCaps, SharedRights};
use crate::session::{encode, fit, Action, ClientLimits, Codec, End, Session, SessionConfig};
use crate::tls::{self, ClientPolicy, TlsSetupError};
use crate::tls_stream::TlsStream;

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
    /// Worker threads of the runtime that opens connections (TLS handshake, CONNECT,
    /// admission, CONNACK) apart from the runtime that runs the sessions; 0: connections are
    /// opened on the sessions' runtime. See [`Openings`].
    pub handshake_threads: usize,
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
    #[error("cannot start the runtime that opens connections (server.handshake_threads): {0}")]
    Openings(std::io::Error),
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
    tls_config: Arc<rustls::ServerConfig>,
    open_sockets: AtomicUsize,
    /// Told when a socket closes: the accept loop waits for it while at `max_sockets`.
    socket_freed: tokio::sync::Notify,
    /// Sockets in their TLS handshake or waiting for CONNECT, per source address.
    handshakes: Mutex<PendingHandshakes>,
    /// Publishes wills on behalf of clients whose own link is gone.
    will_link: Mutex<LinkTx>,
    /// Sessions' router links live now ([`Broker::router_links`]).
    router_links: AtomicUsize,
    shutdown: watch::Receiver<bool>,
    /// What the front door counts ([`Broker::metrics`]).
    metrics: Arc<Metrics>,
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
    openings: Openings,
}

/// The runtime that opens connections, apart from the one that runs sessions (and, in fleetd,
/// the controller).
///
/// Opening a connection is mostly its TLS handshake, about a millisecond of CPU in one or two
/// polls. On one runtime, a reconnect storm puts thousands of openings in the workers' queues,
/// and the established sessions and the controller's batches wait behind them: reject → cut
/// took 0.16–2.3 s right after 10,000 stations reconnected. On a runtime of their own, openings
/// queue behind openings only; the operating system shares the CPU between the two runtimes'
/// threads, so a thread that wakes for a session or a batch runs within its scheduling latency
/// (reject → cut 7–104 ms in the same kind of runs). The price is the order: a storm's openings now wait
/// for the established sessions' work instead of the other way round, so the storm itself ends
/// later (BENCHMARKS.md has both). Once its CONNACK is written, a connection's socket moves to
/// the sessions' runtime ([`TlsStream::detach`]), which polls it from then on.
struct Openings(Option<tokio::runtime::Runtime>);

/// Threads of the openings' blocking pool at most.
pub const OPENINGS_BLOCKING_THREADS: usize = 8;

impl Openings {
    fn start(threads: usize) -> std::io::Result<Openings> {
        if threads == 0 {
            return Ok(Openings(None));
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("fleet-open")
            .enable_all()
            // Admissions and session openings wait on its blocking pool (see fleetd's runtime).
            // They take the controller's lock in turn, so a few threads are as fast as many,
            // and each thread kept alive holds its stack and glibc's per-thread cache: with
            // 128, a churn of 10,000 stations kept 128 threads here, and fleetd's RSS grew
            // round after round (BENCHMARKS.md, issue 11, tenth day).
            .max_blocking_threads(OPENINGS_BLOCKING_THREADS)
            .build()?;
        Ok(Openings(Some(runtime)))
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.0.as_ref().map(|runtime| runtime.handle().clone())
    }
}

impl Drop for Openings {
    fn drop(&mut self) {
        // Connections still opening are dropped (their sockets close); sessions already moved
        // run on. Does not wait, so it may be dropped inside the sessions' runtime.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
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

/// Starts rumqttd's router on a thread of its own; the factory builds links into it.
fn start_router(max_connections: usize, max_packet_size: usize, metrics: &Metrics) -> LinkFactory {
    let router = Router::new(
        0,
        RouterConfig {
            // fleetd's own links come on top of the clients.
            max_connections: max_connections + 64,
            max_outgoing_packet_count: 200,
            max_segment_size: (max_packet_size * 4).max(1 << 20),
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
    );
    let router_tx = router.spawn();
    let probe_tx = router_tx.clone();
    metrics.set_router_probe(move || !probe_tx.is_disconnected());
    // The router's sender type names a private type: it only lives inside this closure.
    Arc::new(move |req: LinkRequest| {
        LinkBuilder::new(&req.client_id, router_tx.clone())
            // Sessions never outlive their connection: rights are decided per connection,
            // and a resumed session would carry subscriptions granted under old rights.
            .clean_session(true)
            // Without dynamic filters a publish to a topic nobody subscribed disconnects.
            .dynamic_filters(true)
            .build()
            .map_err(|e: LinkError| e.to_string())
    })
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

        let metrics = Arc::new(Metrics::new());
        let links = start_router(settings.max_connections, settings.max_packet_size, &metrics);

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
        let openings =
            Openings::start(settings.handshake_threads).map_err(BrokerError::Openings)?;
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
            tls_config: Arc::new(server_config),
            open_sockets: AtomicUsize::new(0),
            socket_freed: tokio::sync::Notify::new(),
            handshakes: Mutex::new(PendingHandshakes::new(settings.handshakes_per_ip)),
            will_link: Mutex::new(will_tx),
            router_links: AtomicUsize::new(0),
            shutdown: shutdown_rx,
            metrics,
        });
        Ok(Broker {
            shared,
            listener: Mutex::new(Some(listener)),
            local_addr,
            shutdown_tx,
            openings,
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

    /// The metrics the front door counts into, for the controller and the metrics endpoint.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
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
        let opening = self.openings.handle();
        let handover = opening.as_ref().map(|_| {
            let handover = Arc::new(Handover::default());
            let receiver = take_over(handover.clone(), shared.clone(), admission.clone());
            drop(tokio::spawn(receiver));
            handover
        });
        let runtimes = Runtimes { opening, handover };
        // With a runtime for the openings, the accept loop runs there too: each accepted
        // connection's task then starts on the runtime that handshakes it, without waking a
        // worker of the other runtime (in a 4,000-client storm the sessions' runtime did about
        // 100 ms less work; BENCHMARKS.md, issue 11, ninth day). Alive (`/healthz`) from
        // here on, not from whenever the loop's task first runs.
        let accepting = shared.metrics.accepting();
        match runtimes.opening.clone() {
            Some(opening) => match listener.into_std() {
                Ok(std_listener) => {
                    drop(opening.spawn(async move {
                        match TcpListener::from_std(std_listener) {
                            Ok(listener) => {
                                accept_loop(listener, shared, admission, runtimes, accepting).await
                            }
                            Err(e) => error!("{LISTENER_NOT_MOVED}: {e}"),
                        }
                    }));
                }
                Err(e) => error!("{LISTENER_NOT_MOVED}: {e}"),
            },
            None => drop(tokio::spawn(accept_loop(
                listener, shared, admission, runtimes, accepting,
            ))),
        }
    }

    /// Stops accepting and ends every live session with a server DISCONNECT "server shutting
    /// down" (MQTT 5; 3.1.1 has none: the connection is closed), firing their wills. Returns at
    /// once; [`Broker::sessions_ended`] waits for the sessions to be gone.
    ///
    /// Every pump watches this notice, so no session needs a cut: a cut would race it and end
    /// some sessions "not authorized" instead.
    pub fn shutdown(&self) {
        let _ = self.shutdown_tx.send(true);
    }

    /// Waits until no session is registered (each has fired its will and is gone), at most
    /// `within`; false if some were still there.
    pub async fn sessions_ended(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.shared.registry.is_empty() {
            if Instant::now() >= deadline {
                return false;
            }
            // The registry has no notification of its own; a shutdown is rare.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A socket counted in [`Shared::open_sockets`], for as long as it is open.
struct SocketSlot(Arc<Shared>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.open_sockets.fetch_sub(1, Ordering::Relaxed);
        self.0.socket_freed.notify_one();
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

/// Logged if `serve` cannot hand the listener to the openings' runtime.
const LISTENER_NOT_MOVED: &str =
    "the listener could not move to the openings' runtime, nothing is accepted";

/// Where connections are opened (`None`: on the sessions' runtime), and the way their
/// sessions go to the sessions' runtime from there.
struct Runtimes {
    opening: Option<tokio::runtime::Handle>,
    handover: Option<Arc<Handover<Moved>>>,
}

/// An opened session on its way to the sessions' runtime, with its socket's place.
type Moved = (Box<Moving>, SocketSlot);

/// The sessions' side of the hand-over: each session that comes runs in a task of its own
/// here ([`moved_session`]). At shutdown, what is queued still runs (and ends at once).
async fn take_over(
    handover: Arc<Handover<Moved>>,
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
) {
    let mut shutdown = shared.shutdown.clone();
    let run = |(moving, slot): Moved| {
        let task = moved_session(shared.clone(), admission.clone(), moving, slot);
        log_size_once(&SIZE_OF_MOVED, "connection task (moved)", &task);
        drop(tokio::spawn(task));
    };
    loop {
        tokio::select! {
            // A closed notice (the broker is gone) is a shutdown too.
            _ = shutdown.wait_for(|stop| *stop) => break,
            opened = handover.take() => opened.into_iter().for_each(run),
        }
    }
    // From here on the openers end their sessions as lost (`Handover::push` refuses).
    handover.close().into_iter().for_each(run);
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    runtimes: Runtimes,
    _accepting: AcceptingGuard,
) {
    let mut shutdown = shared.shutdown.clone();
    let mut rate = ConnectionRate::new(shared.settings.connections_per_ip_per_minute);
    'accept: loop {
        // At the socket cap, new connections wait in the kernel's backlog (and, past it, the
        // clients' SYNs are sent again) until a socket closes, instead of being accepted only
        // to be closed: in a reboot storm the old sessions of the stations that come back are
        // still open for a moment, and each one that ends lets one new station in.
        while shared.open_sockets.load(Ordering::Relaxed) >= shared.settings.max_sockets {
            // `notify_one` keeps a permit when nobody waits, so a socket that closed since the
            // count was read still wakes this.
            tokio::select! {
                _ = shutdown.changed() => break 'accept,
                _ = shared.socket_freed.notified() => {}
            }
        }
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
        // Spawned as it is: a wrapping `async` block would keep a second copy of it.
        let home = runtimes.handover.clone();
        let task = connection(
            shared.clone(),
            admission.clone(),
            tcp,
            peer,
            handshake,
            slot,
            home,
        );
        log_size_once(&SIZE_OF_CONNECTION, "connection task", &task);
        match &runtimes.opening {
            Some(opening) => drop(opening.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
    info!("front door stopped accepting");
}

static SIZE_OF_CONNECTION: std::sync::Once = std::sync::Once::new();
static SIZE_OF_MOVED: std::sync::Once = std::sync::Once::new();
static SIZE_OF_PUMP: std::sync::Once = std::sync::Once::new();
static SIZE_OF_SESSION: std::sync::Once = std::sync::Once::new();

/// Logs, once per process (target `fleet_broker::memory`, level debug), what one session's
/// future takes: the figures behind BENCHMARKS.md's memory per idle station.
fn log_size_once<T>(once: &std::sync::Once, what: &str, value: &T) {
    once.call_once(|| {
        debug!(target: "fleet_broker::memory", bytes = std::mem::size_of_val(value), "{what}");
    });
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
        // A copy, as the will's topic and payload (`will_within`).
        correlation_data: will
            .correlation_data
            .as_deref()
            .map(bytes::Bytes::copy_from_slice),
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

async fn read_more(reader: &mut ReadHalf<TlsStream>, buf: &mut BytesMut) -> std::io::Result<()> {
    buf.reserve(READ_CHUNK);
    let n = reader.read_buf(buf).await?;
    if n == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

async fn write_packet(
    writer: &mut WriteHalf<TlsStream>,
    codec: Codec,
    packet: Packet,
    write_timeout: Duration,
) -> Result<(), String> {
    write_packet_within(writer, codec, packet, write_timeout, None).await
}

/// Writes a packet that fits the client's Maximum Packet Size (MQTT 5; `None`: no limit), if
/// need be without its properties ([`fit`]); one that cannot fit is not written at all.
async fn write_packet_within(
    writer: &mut WriteHalf<TlsStream>,
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

/// Writes encoded bytes and flushes them, within the write timeout.
async fn write_raw(
    writer: &mut WriteHalf<TlsStream>,
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

/// One client connection, from the TLS handshake to the end of its session. With `home`, this
/// task runs on the openings' runtime and ends once the connection is open (its CONNACK
/// written): the session is pushed to `home`, the hand-over to the sessions' runtime, where
/// [`take_over`] spawns it in a task of its own ([`moved_session`]), its socket registered
/// with that runtime's reactor.
///
/// The task that runs the session lives as long as it, so what it keeps is what every idle
/// session costs: everything before the session runs is boxed (it is over once the session
/// starts), and the task itself keeps only that box and what `run_session` needs. Plain
/// functions returning `async move` blocks, not `async fn`s, because an `async fn` keeps its
/// arguments for its whole life, even once they are moved out.
fn connection(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    tcp: TcpStream,
    peer: SocketAddr,
    pending: HandshakeSlot,
    slot: SocketSlot,
    home: Option<Arc<Handover<Moved>>>,
) -> impl std::future::Future<Output = ()> + Send {
    let handshaking = Box::pin(handshake(shared.clone(), tcp, peer));
    async move {
        let Some((tls, certificate)) = handshaking.await else {
            return;
        };
        let handshaken = Handshaken {
            peer,
            certificate,
            pending,
        };
        let Some(home) = home else {
            let rest = after_handshake(shared, admission, tls, handshaken, slot);
            rest.await;
            return;
        };
        let opening = Box::pin(open_connection(
            shared.clone(),
            admission.clone(),
            tls,
            handshaken,
        ));
        let Some(opened) = opening.await else {
            return;
        };
        match opened.detach() {
            Ok(moving) => {
                if let Err((moving, _slot)) = home.push((Box::new(moving), slot)) {
                    // The sessions' runtime takes no more (a shutdown): ended as lost.
                    let (session, will) = moving.unmoved();
                    abandon(&shared, &admission, session, will).await;
                }
            }
            Err(unmoved) => {
                let (session, will, e) = *unmoved;
                warn!(client_id = %client_id_for_log(&session.client_id), "session not moved to the sessions' runtime: {e}");
                abandon(&shared, &admission, session, will).await;
            }
        }
    }
}

/// The session of a connection opened on the openings' runtime, on the runtime this is spawned
/// on: its socket is registered there first. (Its arguments are all kept by its future, so an
/// `async fn` keeps nothing more.)
async fn moved_session(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    moving: Box<Moving>,
    slot: SocketSlot,
) {
    let _slot = slot;
    let opened = match moving.attach() {
        Ok(opened) => opened,
        Err(unmoved) => {
            let (session, will, e) = *unmoved;
            warn!(client_id = %client_id_for_log(&session.client_id), "session not registered with the sessions' runtime: {e}");
            abandon(&shared, &admission, session, will).await;
            return;
        }
    };
    let session = run_session(shared, admission, opened);
    session.await;
}

/// Ends a session that was admitted, registered and answered but never ran (its socket could
/// not change runtimes): as a connection lost at once, so its will fires.
async fn abandon(
    shared: &Arc<Shared>,
    admission: &Arc<dyn Admission>,
    session: OpenSession,
    will: Option<Will>,
) {
    let OpenSession {
        client_id,
        session_id,
        control,
        released_tx,
        ..
    } = session;
    control.close();
    let ended = Ended {
        client_id: &client_id,
        session_id,
        will,
        link: None,
        released_tx,
    };
    Box::pin(wind_up(shared, admission, ended)).await;
}

/// An [`Opened`] between runtimes: its TLS stream's socket registered with none.
struct Moving {
    session: OpenSession,
    will: Option<Will>,
    connacked: bool,
    keepalive: Duration,
    tls: TlsStream<std::net::TcpStream>,
    buf: BytesMut,
}

/// What a failed move leaves: the session to end, its will, and why.
type Unmoved = Box<(OpenSession, Option<Will>, std::io::Error)>;

impl Opened {
    /// This session, its socket taken off the runtime that opened it.
    fn detach(self) -> Result<Moving, Unmoved> {
        let Opened {
            session,
            will,
            connacked,
            keepalive,
            io: (reader, writer, buf),
        } = self;
        match reader.unsplit(writer).detach() {
            Ok(tls) => Ok(Moving {
                session,
                will,
                connacked,
                keepalive,
                tls,
                buf,
            }),
            Err(e) => Err(Box::new((session, will, e))),
        }
    }
}

impl Moving {
    /// The session and its will, for a session that will not run (its socket closes).
    fn unmoved(self: Box<Self>) -> (OpenSession, Option<Will>) {
        let Moving { session, will, .. } = *self;
        (session, will)
    }

    /// The session again, its socket registered with the runtime this is called on. Takes
    /// the box: a box moved out of is freed only when its variable goes out of scope, which
    /// for an argument of the session's function would be the session's end.
    fn attach(self: Box<Self>) -> Result<Opened, Unmoved> {
        let Moving {
            session,
            will,
            connacked,
            keepalive,
            tls,
            buf,
        } = *self;
        match tls.attach() {
            Ok(tls) => {
                let (reader, writer) = tokio::io::split(tls);
                Ok(Opened {
                    session,
                    will,
                    connacked,
                    keepalive,
                    io: (reader, writer, buf),
                })
            }
            Err(e) => Err(Box::new((session, will, e))),
        }
    }
}

/// What the handshake found, for the rest of the opening.
struct Handshaken {
    peer: SocketAddr,
    /// The certificate policy's verdict (see [`handshake`]).
    certificate: Result<Option<PresentedCertificate>, String>,
    /// Released once CONNECT is read.
    pending: HandshakeSlot,
}

/// A connection after its TLS handshake: CONNECT, admission and CONNACK (boxed, over once the
/// session runs), then the session.
fn after_handshake(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    tls: TlsStream,
    handshaken: Handshaken,
    slot: SocketSlot,
) -> impl std::future::Future<Output = ()> + Send {
    let opening = Box::pin(open_connection(
        shared.clone(),
        admission.clone(),
        tls,
        handshaken,
    ));
    async move {
        let _slot = slot;
        // The `Opened` is moved into the session's future before that is awaited, not kept
        // beside it (a temporary of the awaiting statement would be).
        let session = match opening.await {
            Some(opened) => run_session(shared, admission, opened),
            None => return,
        };
        session.await;
    }
}

/// A session admitted, registered and answered, ready to run.
struct Opened {
    session: OpenSession,
    will: Option<Will>,
    /// Its CONNACK was written.
    connacked: bool,
    keepalive: Duration,
    io: (ReadHalf<TlsStream>, WriteHalf<TlsStream>, BytesMut),
}

/// A connection after its TLS handshake up to its session: the CONNECT, the admission, the
/// registration and the CONNACK. Each step is a function of its own; `None`: a step refused
/// the client, answered it and closed already.
async fn open_connection(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    tls: TlsStream,
    handshaken: Handshaken,
) -> Option<Opened> {
    let (shared, admission) = (&shared, &admission);
    let Handshaken {
        peer,
        certificate,
        pending,
    } = handshaken;
    let (mut reader, mut writer) = tokio::io::split(tls);
    let mut buf = BytesMut::with_capacity(4096);
    let (version, packet) = read_connect(
        shared,
        &**admission,
        &mut reader,
        &mut writer,
        &mut buf,
        peer,
    )
    .await?;
    let Packet::Connect(connect, props, last_will, will_props, login) = packet else {
        return None;
    };
    // The CONNECT is read: this connection no longer counts as an unfinished handshake.
    drop(pending);
    let client_id = connect.client_id.clone();
    let limits = ClientLimits::of(version, props.as_ref());
    let reply = Reply {
        codec: Codec(version),
        write_timeout: shared.settings.write_timeout,
        limits,
        metrics: &shared.metrics,
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
        reply.protocol_error(&mut writer, connack).await;
        return None;
    }
    // Read: not kept in the state of this task for the session's life.
    drop(props);
    if let Some((refusal, reason)) = refusal_before_admission(shared, &client_id, &certificate) {
        info!(%peer, client_id = %client_id_for_log(&client_id), ?refusal, "refused: {reason}");
        admission.refused(&client_id_for_log(&client_id), peer, &reason);
        reply.refuse(&mut writer, refusal, &reason).await;
        return None;
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
            info!(%peer, client_id = %client_id_for_log(&client_id), "refused by the controller: {}", reason.log);
            reply.refuse(&mut writer, refusal, &reason.client).await;
            return None;
        }
    };
    let will = will_within(last_will, will_props, &rights);
    let opening = Opening {
        client_id,
        session_id,
        peer,
        reserved,
    };
    let session = open_session(shared, admission, opening, rights, &reply, &mut writer).await?;
    let (connack, keepalive) =
        success_connack(&shared.settings, version, connect.keep_alive, &limits);
    let written = reply.write(&mut writer, connack).await;
    Some(Opened {
        session,
        will,
        connacked: written.is_ok(),
        keepalive,
        io: (reader, writer, buf),
    })
}

/// The TLS handshake, within the handshake timeout, and the certificate policy applied to what
/// the client presented: `Err` is why its certificate is refused (answered after CONNECT).
async fn handshake(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Option<(TlsStream, Result<Option<PresentedCertificate>, String>)> {
    // Boxed by `connection`, like the rest of the opening.
    let handshake = timeout(
        shared.settings.handshake_timeout,
        TlsStream::accept(tcp, shared.tls_config.clone()),
    );
    let tls = in_time(
        handshake.await,
        peer,
        "TLS handshake failed",
        "TLS handshake timed out",
    )?;
    let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    shared.metrics.handshake(resumed);
    // The verifier does not run on resumed sessions: apply the policy to the peer certificate
    // after every handshake.
    let certificate = match tls.peer_certificates() {
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
    reader: &mut ReadHalf<TlsStream>,
    writer: &mut WriteHalf<TlsStream>,
    buf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<(MqttVersion, Packet)> {
    let settings = &shared.settings;
    let deadline = Instant::now() + settings.connect_timeout;
    let first = timeout(settings.connect_timeout, async {
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
    })
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
    // Copies: the CONNECT's fields are slices of the read buffer it came in, which a will
    // kept for the session's life would keep in memory whole (4 KiB per idle session).
    Some(Will {
        inbox: rights.is_inbox(topic),
        topic: bytes::Bytes::copy_from_slice(&w.topic),
        payload: bytes::Bytes::copy_from_slice(&w.message),
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
    control: Arc<registry::ControlQueue>,
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
    reply: &Reply<'_>,
    writer: &mut WriteHalf<TlsStream>,
) -> Option<OpenSession> {
    let Opening {
        client_id,
        session_id,
        peer,
        reserved,
    } = opening;
    let shared_rights: SharedRights = Arc::new(std::sync::RwLock::new(rights));
    let control = Arc::new(registry::ControlQueue::default());
    let undelivered = registry::Undelivered::default();
    let (released_tx, released_rx) = tokio::sync::oneshot::channel::<()>();
    let session = NewSession {
        session_id,
        address: peer.ip(),
        reserved,
        rights: shared_rights.clone(),
        control: control.clone(),
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
    let opened = match admission.try_session_opened(&client_id, session_id) {
        Some(opened) => opened,
        None => {
            let (client_id, admission) = (client_id.clone(), Arc::clone(admission));
            // Off the async workers, as every call of the admission that may wait (`closed`).
            tokio::task::spawn_blocking(move || admission.session_opened(&client_id, session_id))
                .await
                .unwrap_or(Err(Refusal::ServerUnavailable))
        }
    };
    match opened {
        Ok(now) => registry::set(&shared_rights, now),
        Err(refusal) => {
            let reason = match refusal {
                Refusal::ServerUnavailable => "server unavailable",
                _ => "not authorized",
            };
            reply.refuse(writer, refusal, reason).await;
            shared.registry.unregister(&client_id, session_id);
            closed(admission, &client_id, session_id).await;
            return None;
        }
    }
    Some(OpenSession {
        client_id,
        session_id,
        rights: shared_rights,
        control,
        undelivered,
        released_tx,
        codec: reply.codec,
        limits: reply.limits,
    })
}

/// Runs an open session whose CONNACK was written (`connacked`) until it ends, then fires its
/// will if the end calls for it, releases its link and unregisters it. A plain function whose
/// `async move` block keeps each part of the session once (see [`connection`]).
fn run_session(
    shared: Arc<Shared>,
    admission: Arc<dyn Admission>,
    opened: Opened,
) -> impl std::future::Future<Output = ()> + Send {
    let Opened {
        session,
        will,
        connacked,
        keepalive,
        io: (mut reader, mut writer, buf),
    } = opened;
    let OpenSession {
        client_id,
        session_id,
        rights,
        control,
        undelivered,
        released_tx,
        codec,
        limits,
    } = session;
    let config = SessionConfig {
        client_id: client_id.clone(),
        version: codec.0,
        rights,
        limits,
        max_packet_size: shared.settings.max_packet_size,
        keepalive,
        cut_grace: shared.settings.cut_grace,
    };
    let mut pump = Pump {
        shared: shared.clone(),
        admission: admission.clone(),
        client_id: client_id.clone(),
        session_id,
        undelivered,
        link_tx: None,
        link_rx: None,
        session: Session::new(config, now()),
    };
    if connacked {
        shared.metrics.connect_admitted();
    }
    // Captured as they are (rebinding them inside would keep each twice).
    async move {
        let end = if connacked {
            // Boxed: rustc lays the pump's future out beside this function's other states
            // instead of over them (BENCHMARKS.md has the sizes, logged at debug under
            // `fleet_broker::memory`).
            log_size_once(&SIZE_OF_SESSION, "pump and session state", &pump);
            let run = Box::pin(pump.run(&mut reader, &mut writer, buf, &control));
            log_size_once(&SIZE_OF_PUMP, "session pump (boxed)", &*run);
            run.await
        } else {
            End::Unclean
        };
        // Nothing more is taken: deliveries from now on say so (`SessionControl::deliver`).
        control.close();
        debug!(client_id = %client_id, ?end, "session ended");
        let _ = Box::pin(timeout(Duration::from_secs(1), writer.shutdown())).await;

        // Built in the call, not as a local: a local would be kept in this future beside the
        // boxed one (344 bytes more per session).
        Box::pin(wind_up(
            &shared,
            &admission,
            Ended {
                client_id: &client_id,
                session_id,
                will: will.filter(|_| end.fires_will()),
                // A link the router already dropped is not released again.
                link: pump.link_tx.take().map(|link| (link, end != End::LinkGone)),
                released_tx,
            },
        ))
        .await;
    }
}

/// A session whose pump is over (or never ran), for [`wind_up`].
struct Ended<'a> {
    client_id: &'a str,
    session_id: u64,
    /// Its will, if the way it ended fires it.
    will: Option<Will>,
    /// Its router link, if it built one, and whether to release it.
    link: Option<(LinkTx, bool)>,
    released_tx: tokio::sync::oneshot::Sender<()>,
}

/// What every session's end does once its pump is over, in order: its will, its router link
/// released, the session taking it over (if any) let go, then it is unregistered and the
/// admission told.
async fn wind_up(shared: &Arc<Shared>, admission: &Arc<dyn Admission>, ended: Ended<'_>) {
    let Ended {
        client_id,
        session_id,
        will,
        link,
        released_tx,
    } = ended;
    if let Some(will) = will {
        Box::pin(fire_will(
            shared.clone(),
            admission.clone(),
            client_id,
            session_id,
            will,
        ))
        .await;
    }
    if let Some((mut link_tx, release)) = link {
        if release {
            Box::pin(release_link(&mut link_tx)).await;
        }
        shared.router_links.fetch_sub(1, Ordering::Relaxed);
    }
    // A session that took this one over may build its link now.
    drop(released_tx);
    shared.registry.unregister(client_id, session_id);
    closed(admission, client_id, session_id).await;
}

/// Tells the admission a session ended: here if it can take that without waiting, else on
/// the blocking pool: its synchronous calls may wait for the controller's lock, which a batch
/// holds across its commit (an fsync), and must not hold an async worker meanwhile.
async fn closed(admission: &Arc<dyn Admission>, client_id: &str, session_id: u64) {
    if admission.try_session_closed(client_id, session_id) {
        return;
    }
    let (client_id, admission) = (client_id.to_owned(), Arc::clone(admission));
    let _ =
        tokio::task::spawn_blocking(move || admission.session_closed(&client_id, session_id)).await;
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
struct Reply<'m> {
    codec: Codec,
    write_timeout: Duration,
    limits: ClientLimits,
    /// Where refusals are counted.
    metrics: &'m Metrics,
}

impl Reply<'_> {
    /// Answers with the refusal's CONNACK and closes the connection.
    async fn refuse(&self, writer: &mut WriteHalf<TlsStream>, refusal: Refusal, reason: &str) {
        self.metrics
            .connect_refused(RefusedConnect::Refusal(refusal));
        let connack = frame::refusal_connack(self.codec.0, refusal, reason);
        self.close_with(writer, connack).await;
    }

    /// Refuses a CONNECT that the standard does not allow here with `connack`, and closes.
    async fn protocol_error(&self, writer: &mut WriteHalf<TlsStream>, connack: Packet) {
        self.metrics.connect_refused(RefusedConnect::ProtocolError);
        self.close_with(writer, connack).await;
    }

    /// Writes a refusing CONNACK and closes.
    async fn close_with(&self, writer: &mut WriteHalf<TlsStream>, connack: Packet) {
        let _ = self.write(writer, connack).await;
        let _ = writer.shutdown().await;
    }

    /// Writes a packet within the client's Maximum Packet Size ([`write_packet_within`]).
    async fn write(&self, writer: &mut WriteHalf<TlsStream>, packet: Packet) -> Result<(), String> {
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
    writer: &mut WriteHalf<TlsStream>,
    codec: Codec,
    peer: SocketAddr,
    violation: frame::Violation,
) {
    info!(%peer, "refused: {violation}");
    admission.refused("-", peer, &violation.to_string());
    shared
        .metrics
        .connect_refused(RefusedConnect::ProtocolError);
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

/// The I/O shell of one session: moves bytes between the socket, the router link, the
/// registry's control channel and the admission's inbox, and drives the [`Session`], which
/// holds every MQTT rule.
struct Pump {
    shared: Arc<Shared>,
    /// Takes the session's inbox messages ([`Rights::inbox`]).
    admission: Arc<dyn Admission>,
    client_id: String,
    session_id: u64,
    /// Messages queued to this session by the registry and not taken yet.
    undelivered: registry::Undelivered,
    /// The session's link into the router, built on its first need ([`Pump::router_link`]):
    /// a device that only speaks to the controller never gets one.
    link_tx: Option<LinkTx>,
    /// The link's receiving side, polled by [`Pump::run`] while there is a link.
    link_rx: Option<LinkRx>,
    session: Session,
}

impl Pump {
    async fn run(
        &mut self,
        reader: &mut ReadHalf<TlsStream>,
        writer: &mut WriteHalf<TlsStream>,
        mut buf: BytesMut,
        control: &registry::ControlQueue,
    ) -> End {
        let mut shutdown = self.shared.shutdown.clone();
        // Frames that arrived together with the CONNECT.
        self.session.handle_client(&mut buf, now());
        loop {
            if let Some(end) = self.carry_out(&mut buf, writer).await {
                return end;
            }
            fit_read_buffer(&mut buf);
            let deadline = Instant::from_std(self.session.poll_timeout());
            // No branch awaits: what a branch got (a router notification is some 800 bytes)
            // would be kept across that await in the state of every idle session.
            let mut unscheduled = false;
            tokio::select! {
                read = reader.read_buf(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => return End::Unclean,
                        Ok(_) => self.session.handle_client(&mut buf, now()),
                    }
                }
                next = from_router(&mut self.link_rx) => match next {
                    Ok(Some(Notification::Unschedule)) => unscheduled = true,
                    Ok(Some(notification)) => self.session.handle_router(notification),
                    Ok(None) => {}
                    Err(_) => return End::LinkGone,
                },
                c = control.recv() => {
                    if let Control::Deliver { payload, .. } = &c {
                        self.undelivered.taken(payload.len());
                    }
                    self.session.handle_control(c, now());
                }
                _ = sleep_until(deadline) => self.session.handle_timeout(now()),
                _ = shutdown.changed() => self.session.shutdown(),
            }
            // The router stopped sending until told the link is ready again (rare, boxed).
            if unscheduled {
                let woken = match &self.link_rx {
                    Some(link_rx) => Box::pin(link_rx.wake()).await.is_ok(),
                    None => false,
                };
                if !woken {
                    return End::LinkGone;
                }
            }
        }
    }

    /// Carries out the session's actions, in order; `Some` once it has ended.
    async fn carry_out(
        &mut self,
        buf: &mut BytesMut,
        writer: &mut WriteHalf<TlsStream>,
    ) -> Option<End> {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Write(bytes) => {
                    let written =
                        write_raw(writer, &bytes, self.shared.settings.write_timeout).await;
                    if let Err(e) = written {
                        debug!(client_id = %self.client_id, "{e}");
                        return Some(End::Unclean);
                    }
                }
                Action::Inbox { topic, payload } => {
                    let handled = self
                        .admission
                        .message(&self.client_id, self.session_id, topic, payload)
                        .await;
                    self.session.inbox_done(handled);
                    self.session.resume(buf);
                }
                Action::Router(packet) => {
                    if matches!(*packet, Packet::Publish(..) | Packet::Subscribe(..))
                        && !self.router_link().await
                    {
                        self.session.router_unavailable();
                        continue;
                    }
                    if let Some(link_tx) = self.link_tx.as_mut() {
                        if link_tx.send(*packet).await.is_err() {
                            return Some(End::LinkGone);
                        }
                    }
                }
                Action::End(end) => return Some(end),
            }
        }
        None
    }

    /// Builds the session's router link if it has none: before its first PUBLISH or SUBSCRIBE
    /// that the router must see (one to its inbox or mailboxes never needs it). False: the
    /// router cannot take it.
    async fn router_link(&mut self) -> bool {
        if self.link_tx.is_some() {
            return true;
        }
        match build_link(&self.shared.links, self.client_id.clone()).await {
            Ok((link_tx, link_rx, notification)) => {
                // The router's CONNACK is a success; what it says of the session (topic
                // aliases) is not what the front door offers.
                drop(notification);
                self.link_tx = Some(link_tx);
                self.link_rx = Some(link_rx);
                self.shared.router_links.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                warn!(client_id = %client_id_for_log(&self.client_id), "router refused the link: {e}");
                false
            }
        }
    }
}

/// The pump's clock, for the session (tokio's, so that paused-time tests can move it).
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// The next notification of the session's router link; pending forever while it has none.
async fn from_router(link_rx: &mut Option<LinkRx>) -> Result<Option<Notification>, LinkError> {
    match link_rx {
        Some(link_rx) => link_rx.next().await,
        None => std::future::pending().await,
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

    #[test]
    fn a_kept_will_holds_copies_not_the_read_buffer_it_came_in() {
        let packet = bytes::Bytes::from(vec![b'x'; READ_CHUNK]);
        let inside = |b: &bytes::Bytes| packet.as_ptr_range().contains(&b.as_ptr());
        let will = LastWill {
            topic: packet.slice(0..4),
            message: packet.slice(4..8),
            qos: rumqttd::protocol::QoS::AtLeastOnce,
            retain: false,
        };
        let props = LastWillProperties {
            delay_interval: None,
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: Some(packet.slice(8..12)),
            user_properties: vec![],
        };
        let rights = Rights {
            publish: vec!["xxxx".into()],
            ..Rights::default()
        };
        let kept = will_within(Some(will), Some(props), &rights).expect("within the rights");
        assert!(!inside(&kept.topic) && !inside(&kept.payload));
        let data = kept.properties.and_then(|p| p.correlation_data);
        assert!(data.is_some_and(|d| !inside(&d)));
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
