//! The findings of the outside security review (issue 9), each as the attack that worked and
//! what must hold now: operators are (tenant, name), responses reach only the session that
//! asked, revoked and foreign operator certificates are refused, requests are bounded, the
//! whitelist refuses the whole Internet, PAPs stay out of events.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fleet_tests::raw::{connack, connect_frame, read_until_contains, subscribe_frame, tls};
use fleet_tests::{code_of, TestFleet};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A TLS connector with the operator certificate `name` issued for `tenant` into `out`.
fn operator_connector(
    fleet: &TestFleet,
    data_dir: &Path,
    name: &str,
    tenant: &str,
    out: &Path,
) -> tokio_rustls::TlsConnector {
    let (cert, key) = fleet_certs::data_dir::issue_operator_files_into(data_dir, name, tenant, out)
        .expect("issue");
    let cert = std::fs::read_to_string(cert).expect("cert");
    let key = std::fs::read_to_string(key).expect("key");
    let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Reads for `wait`; returns what arrived (nothing is expected).
async fn read_for<S: AsyncReadExt + Unpin>(stream: &mut S, wait: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn records(audit: &Value) -> Vec<Value> {
    audit["records"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_of_different_tenants_with_the_same_name_share_nothing() {
    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let default_admin = fleet.operator().await;
    let acme_admin = fleet.operator_as("admin", "acme").await;

    // A second session of acme's admin listens on the response topic both share by name.
    let acme_files = fleet.dir.path().join("operators-of-acme");
    let cert = std::fs::read_to_string(acme_files.join("admin.pem")).expect("cert");
    let key = std::fs::read_to_string(acme_files.join("admin.key")).expect("key");
    let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
    let acme = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut listener = tls(&acme, port).await;
    assert_eq!(
        connack(&mut listener, &connect_frame("acme-listener", 60, None)).await,
        0
    );
    listener
        .write_all(&subscribe_frame("fleet/control/admin/response"))
        .await
        .expect("subscribe");
    read_until_contains(&mut listener, &[0x90]).await;

    // default's admin creates a phone: its response (with the PAP) reaches only its session.
    let phone = default_admin
        .call(
            "createPhone",
            json!({"mac": "AA:BB:CC:00:00:01", "vendor": "v", "type": "t", "site": "s"}),
        )
        .await
        .expect("createPhone");
    let pap = phone["pap"].as_str().expect("pap").to_owned();
    let heard = read_for(&mut listener, Duration::from_millis(800)).await;
    assert!(
        !heard.windows(pap.len()).any(|w| w == pap.as_bytes()),
        "another tenant's session heard the response"
    );
    assert!(
        !heard.iter().any(|b| b & 0xF0 == 0x30),
        "no PUBLISH may reach it"
    );

    // Each admin acts in its own tenant, whichever connected last.
    assert_eq!(
        code_of(
            acme_admin
                .call("getPhone", json!({"mac": "aabbcc000001"}))
                .await
        ),
        "not_found"
    );
    acme_admin
        .call("addWhitelistEntry", json!({"entry": "127.0.0.0/8"}))
        .await
        .expect("acme whitelists");
    let default_list = default_admin
        .call("listWhitelist", json!({}))
        .await
        .expect("list");
    assert_eq!(default_list["permanent"], json!([]), "{default_list}");
    acme_admin
        .call(
            "createPhone",
            json!({"mac": "AA:BB:CC:00:00:02", "vendor": "v", "type": "t", "site": "s"}),
        )
        .await
        .expect("acme phone");
    assert_eq!(
        code_of(
            default_admin
                .call("getPhone", json!({"mac": "aabbcc000002"}))
                .await
        ),
        "not_found"
    );
    // The audit records: acme's actions in acme's log, none in default's.
    let acme_audit = acme_admin
        .call("listAuditLog", json!({"limit": 100}))
        .await
        .expect("audit");
    assert!(records(&acme_audit)
        .iter()
        .any(|r| r["action"] == "addWhitelistEntry" && r["tenant"] == "acme"));
    let default_audit = default_admin
        .call("listAuditLog", json!({"limit": 100}))
        .await
        .expect("audit");
    assert!(!records(&default_audit)
        .iter()
        .any(|r| r["action"] == "addWhitelistEntry"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_is_cut_and_refused_at_its_next_connect() {
    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let admin = fleet.operator().await;
    let out = fleet.dir.path().join("bob");
    let bob = operator_connector(&fleet, fleet.data_dir(), "bob", "default", &out);
    let mut live = tls(&bob, port).await;
    assert_eq!(
        connack(&mut live, &connect_frame("bob-1", 60, None)).await,
        0
    );

    let listed = admin.call("listOperators", json!({})).await.expect("list");
    let bob_row = listed["operators"]
        .as_array()
        .expect("operators")
        .iter()
        .find(|o| o["name"] == "bob")
        .cloned()
        .expect("bob listed");
    assert_eq!(bob_row["online"], true, "{listed}");
    assert_eq!(
        code_of(admin.call("revokeOperator", json!({"name": "admin"})).await),
        "invalid_argument"
    );
    let revoked = admin
        .call("revokeOperator", json!({"name": "bob"}))
        .await
        .expect("revoke");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    // The live session is cut at once...
    fleet_tests::raw::until_closed(&mut live).await;
    // ...and the certificate is refused from now on, resumed TLS or not.
    let mut again = tls(&bob, port).await;
    assert_eq!(
        connack(&mut again, &connect_frame("bob-2", 60, None)).await,
        5
    );
    // Its name is not issued again.
    assert!(fleet_certs::data_dir::issue_operator_files_into(
        fleet.data_dir(),
        "bob",
        "default",
        &fleet.dir.path().join("bob-again")
    )
    .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_issued_from_a_copy_of_the_data_directory_is_refused() {
    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let copy = fleet.dir.path().join("copy");
    std::fs::create_dir_all(&copy).expect("copy");
    for file in ["ca.pem", "ca.key"] {
        std::fs::copy(fleet.data_dir().join(file), copy.join(file)).expect("copy");
    }
    let foreign = operator_connector(&fleet, &copy, "admin", "acme", &copy.join("out"));
    let mut stream = tls(&foreign, port).await;
    assert_eq!(
        connack(&mut stream, &connect_frame("foreign", 60, None)).await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_are_paged_and_a_response_is_bounded() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.max_page_size = 2;
        c.limits.max_response_bytes = 65_536;
    })
    .await;
    let admin = fleet.operator().await;
    for i in 0..5 {
        admin
            .call(
                "createPhone",
                json!({"mac": format!("aabbcc0000{i:02}"), "vendor": "v", "type": "t", "site": "s"}),
            )
            .await
            .expect("create");
    }
    let mut seen = Vec::new();
    let mut after = Value::Null;
    loop {
        let page = admin
            .call("listPhones", json!({"after": after, "limit": 100}))
            .await
            .expect("page");
        let phones = page["phones"].as_array().expect("phones");
        assert!(phones.len() <= 2, "{page}");
        seen.extend(phones.iter().map(|p| p["mac"].clone()));
        match page.get("next") {
            Some(next) => after = next.clone(),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");

    // Many reads in one request: past the byte bound they are answered too_large.
    for i in 0..20 {
        admin
            .call(
                "createPhone",
                json!({"mac": format!("aabbcc0001{i:02}"), "vendor": "v", "type": "t", "site": "s".repeat(250)}),
            )
            .await
            .expect("create");
    }
    let big: Vec<Value> = (0..100)
        .map(|i| json!({"command": "exportDevicesCsv", "correlationData": i}))
        .collect();
    let responses = admin.client.request(big).await.expect("request");
    let total: usize = responses.iter().map(|r| r.to_string().len()).sum();
    // The bound, plus at most one short error per command.
    assert!(total <= 65_536 + 100 * 512, "{total} bytes");
    assert!(
        responses.iter().any(|r| r["code"] == "too_large"),
        "{responses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_past_its_budget_is_rate_limited() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.operator_command_burst = 5;
        c.limits.operator_commands_per_second = 1;
    })
    .await;
    let admin = fleet.operator().await;
    let commands: Vec<Value> = (0..10)
        .map(|i| json!({"command": "listWhitelist", "correlationData": i}))
        .collect();
    let responses = admin.client.request(commands).await.expect("request");
    let limited = responses
        .iter()
        .filter(|r| r["code"] == "rate_limited")
        .count();
    assert_eq!(limited, 5, "{responses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whitelist_refuses_the_whole_internet_and_removes_temporary_entries() {
    let fleet = TestFleet::start().await;
    let admin = fleet.operator().await;
    for entry in ["0.0.0.0/0", "::/0"] {
        for force in [false, true] {
            let result = admin
                .call("addWhitelistEntry", json!({"entry": entry, "force": force}))
                .await;
            assert_eq!(code_of(result), "invalid_argument", "{entry} {force}");
        }
    }
    assert_eq!(
        code_of(
            admin
                .call("addWhitelistEntry", json!({"entry": "10.0.0.0/4"}))
                .await
        ),
        "invalid_argument"
    );
    admin
        .call(
            "addWhitelistEntry",
            json!({"entry": "10.0.0.0/4", "force": true}),
        )
        .await
        .expect("forced");
    let err = admin
        .call("addWhitelistEntry", json!({"entry": "10.0.0.1/33"}))
        .await
        .expect_err("bad prefix");
    assert!(format!("{err}").contains("prefix length 33"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paps_never_appear_in_phone_events() {
    let fleet = TestFleet::start().await;
    let mut admin = fleet.operator().await;
    let phone = admin
        .call(
            "createPhone",
            json!({"mac": "AA:BB:CC:00:00:09", "vendor": "v", "type": "t", "site": "s"}),
        )
        .await
        .expect("create");
    let pap = phone["pap"].as_str().expect("pap").to_owned();
    let event = admin
        .wait_event("phones", |e| e["phone"]["mac"] == "aabbcc000009")
        .await;
    assert!(event["phone"].get("pap").is_none(), "{event}");
    assert!(!event.to_string().contains(&pap), "{event}");
}
