//! The front door's MQTT 5.0 server obligations, each test citing the normative statements of
//! the OASIS standard it checks (docs/mqtt5-conformance.md lists them all). The broker runs with
//! the harness's `OpenAdmission` and this file's rights: every client may publish and subscribe
//! below `t/` and `q/`, and has the mailbox `mbox/<client id>`. The client is written frame by
//! frame, so that what a stock library hides (a property, a reason code, a frame's size) can be
//! checked.

use std::time::Duration;

use fleet_broker::{Rights, SessionControl};
use fleet_tests::door::{FrontDoor, OpenAdmission};
use fleet_tests::raw::{connect_v5_frame, frame as packet, string, vbi, WillV5};
use fleet_tests::PATIENCE;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{error::Elapsed, timeout};
use tokio_rustls::client::TlsStream;

const SERVER_MAX_PACKET_SIZE: usize = 64 * 1024;

fn rights_of(client_id: &str) -> Rights {
    let mailbox = format!("mbox/{client_id}");
    Rights {
        publish: vec!["t/#".into(), "q/#".into()],
        publish_deny: vec![],
        subscribe: vec!["t/#".into(), "q/#".into(), mailbox.clone()],
        inbox: vec![],
        mailbox: vec![mailbox],
        retain: true,
    }
}

type Server = FrontDoor;

async fn server() -> Server {
    // Admits everyone with `rights_of`.
    FrontDoor::start(OpenAdmission::new(rights_of, usize::MAX), |s| {
        s.handshake_timeout = Duration::from_secs(10);
        s.connect_timeout = Duration::from_secs(10);
        s.max_packet_size = SERVER_MAX_PACKET_SIZE;
        s.max_undelivered = 1024;
    })
    .await
}

// ------------------------------------------------------------------------ frames, by hand

fn p_u8(id: u8, v: u8) -> Vec<u8> {
    vec![id, v]
}

fn p_u16(id: u8, v: u16) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(v.to_be_bytes());
    out
}

fn p_u32(id: u8, v: u32) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(v.to_be_bytes());
    out
}

fn p_str(id: u8, s: &str) -> Vec<u8> {
    let mut out = vec![id];
    out.extend(string(s.as_bytes()));
    out
}

fn p_pair(k: &str, v: &str) -> Vec<u8> {
    let mut out = vec![0x26];
    out.extend(string(k.as_bytes()));
    out.extend(string(v.as_bytes()));
    out
}

/// An MQTT 3.1.1 CONNECT with a clean session.
fn connect_v4(client_id: &str, extra_flags: u8) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02 | extra_flags, 0, 60];
    body.extend(string(client_id.as_bytes()));
    packet(0x10, body)
}

fn publish(topic: &str, qos: u8, pkid: u16, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    if qos > 0 {
        body.extend(pkid.to_be_bytes());
    }
    vbi(props.len(), &mut body);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), body)
}

fn subscribe(pkid: u16, filters: &[(&str, u8)]) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    body.push(0); // no properties
    for (filter, options) in filters {
        body.extend(string(filter.as_bytes()));
        body.push(*options);
    }
    packet(0x82, body)
}

fn unsubscribe(pkid: u16, filters: &[&str], v5: bool) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    if v5 {
        body.push(0);
    }
    for filter in filters {
        body.extend(string(filter.as_bytes()));
    }
    packet(0xa2, body)
}

fn ack(first: u8, pkid: u16) -> Vec<u8> {
    let mut out = vec![first, 2];
    out.extend(pkid.to_be_bytes());
    out
}

/// A frame the server sent.
#[derive(Debug, Clone)]
struct Frame {
    first: u8,
    body: Vec<u8>,
}

