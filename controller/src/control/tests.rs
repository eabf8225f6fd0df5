//! The shell against a real store, a recording session registry and a simulated clock: what is
//! told, and in which order, around the commits.

use std::sync::Arc;

use fleet_broker::{
    Admission, ConnectInfo, Decision, MqttVersion, PresentedCertificate, Rights, SessionControl,
    Trust,
};
use serde_json::{json, Value};

use super::admission::Step;
use super::{ControlSettings, Controller, ControllerAdmission, Published, Wait};
use crate::clock::Clock;
use crate::firmware::{Catalog, FirmwarePolicy};
use crate::store::Store;
use fleet_protocol::{EventKind, Serial, Topic};

/// A session registry that has every session and takes every order, and keeps what was
/// delivered to one session (`deliver_to`): client id, session id, topic, payload.
#[derive(Default)]
struct Sessions {
    delivered_to: std::sync::Mutex<Vec<Delivered>>,
}

/// What `deliver_to` was given: client id, session id, topic, payload.
type Delivered = (String, u64, String, Vec<u8>);

impl SessionControl for Sessions {
    fn set_rights(&self, _: &str, _: Rights) -> bool {
        true
    }
    fn cut(&self, _: &str, _: Option<String>) -> bool {
        true
    }
    fn is_connected(&self, _: &str) -> bool {
        true
    }
    fn deliver(&self, _: &str, _: String, _: Vec<u8>) -> bool {
        true
    }
    fn deliver_to(&self, client_id: &str, session_id: u64, topic: String, p: Vec<u8>) -> bool {
        let mut delivered = self.delivered_to.lock().unwrap_or_else(|e| e.into_inner());
        delivered.push((client_id.to_owned(), session_id, topic, p));
        true
    }
}

struct Shell {
    _dir: tempfile::TempDir,
    clock: Clock,
    controller: Arc<Controller>,
    admission: ControllerAdmission,
    published: Published,
    sessions: Arc<Sessions>,
}

fn connect(session_id: u64, client_id: &str, der: Option<&[u8]>) -> ConnectInfo {
    ConnectInfo {
        session_id,
        client_id: client_id.into(),
        username: None,
        password: None,
        peer_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 40000)),
        certificate: der.map(|der| PresentedCertificate {
            der: der.to_vec(),
            trust: Trust::SelfSigned,
        }),
        version: MqttVersion::V311,
    }
}

/// A controller with its `admin` operator connected as `op` (session 1).
async fn shell() -> Shell {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = fleet_certs::FleetCa::generate("test CA").expect("ca");
    let operator = ca.issue_operator("admin", "default").expect("operator");
    let operators = fleet_certs::OperatorRegistry::new(dir.path());
    operators
        .register_pem(&operator.cert_pem, time::OffsetDateTime::now_utc())
        .expect("register the operator");
    let store = Store::open(&dir.path().join("fleet.redb")).expect("store");
    let clock = Clock::simulated();
    let sessions = Arc::new(Sessions::default());
    let mut config = fleet_config::Config::default();
    config.limits.failed_auth_delay_ms = 0;
    let settings = ControlSettings::from_config(
        &config,
        FirmwarePolicy::default(),
        Catalog::default(),
        clock.clone(),
    );
    let (controller, published) =
        Controller::new(store, Arc::new(ca), sessions.clone(), operators, settings)
            .expect("controller");
    controller.serve_inbox_alone();
    let admission = ControllerAdmission(controller.clone());
    let mut op = connect(1, "op", None);
    op.certificate = Some(PresentedCertificate {
        der: operator.cert_der.clone(),
        trust: Trust::FleetCa,
    });
    assert!(matches!(admission.admit(op).await, Decision::Allow { .. }));
    Shell {
        _dir: dir,
        clock,
        controller,
        admission,
        published,
        sessions,
    }
}

impl Shell {
    fn command(&self, command: Value) {
        let request = json!({ "commands": [command] }).to_string();
        assert!(self.controller.handle_request("op", 1, request.as_bytes()));
    }

    /// Station `serial` with a key of its own, accepted by the operator; its session closed.
    /// Returns the station's certificate (DER).
    async fn accepted_station(&self, serial: &str) -> Vec<u8> {
        let key = fleet_certs::self_signed_station(serial).expect("station");
        let client_id = Serial::parse(serial).expect("serial").client_id();
        let admitted = self
            .admission
            .admit(connect(2, &client_id, Some(&key.cert_der)))
            .await;
        assert!(matches!(admitted, Decision::Allow { .. }), "{admitted:?}");
        let request = json!({"serial": serial, "model": "m", "firmware": "6.1.0",
            "mac_streaming": "a", "mac_control": "b"});
        self.controller.handle_message(
            &Topic::StationAuthRequest(serial.parse().expect("serial")).to_string(),
            request.to_string().as_bytes(),
        );
        let fingerprint = fleet_certs::certificate_fingerprint(&key.cert_der).expect("key");
        self.command(json!({"command": "acceptStation", "serial": serial,
            "fingerprint": fingerprint.to_string()}));
        self.admission.session_closed(&client_id, 2);
        key.cert_der
    }

