//! The station manual's procedures (seeds/000), one test each, named after them, against the
//! real fleet service with real TLS and simulated stations.

use fleet_protocol::EventKind;
use fleet_sim::SimEvent;
use fleet_tests::{authorize, code_of, TestFleet};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorize_a_station() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0001", "6.1.0");
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;

    // The station list shows it as "Unauthorized", with serial, MACs and fingerprint.
    let view = op.wait_state("ST-0001", "unauthorized").await;
    assert_eq!(view["label"], "Unauthorized");
    assert!(view["mac_streaming"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert!(view["mac_control"].as_str().is_some_and(|m| !m.is_empty()));
    let listed = op
        .call("listStations", json!({"state": "unauthorized"}))
        .await
        .expect("list");
    assert_eq!(listed["stations"][0]["serial"], "ST-0001");

    // The fingerprint shown equals the one of the station's local admin interface.
    let local = station.local_fingerprint();
    assert_eq!(view["fingerprint"], local.as_str());

    // Accepting with a fingerprint other than the station's key is refused and changes nothing.
    let other = fleet_certs::self_signed_station("X").expect("key");
    let wrong = fleet_certs::certificate_fingerprint(&other.cert_der)
        .expect("fp")
        .to_string();
    let refused = op
        .call(
            "acceptStation",
            json!({"serial": "ST-0001", "fingerprint": wrong}),
        )
        .await;
    assert_eq!(code_of(refused), "fingerprint_mismatch");
    assert_eq!(op.station("ST-0001").await["state"], "unauthorized");

    // Accept: the station becomes part of the system without reconnecting.
    op.call(
        "acceptStation",
        json!({"serial": "ST-0001", "fingerprint": local}),
    )
    .await
    .expect("accept");
    station.wait_event(SimEvent::Authorized).await;
    let view = op.wait_state("ST-0001", "running").await;
    assert_eq!(view["label"], "Running");

    // The decision is audited.
    let audit = op
        .call("listAuditLog", json!({"limit": 50}))
        .await
        .expect("audit");
    let records = audit["records"].as_array().expect("records");
    assert!(records.iter().any(|r| r["action"] == "acceptStation"
        && r["outcome"] == "ok"
        && r["device"] == "ST-0001"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_authorize_a_station() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0002", "6.0.5");
    station
        .wait_event(SimEvent::Connected {
            with_certificate: false,
        })
        .await;
    let view = op.wait_state("ST-0002", "update_required").await;
    assert_eq!(view["label"], "Update Required");

    // A station below 6.1.0 cannot be accepted.
    let refused = op
        .call(
            "acceptStation",
            json!({"serial": "ST-0002", "fingerprint": "00".repeat(32)}),
        )
        .await;
    assert_eq!(code_of(refused), "wrong_state");

    // The image that Start Update installs comes first in the catalog.
    let catalog = op.call("listFirmware", json!({})).await.expect("catalog");
    let latest = &catalog["images"][0];
    assert_eq!(latest["version"], "6.1.0", "{catalog}");
    assert_eq!(latest["installable"], true);
    assert_eq!(latest["sha256"].as_str().map(str::len), Some(64));
    let size = latest["size"].as_u64().expect("size");

    let view = op
        .call("startStationUpdate", json!({"serial": "ST-0002"}))
        .await
        .expect("start update");
    assert_eq!(view["state"], "updating");
    // The operator sees the station pull the whole image.
    let done = op
        .wait_event(EventKind::Stations, |e| {
            e["event"] == "update_progress" && e["received"].as_u64() == Some(size)
        })
        .await;
    assert_eq!(done["serial"], "ST-0002");
    assert_eq!(done["size"], size);
    station
        .wait_for("update installed", |e| match e {
            SimEvent::UpdateInstalled { version } => Some(version.clone()),
            _ => None,
        })
        .await;
    // After the reboot into 6.1.0 it owns a key pair and waits for authorization.
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;
    let view = op.wait_state("ST-0002", "unauthorized").await;
    assert_eq!(view["firmware"], "6.1.0");
    authorize(&mut op, &mut station).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reauthorize_a_rejected_station() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0003", "6.1.0");
    op.wait_state("ST-0003", "unauthorized").await;

    let view = op
        .call("rejectStation", json!({"serial": "ST-0003"}))
        .await
        .expect("reject");
    assert_eq!(view["state"], "rejected");
    // The station is told why, then cut; its further attempts are refused.
    station.wait_event(SimEvent::Rejected).await;
    station
        .wait_for("refusal", |e| {
            matches!(e, SimEvent::Refused { .. }).then_some(())
        })
        .await;
    let rejected = op
        .call("listRejectedStations", json!({}))
        .await
        .expect("rejected list");
    assert_eq!(rejected["stations"][0]["serial"], "ST-0003");
    assert_eq!(rejected["stations"][0]["label"], "Rejected");

    // Clear, reboot: the station enters the authorization mode again.
    op.call("clearRejectedStation", json!({"serial": "ST-0003"}))
        .await
        .expect("clear");
    station.handle.reboot();
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;
    authorize(&mut op, &mut station).await;
    let rejected = op
        .call("listRejectedStations", json!({}))
        .await
        .expect("rejected list");
    assert_eq!(rejected["stations"].as_array().map(Vec::len), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_authorization_with_the_manager() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0004", "6.1.0");
    let old = authorize(&mut op, &mut station).await;

    let view = op
        .call("resetStation", json!({"serial": "ST-0004", "delete_authentication": true, "delete_configuration": false}))
        .await
        .expect("reset");
    assert_eq!(view["state"], "unauthorized");
    station.wait_event(SimEvent::ResetApplied).await;
    // After the reboot the station has a new key pair and asks again.
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;
    let new = station.local_fingerprint();
    assert_ne!(old, new);
    // It shows as "Unauthorized" with its new key once its request arrived.
    op.wait_view("ST-0004", "the new key", |v| {
        v["state"] == "unauthorized" && v["fingerprint"] == new.as_str()
    })
    .await;
    authorize(&mut op, &mut station).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_authorization_with_the_local_admin_interface() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0005", "6.1.0");
    let old = authorize(&mut op, &mut station).await;

    // The station is "Not Running".
    station.handle.power_off();
    op.wait_state("ST-0005", "not_running").await;
    // Remove Device in the Manager.
    op.call("removeStation", json!({"serial": "ST-0005"}))
        .await
        .expect("remove");
    let gone = op.call("getStation", json!({"serial": "ST-0005"})).await;
    assert_eq!(code_of(gone), "not_found");
    // Reset Device with Delete Authentication on the station, which reboots.
    fleet_sim::local_reset(&station.dir, false, true).expect("local reset");
    station.handle.power_on();
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;
    op.wait_state("ST-0005", "unauthorized").await;
    assert_ne!(station.local_fingerprint(), old);
    authorize(&mut op, &mut station).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_recommendations_authentication_deleted_on_the_station_only() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0006", "6.1.0");
    let pinned = authorize(&mut op, &mut station).await;

    // Authentication deleted locally, the station not removed from the Manager first.
    station.handle.power_off();
    op.wait_state("ST-0006", "not_running").await;
    fleet_sim::local_reset(&station.dir, false, true).expect("local reset");
    station.handle.power_on();
    // Refused, and an identity_mismatch security event is raised.
    station
        .wait_for("refusal", |e| {
            matches!(e, SimEvent::Refused { .. }).then_some(())
        })
        .await;
    let event = op
        .wait_event(EventKind::Security, |e| {
            e["event"] == "identity_mismatch" && e["serial"] == "ST-0006"
        })
        .await;
    assert_eq!(event["pinned"], pinned.as_str());
    assert_eq!(op.station("ST-0006").await["fingerprint"], pinned.as_str());

    // Remove the station from the Manager, reboot it: it can be authorized again.
    op.call("removeStation", json!({"serial": "ST-0006"}))
        .await
        .expect("remove");
    station.handle.reboot();
    op.wait_state("ST-0006", "unauthorized").await;
    authorize(&mut op, &mut station).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_recommendations_remove_forces_re_authentication() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-0007", "6.1.0");
    let fingerprint = authorize(&mut op, &mut station).await;

    op.call("removeStation", json!({"serial": "ST-0007"}))
        .await
        .expect("remove");
    // The station learns it was removed, reboots and must be authorized again, even with the
    // same key.
    station.wait_event(SimEvent::Removed).await;
    let view = op.wait_state("ST-0007", "unauthorized").await;
    assert_eq!(view["fingerprint"], fingerprint.as_str());
    authorize(&mut op, &mut station).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operator_input_gets_a_specific_error_and_changes_nothing() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let _station = fleet.station("ST-0008", "6.1.0");
    op.wait_state("ST-0008", "unauthorized").await;
    let cases = [
        (
            "acceptStation",
            json!({"serial": "ST-0008"}),
            "invalid_argument",
        ),
        (
            "acceptStation",
            json!({"serial": "ST-0008", "fingerprint": "nope"}),
            "invalid_argument",
        ),
        (
            "acceptStation",
            json!({"serial": "bad serial!", "fingerprint": "00"}),
            "invalid_argument",
        ),
        ("rejectStation", json!({"serial": 42}), "invalid_argument"),
        ("getStation", json!({"serial": "NOPE"}), "not_found"),
        (
            "clearRejectedStation",
            json!({"serial": "ST-0008"}),
            "wrong_state",
        ),
        (
            "resetStation",
            json!({"serial": "ST-0008", "delete_authentication": "yes"}),
            "invalid_argument",
        ),
        (
            "listStations",
            json!({"state": "sleeping"}),
            "invalid_argument",
        ),
        (
            "startStationUpdate",
            json!({"serial": "ST-0008", "version": "9.9.9"}),
            "not_found",
        ),
        ("noSuchCommand", json!({}), "invalid_argument"),
    ];
    for (command, args, code) in cases {
        let result = op.call(command, args.clone()).await;
        assert_eq!(code_of(result), code, "{command} {args}");
    }
    assert_eq!(op.station("ST-0008").await["state"], "unauthorized");
}
