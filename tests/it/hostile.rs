//! Slow and idle clients: sockets that never start TLS, handshakes that stall half-way, TLS
//! sessions that never send CONNECT, clients that stop reading. Each is cut by its own timeout,
//! and an honest station onboards while hundreds of them are open.

use fleet_sim::SimEvent;
use fleet_tests::raw::{
    anonymous_connector, connect, device_connector, publish_frame, subscribe_frame, tls,
    tls_small_receive_buffer,
};
use fleet_tests::{authorize, TestFleet, PATIENCE};
use fleet_tests::{serial, station_data, station_data_filter};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until the server closes `stream` (EOF or reset); panics after PATIENCE.
async fn closed_by_server<S: AsyncReadExt + Unpin>(stream: &mut S, what: &str) {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => panic!("{what} was never cut"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_cut_and_do_not_delay_an_honest_station() {
    let fleet = TestFleet::start_with(|c| {
        c.server.handshake_timeout_ms = 1500;
        c.server.connect_timeout_ms = 1500;
    })
    .await;
    let port = fleet.fleet.local_addr().port();
    let connector = anonymous_connector(&fleet);

    // The attackers come from addresses of their own (127.0.0.2, .3), each within the share of
    // unfinished handshakes one address may hold: what is tested here is the timeouts.
    let from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))
            .expect("bind");
        socket
            .connect(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
            .await
            .expect("tcp")
    };
    // Hundreds of sockets that never start TLS.
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(from(2).await);
    }
    // Handshakes that stall half-way: a TLS record header promising more than ever comes.
    let mut stalled = Vec::new();
    for _ in 0..100 {
        let mut s = from(3).await;
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
            .await
            .expect("write");
        stalled.push(s);
    }
    // TLS sessions that never send CONNECT.
    let mut mute = Vec::new();
    for _ in 0..50 {
        mute.push(tls(&connector, port).await);
    }

    // Meanwhile an honest station connects and is authorized.
    let mut op = fleet.operator().await;
    let mut station = fleet.station("HN-1", "6.1.0");
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;
    authorize(&mut op, &mut station).await;

    // Every hostile socket is cut by its own timeout.
    for s in &mut silent {
        closed_by_server(s, "a socket that never started TLS").await;
    }
    for s in &mut stalled {
        closed_by_server(s, "a stalled handshake").await;
    }
    for s in &mut mute {
        closed_by_server(s, "a TLS session without CONNECT").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_by_the_write_timeout() {
    let fleet = TestFleet::start_with(|c| c.server.write_timeout_ms = 500).await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("NR-1", "6.1.0");
    authorize(&mut op, &mut station).await;
    station.handle.shutdown().await;
    let connector = device_connector(&fleet, &fleet.station_dir("NR-1"));
    let port = fleet.fleet.local_addr().port();
    let mut stream = tls_small_receive_buffer(&connector, port).await;
    assert_eq!(connect(&mut stream, &serial("NR-1").client_id()).await, 0);
    stream
        .write_all(&subscribe_frame(&station_data_filter("NR-1")))
        .await
        .expect("subscribe");
    op.wait_state("NR-1", "running").await;
    // It publishes to its own data topic and never reads what comes back: the server's writes
    // block, and the write timeout ends the session.
    let (_reader, mut writer) = tokio::io::split(stream);
    let writing = tokio::spawn(async move {
        let chunk = publish_frame(&station_data("NR-1", "x"), &[0x55; 60_000]);
        for _ in 0..2_000 {
            if writer.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    op.wait_state("NR-1", "not_running").await;
    writing.abort();
}
