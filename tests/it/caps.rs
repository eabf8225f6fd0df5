//! Caps that a flood cannot fill: live sessions in all and per source address, with slots kept
//! for operators (`reserved_sessions`: the admission says who may use them), and sockets still in
//! their TLS handshake or waiting for CONNECT per source address (`handshakes_per_ip`).
//!
//! The first test runs the real service; the configuration cannot set the per-address limits
//! yet, so the others run the front door alone, with a small admission of this file's own.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_broker::{Admission, BoxFuture, ConnectInfo, Decision, Refusal, Rights, Settings};
use fleet_protocol::{operator_client_id, OPERATOR_CLIENT_ID_PREFIX};
use fleet_tests::door::FrontDoor;
use fleet_tests::raw::{anonymous_connector, connect, connect_v5, tls, tls_from};
use fleet_tests::{serial, TestFleet, PATIENCE};
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// fleetd keeps some of `max_connections` for operators: certificate-less legacy stations fill
/// the others and are refused with CONNACK 3 (3.1.1's "server unavailable"; 0x97 under 5), the
/// refusal is audited, and an operator still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_stations_fill_the_device_slots_and_an_operator_still_gets_in() {
    const MAX: u32 = 18;
    let fleet = TestFleet::start_with(|c| c.server.max_connections = MAX).await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    let mut admitted = Vec::new();
    let mut refused = None;
    for i in 0..MAX {
        let mut stream = tls(&connector, port).await;
        match connect(&mut stream, &serial(&format!("CAPS-{i}")).client_id()).await {
            0 => admitted.push(stream),
            code => {
                refused = Some(code);
                break;
            }
        }
    }
    assert_eq!(refused, Some(3), "{} devices admitted", admitted.len());
    assert!(!admitted.is_empty(), "devices have slots too");
    // The operator uses one of the slots kept for it.
    let op = fleet.operator().await;
    op.call("listStations", json!({}))
        .await
        .expect("the operator works");
    // The refusal after admission is audited (the record is written in the background).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let audit = op
            .call("listAuditLog", json!({"limit": 1000}))
            .await
            .expect("audit");
        let audited = audit["records"]
            .as_array()
            .expect("records")
            .iter()
            .any(|r| {
                r["outcome"] == "refused"
                    && r["reason"]
                        .as_str()
                        .is_some_and(|t| t.contains("connection limit reached"))
            });
        if audited {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never audited: {audit}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ------------------------------------------------------------------------ the front door alone

/// Admits everyone, with no rights; clients whose id starts with `op-` as reserved. Keeps what
/// the front door told it.
#[derive(Default)]
struct Recorder {
    refused: Mutex<Vec<String>>,
    closed: Mutex<Vec<(String, u64)>>,
    admitted: Mutex<Vec<(String, u64)>>,
}

impl Admission for Recorder {
    fn admit(&self, info: ConnectInfo) -> BoxFuture<'_, Decision> {
        Box::pin(async move {
            self.admitted
                .lock()
                .expect("lock")
                .push((info.client_id.clone(), info.session_id));
            Decision::Allow {
                rights: Rights::none(),
                reserved: info.client_id.starts_with(OPERATOR_CLIENT_ID_PREFIX),
            }
        })
    }

    fn session_opened(&self, _client_id: &str, _session_id: u64) -> Result<Rights, Refusal> {
        Ok(Rights::none())
    }

    fn refused(&self, _client_id: &str, _peer_addr: SocketAddr, reason: &str) {
        self.refused.lock().expect("lock").push(reason.to_owned());
    }

    fn session_closed(&self, client_id: &str, session_id: u64) {
        self.closed
            .lock()
            .expect("lock")
            .push((client_id.to_owned(), session_id));
    }
}

impl Recorder {
    fn refusals(&self, needle: &str) -> usize {
        let refused = self.refused.lock().expect("lock");
        refused.iter().filter(|r| r.contains(needle)).count()
    }
}

struct Door {
    front: FrontDoor,
    recorder: Arc<Recorder>,
}

async fn door(configure: impl FnOnce(&mut Settings)) -> Door {
    let recorder = Arc::new(Recorder::default());
    let front = FrontDoor::start(recorder.clone(), configure).await;
    Door { front, recorder }
}

