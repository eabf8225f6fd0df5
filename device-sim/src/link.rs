//! The simulator's own MQTT connection over TLS, for stations and phones alike: TCP from a
//! chosen local source address (to play a device behind a given IP, which rumqttc cannot),
//! whole packets in and out, every wait bounded. The wire is MQTT 5, so that a refusing CONNACK
//! says why (its Reason String); the simulator itself thinks in the packets of rumqttc's 3.1.1
//! codec, which [`encode`] and [`decode`] translate to and from MQTT 5 (they need none of 5's
//! features).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Longest wait for the TCP connection.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for any one reply (CONNACK, SUBACK, PUBACK, a response); long enough for a
/// server onboarding thousands of devices at once.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a write to the server.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest MQTT packet accepted or sent: a 16 KiB firmware chunk is about 22 KB as base64 in
/// JSON.
const MAX_PACKET_SIZE: usize = 1024 * 1024;

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The server address is not `HOST:PORT`, or HOST is not a TLS server name.
    #[error("server address {0:?} is not HOST:PORT")]
    InvalidServer(String),
    /// The server's name resolved to no address of the source address's family.
    #[error("{server} has no address reachable from {source_ip}")]
    NoAddress {
        /// The server address.
        server: String,
        /// The local source address.
        source_ip: IpAddr,
    },
    /// The TCP connection or the TLS handshake failed, or the connection broke.
    #[error("connection to {server}: {source}")]
    Connection {
        /// The server address.
        server: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server closed (or reset) the connection before the TLS handshake was done, as
    /// fleetd does, before any TLS work, with a connection from an address past its
    /// connection rate or its share of unfinished handshakes.
    #[error("{server} closed the connection before TLS: {source}")]
    ClosedBeforeTls {
        /// The server address.
        server: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The server closed the connection while the client waited for `waiting_for`.
    #[error("the server closed the connection while the client waited for {waiting_for}")]
    Closed {
        /// What the client waited for.
        waiting_for: &'static str,
    },
    /// Nothing came within the time limit.
    #[error("no {waiting_for} within {limit:?}")]
    Timeout {
        /// What the client waited for.
        waiting_for: &'static str,
        /// The time limit.
        limit: Duration,
    },
    /// The server sent bytes that are not MQTT 5, or a packet that makes no sense here.
    #[error("MQTT protocol: {0}")]
    Protocol(String),
}

impl LinkError {
    /// The server went away: it closed or reset the connection.
    pub fn is_closed_by_server(&self) -> bool {
        match self {
            LinkError::Closed { .. } | LinkError::ClosedBeforeTls { .. } => true,
            // A TLS close without close_notify, or a reset, is the server going away too.
            LinkError::Connection { source, .. } => is_a_close(source),
            _ => false,
        }
    }
}

fn is_a_close(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// Encodes one packet, as MQTT 5.
pub fn encode(packet: &Packet) -> Result<BytesMut, LinkError> {
    let mut buffer = BytesMut::new();
    if *packet == Packet::Disconnect {
        // Normal disconnection, with its reason code and an empty property length written out:
        // rumqttc's MQTT 5 decoder (and rumqttd's, its kin) refuses the short forms that MQTT 5
        // allows.
        buffer.extend_from_slice(&[0xe0, 2, 0, 0]);
        return Ok(buffer);
    }
    to_v5(packet)?
        .write(&mut buffer, Some(MAX_PACKET_SIZE as u32))
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    Ok(buffer)
}

/// Decodes the first whole MQTT 5 packet of `buffer` and removes it; `None` if more bytes are
/// needed.
pub fn decode(buffer: &mut BytesMut) -> Result<Option<Packet>, LinkError> {
    Ok(decode_with_reason(buffer)?.map(|(packet, _)| packet))
}

/// [`decode`], with the Reason String of a CONNACK or DISCONNECT if it has one.
fn decode_with_reason(
    buffer: &mut BytesMut,
) -> Result<Option<(Packet, Option<String>)>, LinkError> {
    if let [0xe0, length @ (0 | 1), ..] = buffer[..] {
        // The short forms of a DISCONNECT (no reason code, or no properties), which rumqttc's
        // decoder refuses.
        if buffer.len() < 2 + usize::from(length) {
            return Ok(None);
        }
        let _ = buffer.split_to(2 + usize::from(length));
        return Ok(Some((Packet::Disconnect, None)));
    }
    match v5::Packet::read(buffer, Some(MAX_PACKET_SIZE as u32)) {
        Ok(packet) => from_v5(packet).map(Some),
        Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(LinkError::Protocol(e.to_string())),
    }
}

fn qos_to_v5(qos: QoS) -> QoS5 {
    match qos {
        QoS::AtMostOnce => QoS5::AtMostOnce,
        QoS::AtLeastOnce => QoS5::AtLeastOnce,
        QoS::ExactlyOnce => QoS5::ExactlyOnce,
    }
}

fn qos_from_v5(qos: QoS5) -> QoS {
    match qos {
        QoS5::AtMostOnce => QoS::AtMostOnce,
        QoS5::AtLeastOnce => QoS::AtLeastOnce,
        QoS5::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// The MQTT 5 form of a packet the simulator (or a test's fake server) sends.
fn to_v5(packet: &Packet) -> Result<v5::Packet, LinkError> {
    use rumqttc::mqttbytes::v4::ConnectReturnCode as C4;
    use rumqttc::mqttbytes::v4::SubscribeReasonCode as S4;
    Ok(match packet {
        Packet::Connect(c) => v5::Packet::Connect(
            v5::Connect {
                keep_alive: c.keep_alive,
                client_id: c.client_id.clone(),
                clean_start: c.clean_session,
                properties: None,
            },
            c.last_will.as_ref().map(|w| v5::LastWill {
                topic: Bytes::copy_from_slice(w.topic.as_bytes()),
                message: w.message.clone(),
                qos: qos_to_v5(w.qos),
                retain: w.retain,
                properties: None,
            }),
            c.login
                .as_ref()
                .map(|l| v5::Login::new(l.username.clone(), l.password.clone())),
        ),
        Packet::ConnAck(ack) => v5::Packet::ConnAck(v5::ConnAck {
            session_present: ack.session_present,
            code: match ack.code {
                C4::Success => v5::ConnectReturnCode::Success,
                C4::RefusedProtocolVersion => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                C4::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                C4::ServiceUnavailable => v5::ConnectReturnCode::ServerUnavailable,
                C4::BadUserNamePassword => v5::ConnectReturnCode::BadUserNamePassword,
                C4::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: None,
        }),
        Packet::Publish(p) => v5::Packet::Publish(v5::Publish {
            dup: p.dup,
            qos: qos_to_v5(p.qos),
            retain: p.retain,
            topic: Bytes::copy_from_slice(p.topic.as_bytes()),
            pkid: p.pkid,
            payload: p.payload.clone(),
            properties: None,
        }),
        Packet::PubAck(ack) => v5::Packet::PubAck(v5::PubAck::new(ack.pkid, None)),
        Packet::Subscribe(sub) => v5::Packet::Subscribe(v5::Subscribe {
            pkid: sub.pkid,
            filters: sub
                .filters
                .iter()
                .map(|f| v5::Filter::new(f.path.clone(), qos_to_v5(f.qos)))
                .collect(),
            properties: None,
        }),
        Packet::SubAck(ack) => v5::Packet::SubAck(v5::SubAck {
            pkid: ack.pkid,
            return_codes: ack
                .return_codes
                .iter()
                .map(|code| match code {
                    S4::Success(qos) => v5::SubscribeReasonCode::Success(qos_to_v5(*qos)),
                    S4::Failure => v5::SubscribeReasonCode::NotAuthorized,
                })
                .collect(),
            properties: None,
        }),
        Packet::PingReq => v5::Packet::PingReq(v5::PingReq),
        Packet::PingResp => v5::Packet::PingResp(v5::PingResp),
        Packet::Disconnect => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: v5::DisconnectReasonCode::NormalDisconnection,
            properties: None,
        }),
        other => {
            return Err(LinkError::Protocol(format!(
                "not sent by the simulator: {other:?}"
            )))
        }
    })
}

/// The simulator's form of an MQTT 5 packet, with a CONNACK's or DISCONNECT's Reason String.
fn from_v5(packet: v5::Packet) -> Result<(Packet, Option<String>), LinkError> {
    use rumqttc::mqttbytes::v4::{LastWill, Login, SubAck, SubscribeReasonCode as S4};
    let text = |bytes: &Bytes| {
        String::from_utf8(bytes.to_vec())
            .map_err(|_| LinkError::Protocol("a topic that is not UTF-8".into()))
    };
    Ok(match packet {
        v5::Packet::ConnAck(ack) => {
            let code = match ack.code {
                v5::ConnectReturnCode::Success => ConnectReturnCode::Success,
                v5::ConnectReturnCode::RefusedProtocolVersion
                | v5::ConnectReturnCode::UnsupportedProtocolVersion => {
                    ConnectReturnCode::RefusedProtocolVersion
                }
                v5::ConnectReturnCode::BadClientId
                | v5::ConnectReturnCode::ClientIdentifierNotValid => ConnectReturnCode::BadClientId,
                v5::ConnectReturnCode::BadUserNamePassword => {
                    ConnectReturnCode::BadUserNamePassword
                }
                v5::ConnectReturnCode::ServiceUnavailable
                | v5::ConnectReturnCode::ServerUnavailable
                | v5::ConnectReturnCode::ServerBusy
                | v5::ConnectReturnCode::QuotaExceeded
                | v5::ConnectReturnCode::ConnectionRateExceeded => {
                    ConnectReturnCode::ServiceUnavailable
                }
                _ => ConnectReturnCode::NotAuthorized,
            };
            let reason = ack.properties.and_then(|p| p.reason_string);
            (
                Packet::ConnAck(ConnAck::new(code, ack.session_present)),
                reason,
            )
        }
        v5::Packet::Publish(p) => {
            let mut publish = Publish::from_bytes(text(&p.topic)?, qos_from_v5(p.qos), p.payload);
            publish.dup = p.dup;
            publish.retain = p.retain;
            publish.pkid = p.pkid;
            (Packet::Publish(publish), None)
        }
        v5::Packet::PubAck(ack) => (Packet::PubAck(PubAck::new(ack.pkid)), None),
        v5::Packet::SubAck(ack) => {
            let codes = ack
                .return_codes
                .into_iter()
                .map(|code| match code {
                    v5::SubscribeReasonCode::Success(qos) => S4::Success(qos_from_v5(qos)),
                    _ => S4::Failure,
                })
                .collect();
            (Packet::SubAck(SubAck::new(ack.pkid, codes)), None)
        }
        v5::Packet::PingReq(_) => (Packet::PingReq, None),
        v5::Packet::PingResp(_) => (Packet::PingResp, None),
        v5::Packet::Disconnect(d) => (
            Packet::Disconnect,
            d.properties.and_then(|p| p.reason_string),
        ),
        v5::Packet::Connect(c, will, login) => {
            let mut connect = Connect::new(c.client_id);
            connect.keep_alive = c.keep_alive;
            connect.clean_session = c.clean_start;
            if let Some(w) = will {
                let mut will =
                    LastWill::new(text(&w.topic)?, w.message, qos_from_v5(w.qos), w.retain);
                will.retain = w.retain;
                connect.last_will = Some(will);
            }
            connect.login = login.map(|l| Login::new(l.username, l.password));
            (Packet::Connect(connect), None)
        }
        v5::Packet::Subscribe(sub) => {
            let filters: Vec<_> = sub
                .filters
                .into_iter()
                .map(|f| rumqttc::mqttbytes::v4::SubscribeFilter::new(f.path, qos_from_v5(f.qos)))
                .collect();
            let mut subscribe = Subscribe::new_many(filters);
            subscribe.pkid = sub.pkid;
            (Packet::Subscribe(subscribe), None)
        }
        other => return Err(LinkError::Protocol(format!("unexpected {other:?}"))),
    })
}

/// The number of a CONNACK return code (0 accepted, 4 bad user name or password, 5 not
/// authorized, …).
pub fn return_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0,
        ConnectReturnCode::RefusedProtocolVersion => 1,
        ConnectReturnCode::BadClientId => 2,
        ConnectReturnCode::ServiceUnavailable => 3,
        ConnectReturnCode::BadUserNamePassword => 4,
        ConnectReturnCode::NotAuthorized => 5,
    }
}

/// Opens a TCP connection to `server` (`HOST:PORT`), from `source` if given (port chosen by the
/// system), with a time limit.
pub async fn tcp_connect(server: &str, source: Option<IpAddr>) -> Result<TcpStream, LinkError> {
    let (host, port) = fleet_certs::split_server(server)
        .ok_or_else(|| LinkError::InvalidServer(server.to_owned()))?;
    let connection_error = |source| LinkError::Connection {
        server: server.to_owned(),
        source,
    };
    let attempt = async {
        let addresses = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(connection_error)?;
        let mut last_error = None;
        for address in addresses {
            if source.is_some_and(|s| s.is_ipv4() != address.is_ipv4()) {
                continue;
            }
            match connect_from(address, source).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last_error = Some(e),
            }
        }
        Err(match (last_error, source) {
            (Some(e), _) => connection_error(e),
            (None, Some(source_ip)) => LinkError::NoAddress {
                server: server.to_owned(),
                source_ip,
            },
            (None, None) => connection_error(io::Error::new(
                io::ErrorKind::NotFound,
                "the name resolved to no address",
            )),
        })
    };
    within(TCP_TIMEOUT, "TCP connection", attempt).await?
}

