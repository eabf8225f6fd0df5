//! Floods: per source address limits on connection rate and on failed authentications across
//! all devices, and a refusal audit that a flood cannot blow up.

use fleet_sim::phone::ProvisionOutcome;
use fleet_tests::raw::{anonymous_connector, tls_from};
use fleet_tests::{wrong_pap, TestFleet};
use serde_json::json;
use time::Duration;

async fn refusals(op: &fleet_tests::Operator, needle: &str) -> usize {
    let audit = op
        .call("listAuditLog", json!({"limit": 10000}))
        .await
        .expect("audit");
    audit["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| {
            r["outcome"] == "refused" && r["reason"].as_str().is_some_and(|t| t.contains(needle))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pap_guesses_over_many_macs_are_slowed_then_refused_and_audited() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.failed_auth_per_ip = 6;
        c.limits.failed_auth_delay_ms = 20;
    })
    .await;
    let op = fleet.operator().await;
    let mut paps = Vec::new();
    for i in 0..8 {
        let mac = format!("0200000000{i:02x}");
        paps.push((mac.clone(), op.create_phone(&mac).await));
    }
    // One guess per MAC: no single phone ever reaches its own lockout.
    for (mac, pap) in &paps[..6] {
        let phone = fleet.phone(mac, None, "127.0.0.7");
        assert_eq!(phone.connect_raw(Some(&wrong_pap(pap))).await, 4, "{mac}");
    }
    // The sprayer's address is now refused, even with a right PAP; no PAP is checked.
    let (mac, pap) = &paps[6];
    let sprayer = fleet.phone(mac, Some(pap), "127.0.0.7");
    assert_eq!(sprayer.connect_raw(Some(pap)).await, 5);
    assert_eq!(
        op.call("getPhone", json!({"mac": mac})).await.expect("get")["auth_state"],
        "authentication_needed"
    );
    assert!(
        refusals(&op, "too many failed authentications").await >= 1,
        "audited"
    );
    // Another address is not affected.
    let (mac, pap) = &paps[7];
    let honest = fleet.phone(mac, Some(pap), "127.0.0.8");
    assert_eq!(honest.provision().await, ProvisionOutcome::Provisioned);
    // The block ends after `failed_auth_block_minutes`.
    fleet.clock.advance(Duration::minutes(16));
    assert_eq!(sprayer.provision().await, ProvisionOutcome::Provisioned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_rate_is_limited_per_address_and_its_refusals_audited_within_a_budget() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.connections_per_ip_per_minute = 5;
        c.limits.refusal_audits_per_ip_per_minute = 3;
    })
    .await;
    let op = fleet.operator().await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);
    let flooder = "127.0.0.9".parse().expect("ip");
    let mut open = Vec::new();
    for _ in 0..5 {
        open.push(
            tls_from(&connector, port, flooder)
                .await
                .expect("within the rate"),
        );
    }
    let mut refused = 0;
    for _ in 0..30 {
        if tls_from(&connector, port, flooder).await.is_err() {
            refused += 1;
        }
    }
    assert_eq!(refused, 30, "closed before the TLS handshake");
    // Another address is not affected.
    tls_from(&connector, port, "127.0.0.10".parse().expect("ip"))
        .await
        .expect("another address");
    let audited = refusals(&op, "connection rate").await;
    assert!(
        (1..=3).contains(&audited),
        "audited within the budget: {audited}"
    );
}