impl Frame {
    fn split(buf: &mut Vec<u8>) -> Option<Frame> {
        let (mut len, mut at) = (0usize, 1usize);
        loop {
            let byte = *buf.get(at)?;
            len |= usize::from(byte & 0x7f) << (7 * (at - 1));
            at += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if buf.len() < at + len {
            return None;
        }
        let frame: Vec<u8> = buf.drain(..at + len).collect();
        Some(Frame {
            first: frame[0],
            body: frame[at..].to_vec(),
        })
    }

    fn kind(&self) -> u8 {
        self.first >> 4
    }

    /// The whole frame's size in bytes.
    fn size(&self) -> usize {
        let mut header = vec![self.first];
        vbi(self.body.len(), &mut header);
        header.len() + self.body.len()
    }

    /// CONNACK and DISCONNECT: the reason code; PUBACK, PUBREC, PUBCOMP: the reason code (0
    /// when left out).
    fn reason(&self) -> u8 {
        match self.kind() {
            2 => self.body[1],
            14 => self.body.first().copied().unwrap_or(0),
            _ => self.body.get(2).copied().unwrap_or(0),
        }
    }

    fn pkid(&self) -> u16 {
        u16::from_be_bytes([self.body[0], self.body[1]])
    }

    /// The properties of a CONNACK.
    fn connack_properties(&self) -> Vec<(u8, Value)> {
        assert_eq!(self.kind(), 2, "a CONNACK: {self:?}");
        properties(self.body.get(2..).unwrap_or(&[]))
    }

    /// QoS, packet id, topic, properties and payload of a PUBLISH.
    fn publish(&self) -> Published {
        assert_eq!(self.kind(), 3, "a PUBLISH: {self:?}");
        let qos = (self.first >> 1) & 0b11;
        let topic_len = usize::from(u16::from_be_bytes([self.body[0], self.body[1]]));
        let topic = String::from_utf8(self.body[2..2 + topic_len].to_vec()).expect("topic");
        let mut at = 2 + topic_len;
        let pkid = if qos > 0 {
            at += 2;
            u16::from_be_bytes([self.body[at - 2], self.body[at - 1]])
        } else {
            0
        };
        let (props_len, props_at) = read_vbi(&self.body[at..]);
        let props = properties(&self.body[at..]);
        let payload = self.body[at + props_at + props_len..].to_vec();
        Published {
            qos,
            pkid,
            topic,
            properties: props,
            payload,
        }
    }
}

#[derive(Debug)]
struct Published {
    qos: u8,
    pkid: u16,
    topic: String,
    properties: Vec<(u8, Value)>,
    payload: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Int(u32),
    Str(String),
    Bin(Vec<u8>),
    Pair(String, String),
}

fn read_vbi(bytes: &[u8]) -> (usize, usize) {
    let (mut value, mut at) = (0usize, 0usize);
    loop {
        let byte = bytes[at];
        value |= usize::from(byte & 0x7f) << (7 * at);
        at += 1;
        if byte & 0x80 == 0 {
            return (value, at);
        }
    }
}

/// A property list: its length, then the properties (MQTT 5 §2.2.2).
fn properties(bytes: &[u8]) -> Vec<(u8, Value)> {
    if bytes.is_empty() {
        return vec![];
    }
    let (len, at) = read_vbi(bytes);
    let mut rest = &bytes[at..at + len];
    let mut out = Vec::new();
    let take_str = |rest: &mut &[u8]| {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let s = rest[2..2 + n].to_vec();
        *rest = &rest[2 + n..];
        s
    };
    while let Some((&id, tail)) = rest.split_first() {
        rest = tail;
        let value = match id {
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => {
                let v = rest[0];
                rest = &rest[1..];
                Value::Int(u32::from(v))
            }
            0x13 | 0x21 | 0x22 | 0x23 => {
                let v = u16::from_be_bytes([rest[0], rest[1]]);
                rest = &rest[2..];
                Value::Int(u32::from(v))
            }
            0x02 | 0x11 | 0x18 | 0x27 => {
                let v = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                rest = &rest[4..];
                Value::Int(v)
            }
            0x0b => {
                let (v, n) = read_vbi(rest);
                rest = &rest[n..];
                Value::Int(v as u32)
            }
            0x09 | 0x16 => Value::Bin(take_str(&mut rest)),
            0x26 => {
                let k = String::from_utf8(take_str(&mut rest)).expect("utf-8");
                let v = String::from_utf8(take_str(&mut rest)).expect("utf-8");
                Value::Pair(k, v)
            }
            _ => Value::Str(String::from_utf8(take_str(&mut rest)).expect("utf-8")),
        };
        out.push((id, value));
    }
    out
}

fn property(props: &[(u8, Value)], id: u8) -> Option<Value> {
    props.iter().find(|(i, _)| *i == id).map(|(_, v)| v.clone())
}

// ------------------------------------------------------------------------ the client

struct Client {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl Client {
    async fn open(server: &Server) -> Client {
        let tcp = TcpStream::connect(("127.0.0.1", server.port))
            .await
            .expect("tcp");
        // Small frames one after another (acknowledgements, then a PINGREQ) go out at once.
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let stream = timeout(PATIENCE, server.connector.connect(name, tcp))
            .await
            .expect("handshake in time")
            .expect("handshake");
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// The next frame from the server, or `None` once it closed the connection.
    async fn next(&mut self) -> Option<Frame> {
        self.next_within(PATIENCE)
            .await
            .expect("a frame, or the close, in time")
    }

    async fn next_within(&mut self, wait: Duration) -> Result<Option<Frame>, Elapsed> {
        timeout(wait, async {
            loop {
                if let Some(frame) = Frame::split(&mut self.buf) {
                    return Some(frame);
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// The next frame, which must be there.
    async fn expect(&mut self, what: &str) -> Frame {
        match self.next().await {
            Some(frame) => frame,
            None => panic!("the server closed instead of sending {what}"),
        }
    }

    /// A DISCONNECT with `reason`, then the close.
    async fn expect_disconnect(&mut self, reason: u8) {
        let frame = self.expect("a DISCONNECT").await;
        assert_eq!(
            (frame.kind(), frame.reason()),
            (14, reason),
            "DISCONNECT {reason:#04x}: {frame:?}"
        );
        assert!(self.next().await.is_none(), "closed after the DISCONNECT");
    }

    /// A CONNACK with `reason` and Session Present 0 ([MQTT-3.2.2-6]), then the close
    /// ([MQTT-3.2.2-7]).
    async fn expect_refusal(&mut self, reason: u8) {
        let frame = self.expect("a CONNACK").await;
        assert_eq!(
            (frame.kind(), frame.body[0], frame.reason()),
            (2, 0, reason),
            "CONNACK {reason:#04x}: {frame:?}"
        );
        assert!(self.next().await.is_none(), "closed after the CONNACK");
    }
}

/// An admitted MQTT 5 session and its CONNACK.
async fn session(server: &Server, client_id: &str, props: &[u8]) -> (Client, Frame) {
    let mut client = Client::open(server).await;
    client
        .send(&connect_v5_frame(client_id, 0, 60, props, None))
        .await;
    let connack = client.expect("a CONNACK").await;
    assert_eq!((connack.kind(), connack.reason()), (2, 0), "{connack:?}");
    // [MQTT-3.2.2-2]: Clean Start 1, so Session Present 0.
    assert_eq!(connack.body[0], 0, "session present: {connack:?}");
    (client, connack)
}

/// Subscribes and waits for the SUBACK, which must grant every filter.
async fn subscribed(client: &mut Client, filters: &[(&str, u8)]) {
    client.send(&subscribe(1, filters)).await;
    let suback = client.expect("a SUBACK").await;
    assert_eq!(suback.kind(), 9, "{suback:?}");
    let codes = &suback.body[3..];
    assert!(codes.iter().all(|c| *c < 0x80), "granted: {suback:?}");
}

/// Reads PUBLISHes (acknowledging them as their QoS asks) until one on `topic` with `payload`
/// comes; every frame is checked by `each` first.
async fn until_published(
    client: &mut Client,
    topic: &str,
    payload: &[u8],
    mut each: impl FnMut(&Frame),
) -> Published {
    loop {
        let frame = client.expect("a PUBLISH").await;
        each(&frame);
        match frame.kind() {
            3 => {
                let published = frame.publish();
                match published.qos {
                    1 => client.send(&ack(0x40, published.pkid)).await,
                    2 => client.send(&ack(0x50, published.pkid)).await,
                    _ => {}
                }
                if published.topic == topic && published.payload == payload {
                    return published;
                }
            }
            // PUBREL of a QoS 2 delivery.
            6 => client.send(&ack(0x70, frame.pkid())).await,
            _ => {}
        }
    }
}

// ------------------------------------------------------------------------ the tests

/// [MQTT-3.1.2-24] "The Server MUST NOT send packets exceeding Maximum Packet Size to the
/// Client." [MQTT-3.1.2-25] "Where a Packet is too large to send, the Server MUST discard it
/// without sending it and then behave as if it had completed sending that Application
/// Message." Through the router, at QoS 1 and 2: more large messages than the router keeps in
/// flight (100) are discarded, and a small one after them still arrives, so each discarded one
/// was completed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_larger_than_the_clients_maximum_packet_size_is_not_sent() {
    let server = server().await;
    let (mut sub, _) = session(&server, "sub", &p_u32(0x27, 64)).await;
    subscribed(&mut sub, &[("t/#", 1), ("q/#", 2)]).await;
    let (mut publisher, _) = session(&server, "pub", &[]).await;
    let big = vec![b'x'; 520];
    for topic in ["t", "q"] {
        for _ in 0..120 {
            publisher
                .send(&publish(&format!("{topic}/big"), 0, 0, &[], &big))
                .await;
        }
        publisher
            .send(&publish(&format!("{topic}/small"), 0, 0, &[], b"s"))
            .await;
        let small = until_published(&mut sub, &format!("{topic}/small"), b"s", |frame| {
            assert!(frame.size() <= 64, "{} bytes sent: {frame:?}", frame.size());
        })
        .await;
        assert_eq!(small.qos, if topic == "t" { 1 } else { 2 });
    }
}

/// [MQTT-3.1.2-24], [MQTT-3.1.2-25] for the front door's own mailbox deliveries: a message too
/// large for the client is discarded and taken as delivered (it does not hold one of the
/// client's unacknowledged QoS 1 slots, so a small one after many large ones still comes at
/// QoS 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mailbox_message_larger_than_the_clients_maximum_packet_size_is_not_sent() {
    let server = server().await;
    let (mut client, _) = session(&server, "mb", &p_u32(0x27, 64)).await;
    subscribed(&mut client, &[("mbox/mb", 1)]).await;
    let sessions = server.broker.sessions();
    for _ in 0..70 {
        assert!(sessions.deliver("mb", "mbox/mb".into(), vec![b'x'; 200]));
    }
    assert!(sessions.deliver("mb", "mbox/mb".into(), b"hi".to_vec()));
    let small = until_published(&mut client, "mbox/mb", b"hi", |frame| {
        assert!(frame.size() <= 64, "{} bytes sent: {frame:?}", frame.size());
    })
    .await;
    assert_eq!(small.qos, 1);
}

/// Topic aliases work as far as the CONNACK says. [MQTT-3.2.2-17] "The Client MUST NOT send
/// a Topic Alias in a PUBLISH packet to the Server greater than this value" (so the value is
/// what the server accepts), and [MQTT-3.3.2-12] "A Server MUST accept all Topic Alias values
/// greater than 0 and less than or equal to the Topic Alias Maximum value that it returned in
/// the CONNACK packet." An aliased PUBLISH is checked and routed as the topic it stands for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_aliases_work_up_to_the_maximum_the_connack_gives() {
    let server = server().await;
    let (mut sub, _) = session(&server, "asub", &[]).await;
    subscribed(&mut sub, &[("t/#", 0)]).await;
    let (mut client, connack) = session(&server, "alias", &[]).await;
    let maximum = match property(&connack.connack_properties(), 0x22) {
        Some(Value::Int(max)) => u16::try_from(max).expect("two bytes"),
        other => panic!("no Topic Alias Maximum: {other:?}"),
    };
    assert_eq!(maximum, 16);
    let sends = [
        ("t/a", 1, &b"one"[..]),
        ("", 1, b"two"),
        ("t/b", maximum, b"three"),
        ("", maximum, b"four"),
        ("t/c", 1, b"five"),
        ("", 1, b"six"),
    ];
    for (pkid, (topic, alias, payload)) in (1u16..).zip(sends) {
        client
            .send(&publish(topic, 1, pkid, &p_u16(0x23, alias), payload))
            .await;
        let puback = client.expect("a PUBACK").await;
        assert_eq!(
            (puback.kind(), puback.pkid(), puback.reason()),
            (4, pkid, 0),
            "{puback:?}"
        );
    }
    for (topic, payload) in [
        ("t/a", &b"one"[..]),
        ("t/a", b"two"),
        ("t/b", b"three"),
        ("t/b", b"four"),
        ("t/c", b"five"),
        ("t/c", b"six"),
    ] {
        let published = sub.expect("a PUBLISH").await.publish();
        assert_eq!(
            (published.topic.as_str(), &published.payload[..]),
            (topic, payload)
        );
        assert_eq!(property(&published.properties, 0x23), None, "no alias");
    }
}

/// MQTT 5 §3.3.4: "A Topic Alias value of 0 or greater than the Maximum Topic Alias is a
/// Protocol Error, the receiver uses DISCONNECT with Reason Code of 0x94 (Topic Alias
/// invalid)"; an alias without a mapping and "a zero length Topic Name field it is a Protocol
/// Error and the receiver uses DISCONNECT with Reason Code of 0x82"; §3.3.2.1: "It is a
/// Protocol Error if the Topic Name is zero length and there is no Topic Alias."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_alias_out_of_range_or_unknown_ends_the_connection() {
    let server = server().await;
    let cases = [
        ("t/a", Some(17u16), 0x94u8),
        ("t/a", Some(0), 0x94),
        ("", Some(2), 0x82),
        ("", None, 0x82),
    ];
    for (i, (topic, alias, reason)) in cases.into_iter().enumerate() {
        let (mut client, _) = session(&server, &format!("bad-alias-{i}"), &[]).await;
        let props = alias.map(|a| p_u16(0x23, a)).unwrap_or_default();
        client.send(&publish(topic, 1, 1, &props, b"x")).await;
        client.expect_disconnect(reason).await;
    }
    // [MQTT-3.3.2-7] "A receiver MUST NOT carry forward any Topic Alias mappings from one
    // Network Connection to another."
    let (mut first, _) = session(&server, "carried", &[]).await;
    first
        .send(&publish("t/a", 1, 1, &p_u16(0x23, 3), b"x"))
        .await;
    assert_eq!(first.expect("a PUBACK").await.kind(), 4);
    drop(first);
    let (mut second, _) = session(&server, "carried", &[]).await;
    second.send(&publish("", 1, 1, &p_u16(0x23, 3), b"x")).await;
    second.expect_disconnect(0x82).await;
}

/// [MQTT-3.1.0-2] "The Server MUST process a second CONNECT packet sent from a Client as a
/// Protocol Error and close the Network Connection."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connect_is_a_protocol_error() {
    let server = server().await;
    let (mut client, _) = session(&server, "twice", &[]).await;
    client
        .send(&connect_v5_frame("twice", 0, 60, &[], None))
        .await;
    client.expect_disconnect(0x82).await;
}

/// [MQTT-3.1.2-2] "If the Protocol Version is not 5 and the Server does not want to accept the
/// CONNECT packet, the Server MAY send a CONNACK packet with Reason Code 0x84 (Unsupported
/// Protocol Version) and then MUST close the Network Connection." The front door writes that
/// CONNACK as 3.1.1 does (return code 1), which a client of any level can read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsupported_protocol_level_is_answered_and_closed() {
    let server = server().await;
    for level in [3u8, 6] {
        let mut client = Client::open(&server).await;
        let mut connect = connect_v4("level", 0);
        connect[8] = level;
        client.send(&connect).await;
        let connack = client.expect("a CONNACK").await;
        assert_eq!((connack.first, connack.body), (0x20, vec![0, 1]));
        assert!(client.next().await.is_none(), "closed");
    }
}

/// [MQTT-3.1.2-3] "The Server MUST validate that the reserved flag in the CONNECT packet is set
/// to 0"; if it is not, "it is a Malformed Packet": CONNACK 0x81 under MQTT 5. MQTT 3.1.1's
/// [MQTT-3.1.2-3] has the server disconnect the client, with no CONNACK code for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_with_the_reserved_flag_set_is_malformed() {
    let server = server().await;
    let mut v5 = Client::open(&server).await;
    v5.send(&connect_v5_frame("reserved", 0x01, 60, &[], None))
        .await;
    v5.expect_refusal(0x81).await;
    let mut v4 = Client::open(&server).await;
    v4.send(&connect_v4("reserved-4", 0x01)).await;
    assert!(v4.next().await.is_none(), "closed without a CONNACK");
}

/// MQTT 5 §3.1.2.11.3: "It is a Protocol Error to include the Receive Maximum value more than
/// once or for it to have the value 0"; §3.1.2.11.2: "It is a Protocol Error to include the
/// Session Expiry Interval more than once"; §3.1.2.11.4: likewise "for the value [of the
/// Maximum Packet Size] to be set to zero". CONNACK 0x82, then the close ([MQTT-3.2.2-7]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receive_maximum_0_and_a_property_twice_are_protocol_errors() {
    let server = server().await;
    let twice = [p_u32(0x11, 10), p_u32(0x11, 20)].concat();
    for props in [p_u16(0x21, 0), twice, p_u32(0x27, 0)] {
        let mut client = Client::open(&server).await;
        client
            .send(&connect_v5_frame("props", 0, 60, &props, None))
            .await;
        client.expect_refusal(0x82).await;
    }
}

