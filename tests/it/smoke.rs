//! Quick wire-level check of the front door with a stock MQTT client.

use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{StationLeaf, Topic};
use fleet_tests::{serial, station_topic};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn station_and_operator_talk_through_the_front_door() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = fleet_config::Config::default();
    config.server.data_dir = dir.path().join("data");
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    let fleet = fleet_controller::Fleet::start(&config).await.unwrap();
    let port = fleet.local_addr().port();
    let ca = fleet.files.ca.cert_pem().to_owned();

    let station = fleet_certs::self_signed_station("S1").unwrap();
    let cfg = fleet_certs::client_config(&ca, Some((&station.cert_pem, &station.key_pem))).unwrap();
    let mut opts = MqttOptions::new(serial("S1").client_id(), "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(cfg),
    )));
    let (client, mut el) = AsyncClient::new(opts, 10);
    client
        .subscribe(station_topic("S1", StationLeaf::Cmd), QoS::AtLeastOnce)
        .await
        .unwrap();
    client
        .publish(station_topic("S1", StationLeaf::AuthRequest), QoS::AtLeastOnce, false, r#"{"serial":"S1","model":"m","firmware":"6.1.0","mac_streaming":"001122334455","mac_control":"001122334456"}"#)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut acked = false;
    while !acked {
        let ev = tokio::time::timeout_at(deadline, el.poll())
            .await
            .unwrap()
            .unwrap();
        eprintln!("{ev:?}");
        if let Event::Incoming(Packet::PubAck(_)) = ev {
            acked = true;
        }
    }
    let admin_cert = std::fs::read_to_string(&fleet.files.admin_cert_path).unwrap();
    let admin_key = std::fs::read_to_string(&fleet.files.admin_key_path).unwrap();
    let cfg = fleet_certs::client_config(&ca, Some((&admin_cert, &admin_key))).unwrap();
    let mut opts = MqttOptions::new("op1", "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(cfg),
    )));
    let (op, mut oel) = AsyncClient::new(opts, 10);
    op.subscribe(
        Topic::OperatorResponse("admin".into()).to_string(),
        QoS::AtLeastOnce,
    )
    .await
    .unwrap();
    loop {
        let ev = tokio::time::timeout_at(deadline, oel.poll())
            .await
            .unwrap()
            .unwrap();
        if let Event::Incoming(Packet::SubAck(s)) = ev {
            eprintln!("{s:?}");
            break;
        }
    }
    op.publish(
        Topic::OperatorRequest("admin".into()).to_string(),
        QoS::AtLeastOnce,
        false,
        r#"{"commands":[{"command":"listStations","correlationData":1}]}"#,
    )
    .await
    .unwrap();
    loop {
        tokio::select! {
            ev = oel.poll() => {
                let ev = ev.unwrap();
                if let Event::Incoming(Packet::Publish(p)) = ev {
                    let s = String::from_utf8_lossy(&p.payload).to_string();
                    eprintln!("{s}");
                    assert!(s.contains("Unauthorized"), "{s}");
                    break;
                }
            }
            ev = el.poll() => { ev.unwrap(); }
            _ = tokio::time::sleep_until(deadline) => panic!("no response"),
        }
    }
}
