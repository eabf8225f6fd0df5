//! The findings of the outside security review (issue 9), each as the attack that worked and
//! what must hold now: operators are (tenant, name), responses reach only the session that
//! asked, revoked and foreign operator certificates are refused, requests are bounded, the
//! whitelist refuses the whole Internet, PAPs stay out of events.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{EventKind, Filter, StationLeaf, Topic};
use fleet_tests::raw::{
    connack, connect_frame, frame, read_until_contains, string, subscribe_frame, tls,
};
use fleet_tests::{code_of, TestFleet};
use fleet_tests::{mac, serial, station_topic};
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

/// A TLS connector with a new self-signed station key for `serial` (a device nobody accepted).
fn station_connector(fleet: &TestFleet, serial: &str) -> tokio_rustls::TlsConnector {
    let key = fleet_certs::self_signed_station(serial).expect("key");
    let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&key.cert_pem, &key.key_pem)))
        .expect("tls");
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
        .write_all(&subscribe_frame(
            &Topic::OperatorResponse("admin".into()).to_string(),
        ))
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
        .wait_event(EventKind::Phones, |e| e["phone"]["mac"] == "aabbcc000009")
        .await;
    assert!(event["phone"].get("pap").is_none(), "{event}");
    assert!(!event.to_string().contains(&pap), "{event}");
}