/// [MQTT-4.12.0-1] "If the Server does not support the Authentication Method supplied by the
/// Client, it MAY send a CONNACK with a Reason Code of 0x8C (Bad authentication method) or 0x87
/// (Not Authorized) as described in section 4.13 and MUST close the Network Connection."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authentication_method_is_refused_with_0x8c() {
    let server = server().await;
    let mut client = Client::open(&server).await;
    let props = [p_str(0x15, "SCRAM-SHA-256"), vec![0x16, 0, 1, b'x']].concat();
    client
        .send(&connect_v5_frame("scram", 0, 60, &props, None))
        .await;
    client.expect_refusal(0x8c).await;
}

/// [MQTT-4.3.3-11] the receiver of a QoS 2 PUBLISH "MUST respond to a PUBREL packet by sending a
/// PUBCOMP packet containing the same Packet Identifier as the PUBREL"; for a Packet Identifier
/// it does not know, the PUBCOMP reason is 0x92 (Packet Identifier not found, MQTT 5 §3.7.2.1),
/// and the connection goes on. A QoS 2 message resent before its PUBREL is acknowledged again
/// but delivered once [MQTT-4.3.3-10].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pubrel_for_an_unknown_packet_id_gets_pubcomp_0x92() {
    let server = server().await;
    let (mut sub, _) = session(&server, "rel-sub", &[]).await;
    subscribed(&mut sub, &[("q/#", 2)]).await;
    let (mut client, _) = session(&server, "rel", &[]).await;
    client.send(&[0x62, 2, 0, 9]).await;
    let comp = client.expect("a PUBCOMP").await;
    assert_eq!((comp.kind(), comp.pkid(), comp.reason()), (7, 9, 0x92));
    client.send(&[0xc0, 0]).await;
    assert_eq!(
        client.expect("a PINGRESP").await.kind(),
        13,
        "still connected"
    );

    // A real exchange still reaches the router, and a resent PUBLISH is delivered once.
    for _ in 0..2 {
        client.send(&publish("q/x", 2, 5, &[], b"once")).await;
        let rec = client.expect("a PUBREC").await;
        assert_eq!((rec.kind(), rec.pkid(), rec.reason()), (5, 5, 0));
    }
    client.send(&[0x62, 2, 0, 5]).await;
    let comp = client.expect("a PUBCOMP").await;
    assert_eq!((comp.kind(), comp.pkid(), comp.reason()), (7, 5, 0));
    client.send(&publish("q/end", 0, 0, &[], b"end")).await;
    let mut seen = 0;
    until_published(&mut sub, "q/end", b"end", |frame| {
        if frame.kind() == 3 && frame.publish().payload == b"once" {
            seen += 1;
        }
    })
    .await;
    assert_eq!(seen, 1, "delivered once");

    // MQTT 3.1.1 has no reason code: a PUBCOMP all the same.
    let mut v4 = Client::open(&server).await;
    v4.send(&connect_v4("rel-4", 0)).await;
    assert_eq!(v4.expect("a CONNACK").await.body, [0, 0]);
    v4.send(&[0x62, 2, 0, 9]).await;
    let comp = v4.expect("a PUBCOMP").await;
    assert_eq!((comp.first, comp.body), (0x70, vec![0, 9]));
    v4.send(&[0xc0, 0]).await;
    assert_eq!(v4.expect("a PINGRESP").await.kind(), 13);
}

