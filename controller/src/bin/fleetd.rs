//! `fleetd`: the fleet service (front door, router and controller in one process, or one node
//! of a cluster: an edge, a controller, or both, as `[cluster] role` says).
//!
//! It stops on SIGTERM (systemd, Docker, `kill`) exactly as on Ctrl-C (SIGINT): gracefully, in
//! a bounded time ([`STOP_BUDGET`], 10 s, from the signal: [`Fleet::stop`] takes at most 9 s,
//! the store's close and the runtime's last tasks get what is left), then exits 0. A second
//! signal during that ends the process at once (the store is crash-safe: what was answered is
//! on disk), with 130 (SIGINT) or 143 (SIGTERM).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fleet_controller::{Fleet, Node};
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Descriptors fleetd holds besides its clients' sockets: the listener, the store, the
/// runtime's own, the log.
const RESERVED_FILES: u64 = 64;

/// The whole of a graceful stop, from the signal to the exit: [`Fleet::stop`] (at most 9 s),
/// then the store's close and the runtime's remaining tasks, each within what is left.
const STOP_BUDGET: Duration = Duration::from_secs(10);

/// Of [`STOP_BUDGET`], what is kept for the runtime's shutdown after the store's close.
const RUNTIME_GRACE: Duration = Duration::from_millis(300);

