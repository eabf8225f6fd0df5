//! `fleet-sim load`: drives many simulated stations and phones through the whole onboarding
//! path against a running fleetd (mTLS connect, authorization request, the operator's accepts in
//! batched request envelopes, `authorized` received; phones provisioned with their PAP) and
//! measures it: connect and accept latencies, onboarding rate, a reconnect storm, the time from
//! a reject command to the cut, errors by kind and fleetd's memory. Against a server on
//! loopback the devices come from many addresses ([`crate::spread`]), as a real fleet does.
//!
//! A cluster has several edges, each a fleetd listening on its own address; any of them serves
//! any device and operator. The run then sends its devices to the edges in turn (device k, the
//! stations first and then the phones, to server k mod n: [`ServerPlan`]), and the operator
//! connects to the first. Besides fleetd's CPU time and memory (`--fleetd-pid`), it measures
//! any named processes ([`crate::processes`]: the edges, the controllers, NATS, PostgreSQL, as
//! `--pid NAME=PID` or a `cluster.json` ([`crate::cluster_file`]) names them) over the same
//! window: CPU time during the onboarding, per device onboarded and, for an edge, per device
//! sent to it; resident memory with every station connected.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fleet_ctl::{ClientError, OperatorClient};
use fleet_protocol::{EventKind, Topic};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::link::LinkError;
use crate::phone::{self, PhoneError, PhoneProfile, PhoneState, PhoneTarget, ProvisionOutcome};
use crate::processes::{self, CpuSample, MeasuredProcess, ProcessFigures};
pub use crate::processes::{parse_cpu_ticks, parse_vm_rss};
use crate::spread::{self, Rotation, SourcePlan, Spread};
use crate::state::{StateError, StationProfile, StationState};
use crate::station::{spawn_station, SimConfig, SimEvent, StationControl, StationHandle};

/// Firmware of the simulated stations: the first with a key pair, so that they connect with
/// mutual TLS.
const STATION_FIRMWARE: &str = "6.1.0";
/// Pause of a simulated station before it connects again after a refusal or a lost connection.
const STATION_RETRY: Duration = Duration::from_millis(200);
/// A phase that makes no progress for this long is given up; what is missing counts as
/// `*_timeout` errors.
const STALL_LIMIT: Duration = Duration::from_secs(60);
/// How long the operator waits for the answers of one request envelope.
const OPERATOR_TIMEOUT: Duration = Duration::from_secs(120);
/// A partly filled batch of accepts waits at most this long for more stations.
const ACCEPT_LINGER: Duration = Duration::from_millis(20);
/// Accept envelopes in flight at once, unless told otherwise ([`LoadOptions::accepts_in_flight`]):
/// one, as an operator (fleetctl, the console) waits for each answer. With 4, 10,000 held
/// stations onboarded no faster (756 against 820 devices/s) and accept → `authorized` measured
/// mostly the envelopes queued before (p50 129 against 22 ms, 2026-12-02).
pub const ACCEPTS_IN_FLIGHT: usize = 1;
/// Without any progress for this long, the operator also lists the unauthorized stations, in
/// case it missed their events.
const LIST_AFTER: Duration = Duration::from_secs(3);
/// How long the simulated devices may take to disconnect at the end.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(10);
/// Site of the phones the load run creates.
const PHONE_SITE: &str = "load";

/// What a load run does.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// fleetd's addresses, `HOST:PORT`: one, or a cluster's edges. Devices go to them in turn
    /// ([`ServerPlan`]); the operator connects to the first.
    pub servers: Vec<String>,
    /// fleetd's data directory: `ca.pem`, and the operator's `admin.pem` and `admin.key`.
    pub data_dir: PathBuf,
    /// Stations to onboard.
    pub stations: usize,
    /// Phones to create and provision.
    pub phones: usize,
    /// Devices connecting at once: a station holds its slot from its start to its first
    /// CONNACK, a phone for its whole provisioning.
    pub concurrency: usize,
    /// New devices per second (stations and phones together); as fast as `concurrency`
    /// allows when `None`.
    pub rate: Option<f64>,
    /// Where the simulated devices keep their state; each run uses a new subdirectory.
    pub state_dir: PathBuf,
    /// Commands per request envelope (accepts, phone creations). fleetd refuses envelopes over
    /// `limits.max_payload_bytes` (64 KiB by default): about 250 accepts.
    pub accept_batch: usize,
    /// Accept envelopes sent before the answer of the first (1: an operator who waits for each
    /// answer; more: a pipeline, whose later envelopes wait behind the earlier ones).
    pub accepts_in_flight: usize,
    /// Accept nothing before every station is connected and has asked to be authorized: the
    /// accept → `authorized` latency is then that of a fully connected, otherwise idle fleet.
    pub hold_accepts: bool,
    /// After onboarding, reboot every station at once and measure the reconnect storm.
    pub reconnect: bool,
    /// Stations rejected (in one envelope) at the end to measure command-to-cut. The first
    /// `cut_sample` stations are these probes: they run, like the operator, on a runtime of
    /// their own, so that what is measured is fleetd's time and not the simulator's queue of
    /// 10,000 stations' tasks (see `Observers`). The cut takes the first authorized,
    /// connected stations: a probe that is neither is replaced by the next station, which
    /// runs on the stations' runtime.
    pub cut_sample: usize,
    /// fleetd's process id, to read its memory from `/proc/<pid>/status`.
    pub fleetd_pid: Option<u32>,
    /// Processes measured by name ([`LoadReport::processes`]), e.g. a cluster's edges,
    /// controllers, NATS servers and PostgreSQL.
    pub processes: Vec<MeasuredProcess>,
    /// Show a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Local source addresses the stations connect from, in turn (e.g. 127.0.0.2,
    /// 127.0.0.3). Empty: as `spread` says.
    pub station_sources: Vec<IpAddr>,
    /// Local source addresses the phones connect from, in turn. Empty: as `spread` says.
    pub phone_sources: Vec<IpAddr>,
    /// Where the devices without addresses of their own connect from: by default, against a
    /// server on IPv4 loopback, from 127.0.0.2, 127.0.0.3, … with at most
    /// [`spread::DEVICES_PER_ADDRESS`] to each, so that fleetd's default per-address
    /// `[limits]` let the whole run through.
    pub spread: Spread,
    /// Threads of a runtime of the run's own that opens the stations' connections (TCP, TLS,
    /// CONNECT), which then move to the runtime the stations run on; 0 opens them there. On
    /// a machine whose cores the run saturates, the handshakes in flight would otherwise
    /// queue before the connected stations' reads, and the latencies measured (accept →
    /// `authorized`, reject → cut) would be the simulator's.
    pub dial_threads: usize,
}

impl LoadOptions {
    /// One server, 100 stations, no phones, 100 at once, batches of 100, 10 cut at the end,
    /// spread over loopback addresses when the server is on loopback.
    pub fn new(server: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        LoadOptions {
            servers: vec![server.into()],
            data_dir: data_dir.into(),
            stations: 100,
            phones: 0,
            concurrency: 100,
            rate: None,
            state_dir: PathBuf::from("fleet-sim-load"),
            accept_batch: 100,
            accepts_in_flight: ACCEPTS_IN_FLIGHT,
            hold_accepts: false,
            reconnect: false,
            cut_sample: 10,
            fleetd_pid: None,
            processes: Vec::new(),
            progress: false,
            station_sources: Vec::new(),
            phone_sources: Vec::new(),
            spread: Spread::default(),
            dial_threads: 1,
        }
    }
}

/// Percentiles of one latency, in milliseconds; `null` when nothing was measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    /// How many were measured.
    pub count: u64,
    /// Median.
    pub p50: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest.
    pub max: Option<f64>,
}

/// The reconnect storm: every authorized station rebooted at once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StormReport {
    /// Stations rebooted.
    pub stations: usize,
    /// Stations connected again.
    pub connected: usize,
    /// From the reboots to the last station connected again.
    pub seconds: f64,
    /// `connected / seconds`.
    pub connects_per_s: f64,
    /// From a station's reboot (its old connection closed) to its CONNACK.
    pub connect_ms: Latency,
}

/// What a load run measured.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Stations started.
    pub stations: usize,
    /// Phones created.
    pub phones: usize,
    /// Stations that received `authorized`.
    pub stations_authorized: usize,
    /// Phones that completed provisioning.
    pub phones_provisioned: usize,
    /// Serials of this run are `<serial_prefix>-00001`, …; MACs start with `mac_prefix`.
    pub serial_prefix: String,
    /// See `serial_prefix`.
    pub mac_prefix: String,
    /// The whole onboarding: from the start to the last device onboarded.
    pub seconds: f64,
    /// `(stations_authorized + phones_provisioned) / seconds`.
    pub onboarded_per_s: f64,
    /// From a station's start to its first CONNACK.
    pub connect_ms: Latency,
    /// From sending the accept envelope to the station receiving `authorized`.
    pub accept_to_authorized_ms: Latency,
    /// One phone's provisioning: connect with PAP, CSR, certificate, `provision/complete`.
    pub provision_ms: Latency,
    /// From sending the reject envelope to the station's `rejected` or its connection loss.
    pub reject_to_cut_ms: Latency,
    /// The reconnect storm, when asked for.
    pub reconnect: Option<StormReport>,
    /// Accepts that fleetd answered `rate_limited` (the operator's command budget,
    /// `[limits] operator_commands_per_second`) and that were sent again once it allowed: not
    /// errors, but a sign that the budget, not fleetd's speed, set the onboarding's pace.
    pub accepts_deferred: u64,
    /// Distinct local source addresses the run chose for its devices; 0 when the system chose
    /// (on loopback, every device then comes from 127.0.0.1).
    pub source_addresses: usize,
    /// Errors by kind; empty for a complete run.
    pub errors: BTreeMap<String, u64>,
    /// The first reason seen for each kind of error (a refusal code, a connection error);
    /// one that fleetd's per-address limits gave starts with "per-address limit:".
    pub error_examples: BTreeMap<String, String>,
    /// fleetd's CPU time during the onboarding divided by the devices onboarded, when its pid
    /// was given: what one onboarding costs the server, whoever else shares the machine.
    pub fleetd_cpu_ms_per_device: Option<f64>,
    /// fleetd's resident memory with every station connected, when its pid was given.
    pub fleetd_rss_kib: Option<u64>,
    /// `fleetd_rss_kib / (stations + phones)`.
    pub fleetd_rss_kib_per_device: Option<f64>,
    /// The servers the devices were sent to, in turn ([`ServerPlan`]); the operator used the
    /// first.
    #[serde(default)]
    pub servers: Vec<String>,
    /// The named processes' CPU time and memory, in the order they were given; empty when
    /// none was named.
    #[serde(default)]
    pub processes: Vec<ProcessFigures>,
    /// The CPU time of every named process that was measured, together, divided by the
    /// devices onboarded: what one onboarding costs the whole cluster.
    #[serde(default)]
    pub processes_cpu_ms_per_device: Option<f64>,
    /// Whether the stations' state directories (`--state-dir`) were on a filesystem held in
    /// memory (tmpfs); `None` when it could not be told. On a disk filesystem every
    /// `authorized` costs the simulator a new file (inode) in that station's directory, and on
    /// this project's 2-core machine that cost, not fleetd, set accept → `authorized`
    /// ([`state_dir_in_memory`]).
    #[serde(default)]
    pub state_dir_in_memory: Option<bool>,
}