/// [MQTT-3.8.4-1] a SUBACK for every SUBSCRIBE, [MQTT-3.8.4-2] with its Packet Identifier;
/// [MQTT-3.8.4-5] several filters are handled as a sequence with one SUBACK; [MQTT-3.8.4-6],
/// [MQTT-3.8.4-7] one Reason Code per filter, the granted QoS or a failure; [MQTT-3.9.3-1] in
/// the order of the filters. Here the filters go three ways: to the router, denied by the
/// rights (0x87), and the client's own mailbox, answered by the front door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_suback_answers_every_filter_in_order() {
    let server = server().await;
    let (mut client, _) = session(&server, "subs", &[]).await;
    client
        .send(&subscribe(
            9,
            &[("t/a", 1), ("x/denied", 0), ("mbox/subs", 1), ("q/b", 2)],
        ))
        .await;
    let suback = client.expect("a SUBACK").await;
    assert_eq!((suback.kind(), suback.pkid()), (9, 9));
    assert_eq!(suback.body[2..], [0, 1, 0x87, 1, 2]);
}

/// The properties of an Application Message reach a subscriber unaltered through the router:
/// [MQTT-3.3.2-4] Payload Format Indicator, [MQTT-3.3.2-15] Response Topic, [MQTT-3.3.2-16]
/// Correlation Data, [MQTT-3.3.2-17] and [MQTT-3.3.2-18] User Properties in their order,
/// [MQTT-3.3.2-20] Content Type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_properties_reach_subscribers_unaltered() {
    let server = server().await;
    let (mut sub, _) = session(&server, "props-sub", &[]).await;
    subscribed(&mut sub, &[("t/p", 1)]).await;
    let (mut publisher, _) = session(&server, "props-pub", &[]).await;
    let props = [
        p_u8(0x01, 1),
        p_str(0x08, "t/reply"),
        vec![0x09, 0, 2, 7, 8],
        p_pair("b", "2"),
        p_pair("a", "1"),
        p_pair("b", "3"),
        p_str(0x03, "application/json"),
    ]
    .concat();
    publisher.send(&publish("t/p", 1, 1, &props, b"{}")).await;
    let published = until_published(&mut sub, "t/p", b"{}", |_| {}).await;
    let seen: Vec<_> = published
        .properties
        .iter()
        .filter(|(id, _)| *id != 0x0b)
        .cloned()
        .collect();
    let mut expected = vec![
        (0x01, Value::Int(1)),
        (0x08, Value::Str("t/reply".into())),
        (0x09, Value::Bin(vec![7, 8])),
        (0x26, Value::Pair("b".into(), "2".into())),
        (0x26, Value::Pair("a".into(), "1".into())),
        (0x26, Value::Pair("b".into(), "3".into())),
        (0x03, Value::Str("application/json".into())),
    ];
    // The encoder's order of the kinds is its own; the user properties' order is kept.
    let mut sorted = seen.clone();
    sorted.sort_by_key(|(id, _)| *id);
    expected.sort_by_key(|(id, _)| *id);
    assert_eq!(sorted, expected);
    let users: Vec<_> = seen.iter().filter(|(id, _)| *id == 0x26).collect();
    assert_eq!(users.len(), 3);
    assert_eq!(users[0].1, Value::Pair("b".into(), "2".into()));
    assert_eq!(users[2].1, Value::Pair("b".into(), "3".into()));
}

