//! The phone manual's sections (seeds/002), one test each, named after them, against the real
//! service with real TLS, simulated phones bound to 127.0.0.x source addresses (phones behind
//! different public IPs), and a simulated clock for the 30-minute and 8-hour rules.

use fleet_protocol::Filter;
use fleet_sim::phone::{self, PhoneError, ProvisionOutcome};
use fleet_tests::{code_of, mac, wrong_pap, TestFleet, TestPhone};
use serde_json::json;
use time::Duration;

const ME: &str = "127.0.0.2";

async fn auth_state(op: &fleet_tests::Operator, mac: &str) -> String {
    let view = op
        .call("getPhone", json!({"mac": mac}))
        .await
        .expect("getPhone");
    view["auth_state"].as_str().expect("auth_state").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_of_phones() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let view = op
        .call(
            "createPhone",
            json!({"mac": "AA:BB:CC:00:00:01", "vendor": "Yealink", "type": "T54W", "site": "Berlin"}),
        )
        .await
        .expect("createPhone");
    assert_eq!(view["mac"], "aabbcc000001", "MAC normalised");
    assert_eq!(view["auth_state"], "authentication_needed");
    let pap = view["pap"].as_str().expect("pap");
    assert!(
        pap.len() == 6 && pap.bytes().all(|b| b.is_ascii_digit()),
        "{pap}"
    );
    let listed = op.call("listPhones", json!({})).await.expect("list");
    assert_eq!(listed["phones"][0]["mac"], "aabbcc000001");
    let again = op
        .call(
            "createPhone",
            json!({"mac": "aabbcc000001", "vendor": "x", "type": "y"}),
        )
        .await;
    assert_eq!(code_of(again), "invalid_argument");
    let bad = op
        .call(
            "createPhone",
            json!({"mac": "nope", "vendor": "x", "type": "y"}),
        )
        .await;
    assert_eq!(code_of(bad), "invalid_argument");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_1_authentication_successful() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000002").await;
    let phone = fleet.phone("aabbcc000002", Some(&pap), ME);
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    assert_eq!(
        auth_state(&op, "aabbcc000002").await,
        "authentication_successful"
    );
    let view = op
        .call("getPhone", json!({"mac": "aabbcc000002"}))
        .await
        .expect("get");
    assert!(
        view.get("pap").is_none_or(|p| p.is_null()),
        "no PAP once provisioned: {view}"
    );
    // Later connections use the certificate, with data rights.
    let mut session = phone.connect().await.expect("certificate accepted");
    assert_eq!(
        session
            .subscribe(&Filter::PhoneData(mac("aabbcc000002")).to_string())
            .await
            .expect("suback"),
        1
    );
    // The PAP is no longer valid.
    assert_eq!(phone.connect_raw(Some(&pap)).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_2_three_failures_authentication_failed() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000003").await;
    let phone = fleet.phone("aabbcc000003", None, ME);
    for _ in 0..3 {
        assert_eq!(
            phone.connect_raw(Some(&wrong_pap(&pap))).await,
            4,
            "wrong PAP: 4"
        );
    }
    assert_eq!(
        auth_state(&op, "aabbcc000003").await,
        "authentication_failed"
    );
    // While failed, no PAP is even checked: the right one is refused too.
    assert_eq!(phone.connect_raw(Some(&pap)).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_3_back_to_needed_after_30_minutes() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000004").await;
    let phone = fleet.phone("aabbcc000004", Some(&pap), ME);
    for _ in 0..3 {
        assert_eq!(phone.connect_raw(Some(&wrong_pap(&pap))).await, 4);
    }
    fleet.clock.advance(Duration::minutes(29));
    assert_eq!(
        auth_state(&op, "aabbcc000004").await,
        "authentication_failed"
    );
    assert_eq!(phone.connect_raw(Some(&pap)).await, 5);
    fleet.clock.advance(Duration::minutes(2));
    assert_eq!(
        auth_state(&op, "aabbcc000004").await,
        "authentication_needed"
    );
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_4_authentication_blocked_and_brute_force() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000005").await;
    let phone = fleet.phone("aabbcc000005", None, ME);
    // A guesser: 3 lockouts of 3 wrong PAPs, waiting out each lockout.
    let mut guesses = 0;
    for round in 0..3 {
        for _ in 0..3 {
            assert_eq!(phone.connect_raw(Some(&wrong_pap(&pap))).await, 4);
            guesses += 1;
        }
        if round < 2 {
            assert_eq!(
                auth_state(&op, "aabbcc000005").await,
                "authentication_failed"
            );
            fleet.clock.advance(Duration::minutes(31));
        }
    }
    assert_eq!(guesses, 9, "the configured number of tries");
    assert_eq!(
        auth_state(&op, "aabbcc000005").await,
        "authentication_blocked"
    );
    // Blocked for good: the right PAP is refused, even days later.
    assert_eq!(phone.connect_raw(Some(&pap)).await, 5);
    fleet.clock.advance(Duration::days(3));
    assert_eq!(phone.connect_raw(Some(&pap)).await, 5);
    assert_eq!(
        auth_state(&op, "aabbcc000005").await,
        "authentication_blocked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transition_5_reset_back_to_needed() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000006").await;
    let phone = fleet.phone("aabbcc000006", None, ME);
    for round in 0..3 {
        for _ in 0..3 {
            phone.connect_raw(Some(&wrong_pap(&pap))).await;
        }
        if round < 2 {
            fleet.clock.advance(Duration::minutes(31));
        }
    }
    assert_eq!(
        auth_state(&op, "aabbcc000006").await,
        "authentication_blocked"
    );
    let view = op
        .call("resetPhoneAuthentication", json!({"mac": "aabbcc000006"}))
        .await
        .expect("reset");
    assert_eq!(view["auth_state"], "authentication_needed");
    let new = view["pap"].as_str().expect("new PAP").to_owned();
    // The right PAP is refused until the reset; the old one stays refused after it.
    assert_eq!(phone.connect_raw(Some(&pap)).await, 4);
    phone.set_pap(Some(&new));
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_authentication() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    op.create_phone("aabbcc000007").await;
    let phone = fleet.phone("aabbcc000007", None, ME);
    assert_eq!(phone.connect_raw(None).await, 4, "a PAP is required");
    op.call("suspendPhoneAuthentication", json!({"mac": "aabbcc000007"}))
        .await
        .expect("suspend");
    fleet.clock.advance(Duration::minutes(29));
    assert_eq!(
        phone.connect_raw(None).await,
        0,
        "no authentication for 30 minutes"
    );
    fleet.clock.advance(Duration::minutes(2));
    assert_eq!(
        phone.connect_raw(None).await,
        4,
        "required again after 30 minutes"
    );
    op.call("suspendPhoneAuthentication", json!({"mac": "aabbcc000007"}))
        .await
        .expect("suspend");
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_authentication() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000008").await;
    let phone = fleet.phone("aabbcc000008", Some(&pap), ME);
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    let mut session = phone.connect().await.expect("certificate accepted");
    let view = op
        .call("resetPhoneAuthentication", json!({"mac": "aabbcc000008"}))
        .await
        .expect("reset");
    let new = view["pap"].as_str().expect("new PAP").to_owned();
    assert_ne!(new, pap);
    // The live session was cut before the operator heard back; the certificate is refused on
    // every later handshake (resumed TLS sessions included), and the old PAP too.
    tokio::time::timeout(fleet_tests::PATIENCE, session.closed())
        .await
        .expect("live session cut");
    assert!(matches!(
        phone.connect().await,
        Err(PhoneError::Refused { code: 5 })
    ));
    // (From another address: this one is on the temporary whitelist since the first PAP.)
    let elsewhere = phone.behind("127.0.0.3");
    assert_eq!(elsewhere.connect_raw(Some(&pap)).await, 4);
    elsewhere.set_pap(Some(&new));
    assert_eq!(elsewhere.provision().await, ProvisionOutcome::Provisioned);
    elsewhere.connect().await.expect("new certificate accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factory_reset_requires_reset_authentication() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000009").await;
    let phone = fleet.phone("aabbcc000009", Some(&pap), ME);
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    phone.factory_reset();
    phone.set_pap(Some(&pap));
    assert_eq!(
        phone.provision().await,
        ProvisionOutcome::Refused {
            code: 5,
            reason: Some("phone is provisioned: it must connect with its certificate".into())
        }
    );
    let view = op
        .call("resetPhoneAuthentication", json!({"mac": "aabbcc000009"}))
        .await
        .expect("reset");
    phone.set_pap(view["pap"].as_str());
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_whitelisting() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    op.create_phone("aabbcc00000a").await;
    op.create_phone("aabbcc00000b").await;
    let inside = fleet.phone("aabbcc00000a", None, "127.0.0.5");
    let outside = fleet.phone("aabbcc00000b", None, "127.0.0.9");
    assert_eq!(inside.connect_raw(None).await, 4);
    op.call("addWhitelistEntry", json!({"entry": "127.0.0.4/30"}))
        .await
        .expect("add CIDR");
    op.call("addWhitelistEntry", json!({"entry": "2001:db8::7"}))
        .await
        .expect("add IPv6 address");
    let bad = op
        .call("addWhitelistEntry", json!({"entry": "127.0.0.300"}))
        .await;
    assert_eq!(code_of(bad), "invalid_argument");
    let list = op.call("listWhitelist", json!({})).await.expect("list");
    let permanent: Vec<&str> = list["permanent"]
        .as_array()
        .expect("permanent")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        permanent.contains(&"127.0.0.4/30") && permanent.contains(&"2001:db8::7"),
        "{list}"
    );
    // No PAP from inside the range; outside it one is still needed.
    assert_eq!(inside.provision().await, ProvisionOutcome::Provisioned);
    assert_eq!(outside.connect_raw(None).await, 4);
    op.call("removeWhitelistEntry", json!({"entry": "127.0.0.4/30"}))
        .await
        .expect("remove");
    let gone = op
        .call("removeWhitelistEntry", json!({"entry": "127.0.0.4/30"}))
        .await;
    assert_eq!(code_of(gone), "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_whitelisting() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc00000c").await;
    for mac in ["aabbcc00000d", "aabbcc00000e", "aabbcc00000f"] {
        op.create_phone(mac).await;
    }
    let site = "127.0.0.6";
    // Granted: a successful PAP puts the address on the temporary whitelist for 8 hours.
    let first = fleet.phone("aabbcc00000c", Some(&pap), site);
    assert_eq!(first.provision().await, ProvisionOutcome::Provisioned);
    let list = op.call("listWhitelist", json!({})).await.expect("list");
    assert_eq!(list["temporary"][0]["ip"], site, "{list}");
    fleet.clock.advance(Duration::hours(7));
    let second = fleet.phone("aabbcc00000d", None, site);
    assert_eq!(
        second.provision().await,
        ProvisionOutcome::Provisioned,
        "no PAP needed"
    );
    // Extended: that provisioning extended the period by 8 hours from then.
    fleet.clock.advance(Duration::hours(7));
    let third = fleet.phone("aabbcc00000e", None, site);
    assert_eq!(
        third.provision().await,
        ProvisionOutcome::Provisioned,
        "still whitelisted"
    );
    // Expired: 8 hours after the last provisioning a PAP is needed again.
    fleet
        .clock
        .advance(Duration::hours(8) + Duration::minutes(1));
    let fourth = fleet.phone("aabbcc00000f", None, site);
    assert_eq!(fourth.connect_raw(None).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000010").await;
    op.call(
        "createPhone",
        json!({"mac": "aabbcc000011", "vendor": "=HYPERLINK(\"http://x\")", "type": "a,b", "site": "+1"}),
    )
    .await
    .expect("create");
    let done = op.create_phone("aabbcc000012").await;
    let phone = fleet.phone("aabbcc000012", Some(&done), ME);
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);

    let csv = op
        .call("exportDevicesCsv", json!({}))
        .await
        .expect("export");
    let csv = csv["csv"].as_str().expect("csv");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("vendor,type,mac,created_at,site,auth_state,pap")
    );
    let rows: Vec<&str> = lines.collect();
    let row = |mac: &str| *rows.iter().find(|r| r.contains(mac)).expect("row");
    assert!(row("aabbcc000010").ends_with(&format!(",authentication_needed,{pap}")));
    assert!(
        row("aabbcc000012").ends_with(",authentication_successful,"),
        "no PAP once successful"
    );
    // Formula-safe and RFC 4180 quoted.
    let risky = row("aabbcc000011");
    assert!(
        risky.starts_with("\"'=HYPERLINK(\"\"http://x\"\")\",\"a,b\""),
        "{risky}"
    );
    assert!(risky.contains(",'+1,"), "{risky}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_import_with_bad_lines() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let csv = "vendor,type,mac,created_at,site,auth_state,pap\n\
               Yealink,T54W,aa:bb:cc:00:01:01,,Berlin,,\n\
               Yealink,T54W,not-a-mac,,Berlin,,\n\
               Snom,D785,AABBCC000102,,Munich,,999999\n\
               ,D785,aabbcc000103,,Munich,,\n";
    let result = op
        .call("importPhonesCsv", json!({"csv": csv}))
        .await
        .expect("import");
    let created: Vec<&str> = result["created"]
        .as_array()
        .expect("created")
        .iter()
        .filter_map(|p| p["mac"].as_str())
        .collect();
    assert_eq!(created, ["aabbcc000101", "aabbcc000102"]);
    let bad_lines: Vec<u64> = result["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["line"].as_u64())
        .collect();
    assert_eq!(bad_lines, [3, 5]);
    // The imported phones got their own PAPs, not the one in the file.
    let view = op
        .call("getPhone", json!({"mac": "aabbcc000102"}))
        .await
        .expect("get");
    assert_ne!(view["pap"], "999999");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_isolation() {
    let fleet = TestFleet::start().await;
    let a = fleet.operator().await;
    let b = fleet.operator_as("bob", "acme").await;
    a.create_phone("aabbcc000020").await;
    // Tenant B's operator neither sees nor changes tenant A's phones.
    let listed = b.call("listPhones", json!({})).await.expect("list");
    assert_eq!(listed["phones"].as_array().map(Vec::len), Some(0));
    for command in [
        "getPhone",
        "resetPhoneAuthentication",
        "suspendPhoneAuthentication",
        "deletePhone",
    ] {
        let result = b.call(command, json!({"mac": "aabbcc000020"})).await;
        assert_eq!(code_of(result), "not_found", "{command}");
    }
    let csv = b.call("exportDevicesCsv", json!({})).await.expect("export");
    assert!(!csv["csv"]
        .as_str()
        .unwrap_or_default()
        .contains("aabbcc000020"));
    // Tenant B's whitelist does not lift the PAP for tenant A's phones.
    b.call("addWhitelistEntry", json!({"entry": "127.0.0.0/8"}))
        .await
        .expect("whitelist");
    let listed = a.call("listWhitelist", json!({})).await.expect("list");
    assert_eq!(listed["permanent"].as_array().map(Vec::len), Some(0));
    let phone = fleet.phone("aabbcc000020", None, ME);
    assert_eq!(phone.connect_raw(None).await, 4);
    assert_eq!(
        auth_state(&a, "aabbcc000020").await,
        "authentication_needed"
    );
}

#[allow(dead_code)]
fn _uses(_: TestPhone, _: &phone::PhoneTarget) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_whitelisting_of_an_ipv6_address() {
    // A dual-stack listener: IPv4 clients arrive as IPv4-mapped addresses, IPv6 ones as they are.
    let fleet = TestFleet::start_with(|c| c.server.listen = "[::]:0".parse().expect("addr")).await;
    let op = fleet.operator().await;
    op.create_phone("aabbcc000030").await;
    let mut phone = fleet.phone("aabbcc000030", None, "::1");
    phone.target.server = format!("[::1]:{}", fleet.fleet.local_addr().port());
    assert_eq!(phone.connect_raw(None).await, 4, "a PAP is needed");
    op.call("addWhitelistEntry", json!({"entry": "::1"}))
        .await
        .expect("add IPv6 address");
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    // The IPv4 side of the same listener is not whitelisted by it.
    op.create_phone("aabbcc000031").await;
    let v4 = fleet.phone("aabbcc000031", None, ME);
    assert_eq!(v4.connect_raw(None).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_phone_certificate_is_refused_on_a_resumed_tls_session() {
    use fleet_tests::raw::{connect, device_connector, tls};
    use rustls::HandshakeKind;

    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbcc000040").await;
    let phone = fleet.phone("aabbcc000040", Some(&pap), ME);
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    // A client that keeps its TLS sessions, with the phone's certificate.
    let connector = device_connector(&fleet, &phone.dir);
    let port = fleet.fleet.local_addr().port();
    let mut first = tls(&connector, port).await;
    let client_id = mac("aabbcc000040").client_id();
    assert_eq!(connect(&mut first, &client_id).await, 0);
    drop(first);
    op.call("resetPhoneAuthentication", json!({"mac": "aabbcc000040"}))
        .await
        .expect("reset");
    let mut second = tls(&connector, port).await;
    assert_eq!(
        second.get_ref().1.handshake_kind(),
        Some(HandshakeKind::Resumed),
        "the TLS session must be resumed for this test to mean anything"
    );
    assert_eq!(connect(&mut second, &client_id).await, 5);
}

/// docs/protocol.md: phone `state` events carry no PAP (every operator of the tenant hears
/// them), also when the change comes from the phone's own CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn phone_state_events_carry_no_pap() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let pap = op.create_phone("aabbcc0000e1").await;
    let phone = fleet.phone("aabbcc0000e1", None, ME);
    for _ in 0..3 {
        assert_eq!(phone.connect_raw(Some(&wrong_pap(&pap))).await, 4);
    }
    let mut counted = Vec::new();
    let failed = tokio::time::timeout(op.patience, async {
        loop {
            let (_, event) = op.events.recv().await.expect("events");
            if event["event"] == "state" {
                assert!(event["phone"].get("pap").is_none(), "PAP in {event}");
                // Each wrong PAP is told with its count (a console shows it growing).
                counted.extend(event["phone"]["failures"].as_u64().filter(|n| *n > 0));
                if event["phone"]["auth_state"] == "authentication_failed" {
                    return event;
                }
            }
        }
    })
    .await
    .expect("an authentication_failed event");
    assert_eq!(failed["phone"]["mac"], "aabbcc0000e1");
    // The third wrong PAP locks the phone out and sets the count back to 0 (one lockout).
    assert_eq!(counted, [1, 2], "wrong PAPs told with their count");
    assert_eq!(failed["phone"]["lockouts"], 1);
}