/// A client id as `fleetctl` makes them for operator `name`: one the recorder admits reserved.
fn operator(name: &str) -> String {
    operator_client_id(name, "caps")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// A TLS session from `source`, and the CONNACK code of a 3.1.1 CONNECT as `client_id`.
async fn session_from(door: &Door, source: &str, client_id: &str) -> (TlsStream<TcpStream>, u8) {
    let mut stream = tls_from(&door.front.connector, door.front.port, ip(source))
        .await
        .expect("handshake");
    let code = connect(&mut stream, client_id).await;
    (stream, code)
}

/// An MQTT 5 CONNECT as `client_id` from `source`: the CONNACK's reason code and reason string.
async fn v5_session_from(door: &Door, source: &str, client_id: &str) -> (u8, String) {
    let mut stream = tls_from(&door.front.connector, door.front.port, ip(source))
        .await
        .expect("handshake");
    connect_v5(&mut stream, client_id).await
}

/// Sessions per source address: a client that is not reserved may have `sessions_per_ip` from
/// one address, a reserved one (an operator) `reserved_sessions` more; another address is not
/// affected, a takeover of a client id does not count twice, and a refusal after admission is
/// audited and tells the admission the session it allowed is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_more_than_its_share_of_sessions() {
    let door = door(|s| {
        s.sessions_per_ip = 2;
        s.reserved_sessions = 1;
    })
    .await;
    let mut open = Vec::new();
    for id in ["c1", "c2"] {
        let (stream, code) = session_from(&door, "127.0.0.1", id).await;
        assert_eq!(code, 0, "{id}");
        open.push(stream);
    }
    // 3.1.1: 3; MQTT 5: 0x97 Quota Exceeded, with the reason.
    let (_, code) = session_from(&door, "127.0.0.1", "c3").await;
    assert_eq!(code, 3);
    let (code, reason) = v5_session_from(&door, "127.0.0.1", "c3-v5").await;
    assert_eq!(
        (code, reason.as_str()),
        (0x97, "too many sessions from this address")
    );
    assert_eq!(
        door.recorder
            .refusals("too many sessions from this address"),
        2
    );
    let closed = door.recorder.closed.lock().expect("lock").clone();
    let admitted = door.recorder.admitted.lock().expect("lock").clone();
    for refused in ["c3", "c3-v5"] {
        let session = admitted
            .iter()
            .find(|(id, _)| id == refused)
            .expect("admitted");
        assert!(
            closed.contains(session),
            "{refused}: session_closed was called: {closed:?}"
        );
    }

    // At its share, the address may still take one of its client ids over: the new session
    // takes the old one's slot.
    let (stream, code) = session_from(&door, "127.0.0.1", "c1").await;
    assert_eq!(code, 0, "a takeover does not count twice");
    open.push(stream);

    // An operator may use the reserved slot of the address; a second one may not.
    let (stream, code) = session_from(&door, "127.0.0.1", &operator("1")).await;
    assert_eq!(code, 0);
    open.push(stream);
    let (_, code) = session_from(&door, "127.0.0.1", &operator("2")).await;
    assert_eq!(code, 3);
    // Another address has its own share.
    let (stream, code) = session_from(&door, "127.0.0.2", "c4").await;
    assert_eq!(code, 0);
    open.push(stream);
}

/// Sessions in all: devices may use `max_connections - reserved_sessions`, operators all of
/// them; before admission only the hard cap holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reserved_slots_stay_free_for_reserved_clients() {
    let door = door(|s| {
        s.max_connections = 4;
        s.reserved_sessions = 2;
    })
    .await;
    let mut open = Vec::new();
    for (source, id) in [("127.0.0.1", "d1"), ("127.0.0.2", "d2")] {
        let (stream, code) = session_from(&door, source, id).await;
        assert_eq!(code, 0, "{id}");
        open.push(stream);
    }
    let (_, code) = session_from(&door, "127.0.0.3", "d3").await;
    assert_eq!(code, 3, "the device slots are full");
    for id in [operator("1"), operator("2")] {
        let (stream, code) = session_from(&door, "127.0.0.3", &id).await;
        assert_eq!(code, 0, "{id} uses a reserved slot");
        open.push(stream);
    }
    let (_, code) = session_from(&door, "127.0.0.3", &operator("3")).await;
    assert_eq!(code, 3, "nobody gets more than max_connections");
    assert_eq!(door.recorder.refusals("connection limit reached"), 2);
}

