//! Revocation ordering: reject, reset, remove and phone reset withdraw the device's live session
//! before the operator's acknowledgement is published. Checked as an order of events, not as a
//! timing: a recording `SessionControl` drains the controller's outbox at the moment it is told
//! to cut, so everything published before the cut is logged before it.

use std::sync::{Arc, Mutex};

use fleet_broker::{
    Admission, ConnectInfo, Decision, MqttVersion, PresentedCertificate, Rights, SessionControl,
    Trust,
};
use fleet_controller::clock::Clock;
use fleet_controller::control::{
    ControlSettings, Controller, ControllerAdmission, Incoming, Published, Requester,
};
use fleet_controller::firmware::{Catalog, FirmwarePolicy};
use fleet_controller::identity::OperatorId;
use fleet_controller::store::Store;
use fleet_protocol::payload::StationCommand;
use fleet_protocol::{StationLeaf, Topic};
use fleet_tests::{mac, serial, station_topic};
use serde_json::{json, Value};

/// What happened, in order: publications (by topic) and cuts (by client id).
#[derive(Default)]
struct Log {
    events: Vec<String>,
    outbox: Option<Published>,
}

impl Log {
    fn drain(&mut self) {
        if let Some(rx) = self.outbox.as_mut() {
            while let Some(p) = rx.try_recv() {
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                self.events.push(format!("publish {} {text}", p.topic));
            }
        }
    }
}

struct Recorder(Arc<Mutex<Log>>);

