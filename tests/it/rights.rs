//! Rights enforced by the front door on every PUBLISH and SUBSCRIBE (PROTOCOL §4), seen by
//! stock MQTT 3.1.1 and 5.0 clients, and TLS session resumption that must not let a revoked
//! identity back in.

use std::sync::Arc;

use fleet_protocol::{Filter, StationLeaf};
use fleet_sim::SimEvent;
use fleet_tests::{authorize, TestFleet, PATIENCE};
use fleet_tests::{serial, station_data, station_data_filter, station_topic};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use serde_json::json;

/// A stock 3.1.1 client connected as `station-<serial>` with the station's own key.
async fn v4_station(
    fleet: &TestFleet,
    dir: &std::path::Path,
    serial: &str,
) -> (AsyncClient, EventLoop) {
    let cert = std::fs::read_to_string(dir.join("cert.pem")).expect("station cert");
    let key = std::fs::read_to_string(dir.join("key.pem")).expect("station key");
    let tls = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
    let port = fleet.fleet.local_addr().port();
    let mut opts = MqttOptions::new(fleet_tests::serial(serial).client_id(), "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(tls),
    )));
    let (client, mut el) = AsyncClient::new(opts, 16);
    loop {
        match tokio::time::timeout(PATIENCE, el.poll())
            .await
            .expect("connack in time")
        {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(e) => panic!("connect failed: {e}"),
        }
    }
    (client, el)
}

