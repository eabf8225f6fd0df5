//! Crashes: `fleetd` runs as a process, onboarding and operator commands are driven against it,
//! and it is SIGKILLed at random points, 20 times, restarting on the same data directory each
//! time. Every acknowledged decision and every issued certificate is checked against what the
//! clients were told: nothing lost, nothing half-done, and the store opens cleanly every time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use fleet_sim::phone::{self, PhoneProfile, PhoneState, PhoneTarget, ProvisionOutcome};
use fleet_tests::process::Fleetd;
use fleet_tests::{new_phone, Operator};
use serde_json::json;

use crate::FLEETD;

const CYCLES: usize = 20;

/// What the clients were told, and so what must hold after any crash.
#[derive(Debug, Clone, PartialEq)]
enum Told {
    /// createPhone or resetPhoneAuthentication acknowledged with this PAP.
    Pap(String),
    /// A resetPhoneAuthentication was asked after this PAP was acknowledged, and the kill came
    /// before its answer: it may have landed (a new PAP) or not (this one), never half.
    PapOrReset(String),
    /// The phone got its certificate and its provision/complete was acknowledged.
    Provisioned,
}

/// A cheap pseudo-random sequence (the kill points); seeded from the clock, printed for replay.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Station decisions the operator heard back: authorized with this key, or rejected.
fn check_station(serial: &str, expected: &Option<String>, view: &serde_json::Value) {
    match expected {
        Some(fingerprint) => {
            assert!(
                view["state"] == "running" || view["state"] == "not_running",
                "{serial}: {view}"
            );
            assert_eq!(
                view["fingerprint"],
                fingerprint.as_str(),
                "{serial}: pinned key"
            );
        }
        None => assert_eq!(view["state"], "rejected", "{serial}: {view}"),
    }
}

async fn check_stations(op: &Operator, stations: &BTreeMap<String, Option<String>>) {
    for (serial, expected) in stations {
        let view = op
            .call("getStation", json!({"serial": serial}))
            .await
            .unwrap_or_else(|e| panic!("station {serial} lost: {e}"));
        check_station(serial, expected, &view);
    }
}

