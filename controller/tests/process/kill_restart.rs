//! Durability: `fleetd` runs as a process, operators take decisions, the process is killed with
//! SIGKILL mid-way, restarted on the same data directory, and every acknowledged decision is
//! still there.

use fleet_sim::StationHandle;
use fleet_tests::process::Fleetd;
use serde_json::json;

use crate::FLEETD;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_decisions_survive_sigkill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let mut op = fleetd.operator().await;

    let serials: Vec<String> = (1..=6).map(|i| format!("KILL-{i}")).collect();
    let stations: Vec<StationHandle> = serials
        .iter()
        .map(|serial| {
            fleetd
                .station(dir.path().join(serial), serial, "6.1.0")
                .handle
        })
        .collect();
    let mut fingerprints = Vec::new();
    for serial in &serials {
        fingerprints.push(op.wait_request(serial).await);
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
    let kill = async { fleetd.kill() };
    let (_maybe, ()) = tokio::join!(in_flight, kill);
    drop(op);
    for s in stations {
        s.shutdown().await;
    }

    // Restart on the same data directory: the store opens cleanly and holds every decision.
    let fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let op = fleetd.operator().await;
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
