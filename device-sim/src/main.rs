//! `fleet-sim`: run one simulated station, or many, and play its local admin interface; make
//! and provision simulated phones; load fleetd with thousands of both and measure it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use fleet_sim::open_files::{raise_open_files, OpenFiles};
use fleet_sim::phone::{self, PhoneProfile, PhoneState, PhoneTarget, ProvisionOutcome};
use fleet_sim::{
    admin_request, fingerprint, local_reset, run_load, serve_admin, spawn_fleet, spawn_station,
    AdminRequest, ClusterFile, Latency, LoadOptions, MeasuredProcess, ProcessFigures, ServerPlan,
    SimConfig, Spread, StationProfile, StationState, Tally, DEFAULT_MODEL, DEVICES_PER_ADDRESS,
};
use tokio::sync::{mpsc, watch};

#[derive(Parser)]
#[command(
    name = "fleet-sim",
    version,
    about = "Simulated fleetgate stations and phones: one or many, against a running fleetd"
)]
struct Cli {
    #[command(subcommand)]
    command: TopCommand,
}

#[derive(Subcommand)]
enum TopCommand {
    /// One station and its local admin interface.
    #[command(subcommand)]
    Station(StationCommand),
    /// Run many stations in one process, each in BASE/<serial>.
    Stations {
        /// How many stations.
        #[arg(long)]
        count: usize,
        /// Base directory of the station directories.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: Connection,
        /// Firmware of stations made now (existing directories keep theirs).
        #[arg(long, default_value = "6.1.0")]
        firmware: String,
        /// Serials are PREFIX-00001, PREFIX-00002, ….
        #[arg(long, default_value = "SIM")]
        serial_prefix: String,
        /// Seconds between summary lines.
        #[arg(long, default_value_t = 5)]
        summary_every: u64,
    },
    /// One phone: make it, provision it, connect with its certificate, reset it.
    #[command(subcommand)]
    Phone(PhoneCommand),
    /// Provision many phones, each in BASE/<mac>, from a whitelisted address (no PAP).
    Phones {
        /// How many phones.
        #[arg(long)]
        count: usize,
        /// Base directory of the phone directories.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: PhoneConnection,
        /// MACs are PREFIX followed by the phone's number in hex, 12 digits in all.
        #[arg(long, default_value = "02aa00")]
        mac_prefix: String,
        /// Vendor of phones made now.
        #[arg(long, default_value = phone::DEFAULT_VENDOR)]
        vendor: String,
        /// Type of phones made now.
        #[arg(long = "type", default_value = phone::DEFAULT_TYPE)]
        kind: String,
        /// Provisionings under way at once.
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
    },
    /// Onboard N stations and M phones against a running fleetd and measure it.
    #[command(after_help = LOAD_HELP)]
    Load(LoadArgs),
}

const LOAD_HELP: &str = "\
A fleet is many sites, each behind its own address. Against a fleetd on IPv4 loopback, the
simulated devices connect from 127.0.0.2, 127.0.0.3, … (Linux routes all of 127.0.0.0/8 to lo),
at most --devices-per-address (100) to each, in turn: few enough that fleetd's default
per-address [limits] (600 connections a minute, 256 unfinished handshakes, 5000 sessions, 1000
stations waiting for approval) let the whole run through. --station-source and --phone-source
choose the addresses instead (repeat them for several; one for a single address); --no-spread
leaves the choice to the system (on loopback: everything from 127.0.0.1, which needs higher
per-address limits in fleetd). An error example that starts with \"per-address limit:\" is a
refusal by one of those limits. The operator's command budget
(limits.operator_commands_per_second: 20 a second after a burst of 200) bounds the accepts:
lift it in fleetd for a faster run.

fleet-sim raises its soft limit on open files to the hard limit (RUST_LOG=info shows it): each
device holds a socket, so raise the hard limit (ulimit -Hn) for more devices than it allows.

