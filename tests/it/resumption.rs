//! rustls skips the client-certificate verifier on resumed TLS sessions: a rejected or reset
//! station that resumes its old session must still be refused or held to pending rights.

use fleet_protocol::StationLeaf;
use fleet_tests::raw::{connect, device_connector, subscribe_frame, tls, until_closed};
use fleet_tests::{authorize, TestFleet};
use fleet_tests::{serial, station_data_filter, station_topic};
use rustls::HandshakeKind;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_tls_session_of_a_rejected_station_is_refused() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let station = fleet.station("RS-1", "6.1.0");
    op.wait_state("RS-1", "unauthorized").await;
    station.handle.shutdown().await;
    let connector = device_connector(&fleet, &fleet.station_dir("RS-1"));
    let port = fleet.fleet.local_addr().port();

    // First connection: a full handshake, admitted with pending rights.
    let mut first = tls(&connector, port).await;
    assert_eq!(
        first.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Full)
    );
    assert_eq!(connect(&mut first, &serial("RS-1").client_id()).await, 0);
    first
        .write_all(&subscribe_frame(&station_topic("RS-1", StationLeaf::Cmd)))
        .await
        .expect("subscribe");
    let mut suback = [0u8; 5];
    first.read_exact(&mut suback).await.expect("suback");
    assert_eq!(suback[4], 1, "pending: cmd granted");
    op.call("rejectStation", json!({"serial": "RS-1"}))
        .await
        .expect("reject");
    // The live session is cut (after its `rejected` cmd).
    let rest = until_closed(&mut first).await;
    assert!(
        rest.windows(8).any(|w| w == b"rejected"),
        "the station was told why before the cut"
    );

    // Second connection resumes the TLS session: the verifier does not run, the policy does.
    let mut second = tls(&connector, port).await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "the session must be resumed for this test to mean anything"
    );
    assert_eq!(
        connect(&mut second, &serial("RS-1").client_id()).await,
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
    let connector = device_connector(&fleet, &fleet.station_dir("RS-2"));
    let port = fleet.fleet.local_addr().port();

    let mut first = tls(&connector, port).await;
    assert_eq!(connect(&mut first, &serial("RS-2").client_id()).await, 0);
    for filter in [
        &station_topic("RS-2", StationLeaf::Cmd),
        &station_data_filter("RS-2"),
    ] {
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
    let rest = until_closed(&mut first).await;
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
    assert_eq!(connect(&mut second, &serial("RS-2").client_id()).await, 0);
    second
        .write_all(&subscribe_frame(&station_data_filter("RS-2")))
        .await
        .expect("subscribe");
    let mut suback = [0u8; 5];
    second.read_exact(&mut suback).await.expect("suback");
    assert_eq!(suback[4], 0x80, "no data rights after the reset");
    assert_eq!(op.station("RS-2").await["state"], "unauthorized");
}