/// [MQTT-3.3.1-3] "The DUP flag in the outgoing PUBLISH packet is set independently to the
/// incoming PUBLISH packet, its value MUST be determined solely by whether the outgoing PUBLISH
/// packet is a retransmission"; [MQTT-3.3.1-2] "The DUP flag MUST be set to 0 for all QoS 0
/// messages." The front door never retransmits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dup_flag_of_a_publisher_is_not_passed_on() {
    let server = server().await;
    let (mut sub, _) = session(&server, "dup-sub", &[]).await;
    subscribed(&mut sub, &[("t/one", 1), ("t/zero", 0)]).await;
    let (mut publisher, _) = session(&server, "dup-pub", &[]).await;
    let mut resent = publish("t/one", 1, 4, &[], b"1");
    resent[0] |= 0x08;
    publisher.send(&resent).await;
    assert_eq!(publisher.expect("a PUBACK").await.kind(), 4);
    let mut zero = publish("t/zero", 0, 0, &[], b"0");
    zero[0] |= 0x08;
    publisher.send(&zero).await;
    for payload in [&b"1"[..], b"0"] {
        let frame = sub.expect("a PUBLISH").await;
        assert_eq!(frame.publish().payload, payload);
        assert_eq!(frame.first & 0x08, 0, "DUP 0: {frame:?}");
        if frame.publish().qos == 1 {
            sub.send(&ack(0x40, frame.publish().pkid)).await;
        }
    }
}

