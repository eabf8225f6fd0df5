//! A bare MQTT client over TLS (3.1.1, and 5 where a test needs it), written frame by frame,
//! for tests that need what a stock library hides: the exact CONNACK code, a resumed TLS
//! session, a client that goes silent. Deliberately independent of fleet-broker's codec.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::{TestFleet, PATIENCE};

/// A will: topic, payload, retained.
pub struct Will<'a> {
    pub topic: &'a str,
    pub payload: &'a str,
    pub retain: bool,
}

/// Appends `n` as an MQTT variable byte integer (a remaining length, a property length).
pub fn vbi(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            break;
        }
    }
}

/// A length-prefixed string (or binary data).
pub fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

fn push_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(string(s));
}

/// A frame: its first byte, then the remaining length, then `body`.
pub fn frame(first: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![first];
    vbi(body.len(), &mut out);
    out.extend(body);
    out
}

/// An MQTT 3.1.1 CONNECT with a clean session.
pub fn connect_frame(client_id: &str, keepalive: u16, will: Option<&Will<'_>>) -> Vec<u8> {
    let mut flags = 0x02;
    if let Some(w) = will {
        flags |= 0x04 | 0x08; // will, QoS 1
        if w.retain {
            flags |= 0x20;
        }
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, flags];
    body.extend_from_slice(&keepalive.to_be_bytes());
    push_str(&mut body, client_id.as_bytes());
    if let Some(w) = will {
        push_str(&mut body, w.topic.as_bytes());
        push_str(&mut body, w.payload.as_bytes());
    }
    frame(0x10, body)
}

/// An MQTT 5 will: its properties, topic and payload.
pub struct WillV5<'a> {
    pub properties: &'a [u8],
    pub topic: &'a str,
    pub payload: &'a [u8],
}

/// An MQTT 5 CONNECT with Clean Start, `extra_flags` or-ed into its connect flags.
pub fn connect_v5_frame(
    client_id: &str,
    extra_flags: u8,
    keepalive: u16,
    props: &[u8],
    will: Option<&WillV5<'_>>,
) -> Vec<u8> {
    let mut flags = 0x02 | extra_flags;
    if will.is_some() {
        flags |= 0x04;
    }
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags];
    body.extend(keepalive.to_be_bytes());
    vbi(props.len(), &mut body);
    body.extend_from_slice(props);
    body.extend(string(client_id.as_bytes()));
    if let Some(w) = will {
        vbi(w.properties.len(), &mut body);
        body.extend_from_slice(w.properties);
        body.extend(string(w.topic.as_bytes()));
        body.extend(string(w.payload));
    }
    frame(0x10, body)
}

/// SUBSCRIBE packet id 1, one filter at QoS 1.
pub fn subscribe_frame(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    push_str(&mut body, filter.as_bytes());
    body.push(1);
    frame(0x82, body)
}

/// UNSUBSCRIBE packet id 2, one filter.
pub fn unsubscribe_frame(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 2];
    push_str(&mut body, filter.as_bytes());
    frame(0xa2, body)
}

/// A TLS connector with a device's key (`cert.pem`, `key.pem` of its state directory); it keeps TLS sessions, so
/// that a second connection resumes the first.
pub fn device_connector(fleet: &TestFleet, dir: &Path) -> TlsConnector {
    let cert = std::fs::read_to_string(dir.join("cert.pem")).expect("cert");
    let key = std::fs::read_to_string(dir.join("key.pem")).expect("key");
    let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
    TlsConnector::from(Arc::new(config))
}

/// A TLS connector without a client certificate.
pub fn anonymous_connector(fleet: &TestFleet) -> TlsConnector {
    let config = fleet_certs::client_config(&fleet.ca_pem(), None).expect("tls");
    TlsConnector::from(Arc::new(config))
}

pub async fn tls(connector: &TlsConnector, port: u16) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

/// Sends `connect` and returns the CONNACK return code; the stream stays open for more.
pub async fn connack(stream: &mut TlsStream<TcpStream>, connect: &[u8]) -> u8 {
    stream.write_all(connect).await.expect("write");
    let mut connack = [0u8; 4];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut connack))
        .await
        .expect("connack in time")
        .expect("connack");
    assert_eq!(connack[0], 0x20, "CONNACK");
    connack[3]
}

/// Connects with a clean session, keepalive 60 and no will; returns the CONNACK code.
pub async fn connect(stream: &mut TlsStream<TcpStream>, client_id: &str) -> u8 {
    connack(stream, &connect_frame(client_id, 60, None)).await
}

