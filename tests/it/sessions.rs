//! Device sessions without router links (ARCHITECTURE.md, "Data flow"): what a client says on
//! its inbox topics goes from its session straight to the admission, in order and acknowledged
//! only once the admission has it; its mailbox comes straight from the controller; a session
//! gets a rumqttd link only when it publishes or subscribes past those, and gives it back when
//! it ends. On the front door alone, with the harness's `OpenAdmission` and this file's
//! rights, and through the whole fleet.

use std::sync::Arc;
use std::time::Duration;

use fleet_broker::{Rights, SessionControl};
use fleet_tests::door::{FrontDoor, OpenAdmission};
use fleet_tests::raw::{
    connack, connect, connect_frame, frame, publish_frame, read_until_contains, string,
    subscribe_frame, tls, until_closed, Will,
};
use fleet_tests::{authorize, TestFleet, PATIENCE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Every client's rights: `in/<id>` is its inbox, `mbox/<id>` and `final/<id>` its mailboxes,
/// `data/<id>/…` its data (through the router); everyone may subscribe to all data.
fn rights_of(client_id: &str) -> Rights {
    let inbox = format!("in/{client_id}");
    let mailbox = format!("mbox/{client_id}");
    let last_words = format!("final/{client_id}");
    Rights {
        publish: vec![inbox.clone(), format!("data/{client_id}/#")],
        publish_deny: vec![],
        subscribe: vec![mailbox.clone(), last_words.clone(), "data/#".into()],
        inbox: vec![inbox],
        mailbox: vec![mailbox, last_words],
        retain: true,
    }
}

async fn door(admission: Arc<OpenAdmission>) -> FrontDoor {
    FrontDoor::start(admission, |_| {}).await
}

/// PUBLISH at QoS 1 with packet id `pkid`.
fn publish_qos1(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic.as_bytes());
    body.extend(pkid.to_be_bytes());
    body.extend_from_slice(payload);
    frame(0x32, body)
}

fn puback(pkid: u16) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    vec![0x40, 0x02, hi, lo]
}

/// Waits until `done` holds (polled), or fails the test after [`PATIENCE`].
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "{what} never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_speaks_only_to_the_controller_gets_no_router_link() {
    let recorder = OpenAdmission::new(rights_of, usize::MAX);
    let door = door(recorder.clone()).await;
    only_to_the_controller(door, recorder).await;
}

/// As above, with connections opened on the sessions' runtime (`handshake_threads = 0`) instead
/// of moved there once open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_with_connections_opened_on_the_sessions_runtime() {
    let recorder = OpenAdmission::new(rights_of, usize::MAX);
    let door = FrontDoor::start(recorder.clone(), |s| s.handshake_threads = 0).await;
    only_to_the_controller(door, recorder).await;
}