    /// A session with another key than the accepted one for the station `S1`: refused.
    async fn impostor(&self) {
        let impostor = fleet_certs::self_signed_station("S1").expect("another key");
        let refused = self
            .admission
            .admit(connect(3, &s1(), Some(&impostor.cert_der)))
            .await;
        assert!(matches!(refused, Decision::Deny { .. }), "{refused:?}");
    }

    /// The topics published since the last call.
    fn topics(&mut self) -> Vec<String> {
        let mut topics = Vec::new();
        while let Some(p) = self.published.try_recv() {
            topics.push(p.topic);
        }
        topics
    }
}

fn s1() -> String {
    Serial::parse("S1").expect("serial").client_id()
}

#[tokio::test]
async fn an_identity_mismatch_is_told_after_its_refusal_is_audited() {
    let mut shell = shell().await;
    shell.accepted_station("S1").await;
    shell.topics();
    shell.impostor().await;
    let event = |kind| Topic::Event("default".into(), kind).to_string();
    assert_eq!(
        shell.topics(),
        [event(EventKind::Audit), event(EventKind::Security)]
    );
}

#[tokio::test]
async fn an_identity_mismatch_whose_refusal_is_not_stored_is_not_told() {
    let mut shell = shell().await;
    shell.accepted_station("S1").await;
    shell.topics();
    // A time RFC 3339 cannot write (a year before 0): no audit record of it can be stored.
    assert!(shell.clock.advance(-time::Duration::days(3000 * 365)));
    shell.impostor().await;
    let told = shell.topics();
    assert!(
        !told.contains(&Topic::Event("default".into(), EventKind::Security).to_string()),
        "a security event whose refusal is not on record: {told:?}"
    );
}

/// A phone's PAP CONNECT from 127.0.0.1 (`password` `None`: none).
fn phone_connect(session_id: u64, mac: &str, password: Option<&str>) -> ConnectInfo {
    let mut info = connect(
        session_id,
        &fleet_protocol::Mac::parse(mac).expect("mac").client_id(),
        None,
    );
    info.username = Some(mac.into());
    info.password = password.map(str::to_owned);
    info
}

#[tokio::test]
async fn a_correct_pap_whose_commit_fails_whitelists_nothing() {
    let shell = shell().await;
    let mac = "0011aabbcc01";
    let pap = created_phone(&shell, mac);
    // A time RFC 3339 cannot write (a year before 0): the attempt's changes cannot be stored.
    let back = time::Duration::days(3000 * 365);
    assert!(shell.clock.advance(-back));
    let failed = shell
        .admission
        .admit(phone_connect(10, mac, Some(&pap)))
        .await;
    assert!(matches!(failed, Decision::Deny { .. }), "{failed:?}");
    // Nothing was stored, so the address is on no whitelist, not even in memory.
    let at = shell.clock.now();
    let ip = std::net::IpAddr::from([127, 0, 0, 1]);
    let whitelisted = shell
        .controller
        .lock()
        .live
        .whitelists
        .is_whitelisted("default", ip, at);
    assert!(
        !whitelisted,
        "whitelisted by an attempt that was never stored"
    );
}

/// A PAP attempt for `mac` with `pap`, as the front door's admission hands it to the bus, and
/// where its judgement will arrive.
fn pap_ask(
    shell: &Shell,
    session_id: u64,
    mac: &str,
    pap: &str,
) -> (
    super::PapAsk,
    tokio::sync::oneshot::Receiver<super::admission::Judgement>,
) {
    let (reply, judged) = tokio::sync::oneshot::channel();
    let ask = super::PapAsk {
        info: phone_connect(session_id, mac, Some(pap)),
        mac: fleet_protocol::Mac::parse(mac).expect("mac"),
        password: Some(pap.to_owned()),
        at: shell.clock.now(),
        reply: std::sync::Mutex::new(Some(reply)),
    };
    (ask, judged)
}

/// A phone created by the operator, and its PAP.
fn created_phone(shell: &Shell, mac: &str) -> String {
    shell.command(
        json!({"command": "createPhone", "mac": mac, "vendor": "Yealink",
        "type": "T54W", "site": "Berlin"}),
    );
    let phone = shell
        .controller
        .store
        .phone(&fleet_protocol::Mac::parse(mac).expect("mac"))
        .expect("store")
        .expect("the phone");
    phone.pap.expect("a PAP").as_str().to_owned()
}