/// An MQTT 5 CONNECT with Clean Start, keepalive 60 and no properties; returns the CONNACK's
/// reason code and its Reason String (empty if none). The stream stays open for more.
pub async fn connect_v5(stream: &mut TlsStream<TcpStream>, client_id: &str) -> (u8, String) {
    stream
        .write_all(&connect_v5_frame(client_id, 0, 60, &[], None))
        .await
        .expect("write");
    connack_v5(stream).await
}

/// Reads a variable byte integer (MQTT 5 §1.5.5) from `bytes` at `*at`, moving `at` past it.
pub fn read_vbi(bytes: &[u8], at: &mut usize) -> Option<usize> {
    let mut value = 0usize;
    for shift in [0, 7, 14, 21] {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Reads an MQTT 5 CONNACK (of any length: its lengths are variable byte integers); returns
/// its reason code and its Reason String (empty if none).
pub async fn connack_v5(stream: &mut TlsStream<TcpStream>) -> (u8, String) {
    let body = tokio::time::timeout(PATIENCE, async {
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await?;
        assert_eq!(first[0], 0x20, "a CONNACK");
        let mut length = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            stream.read_exact(&mut byte).await?;
            length.push(byte[0]);
            if byte[0] & 0x80 == 0 || length.len() == 4 {
                break;
            }
        }
        let remaining = read_vbi(&length, &mut 0).expect("remaining length");
        let mut body = vec![0u8; remaining];
        stream.read_exact(&mut body).await?;
        std::io::Result::Ok(body)
    })
    .await
    .expect("CONNACK in time")
    .expect("CONNACK");
    (body[1], connack_reason(&body))
}

/// The Reason String (0x1F) among the properties of a CONNACK's `body` (after the fixed
/// header), empty if none.
pub fn connack_reason(body: &[u8]) -> String {
    let mut at = 2;
    let Some(length) = read_vbi(body, &mut at) else {
        return String::new();
    };
    let end = (at + length).min(body.len());
    while at < end {
        let id = body[at];
        at += 1;
        let text = |at: &mut usize| -> Option<&[u8]> {
            let len = usize::from(u16::from_be_bytes([*body.get(*at)?, *body.get(*at + 1)?]));
            let text = body.get(*at + 2..*at + 2 + len)?;
            *at += 2 + len;
            Some(text)
        };
        match id {
            0x1f => {
                return text(&mut at)
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default()
            }
            // Other UTF-8 string properties a CONNACK may carry; anything else ends the search.
            0x12 | 0x1a | 0x1c => {
                if text(&mut at).is_none() {
                    break;
                }
            }
            _ => break,
        }
    }
    String::new()
}

/// Reads until the server closes the connection; returns what it sent before.
pub async fn until_closed(stream: &mut TlsStream<TcpStream>) -> Vec<u8> {
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    rest
}

/// Reads until what the server sent contains `needle`; returns all of it.
pub async fn read_until_contains(stream: &mut TlsStream<TcpStream>, needle: &[u8]) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !seen.windows(needle.len()).any(|w| w == needle) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
            other => panic!(
                "{:?} never came (got {:?}, then {other:?})",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    seen
}

/// A TLS connection from the local source address `source` (127.0.0.x plays another public IP);
/// the handshake's error when the server closed before or during it.
pub async fn tls_from(
    connector: &TlsConnector,
    port: u16,
    source: std::net::IpAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(source, 0))?;
    let tcp = socket
        .connect(std::net::SocketAddr::new([127, 0, 0, 1].into(), port))
        .await?;
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// PUBLISH at QoS 0.
pub fn publish_frame(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + topic.len() + 2);
    push_str(&mut body, topic.as_bytes());
    body.extend_from_slice(payload);
    frame(0x30, body)
}

/// A TLS connection whose socket has a tiny receive buffer: a client that stops reading fills
/// it, and the server's writes to it block, quickly.
pub async fn tls_small_receive_buffer(connector: &TlsConnector, port: u16) -> TlsStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let tcp = socket
        .connect(std::net::SocketAddr::new([127, 0, 0, 1].into(), port))
        .await
        .expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reason_string_past_127_bytes_is_read_whole() {
        let reason = "r".repeat(200);
        let mut body = vec![0, 0x87, 0xcb, 0x01, 0x1f, 0, 200];
        body.extend_from_slice(reason.as_bytes());
        assert_eq!(connack_reason(&body), reason);
        let mut length = Vec::new();
        vbi(207, &mut length);
        assert_eq!(read_vbi(&length, &mut 0), Some(207));
        assert_eq!(connack_reason(&[0, 0x87, 0]), "");
        assert_eq!(connack_reason(&[0, 0x87, 9, 0x1f, 0]), "", "cut short");
    }
}
