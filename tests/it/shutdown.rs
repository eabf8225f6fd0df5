//! The front door's part of a graceful shutdown (`Broker::shutdown`, as `Fleet::stop` and so
//! SIGTERM use it): every session ends with a server DISCONNECT 0x8B under MQTT 5 (never a
//! cut's 0x87), a clean TLS close under 3.1.1, and its will fires; `sessions_ended` says when
//! they are all gone. On the front door alone, with the harness's `OpenAdmission`.

use std::time::Duration;

use fleet_broker::Rights;
use fleet_tests::door::{FrontDoor, OpenAdmission};
use fleet_tests::raw::{connack, connect_frame, connect_v5_frame, tls, Will, WillV5};
use fleet_tests::PATIENCE;
use tokio::io::AsyncReadExt;

/// Every client's rights: `in/<id>` is its inbox, where its will goes.
fn rights_of(client_id: &str) -> Rights {
    let inbox = format!("in/{client_id}");
    Rights {
        publish: vec![inbox.clone()],
        inbox: vec![inbox],
        ..Rights::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_disconnects_every_session_as_such_and_fires_the_wills() {
    let recorder = OpenAdmission::new(rights_of, usize::MAX);
    let door = FrontDoor::start(recorder.clone(), |_| {}).await;
    let mut v5 = tls(&door.connector, door.port).await;
    let will = WillV5 {
        properties: &[],
        topic: "in/five",
        payload: b"gone",
    };
    assert_eq!(
        connack(&mut v5, &connect_v5_frame("five", 0, 60, &[], Some(&will))).await,
        0
    );
    let mut v311 = tls(&door.connector, door.port).await;
    let will = Will {
        topic: "in/three",
        payload: "gone",
        retain: false,
    };
    assert_eq!(
        connack(&mut v311, &connect_frame("three", 60, Some(&will))).await,
        0
    );

    door.broker.shutdown();

    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, v5.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(read.is_ok(), "a clean TLS close: {read:?}");
    // After the rest of the CONNACK (`connack` reads its first four bytes only): DISCONNECT,
    // its length, reason 0x8B Server shutting down (a cut's would be 0x87).
    let disconnect = rest.windows(3).position(|w| w[0] == 0xe0 && w[2] == 0x8b);
    assert!(disconnect.is_some(), "DISCONNECT 0x8B: {rest:?}");
    let mut rest = Vec::new();
    let read = tokio::time::timeout(PATIENCE, v311.read_to_end(&mut rest))
        .await
        .expect("closed in time");
    assert!(read.is_ok(), "a clean TLS close: {read:?}");
    assert!(rest.is_empty(), "3.1.1 has no server DISCONNECT: {rest:?}");

    assert!(door.broker.sessions_ended(PATIENCE).await);
    let mut wills: Vec<(String, String)> = recorder
        .received()
        .into_iter()
        .map(|(from, topic, payload)| {
            assert_eq!(payload, b"gone");
            (from, topic)
        })
        .collect();
    wills.sort();
    assert_eq!(
        wills,
        [
            ("five".to_owned(), "in/five".to_owned()),
            ("three".to_owned(), "in/three".to_owned())
        ],
        "each will reached the admission before its session was gone"
    );
}

#[tokio::test]
async fn sessions_ended_waits_no_longer_than_asked() {
    let recorder = OpenAdmission::new(rights_of, usize::MAX);
    let door = FrontDoor::start(recorder, |_| {}).await;
    let mut stream = tls(&door.connector, door.port).await;
    assert_eq!(
        connack(&mut stream, &connect_frame("stays", 60, None)).await,
        0
    );
    // No shutdown: the session stays, and the wait gives up.
    assert!(!door.broker.sessions_ended(Duration::from_millis(50)).await);
}