/// A PAP attempt and an operator's reset of the same phone, in one batch, in both orders:
/// each sees the other's change, and the store ends with the later one (no write of the
/// attempt, queued elsewhere, overwrites the reset, nor the other way round).
#[tokio::test]
async fn a_pap_attempt_is_decided_in_order_with_the_operators_commands() {
    use super::admission::Judgement;
    use super::{Incoming, Requester};
    let shell = shell().await;
    let mac = "0011aabbcc02";
    let admin = Requester {
        client_id: "op".into(),
        session_id: 1,
        operator: crate::identity::OperatorId {
            tenant: "default".into(),
            name: "admin".into(),
        },
    };
    let reset =
        json!({"commands": [{"command": "resetPhoneAuthentication", "mac": mac}]}).to_string();
    let stored = |shell: &Shell| {
        let mac = fleet_protocol::Mac::parse(mac).expect("mac");
        let phone = shell.controller.store.phone(&mac).expect("store");
        phone.expect("the phone")
    };

    // The reset first: the attempt with the PAP from before it is wrong.
    let old_pap = created_phone(&shell, mac);
    let (ask, judged) = pap_ask(&shell, 20, mac, &old_pap);
    let reset_first = [
        Incoming::Request {
            from: &admin,
            payload: reset.as_bytes(),
        },
        Incoming::Pap(&ask),
    ];
    assert!(shell.controller.handle_batch(reset_first));
    let judgement = judged.await.expect("judged");
    assert!(
        matches!(&judgement, Judgement::Refuse(r) if r.reason.contains("wrong")),
        "the PAP of before the reset was let in"
    );
    let after_reset = stored(&shell);
    assert_eq!(after_reset.failures, 1, "the wrong PAP was not counted");

    // The attempt first: admitted with the PAP of now, and the reset after it stands.
    let pap = after_reset.pap.expect("a new PAP").as_str().to_owned();
    let (ask, judged) = pap_ask(&shell, 21, mac, &pap);
    let attempt_first = [
        Incoming::Pap(&ask),
        Incoming::Request {
            from: &admin,
            payload: reset.as_bytes(),
        },
    ];
    assert!(shell.controller.handle_batch(attempt_first));
    let judgement = judged.await.expect("judged");
    assert!(
        matches!(judgement, Judgement::Admit(_)),
        "the right PAP refused"
    );
    let phone = stored(&shell);
    assert_ne!(
        phone.pap.map(|p| p.as_str().to_owned()),
        Some(pap),
        "the reset after the attempt was overwritten"
    );
    assert_eq!(phone.failures, 0);
}

/// The station object of `serial` as an operator gets it.
fn station_view(shell: &Shell, serial: &str) -> Value {
    let serial = Serial::parse(serial).expect("serial");
    let record = shell.controller.store.station(&serial).expect("store");
    let guard = shell.controller.lock();
    shell
        .controller
        .view(&guard.live, &record.expect("the station"))
}

#[tokio::test]
async fn a_connected_station_is_seen_by_the_minute_in_whole_seconds() {
    let shell = shell().await;
    let key = fleet_certs::self_signed_station("S1").expect("station");
    let admitted = shell
        .admission
        .admit(connect(2, &s1(), Some(&key.cert_der)))
        .await;
    assert!(matches!(admitted, Decision::Allow { .. }), "{admitted:?}");
    let request = json!({"serial": "S1", "model": "m", "firmware": "6.1.0",
        "mac_streaming": "a", "mac_control": "b"});
    shell.controller.handle_message(
        &Topic::StationAuthRequest("S1".parse().expect("serial")).to_string(),
        request.to_string().as_bytes(),
    );
    let connected_at = shell.clock.now();
    // The session stays open and says nothing but PINGREQs (which the controller never sees).
    assert!(shell
        .clock
        .advance(time::Duration::minutes(5) + time::Duration::milliseconds(250)));
    assert_eq!(shell.controller.record_sightings(), 1, "the online station");
    assert_eq!(
        shell.controller.record_sightings(),
        1,
        "still online: seen again"
    );
    let got = station_view(&shell, "S1");
    let seen = got["last_seen"]
        .as_str()
        .unwrap_or_else(|| panic!("{got}"))
        .to_owned();
    let expected = shell.clock.now().replace_nanosecond(0).expect("time");
    assert_eq!(seen, crate::times::rfc3339(expected).expect("rfc3339"));
    assert!(expected > connected_at, "the sighting moved");
    // Once the session has ended, the station is no longer seen.
    shell.admission.session_closed(&s1(), 2);
    assert_eq!(
        shell.controller.record_sightings(),
        1,
        "the end of the session"
    );
    assert!(shell.clock.advance(time::Duration::minutes(5)));
    assert_eq!(
        shell.controller.record_sightings(),
        0,
        "offline: nothing new"
    );
}