/// An MQTT 3.1.1 CONNECT with a user name and no password.
fn connect_with_username(client_id: &str, username: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x82, 0, 60];
    body.extend(string(client_id.as_bytes()));
    body.extend(string(username.as_bytes()));
    frame(0x10, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_refused_for_a_bad_username_is_audited_in_its_own_tenant() {
    let fleet = TestFleet::start().await;
    let port = fleet.fleet.local_addr().port();
    let acme = fleet.operator_as("ops", "acme").await;
    acme.call(
        "createPhone",
        json!({"mac": "aabbcc0000a1", "vendor": "v", "type": "t", "site": "s"}),
    )
    .await
    .expect("create");
    let connector = fleet_tests::raw::anonymous_connector(&fleet);
    let mut stream = tls(&connector, port).await;
    assert_eq!(
        connack(
            &mut stream,
            &connect_with_username(&mac("aabbcc0000a1").client_id(), "not-the-mac")
        )
        .await,
        5
    );
    let audit = acme
        .call("listAuditLog", json!({"limit": 100}))
        .await
        .expect("audit");
    assert!(
        records(&audit).iter().any(|r| r["action"] == "connect"
            && r["outcome"] == "refused"
            && r["device"] == mac("aabbcc0000a1").client_id()),
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pap_guesses_beside_the_operator_never_lock_the_operator_out_and_blocks_can_be_lifted() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.failed_auth_per_ip = 3;
        c.limits.failed_auth_delay_ms = 1;
    })
    .await;
    let admin = fleet.operator().await;
    let acme = fleet.operator_as("ops", "acme").await;
    admin
        .call(
            "createPhone",
            json!({"mac": "aabbcc0000b1", "vendor": "v", "type": "t", "site": "s"}),
        )
        .await
        .expect("create");
    let guesser = fleet.phone("aabbcc0000b1", None, "127.0.0.1");
    for _ in 0..4 {
        guesser.connect_raw(Some("000000")).await;
    }
    // The address is blocked now, yet an operator from it still gets in.
    let again = fleet.operator().await;
    let blocks = again
        .call("listAddressBlocks", json!({}))
        .await
        .expect("blocks");
    assert!(
        blocks["blocks"]
            .as_array()
            .expect("blocks")
            .iter()
            .any(|b| b["address"] == "127.0.0.1"),
        "{blocks}"
    );
    // Blocks are fleet-wide: another tenant's operator may not lift them.
    assert_eq!(
        code_of(
            acme.call("liftAddressBlock", json!({"address": "127.0.0.1"}))
                .await
        ),
        "forbidden"
    );
    admin
        .call("liftAddressBlock", json!({"address": "127.0.0.1"}))
        .await
        .expect("lift");
    let after = admin
        .call("listAddressBlocks", json!({}))
        .await
        .expect("blocks");
    assert_eq!(after["blocks"], json!([]), "{after}");
    assert_eq!(
        code_of(
            admin
                .call("liftAddressBlock", json!({"address": "127.0.0.1"}))
                .await
        ),
        "not_found"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stations_waiting_for_approval_are_bounded_per_address_and_unseen_ones_expire() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.pending_stations_per_ip = 2;
        c.limits.pending_expiry_hours = 1;
    })
    .await;
    let mut op = fleet.operator().await;
    let first = fleet.station("PW-1", "6.1.0");
    let second = fleet.station("PW-2", "6.1.0");
    op.wait_state("PW-1", "unauthorized").await;
    op.wait_state("PW-2", "unauthorized").await;
    // A third from the same address is refused at CONNECT, with the reason, audited.
    let port = fleet.fleet.local_addr().port();
    let third = station_connector(&fleet, "PW-3");
    let mut stream = tls(&third, port).await;
    assert_eq!(
        connack(
            &mut stream,
            &connect_frame(&serial("PW-3").client_id(), 60, None)
        )
        .await,
        3
    );
    let audit = op
        .call("listAuditLog", json!({"limit": 100}))
        .await
        .expect("audit");
    assert!(
        records(&audit).iter().any(|r| r["device"] == "PW-3"
            && r["outcome"] == "refused"
            && r["reason"]
                .as_str()
                .is_some_and(|t| t.contains("waiting for approval"))),
        "{audit}"
    );
    // Unseen for longer than the expiry: deleted, audited.
    first.handle.shutdown().await;
    second.handle.shutdown().await;
    // Offline once their sessions are gone (checked after each event, whichever came first).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = op.call("listStations", json!({})).await.expect("list");
        let stations = list["stations"].as_array().cloned().unwrap_or_default();
        if stations.iter().all(|s| s["online"] == false) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still online: {list}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), op.events.recv()).await;
    }
    assert_eq!(fleet.fleet.controller().expire_pending(), 0, "not yet");
    fleet
        .clock
        .advance(time::Duration::hours(1) + time::Duration::minutes(1));
    assert_eq!(fleet.fleet.controller().expire_pending(), 2);
    let list = op.call("listStations", json!({})).await.expect("list");
    assert_eq!(list["stations"], json!([]), "{list}");
    let audit = op
        .call("listAuditLog", json!({"limit": 100}))
        .await
        .expect("audit");
    assert_eq!(
        records(&audit)
            .iter()
            .filter(|r| r["action"] == "expire")
            .count(),
        2,
        "{audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_holding_the_client_id_never_hears_authorized() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let real = fleet.station("IM-1", "6.1.0");
    op.wait_state("IM-1", "unauthorized").await;
    let fingerprint = real.local_fingerprint();
    real.handle.shutdown().await;

    // Another key takes the client id (it sends no auth request) and listens for `cmd`.
    let port = fleet.fleet.local_addr().port();
    let impostor = station_connector(&fleet, "IM-1");
    let mut stream = tls(&impostor, port).await;
    assert_eq!(
        connack(
            &mut stream,
            &connect_frame(&serial("IM-1").client_id(), 60, None)
        )
        .await,
        0
    );
    stream
        .write_all(&subscribe_frame(&station_topic("IM-1", StationLeaf::Cmd)))
        .await
        .expect("subscribe");
    read_until_contains(&mut stream, &[0x90]).await;

    op.call(
        "acceptStation",
        json!({"serial": "IM-1", "fingerprint": fingerprint}),
    )
    .await
    .expect("accept");
    let heard = fleet_tests::raw::until_closed(&mut stream).await;
    assert!(
        !heard.windows(10).any(|w| w == b"authorized"),
        "the impostor heard authorized"
    );
    let event = op
        .wait_event(EventKind::Security, |e| {
            e["event"] == "identity_mismatch" && e["serial"] == "IM-1"
        })
        .await;
    assert_eq!(event["pinned"], fingerprint.as_str(), "{event}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_planted_before_acceptance_never_reaches_the_station() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let port = fleet.fleet.local_addr().port();
    // A certificate-less client plants a retained status for a station not yet accepted.
    let anonymous = fleet_tests::raw::anonymous_connector(&fleet);
    let mut planter = tls(&anonymous, port).await;
    assert_eq!(
        connack(
            &mut planter,
            &connect_frame(&serial("RT-1").client_id(), 60, None)
        )
        .await,
        0
    );
    let mut retained =
        fleet_tests::raw::publish_frame(&station_topic("RT-1", StationLeaf::Status), b"planted");
    retained[0] |= 0x01;
    planter.write_all(&retained).await.expect("publish");
    planter.write_all(&[0xE0, 0]).await.expect("disconnect");
    let _ = fleet_tests::raw::until_closed(&mut planter).await;

    // The real station is accepted, then subscribes to its whole tree.
    let mut station = fleet.station("RT-1", "6.1.0");
    fleet_tests::authorize(&mut op, &mut station).await;
    station.handle.shutdown().await;
    let connector = fleet_tests::raw::device_connector(&fleet, &fleet.station_dir("RT-1"));
    let mut stream = tls(&connector, port).await;
    assert_eq!(
        connack(
            &mut stream,
            &connect_frame(&serial("RT-1").client_id(), 60, None)
        )
        .await,
        0
    );
    stream
        .write_all(&subscribe_frame(
            &Filter::StationTree(serial("RT-1")).to_string(),
        ))
        .await
        .expect("subscribe");
    let heard = read_for(&mut stream, Duration::from_millis(800)).await;
    assert!(
        !heard.windows(7).any(|w| w == b"planted"),
        "the planted retained message reached the accepted station"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_that_does_not_read_loses_no_response_silently() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.max_undelivered_messages = 20;
        c.server.write_timeout_ms = 2000;
    })
    .await;
    let port = fleet.fleet.local_addr().port();
    let files = fleet.data_dir();
    let cert = std::fs::read_to_string(files.join("admin.pem")).expect("cert");
    let key = std::fs::read_to_string(files.join("admin.key")).expect("key");
    let config = fleet_certs::client_config(&fleet.ca_pem(), Some((&cert, &key))).expect("tls");
    let admin = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut stream = fleet_tests::raw::tls_small_receive_buffer(&admin, port).await;
    assert_eq!(
        connack(&mut stream, &connect_frame("admin-burst", 60, None)).await,
        0
    );
    stream
        .write_all(&subscribe_frame(
            &Topic::OperatorResponse("admin".into()).to_string(),
        ))
        .await
        .expect("subscribe");
    read_until_contains(&mut stream, &[0x90]).await;
    // 400 requests, without reading a single response.
    let request =
        json!({"commands": [{"command": "exportDevicesCsv", "correlationData": 1}]}).to_string();
    let frame = fleet_tests::raw::publish_frame(
        &Topic::OperatorRequest("admin".into()).to_string(),
        request.as_bytes(),
    );
    let mut sent = 0;
    for _ in 0..400 {
        match tokio::time::timeout(Duration::from_secs(5), stream.write_all(&frame)).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    // Either every response arrives, or the session is ended: none is dropped while it goes on.
    let needle = b"\"responses\"";
    let mut heard = Vec::new();
    let mut buf = vec![0u8; 65536];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let ended = loop {
        let count = heard.windows(needle.len()).filter(|w| w == needle).count();
        if count >= sent {
            break false;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => heard.extend_from_slice(&buf[..n]),
            Err(_) => {
                panic!("{count} of {sent} responses and the session goes on: responses were lost")
            }
        }
    };
    let _ = ended;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_alike_serial_of_an_accepted_station_is_refused() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("CT-1", "6.1.0");
    fleet_tests::authorize(&mut op, &mut station).await;
    let port = fleet.fleet.local_addr().port();
    let twin = station_connector(&fleet, "ct-1");
    let mut stream = tls(&twin, port).await;
    assert_ne!(
        connack(
            &mut stream,
            &connect_frame(&serial("ct-1").client_id(), 60, None)
        )
        .await,
        0,
        "serials are case-sensitive, but no station may differ from an accepted one only in case"
    );
}