/// Three devices publish to their inbox and subscribe to their mailbox: every message reaches
/// the admission in order, the mailbox delivers, and no router link is made.
async fn only_to_the_controller(door: FrontDoor, recorder: Arc<OpenAdmission>) {
    let mut devices = Vec::new();
    for id in ["d1", "d2", "d3"] {
        let mut stream = tls(&door.connector, door.port).await;
        assert_eq!(connect(&mut stream, id).await, 0);
        stream
            .write_all(&subscribe_frame(&format!("mbox/{id}")))
            .await
            .expect("subscribe");
        read_until_contains(&mut stream, &[0x90, 0x03, 0x00, 0x01, 0x01]).await;
        for (pkid, payload) in [(1, b"one"), (2, b"two"), (3, b"tri")] {
            let message = publish_qos1(&format!("in/{id}"), pkid, payload);
            stream.write_all(&message).await.expect("publish");
            read_until_contains(&mut stream, &puback(pkid)).await;
        }
        devices.push(stream);
    }
    // Acknowledged means the admission has it, in the order each device sent them.
    let received = recorder.received();
    for id in ["d1", "d2", "d3"] {
        let payloads: Vec<&[u8]> = received
            .iter()
            .filter(|(from, topic, _)| from == id && *topic == format!("in/{id}"))
            .map(|(_, _, payload)| &payload[..])
            .collect();
        assert_eq!(payloads, [&b"one"[..], b"two", b"tri"], "{id}");
    }
    // The mailbox comes past the router too.
    assert!(door
        .broker
        .sessions()
        .deliver("d2", "mbox/d2".into(), b"hello".to_vec()));
    read_until_contains(&mut devices[1], b"hello").await;
    assert_eq!(door.broker.router_links(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbox_message_is_acknowledged_only_once_the_admission_has_it() {
    let recorder = OpenAdmission::new(rights_of, 0);
    let door = door(recorder.clone()).await;
    let mut stream = tls(&door.connector, door.port).await;
    assert_eq!(connect(&mut stream, "slow").await, 0);
    stream
        .write_all(&publish_qos1("in/slow", 7, b"wait"))
        .await
        .expect("publish");
    // The admission does not take it: no PUBACK (nor anything else) comes.
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), stream.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "the front door answered before the admission had the message"
    );
    recorder.gate.add_permits(1);
    read_until_contains(&mut stream, &puback(7)).await;
    assert_eq!(recorder.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_gets_a_router_link_on_its_first_data_and_gives_it_back_at_its_end() {
    let recorder = OpenAdmission::new(rights_of, usize::MAX);
    let door = door(recorder.clone()).await;
    let mut listener = tls(&door.connector, door.port).await;
    assert_eq!(connect(&mut listener, "listener").await, 0);
    assert_eq!(door.broker.router_links(), 0);
    listener
        .write_all(&subscribe_frame("data/#"))
        .await
        .expect("subscribe");
    read_until_contains(&mut listener, &[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    assert_eq!(
        door.broker.router_links(),
        1,
        "a subscription the router keeps"
    );

    let mut talker = tls(&door.connector, door.port).await;
    assert_eq!(connect(&mut talker, "talker").await, 0);
    talker
        .write_all(&publish_frame("in/talker", b"to the controller"))
        .await
        .expect("publish");
    eventually("the inbox message arrived", || {
        recorder.received().len() == 1
    })
    .await;
    assert_eq!(door.broker.router_links(), 1, "the inbox needs no link");
    talker
        .write_all(&publish_frame("data/talker/x", b"to anyone"))
        .await
        .expect("publish");
    read_until_contains(&mut listener, b"to anyone").await;
    assert_eq!(door.broker.router_links(), 2);

    talker.write_all(&[0xe0, 0x00]).await.expect("disconnect");
    until_closed(&mut talker).await;
    eventually("the talker's link was given back", || {
        door.broker.router_links() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_will_on_an_inbox_topic_reaches_the_admission_not_the_router() {
    let recorder = OpenAdmission::new(rights_of, usize::MAX);
    let door = door(recorder.clone()).await;
    let sessions = door.broker.sessions();

    // Keepalive 1 s, then silence: cut after 1.5 s, and the will goes to the admission.
    let mut silent = tls(&door.connector, door.port).await;
    let will = Will {
        topic: "in/silent",
        payload: r#"{"online":false}"#,
        retain: true,
    };
    assert_eq!(
        connack(&mut silent, &connect_frame("silent", 1, Some(&will))).await,
        0
    );
    until_closed(&mut silent).await;
    eventually("the will reached the admission", || {
        recorder.received().iter().any(|(from, topic, payload)| {
            from == "silent" && topic == "in/silent" && payload == br#"{"online":false}"#
        })
    })
    .await;

    // A clean DISCONNECT discards it; the session is unregistered only after a will fired.
    let mut clean = tls(&door.connector, door.port).await;
    let will = Will {
        topic: "in/clean",
        payload: "discarded",
        retain: false,
    };
    assert_eq!(
        connack(&mut clean, &connect_frame("clean", 60, Some(&will))).await,
        0
    );
    clean.write_all(&[0xe0, 0x00]).await.expect("disconnect");
    until_closed(&mut clean).await;
    eventually("the clean session ended", || {
        !sessions.is_connected("clean")
    })
    .await;
    assert!(recorder.received().iter().all(|(from, ..)| from != "clean"));
    assert_eq!(door.broker.router_links(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stations_and_phones_onboard_without_router_links() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    // The operator's event subscription is in the router.
    let operators = fleet.fleet.router_links();
    let mut station = fleet.station("NL-1", "6.1.0");
    authorize(&mut op, &mut station).await;
    let pap = op.create_phone("00a0b0c0d0e0").await;
    let phone = fleet.phone("00a0b0c0d0e0", Some(&pap), "127.0.0.2");
    let outcome = phone.provision().await;
    assert!(
        matches!(outcome, fleet_sim::phone::ProvisionOutcome::Provisioned),
        "{outcome:?}"
    );
    assert_eq!(fleet.fleet.router_links(), operators);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_session_gets_nothing_more_but_the_message_its_cut_waits_for() {
    let door = door(OpenAdmission::new(rights_of, 0)).await;
    let sessions = door.broker.sessions();
    let mut stream = tls(&door.connector, door.port).await;
    assert_eq!(connect(&mut stream, "cut").await, 0);
    for filter in ["mbox/cut", "final/cut"] {
        stream
            .write_all(&subscribe_frame(filter))
            .await
            .expect("subscribe");
        read_until_contains(&mut stream, &[0x90, 0x03, 0x00, 0x01, 0x01]).await;
    }
    assert!(sessions.cut("cut", Some("final/cut".into())));
    // Queued after the cut, before its final message (a firmware chunk read late, say).
    assert!(sessions.deliver("cut", "mbox/cut".into(), b"too late".to_vec()));
    assert!(sessions.deliver("cut", "final/cut".into(), b"rejected".to_vec()));
    let rest = until_closed(&mut stream).await;
    let seen = |needle: &[u8]| rest.windows(needle.len()).any(|w| w == needle);
    assert!(seen(b"rejected"), "{:?}", String::from_utf8_lossy(&rest));
    assert!(!seen(b"too late"), "{:?}", String::from_utf8_lossy(&rest));
}