/// What `future` gives, or [`LinkError::Timeout`] once `limit` has passed.
pub async fn within<T>(
    limit: Duration,
    waiting_for: &'static str,
    future: impl std::future::Future<Output = T>,
) -> Result<T, LinkError> {
    tokio::time::timeout(limit, future)
        .await
        .map_err(|_| LinkError::Timeout { waiting_for, limit })
}

async fn connect_from(address: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(source) = source {
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(address).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One MQTT connection over TLS (MQTT 5 on the wire).
pub(crate) struct Link {
    server: String,
    stream: TlsStream<Socket>,
    incoming: BytesMut,
    next_pkid: u16,
}

/// The TCP connection under a link's TLS, which can be handed from the runtime that opened it
/// to another ([`Link::detach`], [`Link::attach`]): the load tool opens its stations'
/// connections on a runtime of their own, so that the handshakes in flight do not queue before
/// the connected stations' reads (whose latencies it measures).
enum Socket {
    /// Registered with the current runtime's reactor.
    Live(TcpStream),
    /// Between runtimes: registered with none, so it can be neither read nor written.
    Detached(std::net::TcpStream),
    /// Failed to move: closed.
    Gone,
}

impl Socket {
    fn live(&mut self) -> io::Result<Pin<&mut TcpStream>> {
        match self {
            Socket::Live(tcp) => Ok(Pin::new(tcp)),
            Socket::Detached(_) | Socket::Gone => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the connection is not on this runtime",
            )),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(tcp) => tcp.poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().live() {
            Ok(tcp) => tcp.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().live() {
            Ok(tcp) => tcp.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, Socket::Live(tcp) if tcp.is_write_vectored())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(tcp) => tcp.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(tcp) => tcp.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl Link {
    /// TCP to `server` (from `source` if given), then TLS with `tls` (which trusts the fleet CA
    /// and may present the device's certificate); the handshake within `limit`.
    pub(crate) async fn open(
        server: &str,
        source: Option<IpAddr>,
        tls: Arc<rustls::ClientConfig>,
        limit: Duration,
    ) -> Result<Link, LinkError> {
        let (host, _) = fleet_certs::split_server(server)
            .ok_or_else(|| LinkError::InvalidServer(server.to_owned()))?;
        let name =
            ServerName::try_from(host).map_err(|_| LinkError::InvalidServer(server.to_owned()))?;
        let tcp = Socket::Live(tcp_connect(server, source).await?);
        let handshake = TlsConnector::from(tls).connect(name, tcp);
        let stream = within(limit, "TLS handshake", handshake)
            .await?
            .map_err(|source| {
                let server = server.to_owned();
                if is_a_close(&source) {
                    LinkError::ClosedBeforeTls { server, source }
                } else {
                    LinkError::Connection { server, source }
                }
            })?;
        Ok(Link {
            server: server.to_owned(),
            stream,
            incoming: BytesMut::with_capacity(4096),
            next_pkid: 1,
        })
    }

    /// The server address.
    pub(crate) fn server(&self) -> &str {
        &self.server
    }

    /// Takes the connection off the current runtime's reactor, to [`attach`](Link::attach) it
    /// to another; until then it can be neither read nor written. Bytes already read and the
    /// TLS state stay with the link.
    pub(crate) fn detach(&mut self) -> Result<(), LinkError> {
        let socket = self.stream.get_mut().0;
        *socket = match std::mem::replace(socket, Socket::Gone) {
            Socket::Live(tcp) => {
                Socket::Detached(tcp.into_std().map_err(|source| LinkError::Connection {
                    server: self.server.clone(),
                    source,
                })?)
            }
            other => other,
        };
        Ok(())
    }

    /// Registers a [detached](Link::detach) connection with the current runtime's reactor;
    /// must be called within a tokio runtime.
    pub(crate) fn attach(&mut self) -> Result<(), LinkError> {
        let socket = self.stream.get_mut().0;
        *socket = match std::mem::replace(socket, Socket::Gone) {
            Socket::Detached(tcp) => {
                Socket::Live(
                    TcpStream::from_std(tcp).map_err(|source| LinkError::Connection {
                        server: self.server.clone(),
                        source,
                    })?,
                )
            }
            other => other,
        };
        Ok(())
    }

    /// A packet id for the next QoS 1 packet (1 to 65535, then round again).
    pub(crate) fn pkid(&mut self) -> u16 {
        let pkid = self.next_pkid;
        self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
        pkid
    }

    /// Writes `packets`, in order, in one go.
    pub(crate) async fn send_all(&mut self, packets: &[Packet]) -> Result<(), LinkError> {
        let mut bytes = BytesMut::new();
        for packet in packets {
            bytes.extend_from_slice(&encode(packet)?);
        }
        let write = async {
            self.stream.write_all(&bytes).await?;
            self.stream.flush().await
        };
        within(WRITE_TIMEOUT, "write to the server", write)
            .await?
            .map_err(|source| LinkError::Connection {
                server: self.server.clone(),
                source,
            })
    }

    pub(crate) async fn send(&mut self, packet: &Packet) -> Result<(), LinkError> {
        self.send_all(std::slice::from_ref(packet)).await
    }

    /// The next packet, without a time limit. Cancel-safe: bytes read stay in `incoming`.
    pub(crate) async fn recv(&mut self, waiting_for: &'static str) -> Result<Packet, LinkError> {
        loop {
            if let Some(packet) = decode(&mut self.incoming)? {
                return Ok(packet);
            }
            let read = self
                .stream
                .read_buf(&mut self.incoming)
                .await
                .map_err(|source| LinkError::Connection {
                    server: self.server.clone(),
                    source,
                })?;
            if read == 0 {
                return Err(LinkError::Closed { waiting_for });
            }
        }
    }

    /// Sends CONNECT and returns the CONNACK's return code, and its Reason String if it has one
    /// (fleetd says why it refused).
    pub(crate) async fn connect(
        &mut self,
        connect: Connect,
    ) -> Result<(ConnectReturnCode, Option<String>), LinkError> {
        self.send(&Packet::Connect(connect)).await?;
        let waiting_for = "CONNACK";
        let read = async {
            loop {
                if let Some(packet) = decode_with_reason(&mut self.incoming)? {
                    return Ok(packet);
                }
                let read = self
                    .stream
                    .read_buf(&mut self.incoming)
                    .await
                    .map_err(|source| LinkError::Connection {
                        server: self.server.clone(),
                        source,
                    })?;
                if read == 0 {
                    return Err(LinkError::Closed { waiting_for });
                }
            }
        };
        match within(REPLY_TIMEOUT, waiting_for, read).await?? {
            (Packet::ConnAck(ConnAck { code, .. }), reason) => Ok((code, reason)),
            (other, _) => Err(unexpected(waiting_for, &other)),
        }
    }

    /// Acknowledges a QoS 1 PUBLISH from the server.
    pub(crate) async fn acknowledge(&mut self, publish: &Publish) -> Result<(), LinkError> {
        if publish.qos == QoS::AtLeastOnce {
            self.send(&Packet::PubAck(PubAck::new(publish.pkid)))
                .await?;
        }
        Ok(())
    }

    /// Reads packets until `done` picks one, within [`REPLY_TIMEOUT`] in all. PUBLISHes that
    /// `done` does not pick are acknowledged and kept in `inbox`; ping responses are dropped.
    pub(crate) async fn wait_for<T>(
        &mut self,
        waiting_for: &'static str,
        inbox: &mut Vec<Publish>,
        mut done: impl FnMut(&Packet) -> Option<T>,
    ) -> Result<T, LinkError> {
        let wait = async {
            loop {
                let packet = self.recv(waiting_for).await?;
                if let Some(found) = done(&packet) {
                    if let Packet::Publish(publish) = &packet {
                        self.acknowledge(publish).await?;
                    }
                    return Ok(found);
                }
                match packet {
                    Packet::Publish(publish) => {
                        self.acknowledge(&publish).await?;
                        inbox.push(publish);
                    }
                    Packet::PingResp | Packet::PubAck(_) | Packet::SubAck(_) => {}
                    Packet::Disconnect => return Err(LinkError::Closed { waiting_for }),
                    other => return Err(unexpected(waiting_for, &other)),
                }
            }
        };
        within(REPLY_TIMEOUT, waiting_for, wait).await?
    }

    /// SUBSCRIBE one filter at QoS 1; the SUBACK code (0, 1, 2 granted QoS; 0x80 denied).
    pub(crate) async fn subscribe(
        &mut self,
        filter: &str,
        inbox: &mut Vec<Publish>,
    ) -> Result<u8, LinkError> {
        let pkid = self.pkid();
        let mut subscribe = Subscribe::new(filter, QoS::AtLeastOnce);
        subscribe.pkid = pkid;
        self.send(&Packet::Subscribe(subscribe)).await?;
        self.wait_for("SUBACK", inbox, |packet| match packet {
            Packet::SubAck(ack) if ack.pkid == pkid => Some(
                ack.return_codes
                    .first()
                    .map_or(0x80, |code| suback_code(*code)),
            ),
            _ => None,
        })
        .await
    }

    /// PUBLISH at QoS 1 and wait for its PUBACK.
    pub(crate) async fn publish(
        &mut self,
        topic: &str,
        payload: Bytes,
        inbox: &mut Vec<Publish>,
    ) -> Result<(), LinkError> {
        let pkid = self.pkid();
        let mut publish = Publish::from_bytes(topic, QoS::AtLeastOnce, payload);
        publish.pkid = pkid;
        self.send(&Packet::Publish(publish)).await?;
        self.wait_for("PUBACK", inbox, |packet| match packet {
            Packet::PubAck(ack) if ack.pkid == pkid => Some(()),
            _ => None,
        })
        .await
    }

    /// Closes the connection (after whatever was sent last, e.g. DISCONNECT); errors do not
    /// matter any more.
    pub(crate) async fn close(mut self) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, self.stream.shutdown()).await;
    }

    /// DISCONNECT and close.
    pub(crate) async fn disconnect(mut self) {
        let _ = self.send(&Packet::Disconnect).await;
        self.close().await;
    }
}

fn suback_code(code: rumqttc::mqttbytes::v4::SubscribeReasonCode) -> u8 {
    use rumqttc::mqttbytes::v4::SubscribeReasonCode;
    match code {
        SubscribeReasonCode::Success(QoS::AtMostOnce) => 0,
        SubscribeReasonCode::Success(QoS::AtLeastOnce) => 1,
        SubscribeReasonCode::Success(QoS::ExactlyOnce) => 2,
        SubscribeReasonCode::Failure => 0x80,
    }
}

fn unexpected(waiting_for: &str, packet: &Packet) -> LinkError {
    LinkError::Protocol(format!("expected {waiting_for}, got {packet:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_waits_for_whole_packets() {
        let mut publish = Publish::new("a/b", QoS::AtLeastOnce, vec![7u8; 300]);
        publish.pkid = 9;
        let whole = encode(&Packet::Publish(publish.clone())).unwrap();
        let mut partial = BytesMut::from(&whole[..whole.len() - 1]);
        assert_eq!(decode(&mut partial).unwrap(), None);
        partial.extend_from_slice(&whole[whole.len() - 1..]);
        assert_eq!(
            decode(&mut partial).unwrap(),
            Some(Packet::Publish(publish))
        );
        let mut garbage = BytesMut::from(&[0xf0u8, 0x00][..]);
        assert!(decode(&mut garbage).is_err());
    }

    #[test]
    fn the_wire_is_mqtt_5_and_a_refusal_says_why() {
        // fleetd's refusal: CONNACK 0x87 with the Reason String property (0x1F).
        let reason = "station rejected by an operator";
        let mut bytes = BytesMut::from(&[0x20, 0, 0, 0x87, 0, 0x1f, 0, reason.len() as u8][..]);
        bytes.extend_from_slice(reason.as_bytes());
        bytes[4] = (3 + reason.len()) as u8;
        bytes[1] = (bytes.len() - 2) as u8;
        let (packet, said) = decode_with_reason(&mut bytes).unwrap().unwrap();
        assert_eq!(
            packet,
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false))
        );
        assert_eq!(said.as_deref(), Some(reason));
        // A CONNECT goes out as protocol level 5, its will and login kept.
        let mut connect = Connect::new("sim-1");
        connect.last_will = Some(rumqttc::mqttbytes::v4::LastWill::new(
            "w",
            "gone",
            QoS::AtLeastOnce,
            false,
        ));
        connect.login = Some(rumqttc::mqttbytes::v4::Login::new("u", "p"));
        let mut wire = encode(&Packet::Connect(connect.clone())).unwrap();
        assert_eq!(&wire[2..9], b"\x00\x04MQTT\x05");
        assert_eq!(decode(&mut wire).unwrap(), Some(Packet::Connect(connect)));
        // DISCONNECT, in either form.
        let mut wire = encode(&Packet::Disconnect).unwrap();
        wire.extend_from_slice(&[0xe0, 0, 0xe0, 1, 0x8e]);
        for _ in 0..3 {
            assert_eq!(decode(&mut wire).unwrap(), Some(Packet::Disconnect));
        }
        assert!(wire.is_empty());
        // A SUBACK that denies reads as the 3.1.1 failure.
        let mut suback = BytesMut::from(&[0x90, 4, 0, 7, 0, 0x87][..]);
        let Some(Packet::SubAck(ack)) = decode(&mut suback).unwrap() else {
            panic!("a SUBACK");
        };
        assert_eq!(
            ack.return_codes,
            [rumqttc::mqttbytes::v4::SubscribeReasonCode::Failure]
        );
    }

    #[tokio::test]
    async fn tcp_connect_binds_the_chosen_source_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap().to_string();
        let source: IpAddr = "127.0.0.2".parse().unwrap();
        let (client, accepted) =
            tokio::join!(tcp_connect(&server, Some(source)), listener.accept());
        let client = client.unwrap();
        let (_, peer) = accepted.unwrap();
        assert_eq!(peer.ip(), source);
        assert_eq!(client.local_addr().unwrap().ip(), source);

        let (client, accepted) = tokio::join!(tcp_connect(&server, None), listener.accept());
        client.unwrap();
        assert_eq!(accepted.unwrap().1.ip(), IpAddr::from([127, 0, 0, 1]));

        assert!(matches!(
            tcp_connect("localhost", None).await,
            Err(LinkError::InvalidServer(_))
        ));
        assert!(matches!(
            tcp_connect(&server, Some("::1".parse().unwrap())).await,
            Err(LinkError::NoAddress { .. })
        ));
    }

    /// A link opened on one runtime, detached, and attached on another works there, also
    /// once the runtime that opened it is gone; between the two it refuses I/O with an error.
    #[tokio::test]
    async fn a_link_opened_on_a_dialer_runtime_moves_to_the_stations_runtime() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let ca = fleet_certs::FleetCa::generate("test CA").unwrap();
        let server_key = ca
            .issue_server(&["localhost".into()], &[IpAddr::from([127, 0, 0, 1])])
            .unwrap();
        let config = rustls::ServerConfig::builder_with_provider(fleet_certs::crypto_provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                fleet_certs::certs_from_pem(&server_key.cert_pem).unwrap(),
                fleet_certs::key_from_pem(&server_key.key_pem).unwrap(),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap().to_string();
        // The server answers one PINGREQ with a PINGRESP.
        let serving = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut ping = [0u8; 2];
            tls.read_exact(&mut ping).await.unwrap();
            assert_eq!(ping, [0xc0, 0]);
            tls.write_all(&[0xd0, 0]).await.unwrap();
            tls.flush().await.unwrap();
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest).await;
        });

        let dialer = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tls = Arc::new(fleet_certs::client_config(ca.cert_pem(), None).unwrap());
        let opened = dialer.spawn(async move {
            let mut link = Link::open(&server, None, tls, Duration::from_secs(10)).await?;
            link.detach()?;
            Ok::<_, LinkError>(link)
        });
        let mut link = opened.await.unwrap().unwrap();
        assert!(matches!(
            link.send(&Packet::PingReq).await,
            Err(LinkError::Connection { .. })
        ));
        dialer.shutdown_background();

        link.attach().unwrap();
        link.send(&Packet::PingReq).await.unwrap();
        assert_eq!(link.recv("PINGRESP").await.unwrap(), Packet::PingResp);
        drop(link);
        serving.await.unwrap();
    }

    #[tokio::test]
    async fn a_server_that_closes_before_tls_is_told_apart() {
        let ca = fleet_certs::FleetCa::generate("test CA").unwrap();
        let tls = Arc::new(fleet_certs::client_config(ca.cert_pem(), None).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap().to_string();
        // What fleetd's accept loop does past a per-address limit: accept, then close.
        let closer = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            drop(tcp);
        });
        let opened = Link::open(&server, None, tls, Duration::from_secs(10)).await;
        closer.await.unwrap();
        let error = opened.err().expect("no TLS without a server");
        assert!(
            matches!(error, LinkError::ClosedBeforeTls { .. }),
            "{error:?}"
        );
        assert!(error.is_closed_by_server());
        assert!(!LinkError::Protocol("x".into()).is_closed_by_server());
    }
}
