//! The audit log over the wire: every record is hash-chained per tenant, and an operator can
//! page through its whole chain and verify it (what `fleetctl audit verify` does).

use fleet_tests::{authorize, TestFleet};
use serde_json::{json, Value};

/// Small pages, so that the test walks several of them.
const PAGE: usize = 3;

async fn whole_chain(op: &fleet_tests::Operator) -> Vec<Value> {
    let mut records = Vec::new();
    let mut after = 0u64;
    loop {
        let page = op
            .call("listAuditLog", json!({"after_seq": after, "limit": PAGE}))
            .await
            .expect("page");
        let page = page["records"].as_array().cloned().unwrap_or_default();
        // Each listAuditLog is audited itself: stop at a short page.
        let short = page.len() < PAGE;
        if let Some(last) = page.last() {
            after = last["seq"].as_u64().expect("seq");
        }
        records.extend(page);
        if short {
            return records;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_verifies_its_tenants_whole_audit_chain() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("AU-1", "6.1.0");
    authorize(&mut op, &mut station).await;
    let other = fleet.operator_as("eve", "elsewhere").await;
    other
        .call("addWhitelistEntry", json!({"entry": "192.0.2.0/24"}))
        .await
        .expect("another tenant's record");

    let records = whole_chain(&op).await;
    assert!(
        records.len() > 2 * PAGE,
        "paged through several pages: {}",
        records.len()
    );
    assert!(records.iter().all(|r| r["tenant"] == "default"));
    fleet_ctl::audit::verify_chain(&records, None).expect("the chain is intact");
    // A removed record in the middle is detected.
    let mut gapped = records.clone();
    gapped.remove(records.len() / 2);
    assert!(fleet_ctl::audit::verify_chain(&gapped, None).is_err());
    // The other tenant's chain is its own.
    let theirs = whole_chain(&other).await;
    assert!(theirs.iter().all(|r| r["tenant"] == "elsewhere"));
    fleet_ctl::audit::verify_chain(&theirs, None).expect("their chain is intact");
}
