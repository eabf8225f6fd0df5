//! Why was it refused: `explain` (what `fleetctl why` prints) for a rejected station, a locked
//! and then blocked phone and a blocked address, each rendered by `fleet_ctl::why`; and the
//! MQTT 5 Reason String of a refusing CONNACK, which tells the client why and no secret.

use fleet_sim::SimEvent;
use fleet_tests::raw::{self, connack_v5, device_connector, string, tls, tls_from, vbi};
use fleet_tests::{authorize, code_of, wrong_pap, TestFleet};
use serde_json::{json, Value};
use time::Duration;
use tokio::io::AsyncWriteExt;

async fn explain(op: &fleet_tests::Operator, subject: &str) -> Value {
    op.call("explain", json!({ "subject": subject }))
        .await
        .unwrap_or_else(|e| panic!("explain {subject}: {e}"))
}

/// The reasons of `explain`'s refusals, newest first.
fn refusal_reasons(data: &Value) -> Vec<String> {
    data["refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .map(|r| r["reason"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// What `fleetctl why` prints, with its line breaks as spaces (it wraps at 100 columns).
fn rendered(data: &Value) -> String {
    let text = fleet_ctl::why::render(data);
    // Within 100 columns, but for a word that is longer alone (a fingerprint).
    assert!(
        text.lines()
            .all(|l| l.chars().count() <= 100 || l.split_whitespace().count() <= 2),
        "{text}"
    );
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An MQTT 5 CONNECT of an unprovisioned phone: user name the MAC, password `pap`.
fn phone_connect_v5(mac: &str, pap: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02 | 0x80 | 0x40, 0, 60];
    vbi(0, &mut body);
    body.extend(string(fleet_tests::mac(mac).client_id().as_bytes()));
    body.extend(string(mac.as_bytes()));
    body.extend(string(pap.as_bytes()));
    raw::frame(0x10, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_a_rejected_station_is_refused() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("WHY-1", "6.1.0");
    op.wait_state("WHY-1", "unauthorized").await;
    let before = explain(&op, "WHY-1").await;
    assert_eq!(before["state"], "unauthorized");
    assert!(before["rule"]
        .as_str()
        .is_some_and(|r| r.starts_with("Authorize a Station")));

    op.call("rejectStation", json!({"serial": "WHY-1"}))
        .await
        .expect("reject");
    station.wait_event(SimEvent::Rejected).await;
    // fleet-sim speaks MQTT 5: the station tells why it was refused.
    let refused = station
        .wait_for("refusal", |e| {
            matches!(e, SimEvent::Refused { .. }).then(|| e.to_string())
        })
        .await;
    assert_eq!(
        refused,
        "refused: station rejected by an operator (NotAuthorized)"
    );
    // An MQTT 5 client with the station's key reads why.
    let port = fleet.fleet.local_addr().port();
    let mut stream = tls(&device_connector(&fleet, &station.dir), port).await;
    let (code, reason) =
        raw::connect_v5(&mut stream, &fleet_tests::serial("WHY-1").client_id()).await;
    assert_eq!(
        (code, reason.as_str()),
        (0x87, "station rejected by an operator")
    );

    let data = explain(&op, "WHY-1").await;
    assert_eq!(data["kind"], "station");
    assert_eq!(data["state"], "rejected");
    assert_eq!(data["label"], "Rejected");
    assert_eq!(data["station"]["last_mismatch"], Value::Null);
    assert!(data["why"]
        .as_str()
        .is_some_and(|w| w.contains("an operator rejected it")));
    let reasons = refusal_reasons(&data);
    assert!(!reasons.is_empty(), "{data}");
    assert!(
        reasons.iter().all(|r| r.contains("rejected")),
        "{reasons:?}"
    );
    let text = rendered(&data);
    assert!(
        text.starts_with("WHY-1 (station): Rejected [rejected]"),
        "{text}"
    );
    assert!(
        text.contains("rule: Reauthorize a Rejected Station"),
        "{text}"
    );
    assert!(text.contains("last refusals, newest first"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_mismatch_is_refused_without_naming_a_key_and_remembered() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("WHY-2", "6.1.0");
    let pinned = authorize(&mut op, &mut station).await;
    station.handle.power_off();
    // A clone: another key, the same client id.
    let clone = fleet_certs::self_signed_station("WHY-2").expect("key");
    let dir = fleet.data_dir().join("clone");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("cert.pem"), &clone.cert_pem).expect("cert");
    std::fs::write(dir.join("key.pem"), &clone.key_pem).expect("key");
    let port = fleet.fleet.local_addr().port();
    let mut stream = tls(&device_connector(&fleet, &dir), port).await;
    let (code, reason) =
        raw::connect_v5(&mut stream, &fleet_tests::serial("WHY-2").client_id()).await;
    assert_eq!(code, 0x87);
    assert!(reason.starts_with("identity mismatch"), "{reason}");
    // Neither the pinned key nor the clone's is told.
    let digits = |fp: &str| fp.replace(':', "").to_lowercase();
    assert!(
        !digits(&reason).contains(&digits(&pinned)[..16]),
        "{reason}"
    );

    let view = op.station("WHY-2").await;
    let mismatch = view["last_mismatch"]
        .as_str()
        .expect("last_mismatch")
        .to_owned();
    let data = explain(&op, "WHY-2").await;
    assert_eq!(data["station"]["last_mismatch"], mismatch.as_str());
    assert!(data["rule"]
        .as_str()
        .is_some_and(|r| r.contains("Remove the Station")));
    assert!(refusal_reasons(&data)[0].starts_with("identity mismatch"));
    assert!(rendered(&data).contains(&format!("mismatch: last identity mismatch at {mismatch}")));
    // A day later the mismatch is no longer the rule that applies; it stays on the record.
    fleet.clock.advance(Duration::hours(25));
    let later = explain(&op, "WHY-2").await;
    assert!(later["rule"]
        .as_str()
        .is_some_and(|r| !r.contains("Remove the Station")));
    assert_eq!(later["station"]["last_mismatch"], mismatch.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_cut_at_acceptance_is_a_mismatch_too() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let real = fleet.station("WHY-3", "6.1.0");
    op.wait_state("WHY-3", "unauthorized").await;
    let fingerprint = real.local_fingerprint();
    real.handle.shutdown().await;
    // Another key holds the client id when the operator accepts the real one.
    let clone = fleet_certs::self_signed_station("WHY-3").expect("key");
    let dir = fleet.data_dir().join("impostor");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("cert.pem"), &clone.cert_pem).expect("cert");
    std::fs::write(dir.join("key.pem"), &clone.key_pem).expect("key");
    let port = fleet.fleet.local_addr().port();
    let mut stream = tls(&device_connector(&fleet, &dir), port).await;
    let client_id = fleet_tests::serial("WHY-3").client_id();
    assert_eq!(raw::connect_v5(&mut stream, &client_id).await.0, 0);
    let accepted = op
        .call(
            "acceptStation",
            json!({"serial": "WHY-3", "fingerprint": fingerprint}),
        )
        .await
        .expect("accept");
    let _ = raw::until_closed(&mut stream).await;
    let mismatch = accepted["last_mismatch"]
        .as_str()
        .expect("noted")
        .to_owned();
    assert_eq!(
        op.station("WHY-3").await["last_mismatch"],
        mismatch.as_str()
    );
    let data = explain(&op, "WHY-3").await;
    assert!(
        refusal_reasons(&data)[0].contains("not the accepted key"),
        "{data}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_a_phone_is_locked_then_blocked() {
    // The address limit out of the way: this is about the phone's own counts.
    let fleet = TestFleet::start_with(|c| c.limits.failed_auth_per_ip = 1000).await;
    let op = fleet.operator().await;
    let mac = "aabbcc00ee01";
    let pap = op.create_phone(mac).await;
    let phone = fleet.phone(mac, Some(&wrong_pap(&pap)), "127.0.0.31");
    // fleet-sim speaks MQTT 5 and tells why.
    let outcome = phone.provision().await;
    assert_eq!(outcome.to_string(), "refused: wrong or missing PAP (4)");
    let needed = explain(&op, mac).await;
    assert_eq!(needed["state"], "authentication_needed");
    assert_eq!(needed["wrong_paps"], 1);
    // What is explained carries no PAP.
    assert!(!needed.to_string().contains(&pap), "{needed}");

    // An MQTT 5 phone reads why: the wrong PAP that locks it says until when.
    let port = fleet.fleet.local_addr().port();
    let connector = raw::anonymous_connector(&fleet);
    let source = "127.0.0.31".parse().expect("ip");
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let mut stream = tls_from(&connector, port, source).await.expect("tls");
        stream
            .write_all(&phone_connect_v5(mac, &wrong_pap(&pap)))
            .await
            .expect("write");
        reasons.push(connack_v5(&mut stream).await);
    }
    assert_eq!(reasons[0], (0x86, "wrong or missing PAP".to_owned()));
    assert_eq!(reasons[1].0, 0x86);
    assert!(
        reasons[1]
            .1
            .starts_with("authentication failed: wrong PAP, locked until "),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|(_, r)| !r.contains(&pap)));

    let locked = explain(&op, mac).await;
    assert_eq!(locked["kind"], "phone");
    assert_eq!(locked["state"], "authentication_failed");
    assert_eq!(locked["lockouts"], 1);
    let until = locked["locked_until"]
        .as_str()
        .expect("locked_until")
        .to_owned();
    assert!(reasons[1].1.ends_with(&until), "{reasons:?} {until}");
    assert!(locked["rule"]
        .as_str()
        .is_some_and(|r| r.starts_with("Authentication failed")));
    assert_eq!(
        refusal_reasons(&locked),
        ["wrong or missing PAP"; 3],
        "newest first"
    );
    let text = rendered(&locked);
    assert!(text.contains("1 of 3 lockouts before the block"), "{text}");
    assert!(text.contains(&format!("locked until {until}")), "{text}");

    // Two more lockouts, waited out, block it for good.
    for _ in 0..2 {
        fleet.clock.advance(Duration::minutes(31));
        for _ in 0..3 {
            assert_eq!(phone.connect_raw(Some(&wrong_pap(&pap))).await, 4);
        }
    }
    let blocked = explain(&op, mac).await;
    assert_eq!(blocked["state"], "authentication_blocked");
    assert_eq!(blocked["locked_until"], Value::Null);
    assert!(blocked["rule"]
        .as_str()
        .is_some_and(|r| r.contains("Reset Authentication")));
    let text = rendered(&blocked);
    assert!(
        text.starts_with(&format!(
            "{mac} (phone): Authentication blocked (permanently) [authentication_blocked]"
        )),
        "{text}"
    );
    let mut stream = tls_from(&connector, port, source).await.expect("tls");
    stream
        .write_all(&phone_connect_v5(mac, &pap))
        .await
        .expect("write");
    assert_eq!(
        connack_v5(&mut stream).await,
        (
            0x87,
            "authentication blocked: Reset Authentication is needed".to_owned()
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn why_an_address_is_blocked() {
    let fleet = TestFleet::start_with(|c| {
        c.limits.failed_auth_per_ip = 4;
        c.limits.failed_auth_delay_ms = 10;
    })
    .await;
    let op = fleet.operator().await;
    let sprayer = "127.0.0.41";
    assert_eq!(
        code_of(op.call("explain", json!({"subject": sprayer})).await),
        "not_found",
        "nothing is known about it yet"
    );
    for i in 0..4 {
        let mac = format!("0200000041{i:02x}");
        let pap = op.create_phone(&mac).await;
        let phone = fleet.phone(&mac, None, sprayer);
        assert_eq!(phone.connect_raw(Some(&wrong_pap(&pap))).await, 4);
    }
    let mac = "020000004199";
    let pap = op.create_phone(mac).await;
    let port = fleet.fleet.local_addr().port();
    let connector = raw::anonymous_connector(&fleet);
    let mut stream = tls_from(&connector, port, sprayer.parse().expect("ip"))
        .await
        .expect("tls");
    stream
        .write_all(&phone_connect_v5(mac, &pap))
        .await
        .expect("write");
    let (code, reason) = connack_v5(&mut stream).await;
    assert_eq!(code, 0x87);
    assert!(reason.starts_with("address blocked until "), "{reason}");

    let data = explain(&op, sprayer).await;
    assert_eq!(data["kind"], "address");
    assert_eq!(data["state"], "blocked");
    let until = data["block"]["until"].as_str().expect("until").to_owned();
    assert!(reason.contains(&until), "{reason} {until}");
    let reasons = refusal_reasons(&data);
    assert!(
        reasons[0].starts_with("too many failed authentications"),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r == "wrong or missing PAP"));
    let text = rendered(&data);
    assert!(
        text.starts_with("127.0.0.41 (address): Blocked [blocked]"),
        "{text}"
    );
    assert!(
        text.contains(&format!("block: 127.0.0.41 blocked until {until}")),
        "{text}"
    );

    // Blocks are fleet-wide: another tenant that knows nothing of the address is told nothing,
    // and once it knows the address (here: its whitelist names it) it sees the block's end but
    // not the failures, which were the default tenant's devices'.
    let acme = fleet.operator_as("other", "acme").await;
    assert_eq!(
        code_of(acme.call("explain", json!({"subject": sprayer})).await),
        "not_found",
        "the block and its failures are not acme's business"
    );
    acme.call("addWhitelistEntry", json!({"entry": "127.0.0.41/32"}))
        .await
        .expect("acme whitelist");
    let seen = explain(&acme, sprayer).await;
    assert_eq!(seen["state"], "blocked");
    assert_eq!(seen["block"]["until"], until.as_str());
    assert_eq!(seen["block"]["failures"], Value::Null);
    assert_eq!(seen["failures"], Value::Null);
    assert!(seen["refusals"].as_array().expect("refusals").is_empty());
    assert!(!rendered(&seen).contains("failed authentications)"));

    // The block ends by itself; a whitelist entry is what then covers the address.
    fleet.clock.advance(Duration::minutes(16));
    op.call("addWhitelistEntry", json!({"entry": "127.0.0.0/24"}))
        .await
        .expect("whitelist");
    let after = explain(&op, sprayer).await;
    assert_eq!(after["state"], "whitelisted");
    assert_eq!(after["block"], Value::Null);
    assert_eq!(after["whitelist"][0]["entry"], "127.0.0.0/24");
    assert!(rendered(&after).contains("whitelist: 127.0.0.0/24 (permanent)"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_sees_only_the_operators_tenant_and_names_bad_subjects() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    op.create_phone("aabbcc00ee02").await;
    let other = fleet.operator_as("other", "acme").await;
    assert_eq!(
        code_of(
            other
                .call("explain", json!({"subject": "aabbcc00ee02"}))
                .await
        ),
        "not_found",
        "another tenant's phone does not exist for it"
    );
    assert_eq!(
        code_of(op.call("explain", json!({"subject": "NO-SUCH-1"})).await),
        "not_found"
    );
    assert_eq!(
        code_of(
            op.call("explain", json!({"subject": "not a serial!"}))
                .await
        ),
        "invalid_argument"
    );
    assert_eq!(
        code_of(op.call("explain", json!({})).await),
        "invalid_argument"
    );
    // A read: audited like the others, outcome ok, and nothing else changes.
    explain(&op, "aabbcc00ee02").await;
    let audit = op
        .call("listAuditLog", json!({"limit": 5}))
        .await
        .expect("audit");
    let last = audit["records"]
        .as_array()
        .and_then(|r| r.last())
        .expect("a record");
    assert_eq!(
        (last["action"].as_str(), last["outcome"].as_str()),
        (Some("explain"), Some("ok"))
    );
}
