//! A cluster in one test process (`fleet_tests::cluster`): a NATS cluster of three, a
//! controller, two edges each on its own NATS server. Stations and operators on different
//! edges: decisions, events, cuts and takeovers cross the bus.

use std::time::Duration;

use fleet_protocol::EventKind;
use fleet_sim::{spawn_station, SimConfig, SimEvent};
use fleet_tests::cluster::TestCluster;
use fleet_tests::{authorize, http_get, serial, wrong_pap, Station, PATIENCE};
use serde_json::json;

/// Waits until `check` holds, or fails the test naming `what`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_on_one_edge_is_accepted_by_an_operator_on_another() {
    let cluster = TestCluster::start(2).await;
    // The operator hears the station's request (an event of a device on edge 0) on edge 1.
    let mut op = cluster.operator_on(1).await;
    let mut station = cluster.station_on(0, "CL-0001", "6.1.0");
    // The event itself crosses the edges (not only the state, which a command would read).
    let event = op
        .wait_event(EventKind::Stations, |e| e["serial"] == "CL-0001")
        .await;
    assert_eq!(event["serial"], "CL-0001", "{event}");
    authorize(&mut op, &mut station).await;
    let view = op.station("CL-0001").await;
    assert_eq!(view["state"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reject_through_one_edge_cuts_the_station_held_by_another_before_the_acknowledgement() {
    let cluster = TestCluster::start(2).await;
    let mut op = cluster.operator_on(0).await;
    let mut station = cluster.station_on(1, "CL-0002", "6.1.0");
    authorize(&mut op, &mut station).await;
    let held = cluster.edges[1].sessions().expect("an edge");
    assert!(
        held.rights_of(&serial("CL-0002").client_id()).is_some(),
        "edge 1 holds the station"
    );

    let view = op
        .call("rejectStation", json!({"serial": "CL-0002"}))
        .await
        .expect("reject");
    assert_eq!(view["state"], "rejected");
    // Acknowledged: the session on the other edge has no rights left (or is gone already).
    let rights = held.rights_of(&serial("CL-0002").client_id());
    assert!(
        rights
            .as_ref()
            .is_none_or(|r| r.publish.is_empty() && r.subscribe.is_empty()),
        "the station still had rights after the acknowledgement: {rights:?}"
    );
    station.wait_event(SimEvent::Rejected).await;
    station
        .wait_for("a refusal", |e| {
            matches!(e, SimEvent::Refused { .. }).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_station_connecting_through_another_edge_takes_its_session_over() {
    let cluster = TestCluster::start(2).await;
    let mut op = cluster.operator_on(0).await;
    let mut first = cluster.station_on(0, "CL-0003", "6.1.0");
    authorize(&mut op, &mut first).await;
    let edge0 = cluster.edges[0].sessions().expect("an edge");
    let old = edge0
        .session_of(&serial("CL-0003").client_id())
        .expect("edge 0 holds the station");

    // The same station (its key, its state directory) through edge 1.
    let mut config = SimConfig::new(cluster.edge(1), cluster.ca_pem());
    config.retry = Duration::from_millis(200);
    let mut second = Station {
        serial: "CL-0003".into(),
        dir: cluster.station_dir("CL-0003"),
        handle: spawn_station(cluster.station_dir("CL-0003"), config),
    };
    second
        .wait_for("a connection through edge 1", |e| {
            matches!(e, SimEvent::Connected { .. }).then_some(())
        })
        .await;
    // Taken over: the session on edge 0 is ended.
    eventually("the session on edge 0 ended", || {
        edge0.session_of(&serial("CL-0003").client_id()) != Some(old)
    })
    .await;
    first.handle.shutdown().await;
    // Admitted with its state: authorized stays authorized.
    let view = op.station("CL-0003").await;
    assert_eq!(view["state"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_stops_tells_the_controller_its_stations_are_gone() {
    let mut cluster = TestCluster::start(2).await;
    let mut op = cluster.operator_on(1).await;
    let mut station = cluster.station_on(0, "CL-0007", "6.1.0");
    authorize(&mut op, &mut station).await;
    op.wait_state("CL-0007", "running").await;
    // A graceful stop (SIGTERM): the station's session ends and the controller hears of it
    // before the edge leaves the bus, well before it would forget a silent edge's sessions
    // (10 s), which this wait stays under.
    cluster.edges.remove(0).stop().await;
    op.patience = Duration::from_secs(8);
    op.wait_state("CL-0007", "not_running").await;
    station.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_without_a_controller_refuses_new_devices_as_server_unavailable() {
    let cluster = TestCluster::start(1).await;
    let metrics = cluster.edges[0]
        .metrics_addr()
        .expect("the edge's metrics endpoint");
    let (status, text) = http_get(metrics, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\nfleetd_controller_heard 1\n"), "{text}");
    let mut op = cluster.operator_on(0).await;
    let mut held = cluster.station_on(0, "CL-0009", "6.1.0");
    authorize(&mut op, &mut held).await;
    cluster.controller.shutdown();
    // No cut could reach the edge now: it ends the sessions it holds.
    let ended = |e: &SimEvent| matches!(e, SimEvent::Disconnected { .. }).then_some(());
    held.wait_for("the session ended", ended).await;
    held.handle.shutdown().await;
    let mut station = cluster.station_on(0, "CL-0004", "6.1.0");
    let code = station
        .wait_for("a refusal", |e| match e {
            SimEvent::Refused { code, .. } => Some(code.clone()),
            SimEvent::Connected { .. } => panic!("admitted without a controller"),
            _ => None,
        })
        .await;
    assert!(
        code.contains("Unavailable"),
        "refused with {code}, not server unavailable"
    );
    // The edge says why in its metrics and its health check (a load balancer's probe).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, text) = http_get(metrics, "/metrics").await;
        let refused = text.lines().any(|line| {
            line.starts_with("fleetd_connects_refused_total{reason=\"server_unavailable\"}")
                && !line.ends_with(" 0")
        });
        if text.contains("\nfleetd_controller_heard 0\n") && refused {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = http_get(metrics, "/healthz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("controller"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_that_does_not_know_the_bus_password_hears_no_controller_and_admits_nobody() {
    // The tests' NATS servers require a user and password (as a deployment's should).
    let cluster = TestCluster::start(1).await;
    let stranger = cluster
        .start_edge("stranger", vec![cluster.nats.url_as(0, "not-the-password")])
        .await;
    let addr = stranger.local_addr().expect("it listens");
    let mut station = Station::boot(
        cluster.station_dir("CL-0008"),
        "CL-0008",
        "6.1.0",
        format!("127.0.0.1:{}", addr.port()),
        cluster.ca_pem(),
    );
    let code = station
        .wait_for("a refusal", |e| match e {
            SimEvent::Refused { code, .. } => Some(code.clone()),
            SimEvent::Connected { .. } => panic!("admitted by an edge off the bus"),
            _ => None,
        })
        .await;
    assert!(code.contains("Unavailable"), "refused with {code}");
    let heard = stranger.edge_link().expect("an edge").controller_heard();
    assert!(!heard, "a controller was heard without the password");
    station.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_paps_are_counted_across_edges() {
    let cluster = TestCluster::start(2).await;
    let op = cluster.operator_on(0).await;
    let pap = op.create_phone("aabbcc00c001").await;
    let (on_a, on_b) = (
        cluster.phone_on(0, "aabbcc00c001", "127.0.0.2"),
        cluster.phone_on(1, "aabbcc00c001", "127.0.0.2"),
    );
    // Two wrong PAPs through edge 0, the third through edge 1: one count, at the controller.
    for phone in [&on_a, &on_a, &on_b] {
        assert_eq!(
            phone.connect_raw(Some(&wrong_pap(&pap))).await,
            4,
            "wrong PAP: 4"
        );
    }
    let view = op
        .call("getPhone", json!({"mac": "aabbcc00c001"}))
        .await
        .expect("getPhone");
    assert_eq!(view["auth_state"], "authentication_failed");
    // While failed, the right PAP is refused on either edge.
    assert_eq!(on_b.connect_raw(Some(&pap)).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_back_on_the_bus_makes_the_edges_check_their_sessions_again() {
    let cluster = TestCluster::start(2).await;
    let server = cluster
        .nats
        .server_of("fleetd controller controller")
        .expect("the controller is on a server");
    // Edge i knows server i only: a station on an edge whose server lives on.
    let edge = if server == 0 { 1 } else { 0 };
    let mut op = cluster.operator_on(edge).await;
    let mut station = cluster.station_on(edge, "CL-0010", "6.1.0");
    authorize(&mut op, &mut station).await;
    // The controller's server dies; whatever the controller sent meanwhile may be lost. Once
    // it is back on another server it beats as a new instance, and the edge ends its
    // sessions: the station is admitted again, with its state.
    cluster.nats.kill(server);
    let ended = |e: &SimEvent| matches!(e, SimEvent::Disconnected { .. }).then_some(());
    station.wait_for("the session ended", ended).await;
    station.wait_event(SimEvent::Authorized).await;
    station.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_nats_server_killed_and_the_cluster_goes_on() {
    let cluster = TestCluster::start(2).await;
    // The server the controller is on is killed: it moves to another (it knows all three).
    // Edge i knows server i only, so the devices use the edges whose server lives on.
    let server = cluster
        .nats
        .server_of("fleetd controller controller")
        .expect("the controller is on a server");
    cluster.nats.kill(server);
    let (op_edge, station_edge) = match server {
        0 => (1, 1),
        1 => (0, 0),
        _ => (1, 0),
    };
    // Until the controller is back on another server, the edges refuse (server unavailable):
    // an operator connects again, as a person would.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut op = loop {
        match cluster.try_operator_on(op_edge).await {
            Ok(op) => break op,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "never admitted: {e}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut station = cluster.station_on(station_edge, "CL-0005", "6.1.0");
    authorize(&mut op, &mut station).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_without_the_clusters_ca_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = fleet_config::Config::default();
    config.server.data_dir = dir.path().join("controller-2");
    config.cluster.role = fleet_config::Role::Controller;
    config.cluster.node = "controller-2".into();
    config.cluster.nats = vec!["nats://127.0.0.1:1".into()];
    let error = match fleet_controller::Node::start(&config).await {
        Ok(_) => panic!("a controller made a CA of its own"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("fleetd init"), "{error}");
    assert!(
        !config.server.data_dir.join("ca.key").exists(),
        "no CA made"
    );
}
