//! The metrics endpoint (`[metrics] listen`): a scrape of `/metrics` before and after a station
//! connects shows the counters move, and `/healthz` answers 200 while fleetd's parts run.

use std::net::SocketAddr;

use fleet_tests::{http_get as get, raw, wrong_pap, TestFleet, PATIENCE};
use serde_json::json;

/// The value of the sample `name` (with its labels, as exposed), 0 if absent.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Station sessions, locked phones and address blocks, as a scrape shows them.
fn gauges(text: &str) -> [f64; 3] {
    [
        "fleetd_sessions{kind=\"station\"}",
        "fleetd_locked_phones",
        "fleetd_address_blocks",
    ]
    .map(|name| sample(text, name))
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = get(addr, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_sees_a_station_connect_and_health_is_ok() {
    let fleet = TestFleet::start_with(|c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
    })
    .await;
    let addr = fleet.fleet.metrics_addr().expect("the endpoint is bound");
    assert_ne!(addr.port(), 0);
    let (status, body) = get(addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));

    let before = scrape(addr).await;
    let admitted = |t: &str| sample(t, "fleetd_connects_admitted_total");
    let full = |t: &str| sample(t, "fleetd_tls_handshakes_total{kind=\"full\"}");
    let refused = |t: &str| {
        sample(
            t,
            "fleetd_connects_refused_total{reason=\"not_authorized\"}",
        )
    };
    assert_eq!(sample(&before, "fleetd_pending_stations"), 0.0, "{before}");

    let mut op = fleet.operator().await;
    let _station = fleet.station("MET-1", "6.1.0");
    op.wait_request("MET-1").await;
    op.call("getStation", json!({"serial": "MET-1"}))
        .await
        .expect("getStation");
    // A CONNECT refused: a client id of the wrong form.
    let connector = raw::anonymous_connector(&fleet);
    let mut stream = raw::tls(&connector, fleet.fleet.local_addr().port()).await;
    assert_ne!(raw::connect(&mut stream, "no+such/client").await, 0);

    let after = scrape(addr).await;
    assert!(
        admitted(&after) >= admitted(&before) + 2.0,
        "the operator and the station were admitted: {after}"
    );
    assert!(full(&after) >= full(&before) + 3.0, "{after}");
    assert!(refused(&after) >= refused(&before) + 1.0, "{after}");
    assert_eq!(sample(&after, "fleetd_pending_stations"), 1.0, "{after}");
    assert!(
        sample(&after, "fleetd_sessions{kind=\"operator\"}") >= 1.0,
        "{after}"
    );
    assert!(
        sample(
            &after,
            "fleetd_operator_commands_total{command=\"getStation\",outcome=\"ok\"}"
        ) >= 1.0,
        "{after}"
    );
    assert!(sample(&after, "fleetd_batch_size_count") >= 1.0, "{after}");
    assert!(
        sample(&after, "fleetd_store_commit_seconds_count") >= 1.0,
        "{after}"
    );
    assert_eq!(get(addr, "/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_follow_stations_locked_phones_and_address_blocks() {
    let fleet = TestFleet::start_with(|c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().expect("address"));
        c.limits.failed_auth_per_ip = 3;
        c.limits.failed_auth_delay_ms = 10;
    })
    .await;
    let addr = fleet.fleet.metrics_addr().expect("the endpoint is bound");
    let before = scrape(addr).await;
    assert_eq!(gauges(&before), [0.0, 0.0, 0.0], "{before}");

    let mut op = fleet.operator().await;
    let station = fleet.station("MET-2", "6.1.0");
    op.wait_request("MET-2").await;
    // Three wrong PAPs from one address: the phone is locked out, the address blocked.
    let mac = "020000004201";
    let pap = op.create_phone(mac).await;
    let phone = fleet.phone(mac, None, "127.0.0.42");
    for _ in 0..3 {
        assert_eq!(phone.connect_raw(Some(&wrong_pap(&pap))).await, 4);
    }
    // The count of locked phones is reused for 10 s: the next scrape counts anew.
    fleet.clock.advance(time::Duration::seconds(11));
    let during = scrape(addr).await;
    assert_eq!(gauges(&during), [1.0, 1.0, 1.0], "{during}");

    // The station goes; the lockout (30 min) and the block (15 min) end.
    drop(station);
    fleet.clock.advance(time::Duration::minutes(31));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    // No event tells a test that fleetd has seen an unauthorized station's session end: the
    // scrape is read again until it shows.
    loop {
        let after = scrape(addr).await;
        let [stations, locked, blocks] = gauges(&after);
        if stations == 0.0 {
            assert_eq!([locked, blocks], [0.0, 0.0], "{after}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{after}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn there_is_no_endpoint_unless_configured() {
    let fleet = TestFleet::start().await;
    assert_eq!(fleet.fleet.metrics_addr(), None);
}
