//! Churn: `fleetd` runs as a process; a few hundred stations reboot at once, round after round,
//! resuming their TLS sessions, while 1 % of them are removed by the operator and replaced by
//! new ones; fleetd's resident memory after the last round must not have grown past what the
//! allocator's noise explains, so that nothing it keeps grows with every session or client id
//! it has seen (issue 11, item 6), and fleetd's thread count must stay within what its bounded
//! blocking pools and workers allow. The full soak, 10,000 stations × 20 rounds, is the benchmark
//! `bench/src/bin/churn.rs`.

use fleet_tests::churn::{replacements, Churn, CHURN_CONFIG};
use fleet_tests::process::{Fleetd, PROCESS_PATIENCE};

use crate::FLEETD;

const STATIONS: usize = 300;
const ROUNDS: usize = 9;
/// Rounds before the first reading: the allocator's arenas and redb's cache warm up over the
/// first few rounds (fleetd's RSS grows, then flattens), whatever fleetd keeps.
const WARM_UP: usize = 3;
const REPLACE_PERCENT: f64 = 1.0;

/// The leak per session that this test must see, in KiB: a session that is never freed (its
/// task, pump, TLS connection and buffers, registry and controller entries: about 22 KiB idle,
/// bench/idle-heap.sh). fleetd's RSS still grows by about 2.5 KiB (release) to 8 KiB (debug)
/// per session over the first tens of rounds (redb's cache filling with the audit log's new
/// pages, up to `Store::CACHE_BYTES`; rumqttd's event log, up to its four segments; the
/// allocator), so a smaller leak is the soak's to find (BENCHMARKS.md, churn).
const LEAK_PER_SESSION_KIB: u64 = 24;
/// RSS growth that the allocator alone may show between two readings, in KiB.
const NOISE_KIB: u64 = 4096;
/// Threads fleetd may run besides its runtimes' workers and blocking pools: the main thread,
/// the store writer, rumqttd's router and the rest that do not come and go with sessions.
const FIXED_THREADS: u64 = 16;
/// fleetd's blocking pools at most: the openings' runtime's and the sessions' runtime's. With
/// pools that grow with the calls waiting in them, a reboot storm keeps a thread per waiting
/// call alive, each with its stack and allocator cache (BENCHMARKS.md, issue 11, tenth day).
const BLOCKING_THREADS: usize = fleet_broker::frontdoor::OPENINGS_BLOCKING_THREADS
    + fleet_controller::fleet::SESSIONS_BLOCKING_THREADS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_does_not_grow_fleetd_memory_per_client_id_ever_seen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("fleet-data");
    let fleetd = Fleetd::start_with_config(FLEETD.as_ref(), &data, CHURN_CONFIG);
    let mut op = fleetd.operator().await;
    let server = fleetd.server.parse().expect("fleetd's address");
    let mut fleet = Churn::new(
        server,
        fleetd.ca_pem(),
        dir.path().join("stations"),
        "CHURN",
    );
    fleet.patience = PROCESS_PATIENCE;
    fleet.onboard(&mut op, STATIONS).await.expect("onboarding");

    let replace = replacements(STATIONS, REPLACE_PERCENT);
    let mut rss = Vec::with_capacity(ROUNDS);
    let mut most_threads = fleetd.threads();
    for n in 1..=ROUNDS {
        let round = fleet
            .round(&mut op, replace)
            .await
            .unwrap_or_else(|e| panic!("round {n}: {e}"));
        // Otherwise the rounds would measure full handshakes, not a fleet coming back.
        assert_eq!(
            round.resumed, round.rebooted,
            "round {n}: every rebooted station resumes its TLS session"
        );
        rss.push(fleetd.rss_kib());
        most_threads = most_threads.max(fleetd.threads());
        eprintln!(
            "round {n}: {} rebooted ({} resumed), {} replaced, {:.1} s; fleetd RSS {} KiB",
            round.rebooted,
            round.resumed,
            round.replaced,
            round.seconds,
            rss[n - 1]
        );
    }

    // Why this margin. Between the two readings (after round WARM_UP and after the last),
    // every round opens one session per station (the rebooted ones and the new ones):
    // (ROUNDS - WARM_UP) × STATIONS = 1,800 sessions, 18 of them under client ids never seen
    // before. A leak of LEAK_PER_SESSION_KIB (24 KiB) in each would add 43,200 KiB. The margin
    // allows half of that, 21,600 KiB, for what grows with sessions until its bound (see
    // LEAK_PER_SESSION_KIB), plus NOISE_KIB (4,096 KiB) for the allocator: 25,696 KiB in all,
    // which a session never freed exceeds by at least 17,504 KiB. Smaller leaks, and leaks per
    // client id ever seen, are the soak's to find (bench/src/bin/churn.rs: 10,000 stations,
    // 20 rounds).
    let sessions = ((ROUNDS - WARM_UP) * STATIONS) as u64;
    let margin = NOISE_KIB + sessions * LEAK_PER_SESSION_KIB / 2;
    let (first, last) = (rss[WARM_UP - 1], rss[ROUNDS - 1]);
    let growth = last.saturating_sub(first);
    eprintln!(
        "fleetd RSS after round {WARM_UP}: {first} KiB, after round {ROUNDS}: {last} KiB; growth \
         {growth} KiB, margin {margin} KiB ({sessions} sessions in between)"
    );
    assert!(
        growth <= margin,
        "fleetd grew by {growth} KiB over {sessions} sessions ({first} → {last} KiB), more than \
         the {margin} KiB that noise explains: about {:.1} KiB per session",
        growth as f64 / sessions as f64
    );
    // A pool's idle threads live 10 s, longer than a round: a reading after each round sees
    // the most each pool started during it.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    // The openings' runtime's workers: the churn's configuration keeps the default.
    let handshake = u64::from(fleet_config::ServerConfig::default().handshake_threads);
    let bound = FIXED_THREADS + BLOCKING_THREADS as u64 + handshake + workers;
    eprintln!("fleetd ran at most {most_threads} threads (bound {bound})");
    assert!(
        most_threads <= bound,
        "fleetd ran {most_threads} threads after a round, more than its pools and workers \
         allow ({bound})"
    );
    fleet.disconnect_all().await;
}
