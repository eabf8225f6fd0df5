//! Active/standby on a PostgreSQL store: two `fleetd` processes on one database (`[store]
//! url`, a private PostgreSQL server started by the test), the second waits for the controller
//! lock; the one that serves is SIGKILLed in the middle of a burst of operator decisions, the
//! standby takes over, and every acknowledged decision is there, none applied twice, and the
//! stations go on with their state.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use fleet_ctl::ClientError;
use fleet_sim::SimEvent;
use fleet_tests::postgres;
use fleet_tests::process::{
    assert_comes_back_with_state, assert_decisions_kept, Fleetd, PROCESS_PATIENCE,
};
use fleet_tests::Station;
use serde_json::json;

use crate::FLEETD;

/// Stations of the test: the first four get decisions one at a time, the rest in a burst
/// that the kill interrupts.
const STATIONS: usize = 16;
const ONE_AT_A_TIME: usize = 4;

/// Sessions waiting for an advisory lock (the controller lock) in the database at `url`.
fn waiting_for_the_lock(url: &str) -> usize {
    postgres::query_text(
        url,
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .expect("pg_locks")[0]
        .parse()
        .expect("a count")
}

/// The same data directory for another node: every node starts from the same CA, server
/// certificate and operators (issue 14's "shared CA": copied once after `fleetd init`).
fn copy_data_dir(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp runs");
    assert!(
        status.success(),
        "cp -a {} {}",
        from.display(),
        to.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_serves_when_the_leader_is_killed_and_keeps_every_acknowledged_decision() {
    let url = postgres::database();
    let config = format!("[store]\nurl = \"{url}\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let (data_a, data_b) = (dir.path().join("node-a"), dir.path().join("node-b"));
    let leader = Fleetd::start_with_config(FLEETD.as_ref(), &data_a, &config);
    copy_data_dir(&data_a, &data_b);
    let mut standby = Fleetd::launch_with_config(FLEETD.as_ref(), &data_b, &config);
    // The second fleetd waits in PostgreSQL for the controller lock: it does not listen.
    let deadline = Instant::now() + PROCESS_PATIENCE;
    while waiting_for_the_lock(&url) != 1 {
        assert!(standby.exited().is_none(), "the standby exited");
        assert!(
            Instant::now() < deadline,
            "the standby never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut op = leader.operator().await;
    let serials: Vec<String> = (1..=STATIONS).map(|i| format!("FAIL-{i}")).collect();
    let stations: Vec<Station> = serials
        .iter()
        .map(|serial| leader.station(dir.path().join(serial), serial, "6.1.0"))
        .collect();
    let mut fingerprints = Vec::new();
    for serial in &serials {
        fingerprints.push(op.wait_request(serial).await);
    }
    let decision = |i: usize| {
        if i % 4 == 3 {
            ("rejectStation", "rejected")
        } else {
            ("acceptStation", "authorized")
        }
    };
    // Acknowledged, one at a time.
    let mut acknowledged: BTreeMap<String, &str> = BTreeMap::new();
    for i in 0..ONE_AT_A_TIME {
        let (command, outcome) = decision(i);
        let args = json!({"serial": serials[i], "fingerprint": fingerprints[i]});
        op.call(command, args)
            .await
            .unwrap_or_else(|e| panic!("{command} {}: {e}", serials[i]));
        acknowledged.insert(serials[i].clone(), outcome);
    }
    // A burst, and the kill in its middle (once its first answer came): whatever was
    // acknowledged must survive it.
    let mut leader = leader;
    let first_answer = tokio::sync::Notify::new();
    let burst = async {
        let calls = (ONE_AT_A_TIME..STATIONS).map(|i| {
            let (command, outcome) = decision(i);
            let args = json!({"serial": serials[i], "fingerprint": fingerprints[i]});
            let (op, first_answer) = (&op, &first_answer);
            async move {
                let answer = op.call(command, args).await;
                first_answer.notify_one();
                (i, outcome, answer)
            }
        });
        futures_util::future::join_all(calls).await
    };
    let kill = async {
        first_answer.notified().await;
        leader.kill();
    };
    let (answers, ()) = tokio::join!(burst, kill);
    let killed = Instant::now();
    let mut in_the_burst = 0;
    for (i, outcome, answer) in answers {
        if answer.is_ok() {
            acknowledged.insert(serials[i].clone(), outcome);
            in_the_burst += 1;
        }
    }
    eprintln!(
        "failover: {in_the_burst} of the burst's {} decisions acknowledged before the kill",
        STATIONS - ONE_AT_A_TIME
    );
    drop(op);
    for station in stations {
        station.handle.shutdown().await;
    }

    // The standby takes the lock the moment the killed one's database session ends.
    let standby = standby.serving(PROCESS_PATIENCE);
    eprintln!(
        "failover: the standby listened {:?} after the kill",
        killed.elapsed()
    );
    let op = standby.operator().await;
    // Every acknowledged decision is there, none applied twice.
    assert_decisions_kept(&op, &acknowledged).await;
    // The stations reconnect through the node that serves now, with their state: an
    // authorized one is told so, a rejected one is not.
    for (serial, outcome) in &acknowledged {
        let server = (standby.server.clone(), standby.ca_pem());
        assert_comes_back_with_state(&op, server, dir.path().join(serial), serial, outcome).await;
    }
}

/// Accepts `serial` (its key `fingerprint`) through `op`, trying again every 200 ms until an
/// answer is not `internal` (the store unavailable) or the patience is spent; the last answer.
async fn accept_until_answered(
    op: &fleet_tests::Operator,
    serial: &str,
    fingerprint: &str,
) -> Result<serde_json::Value, ClientError> {
    let deadline = Instant::now() + PROCESS_PATIENCE;
    loop {
        let answer = op
            .call(
                "acceptStation",
                json!({"serial": serial, "fingerprint": fingerprint}),
            )
            .await;
        let unavailable =
            matches!(&answer, Err(ClientError::CommandFailed { code, .. }) if code == "internal");
        if !unavailable || Instant::now() > deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_costs_answers_but_no_decision_and_fleetd_recovers_by_itself() {
    // A server of its own: this test stops it.
    let server = postgres::Server::start().expect("a private PostgreSQL server");
    let url = server.create_database("restarted").expect("a database");
    let config = format!("[store]\nurl = \"{url}\"\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut fleetd = Fleetd::start_with_config(FLEETD.as_ref(), &dir.path().join("data"), &config);
    let mut op = fleetd.operator().await;
    let (first, second) = ("PGRS-1", "PGRS-2");
    let mut one = fleetd.station(dir.path().join(first), first, "6.1.0");
    let two = fleetd.station(dir.path().join(second), second, "6.1.0");
    let key_one = op.wait_request(first).await;
    let key_two = op.wait_request(second).await;
    op.call(
        "acceptStation",
        json!({"serial": first, "fingerprint": key_one}),
    )
    .await
    .expect("accepted while PostgreSQL runs");
    one.wait_event(SimEvent::Authorized).await;

    // PostgreSQL goes away: a decision is refused (`internal`), and nothing is told.
    server.stop().expect("PostgreSQL stops");
    let refused = op
        .call(
            "acceptStation",
            json!({"serial": second, "fingerprint": key_two}),
        )
        .await;
    assert!(
        matches!(&refused, Err(ClientError::CommandFailed { code, .. }) if code == "internal"),
        "no decision without the store: {refused:?}"
    );

    // Back after a few seconds: fleetd takes its lock again by itself (nobody else served),
    // and the decision that was refused can be taken now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    server.restart().expect("PostgreSQL starts again");
    let accepted = accept_until_answered(&op, second, &key_two).await;
    assert!(accepted.is_ok(), "{accepted:?}");
    assert!(fleetd.exited().is_none(), "fleetd went on serving");
    for serial in [first, second] {
        let view = op.station(serial).await;
        assert!(
            view["state"] == "running" || view["state"] == "not_running",
            "{serial}: {view}"
        );
    }
    drop(op);
    one.handle.shutdown().await;
    two.handle.shutdown().await;
    fleetd.kill();
}