/// Which server each device connects to: device k, counting the stations first and then the
/// phones, to server k mod n; so with one server, every device to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerPlan {
    servers: Arc<[String]>,
    stations: usize,
}

impl ServerPlan {
    /// The plan for `stations` stations (and any number of phones after them) over `servers`.
    /// `None` without a server.
    pub fn new(servers: &[String], stations: usize) -> Option<ServerPlan> {
        (!servers.is_empty()).then(|| ServerPlan {
            servers: servers.into(),
            stations,
        })
    }

    // `servers` is never empty (`new`): the indices below are in range.

    /// The server of station `index` (0-based).
    pub fn of_station(&self, index: usize) -> &str {
        &self.servers[index % self.servers.len()]
    }

    /// The server of phone `index` (0-based).
    pub fn of_phone(&self, index: usize) -> &str {
        let n = self.servers.len();
        &self.servers[(self.stations % n + index % n) % n]
    }

    /// The operator's server: the first.
    pub fn first(&self) -> &str {
        &self.servers[0]
    }

    /// How many of the stations and `phones` phones go to server `server` (an index).
    pub fn devices_of(&self, server: usize, phones: usize) -> usize {
        let n = self.servers.len();
        let devices = self.stations + phones;
        if server >= n {
            return 0;
        }
        devices / n + usize::from(server < devices % n)
    }
}

/// Why a load run could not be made at all. Failures of single devices are counted in
/// [`LoadReport::errors`] instead.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The options make no run.
    #[error("invalid options: {0}")]
    Options(String),
    /// A file of the data directory could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The operator could not connect or subscribe.
    #[error("operator: {0}")]
    Operator(#[from] ClientError),
    /// A station directory could not be made.
    #[error("station state: {0}")]
    Station(#[from] StateError),
    /// A phone directory could not be made.
    #[error("phone state: {0}")]
    Phone(#[from] PhoneError),
    /// A task of the run failed.
    #[error("internal: {0}")]
    Internal(String),
}

/// Latencies in microseconds, reported in milliseconds.
#[derive(Debug)]
struct Recorder(Option<Histogram<u64>>);

impl Recorder {
    fn new() -> Self {
        // Constant bounds that hdrhistogram accepts (low >= 1, high >= 2 * low, 3 digits): always
        // `Some`. One µs to one hour.
        Recorder(Histogram::new_with_bounds(1, 3_600_000_000, 3).ok())
    }

    fn record(&mut self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        if let Some(histogram) = &mut self.0 {
            histogram.saturating_record(micros.max(1));
        }
    }

    fn latency(&self) -> Latency {
        let Some(histogram) = self.0.as_ref().filter(|h| !h.is_empty()) else {
            return Latency::default();
        };
        let ms = |micros: u64| micros as f64 / 1000.0;
        Latency {
            count: histogram.len(),
            p50: Some(ms(histogram.value_at_quantile(0.5))),
            p99: Some(ms(histogram.value_at_quantile(0.99))),
            max: Some(ms(histogram.max())),
        }
    }
}

/// Errors by kind, with the first reason given for each.
#[derive(Debug, Default)]
struct Errors(BTreeMap<String, u64>, BTreeMap<String, String>);

impl Errors {
    fn count_why(&mut self, kind: &str, why: &str) {
        self.count(kind, 1);
        self.1
            .entry(kind.to_owned())
            .or_insert_with(|| why.chars().take(300).collect());
    }

    fn count(&mut self, kind: impl Into<String>, n: u64) {
        if n > 0 {
            *self.0.entry(kind.into()).or_default() += n;
        }
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Counts a station's trouble: a refusal as `<phase>_refused`, a lost connection as
    /// `<phase>_disconnected`, each with its example; a local error as `station_error`. Other
    /// events count nothing.
    fn count_trouble(&mut self, phase: &str, event: &SimEvent) {
        match event {
            SimEvent::Refused { code, .. } => {
                self.count_why(&format!("{phase}_refused"), &station_refusal_example(code));
            }
            SimEvent::Disconnected {
                reason,
                closed_before_tls,
            } => self.count_why(
                &format!("{phase}_disconnected"),
                &disconnect_example(reason, *closed_before_tls),
            ),
            SimEvent::Error { .. } => self.count("station_error", 1),
            _ => {}
        }
    }
}

/// The error kind of an operator request that got no answer, or of a failed command.
/// fleetd refused a command for the operator's command budget (PROTOCOL §6): how long to wait
/// (the "retry in N ms" of its text, one second if it says none) and the budget's commands a
/// second ("more than N commands a second", 1 if it says none).
#[derive(Debug, Clone, Copy, PartialEq)]
struct RateLimited {
    wait: Duration,
    per_second: usize,
}

fn rate_limited(error: &ClientError) -> Option<RateLimited> {
    let ClientError::CommandFailed { code, error } = error else {
        return None;
    };
    if code != "rate_limited" {
        return None;
    }
    let number_after = |marker: &str| {
        error
            .split(marker)
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
    };
    let ms = number_after("retry in ").unwrap_or(1000);
    let per_second = number_after("more than ").unwrap_or(1).max(1);
    Some(RateLimited {
        wait: Duration::from_millis(ms.clamp(10, 10_000)),
        per_second: usize::try_from(per_second).unwrap_or(usize::MAX),
    })
}

fn client_error_kind(error: &ClientError) -> String {
    match error {
        ClientError::CommandFailed { code, .. } => format!("command_{code}"),
        ClientError::Timeout(_) => "operator_timeout".into(),
        ClientError::Connection(_) | ClientError::Closed => "operator_disconnected".into(),
        _ => "operator_error".into(),
    }
}

/// Why one device failed: its error kind, and the reason for the report's examples.
type Failure = (String, String);

/// The error kind and reason of a phone provisioning that did not end provisioned.
fn phone_failure(result: &Result<ProvisionOutcome, PhoneError>) -> Option<Failure> {
    let (kind, why) = match result {
        Ok(ProvisionOutcome::Provisioned) => return None,
        Ok(outcome @ ProvisionOutcome::Refused { code, .. }) => (
            "phone_refused",
            spread::refusal_example(&outcome.to_string(), *code == 3),
        ),
        Ok(outcome @ ProvisionOutcome::Failed { .. }) => {
            ("phone_provisioning_failed", outcome.to_string())
        }
        Err(PhoneError::Link(e)) => (
            match e {
                LinkError::Timeout { .. } => "phone_timeout",
                LinkError::Connection { .. }
                | LinkError::ClosedBeforeTls { .. }
                | LinkError::Closed { .. } => "phone_disconnected",
                _ => "phone_provisioning_failed",
            },
            disconnect_example(
                &e.to_string(),
                matches!(e, LinkError::ClosedBeforeTls { .. }),
            ),
        ),
        Err(e) => ("phone_provisioning_failed", e.to_string()),
    };
    Some((kind.to_owned(), why))
}

/// The example of a station's refused CONNACK, by the return code's name.
fn station_refusal_example(code: &str) -> String {
    let unavailable = format!("{:?}", ConnectReturnCode::ServiceUnavailable);
    spread::refusal_example(code, code == unavailable)
}

/// The example of a lost connection, or one that could not be made.
fn disconnect_example(reason: &str, closed_before_tls: bool) -> String {
    if closed_before_tls {
        spread::closed_before_tls_example(reason)
    } else {
        reason.to_owned()
    }
}

/// fleetd's CPU time so far, in milliseconds (Linux reports it in USER_HZ = 100 ticks a
/// second).
fn fleetd_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|ticks| ticks as f64 * 10.0)
}

fn fleetd_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// A few random hex digits, so that the serials and MACs of one run meet none of an earlier
/// run against the same fleetd.
fn run_tag() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Admission of new devices: at most `concurrency` connecting at once, and at most `rate` new
/// ones per second.
struct Pacer {
    permits: Arc<Semaphore>,
    rate: Option<f64>,
    start: Instant,
    admitted: AtomicU64,
}

impl Pacer {
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        // The semaphore is never closed: acquiring only waits.
        let permit = Arc::clone(&self.permits).acquire_owned().await.ok();
        if let Some(rate) = self.rate {
            let n = self.admitted.fetch_add(1, Ordering::Relaxed);
            let due = self.start + Duration::from_secs_f64(n as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        permit
    }
}

/// Where one station stands in the run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Stage {
    /// Started, not seen as unauthorized by the operator yet.
    Waiting,
    /// Unauthorized; in the next accept batch.
    Queued,
    /// In a batch whose fingerprints are being read.
    Accepting,
    /// The accept envelope was sent at this instant.
    AcceptSent(Instant),
    /// The `authorized` command has arrived (the latency is recorded); the station is saving
    /// it in its state directory.
    Told,
    /// `authorized` received.
    Authorized,
    /// Given up (its error is counted).
    Failed,
}

#[derive(Debug)]
struct StationSlot {
    serial: String,
    dir: PathBuf,
    control: Option<StationControl>,
    permit: Option<OwnedSemaphorePermit>,
    started: Option<Instant>,
    connected: bool,
    stage: Stage,
    /// Reconnect storm: rebooted at this instant, not connected again yet.
    rebooted: Option<Instant>,
    /// Cut sample: the reject envelope was sent at this instant, no cut seen yet.
    cut: Option<Instant>,
    /// Part of the cut sample: its later refusals and disconnections are expected.
    sampled: bool,
}

/// Everything the run's tasks report to its coordinator, in one channel so that their order
/// is kept (a station's start is seen before its events).
#[derive(Debug)]
enum Msg {
    Started {
        index: usize,
        control: StationControl,
        permit: Option<OwnedSemaphorePermit>,
        at: Instant,
    },
    Station {
        index: usize,
        event: SimEvent,
        at: Instant,
    },
    AcceptSent {
        indices: Vec<usize>,
        at: Instant,
    },
    AcceptFailed {
        index: usize,
        kind: String,
    },
    AcceptAnswered {
        indices: Vec<usize>,
        outcome: Result<Vec<Value>, ClientError>,
    },
    Unauthorized {
        serials: Vec<String>,
    },
    ListDone,
    PhoneDone {
        outcome: Result<Duration, Failure>,
    },
    RejectAnswered {
        outcome: Result<Vec<Value>, ClientError>,
    },
}

/// Runs a whole load: onboarding, the optional reconnect storm, the cut sample; then stops
/// every simulated device.
pub async fn run_load(opts: LoadOptions) -> Result<LoadReport, LoadError> {
    let servers = check_options(&opts)?;
    let observers = Observers::start()?;
    let (operator_rt, probe_rt) = (observers.operator.clone(), observers.probes.clone());
    let Operator {
        ca_pem,
        client: operator,
        events,
    } = observers.connect_operator(&opts, servers.first()).await?;

    let tag = run_tag();
    let serial_prefix = format!("LD{:06x}", tag & 0xff_ffff);
    let mac_prefix = format!("02{:04x}", (tag >> 24) & 0xffff);
    let base = opts.state_dir.join(&serial_prefix);
    let station_base = base.join("stations");
    let slots = {
        let station_base = station_base.clone();
        let count = opts.stations;
        let prefix = serial_prefix.clone();
        tokio::task::spawn_blocking(move || make_stations(&station_base, count, &prefix))
            .await
            .map_err(|e| LoadError::Internal(e.to_string()))??
    };

    let state_in_memory = state_dir_in_memory(&station_base);
    if state_in_memory == Some(false) {
        tracing::warn!(
            state_dir = %opts.state_dir.display(),
            "the stations' state is on a disk filesystem: their own file writes may show in \
             accept → authorized; a --state-dir on tmpfs (/dev/shm/…) keeps them out"
        );
    }
    let sources = source_plan(&opts).await;
    let dialer = SideRuntime::start(opts.dial_threads, "fleet-sim-dialer")?;
    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut run = Run {
        opts,
        servers,
        sources,
        operator: Arc::new(operator),
        operator_rt,
        probe_rt,
        tx,
        rx,
        events,
        stop: stop_tx,
        index_of: slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.serial.clone(), i))
            .collect(),
        slots,
        errors: Errors::default(),
        state_in_memory,
        bar: ProgressBar::hidden(),
        last_progress: Instant::now(),
        budget: None,
    };
    run.bar = run.progress_bar();
    // Each station and phone is given its own server when it starts.
    let sim = SimConfig {
        server: run.servers.first().to_owned(),
        ca_pem: ca_pem.clone(),
        retry: STATION_RETRY,
        connect_timeout: Duration::from_secs(30),
        source: None,
        dialer: dialer.handle(),
    };
    let target = PhoneTarget::new(run.servers.first().to_owned(), ca_pem);
    let cpu_before = run.opts.fleetd_pid.and_then(fleetd_cpu_ms);
    let processes_before = run.cpu_samples();
    let onboarding = run
        .onboard(sim, stop_rx, &target, &base.join("phones"), &mac_prefix)
        .await;
    let cpu_after = run.opts.fleetd_pid.and_then(fleetd_cpu_ms);
    let processes_after = run.cpu_samples();
    let (spawner, figures) = match onboarding {
        Ok(done) => done,
        Err(e) => {
            let _ = run.stop.send(true);
            return Err(e);
        }
    };
    let later = run.after_onboarding(spawner).await;
    Ok(run.report(
        (serial_prefix, mac_prefix),
        figures,
        (cpu_before, cpu_after),
        (processes_before, processes_after),
        later,
    ))
}

