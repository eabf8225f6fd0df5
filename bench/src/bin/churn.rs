//! Churn soak (issue 11, item 6): a fleet of stations reboots at once, round after round,
//! resuming their TLS sessions, while a share of them is removed by the operator and replaced
//! by new stations under new serials; fleetd's VmRSS is read after each round, and the last
//! round's is set against the first's (the target: within 10 %, so that nothing grows per
//! client id ever seen).
//!
//! The stations are fleet-tests' churn stations (`tests/src/churn.rs`, the same as in the CI
//! test `churn_does_not_grow_fleetd_memory_per_client_id_ever_seen`), 10 behind each loopback
//! source address from 127.0.0.2 on, so that fleetd's default per-address limits hold. fleetd
//! is either started here (`--fleetd BINARY`, on a fresh data directory with the churn's
//! operator limits) or already running (`--fleetd-pid`, `--server`, `--data-dir`; its
//! `[limits]` must let the `admin` operator run thousands of commands a second:
//! `operator_commands_per_second` and `operator_command_burst`). Each process holds one socket
//! per station: raise `ulimit -n` first. A line per round goes to stderr, one JSON report to
//! stdout.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fleet_tests::churn::{replacements, Churn, CHURN_CONFIG};
use fleet_tests::process::{operator_of, rss_kib, Fleetd};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// fleetd binary to start on a fresh data directory, at an ephemeral port.
    #[arg(
        long,
        required_unless_present = "fleetd_pid",
        conflicts_with = "fleetd_pid"
    )]
    fleetd: Option<PathBuf>,
    /// Process id of a running fleetd, instead of --fleetd; needs --server and --data-dir.
    #[arg(long, requires_all = ["server", "data_dir"])]
    fleetd_pid: Option<u32>,
    /// The running fleetd's address, 127.0.0.1:PORT.
    #[arg(long)]
    server: Option<SocketAddr>,
    /// The running fleetd's data directory: `ca.pem`, `admin.pem`, `admin.key`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Stations in the fleet.
    #[arg(long, default_value_t = 10_000)]
    stations: usize,
    /// Rounds of "every station reboots at once".
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Share of the fleet removed and replaced by new stations in each round (at least one).
    #[arg(long, default_value_t = 1.0)]
    replace_percent: f64,
    /// Stations connecting at once, at most.
    #[arg(long, default_value_t = 1000)]
    in_flight: usize,
    /// Seconds one station may take to come up or go down.
    #[arg(long, default_value_t = 120)]
    patience_s: u64,
    /// Folder for the stations' state directories (and fleetd's data directory with
    /// --fleetd); a temporary one, removed at the end, by default.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

/// fleetd, started here or already running.
enum Target {
    Started(Fleetd),
    Running { pid: u32 },
}

impl Target {
    fn pid(&self) -> u32 {
        match self {
            Target::Started(fleetd) => fleetd.pid(),
            Target::Running { pid } => *pid,
        }
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.pid()).with_context(|| format!("no VmRSS of process {}", self.pid()))
    }
}

/// A tag for the serials, so that a run against a running fleetd meets none of an earlier run's.
fn run_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("CH{:06x}", (nanos ^ std::process::id()) & 0xff_ffff)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temporary = tempfile::tempdir().context("temporary folder")?;
    let base = args
        .state_dir
        .clone()
        .unwrap_or_else(|| temporary.path().to_owned());
    let (target, server, data) = match (&args.fleetd, args.fleetd_pid) {
        (Some(bin), _) => {
            let data = base.join("fleet-data");
            let fleetd = Fleetd::start_with_config(bin, &data, CHURN_CONFIG);
            let server = fleetd.server.parse().context("fleetd's address")?;
            (Target::Started(fleetd), server, data)
        }
        (None, Some(pid)) => {
            let server = args.server.context("--server")?;
            let data = args.data_dir.clone().context("--data-dir")?;
            (Target::Running { pid }, server, data)
        }
        (None, None) => anyhow::bail!("--fleetd or --fleetd-pid"),
    };
    let mut op = operator_of(&server.to_string(), &data).await;
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).context("ca.pem")?;
    let tag = run_tag();
    let mut fleet = Churn::new(server, ca_pem, base.join(&tag), &tag);
    fleet.patience = Duration::from_secs(args.patience_s);
    fleet.in_flight = args.in_flight;

    let rss_start = target.rss_kib()?;
    let started = Instant::now();
    fleet.onboard(&mut op, args.stations).await?;
    let onboarding_s = started.elapsed().as_secs_f64();
    let rss_onboarded = target.rss_kib()?;
    eprintln!(
        "onboarded {} stations in {onboarding_s:.1} s; fleetd RSS {rss_start} KiB at start, \
         {rss_onboarded} KiB now",
        fleet.len()
    );

    let replace = replacements(args.stations, args.replace_percent);
    let mut rounds = Vec::with_capacity(args.rounds);
    let mut rss = Vec::with_capacity(args.rounds);
    for n in 1..=args.rounds {
        let round = fleet.round(&mut op, replace).await?;
        let kib = target.rss_kib()?;
        eprintln!(
            "round {n}: {} rebooted ({} resumed), {} replaced, {:.1} s; fleetd RSS {kib} KiB",
            round.rebooted, round.resumed, round.replaced, round.seconds
        );
        rounds.push(json!({
            "round": n,
            "rebooted": round.rebooted,
            "resumed": round.resumed,
            "replaced": round.replaced,
            "seconds": round.seconds,
            "fleetd_rss_kib": kib,
        }));
        rss.push(kib);
    }
    fleet.disconnect_all().await;

    let (first, last) = match (rss.first(), rss.last()) {
        (Some(&first), Some(&last)) => (first, last),
        _ => anyhow::bail!("no round was run (--rounds 0)"),
    };
    let ratio = last as f64 / first as f64;
    eprintln!(
        "fleetd RSS after round 1: {first} KiB, after round {}: {last} KiB: {ratio:.3}× ({:+.1} %)",
        args.rounds,
        (ratio - 1.0) * 100.0
    );
    let report = json!({
        "stations": args.stations,
        "rounds": args.rounds,
        "replace_percent": args.replace_percent,
        "replaced_per_round": replace,
        "in_flight": args.in_flight,
        "onboarding_s": onboarding_s,
        "fleetd_rss_kib_start": rss_start,
        "fleetd_rss_kib_onboarded": rss_onboarded,
        "per_round": rounds,
        "fleetd_rss_kib_first_round": first,
        "fleetd_rss_kib_last_round": last,
        "last_vs_first": ratio,
        "within_10_percent": ratio <= 1.10,
    });
    println!("{report}");
    Ok(())
}
