//! Durability: `fleetd` runs as a process, operators take decisions, the process is killed with
//! SIGKILL mid-way, restarted on the same data directory, and every acknowledged decision is
//! still there. (This test lives in the controller package because it runs the `fleetd` binary.)

mod common;

use common::{operator, start_fleetd};

use fleet_ctl::OperatorClient;
use std::time::Duration;

use fleet_sim::{spawn_station, SimConfig, StationHandle, StationProfile, StationState};
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(30);

/// Waits until `serial` shows `state`, re-checking on every station event.
async fn wait_state(
    op: &OperatorClient,
    events: &mut tokio::sync::mpsc::UnboundedReceiver<(String, Value)>,
    serial: &str,
    state: &str,
) -> Value {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(view) = op.call("getStation", json!({"serial": serial})).await {
            if view["state"] == state {
                return view;
            }
        }
        // Re-check on station events only: every getStation is itself audited.
        loop {
            let event = tokio::time::timeout_at(deadline, events.recv()).await;
            match event {
                _ if tokio::time::Instant::now() >= deadline => {
                    panic!("{serial} never reached {state}")
                }
                Ok(Some((topic, _))) if topic.ends_with("/audit") => {}
                Ok(Some(_)) => break,
                Ok(None) => panic!("event stream closed"),
                Err(_) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_decisions_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let fleetd = start_fleetd(&data);
    let op = operator(&fleetd, &data).await;
    let mut events = op.subscribe_events("default").await.expect("events");
    let ca = std::fs::read_to_string(data.join("ca.pem")).expect("ca");

    let serials: Vec<String> = (1..=6).map(|i| format!("KILL-{i}")).collect();
    let mut stations: Vec<StationHandle> = Vec::new();
    for serial in &serials {
        let sdir = dir.path().join(serial);
        StationState::init(&sdir, &StationProfile::new(serial.clone(), "6.1.0")).expect("init");
        let mut config = SimConfig::new(fleetd.server.clone(), ca.clone());
        config.retry = Duration::from_millis(200);
        stations.push(spawn_station(&sdir, config));
    }
    let mut fingerprints = Vec::new();
    for serial in &serials {
        let view = wait_state(&op, &mut events, serial, "unauthorized").await;
        fingerprints.push(
            view["fingerprint"]
                .as_str()
                .expect("fingerprint")
                .to_owned(),
        );
    }

    // Acknowledged decisions: accept 1, 2, 3 and 5; reject 4.
    let mut acknowledged: Vec<(String, &str)> = Vec::new();
    for (i, serial) in serials.iter().enumerate().take(5) {
        let (command, expected) = if i == 3 {
            ("rejectStation", "rejected")
        } else {
            ("acceptStation", "authorized")
        };
        op.call(
            command,
            json!({"serial": serial, "fingerprint": fingerprints[i]}),
        )
        .await
        .unwrap_or_else(|e| panic!("{command} {serial}: {e}"));
        acknowledged.push((serial.clone(), expected));
    }
    // A last decision is in flight when the process dies: it may or may not have landed.
    let in_flight = {
        let op = &op;
        let serial = serials[5].clone();
        let fp = fingerprints[5].clone();
        async move {
            op.call(
                "acceptStation",
                json!({"serial": serial, "fingerprint": fp}),
            )
            .await
        }
    };
    let mut fleetd = fleetd;
    let kill = async {
        // SIGKILL: no shutdown path runs.
        fleetd.child.kill().expect("kill -9");
        fleetd.child.wait().expect("reaped");
    };
    let (_maybe, ()) = tokio::join!(in_flight, kill);
    drop(op);
    for s in stations {
        s.shutdown().await;
    }

    // Restart on the same data directory: the store opens cleanly and holds every decision.
    let fleetd = start_fleetd(&data);
    let op = operator(&fleetd, &data).await;
    for (serial, expected) in &acknowledged {
        let view = op
            .call("getStation", json!({"serial": serial}))
            .await
            .expect("station kept");
        match *expected {
            "authorized" => {
                assert!(
                    view["state"] == "running" || view["state"] == "not_running",
                    "{serial}: {view}"
                );
                let i = serials.iter().position(|s| s == serial).expect("known");
                assert_eq!(
                    view["fingerprint"],
                    fingerprints[i].as_str(),
                    "pinned key kept"
                );
            }
            other => assert_eq!(view["state"], other, "{serial}: {view}"),
        }
    }
    let audit = op
        .call("listAuditLog", json!({"limit": 1000}))
        .await
        .expect("audit");
    let accepted = audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == "acceptStation" && r["outcome"] == "ok")
        .count();
    assert!(
        accepted >= 4,
        "the audit trail of the acknowledged accepts survived"
    );
}