/// [MQTT-3.3.4-9] "The Server MUST NOT send more than Receive Maximum QoS 1 and QoS 2 PUBLISH
/// packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a Reason Code of 128 or
/// greater from the Client"; [MQTT-3.3.4-10] "The Server MUST NOT delay the sending of any
/// packets other than PUBLISH packets due to having sent Receive Maximum PUBLISH packets
/// without receiving acknowledgements for them." The held messages follow in their order as
/// acknowledgements come; a mailbox message that finds no room goes at QoS 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_publishes_in_flight_than_the_clients_receive_maximum() {
    let server = server().await;
    let (mut sub, _) = session(&server, "rm", &p_u16(0x21, 2)).await;
    subscribed(&mut sub, &[("t/#", 1), ("mbox/rm", 1)]).await;
    let (mut publisher, _) = session(&server, "rm-pub", &[]).await;
    for n in 0..6u8 {
        publisher
            .send(&publish("t/n", 0, 0, &[], &[b'0' + n]))
            .await;
    }
    let mut unacked = Vec::new();
    for n in 0..2u8 {
        let published = sub.expect("a PUBLISH").await.publish();
        assert_eq!((published.qos, published.payload), (1, vec![b'0' + n]));
        unacked.push(published.pkid);
    }
    assert!(
        sub.next_within(Duration::from_millis(500)).await.is_err(),
        "a third PUBLISH came before an acknowledgement"
    );
    // Other packets are not held back, and the mailbox does not overrun the quota either.
    sub.send(&[0xc0, 0]).await;
    assert_eq!(sub.expect("a PINGRESP").await.kind(), 13);
    assert!(server
        .broker
        .sessions()
        .deliver("rm", "mbox/rm".into(), b"m".to_vec()));
    let mail = sub.expect("the mailbox message").await.publish();
    assert_eq!((mail.qos, mail.payload), (0, b"m".to_vec()));
    // Each acknowledgement lets one more through, in order.
    for n in 2..6u8 {
        sub.send(&ack(0x40, unacked.remove(0))).await;
        let published = sub.expect("a PUBLISH").await.publish();
        assert_eq!((published.qos, published.payload), (1, vec![b'0' + n]));
        unacked.push(published.pkid);
    }
}

/// [MQTT-2.2.1-4] "Each time a Server sends a new PUBLISH (with QoS > 0) MQTT Control Packet it
/// MUST assign it a non zero Packet Identifier that is currently unused": a mailbox message left
/// unacknowledged keeps its Packet Identifier to itself while the next ones go once round the
/// front door's range (0x8000 to 0xFFFF, 32,768 ids).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_id_in_use_is_not_given_to_another_mailbox_message() {
    let server = server().await;
    let (mut client, _) = session(&server, "pk", &[]).await;
    subscribed(&mut client, &[("mbox/pk", 1)]).await;
    let sessions = server.broker.sessions();
    assert!(sessions.deliver("pk", "mbox/pk".into(), b"kept".to_vec()));
    let kept = client.expect("a PUBLISH").await.publish();
    assert_eq!((kept.qos, kept.payload), (1, b"kept".to_vec()));
    // Fewer than the 64 a client may leave unacknowledged before the next go at QoS 0.
    const BATCH: usize = 32;
    for _ in 0..32_768 / BATCH {
        for _ in 0..BATCH {
            assert!(sessions.deliver("pk", "mbox/pk".into(), b"x".to_vec()));
        }
        for _ in 0..BATCH {
            let published = client.expect("a PUBLISH").await.publish();
            assert_eq!(published.qos, 1);
            assert_ne!(published.pkid, kept.pkid, "the id in use was given again");
            client.send(&ack(0x40, published.pkid)).await;
        }
        // Once the PINGRESP comes, the front door has read the acknowledgements before it.
        client.send(&[0xc0, 0]).await;
        assert_eq!(client.expect("a PINGRESP").await.kind(), 13);
    }
}

