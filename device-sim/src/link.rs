//! The simulator's own MQTT 3.1.1 connection over TLS, for stations and phones alike: TCP from
//! a chosen local source address (to play a device behind a given IP, which rumqttc cannot),
//! whole packets in and out, every wait bounded.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::QoS;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    /// The server sent bytes that are not MQTT 3.1.1, or a packet that makes no sense here.
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

/// Encodes one packet.
pub fn encode(packet: &Packet) -> Result<BytesMut, LinkError> {
    let mut buffer = BytesMut::new();
    packet
        .write(&mut buffer, MAX_PACKET_SIZE)
        .map_err(|e| LinkError::Protocol(e.to_string()))?;
    Ok(buffer)
}

/// Decodes the first whole packet of `buffer` and removes it; `None` if more bytes are needed.
pub fn decode(buffer: &mut BytesMut) -> Result<Option<Packet>, LinkError> {
    match Packet::read(buffer, MAX_PACKET_SIZE) {
        Ok(packet) => Ok(Some(packet)),
        Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(LinkError::Protocol(e.to_string())),
    }
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

/// One MQTT 3.1.1 connection over TLS.
pub(crate) struct Link {
    server: String,
    stream: TlsStream<TcpStream>,
    incoming: BytesMut,
    next_pkid: u16,
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
        let tcp = tcp_connect(server, source).await?;
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

    /// The next packet within [`REPLY_TIMEOUT`].
    async fn recv_within(&mut self, waiting_for: &'static str) -> Result<Packet, LinkError> {
        within(REPLY_TIMEOUT, waiting_for, self.recv(waiting_for)).await?
    }

    /// Sends CONNECT and returns the CONNACK's return code.
    pub(crate) async fn connect(
        &mut self,
        connect: Connect,
    ) -> Result<ConnectReturnCode, LinkError> {
        self.send(&Packet::Connect(connect)).await?;
        match self.recv_within("CONNACK").await? {
            Packet::ConnAck(ConnAck { code, .. }) => Ok(code),
            other => Err(unexpected("CONNACK", &other)),
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