impl SessionControl for Recorder {
    fn set_rights(&self, client_id: &str, _: Rights) -> bool {
        let mut log = self.0.lock().expect("log");
        log.drain();
        log.events.push(format!("rights {client_id}"));
        true
    }
    fn cut(&self, client_id: &str, _: Option<String>) -> bool {
        let mut log = self.0.lock().expect("log");
        log.drain();
        log.events.push(format!("cut {client_id}"));
        true
    }
    fn is_connected(&self, _: &str) -> bool {
        true
    }
    fn deliver(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool {
        let mut log = self.0.lock().expect("log");
        log.drain();
        let text = String::from_utf8_lossy(&payload).into_owned();
        log.events
            .push(format!("publish {topic} {text} (to {client_id})"));
        true
    }
    fn deliver_to(&self, _: &str, _: u64, topic: String, payload: Vec<u8>) -> bool {
        let mut log = self.0.lock().expect("log");
        log.drain();
        let text = String::from_utf8_lossy(&payload).into_owned();
        log.events.push(format!("publish {topic} {text}"));
        true
    }
}

fn info(
    session_id: u64,
    client_id: &str,
    certificate: Option<PresentedCertificate>,
) -> ConnectInfo {
    ConnectInfo {
        session_id,
        client_id: client_id.into(),
        username: None,
        password: None,
        peer_addr: "127.0.0.1:40000".parse().expect("addr"),
        certificate,
        version: MqttVersion::V311,
    }
}

/// A controller on a fresh store with a recording `SessionControl`, and its `admin` operator
/// admitted.
async fn setup() -> (
    tempfile::TempDir,
    Arc<Controller>,
    ControllerAdmission,
    Arc<Mutex<Log>>,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = fleet_certs::FleetCa::generate("test CA").expect("ca");
    let operator = ca.issue_operator("admin", "default").expect("operator");
    let store = Store::open(&dir.path().join("fleet.redb")).expect("store");
    let operators = fleet_certs::OperatorRegistry::new(dir.path());
    operators
        .register_pem(&operator.cert_pem, time::OffsetDateTime::now_utc())
        .expect("register the operator");
    let log = Arc::new(Mutex::new(Log::default()));
    let (controller, outbox) = Controller::new(
        store,
        Arc::new(ca),
        Arc::new(Recorder(log.clone())),
        operators,
        settings(),
    )
    .expect("controller");
    log.lock().expect("log").outbox = Some(outbox);
    // Phones' PAP attempts are decided by batches.
    controller.serve_inbox_alone();
    let admission = ControllerAdmission(controller.clone());
    let operator_cert = PresentedCertificate {
        der: operator.cert_der.clone(),
        trust: Trust::FleetCa,
    };
    assert!(matches!(
        admission.admit(info(1, "op", Some(operator_cert))).await,
        Decision::Allow { .. }
    ));
    (dir, controller, admission, log)
}

fn settings() -> ControlSettings {
    // The defaults, with the failure limits out of the way of these tests.
    let mut config = fleet_config::Config::default();
    config.limits.failed_auth_per_ip = 100;
    config.limits.failed_auth_delay_ms = 0;
    config.limits.refusal_audits_per_ip_per_minute = 100;
    ControlSettings::from_config(
        &config,
        FirmwarePolicy::default(),
        Catalog::default(),
        Clock::simulated(),
    )
}

fn position(events: &[String], needle: &str) -> usize {
    events
        .iter()
        .position(|e| e.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in {events:#?}"))
}

#[tokio::test]
async fn cuts_come_before_the_operators_acknowledgement() {
    let (_dir, controller, admission, log) = setup().await;

    // A station with its own key is admitted and asks to be authorized.
    let station = fleet_certs::self_signed_station("S1").expect("station");
    let st_cert = PresentedCertificate {
        der: station.cert_der.clone(),
        trust: Trust::SelfSigned,
    };
    assert!(matches!(
        admission
            .admit(info(2, &serial("S1").client_id(), Some(st_cert)))
            .await,
        Decision::Allow { .. }
    ));
    controller.handle_message(
        &station_topic("S1", StationLeaf::AuthRequest),
        br#"{"serial":"S1","model":"m","firmware":"6.1.0","mac_streaming":"a","mac_control":"b"}"#,
    );
    let request = |command: Value| json!({"commands": [command]}).to_string().into_bytes();

    // Reject: the station's cut precedes the operator's response.
    controller.handle_request(
        "op",
        1,
        &request(json!({"command": "rejectStation", "serial": "S1", "correlationData": "r"})),
    );
    // A phone with a live session, then Reset Authentication.
    controller.handle_request("op", 1,
        &request(json!({"command": "createPhone", "mac": "aabbccddeeff", "vendor": "v", "type": "t", "correlationData": "c"})),
    );
    let mut phone_info = info(3, &mac("aabbccddeeff").client_id(), None);
    phone_info.username = Some("aabbccddeeff".into());
    // Whitelist the address so that no PAP is needed for this live session.
    controller.handle_request(
        "op",
        1,
        &request(
            json!({"command": "addWhitelistEntry", "entry": "127.0.0.1", "correlationData": "w"}),
        ),
    );
    assert!(matches!(
        admission.admit(phone_info).await,
        Decision::Allow { .. }
    ));
    controller.handle_request("op", 1,
        &request(json!({"command": "resetPhoneAuthentication", "mac": "aabbccddeeff", "correlationData": "p"})),
    );

    // Reset and Remove of authorized stations: the same order.
    for (i, serial) in ["S2", "S3"].into_iter().enumerate() {
        let key = fleet_certs::self_signed_station(serial).expect("station");
        let fp = fleet_certs::certificate_fingerprint(&key.cert_der).expect("fingerprint");
        let cert = PresentedCertificate {
            der: key.cert_der.clone(),
            trust: Trust::SelfSigned,
        };
        let client_id = self::serial(serial).client_id();
        assert!(matches!(
            admission
                .admit(info(10 + i as u64, &client_id, Some(cert)))
                .await,
            Decision::Allow { .. }
        ));
        let auth = json!({"serial": serial, "model": "m", "firmware": "6.1.0", "mac_streaming": "a", "mac_control": "b"});
        controller.handle_message(
            &station_topic(serial, StationLeaf::AuthRequest),
            auth.to_string().as_bytes(),
        );
        controller.handle_request("op", 1,
            &request(json!({"command": "acceptStation", "serial": serial, "fingerprint": fp.to_string(), "correlationData": format!("a{serial}")})),
        );
    }
    controller.handle_request("op", 1,
        &request(json!({"command": "resetStation", "serial": "S2", "delete_authentication": true, "correlationData": "reset"})),
    );
    controller.handle_request(
        "op",
        1,
        &request(json!({"command": "removeStation", "serial": "S3", "correlationData": "remove"})),
    );

    let mut log = log.lock().expect("log");
    log.drain();
    let events = log.events.clone();
    let cut_station = position(&events, &format!("cut {}", serial("S1").client_id()));
    let rejected = StationCommand::Rejected.payload();
    let told = format!(
        "publish {} {rejected}",
        station_topic("S1", StationLeaf::Cmd)
    );
    let told_station = position(&events, &told);
    let reject_ack = position(&events, r#""correlationData":"r""#);
    assert!(
        told_station < cut_station,
        "the station is sent its cmd first: {events:#?}"
    );
    assert!(
        cut_station < reject_ack,
        "cut before the acknowledgement: {events:#?}"
    );
    let cut_phone = position(&events, &format!("cut {}", mac("aabbccddeeff").client_id()));
    let reset_ack = position(&events, r#""correlationData":"p""#);
    assert!(
        cut_phone < reset_ack,
        "cut before the acknowledgement: {events:#?}"
    );
    for (client, ack) in [
        (&serial("S2").client_id(), "reset"),
        (&serial("S3").client_id(), "remove"),
    ] {
        let cut = position(&events, &format!("cut {client}"));
        let acked = position(&events, &format!(r#""correlationData":"{ack}""#));
        assert!(
            cut < acked,
            "{ack}: cut before the acknowledgement: {events:#?}"
        );
    }
}

/// A reconnect race: a decision taken while a CONNECT is between admission and registration
/// is seen by the session's re-check (`session_opened`), so the old identity is not let in.
#[tokio::test]
async fn a_decision_during_admission_is_seen_by_the_recheck() {
    let (_dir, controller, admission, _log) = setup().await;
    let station = fleet_certs::self_signed_station("R1").expect("station");
    let cert = || PresentedCertificate {
        der: station.cert_der.clone(),
        trust: Trust::SelfSigned,
    };
    // The station's first session makes it known (Unauthorized).
    assert!(matches!(
        admission
            .admit(info(2, &serial("R1").client_id(), Some(cert())))
            .await,
        Decision::Allow { .. }
    ));
    controller.handle_message(
        &station_topic("R1", StationLeaf::AuthRequest),
        br#"{"serial":"R1","model":"m","firmware":"6.1.0","mac_streaming":"a","mac_control":"b"}"#,
    );
    // A reconnect is admitted...
    assert!(matches!(
        admission
            .admit(info(3, &serial("R1").client_id(), Some(cert())))
            .await,
        Decision::Allow { .. }
    ));
    // ...the operator rejects the station before that session is registered...
    let reject =
        json!({"commands": [{"command": "rejectStation", "serial": "R1", "correlationData": 1}]});
    controller.handle_request("op", 1, reject.to_string().as_bytes());
    // ...and the re-check after registration cuts it.
    assert_eq!(
        admission.session_opened(&serial("R1").client_id(), 3),
        Err(fleet_broker::Refusal::NotAuthorized)
    );
}

/// A batch of bus messages is one transaction: each message sees the changes of those before
/// it (an accept right after the station's request), and nothing of the batch is published
/// before all of it is handled (the controller's outbox stays empty until the commit).
#[tokio::test]
async fn a_batch_sees_its_own_writes_and_speaks_only_after_its_commit() {
    let (_dir, controller, admission, log) = setup().await;
    log.lock().expect("log").drain();
    let key = fleet_certs::self_signed_station("B1").expect("station");
    let fp = fleet_certs::certificate_fingerprint(&key.cert_der).expect("fingerprint");
    let cert = PresentedCertificate {
        der: key.cert_der.clone(),
        trust: Trust::SelfSigned,
    };
    assert!(matches!(
        admission
            .admit(info(2, &serial("B1").client_id(), Some(cert)))
            .await,
        Decision::Allow { .. }
    ));
    let auth =
        br#"{"serial":"B1","model":"m","firmware":"6.1.0","mac_streaming":"a","mac_control":"b"}"#;
    let accept = json!({"commands": [
        {"command": "acceptStation", "serial": "B1", "fingerprint": fp.to_string(), "correlationData": "a"},
        {"command": "getStation", "serial": "B1", "correlationData": "g"},
    ]})
    .to_string();
    let admin = Requester {
        client_id: "op".into(),
        session_id: 1,
        operator: OperatorId {
            tenant: "default".into(),
            name: "admin".into(),
        },
    };
    controller.handle_batch([
        Incoming::Device {
            topic: &station_topic("B1", StationLeaf::AuthRequest),
            payload: &auth[..],
        },
        Incoming::Request {
            from: &admin,
            payload: accept.as_bytes(),
        },
    ]);
    let mut log = log.lock().expect("log");
    log.drain();
    let events = log.events.clone();
    let response = &events[position(
        &events,
        &Topic::OperatorResponse("admin".into()).to_string(),
    )];
    let body: Value = serde_json::from_str(
        response
            .split_once(' ')
            .and_then(|(_, rest)| rest.split_once(' '))
            .map(|(_, json)| json)
            .expect("payload"),
    )
    .expect("json");
    let responses = body["responses"].as_array().expect("responses");
    assert_eq!(responses.len(), 2, "{body}");
    assert!(responses[0].get("error").is_none(), "{body}");
    assert_eq!(responses[1]["data"]["state"], "running", "{body}");
    // The station's rights grew after the commit, before the operator's acknowledgement.
    let rights = position(&events, &format!("rights {}", serial("B1").client_id()));
    let acked = position(
        &events,
        &Topic::OperatorResponse("admin".into()).to_string(),
    );
    assert!(rights < acked, "{events:#?}");
    // The station was told it is authorized.
    position(
        &events,
        &format!("publish {}", station_topic("B1", StationLeaf::Cmd)),
    );
}