/// [MQTT-3.10.4-4] "The Server MUST respond to an UNSUBSCRIBE request by sending an UNSUBACK
/// packet"; [MQTT-3.10.4-5] "Even where no Topic Subscriptions are deleted, the Server MUST
/// respond with an UNSUBACK"; [MQTT-3.10.4-6] one UNSUBACK for several filters;
/// [MQTT-3.11.3-1] "The order of Reason Codes in the UNSUBACK packet MUST match the order of
/// Topic Filters in the UNSUBSCRIBE packet" (0x11: No subscription existed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_unsubscribe_gets_one_unsuback_with_a_reason_per_filter() {
    let server = server().await;
    let (mut client, _) = session(&server, "unsub", &[]).await;
    subscribed(&mut client, &[("t/a", 1), ("t/b", 0), ("mbox/unsub", 1)]).await;
    client
        .send(&unsubscribe(
            2,
            &["t/a", "t/none", "mbox/unsub", "t/b"],
            true,
        ))
        .await;
    let unsuback = client.expect("an UNSUBACK").await;
    assert_eq!(unsuback.kind(), 11);
    assert_eq!(unsuback.body, [0, 2, 0, 0x00, 0x11, 0x00, 0x00]);
    client.send(&unsubscribe(3, &["t/a"], true)).await;
    let unsuback = client.expect("an UNSUBACK").await;
    assert_eq!(unsuback.body, [0, 3, 0, 0x11]);
    // Nothing more comes (no late UNSUBACK from the router), and the session goes on.
    client.send(&[0xc0, 0]).await;
    assert_eq!(client.expect("a PINGRESP").await.kind(), 13);

    let mut v4 = Client::open(&server).await;
    v4.send(&connect_v4("unsub-4", 0)).await;
    v4.expect("a CONNACK").await;
    v4.send(&unsubscribe(7, &["t/none"], false)).await;
    let unsuback = v4.expect("an UNSUBACK").await;
    assert_eq!((unsuback.first, unsuback.body), (0xb0, vec![0, 7]));
}

/// [MQTT-3.1.3-10] "The Server MUST maintain the order of User Properties when publishing the
/// Will Message"; the will's Content Type and other properties go with it (MQTT 5 §3.1.3.2,
/// [MQTT-3.3.2-20]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_is_published_with_its_properties() {
    let server = server().await;
    let (mut sub, _) = session(&server, "will-sub", &[]).await;
    subscribed(&mut sub, &[("t/will", 0)]).await;
    let props = [
        p_pair("k", "1"),
        p_str(0x03, "text/plain"),
        p_pair("k", "2"),
        p_u8(0x01, 1),
    ]
    .concat();
    let will = WillV5 {
        properties: &props,
        topic: "t/will",
        payload: b"gone",
    };
    let mut client = Client::open(&server).await;
    client
        .send(&connect_v5_frame("will", 0, 60, &[], Some(&will)))
        .await;
    assert_eq!(client.expect("a CONNACK").await.reason(), 0);
    drop(client); // no DISCONNECT: the will fires
    let published = until_published(&mut sub, "t/will", b"gone", |_| {}).await;
    let users: Vec<_> = published
        .properties
        .iter()
        .filter(|(id, _)| *id == 0x26)
        .map(|(_, v)| v.clone())
        .collect();
    assert_eq!(
        users,
        [
            Value::Pair("k".into(), "1".into()),
            Value::Pair("k".into(), "2".into())
        ]
    );
    assert_eq!(
        property(&published.properties, 0x03),
        Some(Value::Str("text/plain".into()))
    );
    assert_eq!(property(&published.properties, 0x01), Some(Value::Int(1)));
}

/// The CONNACK says what the server does. [MQTT-3.1.2-23] "The Client and Server MUST store the
/// Session State after the Network Connection is closed if the Session Expiry Interval is
/// greater than 0": sessions end with their connection here, so the CONNACK's Session Expiry
/// Interval says 0 (MQTT 5 §3.2.2.3.2). [MQTT-3.2.2-22] "If the Server does not send the Server
/// Keep Alive, the Server MUST use the Keep Alive value set by the Client on CONNECT": a client
/// that asked for none is told the keepalive the front door enforces. It also gives its
/// Maximum Packet Size (§3.2.2.3.6) and Shared Subscription Available 0 (§3.2.2.3.13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connack_says_what_the_server_does() {
    let server = server().await;
    let mut client = Client::open(&server).await;
    client
        .send(&connect_v5_frame("says", 0, 0, &p_u32(0x11, 3600), None))
        .await;
    let connack = client.expect("a CONNACK").await;
    assert_eq!(connack.reason(), 0);
    let props = connack.connack_properties();
    assert_eq!(property(&props, 0x11), Some(Value::Int(0)), "{props:?}");
    assert_eq!(property(&props, 0x13), Some(Value::Int(40)), "60 s / 1.5");
    assert_eq!(
        property(&props, 0x27),
        Some(Value::Int(SERVER_MAX_PACKET_SIZE as u32))
    );
    assert_eq!(property(&props, 0x2a), Some(Value::Int(0)));
    // A client that asked for nothing special is told nothing about its session or keepalive.
    let (_, connack) = session(&server, "plain", &[]).await;
    let props = connack.connack_properties();
    assert_eq!(property(&props, 0x11), None);
    assert_eq!(property(&props, 0x13), None);
}