/// The runtimes of what measures the run, apart from the stations' own. The operator is a
/// process of its own in a real fleet (fleetctl, the console): here it gets a runtime of its
/// own, on which its connection is driven and its requests are sent. On the stations'
/// runtime, a request sent right after a reconnect storm waited some 700 ms behind 10,000
/// stations' tasks before its PUBLISH was written, and reject → cut measured the simulator.
/// The stations rejected at the end (the first `cut_sample`, [`LoadOptions::cut_sample`]) run
/// on a runtime of their own too, for the same reason: reject → cut is fleetd's figure, not
/// the time the simulator's busy runtime takes to read their sockets.
struct Observers {
    _runtimes: [SideRuntime; 2],
    operator: tokio::runtime::Handle,
    probes: tokio::runtime::Handle,
}

impl Observers {
    fn start() -> Result<Observers, LoadError> {
        let operator = SideRuntime::start(1, "fleet-sim-operator")?;
        let probes = SideRuntime::start(1, "fleet-sim-probes")?;
        let (Some(operator_rt), Some(probes_rt)) = (operator.handle(), probes.handle()) else {
            return Err(LoadError::Internal("the observers' runtimes".into()));
        };
        Ok(Observers {
            _runtimes: [operator, probes],
            operator: operator_rt,
            probes: probes_rt,
        })
    }

    /// The operator, connected on its runtime (its connection's task stays there).
    async fn connect_operator(
        &self,
        opts: &LoadOptions,
        server: &str,
    ) -> Result<Operator, LoadError> {
        let (data_dir, server) = (opts.data_dir.clone(), server.to_owned());
        self.operator
            .spawn(async move { connect_operator(&data_dir, &server).await })
            .await
            .map_err(|e| LoadError::Internal(format!("the operator's task: {e}")))?
    }
}

/// A runtime of the run's own beside the one the stations run on: the dialer, which opens
/// the stations' connections ([`LoadOptions::dial_threads`]), and the [`Observers`]'. Shut down
/// without waiting when dropped (a runtime may not be dropped, with a wait, within another's
/// tasks).
struct SideRuntime(Option<tokio::runtime::Runtime>);

impl SideRuntime {
    /// A runtime of `threads` worker threads named `name`; none for 0.
    fn start(threads: usize, name: &str) -> Result<SideRuntime, LoadError> {
        if threads == 0 {
            return Ok(SideRuntime(None));
        }
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name(name)
            .enable_all()
            .build()
            .map(|runtime| SideRuntime(Some(runtime)))
            .map_err(|e| LoadError::Internal(format!("the runtime {name}: {e}")))
    }

    fn handle(&self) -> Option<tokio::runtime::Handle> {
        self.0.as_ref().map(|runtime| runtime.handle().clone())
    }
}

impl Drop for SideRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Where each device connects from: the addresses given for it, or else a spread over
/// loopback addresses when every server's name resolves to IPv4 loopback only.
async fn source_plan(opts: &LoadOptions) -> SourcePlan {
    let mut reachable = matches!(opts.spread, Spread::Loopback { .. });
    for server in &opts.servers {
        if !reachable {
            break;
        }
        reachable = match fleet_certs::split_server(server) {
            Some((host, port)) => match tokio::net::lookup_host((host.as_str(), port)).await {
                Ok(resolved) => spread::spreadable(&resolved.collect::<Vec<_>>()),
                Err(_) => false,
            },
            None => false,
        };
    }
    let plan = SourcePlan::new(
        (&opts.station_sources, opts.stations),
        (&opts.phone_sources, opts.phones),
        opts.spread,
        reachable,
    );
    tracing::info!(
        "devices connect from {} chosen source addresses (0: the system's choice)",
        plan.distinct()
    );
    plan
}

/// Refuses options that make no run; gives the plan of servers.
fn check_options(opts: &LoadOptions) -> Result<ServerPlan, LoadError> {
    if let Some(bad) = opts
        .servers
        .iter()
        .find(|s| fleet_certs::split_server(s).is_none())
    {
        return Err(LoadError::Options(format!(
            "server {bad:?} is not HOST:PORT"
        )));
    }
    let Some(servers) = ServerPlan::new(&opts.servers, opts.stations) else {
        return Err(LoadError::Options("no server to connect to".into()));
    };
    if let Some(bad) = opts
        .processes
        .iter()
        .find(|p| p.edge.is_some_and(|edge| edge >= opts.servers.len()))
    {
        return Err(LoadError::Options(format!(
            "process {} is the edge of server {:?} of {}",
            bad.name,
            bad.edge,
            opts.servers.len()
        )));
    }
    if opts.concurrency == 0 || opts.accept_batch == 0 || opts.accepts_in_flight == 0 {
        return Err(LoadError::Options(
            "concurrency, accept batch and accepts in flight must be at least 1".into(),
        ));
    }
    if opts.spread
        == (Spread::Loopback {
            devices_per_address: 0,
        })
    {
        return Err(LoadError::Options(
            "devices per address must be at least 1".into(),
        ));
    }
    if opts.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        return Err(LoadError::Options("rate must be a positive number".into()));
    }
    if opts.phones > 0xff_ffff {
        return Err(LoadError::Options("at most 16777215 phones".into()));
    }
    Ok(servers)
}

