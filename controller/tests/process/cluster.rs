//! A cluster of processes, as `deploy/local-cluster.sh` starts it (three NATS servers,
//! PostgreSQL, two controllers of which one serves, two edges), with `kill -9` of its parts:
//! the edge that holds stations (they come back through the other edge, behind a TCP
//! balancer, with their state), and the serving controller in the middle of a burst of
//! operator decisions (the standby serves, and every acknowledged decision is there once);
//! and PostgreSQL stopped under it for a few seconds (answers are lost, decisions are not, and
//! the cluster recovers by itself).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use fleet_sim::{spawn_station, SimConfig, SimEvent};
use fleet_tests::local_cluster::{Balancer, LocalCluster};
use fleet_tests::process::{assert_comes_back_with_state, assert_decisions_kept, PROCESS_PATIENCE};
use fleet_tests::Station;
use serde_json::json;

use crate::FLEETD;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_killed_with_kill_9_leaves_its_stations_to_the_other_edge_with_their_state() {
    let cluster = LocalCluster::up(FLEETD.as_ref());
    let edges = cluster.edges();
    // The devices' way in: the first edge while it lives, then the second.
    let balancer = Balancer::start(edges.clone()).await;
    let mut op = cluster.answering_operator(&edges[1]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (kept, refused) = ("EDGE-KEPT", "EDGE-REFUSED");
    let mut accepted = cluster.station(dir.path().join(kept), kept, &balancer.server());
    let rejected = cluster.station(dir.path().join(refused), refused, &balancer.server());
    let key = op.wait_request(kept).await;
    let other_key = op.wait_request(refused).await;
    op.call("acceptStation", json!({"serial": kept, "fingerprint": key}))
        .await
        .expect("accepted through the other edge");
    op.call(
        "rejectStation",
        json!({"serial": refused, "fingerprint": other_key}),
    )
    .await
    .expect("rejected through the other edge");
    accepted.wait_event(SimEvent::Authorized).await;
    // A rejected station is refused at every connect; it is off while the edge dies, so that
    // what it hears next comes from the other edge.
    rejected.handle.shutdown().await;

    // The edge that holds the accepted one dies without a word.
    cluster.kill("edges", 0);
    let lost = |e: &SimEvent| matches!(e, SimEvent::Disconnected { .. }).then_some(());
    accepted.wait_for("the connection lost", lost).await;
    let back = |e: &SimEvent| matches!(e, SimEvent::Connected { .. }).then_some(());
    accepted.wait_for("connected again", back).await;
    // Admitted through the second edge with its state: authorized, and told so.
    accepted.wait_event(SimEvent::Authorized).await;
    // The rejected one, through the second edge: still refused as rejected.
    let mut config = SimConfig::new(balancer.server(), cluster.ca_pem());
    config.retry = Duration::from_millis(200);
    let mut rejected = Station {
        serial: refused.to_owned(),
        dir: dir.path().join(refused),
        handle: spawn_station(dir.path().join(refused), config),
    };
    let reason = rejected
        .wait_for("a refusal", |e| match e {
            SimEvent::Refused { code, reason } => Some((code.clone(), reason.clone())),
            _ => None,
        })
        .await;
    assert_eq!(reason.0, "NotAuthorized", "{reason:?}");
    assert!(
        reason.1.as_deref().is_some_and(|r| r.contains("rejected")),
        "refused as rejected: {reason:?}"
    );
    let view = op.station(refused).await;
    assert_eq!(view["state"], "rejected", "stays rejected: {view}");
    let view = op.station(kept).await;
    assert!(
        view["state"] == "running" || view["state"] == "not_running",
        "stays authorized: {view}"
    );
    drop(op);
    accepted.handle.shutdown().await;
    rejected.handle.shutdown().await;
}

/// Stations of the controller test: the first three get decisions one at a time, the rest in
/// a burst that the kill interrupts.
const STATIONS: usize = 12;
const ONE_AT_A_TIME: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_controller_serves_when_the_leader_is_killed_in_a_burst_and_keeps_every_decision(
) {
    let cluster = LocalCluster::up(FLEETD.as_ref());
    let edges = cluster.edges();
    let mut op = cluster.answering_operator(&edges[1]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let serials: Vec<String> = (1..=STATIONS).map(|i| format!("CLFAIL-{i}")).collect();
    // On both edges, alternately.
    let stations: Vec<Station> = serials
        .iter()
        .enumerate()
        .map(|(i, serial)| cluster.station(dir.path().join(serial), serial, &edges[i % 2]))
        .collect();
    let mut fingerprints = Vec::new();
    for serial in &serials {
        fingerprints.push(op.wait_request(serial).await);
    }
    let decision = |i: usize| match i % 3 {
        2 => ("rejectStation", "rejected"),
        _ => ("acceptStation", "authorized"),
    };
    let mut acknowledged: BTreeMap<String, &str> = BTreeMap::new();
    for i in 0..ONE_AT_A_TIME {
        let (command, outcome) = decision(i);
        let args = json!({"serial": serials[i], "fingerprint": fingerprints[i]});
        op.call(command, args)
            .await
            .unwrap_or_else(|e| panic!("{command} {}: {e}", serials[i]));
        acknowledged.insert(serials[i].clone(), outcome);
    }
    // The burst: waves of three decisions at once, and the serving controller killed the
    // moment the first wave is answered, while the second is on its way; the third leaves
    // after the kill. So the kill lands in the burst by construction.
    let first_wave_answered = tokio::sync::Notify::new();
    let burst = async {
        let mut answers = Vec::new();
        let indices: Vec<usize> = (ONE_AT_A_TIME..STATIONS).collect();
        for (wave, chunk) in indices.chunks(3).enumerate() {
            let calls = chunk.iter().map(|&i| {
                let (command, outcome) = decision(i);
                let args = json!({"serial": serials[i], "fingerprint": fingerprints[i]});
                let op = &op;
                async move { (i, outcome, op.call(command, args).await) }
            });
            let answered = futures_util::future::join_all(calls).await;
            if wave == 0 {
                for (i, _, answer) in &answered {
                    assert!(
                        answer.is_ok(),
                        "{} before the kill: {answer:?}",
                        serials[*i]
                    );
                }
                first_wave_answered.notify_one();
            }
            answers.extend(answered);
        }
        answers
    };
    // From the kill to the first command answered (a new operator through the other edge,
    // each try waiting 1 s at most for its answer).
    let kill = async {
        first_wave_answered.notified().await;
        cluster.kill("controllers", 0);
        let killed = Instant::now();
        let deadline = killed + PROCESS_PATIENCE;
        while cluster
            .answer_through(&edges[0], Duration::from_secs(1))
            .await
            .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "no controller answered after the kill"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        killed.elapsed()
    };
    let (answers, failover) = tokio::join!(burst, kill);
    let mut in_the_burst = 0;
    for (i, outcome, answer) in answers {
        if answer.is_ok() {
            acknowledged.insert(serials[i].clone(), outcome);
            in_the_burst += 1;
        }
    }
    eprintln!(
        "cluster failover: {in_the_burst} of the burst's {} decisions acknowledged",
        STATIONS - ONE_AT_A_TIME
    );
    drop(op);
    for station in stations {
        station.handle.shutdown().await;
    }

    // The standby took the lock when the killed one's database session ended, and answered
    // through the edges. (The time is printed, not asserted: the 5 s is a figure for
    // BENCHMARKS.md, and CI machines are noisy.)
    eprintln!("cluster failover: kill to the first answered command: {failover:?}");
    let op = cluster.answering_operator(&edges[0]).await;
    assert_decisions_kept(&op, &acknowledged).await;
    // The stations come back, through either edge, with their state.
    for (i, (serial, outcome)) in acknowledged.iter().enumerate() {
        let server = (edges[i % 2].clone(), cluster.ca_pem());
        assert_comes_back_with_state(&op, server, dir.path().join(serial), serial, outcome).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgresql_stopped_under_the_cluster_costs_answers_but_no_decision_and_it_recovers() {
    let cluster = LocalCluster::up(FLEETD.as_ref());
    let edges = cluster.edges();
    let mut op = cluster.answering_operator(&edges[1]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, second) = ("CLPG-1", "CLPG-2");
    let mut one = cluster.station(dir.path().join(first), first, &edges[0]);
    let two = cluster.station(dir.path().join(second), second, &edges[0]);
    let key_one = op.wait_request(first).await;
    let key_two = op.wait_request(second).await;
    op.call(
        "acceptStation",
        json!({"serial": first, "fingerprint": key_one}),
    )
    .await
    .expect("accepted while PostgreSQL runs");
    one.wait_event(SimEvent::Authorized).await;

    // No store: the decision is not taken (`internal`, or no answer at all).
    cluster.postgres("stop");
    let refused = op
        .call(
            "acceptStation",
            json!({"serial": second, "fingerprint": key_two}),
        )
        .await;
    assert!(
        refused.is_err(),
        "no decision without the store: {refused:?}"
    );
    drop(op);
    // A few seconds without it (the scenario's length, not a wait for an event).
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.postgres("start");

    // A controller serves again by itself (the one that did, or the standby), and the
    // decision that was refused is taken now.
    let deadline = Instant::now() + PROCESS_PATIENCE;
    let op = loop {
        let op = cluster.answering_operator(&edges[1]).await;
        let answer = op
            .call(
                "acceptStation",
                json!({"serial": second, "fingerprint": key_two}),
            )
            .await;
        match answer {
            Ok(_) => break op,
            Err(e) => {
                assert!(Instant::now() < deadline, "never accepted again: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    for serial in [first, second] {
        // Read again if the answer is lost with the connection (seen once in a full run).
        let view =
            fleet_tests::process::call_until_answered(&op, "getStation", json!({"serial": serial}))
                .await;
        assert!(
            view["state"] == "running" || view["state"] == "not_running",
            "{serial}: {view}"
        );
    }
    let decided = fleet_tests::process::decisions(&op).await;
    assert_eq!(decided.get(first), Some(&1), "{decided:?}");
    assert_eq!(decided.get(second), Some(&1), "{decided:?}");
    drop(op);
    one.handle.shutdown().await;
    two.handle.shutdown().await;
}