/// MQTT 5 §3.2.2.3.13: "If the Server receives a SUBSCRIBE packet containing Shared
/// Subscriptions and it does not support Shared Subscriptions, this is a Protocol Error. The
/// Server uses DISCONNECT with Reason Code 0x9E (Shared Subscriptions not supported)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_ends_the_connection_with_0x9e() {
    let server = server().await;
    let (mut client, _) = session(&server, "share", &[]).await;
    client
        .send(&subscribe(1, &[("t/a", 0), ("$share/g/t/a", 0)]))
        .await;
    client.expect_disconnect(0x9e).await;
}

/// [MQTT-3.8.3-5] "The Server MUST treat a SUBSCRIBE packet as malformed if any of Reserved
/// bits in the Payload are non-zero"; [MQTT-3.6.1-1] PUBREL's fixed header bits "MUST be set to
/// 0,0,1 and 0 … The Server MUST treat any other value as malformed"; [MQTT-3.10.3-2] "The
/// Payload of an UNSUBSCRIBE packet MUST contain at least one Topic Filter … An UNSUBSCRIBE
/// packet with no Payload is a Protocol Error."
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_and_empty_payloads_of_later_packets_are_refused() {
    let server = server().await;
    let subscription_id = publish("t/a", 0, 0, &[0x0b, 1], b"x");
    let cases: [(&[u8], u8); 8] = [
        (&subscribe(1, &[("t/a", 0x41)]), 0x81),
        (&[0x60, 2, 0, 1], 0x81),
        (&[0xa2, 3, 0, 1, 0], 0x82),
        // [MQTT-3.8.3-2]: a SUBSCRIBE without a filter is a Protocol Error.
        (&[0x82, 3, 0, 1, 0], 0x82),
        // [MQTT-3.10.1-1]: UNSUBSCRIBE's reserved bits are 0010.
        (&[0xa0, 6, 0, 1, 0, 0, 1, b'a'], 0x81),
        // [MQTT-3.14.1-1]: DISCONNECT's reserved bits are 0.
        (&[0xe1, 0], 0x81),
        // [MQTT-3.3.4-6] "A PUBLISH packet sent from a Client to a Server MUST NOT contain a
        // Subscription Identifier."
        (&subscription_id, 0x82),
        // MQTT 5 §3.15: "It is a Protocol Error for the Client or Server to send an AUTH packet
        // if the CONNECT packet did not contain the same Authentication Method."
        (&[0xf0, 0], 0x82),
    ];
    for (i, (bytes, reason)) in cases.into_iter().enumerate() {
        let (mut client, _) = session(&server, &format!("reserved-{i}"), &[]).await;
        client.send(bytes).await;
        client.expect_disconnect(reason).await;
    }
}

/// MQTT 5 §3.14.2.2.2: "If the Session Expiry Interval in the CONNECT packet was zero, then it
/// is a Protocol Error to set a non-zero Session Expiry Interval in the DISCONNECT packet sent
/// by the Client. If such a non-zero Session Expiry Interval is received by the Server, it does
/// not treat it as a valid DISCONNECT packet. The Server uses DISCONNECT with Reason Code 0x82":
/// the will is not discarded [MQTT-3.14.4-3] and fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expiry_in_disconnect_after_none_in_connect_is_a_protocol_error() {
    let server = server().await;
    let (mut sub, _) = session(&server, "dx-sub", &[]).await;
    subscribed(&mut sub, &[("t/will", 0)]).await;
    let will = WillV5 {
        properties: &[],
        topic: "t/will",
        payload: b"dx",
    };
    let mut client = Client::open(&server).await;
    client
        .send(&connect_v5_frame("dx", 0, 60, &[], Some(&will)))
        .await;
    assert_eq!(client.expect("a CONNACK").await.reason(), 0);
    client
        .send(&packet(0xe0, [vec![0x00, 5], p_u32(0x11, 10)].concat()))
        .await;
    client.expect_disconnect(0x82).await;
    until_published(&mut sub, "t/will", b"dx", |_| {}).await;
}

/// [MQTT-3.2.2-19] the Reason String of a CONNACK and [MQTT-3.14.2-3] that of a DISCONNECT:
/// "The sender MUST NOT send this Property if it would increase the size of the … packet beyond
/// the Maximum Packet Size specified by the receiver." A client that accepts 8 bytes gets its
/// CONNACK and, when taken over, its DISCONNECT 0x8E, without properties.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn properties_that_would_exceed_the_maximum_packet_size_are_left_out() {
    let server = server().await;
    let (mut small, connack) = session(&server, "small", &p_u32(0x27, 8)).await;
    assert!(connack.size() <= 8, "{connack:?}");
    let (_new, _) = session(&server, "small", &[]).await;
    let disconnect = small.expect("a DISCONNECT").await;
    assert!(disconnect.size() <= 8, "{disconnect:?}");
    assert_eq!((disconnect.kind(), disconnect.reason()), (14, 0x8e));
    // So does the DISCONNECT of a protocol error.
    let (mut other, _) = session(&server, "small-2", &p_u32(0x27, 8)).await;
    other
        .send(&publish("t/a", 0, 0, &p_u16(0x23, 99), b"x"))
        .await;
    let disconnect = other.expect("a DISCONNECT").await;
    assert!(disconnect.size() <= 8, "{disconnect:?}");
    assert_eq!(disconnect.reason(), 0x94);
}