#[derive(Parser)]
#[command(
    name = "fleetd",
    version,
    about = "fleetgate: broker and controller in one process"
)]
struct Args {
    /// Configuration file (TOML); every key has a default, so it is optional.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data directory (CA, certificates, store). Overrides `server.data_dir`.
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// Address of the MQTT/TLS listener. Overrides `server.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Format of the log on stderr: `text` (coloured only on a terminal) or `json` (one object
    /// per line, for log collectors). The level comes from RUST_LOG, else `[log] level`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Issue a further operator certificate: registers it and writes NAME.pem and NAME.key
    /// into the data directory (or --out). Never overwrites; a name is issued once per tenant.
    IssueOperator {
        name: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Folder for NAME.pem and NAME.key (default: the data directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Make the data directory's CA, server certificate and `admin` operator, if they are not
    /// there yet, and exit: the files every node of a cluster starts from (README, "Scaling
    /// out"). Prints the directory.
    Init,
    /// Print a commented example configuration with every key and its default.
    ExampleConfig,
}

fn main() {
    with_tuned_malloc();
    if let Err(e) = run() {
        // One line, non-zero exit (PROTOCOL §8).
        eprintln!("fleetd: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// An error and its causes on one line, each said once: several of fleetd's errors put their
/// cause in their own message too (`store: {0}` over the store's error over redb's), and
/// `{:#}` would repeat it once per level.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// jemalloc, fleetd's allocator unless it is built without the `jemalloc` feature. In the churn
/// soak (`bench/src/bin/churn.rs`, 10,000 stations × 20 rounds, 1 % replaced each round)
/// glibc's allocator, even tuned as below, kept what the first rounds' storms freed: fleetd's
/// RSS grew over the first rounds and then held, 1.106–1.136× from the first round to the
/// last, while its live heap did not grow (heaptrack, 5,000 stations × 12 rounds). jemalloc
/// returns freed pages (its decay): 0.951× with two arenas over 20 rounds (1.010× over 12), at
/// the same RSS per device and storm rate, and about 10 % more per connection in a storm
/// (11.3–11.7 KiB against 10.4–10.5; BENCHMARKS.md, issue 11, fourteenth day).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The allocator's settings fleetd re-executes itself with, and the variables by which the
/// environment overrides them. With jemalloc: two arenas (`narenas:2`; its default, four per
/// core, held 186 MiB after a churn's first round where two held 165–175 MiB).
#[cfg(feature = "jemalloc")]
const TUNED: (&[(&str, &str)], &[&str]) = (
    &[("_RJEM_MALLOC_CONF", "narenas:2")],
    &["_RJEM_MALLOC_CONF"],
);

/// Without jemalloc (heaptrack's runs), glibc's allocator:
/// - `MALLOC_ARENA_MAX=2`. glibc gives threads that allocate arenas of their own (up to 8 per
///   core) and keeps what is freed in each: in the churn soak (1,000 stations × 10 rounds)
///   fleetd's RSS grew 2.9× while its live heap did not (heaptrack), and 1.5×, flattening,
///   with two arenas; the storm figures did not change.
/// - `MALLOC_MMAP_THRESHOLD_=131072`. A fixed threshold: blocks of 128 KiB and more are mapped
///   on their own and unmapped when freed. By default glibc raises the threshold each time such
///   a block is freed (up to 32 MiB), and the large blocks of a storm (hash-table growth, the
///   router's logs) then come from the arenas, whose middle glibc never returns (BENCHMARKS.md,
///   issue 11, ninth day).
#[cfg(not(feature = "jemalloc"))]
const TUNED: (&[(&str, &str)], &[&str]) = (
    &[
        ("MALLOC_ARENA_MAX", "2"),
        ("MALLOC_MMAP_THRESHOLD_", "131072"),
    ],
    &[
        "MALLOC_ARENA_MAX",
        "MALLOC_MMAP_THRESHOLD_",
        "GLIBC_TUNABLES",
    ],
);

/// Re-executes fleetd with its allocator tuned for a long-lived server of many small sessions
/// ([`TUNED`]), unless the environment tunes it already. The allocator reads its settings
/// before `main`, hence the `exec`.
fn with_tuned_malloc() {
    use std::os::unix::process::CommandExt;
    let (settings, overrides) = TUNED;
    if overrides
        .iter()
        .any(|name| std::env::var_os(name).is_some())
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let error = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .envs(settings.iter().copied())
        .exec();
    // Only returns on failure: go on with the allocator's defaults.
    eprintln!("fleetd: running with the allocator's default settings ({error})");
}

// stdout is what scripts read (PROTOCOL §8): the issued files, the example configuration.
#[allow(clippy::print_stdout)]
fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = fleet_config::load(args.config.as_deref())?;
    let rust_log = std::env::var("RUST_LOG").ok();
    init_logging(
        log_filter(rust_log.as_deref(), &config.log.level)?,
        args.log_format,
    );
    if let Some(dir) = args.data_dir {
        config.server.data_dir = dir;
    }
    if let Some(listen) = args.listen {
        config.server.listen = listen;
    }
    match args.command {
        Some(Cmd::IssueOperator { name, tenant, out }) => {
            let dir = &config.server.data_dir;
            let (cert, key) = fleet_certs::data_dir::issue_operator_files_into(
                dir,
                &name,
                &tenant,
                out.as_deref().unwrap_or(dir),
            )?;
            println!("{}\n{}", cert.display(), key.display());
            Ok(())
        }
        Some(Cmd::Init) => {
            let dir = &config.server.data_dir;
            fleet_certs::data_dir::ensure(dir, &config.server.server_names)?;
            println!("{}", dir.display());
            Ok(())
        }
        Some(Cmd::ExampleConfig) => {
            print!("{}", fleet_config::EXAMPLE);
            Ok(())
        }
        None => serve(config),
    }
}

/// The log filter: `RUST_LOG` if set (it wins, and may name targets), else `[log] level`; then
/// `fleet_broker::noise::QUIET_TARGETS` for the targets it does not name.
fn log_filter(rust_log: Option<&str>, level: &str) -> anyhow::Result<EnvFilter> {
    let base = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let mut directives = base.unwrap_or(level).to_owned();
    // The targets the directives name (`target=level`, `target[span]=level`, or `target`
    // alone, which is also how a bare level is written: a level never equals a target).
    let named: Vec<String> = directives
        .split(',')
        .map(|d| d.split(['=', '[']).next().unwrap_or("").trim().to_owned())
        .collect();
    for (target, quiet) in fleet_broker::noise::QUIET_TARGETS {
        if !named.iter().any(|n| n == target) {
            directives.push_str(&format!(",{target}={quiet}"));
        }
    }
    EnvFilter::builder()
        .parse(&directives)
        .with_context(|| match base {
            Some(_) => format!("RUST_LOG is not a log filter ({directives:?})"),
            None => format!("log.level is not a level ({level:?})"),
        })
}

/// The log on stderr: text, with ANSI colours only when stderr is a terminal, or JSON lines.
fn init_logging(filter: EnvFilter, format: LogFormat) {
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(RouterNoise)
        .with(text)
        .with(json)
        .init();
}

/// Drops the one message of rumqttd's router that is noise
/// ([`fleet_broker::noise::is_router_noise`]).
struct RouterNoise;

impl<S: tracing::Subscriber> Layer<S> for RouterNoise {
    fn event_enabled(
        &self,
        event: &tracing::Event<'_>,
        _: tracing_subscriber::layer::Context<'_, S>,
    ) -> bool {
        !fleet_broker::noise::is_router_noise(event)
    }
}

/// Raises the soft limit on open files to the hard one, and says how many connections it
/// allows: each client holds a socket, and the usual soft limit of 1024 would turn clients
/// away long before `server.max_connections`. A failure is a warning, never fatal.
fn raise_open_files(max_connections: u32) {
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        let raised = Rlimit {
            current: Some(hard),
            maximum: Some(hard),
        };
        if soft < hard {
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::warn!("cannot raise the limit on open files from {soft} to {hard}: {e}");
            }
        }
    }
    let Some(files) = getrlimit(Resource::Nofile).current else {
        tracing::info!("no limit on open files");
        return;
    };
    let connections = connections_allowed(files);
    tracing::info!(
        open_files = files,
        before = ?limit.current,
        "the limit on open files allows about {connections} connections"
    );
    if connections < u64::from(max_connections) {
        tracing::warn!(
            "server.max_connections is {max_connections}, more than the limit on open files \
             allows: raise the hard limit (ulimit -Hn) or lower server.max_connections"
        );
    }
}

/// Connections that `open_files` descriptors leave room for.
fn connections_allowed(open_files: u64) -> u64 {
    open_files.saturating_sub(RESERVED_FILES)
}

// stdout says where fleetd listens, for scripts and tests.
#[allow(clippy::print_stdout)]
fn serve(config: fleet_config::Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Session ends, router links, sweeps and firmware reads wait on the blocking pool
        // (they may wait for the controller's lock or the disk, never on an async worker), and
        // a batch's `block_in_place` hands its worker's place to a thread of it. Bounded, so
        // that 10,000 sessions ending at once queue instead of starting a hundred threads that
        // then stay alive, each with its stack and glibc's per-thread cache resident (at 128,
        // fleetd's RSS grew round after round of a churn; BENCHMARKS.md, issue 11, tenth day).
        // The openings' runtime has its own, smaller pool for admissions.
        .max_blocking_threads(fleet_controller::fleet::SESSIONS_BLOCKING_THREADS)
        .build()
        .context("tokio runtime")?;
    let stopped = runtime.block_on(async {
        // Before anything is announced: a SIGTERM right after the address line is a shutdown
        // too, not the default action (an abrupt end).
        let mut signals = StopSignals::install()?;
        // A standby on a PostgreSQL store waits in `start` for the controller lock, for as
        // long as another fleetd serves: a signal ends that wait (nothing was served yet).
        let fleet = tokio::select! {
            started = Service::start(&config) => started?,
            signal = signals.first() => {
                tracing::info!("{signal} before fleetd served: exiting");
                return anyhow::Ok(None);
            }
        };
        // Once started: a fleetd that cannot start says only why (one line). Clients come in
        // within the first moments at most by the hundred, well within any soft limit.
        raise_open_files(config.server.max_connections);
        match fleet.local_addr() {
            Some(addr) => {
                tracing::info!(
                    listen = %addr,
                    data_dir = %config.server.data_dir.display(),
                    "fleetd ready"
                );
                // Scripts and tests read the bound address from this line.
                println!("fleetd listening on {addr}");
            }
            None => {
                tracing::info!(node = %config.cluster.node, "fleetd ready: a controller on the bus");
                // Scripts and tests wait for this line of a controller, which has no listener.
                println!("fleetd controller {} serving", config.cluster.node);
            }
        }
        // Another fleetd that took over the database serves from now on: this one stops as
        // if signalled, and exits non-zero (its supervisor may start it again, as a standby).
        let mut deposed = None;
        let signal = tokio::select! {
            signal = signals.first() => signal,
            why = fleet.deposed() => {
                tracing::error!("{why}: shutting down");
                deposed = Some(why);
                "deposed"
            }
        };
        let deadline = tokio::time::Instant::now() + STOP_BUDGET;
        tracing::info!("{signal}: shutting down");
        // A second signal: the operator does not want to wait.
        tokio::spawn(async move {
            let again = signals.first().await;
            tracing::warn!("{again} again: exiting now");
            std::process::exit(if again == "SIGINT" { 130 } else { 143 });
        });
        let writer_alive = fleet.store_writer_alive();
        let has_store = fleet.has_store();
        fleet.stop().await;
        // The fleet is gone: the store closes once the last task that used the controller has
        // ended (its writer commits what is queued first).
        let close_by = deadline - RUNTIME_GRACE;
        while writer_alive.load(std::sync::atomic::Ordering::Relaxed)
            && tokio::time::Instant::now() < close_by
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if writer_alive.load(std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!("the store is still in use; every commit answered is on disk already");
        } else if has_store {
            tracing::info!("store closed");
        }
        anyhow::Ok(Some((deadline, deposed)))
    })?;
    let Some((deadline, deposed)) = stopped else {
        // A standby signalled while it waited for the controller lock: that wait may be on the
        // blocking pool, which dropping the runtime would wait for (10 s and more).
        runtime.shutdown_timeout(Duration::from_millis(100));
        return Ok(());
    };
    // What is left of the budget (at least a moment for tasks that are about to end).
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    runtime.shutdown_timeout(left.max(Duration::from_millis(50)));
    tracing::info!("stopped");
    match deposed {
        Some(why) => Err(anyhow::anyhow!("stopped serving: {why}")),
        None => Ok(()),
    }
}

/// What this fleetd runs: the single process, or a node of a cluster (`[cluster] role`).
enum Service {
    Single(Box<Fleet>),
    Node(Box<Node>),
}

impl Service {
    async fn start(config: &fleet_config::Config) -> anyhow::Result<Service> {
        Ok(match config.cluster.role {
            fleet_config::Role::Single => Service::Single(Box::new(Fleet::start(config).await?)),
            _ => Service::Node(Box::new(Node::start(config).await?)),
        })
    }

    /// The listener, unless this is a controller alone.
    fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Service::Single(fleet) => Some(fleet.local_addr()),
            Service::Node(node) => node.local_addr(),
        }
    }

