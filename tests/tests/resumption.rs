//! rustls skips the client-certificate verifier on resumed TLS sessions: a rejected or reset
//! station that resumes its old session must still be refused or held to pending rights.

use std::sync::Arc;

use fleet_tests::{authorize, TestFleet, PATIENCE};
use rustls::pki_types::ServerName;
use rustls::HandshakeKind;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// An MQTT 3.1.1 CONNECT with a clean session and keepalive 60.
fn connect_frame(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut frame = vec![0x10, body.len() as u8];
    frame.extend(body);
    frame
}

/// SUBSCRIBE packet id 1, one filter at QoS 1.
fn subscribe_frame(filter: &str) -> Vec<u8> {
    let mut body = vec![0, 1];
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(1);
    let mut frame = vec![0x82, body.len() as u8];
    frame.extend(body);
    frame
}

async fn tls(connector: &TlsConnector, port: u16) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.expect("tcp");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    tokio::time::timeout(PATIENCE, connector.connect(name, tcp))
        .await
        .expect("handshake in time")
        .expect("handshake")
}

/// Connects and returns the CONNACK return code; the stream stays open for more.
async fn connect(stream: &mut TlsStream<TcpStream>, client_id: &str) -> u8 {
    stream
        .write_all(&connect_frame(client_id))
        .await
        .expect("write");
    let mut connack = [0u8; 4];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut connack))
        .await
        .expect("connack in time")
        .expect("connack");
    assert_eq!(connack[0], 0x20);
    connack[3]
}

/// A connector that keeps TLS sessions, so that the second connection resumes the first.
fn resuming_connector(fleet: &TestFleet, dir: &std::path::Path) -> TlsConnector {
    let cert = std::fs::read_to_string(dir.join("cert.pem")).expect("cert");
    let key = std::fs::read_to_string(dir.join("key.pem")).expect("key");
    let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
    TlsConnector::from(Arc::new(config))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_tls_session_of_a_rejected_station_is_refused() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let station = fleet.station("RS-1", "6.1.0");
    op.wait_state("RS-1", "unauthorized").await;
    station.handle.shutdown().await;
    let connector = resuming_connector(&fleet, &fleet.dir.path().join("station-RS-1"));
    let port = fleet.fleet.local_addr().port();

    // First connection: a full handshake, admitted with pending rights.
    let mut first = tls(&connector, port).await;
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    assert_eq!(connect(&mut first, "station-RS-1").await, 0);
    op.call("rejectStation", json!({"serial": "RS-1"}))
        .await
        .expect("reject");
    // The live session is cut (after its `rejected` cmd).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, first.read_to_end(&mut rest))
        .await
        .expect("cut in time");

    // Second connection resumes the TLS session: the verifier does not run, the policy does.
    let mut second = tls(&connector, port).await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "the session must be resumed for this test to mean anything"
    );
    assert_eq!(
        connect(&mut second, "station-RS-1").await,
        5,
        "refused: not authorized"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_tls_session_of_a_reset_station_gets_no_authorized_rights() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("RS-2", "6.1.0");
    authorize(&mut op, &mut station).await;
    station.handle.shutdown().await;
    let connector = resuming_connector(&fleet, &fleet.dir.path().join("station-RS-2"));
    let port = fleet.fleet.local_addr().port();

    let mut first = tls(&connector, port).await;
    assert_eq!(connect(&mut first, "station-RS-2").await, 0);
    for filter in ["stations/RS-2/cmd", "stations/RS-2/data/#"] {
        first
            .write_all(&subscribe_frame(filter))
            .await
            .expect("subscribe");
        let mut suback = [0u8; 5];
        first.read_exact(&mut suback).await.expect("suback");
        assert_eq!(suback[4], 1, "authorized: {filter} granted");
    }

    op.call(
        "resetStation",
        json!({"serial": "RS-2", "delete_authentication": true}),
    )
    .await
    .expect("reset");
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, first.read_to_end(&mut rest))
        .await
        .expect("cut in time");
    assert!(
        rest.windows(5).any(|w| w == b"reset"),
        "the station was told why before the cut"
    );

    // The old key resumes its TLS session: admitted as any unknown key, with pending rights only.
    let mut second = tls(&connector, port).await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed)
    );
    assert_eq!(connect(&mut second, "station-RS-2").await, 0);
    second
        .write_all(&subscribe_frame("stations/RS-2/data/#"))
        .await
        .expect("subscribe");
    let mut suback = [0u8; 5];
    second.read_exact(&mut suback).await.expect("suback");
    assert_eq!(suback[4], 0x80, "no data rights after the reset");
    assert_eq!(op.station("RS-2").await["state"], "unauthorized");
}