async fn check(op: &Operator, told: &BTreeMap<String, Told>, dir: &Path, target: &PhoneTarget) {
    for (mac, what) in told {
        let view = op
            .call("getPhone", json!({"mac": mac}))
            .await
            .unwrap_or_else(|e| panic!("phone {mac} lost: {e}"));
        match what {
            Told::Pap(pap) => {
                assert_eq!(view["pap"], pap.as_str(), "{mac}: the acknowledged PAP");
                assert_eq!(view["auth_state"], "authentication_needed", "{mac}");
            }
            Told::PapOrReset(_) => {
                let pap = view["pap"].as_str().unwrap_or_default();
                assert!(
                    pap.len() == 6 && pap.bytes().all(|b| b.is_ascii_digit()),
                    "{mac}: a whole PAP, old or new: {view}"
                );
                assert_eq!(view["auth_state"], "authentication_needed", "{mac}");
            }
            Told::Provisioned => {
                assert_eq!(view["auth_state"], "authentication_successful", "{mac}");
                // The issued certificate still opens the door.
                let session = phone::connect_provisioned(&dir.join(mac), target)
                    .await
                    .unwrap_or_else(|e| panic!("{mac}: certificate refused after restart: {e}"));
                session.disconnect().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_sigkills_lose_no_acknowledged_decision_and_no_issued_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 | 1)
        .unwrap_or(1);
    eprintln!("kill points seeded with {seed}");
    let mut rng = Rng(seed);
    let mut told: BTreeMap<String, Told> = BTreeMap::new();
    let mut stations: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut next_mac = 0u32;

    for cycle in 0..CYCLES {
        let t0 = Instant::now();
        let fleetd = Fleetd::start(FLEETD.as_ref(), &data);
        let target = PhoneTarget::new(fleetd.server.clone(), fleetd.ca_pem());
        let mut op = fleetd.operator().await;
        let t1 = t0.elapsed();
        check(&op, &told, dir.path(), &target).await;
        check_stations(&op, &stations).await;
        let t2 = t0.elapsed();

        // Onboard one station: it asks, the operator accepts it (or rejects it, every third).
        let serial = format!("CR-{cycle}");
        let station = fleetd.station(dir.path().join(&serial), &serial, "6.1.0");
        let fingerprint = op.wait_request(&serial).await;
        if cycle % 3 == 2 {
            op.call("rejectStation", json!({"serial": serial}))
                .await
                .expect("reject");
            stations.insert(serial, None);
        } else {
            op.call(
                "acceptStation",
                json!({"serial": serial, "fingerprint": fingerprint}),
            )
            .await
            .expect("accept");
            stations.insert(serial, Some(fingerprint));
        }
        station.handle.shutdown().await;

        // Onboard one phone fully: created (acknowledged PAP), provisioned (certificate issued
        // and completion acknowledged).
        next_mac += 1;
        let mac = format!("0c0000{next_mac:06x}");
        let pap = op.create_phone(&mac).await;
        told.insert(mac.clone(), Told::Pap(pap.clone()));
        let mut profile = PhoneProfile::new(mac.clone());
        profile.pap = Some(pap);
        PhoneState::init(dir.path().join(&mac), &profile).expect("phone init");
        if phone::provision(&dir.path().join(&mac), &target)
            .await
            .expect("provision ran")
            == ProvisionOutcome::Provisioned
        {
            told.insert(mac.clone(), Told::Provisioned);
        }

        // A burst of decisions in flight, and a kill at a random point inside it.
        let mut burst = Vec::new();
        for _ in 0..4 {
            next_mac += 1;
            burst.push(format!("0c0000{next_mac:06x}"));
        }
        let reset_target = told
            .iter()
            .find(|(_, t)| matches!(t, Told::Pap(_)))
            .map(|(m, _)| m.clone());
        // Until its answer comes, the reset may land or not.
        if let Some(mac) = &reset_target {
            if let Some(Told::Pap(pap)) = told.get(mac).cloned() {
                told.insert(mac.clone(), Told::PapOrReset(pap));
            }
        }
        let acked = std::sync::Mutex::new(Vec::new());
        let requests = async {
            for mac in &burst {
                if let Ok(v) = op.call("createPhone", new_phone(mac)).await {
                    let pap = v["pap"].as_str().unwrap_or_default().to_owned();
                    acked.lock().expect("ledger").push((mac.clone(), pap));
                }
            }
            if let Some(mac) = &reset_target {
                if let Ok(v) = op
                    .call("resetPhoneAuthentication", json!({"mac": mac}))
                    .await
                {
                    let pap = v["pap"].as_str().unwrap_or_default().to_owned();
                    acked.lock().expect("ledger").push((mac.clone(), pap));
                }
            }
        };
        let kill_after = Duration::from_millis(rng.next(60));
        let mut fleetd = fleetd;
        let killer = async {
            tokio::time::sleep(kill_after).await;
            fleetd.kill();
        };
        // Requests still waiting for an answer after the kill are abandoned: they were never
        // acknowledged.
        let bounded = async {
            tokio::select! {
                _ = requests => {}
                _ = tokio::time::sleep(kill_after + Duration::from_millis(200)) => {}
            }
        };
        tokio::join!(bounded, killer);
        // Whatever the operator heard back is what must survive; the rest may or may not have
        // landed (and is checked for not being half-done by the next getPhone).
        let acked = std::mem::take(&mut *acked.lock().expect("ledger"));
        for (mac, pap) in acked {
            told.insert(mac, Told::Pap(pap));
        }
        eprintln!("cycle {cycle}: killed after {kill_after:?}, {} phones told; start {t1:?} check {t2:?} all {:?}", told.len(), t0.elapsed());
    }
    // A last restart: the store opens cleanly and holds everything.
    let fleetd = Fleetd::start(FLEETD.as_ref(), &data);
    let target = PhoneTarget::new(fleetd.server.clone(), fleetd.ca_pem());
    let op = fleetd.operator().await;
    check(&op, &told, dir.path(), &target).await;
    check_stations(&op, &stations).await;
    assert!(told.values().filter(|t| **t == Told::Provisioned).count() >= CYCLES / 2);
}
