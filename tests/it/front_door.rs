//! The front door's own duties (RUMQTTD-NOTES pitfalls): its connection cap and client-id rules
//! answered with a CONNACK, keepalive enforced, wills kept and fired by the front door, session
//! takeover closing the old socket, mailboxes.

use fleet_protocol::{Filter, StationLeaf, Topic, STATION_CLIENT_ID_PREFIX};
use fleet_tests::raw::{
    anonymous_connector, connack, connect, connect_frame, connect_v5, device_connector,
    read_until_contains, subscribe_frame, tls, until_closed, Will,
};
use fleet_tests::{authorize, TestFleet};
use fleet_tests::{serial, station_data, station_topic};
use serde_json::json;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_is_answered_with_a_connack() {
    let fleet = TestFleet::start_with(|c| {
        c.server.max_connections = 1;
        c.limits.reserved_operator_sessions = 0;
    })
    .await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    let mut first = tls(&connector, port).await;
    assert_eq!(connect(&mut first, &serial("CAP-1").client_id()).await, 0);
    let mut second = tls(&connector, port).await;
    // 3.1.1 has no "quota exceeded": 3, server unavailable, instead of a silent drop.
    assert_eq!(connect(&mut second, &serial("CAP-2").client_id()).await, 3);
}

/// Issue 9: certificate-less sessions filled the cap and an operator got 0x97. The last
/// `reserved_operator_sessions` slots are for operators.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_devices_leaves_the_reserved_slots_to_operators() {
    let fleet = TestFleet::start_with(|c| {
        c.server.max_connections = 3;
        c.limits.reserved_operator_sessions = 1;
    })
    .await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    let mut held = Vec::new();
    for i in 0..2 {
        let mut stream = tls(&connector, port).await;
        let client_id = serial(&format!("RS-{i}")).client_id();
        assert_eq!(connect(&mut stream, &client_id).await, 0);
        held.push(stream);
    }
    let mut third = tls(&connector, port).await;
    assert_eq!(
        connect(&mut third, &serial("RS-9").client_id()).await,
        3,
        "a device may not take the reserved slot"
    );
    // The operator still gets in.
    let _op = fleet.operator().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_of_the_wrong_form_is_refused_and_audited() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    // The last one claims a station, with a serial of the wrong form.
    let bad_serial = format!("{STATION_CLIENT_ID_PREFIX}bad_serial");
    for client_id in ["", "a/b", "a+b", "fleetd-controller", &bad_serial] {
        let mut stream = tls(&connector, port).await;
        assert_eq!(connect(&mut stream, client_id).await, 5, "{client_id:?}");
    }
    let audit = op
        .call("listAuditLog", json!({"limit": 100}))
        .await
        .expect("audit");
    let refusals = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == "connect" && r["outcome"] == "refused")
        .count();
    assert_eq!(refusals, 5, "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_cut_and_its_will_fires_but_a_clean_disconnect_discards_it() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("KA-1", "6.1.0");
    authorize(&mut op, &mut station).await;
    station.handle.shutdown().await;
    let connector = device_connector(&fleet, &fleet.station_dir("KA-1"));
    let port = fleet.fleet.local_addr().port();
    // A will on a data topic goes through the router (one on the status topic goes to the
    // controller: `sessions::a_will_on_an_inbox_topic_reaches_the_admission_not_the_router`).
    let last_words = station_data("KA-1", "last-words");
    let will = |payload| Will {
        topic: &last_words,
        payload,
        retain: true,
    };

    // Keepalive 1 s and then silence: the front door cuts after 1.5 s, and the will fires.
    let mut silent = tls(&connector, port).await;
    let hello = connect_frame(
        &serial("KA-1").client_id(),
        1,
        Some(&will(r#"{"online":false,"by":"will"}"#)),
    );
    assert_eq!(connack(&mut silent, &hello).await, 0);
    until_closed(&mut silent).await;

    // A clean DISCONNECT discards the will.
    let mut clean = tls(&connector, port).await;
    let hello = connect_frame(
        &serial("KA-1").client_id(),
        60,
        Some(&will(r#"{"online":false,"by":"discarded"}"#)),
    );
    assert_eq!(connack(&mut clean, &hello).await, 0);
    clean.write_all(&[0xe0, 0x00]).await.expect("disconnect");
    until_closed(&mut clean).await;

    let mut reader = tls(&connector, port).await;
    assert_eq!(connect(&mut reader, &serial("KA-1").client_id()).await, 0);
    reader
        .write_all(&subscribe_frame(&last_words))
        .await
        .expect("subscribe");
    let seen = read_until_contains(&mut reader, b"\"by\":\"will\"").await;
    assert!(!seen.windows(9).any(|w| w == b"discarded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_takeover_closes_the_old_connection() {
    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    let mut old = tls(&connector, port).await;
    assert_eq!(connect(&mut old, &serial("TO-1").client_id()).await, 0);
    let mut new = tls(&connector, port).await;
    assert_eq!(connect(&mut new, &serial("TO-1").client_id()).await, 0);
    until_closed(&mut old).await;
    // The new session works.
    new.write_all(&subscribe_frame(&station_topic("TO-1", StationLeaf::Cmd)))
        .await
        .expect("subscribe");
    read_until_contains(&mut new, &[0x90, 3, 0, 1, 1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_packet_only_a_server_sends_ends_the_connection_and_nothing_else() {
    use fleet_tests::raw::until_closed;

    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    // An MQTT 5 session, then a CONNACK from the client: rumqttd's v5 decoder panics on it
    // (found by fuzzing).
    let mut stream = v5_session(&fleet, &serial("PX-1").client_id()).await;
    stream
        .write_all(&[0x20, 0x02, 0x00, 0x00])
        .await
        .expect("write");
    until_closed(&mut stream).await;
    // The service is unharmed.
    let mut other = tls(&connector, port).await;
    assert_eq!(connect_v4(&mut other).await, 0);
}

/// An admitted MQTT 5 legacy-station session.
async fn v5_session(
    fleet: &TestFleet,
    client_id: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let port = fleet.fleet.local_addr().port();
    let mut stream = tls(&anonymous_connector(fleet), port).await;
    assert_eq!(connect_v5(&mut stream, client_id).await.0, 0, "admitted");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_the_connection_with_the_mqtt5_reason() {
    use fleet_tests::raw::until_closed;
    let fleet = TestFleet::start().await;
    // A remaining length claiming 268 MB: refused from its header, nothing buffered for it.
    let mut huge = v5_session(&fleet, &serial("MF-1").client_id()).await;
    huge.write_all(&[0x30, 0xff, 0xff, 0xff, 0x7f, 0, 1, b'a'])
        .await
        .expect("write");
    let sent = until_closed(&mut huge).await;
    assert_eq!(sent.first(), Some(&0xe0), "a DISCONNECT: {sent:?}");
    assert_eq!(sent.get(2), Some(&0x95), "packet too large: {sent:?}");
    // A PUBLISH whose topic length runs past the frame: malformed.
    let mut bad = v5_session(&fleet, &serial("MF-2").client_id()).await;
    bad.write_all(&[0x30, 0x04, 0x00, 0x40, b'a', b'b'])
        .await
        .expect("write");
    let sent = until_closed(&mut bad).await;
    assert_eq!(sent.first(), Some(&0xe0), "a DISCONNECT: {sent:?}");
    assert_eq!(sent.get(2), Some(&0x81), "malformed packet: {sent:?}");
}

async fn connect_v4(stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>) -> u8 {
    connect(stream, &serial("PX-2").client_id()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_cannot_take_over_another_operators_session() {
    use fleet_tests::raw::connack;
    use std::sync::Arc;

    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let connector_of = |name: &str, tenant: &str| {
        let (cert, key) =
            fleet_certs::data_dir::issue_operator_files(fleet.data_dir(), name, tenant)
                .expect("issue");
        let cert = std::fs::read_to_string(cert).expect("cert");
        let key = std::fs::read_to_string(key).expect("key");
        let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
        tokio_rustls::TlsConnector::from(Arc::new(config))
    };
    let alice = connector_of("alice", "default");
    let mallory = connector_of("mallory", "other");
    let hello = fleet_tests::raw::connect_frame("console-1", 60, None);
    let mut first = tls(&alice, port).await;
    assert_eq!(connack(&mut first, &hello).await, 0);
    // Another operator with the same client id is refused, and alice's session stays.
    let mut second = tls(&mallory, port).await;
    assert_eq!(connack(&mut second, &hello).await, 5);
    first
        .write_all(&subscribe_frame(
            &Topic::OperatorResponse("alice".into()).to_string(),
        ))
        .await
        .expect("subscribe");
    read_until_contains(&mut first, &[0x90, 3, 0, 1, 1]).await;
    // The same operator may take its own session over (a reconnect).
    let mut again = tls(&alice, port).await;
    assert_eq!(connack(&mut again, &hello).await, 0);
}

/// Mailboxes (docs/protocol.md §4): the controller's `cmd` to a station reaches its exact
/// subscription and its `stations/<serial>/#` subscription alike, through the front door
/// rather than the router; SUBSCRIBE and UNSUBSCRIBE of a mailbox are answered by the front
/// door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_messages_reach_exact_and_wildcard_subscriptions() {
    use fleet_tests::raw::unsubscribe_frame;
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("MB-1", "6.1.0");
    let fingerprint = authorize(&mut op, &mut station).await;
    station.handle.shutdown().await;
    let connector = device_connector(&fleet, &fleet.station_dir("MB-1"));
    let port = fleet.fleet.local_addr().port();

    // An authorized session: its own cmd at QoS 1 (granted 1), then unsubscribed again.
    let mut session = tls(&connector, port).await;
    assert_eq!(connect(&mut session, &serial("MB-1").client_id()).await, 0);
    session
        .write_all(&subscribe_frame(&station_topic("MB-1", StationLeaf::Cmd)))
        .await
        .expect("subscribe");
    read_until_contains(&mut session, &[0x90, 3, 0, 1, 1]).await;
    session
        .write_all(&unsubscribe_frame(&station_topic("MB-1", StationLeaf::Cmd)))
        .await
        .expect("unsubscribe");
    read_until_contains(&mut session, &[0xb0, 2, 0, 2]).await;

    // The wildcard (through the router for data, and the mailbox for cmd).
    session
        .write_all(&subscribe_frame(
            &Filter::StationTree(serial("MB-1")).to_string(),
        ))
        .await
        .expect("subscribe");
    read_until_contains(&mut session, &[0x90, 3, 0, 1, 1]).await;

    // Reject: the `rejected` cmd arrives before the cut, on the wildcard subscription.
    op.call("rejectStation", json!({"serial": "MB-1"}))
        .await
        .expect("reject");
    let rest = until_closed(&mut session).await;
    assert!(
        rest.windows(10).any(|w| w == b"\"rejected\""),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(!fingerprint.is_empty());
}

/// The controller speaks at QoS 1 (PROTOCOL §3): a mailbox message to a QoS 1 subscription is
/// a QoS 1 PUBLISH with the front door's own packet id, and the front door keeps its PUBACK
/// (the router, which never sent it, would drop the client for an unsolicited acknowledgement).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mailbox_messages_go_at_qos_1_and_their_acknowledgement_stays_in_the_front_door() {
    use fleet_tests::raw::publish_frame;
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let port = fleet.fleet.local_addr().port();
    // A legacy station (no key pair) that has to be updated.
    let mut session = tls(&anonymous_connector(&fleet), port).await;
    assert_eq!(connect(&mut session, &serial("UP-1").client_id()).await, 0);
    session
        .write_all(&subscribe_frame(&station_topic("UP-1", StationLeaf::Cmd)))
        .await
        .expect("subscribe");
    read_until_contains(&mut session, &[0x90, 3, 0, 1, 1]).await;
    let request = br#"{"serial":"UP-1","model":"m","firmware":"6.0.5","mac_streaming":"a","mac_control":"b"}"#;
    session
        .write_all(&publish_frame(
            &station_topic("UP-1", StationLeaf::AuthRequest),
            request,
        ))
        .await
        .expect("auth request");
    op.wait_state("UP-1", "update_required").await;
    op.call(
        "startStationUpdate",
        json!({"serial": "UP-1", "version": "6.1.0"}),
    )
    .await
    .expect("update");
    let seen = read_until_contains(&mut session, b"\"command\":\"update\"").await;
    // PUBLISH, QoS 1: 0x32, then the remaining length, the topic, and the packet id.
    let topic = station_topic("UP-1", StationLeaf::Cmd);
    let topic = topic.as_bytes();
    let at = seen
        .windows(topic.len())
        .position(|w| w == topic)
        .expect("topic");
    // Before the topic: 0x32, a one- or two-byte remaining length, and the topic's length.
    assert!(
        (at >= 4 && seen[at - 4] == 0x32) || (at >= 5 && seen[at - 5] == 0x32),
        "{seen:?}"
    );
    let pkid = u16::from_be_bytes([seen[at + topic.len()], seen[at + topic.len() + 1]]);
    assert!(pkid >= 0x8000, "packet id {pkid:#x}");
    // Acknowledge it. Then a SUBSCRIBE that goes to the router, after the PUBACK, is still
    // answered: had the PUBACK reached the router, it would have dropped the client.
    let [hi, lo] = pkid.to_be_bytes();
    session.write_all(&[0x40, 2, hi, lo]).await.expect("puback");
    session
        .write_all(&subscribe_frame(
            &Filter::StationFirmware(serial("UP-1")).to_string(),
        ))
        .await
        .expect("subscribe");
    read_until_contains(&mut session, &[0x90, 3, 0, 1, 1]).await;
}