/// The operator of the data directory, connected and subscribed to its tenant's events.
struct Operator {
    /// The fleet CA (PEM).
    ca_pem: String,
    client: OperatorClient,
    events: mpsc::UnboundedReceiver<(String, Value)>,
}

/// Reads the fleet CA and the operator's certificate and key from the data directory, connects
/// the operator to `server` and subscribes to its tenant's events.
async fn connect_operator(data_dir: &Path, server: &str) -> Result<Operator, LoadError> {
    let read = |name: &str| {
        let path = data_dir.join(name);
        std::fs::read_to_string(&path).map_err(|source| LoadError::Read { path, source })
    };
    let ca_pem = read("ca.pem")?;
    let cert_pem = read("admin.pem")?;
    let key_pem = read("admin.key")?;
    let info = fleet_certs::inspect_pem(&cert_pem).map_err(ClientError::from)?;
    let name = fleet_ctl::operator_name(&cert_pem)?;
    let tenant = info.organization.unwrap_or_else(|| "default".into());
    let operator = OperatorClient::connect(server, &ca_pem, &cert_pem, &key_pem, &name)
        .await?
        .with_timeout(OPERATOR_TIMEOUT);
    // The stations' events only: the load tool reads no audit record, and every accept
    // would send it one.
    let events = operator
        .subscribe_event_kinds(&tenant, &[EventKind::Stations])
        .await?;
    Ok(Operator {
        ca_pem,
        client: operator,
        events,
    })
}

/// Makes every station's state directory with its key pair and certificate, before the clock
/// starts: a device's key is made at the factory or on its first boot, not in the onboarding
/// being measured. Spread over the machine's cores.
fn make_stations(base: &Path, count: usize, prefix: &str) -> Result<Vec<StationSlot>, LoadError> {
    let serials: Vec<String> = (1..=count)
        .map(|index| crate::fleet::fleet_serial(prefix, index))
        .collect();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = serials.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = serials
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || -> Result<(), LoadError> {
                    for serial in part {
                        let state = StationState::init(
                            base.join(serial),
                            &StationProfile::new(serial.clone(), STATION_FIRMWARE),
                        )?;
                        state.ensure_identity()?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| LoadError::Internal("a key-making thread panicked".into()))??;
        }
        Ok::<(), LoadError>(())
    })?;
    let mut slots = Vec::with_capacity(count);
    for serial in serials {
        let dir = base.join(&serial);
        slots.push(StationSlot {
            serial,
            dir,
            control: None,
            permit: None,
            started: None,
            connected: false,
            stage: Stage::Waiting,
            rebooted: None,
            cut: None,
            sampled: false,
        });
    }
    Ok(slots)
}

/// The figures of the onboarding phase.
struct Onboarded {
    accepts_deferred: u64,
    stations_authorized: usize,
    phones_provisioned: usize,
    seconds: f64,
    connect_ms: Latency,
    accept_to_authorized_ms: Latency,
    provision_ms: Latency,
}

/// The figures of the phases after the onboarding.
struct Later {
    reconnect: Option<StormReport>,
    fleetd_rss_kib: Option<u64>,
    /// Each named process's, read at the same moment as fleetd's.
    processes_rss_kib: Vec<Option<u64>>,
    reject_to_cut_ms: Latency,
}

/// Where the onboarding phase stands: the accept queue, what is done, what was measured.
struct Onboarding {
    started: Instant,
    connect: Recorder,
    accept: Recorder,
    provision: Recorder,
    /// Stations seen as unauthorized, for the next accept batch.
    queue: VecDeque<usize>,
    /// When the oldest station of a partial batch was queued.
    queued_since: Option<Instant>,
    /// Accept envelopes sent and not answered yet.
    in_flight: usize,
    /// A listing of the unauthorized stations is under way.
    listing: bool,
    /// Held accepts may go.
    released: bool,
    /// fleetd answered `rate_limited` (the operator's command budget): no accept goes before.
    paused_until: Option<Instant>,
    /// The budget's commands a second, once fleetd said it: accepts then go at that pace.
    pace: Option<usize>,
    /// Accepts answered `rate_limited` and sent again.
    accepts_deferred: u64,
    stations_done: usize,
    stations_authorized: usize,
    phones_done: usize,
    phones_provisioned: usize,
    last_done: Instant,
}

impl Onboarding {
    fn new(started: Instant) -> Self {
        Onboarding {
            started,
            connect: Recorder::new(),
            accept: Recorder::new(),
            provision: Recorder::new(),
            queue: VecDeque::new(),
            queued_since: None,
            in_flight: 0,
            listing: false,
            released: false,
            paused_until: None,
            pace: None,
            accepts_deferred: 0,
            stations_done: 0,
            stations_authorized: 0,
            phones_done: 0,
            phones_provisioned: 0,
            last_done: started,
        }
    }

    fn figures(self) -> Onboarded {
        Onboarded {
            accepts_deferred: self.accepts_deferred,
            stations_authorized: self.stations_authorized,
            phones_provisioned: self.phones_provisioned,
            seconds: (self.last_done - self.started).as_secs_f64(),
            connect_ms: self.connect.latency(),
            accept_to_authorized_ms: self.accept.latency(),
            provision_ms: self.provision.latency(),
        }
    }
}

/// What the onboarding loop does after one wake-up.
enum Then {
    /// Send the accept batches that are ready.
    SendAccepts,
    /// Wait for the next wake-up (a repeated `authorized` changes nothing).
    Wait,
    /// End the phase: it stalled.
    Stop,
}

struct Run {
    opts: LoadOptions,
    /// Whether the stations' state is on tmpfs ([`LoadReport::state_dir_in_memory`]).
    state_in_memory: Option<bool>,
    servers: ServerPlan,
    sources: SourcePlan,
    operator: Arc<OperatorClient>,
    /// The operator's runtime ([`SideRuntime`]): its requests are sent from tasks on it.
    operator_rt: tokio::runtime::Handle,
    /// The cut sample's runtime ([`SideRuntime`]): the first `cut_sample` stations run on it.
    probe_rt: tokio::runtime::Handle,
    tx: mpsc::UnboundedSender<Msg>,
    rx: mpsc::UnboundedReceiver<Msg>,
    events: mpsc::UnboundedReceiver<(String, Value)>,
    stop: watch::Sender<bool>,
    slots: Vec<StationSlot>,
    index_of: HashMap<String, usize>,
    errors: Errors,
    bar: ProgressBar,
    last_progress: Instant,
    /// The operator's command budget, commands a second, once fleetd said it (`rate_limited`).
    budget: Option<usize>,
}

/// What the coordinator's loop woke up for.
enum Wake {
    Msg(Msg),
    Event(String, Value),
    Tick,
    Closed,
}