    /// Whether this fleetd keeps a store (an edge alone does not).
    fn has_store(&self) -> bool {
        match self {
            Service::Single(_) => true,
            Service::Node(node) => node.controller().is_some(),
        }
    }

    async fn deposed(&self) -> String {
        match self {
            Service::Single(fleet) => fleet.deposed().await,
            Service::Node(node) => node.deposed().await,
        }
    }

    fn store_writer_alive(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        match self {
            Service::Single(fleet) => fleet.store_writer_alive(),
            Service::Node(node) => node.store_writer_alive(),
        }
    }

    async fn stop(self) {
        match self {
            Service::Single(fleet) => {
                let stopped = fleet.stop().await;
                if !stopped.sessions_ended {
                    tracing::warn!(
                        "some sessions did not end in time; they are closed with the process"
                    );
                }
                if !stopped.inbox_drained {
                    tracing::warn!("the controller did not finish its inbox in time");
                }
            }
            Service::Node(node) => node.stop().await,
        }
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, caught from [`StopSignals::install`] on.
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals {
            terminate: signal(SignalKind::terminate()).context("SIGTERM handler")?,
            interrupt: signal(SignalKind::interrupt()).context("SIGINT handler")?,
        })
    }

    /// Waits for the next of them, and says which came.
    async fn first(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_over_the_configured_level_and_the_quiet_targets_stay_quiet() {
        let filter = |rust_log: Option<&str>| {
            let text = log_filter(rust_log, "debug").unwrap().to_string();
            let mut parts: Vec<String> = text.split(',').map(str::to_owned).collect();
            parts.sort();
            parts
        };
        assert_eq!(
            filter(None),
            ["debug", "rumqttd=warn", "rustls::msgs::handshake=error"]
        );
        assert_eq!(
            filter(Some("warn,fleet_broker=trace")),
            [
                "fleet_broker=trace",
                "rumqttd=warn",
                "rustls::msgs::handshake=error",
                "warn"
            ]
        );
        assert_eq!(
            filter(Some("info,rumqttd=debug")),
            ["info", "rumqttd=debug", "rustls::msgs::handshake=error"],
            "RUST_LOG names rumqttd"
        );
        assert_eq!(
            filter(Some(
                "info,rumqttd::router=debug,my_rustls::msgs::handshake=info"
            )),
            [
                "info",
                "my_rustls::msgs::handshake=info",
                "rumqttd::router=debug",
                "rumqttd=warn",
                "rustls::msgs::handshake=error"
            ],
            "a target that only contains a quiet one's name leaves it quiet"
        );
        assert_eq!(
            filter(Some("  ")),
            filter(None),
            "a blank RUST_LOG is not set"
        );
        assert!(log_filter(Some("info,=[{"), "info").is_err());
    }

    #[test]
    fn the_routers_gone_link_message_is_dropped_and_its_other_errors_are_not() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        struct Count(Arc<AtomicUsize>);
        impl<S: tracing::Subscriber> Layer<S> for Count {
            fn on_event(
                &self,
                _: &tracing::Event<'_>,
                _: tracing_subscriber::layer::Context<'_, S>,
            ) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let seen = Arc::new(AtomicUsize::new(0));
        let subscriber = tracing_subscriber::registry()
            .with(RouterNoise)
            .with(Count(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::error!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
            assert_eq!(seen.load(Ordering::Relaxed), 0, "dropped");
            tracing::error!(target: "rumqttd::router::routing", "Router done!");
            tracing::error!(target: "fleet_broker", "no-connection id {} is already gone", 7);
            tracing::warn!(target: "rumqttd::router::routing", "no-connection id {} is already gone", 7);
        });
        assert_eq!(
            seen.load(Ordering::Relaxed),
            3,
            "only that message of the router"
        );
    }

    #[test]
    fn an_error_chain_is_one_line_each_part_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("inner: locked")]
        struct Inner;
        #[derive(Debug, thiserror::Error)]
        #[error("store: {0}")]
        struct Outer(#[from] Inner);
        let e = anyhow::Error::new(Outer(Inner)).context("cannot start\nat all");
        assert_eq!(one_line(&e), "cannot start at all: store: inner: locked");
    }

    #[test]
    fn the_connections_allowed_leave_room_for_fleetds_own_files() {
        assert_eq!(connections_allowed(20_000), 20_000 - RESERVED_FILES);
        assert_eq!(connections_allowed(1024), 960);
        assert_eq!(connections_allowed(3), 0);
    }
}