A cluster: --server takes every edge's address (A,B or --server A --server B); device k (the
stations first, then the phones) connects to edge k mod n, the operator to the first. Each edge
applies its per-address limits by itself. --cluster DIR/cluster.json (deploy/local-cluster.sh up
writes it) gives the edges, the data directory and the processes at once: edge-0, edge-1, …,
controller-0, …, nats-0, …, postgres-0 (the postmaster and its children, the backends, whose
memory is summed: an upper bound, shared buffers count once in each). For each named process
(those and any --pid NAME=PID) the report gives its CPU time during the onboarding, per device
onboarded and, for an edge, per device sent to it (\"per connection\"), and its resident memory
with every station connected; a process that has exited or cannot be read is \"not measured\".

Each run keeps its devices under STATE_DIR/<serial prefix>/ and uses new serials and MACs, so
runs against the same fleetd do not meet; the devices stay in fleetd's store afterwards.
The exit status is non-zero when the report counts any error.";

/// The server of `fleet-sim load` without --server or --cluster.
const DEFAULT_SERVER: &str = "127.0.0.1:8883";

#[derive(clap::Args)]
struct LoadArgs {
    /// fleetd's address, HOST:PORT; a cluster's edges: several, comma-separated or the option
    /// repeated, used in turn (the operator uses the first). Default: the --cluster file's
    /// edges, else 127.0.0.1:8883.
    #[arg(long, value_name = "HOST:PORT", value_delimiter = ',', value_parser = server_address)]
    server: Vec<String>,
    /// fleetd's data directory: ca.pem, admin.pem and admin.key. Default: the --cluster file's
    /// data_dir.
    #[arg(long, required_unless_present = "cluster")]
    data_dir: Option<PathBuf>,
    /// A cluster's cluster.json (deploy/local-cluster.sh up DIR writes DIR/cluster.json): its
    /// edges, its data directory and its processes to measure (edge-0, controller-0, nats-0,
    /// postgres-0, …).
    #[arg(long, value_name = "FILE")]
    cluster: Option<PathBuf>,
    /// Stations to onboard.
    #[arg(long, default_value_t = 100)]
    stations: usize,
    /// Phones to create and provision.
    #[arg(long, default_value_t = 0)]
    phones: usize,
    /// Devices connecting at once (a station until its CONNACK, a phone for its provisioning).
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Threads that open the stations' connections, apart from those the connected stations
    /// run on (0: the same threads).
    #[arg(long, default_value_t = 1)]
    dial_threads: usize,
    /// New devices per second; as fast as --concurrency allows when absent.
    #[arg(long)]
    rate: Option<f64>,
    /// Commands per request envelope (accepts, phone creations); keep the envelope under
    /// fleetd's limits.max_payload_bytes (about 250 accepts at 64 KiB).
    #[arg(long, default_value_t = 100)]
    accept_batch: usize,
    /// Accept envelopes sent before the first is answered (1: an operator who waits for each
    /// answer, so accept → authorized has no envelope queued before it).
    #[arg(long, default_value_t = fleet_sim::load::ACCEPTS_IN_FLIGHT)]
    accepts_in_flight: usize,
    /// Accept no station before every station is connected and waiting: accept → authorized
    /// is then measured with the whole fleet connected and no connects competing for the CPU.
    #[arg(long)]
    hold_accepts: bool,
    /// Where the simulated devices keep their state.
    #[arg(long, default_value = "fleet-sim-load")]
    state_dir: PathBuf,
    /// After onboarding, reboot every station at once and measure the reconnect storm.
    #[arg(long)]
    reconnect: bool,
    /// Stations rejected at the end (one envelope) to measure command-to-cut: the first N,
    /// which run on a runtime of their own (as the operator does), so that the figure is
    /// fleetd's and not the simulator's queue.
    #[arg(long, default_value_t = 10)]
    cut_sample: usize,
    /// fleetd's process id: its memory is read from /proc/PID/status.
    #[arg(long)]
    fleetd_pid: Option<u32>,
    /// A process to measure, by name (repeat it for several): its CPU time and memory are
    /// read from /proc/PID. Without --cluster, the NAMEs that start with "edge" are the edges
    /// of the --server addresses, in the order given.
    #[arg(long = "pid", value_name = "NAME=PID")]
    pids: Vec<MeasuredProcess>,
    /// Local source address for stations (repeat it to use several in turn); instead of the
    /// spread.
    #[arg(long)]
    station_source: Vec<IpAddr>,
    /// Local source address for phones (repeat it to use several in turn); instead of the
    /// spread.
    #[arg(long)]
    phone_source: Vec<IpAddr>,
    /// Against a fleetd on IPv4 loopback, devices connect from 127.0.0.2, 127.0.0.3, … with at
    /// most this many to an address.
    #[arg(long, default_value_t = DEVICES_PER_ADDRESS, conflicts_with = "no_spread")]
    devices_per_address: usize,
    /// No spread: devices without --station-source or --phone-source connect from the
    /// system's choice of address.
    #[arg(long)]
    no_spread: bool,
    /// Write the report as JSON to FILE.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args)]
struct PhoneConnection {
    /// fleetd's address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8883")]
    server: String,
    /// The fleet CA certificate (fleetd's DATA_DIR/ca.pem).
    #[arg(long)]
    ca: PathBuf,
    /// Local source address to connect from, e.g. 127.0.0.2 to play a phone behind that IP.
    #[arg(long)]
    source: Option<IpAddr>,
}

/// One `--server` address, checked as fleet-sim's other commands check theirs.
fn server_address(text: &str) -> Result<String, String> {
    match fleet_sim::station::split_server(text) {
        Some(_) => Ok(text.to_owned()),
        None => Err(format!("{text:?} is not HOST:PORT")),
    }
}

impl PhoneConnection {
    fn target(&self) -> anyhow::Result<PhoneTarget> {
        let ca_pem = std::fs::read_to_string(&self.ca)
            .with_context(|| format!("cannot read {}", self.ca.display()))?;
        if fleet_certs::split_server(&self.server).is_none() {
            bail!("--server {:?} is not HOST:PORT", self.server);
        }
        Ok(PhoneTarget {
            server: self.server.clone(),
            ca_pem,
            source: self.source,
        })
    }
}

#[derive(Subcommand)]
enum PhoneCommand {
    /// Make a new phone directory.
    Init {
        /// The phone's state directory, made now.
        #[arg(long)]
        dir: PathBuf,
        /// 12 hex digits; `AA:BB:…` and `aa-bb-…` are accepted.
        #[arg(long)]
        mac: String,
        /// The phone's vendor, as the operator created it.
        #[arg(long, default_value = phone::DEFAULT_VENDOR)]
        vendor: String,
        /// The phone's type (model), as the operator created it.
        #[arg(long = "type", default_value = phone::DEFAULT_TYPE)]
        kind: String,
        /// The PAP the user types.
        #[arg(long)]
        pap: Option<String>,
    },
    /// One provisioning attempt; exits non-zero unless the phone got its certificate.
    Provision {
        /// The phone's state directory (made by `phone init`).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: PhoneConnection,
        /// Type this PAP first (kept in phone.json).
        #[arg(long)]
        pap: Option<String>,
    },
    /// Connect with the certificate and stay until Ctrl-C or the server closes the connection.
    Connect {
        /// The phone's state directory (made by `phone init`).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: PhoneConnection,
    },
    /// Forget key, certificate, configuration and PAP; keep MAC, vendor and type.
    FactoryReset {
        /// The phone's state directory (made by `phone init`).
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct Connection {
    /// fleetd's address, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8883")]
    server: String,
    /// The fleet CA certificate (fleetd's DATA_DIR/ca.pem).
    #[arg(long)]
    ca: PathBuf,
    /// Milliseconds to wait before connecting again after a refusal or a lost connection.
    #[arg(long, default_value_t = 1000)]
    retry_ms: u64,
    /// Local source address to connect from, e.g. 127.0.0.2 to play a station behind that IP.
    #[arg(long)]
    source: Option<IpAddr>,
}

impl Connection {
    fn config(&self) -> anyhow::Result<SimConfig> {
        let ca_pem = std::fs::read_to_string(&self.ca)
            .with_context(|| format!("cannot read {}", self.ca.display()))?;
        if fleet_sim::station::split_server(&self.server).is_none() {
            bail!("--server {:?} is not HOST:PORT", self.server);
        }
        Ok(SimConfig {
            server: self.server.clone(),
            ca_pem,
            retry: Duration::from_millis(self.retry_ms),
            connect_timeout: Duration::from_secs(30),
            source: self.source,
            dialer: None,
        })
    }
}

#[derive(Subcommand)]
enum StationCommand {
    /// Make a new station directory.
    Init {
        /// The station's state directory, made now.
        #[arg(long)]
        dir: PathBuf,
        /// The station's serial number, e.g. ST-0001.
        #[arg(long)]
        serial: String,
        /// The firmware it reports: 6.1.0 and above has its own key pair, 6.0.2 to 6.0.7 is
        /// legacy (no key, must be updated), below 6.0.2 is unsupported.
        #[arg(long, default_value = "6.1.0")]
        firmware: String,
        /// The model it reports.
        #[arg(long, default_value = DEFAULT_MODEL)]
        model: String,
        /// MAC of the streaming interface (derived from the serial if absent).
        #[arg(long)]
        mac_streaming: Option<String>,
        /// MAC of the control interface (derived from the serial if absent).
        #[arg(long)]
        mac_control: Option<String>,
    },
    /// Boot the station and keep it running until Ctrl-C; prints one line per event.
    Run {
        /// The station's state directory (made by `station init`).
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the fingerprint, as the local admin page does.
    Fingerprint {
        /// The station's state directory (made by `station init`).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Local admin "Reset Device"; a running station reboots.
    Reset {
        /// The station's state directory (made by `station init`).
        #[arg(long)]
        dir: PathBuf,
        /// Restore the default configuration.
        #[arg(long)]
        delete_configuration: bool,
        /// Delete the key pair and the authorized flag: a new key pair is made at the next
        /// boot, with a new fingerprint that an operator must accept again.
        #[arg(long)]
        delete_authentication: bool,
    },
    /// Ask the running station to reboot.
    Reboot {
        /// The station's state directory (made by `station init`).
        #[arg(long)]
        dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let open_files = open_files();
    match Cli::parse().command {
        TopCommand::Station(command) => station(command).await,
        TopCommand::Stations {
            count,
            dir,
            connection,
            firmware,
            serial_prefix,
            summary_every,
        } => {
            stations(
                count,
                &dir,
                &connection,
                &firmware,
                &serial_prefix,
                summary_every,
            )
            .await
        }
        TopCommand::Phone(command) => phone_command(command).await,
        TopCommand::Phones {
            count,
            dir,
            connection,
            mac_prefix,
            vendor,
            kind,
            concurrency,
        } => {
            let target = connection.target()?;
            phones(
                count,
                &dir,
                &target,
                &mac_prefix,
                &vendor,
                &kind,
                concurrency,
            )
            .await
        }
        TopCommand::Load(args) => load(args, open_files).await,
    }
}

/// Raises the soft limit on open files to the hard one and says how many devices it allows; a
/// failure is only a warning.
fn open_files() -> Option<OpenFiles> {
    match raise_open_files() {
        Ok(files) => {
            match files.devices() {
                Some(devices) => tracing::info!(
                    before = ?files.before,
                    now = ?files.now,
                    "the limit on open files allows about {devices} simulated devices at once"
                ),
                None => tracing::info!("no limit on open files"),
            }
            Some(files)
        }
        Err(e) => {
            tracing::warn!("cannot raise the limit on open files: {e}");
            None
        }
    }
}

/// Where a load run connects, with which operator's files, and what it measures besides
/// fleetd.
#[derive(Debug, PartialEq)]
struct Targets {
    servers: Vec<String>,
    data_dir: PathBuf,
    processes: Vec<MeasuredProcess>,
}

/// The targets from --server, --data-dir, --pid and the --cluster file: what is given on the
/// command line wins over the file.
fn targets(
    servers: Vec<String>,
    data_dir: Option<PathBuf>,
    cluster: Option<&ClusterFile>,
    pids: Vec<MeasuredProcess>,
) -> anyhow::Result<Targets> {
    let servers = match (servers.is_empty(), cluster) {
        (false, _) => servers,
        (true, Some(cluster)) => cluster.edges.clone(),
        (true, None) => vec![DEFAULT_SERVER.to_owned()],
    };
    let Some(data_dir) = data_dir.or_else(|| cluster.map(|c| c.data_dir.clone())) else {
        bail!("--data-dir is needed without --cluster");
    };
    let mut processes = cluster.map_or_else(Vec::new, |c| c.processes(&servers));
    let mut edges = 0..servers.len();
    for mut process in pids {
        if cluster.is_none() && process.name.starts_with("edge") {
            process.edge = edges.next();
        }
        processes.push(process);
    }
    for (i, process) in processes.iter().enumerate() {
        if processes[..i].iter().any(|p| p.name == process.name) {
            bail!("two processes are named {:?}", process.name);
        }
    }
    Ok(Targets {
        servers,
        data_dir,
        processes,
    })
}

/// The library's options from the command line's.
fn load_options(args: LoadArgs) -> anyhow::Result<LoadOptions> {
    use std::io::IsTerminal as _;
    let cluster = match &args.cluster {
        Some(path) => Some(ClusterFile::read(path).context("--cluster")?),
        None => None,
    };
    let Targets {
        servers,
        data_dir,
        processes,
    } = targets(args.server, args.data_dir, cluster.as_ref(), args.pids)?;
    let mut opts = LoadOptions::new(DEFAULT_SERVER, data_dir);
    opts.servers = servers;
    opts.processes = processes;
    opts.stations = args.stations;
    opts.phones = args.phones;
    opts.concurrency = args.concurrency;
    opts.dial_threads = args.dial_threads;
    opts.rate = args.rate;
    opts.accept_batch = args.accept_batch;
    opts.accepts_in_flight = args.accepts_in_flight;
    opts.hold_accepts = args.hold_accepts;
    opts.state_dir = args.state_dir;
    opts.reconnect = args.reconnect;
    opts.cut_sample = args.cut_sample;
    opts.fleetd_pid = args.fleetd_pid;
    opts.station_sources = args.station_source;
    opts.phone_sources = args.phone_source;
    opts.spread = if args.no_spread {
        Spread::Off
    } else {
        Spread::Loopback {
            devices_per_address: args.devices_per_address,
        }
    };
    opts.progress = std::io::stderr().is_terminal();
    Ok(opts)
}

async fn load(args: LoadArgs, open_files: Option<OpenFiles>) -> anyhow::Result<()> {
    let json = args.json.clone();
    let opts = load_options(args)?;
    let devices = (opts.stations + opts.phones) as u64;
    if let Some(allowed) = open_files.and_then(|f| f.devices()) {
        if allowed < devices {
            tracing::warn!(
                "the limit on open files allows about {allowed} devices at once, fewer than the \
                 {devices} of this run: raise the hard limit (ulimit -Hn)"
            );
        }
    }
    let report = run_load(opts).await?;
    if let Some(path) = &json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    print_report(&report);
    if report.errors.is_empty() {
        Ok(())
    } else {
        bail!("the load run counted errors")
    }
}

/// The report's summary, for people.
#[allow(clippy::print_stdout)]
fn print_report(report: &fleet_sim::LoadReport) {
    let ms = |l: &Latency| match (l.p50, l.p99, l.max) {
        (Some(p50), Some(p99), Some(max)) => {
            format!("p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms")
        }
        _ => "not measured".to_owned(),
    };
    println!(
        "onboarded {} of {} stations and {} of {} phones in {:.2} s: {:.1} devices/s",
        report.stations_authorized,
        report.stations,
        report.phones_provisioned,
        report.phones,
        report.seconds,
        report.onboarded_per_s
    );
    println!("connect:              {}", ms(&report.connect_ms));
    println!(
        "accept to authorized: {}",
        ms(&report.accept_to_authorized_ms)
    );
    if report.phones > 0 {
        println!("phone provisioning:   {}", ms(&report.provision_ms));
    }
    if let Some(storm) = &report.reconnect {
        println!(
            "reconnect storm:      {} of {} in {:.2} s ({:.1}/s), {}",
            storm.connected,
            storm.stations,
            storm.seconds,
            storm.connects_per_s,
            ms(&storm.connect_ms)
        );
    }
    println!("reject to cut:        {}", ms(&report.reject_to_cut_ms));
    if report.accepts_deferred > 0 {
        println!(
            "accepts deferred:     {} (rate_limited: the operator's command budget, [limits] operator_commands_per_second, set the pace)",
            report.accepts_deferred
        );
    }
    match report.state_dir_in_memory {
        Some(true) => println!("station state:        in memory (tmpfs)"),
        Some(false) => println!(
            "station state:        on disk: the stations' own file writes may show in accept to authorized (a --state-dir on tmpfs keeps them out)"
        ),
        None => {}
    }
    match report.source_addresses {
        0 => println!("source addresses:     the system's choice"),
        n => println!("source addresses:     {n}"),
    }
    match (report.fleetd_rss_kib, report.fleetd_rss_kib_per_device) {
        (Some(kib), Some(per)) => {
            println!("fleetd RSS:           {kib} KiB, {per:.1} KiB per device")
        }
        _ => println!("fleetd RSS:           not measured (no --fleetd-pid)"),
    }
    if let Some(ms) = report.fleetd_cpu_ms_per_device {
        println!("fleetd CPU:           {ms:.2} ms per device onboarded");
    }
    if report.servers.len() > 1 {
        println!("servers:              {}", servers_line(report));
    }
    if !report.processes.is_empty() {
        println!("processes (CPU during the onboarding, RSS with every station connected):");
        for line in process_table(&report.processes, report.processes_cpu_ms_per_device) {
            println!("  {line}");
        }
    }
    if report.errors.is_empty() {
        println!("errors:               none");
    } else {
        let errors: Vec<String> = report
            .errors
            .iter()
            .map(|(kind, n)| format!("{kind} {n}"))
            .collect();
        println!("errors:               {}", errors.join(", "));
        for (kind, example) in &report.error_examples {
            println!("  {kind}: {example}");
        }
    }
}

/// Each server with the devices sent to it.
fn servers_line(report: &fleet_sim::LoadReport) -> String {
    let Some(plan) = ServerPlan::new(&report.servers, report.stations) else {
        return "none".to_owned();
    };
    let shares: Vec<String> = report
        .servers
        .iter()
        .enumerate()
        .map(|(i, server)| format!("{server} ({})", plan.devices_of(i, report.phones)))
        .collect();
    format!("{} (devices to each, in turn)", shares.join(", "))
}

/// The named processes' figures as a small table: a heading, a line each, the total.
fn process_table(processes: &[ProcessFigures], total: Option<f64>) -> Vec<String> {
    const NOT_MEASURED: &str = "not measured";
    let cell = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
    let width = processes
        .iter()
        .map(|p| p.name.len())
        .chain([12])
        .max()
        .unwrap_or(12);
    let mut lines = vec![format!(
        "{:<width$} {:>8} {:>12} {:>10} {:>14} {:>12}",
        "name", "pid", "CPU ms", "ms/device", "ms/connection", "RSS KiB"
    )];
    for p in processes {
        let cpu = match p.cpu_ms {
            Some(ms) => format!(
                "{ms:>12.1} {:>10} {:>14}",
                cell(p.cpu_ms_per_device),
                cell(p.cpu_ms_per_connection)
            ),
            None => format!("{NOT_MEASURED:>12} {:>10} {:>14}", "-", "-"),
        };
        let rss = p
            .rss_kib
            .map_or_else(|| NOT_MEASURED.to_owned(), |kib| kib.to_string());
        let mut line = format!("{:<width$} {:>8} {cpu} {rss:>12}", p.name, p.pid);
        if p.with_children {
            line.push_str("  with its children");
        }
        if let (Some(server), Some(devices)) = (&p.server, p.devices) {
            line.push_str(&format!("  edge of {server}, {devices} devices"));
        }
        lines.push(line);
    }
    let total = total.map_or_else(|| NOT_MEASURED.to_owned(), |ms| format!("{ms:.2}"));
    lines.push(format!(
        "{:<width$} {:>8} {:>12} {total:>10}",
        "all measured", "", ""
    ));
    lines
}

#[allow(clippy::print_stdout)]
async fn phone_command(command: PhoneCommand) -> anyhow::Result<()> {
    match command {
        PhoneCommand::Init {
            dir,
            mac,
            vendor,
            kind,
            pap,
        } => {
            let profile = PhoneProfile {
                mac,
                vendor,
                kind,
                pap,
            };
            let state = PhoneState::init(&dir, &profile)?;
            let record = &state.record;
            println!(
                "phone {} ({} {}) in {}",
                record.mac,
                record.vendor,
                record.kind,
                dir.display()
            );
        }
        PhoneCommand::Provision {
            dir,
            connection,
            pap,
        } => {
            let target = connection.target()?;
            if pap.is_some() {
                phone::set_pap(&dir, pap)?;
            }
            match phone::provision(&dir, &target).await? {
                ProvisionOutcome::Provisioned => println!("provisioned"),
                outcome => bail!("{outcome}"),
            }
        }
        PhoneCommand::Connect { dir, connection } => {
            let target = connection.target()?;
            let mut session = phone::connect_provisioned(&dir, &target).await?;
            println!("connected with certificate as {}", session.mac());
            tokio::select! {
                end = session.closed() => println!("{end}"),
                signal = tokio::signal::ctrl_c() => {
                    signal?;
                    session.disconnect().await;
                    println!("disconnected");
                }
            }
        }
        PhoneCommand::FactoryReset { dir } => {
            phone::factory_reset(&dir)?;
            println!("factory reset: the phone keeps only its MAC, vendor and type");
        }
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn phones(
    count: usize,
    base: &Path,
    target: &PhoneTarget,
    prefix: &str,
    vendor: &str,
    kind: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    phone::phone_mac(prefix, count.max(1))?;
    let started = std::time::Instant::now();
    let results =
        phone::provision_many(base, count, prefix, vendor, kind, target, concurrency).await;
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for (mac, result) in &results {
        let line = match result {
            Ok(ProvisionOutcome::Provisioned) => "provisioned".to_owned(),
            Ok(outcome) => {
                println!("{mac}: {outcome}");
                outcome.to_string()
            }
            Err(e) => {
                println!("{mac}: error: {e}");
                "error".to_owned()
            }
        };
        *tally.entry(line).or_default() += 1;
    }
    let summary: Vec<String> = tally.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    println!(
        "{count} phones in {:.1} s; {}",
        started.elapsed().as_secs_f64(),
        summary.join(", ")
    );
    let provisioned = tally.get("provisioned").copied().unwrap_or(0);
    if provisioned != count {
        bail!("{} of {count} phones not provisioned", count - provisioned);
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn station(command: StationCommand) -> anyhow::Result<()> {
    match command {
        StationCommand::Init {
            dir,
            serial,
            firmware,
            model,
            mac_streaming,
            mac_control,
        } => {
            let profile = StationProfile {
                serial,
                firmware,
                model,
                mac_streaming,
                mac_control,
            };
            let state = StationState::init(&dir, &profile)?;
            let record = &state.record;
            println!(
                "station {} ({} firmware {}) in {}; MACs {} / {}",
                record.serial,
                record.model,
                record.firmware,
                dir.display(),
                record.mac_streaming,
                record.mac_control
            );
        }
        StationCommand::Run { dir, connection } => {
            let config = connection.config()?;
            StationState::open(&dir)?;
            let mut station = spawn_station(&dir, config);
            let _admin = serve_admin(&dir, station.control()).await?;
            loop {
                tokio::select! {
                    event = station.next_event() => match event {
                        Some(event) => println!("{event}"),
                        None => break,
                    },
                    signal = tokio::signal::ctrl_c() => {
                        signal?;
                        station.shutdown().await;
                        break;
                    }
                }
            }
        }
        StationCommand::Fingerprint { dir } => {
            let shown = match admin_request(&dir, &AdminRequest::Fingerprint).await? {
                Some(reply) if reply.ok => reply.fingerprint,
                Some(reply) => bail!("{}", reply.error.unwrap_or_default()),
                None => fingerprint(&dir)?.map(|f| f.to_string()),
            };
            match shown {
                Some(fingerprint) => println!("{fingerprint}"),
                None => println!("no key pair: firmware below 6.1.0"),
            }
        }
        StationCommand::Reset {
            dir,
            delete_configuration,
            delete_authentication,
        } => {
            let request = AdminRequest::Reset {
                delete_configuration,
                delete_authentication,
            };
            match admin_request(&dir, &request).await? {
                Some(reply) if reply.ok => println!("reset applied; the station reboots"),
                Some(reply) => bail!("{}", reply.error.unwrap_or_default()),
                None => {
                    local_reset(&dir, delete_configuration, delete_authentication)?;
                    println!("reset applied; takes effect when the station boots");
                }
            }
        }
        StationCommand::Reboot { dir } => match admin_request(&dir, &AdminRequest::Reboot).await? {
            Some(reply) if reply.ok => println!("rebooting"),
            Some(reply) => bail!("{}", reply.error.unwrap_or_default()),
            None => bail!("no station is running for {}", dir.display()),
        },
    }
    Ok(())
}

#[allow(clippy::print_stdout)]
async fn stations(
    count: usize,
    base: &Path,
    connection: &Connection,
    firmware: &str,
    prefix: &str,
    summary_every: u64,
) -> anyhow::Result<()> {
    let config = connection.config()?;
    let stations = spawn_fleet(base, count, prefix, firmware, &config)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(stations.len());
    let mut admins = Vec::new();
    for (serial, mut station) in stations {
        match serve_admin(&base.join(&serial), station.control()).await {
            Ok(admin) => admins.push(admin),
            Err(e) => tracing::warn!("{serial}: no local admin socket: {e}"),
        }
        let tx = tx.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    event = station.next_event() => match event {
                        Some(event) => {
                            let _ = tx.send((serial.clone(), event));
                        }
                        None => return,
                    },
                    _ = stop.changed() => break,
                }
            }
            station.shutdown().await;
        }));
    }
    drop(tx);
    let mut tally = Tally::default();
    let mut summary = tokio::time::interval(Duration::from_secs(summary_every.max(1)));
    loop {
        tokio::select! {
            event = rx.recv() => match event {
                Some((serial, event)) => tally.observe(&serial, &event),
                None => break,
            },
            _ = summary.tick() => println!("{tally}"),
            signal = tokio::signal::ctrl_c() => {
                signal?;
                break;
            }
        }
    }
    let _ = stop_tx.send(true);
    for task in tasks {
        let _ = task.await;
    }
    drop(admins);
    println!("{tally}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_says_it_plays_phones_too_and_every_option_has_a_text() {
        let mut cli = <Cli as clap::CommandFactory>::command();
        let help = cli.render_help().to_string();
        assert!(help.contains("phones"), "{help}");
        let missing = fleet_ctl::undocumented(&cli);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    fn load_args(args: &[&str]) -> Result<LoadArgs, clap::Error> {
        let cli = Cli::try_parse_from(["fleet-sim", "load"].iter().chain(args))?;
        match cli.command {
            TopCommand::Load(args) => Ok(args),
            _ => unreachable!("parsed as load"),
        }
    }

    #[test]
    fn servers_are_a_list_or_repeated_and_each_is_checked() {
        let args = load_args(&["--data-dir", "d"]).unwrap();
        assert!(args.server.is_empty());
        let args = load_args(&[
            "--data-dir",
            "d",
            "--server",
            "127.0.0.1:1,127.0.0.1:2",
            "--server",
            "[::1]:3",
        ])
        .unwrap();
        assert_eq!(args.server, ["127.0.0.1:1", "127.0.0.1:2", "[::1]:3"]);
        for bad in ["127.0.0.1:1,nowhere", "127.0.0.1:1,,127.0.0.1:2", "h:port"] {
            let error = load_args(&["--data-dir", "d", "--server", bad])
                .err()
                .expect("refused")
                .to_string();
            let named = bad.split(',').find(|s| server_address(s).is_err());
            assert!(
                named.is_some_and(|n| error.contains(&format!("{n:?}"))),
                "{error}"
            );
        }
        // --data-dir is needed unless a cluster file gives it.
        assert!(load_args(&[]).is_err());
        assert!(load_args(&["--cluster", "c.json"]).is_ok());
    }

    #[test]
    fn processes_are_named_with_pid_and_edges_match_the_servers_in_order() {
        let args = load_args(&[
            "--data-dir",
            "d",
            "--server",
            "127.0.0.1:1,127.0.0.1:2",
            "--pid",
            "edge-a=10",
            "--pid",
            "controller=20",
            "--pid",
            "edge-b=11",
            "--pid",
            "edge-c=12",
            "--fleetd-pid",
            "9",
        ])
        .unwrap();
        assert_eq!(args.fleetd_pid, Some(9));
        let given = targets(args.server, args.data_dir, None, args.pids).unwrap();
        let named: Vec<(&str, u32, Option<usize>)> = given
            .processes
            .iter()
            .map(|p| (p.name.as_str(), p.pid, p.edge))
            .collect();
        assert_eq!(
            named,
            [
                ("edge-a", 10, Some(0)),
                ("controller", 20, None),
                ("edge-b", 11, Some(1)),
                // More edges than servers: the last is measured, but is the edge of none.
                ("edge-c", 12, None),
            ]
        );
        let error = load_args(&["--data-dir", "d", "--pid", "edge"])
            .err()
            .expect("refused")
            .to_string();
        assert!(error.contains("NAME=PID"), "{error}");
        let twice = ["a=1".parse().unwrap(), "a=2".parse().unwrap()];
        let error = targets(Vec::new(), Some("d".into()), None, twice.into()).unwrap_err();
        assert!(error.to_string().contains("\"a\""), "{error}");
    }

    #[test]
    fn a_cluster_file_gives_the_servers_data_dir_and_processes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        let json = serde_json::json!({
            "edges": ["127.0.0.1:40001", "127.0.0.1:40002"],
            "data_dir": "/c/operator",
            "pids": {"nats": [1, 2, 3], "postgres": [4], "edges": [5, 6], "controllers": [7, 8]},
        });
        std::fs::write(&path, json.to_string()).unwrap();
        let cluster = ClusterFile::read(&path).unwrap();
        let extra = vec!["edge-x=9".parse().unwrap()];
        let t = targets(Vec::new(), None, Some(&cluster), extra).unwrap();
        assert_eq!(t.servers, ["127.0.0.1:40001", "127.0.0.1:40002"]);
        assert_eq!(t.data_dir, PathBuf::from("/c/operator"));
        let names: Vec<&str> = t.processes.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "edge-0",
                "edge-1",
                "controller-0",
                "controller-1",
                "nats-0",
                "nats-1",
                "nats-2",
                "postgres-0",
                "edge-x"
            ]
        );
        assert_eq!(t.processes[1].edge, Some(1));
        // With a cluster file the edges are its own; a --pid is measured, the edge of none.
        assert_eq!(t.processes[8].edge, None);
        // What the command line gives wins.
        let t = targets(
            vec!["127.0.0.1:40002".into()],
            Some("mine".into()),
            Some(&cluster),
            Vec::new(),
        )
        .unwrap();
        assert_eq!(t.servers, ["127.0.0.1:40002"]);
        assert_eq!(t.data_dir, PathBuf::from("mine"));
        assert_eq!((t.processes[0].edge, t.processes[1].edge), (None, Some(0)));
        // A cluster file naming the same process twice makes no run.
        let error = targets(
            Vec::new(),
            None,
            Some(&cluster),
            vec!["nats-1=3".parse().unwrap()],
        )
        .unwrap_err();
        assert!(error.to_string().contains("nats-1"), "{error}");
    }

    #[test]
    fn the_process_table_says_what_was_not_measured() {
        let measured = ProcessFigures {
            name: "edge-0".into(),
            pid: 31,
            with_children: false,
            server: Some("127.0.0.1:40001".into()),
            devices: Some(50),
            cpu_ms: Some(800.0),
            cpu_ms_per_device: Some(8.0),
            cpu_ms_per_connection: Some(16.0),
            rss_kib: Some(40_000),
        };
        let gone = ProcessFigures {
            name: "postgres-0".into(),
            pid: 20,
            with_children: true,
            server: None,
            devices: None,
            cpu_ms: None,
            cpu_ms_per_device: None,
            cpu_ms_per_connection: None,
            rss_kib: None,
        };
        let lines = process_table(&[measured, gone], Some(8.0));
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[0].contains("ms/connection"), "{}", lines[0]);
        assert!(
            lines[1].contains("16.00") && lines[1].contains("50 devices"),
            "{}",
            lines[1]
        );
        assert_eq!(lines[2].matches("not measured").count(), 2, "{}", lines[2]);
        assert!(lines[3].starts_with("all measured") && lines[3].contains("8.00"));
    }
}