/// Waits until the server closes `stream` (EOF or reset); false if it is still open after
/// `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Unfinished handshakes per source address: idle TCP sockets from one address beyond
/// `handshakes_per_ip` are closed at once (the handshake timeout is 30 s here), each refusal is
/// audited, and an honest client from another address still completes its handshake and
/// CONNECT. A connection stops counting once its CONNECT is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_beyond_the_handshake_share_are_closed_and_another_address_gets_in() {
    const SHARE: usize = 4;
    let door = door(|s| s.handshakes_per_ip = SHARE).await;
    let mut idle = Vec::new();
    for _ in 0..SHARE {
        idle.push(
            TcpStream::connect(("127.0.0.1", door.front.port))
                .await
                .expect("tcp"),
        );
    }
    for i in 0..SHARE {
        let mut extra = TcpStream::connect(("127.0.0.1", door.front.port))
            .await
            .expect("tcp");
        assert!(
            closed_within(&mut extra, Duration::from_secs(5)).await,
            "socket {i} beyond the share was closed at once"
        );
    }
    for stream in &mut idle {
        assert!(
            !closed_within(stream, Duration::from_millis(200)).await,
            "the share itself waits for its handshake"
        );
    }
    assert_eq!(door.recorder.refusals("unfinished handshakes"), SHARE);

    let (_honest, code) = session_from(&door, "127.0.0.2", "honest").await;
    assert_eq!(code, 0);

    // Once the idle sockets are gone, the address may connect again; finished CONNECTs free
    // their slot, so more sessions than the share are fine.
    drop(idle);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut first = loop {
        if let Ok(stream) = tls_from(&door.front.connector, door.front.port, ip("127.0.0.1")).await
        {
            break stream;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the address never got in again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(connect(&mut first, "again-0").await, 0);
    let mut open = vec![first];
    for i in 1..=SHARE {
        let (stream, code) = session_from(&door, "127.0.0.1", &format!("again-{i}")).await;
        assert_eq!(code, 0);
        open.push(stream);
    }
}

/// At the socket cap (`max_connections` + an eighth + 256), a new connection waits in the
/// kernel's backlog until a socket closes, then is served: in a reboot storm the old sessions
/// of the returning stations are still open for a moment, and closing the new ones instead
/// turned 1,903 of 10,000 reconnects into errors (2026-12-02).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_socket_cap_a_new_connection_waits_for_a_socket_to_close() {
    let _ = fleet_sim::open_files::raise_open_files();
    let fleet = TestFleet::start_with(|c| {
        c.server.max_connections = 1;
        c.server.handshake_timeout_ms = 60_000;
    })
    .await;
    let port = fleet.fleet.local_addr().port();
    // 257 sockets (the cap for max_connections 1) that never start their handshake, from two
    // addresses (each may hold 256 unfinished handshakes).
    let mut holders = Vec::new();
    for i in 0..257 {
        let source: IpAddr = if i < 200 {
            [127, 0, 0, 61]
        } else {
            [127, 0, 0, 62]
        }
        .into();
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(source, 0)).expect("bind");
        let tcp = socket
            .connect(SocketAddr::new([127, 0, 0, 1].into(), port))
            .await
            .expect("connect");
        holders.push(tcp);
    }
    let connector = anonymous_connector(&fleet);
    let late =
        tokio::spawn(async move { tls_from(&connector, port, [127, 0, 0, 63].into()).await });
    // Accepted only once a socket closes: not closed (reset) meanwhile, and not served.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !late.is_finished(),
        "the 258th socket was answered at the cap: {late:?}"
    );
    drop(holders.pop());
    let stream = tokio::time::timeout(PATIENCE, late)
        .await
        .expect("served once a socket closed")
        .expect("task");
    assert!(stream.is_ok(), "{stream:?}");
}