#[tokio::test]
async fn a_rebooted_authorized_station_is_told_authorized_without_a_new_record() {
    let mut shell = shell().await;
    let cert = shell.accepted_station("S1").await;
    let audited = |shell: &Shell| {
        shell
            .controller
            .store
            .audit("default", 1000)
            .expect("audit")
    };
    let before = audited(&shell);
    // The station reboots: a new session with its pinned key, and the same auth request.
    shell.topics();
    shell.sessions.delivered_to.lock().expect("lock").clear();
    let stored_before = station_view(&shell, "S1");
    let record_before = shell
        .controller
        .store
        .station(&Serial::parse("S1").expect("serial"))
        .expect("store");
    shell.clock.advance(time::Duration::minutes(3));
    let admitted = shell.admission.admit(connect(4, &s1(), Some(&cert))).await;
    assert!(matches!(admitted, Decision::Allow { .. }), "{admitted:?}");
    shell
        .admission
        .session_opened(&s1(), 4)
        .expect("an accepted station opens its session");
    let request = json!({"serial": "S1", "model": "m", "firmware": "6.1.0",
        "mac_streaming": "a", "mac_control": "b"});
    shell.controller.handle_message(
        &Topic::StationAuthRequest("S1".parse().expect("serial")).to_string(),
        request.to_string().as_bytes(),
    );
    let after = audited(&shell);
    let new: Vec<_> = after[before.len()..]
        .iter()
        .map(|r| r.action.clone())
        .collect();
    assert_eq!(
        new,
        vec!["connect".to_owned()],
        "only the CONNECT is audited: {new:?}"
    );
    let delivered = shell.sessions.delivered_to.lock().expect("lock").clone();
    assert!(
        delivered
            .iter()
            .any(|(client_id, session, topic, payload)| client_id == &s1()
                && *session == 4
                && *topic == Topic::StationCmd(Serial::parse("S1").expect("serial")).to_string()
                && String::from_utf8_lossy(payload).contains("authorized")),
        "{delivered:?}"
    );
    let topics = shell.topics();
    assert!(
        topics.contains(&Topic::Event("default".into(), EventKind::Stations).to_string()),
        "operators hear the station's state: {topics:?}"
    );
    // The record is as it was (nothing written), but the station is online and seen later.
    let record = |shell: &Shell| {
        let serial = Serial::parse("S1").expect("serial");
        shell.controller.store.station(&serial).expect("store")
    };
    assert_eq!(record(&shell), record_before);
    let got = station_view(&shell, "S1");
    assert_eq!(got["online"], true, "{got}");
    assert_ne!(got["last_seen"], stored_before["last_seen"], "{got}");
}

/// A station nobody decided on yet, as the front door asks for it (session `session_id`).
fn new_station(session_id: u64, serial: &str) -> ConnectInfo {
    let key = fleet_certs::self_signed_station(serial).expect("station");
    let client_id = Serial::parse(serial).expect("serial").client_id();
    connect(session_id, &client_id, Some(&key.cert_der))
}

#[tokio::test]
async fn a_call_that_must_not_wait_does_nothing_while_a_batch_holds_the_lock() {
    let shell = shell().await;
    let info = new_station(7, "S7");
    let client_id = info.client_id.clone();
    let held = shell.controller.lock();
    assert!(shell.controller.admit_now(&info, Wait::Never).is_none());
    assert!(shell.admission.try_session_opened(&client_id, 7).is_none());
    assert!(!shell.admission.try_session_closed(&client_id, 7));
    assert!(
        !held.live.sessions.contains_key(&client_id),
        "an admission that did not run registered its session"
    );
    drop(held);
    // Free: the same calls are answered at once.
    let step = shell.controller.admit_now(&info, Wait::Never);
    assert!(matches!(step, Some(Step::Decided(_))));
    let opened = shell.admission.try_session_opened(&client_id, 7);
    assert!(matches!(opened, Some(Ok(_))), "{opened:?}");
    assert!(shell.admission.try_session_closed(&client_id, 7));
    assert!(!shell
        .controller
        .lock()
        .live
        .sessions
        .contains_key(&client_id));
}

#[tokio::test]
// The lock is held across the awaits on purpose: it plays a batch's commit.
#[allow(clippy::await_holding_lock)]
async fn an_admission_waits_for_a_held_lock_on_the_blocking_pool_not_on_its_worker() {
    // One worker thread: an admission that waited for the lock on it would never let this
    // test release the lock.
    let shell = shell().await;
    let held = shell.controller.lock();
    let admission = ControllerAdmission(shell.controller.clone());
    let admitting = tokio::spawn(async move { admission.admit(new_station(8, "S8")).await });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(!admitting.is_finished(), "admitted while the lock was held");
    drop(held);
    let decision = admitting.await.expect("the admission's task");
    assert!(matches!(decision, Decision::Allow { .. }), "{decision:?}");
}