impl Run {
    fn progress_bar(&self) -> ProgressBar {
        if !self.opts.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new((self.opts.stations + self.opts.phones) as u64);
        let style = ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} {prefix} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_prefix("onboarded");
        bar
    }

    fn progress(&mut self) {
        self.last_progress = Instant::now();
    }

    fn show_errors(&self) {
        let errors = self.errors.total();
        if errors > 0 {
            self.bar.set_message(format!("errors {errors}"));
        }
    }

    async fn wake(&mut self, tick: &mut tokio::time::Interval) -> Wake {
        tokio::select! {
            msg = self.rx.recv() => msg.map_or(Wake::Closed, Wake::Msg),
            event = self.events.recv() => match event {
                Some((topic, value)) => Wake::Event(topic, value),
                None => Wake::Closed,
            },
            _ = tick.tick() => Wake::Tick,
        }
    }

    /// Serials an operator event shows as unauthorized, with a key to check.
    fn unauthorized_in(topic: &str, event: &Value) -> Option<String> {
        let stations = matches!(
            Topic::parse(topic),
            Some(Topic::Event(_, EventKind::Stations))
        );
        if !stations || event.get("event")? != "state" {
            return None;
        }
        let station = event.get("station")?;
        (station.get("state")? == "unauthorized" && station.get("fingerprint")?.is_string())
            .then(|| station.get("serial")?.as_str().map(str::to_owned))
            .flatten()
    }

    /// The onboarding phase: starts the stations and phones, queues each station the operator
    /// sees as unauthorized, accepts the queued ones in batches, and counts every device done
    /// when it is onboarded or given up.
    async fn onboard(
        &mut self,
        sim: SimConfig,
        stop: watch::Receiver<bool>,
        target: &PhoneTarget,
        phone_base: &Path,
        mac_prefix: &str,
    ) -> Result<(JoinHandle<Vec<JoinHandle<()>>>, Onboarded), LoadError> {
        let started = Instant::now();
        let (spawner, phones) =
            self.start_devices(started, sim, stop, target, phone_base, mac_prefix);
        let mut phase = Onboarding::new(started);
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        self.progress();
        while phase.stations_done < self.slots.len() || phase.phones_done < self.opts.phones {
            let then = match self.wake(&mut tick).await {
                Wake::Closed => {
                    return Err(LoadError::Internal("the operator's events ended".into()))
                }
                Wake::Event(topic, event) => {
                    if let Some(index) = Self::unauthorized_in(&topic, &event)
                        .and_then(|serial| self.index_of.get(&serial).copied())
                    {
                        self.queue(&mut phase, index);
                    }
                    Then::SendAccepts
                }
                Wake::Msg(msg) => self.on_onboarding_msg(&mut phase, msg),
                Wake::Tick => self.on_onboarding_tick(&mut phase),
            };
            match then {
                Then::SendAccepts => self.send_ready_accepts(&mut phase),
                Then::Wait => {}
                Then::Stop => break,
            }
        }
        // Any phone tasks left (after a stall) stop with the run.
        phones.abort();
        Ok((spawner, phase.figures()))
    }

    /// Starts the stations and the phones, admitted by one pacer; returns the station spawner
    /// and the phones' task.
    fn start_devices(
        &self,
        started: Instant,
        sim: SimConfig,
        stop: watch::Receiver<bool>,
        target: &PhoneTarget,
        phone_base: &Path,
        mac_prefix: &str,
    ) -> (JoinHandle<Vec<JoinHandle<()>>>, JoinHandle<()>) {
        let pacer = Arc::new(Pacer {
            permits: Arc::new(Semaphore::new(self.opts.concurrency)),
            rate: self.opts.rate,
            start: started,
            admitted: AtomicU64::new(0),
        });
        let spawner = tokio::spawn(spawn_stations(
            self.slots.iter().map(|s| s.dir.clone()).collect(),
            (sim, self.servers.clone(), self.sources.stations.clone()),
            Arc::clone(&pacer),
            self.tx.clone(),
            stop,
            (self.opts.cut_sample, self.probe_rt.clone()),
        ));
        let phones = tokio::spawn(onboard_phones(PhoneRun {
            operator: Arc::clone(&self.operator),
            count: self.opts.phones,
            batch: self.opts.accept_batch,
            base: phone_base.to_owned(),
            mac_prefix: mac_prefix.to_owned(),
            target: target.clone(),
            servers: self.servers.clone(),
            sources: self.sources.phones.clone(),
            pacer,
            tx: self.tx.clone(),
        }));
        (spawner, phones)
    }

    /// Puts a waiting station in the next accept batch.
    fn queue(&mut self, phase: &mut Onboarding, index: usize) {
        if self.slots[index].stage == Stage::Waiting {
            self.slots[index].stage = Stage::Queued;
            phase.queue.push_back(index);
            phase.queued_since.get_or_insert_with(Instant::now);
        }
    }

    /// A message of the run's tasks during the onboarding.
    fn on_onboarding_msg(&mut self, phase: &mut Onboarding, msg: Msg) -> Then {
        match msg {
            Msg::Unauthorized { serials } => {
                for serial in serials {
                    if let Some(&index) = self.index_of.get(&serial) {
                        if self.slots[index].connected {
                            self.queue(phase, index);
                        }
                    }
                }
            }
            Msg::ListDone => phase.listing = false,
            Msg::Started {
                index,
                control,
                permit,
                at,
            } => {
                let slot = &mut self.slots[index];
                slot.control = Some(control);
                slot.permit = permit;
                slot.started = Some(at);
            }
            Msg::Station { index, event, at } => {
                return self.on_onboarding_station(phase, index, event, at)
            }
            Msg::AcceptSent { indices, at } => {
                for index in indices {
                    if self.slots[index].stage == Stage::Accepting {
                        self.slots[index].stage = Stage::AcceptSent(at);
                    }
                }
            }
            Msg::AcceptFailed { index, kind } => {
                self.errors.count(kind, 1);
                if self.fail(index) {
                    phase.stations_done += 1;
                }
            }
            Msg::AcceptAnswered { indices, outcome } => {
                self.on_accepts_answered(phase, indices, outcome)
            }
            Msg::PhoneDone { outcome } => {
                phase.phones_done += 1;
                match outcome {
                    Ok(elapsed) => {
                        phase.provision.record(elapsed);
                        phase.phones_provisioned += 1;
                        phase.last_done = Instant::now();
                        self.bar.inc(1);
                    }
                    Err((kind, why)) => self.errors.count_why(&kind, &why),
                }
                self.show_errors();
                self.progress();
            }
            Msg::RejectAnswered { .. } => {}
        }
        Then::SendAccepts
    }

    /// A station's event during the onboarding: its first CONNACK, `authorized`, or trouble.
    fn on_onboarding_station(
        &mut self,
        phase: &mut Onboarding,
        index: usize,
        event: SimEvent,
        at: Instant,
    ) -> Then {
        let slot = &mut self.slots[index];
        match event {
            SimEvent::Connected { .. } if !slot.connected => {
                slot.connected = true;
                slot.permit = None;
                if let Some(started) = slot.started {
                    phase.connect.record(at - started);
                }
                self.progress();
            }
            SimEvent::Authorized => {
                let before = slot.stage;
                if before == Stage::Authorized {
                    return Then::Wait;
                }
                if let Stage::AcceptSent(sent) = before {
                    phase.accept.record(at - sent);
                }
                slot.stage = Stage::Authorized;
                if before != Stage::Failed {
                    phase.stations_done += 1;
                }
                phase.stations_authorized += 1;
                phase.last_done = at;
                self.bar.inc(1);
                self.progress();
            }
            // Accept → `authorized` ends when the command reaches the station, not when the
            // simulated station has also written it to its state directory (its own disk,
            // which would be counted against fleetd otherwise).
            SimEvent::Command { command, .. } if command == "authorized" => {
                if let Stage::AcceptSent(sent) = slot.stage {
                    phase.accept.record(at - sent);
                    slot.stage = Stage::Told;
                }
                return Then::Wait;
            }
            SimEvent::Rejected | SimEvent::Removed | SimEvent::ResetApplied => {
                self.errors.count("station_unexpected_command", 1);
            }
            trouble => self.errors.count_trouble("station", &trouble),
        }
        self.show_errors();
        Then::SendAccepts
    }

    /// The answers to one accept envelope: a station whose accept failed is given up, one
    /// refused for the operator's command budget (`rate_limited`) is accepted again once the
    /// budget allows, as an operator would: fleetd's limit is the pace, not an error.
    fn on_accepts_answered(
        &mut self,
        phase: &mut Onboarding,
        indices: Vec<usize>,
        outcome: Result<Vec<Value>, ClientError>,
    ) {
        phase.in_flight -= 1;
        match outcome {
            Ok(responses) => {
                for (index, response) in indices.into_iter().zip(responses) {
                    if let Err(e) = fleet_ctl::response_data(response) {
                        if let Some(limited) = rate_limited(&e) {
                            let until = Instant::now() + limited.wait;
                            phase.pace = Some(limited.per_second);
                            self.budget = Some(limited.per_second);
                            phase.paused_until = phase.paused_until.max(Some(until));
                            phase.accepts_deferred += 1;
                            self.slots[index].stage = Stage::Queued;
                            phase.queue.push_back(index);
                            phase.queued_since.get_or_insert_with(Instant::now);
                            continue;
                        }
                        self.errors.count(client_error_kind(&e), 1);
                        if self.fail(index) {
                            phase.stations_done += 1;
                        }
                    }
                }
            }
            Err(e) => {
                let kind = client_error_kind(&e);
                for index in indices {
                    if self.fail(index) {
                        self.errors.count(kind.clone(), 1);
                        phase.stations_done += 1;
                    }
                }
            }
        }
        self.show_errors();
    }

    /// The onboarding's clock: gives everything left up after `STALL_LIMIT` without progress,
    /// and lists the unauthorized stations after `LIST_AFTER`.
    fn on_onboarding_tick(&mut self, phase: &mut Onboarding) -> Then {
        if self.last_progress.elapsed() > STALL_LIMIT {
            for index in 0..self.slots.len() {
                if self.fail(index) {
                    self.errors.count("station_timeout", 1);
                }
            }
            self.errors.count(
                "phone_timeout",
                (self.opts.phones - phase.phones_done) as u64,
            );
            return Then::Stop;
        }
        let stalled = self.last_progress.elapsed() > LIST_AFTER;
        if stalled && !phase.listing {
            phase.listing = true;
            self.list_unauthorized();
        }
        Then::SendAccepts
    }

    /// Sends the accept batches that are ready.
    fn send_ready_accepts(&mut self, phase: &mut Onboarding) {
        if phase.paused_until.is_some_and(|t| Instant::now() < t) {
            return;
        }
        // Held accepts wait until every station that is still to be accepted is queued.
        if self.opts.hold_accepts
            && !phase.released
            && phase.queue.len() * 10 >= self.slots.len() * 9
        {
            let waiting = self
                .slots
                .iter()
                .filter(|s| matches!(s.stage, Stage::Waiting))
                .count();
            phase.released = waiting == 0;
        }
        // Send what is ready: full batches at once, a partial one after a short linger.
        while (phase.released || !self.opts.hold_accepts)
            && phase.in_flight < self.opts.accepts_in_flight
            && !phase.queue.is_empty()
        {
            let full = phase.queue.len() >= self.opts.accept_batch;
            let lingered = phase
                .queued_since
                .is_some_and(|t| t.elapsed() >= ACCEPT_LINGER);
            if !(full || lingered) {
                break;
            }
            let mut take = phase.queue.len().min(self.opts.accept_batch);
            if let Some(per_second) = phase.pace {
                // As many as the budget gives back in a second, then a second's pause.
                take = take.min(per_second);
                let pause = Duration::from_secs_f64(take as f64 / per_second as f64);
                phase.paused_until = Some(Instant::now() + pause);
            }
            let batch: Vec<usize> = phase.queue.drain(..take).collect();
            phase.queued_since = if phase.queue.is_empty() {
                None
            } else {
                Some(Instant::now())
            };
            for &index in &batch {
                self.slots[index].stage = Stage::Accepting;
            }
            phase.in_flight += 1;
            self.send_accepts(batch);
        }
    }

    /// Gives a station up; true if it was not done yet.
    fn fail(&mut self, index: usize) -> bool {
        let slot = &mut self.slots[index];
        if matches!(slot.stage, Stage::Authorized | Stage::Failed) {
            return false;
        }
        slot.stage = Stage::Failed;
        slot.permit = None;
        true
    }

    /// One envelope of `acceptStation`, each with the fingerprint the station's own state
    /// directory shows (what an operator checks on the station's local admin page).
    fn send_accepts(&self, batch: Vec<usize>) {
        let operator = Arc::clone(&self.operator);
        let tx = self.tx.clone();
        let stations: Vec<(usize, String, PathBuf)> = batch
            .into_iter()
            .map(|i| (i, self.slots[i].serial.clone(), self.slots[i].dir.clone()))
            .collect();
        let all: Vec<usize> = stations.iter().map(|(i, _, _)| *i).collect();
        self.operator_rt.spawn(async move {
            let read = tokio::task::spawn_blocking(move || {
                stations
                    .into_iter()
                    .map(|(index, serial, dir)| {
                        let fingerprint = crate::state::fingerprint(&dir);
                        (index, serial, fingerprint)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(read) = read else {
                for index in all {
                    let _ = tx.send(Msg::AcceptFailed {
                        index,
                        kind: "station_local_fingerprint".into(),
                    });
                }
                let _ = tx.send(Msg::AcceptAnswered {
                    indices: Vec::new(),
                    outcome: Ok(Vec::new()),
                });
                return;
            };
            let mut indices = Vec::with_capacity(read.len());
            let mut commands = Vec::with_capacity(read.len());
            for (index, serial, fingerprint) in read {
                match fingerprint {
                    Ok(Some(fingerprint)) => {
                        indices.push(index);
                        commands.push(json!({
                            "command": "acceptStation",
                            "serial": serial,
                            "fingerprint": fingerprint.to_string(),
                        }));
                    }
                    Ok(None) | Err(_) => {
                        let _ = tx.send(Msg::AcceptFailed {
                            index,
                            kind: "station_local_fingerprint".into(),
                        });
                    }
                }
            }
            let _ = tx.send(Msg::AcceptSent {
                indices: indices.clone(),
                at: Instant::now(),
            });
            let outcome = if commands.is_empty() {
                Ok(Vec::new())
            } else {
                operator.request(commands).await
            };
            let _ = tx.send(Msg::AcceptAnswered { indices, outcome });
        });
    }

    /// Lists the unauthorized stations, in case their events were missed.
    fn list_unauthorized(&self) {
        let operator = Arc::clone(&self.operator);
        let tx = self.tx.clone();
        self.operator_rt.spawn(async move {
            // Every page: the list is paged (`[limits] max_page_size`), and the stations whose
            // events were missed may be anywhere in it.
            let mut after: Option<String> = None;
            loop {
                let mut args = json!({"state": "unauthorized"});
                if let Some(after) = &after {
                    args["after"] = json!(after);
                }
                let Ok(data) = operator.call("listStations", args).await else {
                    break;
                };
                let serials = data
                    .get("stations")
                    .and_then(Value::as_array)
                    .map(|stations| {
                        stations
                            .iter()
                            .filter(|s| s.get("fingerprint").is_some_and(Value::is_string))
                            .filter_map(|s| s.get("serial")?.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let _ = tx.send(Msg::Unauthorized { serials });
                match data.get("next").and_then(Value::as_str) {
                    Some(next) => after = Some(next.to_owned()),
                    None => break,
                }
            }
            let _ = tx.send(Msg::ListDone);
        });
    }

    /// Reboots every authorized station at once and measures how they connect again.
    async fn reconnect_storm(&mut self) -> StormReport {
        let mut connect = Recorder::new();
        let started = Instant::now();
        let mut waiting = 0usize;
        for slot in &mut self.slots {
            if slot.stage != Stage::Authorized {
                continue;
            }
            if let Some(control) = &slot.control {
                if control.reboot() {
                    // Measured from the `Rebooting` event: the old connection is closed then.
                    slot.rebooted = Some(started);
                    waiting += 1;
                }
            }
        }
        let stations = waiting;
        self.bar.reset();
        self.bar.set_length(stations as u64);
        self.bar.set_prefix("reconnected");
        let mut last = started;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        self.progress();
        while waiting > 0 {
            match self.wake(&mut tick).await {
                Wake::Closed => break,
                Wake::Msg(Msg::Station { index, event, at }) => {
                    let slot = &mut self.slots[index];
                    match event {
                        SimEvent::Rebooting if slot.rebooted.is_some() => {
                            slot.rebooted = Some(at);
                        }
                        SimEvent::Connected { .. } => {
                            if let Some(rebooted) = slot.rebooted.take() {
                                connect.record(at - rebooted);
                                waiting -= 1;
                                last = at;
                                self.bar.inc(1);
                                self.progress();
                            }
                        }
                        trouble => self.errors.count_trouble("reconnect", &trouble),
                    }
                    self.show_errors();
                }
                Wake::Tick if self.last_progress.elapsed() > STALL_LIMIT => {
                    self.errors.count("reconnect_timeout", waiting as u64);
                    for slot in &mut self.slots {
                        slot.rebooted = None;
                    }
                    break;
                }
                _ => {}
            }
        }
        let connected = stations - waiting;
        let seconds = (last - started).as_secs_f64();
        StormReport {
            stations,
            connected,
            seconds,
            connects_per_s: if seconds > 0.0 {
                connected as f64 / seconds
            } else {
                0.0
            },
            connect_ms: connect.latency(),
        }
    }

    /// Rejects `cut_sample` authorized, connected stations in one envelope and measures until
    /// each hears `rejected` or loses its connection.
    async fn cut_sample(&mut self) -> Latency {
        let mut cut = Recorder::new();
        let sample: Vec<usize> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.stage == Stage::Authorized && s.connected)
            .map(|(i, _)| i)
            .take(self.opts.cut_sample)
            .collect();
        if sample.len() < self.opts.cut_sample {
            self.errors.count(
                "cut_sample_short",
                (self.opts.cut_sample - sample.len()) as u64,
            );
        }
        if sample.is_empty() {
            return cut.latency();
        }
        if let Some(per_second) = self.budget {
            // The onboarding spent the operator's budget: let it give back one envelope's worth.
            let wait = Duration::from_secs_f64(sample.len() as f64 / per_second as f64);
            tokio::time::sleep(wait.min(Duration::from_secs(30))).await;
        }
        let commands: Vec<Value> = sample
            .iter()
            .map(|&i| json!({"command": "rejectStation", "serial": self.slots[i].serial}))
            .collect();
        let sent = Instant::now();
        for &index in &sample {
            self.slots[index].cut = Some(sent);
            self.slots[index].sampled = true;
        }
        let operator = Arc::clone(&self.operator);
        let tx = self.tx.clone();
        self.operator_rt.spawn(async move {
            let outcome = operator.request(commands).await;
            let _ = tx.send(Msg::RejectAnswered { outcome });
        });
        let mut waiting = sample.len();
        let mut answered = false;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        self.progress();
        while waiting > 0 || !answered {
            match self.wake(&mut tick).await {
                Wake::Closed => break,
                Wake::Msg(Msg::Station { index, event, at }) => {
                    let slot = &mut self.slots[index];
                    let is_cut =
                        matches!(event, SimEvent::Rejected | SimEvent::Disconnected { .. });
                    if let (true, Some(sent)) = (is_cut, slot.cut) {
                        slot.cut = None;
                        cut.record(at - sent);
                        waiting -= 1;
                        self.progress();
                    } else if !slot.sampled {
                        self.errors.count_trouble("station", &event);
                    }
                }
                Wake::Msg(Msg::RejectAnswered { outcome }) => {
                    answered = true;
                    waiting -= self.on_rejects_answered(&sample, outcome);
                }
                Wake::Tick if self.last_progress.elapsed() > STALL_LIMIT => {
                    self.errors.count("cut_timeout", waiting as u64);
                    break;
                }
                _ => {}
            }
        }
        cut.latency()
    }

    /// The answers to the reject envelope: a reject that failed is counted as its error, and
    /// its cut is not waited for. Returns how many cuts that gives up.
    fn on_rejects_answered(
        &mut self,
        sample: &[usize],
        outcome: Result<Vec<Value>, ClientError>,
    ) -> usize {
        let failed: Vec<(usize, ClientError)> = match outcome {
            Ok(responses) => sample
                .iter()
                .zip(responses)
                .filter_map(|(&index, response)| {
                    fleet_ctl::response_data(response).err().map(|e| (index, e))
                })
                .collect(),
            Err(e) => {
                let kind = client_error_kind(&e);
                self.errors.count_why(&kind, &e.to_string());
                self.errors
                    .count(kind, sample.len().saturating_sub(1) as u64);
                return sample
                    .iter()
                    .filter(|&&index| self.slots[index].cut.take().is_some())
                    .count();
            }
        };
        let mut given_up = 0;
        for (index, e) in failed {
            self.errors
                .count_why(&client_error_kind(&e), &e.to_string());
            if self.slots[index].cut.take().is_some() {
                given_up += 1;
            }
        }
        given_up
    }

    /// Stops every station (clean DISCONNECT) and waits, within a limit, for them to end.
    async fn shutdown(&mut self, spawner: JoinHandle<Vec<JoinHandle<()>>>) {
        let _ = self.stop.send(true);
        let stopped = async {
            if let Ok(tasks) = spawner.await {
                for task in tasks {
                    let _ = task.await;
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_LIMIT, stopped).await.is_err() {
            tracing::warn!("simulated stations did not all stop within {SHUTDOWN_LIMIT:?}");
        }
    }

    /// The phases after the onboarding: the reconnect storm when asked for, fleetd's memory
    /// with every station connected, the cut sample; then every simulated device stops.
    async fn after_onboarding(&mut self, spawner: JoinHandle<Vec<JoinHandle<()>>>) -> Later {
        let reconnect = if self.opts.reconnect {
            Some(self.reconnect_storm().await)
        } else {
            None
        };
        let fleetd_rss_kib = self.opts.fleetd_pid.and_then(fleetd_rss_kib);
        let processes_rss_kib = self.opts.processes.iter().map(processes::rss_kib).collect();
        let reject_to_cut_ms = self.cut_sample().await;
        self.bar.finish_and_clear();
        self.shutdown(spawner).await;
        Later {
            reconnect,
            fleetd_rss_kib,
            processes_rss_kib,
            reject_to_cut_ms,
        }
    }

    /// The CPU time of each named process now, in their order.
    fn cpu_samples(&self) -> Vec<Option<CpuSample>> {
        self.opts
            .processes
            .iter()
            .map(processes::cpu_sample)
            .collect()
    }

    /// The named processes' figures, from their CPU samples before and after the onboarding
    /// and their memory.
    fn process_figures(
        &self,
        (before, after): (Vec<Option<CpuSample>>, Vec<Option<CpuSample>>),
        rss_kib: &[Option<u64>],
        onboarded: usize,
    ) -> Vec<ProcessFigures> {
        self.opts
            .processes
            .iter()
            .enumerate()
            .map(|(i, process)| {
                let server = process.edge.map(|edge| {
                    let address = self.opts.servers.get(edge).map_or("", String::as_str);
                    (address, self.servers.devices_of(edge, self.opts.phones))
                });
                let cpu = (
                    before.get(i).copied().flatten(),
                    after.get(i).copied().flatten(),
                );
                let rss = rss_kib.get(i).copied().flatten();
                ProcessFigures::new(process, server, cpu, rss, onboarded)
            })
            .collect()
    }

    /// The report of the whole run; `fleetd_cpu_ms` is fleetd's CPU time before and after the
    /// onboarding, `process_cpu` the named processes'.
    fn report(
        self,
        (serial_prefix, mac_prefix): (String, String),
        figures: Onboarded,
        fleetd_cpu_ms: (Option<f64>, Option<f64>),
        process_cpu: (Vec<Option<CpuSample>>, Vec<Option<CpuSample>>),
        later: Later,
    ) -> LoadReport {
        let rss = later.fleetd_rss_kib;
        let devices = self.opts.stations + self.opts.phones;
        let onboarded = figures.stations_authorized + figures.phones_provisioned;
        let processes = self.process_figures(process_cpu, &later.processes_rss_kib, onboarded);
        LoadReport {
            stations: self.opts.stations,
            phones: self.opts.phones,
            stations_authorized: figures.stations_authorized,
            phones_provisioned: figures.phones_provisioned,
            serial_prefix,
            mac_prefix,
            seconds: figures.seconds,
            onboarded_per_s: if figures.seconds > 0.0 {
                onboarded as f64 / figures.seconds
            } else {
                0.0
            },
            connect_ms: figures.connect_ms,
            accept_to_authorized_ms: figures.accept_to_authorized_ms,
            provision_ms: figures.provision_ms,
            reject_to_cut_ms: later.reject_to_cut_ms,
            reconnect: later.reconnect,
            accepts_deferred: figures.accepts_deferred,
            source_addresses: self.sources.distinct(),
            errors: self.errors.0,
            error_examples: self.errors.1,
            fleetd_cpu_ms_per_device: match fleetd_cpu_ms {
                (Some(before), Some(after))
                    if figures.stations_authorized + figures.phones_provisioned > 0 =>
                {
                    Some(
                        (after - before)
                            / (figures.stations_authorized + figures.phones_provisioned) as f64,
                    )
                }
                _ => None,
            },
            fleetd_rss_kib: rss,
            fleetd_rss_kib_per_device: rss
                .filter(|_| devices > 0)
                .map(|kib| kib as f64 / devices as f64),
            servers: self.opts.servers.clone(),
            processes_cpu_ms_per_device: processes::total_cpu_ms_per_device(&processes, onboarded),
            processes,
            state_dir_in_memory: self.state_in_memory,
        }
    }
}

/// Whether `dir` is on a filesystem held in memory (tmpfs, ramfs); `None` if it cannot be
/// told. Why it matters: a simulated station saves its state file whole (a new temporary file
/// renamed over the old one) when it is told `authorized`, so 100 stations accepted in one
/// 20 ms envelope create 5,000 inodes a second. On ext4, right after the previous run's
/// directories were deleted, inode allocation alone made the stations read their `cmd` up to
/// 1.8 s late while fleetd had written every one within 10 ms of queueing it (2026-12-06,
/// held accepts: p99 24 to 1,607 ms run to run on ext4, 15 to 19 ms on tmpfs).
pub fn state_dir_in_memory(dir: &Path) -> Option<bool> {
    let fs = rustix::fs::statfs(dir).ok()?;
    Some(is_memory_fs(f_type(&fs)))
}

/// `statfs`'s `f_type`, whose integer type differs between targets.
#[allow(clippy::unnecessary_cast)]
fn f_type(fs: &rustix::fs::StatFs) -> i64 {
    fs.f_type as i64
}

/// `statfs`'s `f_type` of tmpfs and ramfs.
fn is_memory_fs(f_type: i64) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    matches!(f_type, TMPFS_MAGIC | RAMFS_MAGIC)
}

/// Starts the stations one after another as the pacer admits them, each from its source
/// address; returns their forwarding tasks. The first `probes.0` run on the runtime
/// `probes.1` (the cut sample's, [`Run::probe_rt`]), the others on the caller's.
async fn spawn_stations(
    dirs: Vec<PathBuf>,
    (sim, servers, sources): (SimConfig, ServerPlan, Rotation),
    pacer: Arc<Pacer>,
    tx: mpsc::UnboundedSender<Msg>,
    mut stop: watch::Receiver<bool>,
    probes: (usize, tokio::runtime::Handle),
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(dirs.len());
    for (index, dir) in dirs.into_iter().enumerate() {
        let permit = tokio::select! {
            permit = pacer.admit() => permit,
            _ = stop.changed() => break,
        };
        let at = Instant::now();
        let config = SimConfig {
            server: servers.of_station(index).to_owned(),
            source: sources.of(index),
            ..sim.clone()
        };
        let handle = match index < probes.0 {
            true => {
                let _probes = probes.1.enter();
                spawn_station(dir, config)
            }
            false => spawn_station(dir, config),
        };
        let started = Msg::Started {
            index,
            control: handle.control(),
            permit,
            at,
        };
        if tx.send(started).is_err() {
            handle.shutdown().await;
            break;
        }
        tasks.push(tokio::spawn(forward(
            index,
            handle,
            tx.clone(),
            stop.clone(),
        )));
    }
    tasks
}

/// Passes one station's events on, with when the station emitted them, until the run stops.
async fn forward(
    index: usize,
    mut handle: StationHandle,
    tx: mpsc::UnboundedSender<Msg>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            event = handle.next_stamped_event() => match event {
                Some((event, at)) => {
                    let _ = tx.send(Msg::Station { index, event, at: Instant::from_std(at) });
                }
                None => return,
            },
            _ = stop.changed() => break,
        }
    }
    handle.shutdown().await;
}

struct PhoneRun {
    operator: Arc<OperatorClient>,
    count: usize,
    batch: usize,
    base: PathBuf,
    mac_prefix: String,
    target: PhoneTarget,
    servers: ServerPlan,
    sources: Rotation,
    pacer: Arc<Pacer>,
    tx: mpsc::UnboundedSender<Msg>,
}

/// Creates the phones (`createPhone`, `batch` to an envelope) and provisions each with its PAP
/// as soon as it exists and the pacer admits it.
async fn onboard_phones(run: PhoneRun) {
    let mut tasks = Vec::with_capacity(run.count);
    let indices: Vec<usize> = (1..=run.count).collect();
    for chunk in indices.chunks(run.batch) {
        let mut macs = Vec::with_capacity(chunk.len());
        for &index in chunk {
            match phone::phone_mac(&run.mac_prefix, index) {
                Ok(mac) => macs.push((index, mac)),
                Err(e) => {
                    let _ = run.tx.send(Msg::PhoneDone {
                        outcome: Err(("phone_invalid_mac".into(), e.to_string())),
                    });
                }
            }
        }
        let commands: Vec<Value> = macs
            .iter()
            .map(|(_, mac)| {
                json!({
                    "command": "createPhone",
                    "mac": mac.as_str(),
                    "vendor": phone::DEFAULT_VENDOR,
                    "type": phone::DEFAULT_TYPE,
                    "site": PHONE_SITE,
                })
            })
            .collect();
        let responses = match run.operator.request(commands).await {
            Ok(responses) => responses,
            Err(e) => {
                for _ in &macs {
                    let _ = run.tx.send(Msg::PhoneDone {
                        outcome: Err((client_error_kind(&e), e.to_string())),
                    });
                }
                continue;
            }
        };
        for ((index, mac), response) in macs.into_iter().zip(responses) {
            let pap = match fleet_ctl::response_data(response) {
                Ok(data) => data.get("pap").and_then(Value::as_str).map(str::to_owned),
                Err(e) => {
                    let _ = run.tx.send(Msg::PhoneDone {
                        outcome: Err((client_error_kind(&e), e.to_string())),
                    });
                    continue;
                }
            };
            let Some(pap) = pap else {
                let _ = run.tx.send(Msg::PhoneDone {
                    outcome: Err(("phone_no_pap".into(), "createPhone answered no PAP".into())),
                });
                continue;
            };
            let mut target = run.target.clone();
            // Phone numbers start at 1.
            target.server = run.servers.of_phone(index - 1).to_owned();
            target.source = run.sources.of(index - 1);
            let profile = PhoneProfile {
                mac: mac.to_string(),
                vendor: phone::DEFAULT_VENDOR.into(),
                kind: phone::DEFAULT_TYPE.into(),
                pap: Some(pap),
            };
            let dir = run.base.join(mac.as_str());
            let pacer = Arc::clone(&run.pacer);
            let tx = run.tx.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = pacer.admit().await;
                let started = Instant::now();
                let result = match PhoneState::init(&dir, &profile) {
                    Ok(_) => phone::provision(&dir, &target).await,
                    Err(e) => Err(e),
                };
                let outcome = match phone_failure(&result) {
                    None => Ok(started.elapsed()),
                    Some(failure) => {
                        tracing::debug!("phone {}: {}", profile.mac, failure.1);
                        Err(failure)
                    }
                };
                let _ = tx.send(Msg::PhoneDone { outcome });
            }));
        }
    }
    for task in tasks {
        if task.await.is_err() {
            let _ = run.tx.send(Msg::PhoneDone {
                outcome: Err(("phone_task_failed".into(), "a phone's task panicked".into())),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_filesystems_are_told_from_disk_ones() {
        assert!(is_memory_fs(0x0102_1994), "tmpfs");
        assert!(is_memory_fs(0x8584_58f6), "ramfs");
        assert!(!is_memory_fs(0xef53), "ext4");
        assert!(!is_memory_fs(0x5846_5342), "xfs");
        let dir = tempfile::tempdir().unwrap();
        assert!(state_dir_in_memory(dir.path()).is_some());
        assert_eq!(state_dir_in_memory(&dir.path().join("missing")), None);
        // Where the machine has a tmpfs /dev/shm (Linux usually does), it is told as one.
        let shm = rustix::fs::statfs("/dev/shm").map(|fs| f_type(&fs));
        if shm.is_ok_and(is_memory_fs) {
            assert_eq!(state_dir_in_memory(Path::new("/dev/shm")), Some(true));
        }
    }

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\tfleetd\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name:\tx\n"), None);
        assert_eq!(parse_vm_rss("VmRSS:\tlots kB\n"), None);
        let stat = "4242 (fleetd (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 9 0";
        assert_eq!(parse_cpu_ticks(stat), Some(287));
        assert_eq!(parse_cpu_ticks("4242 (fleetd) S 1"), None);
    }

    #[test]
    fn devices_go_to_the_servers_in_turn_stations_first() {
        let servers: Vec<String> = ["a:1", "b:2", "c:3"].map(str::to_owned).into();
        let plan = ServerPlan::new(&servers, 4).unwrap();
        let stations: Vec<&str> = (0..4).map(|i| plan.of_station(i)).collect();
        assert_eq!(stations, ["a:1", "b:2", "c:3", "a:1"]);
        // The phones go on where the stations stopped.
        let phones: Vec<&str> = (0..3).map(|i| plan.of_phone(i)).collect();
        assert_eq!(phones, ["b:2", "c:3", "a:1"]);
        assert_eq!(plan.first(), "a:1");
        // 4 stations and 3 phones: devices 0..7 over 3 servers.
        let shares: Vec<usize> = (0..4).map(|s| plan.devices_of(s, 3)).collect();
        assert_eq!(shares, [3, 2, 2, 0]);
        assert_eq!(ServerPlan::new(&[], 4), None);

        // One server: every device to it, as before there were several.
        let one = ServerPlan::new(&servers[..1], 10).unwrap();
        assert!((0..20).all(|i| one.of_station(i) == "a:1" && one.of_phone(i) == "a:1"));
        assert_eq!(one.devices_of(0, 5), 15);
    }

    #[test]
    fn options_with_a_bad_server_or_edge_make_no_run() {
        let mut opts = LoadOptions::new("127.0.0.1:8883", "data");
        opts.servers.push("127.0.0.1:8884".into());
        assert!(check_options(&opts).is_ok());
        opts.servers.push("nowhere".into());
        let error = check_options(&opts).unwrap_err().to_string();
        assert!(error.contains("\"nowhere\""), "{error}");
        opts.servers.clear();
        assert!(check_options(&opts).is_err());
        let mut opts = LoadOptions::new("127.0.0.1:8883", "data");
        opts.processes.push(MeasuredProcess {
            edge: Some(1),
            ..MeasuredProcess::new("edge-1", 12)
        });
        let error = check_options(&opts).unwrap_err().to_string();
        assert!(error.contains("edge-1"), "{error}");
    }

    #[test]
    fn latencies_are_reported_in_milliseconds() {
        let mut recorder = Recorder::new();
        assert_eq!(recorder.latency(), Latency::default());
        for ms in 1..=100u64 {
            recorder.record(Duration::from_millis(ms));
        }
        let latency = recorder.latency();
        assert_eq!(latency.count, 100);
        let p50 = latency.p50.unwrap();
        assert!((49.9..=50.1).contains(&p50), "{p50}");
        let max = latency.max.unwrap();
        assert!((99.9..=100.1).contains(&max), "{max}");
    }

    #[test]
    fn unauthorized_stations_are_picked_from_state_events() {
        let stations_events = Topic::Event("default".into(), EventKind::Stations).to_string();
        let audit_events = Topic::Event("default".into(), EventKind::Audit).to_string();
        let event = json!({"event": "state", "station": {
            "serial": "LD1-00001", "state": "unauthorized", "fingerprint": "AB:CD"}});
        assert_eq!(
            Run::unauthorized_in(&stations_events, &event).as_deref(),
            Some("LD1-00001")
        );
        assert_eq!(Run::unauthorized_in(&audit_events, &event), None);
        let running = json!({"event": "state", "station": {
            "serial": "LD1-00001", "state": "running", "fingerprint": "AB:CD"}});
        assert_eq!(Run::unauthorized_in(&stations_events, &running), None);
        let keyless = json!({"event": "state", "station": {
            "serial": "LD1-00001", "state": "unauthorized", "fingerprint": null}});
        assert_eq!(Run::unauthorized_in(&stations_events, &keyless), None);
    }

    #[test]
    fn a_rate_limited_answer_says_how_long_to_wait() {
        let limited = |error: &str| ClientError::CommandFailed {
            code: "rate_limited".into(),
            error: error.into(),
        };
        let limited_by = rate_limited(&limited(
            "more than 20 commands a second (burst 200); retry in 350 ms",
        ));
        let expected = RateLimited {
            wait: Duration::from_millis(350),
            per_second: 20,
        };
        assert_eq!(limited_by, Some(expected));
        let vague = RateLimited {
            wait: Duration::from_secs(1),
            per_second: 1,
        };
        assert_eq!(rate_limited(&limited("slow down")), Some(vague));
        let other = ClientError::CommandFailed {
            code: "not_found".into(),
            error: "retry in 5 ms".into(),
        };
        assert_eq!(rate_limited(&other), None);
    }

    #[test]
    fn errors_are_counted_by_kind() {
        assert_eq!(
            client_error_kind(&ClientError::CommandFailed {
                code: "wrong_state".into(),
                error: "x".into()
            }),
            "command_wrong_state"
        );
        assert_eq!(
            client_error_kind(&ClientError::Timeout(Duration::from_secs(1))),
            "operator_timeout"
        );
        let kind = |result| phone_failure(&result).map(|(kind, _)| kind);
        assert_eq!(
            kind(Ok(ProvisionOutcome::Refused {
                code: 4,
                reason: None
            }))
            .as_deref(),
            Some("phone_refused")
        );
        assert_eq!(kind(Ok(ProvisionOutcome::Provisioned)), None);
        let timeout = LinkError::Timeout {
            waiting_for: "CONNACK",
            limit: Duration::from_secs(1),
        };
        assert_eq!(
            kind(Err(PhoneError::Link(timeout))).as_deref(),
            Some("phone_timeout")
        );
        let mut errors = Errors::default();
        errors.count("a", 2);
        errors.count("a", 0);
        errors.count("b", 0);
        assert_eq!(errors.total(), 2);
        assert_eq!(errors.0.len(), 1);
    }

    #[test]
    fn error_examples_name_fleetds_per_address_limits() {
        let closed = LinkError::ClosedBeforeTls {
            server: "127.0.0.1:8883".into(),
            source: std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "tls handshake eof"),
        };
        let (kind, why) = phone_failure(&Err(PhoneError::Link(closed))).unwrap();
        assert_eq!(kind, "phone_disconnected");
        assert!(why.starts_with("per-address limit: "), "{why}");
        assert!(why.contains("tls handshake eof"), "{why}");
        let (kind, why) = phone_failure(&Ok(ProvisionOutcome::Refused {
            code: 3,
            reason: None,
        }))
        .unwrap();
        assert_eq!(kind, "phone_refused");
        assert!(why.contains("limits.sessions_per_ip"), "{why}");
        let (_, why) = phone_failure(&Ok(ProvisionOutcome::Refused {
            code: 5,
            reason: None,
        }))
        .unwrap();
        assert_eq!(why, "refused: not authorized (5)");

        assert!(station_refusal_example("ServiceUnavailable").contains("a per-address limit"));
        assert_eq!(station_refusal_example("NotAuthorized"), "NotAuthorized");
        let closed = disconnect_example("x closed the connection before TLS: eof", true);
        assert!(closed.starts_with("per-address limit: "), "{closed}");
        assert_eq!(
            disconnect_example("connection refused", false),
            "connection refused"
        );

        // The first example of a kind is kept, whole up to 300 characters.
        let mut errors = Errors::default();
        errors.count_why("station_disconnected", &closed);
        errors.count_why("station_disconnected", "later");
        assert_eq!(errors.1["station_disconnected"], closed);
        assert_eq!(errors.0["station_disconnected"], 2);
    }
}