async fn next_incoming(el: &mut EventLoop, what: &str) -> Packet {
    loop {
        match tokio::time::timeout(PATIENCE, el.poll()).await {
            Ok(Ok(Event::Incoming(p))) => return p,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                // rumqttc reads in batches: packets that came with the close are still queued.
                while let Some(event) = el.state.events.pop_front() {
                    if let Event::Incoming(p) = event {
                        return p;
                    }
                }
                panic!("connection ended while waiting for {what}: {e}")
            }
            Err(_) => panic!("no {what}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_cannot_use_another_stations_topics_nor_publish_its_own_cmd() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut s1 = fleet.station("RT-1", "6.1.0");
    authorize(&mut op, &mut s1).await;
    s1.handle.shutdown().await;
    let mut s2 = fleet.station("RT-2", "6.1.0");
    authorize(&mut op, &mut s2).await;

    // RT-1, authorized, played by a stock client with its key.
    let (client, mut el) = v4_station(&fleet, &fleet.station_dir("RT-1"), "RT-1").await;
    // RT-1's topics: what its tree filter covers, `stations/RT-1/…`.
    let rt1_tree = Filter::StationTree(serial("RT-1")).to_string();
    let rt1_tree = rt1_tree.trim_end_matches('#');
    for (filter, allowed) in [
        (Filter::StationTree(serial("RT-1")).to_string(), true),
        (station_topic("RT-2", StationLeaf::Cmd), false),
        (Filter::StationTree(serial("RT-2")).to_string(), false),
        ("#".into(), false),
        (Filter::EveryStation(StationLeaf::Cmd).to_string(), false),
        (Filter::Events("default".into()).to_string(), false),
    ] {
        client
            .subscribe(&filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let mut packet = next_incoming(&mut el, "SUBACK").await;
        // Retained messages of the granted filter may come first.
        while matches!(&packet, Packet::Publish(p) if p.topic.starts_with(rt1_tree)) {
            packet = next_incoming(&mut el, "SUBACK").await;
        }
        match packet {
            Packet::SubAck(ack) => {
                let granted = matches!(
                    ack.return_codes[0],
                    rumqttc::SubscribeReasonCode::Success(_)
                );
                assert_eq!(granted, allowed, "{filter}: {:?}", ack.return_codes);
                if !allowed {
                    assert_eq!(
                        ack.return_codes[0],
                        rumqttc::SubscribeReasonCode::Failure,
                        "0x80"
                    );
                }
            }
            other => panic!("expected SUBACK for {filter}, got {other:?}"),
        }
    }
    // Forged commands, to its own cmd and to another station's, are dropped (3.1.1 acknowledges
    // them); its own data topic goes through.
    for topic in [
        &station_topic("RT-1", StationLeaf::Cmd),
        &station_topic("RT-2", StationLeaf::Cmd),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, r#"{"command":"removed"}"#)
            .await
            .expect("publish");
    }
    client
        .publish(&station_data("RT-1", "x"), QoS::AtLeastOnce, false, "mine")
        .await
        .expect("publish");
    let mut acks = 0;
    loop {
        match next_incoming(&mut el, "own data").await {
            Packet::Publish(p) => {
                assert_ne!(
                    p.topic,
                    station_topic("RT-1", StationLeaf::Cmd),
                    "a forged cmd got through"
                );
                assert!(p.topic.starts_with(rt1_tree), "{}", p.topic);
                if p.topic == station_data("RT-1", "x") {
                    break;
                }
            }
            Packet::PubAck(_) => acks += 1,
            _ => {}
        }
    }
    assert!(acks >= 2, "denied 3.1.1 publishes are still acknowledged");

    // The controller's own commands follow the forged ones on the same topics, and messages of
    // one topic keep their order: the first command each station receives must be the real one.
    for serial in ["RT-1", "RT-2"] {
        op.call(
            "resetStation",
            json!({"serial": serial, "delete_configuration": true}),
        )
        .await
        .expect("reset");
    }
    let first = s2
        .wait_for("a command", |e| match e {
            SimEvent::Command { command, .. } => Some(command.clone()),
            _ => None,
        })
        .await;
    assert_eq!(first, "reset", "RT-2 obeyed a command forged by RT-1");
    loop {
        match next_incoming(&mut el, "RT-1's reset").await {
            Packet::Publish(p) if p.topic == station_topic("RT-1", StationLeaf::Cmd) => {
                let payload = String::from_utf8_lossy(&p.payload).into_owned();
                assert!(payload.contains("reset"), "forged cmd delivered: {payload}");
                break;
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_clients_get_reason_0x87() {
    use rumqttc::v5::mqttbytes::v5::{Packet as P5, PubAckReason, SubscribeReasonCode};
    use rumqttc::v5::mqttbytes::QoS as Q5;
    use rumqttc::v5::{AsyncClient as C5, Event as E5, MqttOptions as O5};

    let fleet = TestFleet::start().await;
    let station = fleet_certs::self_signed_station("V5-1").expect("key");
    let tls =
        fleet_certs::client_config(&fleet.ca_pem(), Some((&station.cert_pem, &station.key_pem)))
            .expect("tls");
    let mut opts = O5::new(
        serial("V5-1").client_id(),
        "127.0.0.1",
        fleet.fleet.local_addr().port(),
    );
    opts.set_transport(rumqttc::Transport::tls_with_config(
        TlsConfiguration::Rustls(Arc::new(tls)),
    ));
    let (client, mut el) = C5::new(opts, 16);
    async fn next(el: &mut rumqttc::v5::EventLoop) -> P5 {
        loop {
            match tokio::time::timeout(PATIENCE, el.poll())
                .await
                .expect("in time")
                .expect("connected")
            {
                E5::Incoming(p) if !matches!(p, P5::ConnAck(_)) => return p,
                _ => {}
            }
        }
    }
    // Pending station: it may not subscribe to its data, nor publish there.
    client
        .subscribe(&station_data_filter("V5-1"), Q5::AtLeastOnce)
        .await
        .expect("subscribe");
    match next(&mut el).await {
        P5::SubAck(ack) => assert_eq!(ack.return_codes, vec![SubscribeReasonCode::NotAuthorized]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    client
        .publish(&station_data("V5-1", "x"), Q5::AtLeastOnce, false, "x")
        .await
        .expect("publish");
    match next(&mut el).await {
        P5::PubAck(ack) => assert_eq!(ack.reason, PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    // Its own cmd is fine to subscribe to.
    client
        .subscribe(&station_topic("V5-1", StationLeaf::Cmd), Q5::AtLeastOnce)
        .await
        .expect("subscribe");
    match next(&mut el).await {
        P5::SubAck(ack) => assert!(matches!(
            ack.return_codes[0],
            SubscribeReasonCode::Success(_)
        )),
        other => panic!("expected SUBACK, got {other:?}"),
    }
}
