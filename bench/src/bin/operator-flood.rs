//! Operator flood (issue 9): the outside review's attack, measured.
//!
//! One operator (certificate and key on the command line) fills its own audit log with cheap
//! commands as fast as fleetd lets it, sends one request over the command bound, then sends
//! requests of `listAuditLog` commands (each asking for `limit` records) for `--seconds`. All
//! the while an honest client connects every `--probe-interval-ms` (a certificate-less legacy
//! station `HONEST-<n>` from `--probe-source`, full TLS handshake, MQTT 3.1.1 CONNECT)
//! and the time from TCP connect to CONNACK is recorded; fleetd's VmRSS and VmHWM are sampled
//! from /proc. Prints one JSON report on stdout.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fleet_ctl::{ClientError, OperatorClient};
use fleet_protocol::{operator_client_id, Serial, Topic};
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;

#[derive(Parser)]
struct Args {
    /// fleetd's address HOST:PORT.
    #[arg(long)]
    server: String,
    /// The fleet CA (DATA_DIR/ca.pem), to verify fleetd's certificate.
    #[arg(long)]
    ca: std::path::PathBuf,
    /// The attacking operator's certificate (PEM).
    #[arg(long)]
    cert: std::path::PathBuf,
    /// Its key (PEM).
    #[arg(long)]
    key: std::path::PathBuf,
    /// fleetd's process id, for VmRSS / VmHWM and CPU time.
    #[arg(long)]
    fleetd_pid: u32,
    /// Audit-filling commands to send.
    #[arg(long, default_value_t = 11_000)]
    fill: usize,
    /// The cheap command that fills the audit log (every operator command is audited).
    #[arg(long, default_value = "listWhitelist")]
    fill_command: String,
    /// Commands per audit-filling request (fleetd takes at most 100).
    #[arg(long, default_value_t = 100)]
    fill_batch: usize,
    /// Audit-filling requests in flight at once.
    #[arg(long, default_value_t = 8)]
    fill_in_flight: usize,
    /// Size of the one over-bound request sent before the flood (the review sent 150); 0 skips it.
    #[arg(long, default_value_t = 150)]
    oversized: usize,
    /// `listAuditLog` commands per flood request.
    #[arg(long, default_value_t = 100)]
    list_batch: usize,
    /// The `limit` each `listAuditLog` asks for.
    #[arg(long, default_value_t = 10_000)]
    list_limit: u64,
    /// Flood requests in flight at once.
    #[arg(long, default_value_t = 4)]
    list_in_flight: usize,
    /// How long the `listAuditLog` flood lasts.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Probing before the attack starts, for a baseline.
    #[arg(long, default_value_t = 3.0)]
    baseline_s: f64,
    /// One honest CONNECT every this many milliseconds.
    #[arg(long, default_value_t = 200)]
    probe_interval_ms: u64,
    /// Source address of the honest client.
    #[arg(long, default_value = "127.0.0.2")]
    probe_source: IpAddr,
    /// A probe that has no CONNACK after this long counts as an error.
    #[arg(long, default_value_t = 30)]
    probe_timeout_s: u64,
    /// Count the operator's own audit records at the end (pages of 500 with `after_seq`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    count_audit: bool,
}

/// What came back for one kind of command, by error code (`ok` for data).
#[derive(Default)]
struct Tally {
    by_code: BTreeMap<String, u64>,
    records: u64,
    response_bytes: u64,
    requests: u64,
    request_errors: BTreeMap<String, u64>,
}

impl Tally {
    fn add(&mut self, responses: &[Value]) {
        self.requests += 1;
        for r in responses {
            let code = match r.get("code").and_then(Value::as_str) {
                Some(code) => code.to_owned(),
                None if r.get("error").is_some() => "error".into(),
                None => "ok".into(),
            };
            if let Some(records) = r
                .get("data")
                .and_then(|d| d.get("records"))
                .and_then(Value::as_array)
            {
                self.records += records.len() as u64;
            }
            self.response_bytes += serde_json::to_vec(r).map_or(0, |v| v.len() as u64);
            *self.by_code.entry(code).or_default() += 1;
        }
    }

    fn failed(&mut self, e: &ClientError) {
        self.requests += 1;
        let key: String = e.to_string().chars().take(80).collect();
        *self.request_errors.entry(key).or_default() += 1;
    }

    fn json(&self) -> Value {
        json!({
            "requests": self.requests,
            "commands": self.by_code,
            "records_returned": self.records,
            "response_bytes": self.response_bytes,
            "request_errors": self.request_errors,
        })
    }
}

fn ms(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50) as f64 / 1000.0,
        "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
        "max": h.max() as f64 / 1000.0,
    })
}

/// One honest CONNECT: when it started (seconds into the run) and its time to CONNACK.
type Probe = (f64, Result<Duration, String>);

/// The honest client's probes so far, shared with their tasks.
type Probes = Arc<Mutex<Vec<Probe>>>;

/// VmRSS and VmHWM of `pid`, KiB.
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn cpu_s(pid: u32) -> f64 {
    fleet_bench::proc_sample(pid)
        .map_or(0.0, |(ticks, _)| ticks as f64 / fleet_bench::CLK_TCK as f64)
}

/// One honest CONNECT: TCP connect from `source`, TLS, CONNECT, CONNACK; the time to CONNACK.
async fn probe(
    n: u64,
    server: SocketAddr,
    source: IpAddr,
    connector: TlsConnector,
    name: ServerName<'static>,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(SocketAddr::new(source, 0))
        .map_err(|e| format!("bind: {e}"))?;
    let tcp = socket
        .connect(server)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    tcp.set_nodelay(true).ok();
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let honest = Serial::parse(&format!("HONEST-{n}")).map_err(|e| e.to_string())?;
    let connect =
        fleet_bench::connect_packet(&honest.client_id(), 60).map_err(|e| e.to_string())?;
    fleet_bench::connack(&mut tls, &connect).await?;
    let elapsed = t0.elapsed();
    let _ = tls.write_all(&[0xe0, 0]).await;
    let _ = tls.shutdown().await;
    Ok(elapsed)
}

/// The wait a `rate_limited` text names (`retry in N ms`), else 1 s.
fn retry_after(responses: &[Value]) -> Duration {
    responses
        .iter()
        .filter_map(|r| r.get("error").and_then(Value::as_str))
        .filter_map(|text| {
            let rest = &text[text.find("retry in ")? + 9..];
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .max()
        .map_or(Duration::from_secs(1), |ms| Duration::from_millis(ms + 5))
}

/// Runs one command, waiting out `rate_limited` answers.
async fn patient(client: &OperatorClient, command: Value) -> anyhow::Result<Value> {
    for _ in 0..100 {
        let responses = client.request(vec![command.clone()]).await?;
        let first = responses.first().cloned().unwrap_or(Value::Null);
        if first.get("code").and_then(Value::as_str) == Some("rate_limited") {
            tokio::time::sleep(retry_after(&responses)).await;
            continue;
        }
        return fleet_ctl::response_data(first).map_err(Into::into);
    }
    anyhow::bail!("still rate_limited after 100 tries")
}

/// The operator's newest audit record's `seq`.
async fn newest_seq(client: &OperatorClient) -> anyhow::Result<u64> {
    let data = patient(client, json!({"command": "listAuditLog", "limit": 1})).await?;
    Ok(data["records"]
        .as_array()
        .and_then(|r| r.last())
        .and_then(|r| r["seq"].as_u64())
        .unwrap_or(0))
}

/// How many audit records the operator's tenant has (its whole chain, pages of 500).
async fn count_audit(client: &OperatorClient) -> anyhow::Result<u64> {
    let (mut after, mut total) = (0u64, 0u64);
    loop {
        let data = patient(
            client,
            json!({"command": "listAuditLog", "limit": 500, "after_seq": after}),
        )
        .await?;
        let records = data["records"].as_array().cloned().unwrap_or_default();
        total += records.len() as u64;
        match records.last().and_then(|r| r["seq"].as_u64()) {
            Some(seq) if records.len() == 500 => after = seq,
            _ => return Ok(total),
        }
    }
}

/// One request on a connection of its own, its response read raw: a request refused as a whole
/// is answered with `"correlationData": null`, which [`OperatorClient`] cannot match.
async fn raw_request(
    server: &str,
    ca: &str,
    cert: &str,
    key: &str,
    name: &str,
    payload: String,
) -> anyhow::Result<Value> {
    use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS, TlsConfiguration, Transport};
    let (host, port) = fleet_ctl::split_server(server).context("server address")?;
    let tls = fleet_certs::client_config(ca, Some((cert, key)))?;
    let mut options = MqttOptions::new(operator_client_id(name, "oversized"), host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(16 << 20, 16 << 20)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls),
        )));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(
            Topic::OperatorResponse(name.to_owned()).to_string(),
            QoS::AtLeastOnce,
        )
        .await?;
    let mut sent = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, eventloop.poll()).await?? {
            Event::Incoming(Incoming::SubAck(_)) if !sent => {
                client
                    .publish(
                        Topic::OperatorRequest(name.to_owned()).to_string(),
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .await?;
                sent = true;
            }
            Event::Incoming(Incoming::Publish(p)) => {
                let _ = client.disconnect().await;
                return Ok(serde_json::from_slice(&p.payload)?);
            }
            _ => {}
        }
    }
}

/// Sends `requests` (each a list of commands), `in_flight` at once, until they are all sent or
/// `until` has passed; returns the tally and the round-trip times.
async fn send_all(
    client: &Arc<OperatorClient>,
    requests: impl Iterator<Item = Vec<Value>>,
    in_flight: usize,
    until: Option<Instant>,
) -> anyhow::Result<(Tally, Histogram<u64>)> {
    let sem = Arc::new(Semaphore::new(in_flight));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let rtt = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let mut tasks = Vec::new();
    for request in requests {
        if until.is_some_and(|u| Instant::now() >= u) {
            break;
        }
        let permit = sem.clone().acquire_owned().await?;
        let (client, tally, rtt) = (client.clone(), tally.clone(), rtt.clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let result = client.request(request).await;
            let us = t0.elapsed().as_micros() as u64;
            drop(permit);
            rtt.lock().unwrap().record(us.max(1)).ok();
            match result {
                Ok(responses) => tally.lock().unwrap().add(&responses),
                Err(e) => tally.lock().unwrap().failed(&e),
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let tally = std::mem::take(&mut *tally.lock().unwrap());
    let rtt = rtt.lock().unwrap().clone();
    Ok((tally, rtt))
}

/// CPU seconds fleetd and this tool have used so far.
#[derive(Clone, Copy)]
struct Cpu {
    fleetd: f64,
    tool: f64,
}

impl Cpu {
    fn now(pid: u32) -> Self {
        Cpu {
            fleetd: cpu_s(pid),
            tool: cpu_s(std::process::id()),
        }
    }
}

/// fleetd's RSS, sampled every 50 ms until `stop`: its peak and a per-second timeline.
struct RssSampler {
    peak: Arc<AtomicU64>,
    timeline: Arc<Mutex<Vec<(f64, u64)>>>,
    task: JoinHandle<()>,
}

fn sample_rss(pid: u32, stop: &Arc<AtomicBool>, t_start: Instant) -> RssSampler {
    let peak = Arc::new(AtomicU64::new(0));
    let timeline: Arc<Mutex<Vec<(f64, u64)>>> = Arc::default();
    let task = {
        let (stop, peak, timeline) = (stop.clone(), peak.clone(), timeline.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let mut next_mark = 0.0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Some((now, _)) = rss(pid) {
                    peak.fetch_max(now, Ordering::Relaxed);
                    let t = t_start.elapsed().as_secs_f64();
                    if t >= next_mark {
                        timeline
                            .lock()
                            .unwrap()
                            .push(((t * 10.0).round() / 10.0, now));
                        next_mark += 1.0;
                    }
                }
            }
        })
    };
    RssSampler {
        peak,
        timeline,
        task,
    }
}

/// The honest client: one CONNECT every interval until `stop`, each on its own task so that a
/// slow one does not delay the next (no coordinated omission). Full handshakes: no resumption.
fn spawn_prober(
    args: &Args,
    ca: &str,
    server: SocketAddr,
    stop: &Arc<AtomicBool>,
    t_start: Instant,
) -> anyhow::Result<(JoinHandle<()>, Probes)> {
    let mut probe_cfg: ClientConfig = fleet_certs::client_config(ca, None)?;
    probe_cfg.resumption = rustls::client::Resumption::disabled();
    let connector = TlsConnector::from(Arc::new(probe_cfg));
    let server_name = ServerName::from(server.ip());
    let probes: Probes = Arc::default();
    let prober = {
        let (stop, probes) = (stop.clone(), probes.clone());
        let (source, timeout) = (args.probe_source, Duration::from_secs(args.probe_timeout_s));
        let interval = Duration::from_millis(args.probe_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let (connector, name, probes) =
                    (connector.clone(), server_name.clone(), probes.clone());
                tasks.push(tokio::spawn(async move {
                    let at = t_start.elapsed().as_secs_f64();
                    let r =
                        tokio::time::timeout(timeout, probe(n, server, source, connector, name))
                            .await
                            .unwrap_or_else(|_| Err("timeout".into()));
                    probes.lock().unwrap().push((at, r));
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        })
    };
    Ok((prober, probes))
}

/// One phase of requests: the audit fill or the read flood.
struct Phase {
    /// When it began, seconds into the run.
    begin: f64,
    /// From its first request to its last answer.
    seconds: f64,
    answers: Tally,
    rtt: Histogram<u64>,
    /// CPU used by its end.
    cpu_end: Cpu,
}

impl Phase {
    /// `sent` is what [`send_all`] returned.
    fn new(begin: f64, seconds: f64, sent: (Tally, Histogram<u64>), cpu_end: Cpu) -> Self {
        let (answers, rtt) = sent;
        Phase {
            begin,
            seconds,
            answers,
            rtt,
            cpu_end,
        }
    }
}

/// 1. Fills the audit log with `--fill` cheap commands; returns the CPU used before it, and
///    the phase.
async fn fill_audit(
    args: &Args,
    client: &Arc<OperatorClient>,
    t_start: Instant,
) -> anyhow::Result<(Cpu, Phase)> {
    let begin = t_start.elapsed().as_secs_f64();
    let cpu_start = Cpu::now(args.fleetd_pid);
    let t_fill = Instant::now();
    let batch = args.fill_batch.max(1);
    let fill_command = args.fill_command.clone();
    let fill_requests = (0..args.fill.div_ceil(batch)).map(|i| {
        let n = batch.min(args.fill - i * batch);
        vec![json!({ "command": fill_command }); n]
    });
    let sent = send_all(client, fill_requests, args.fill_in_flight, None).await?;
    let seconds = t_fill.elapsed().as_secs_f64();
    let phase = Phase::new(begin, seconds, sent, Cpu::now(args.fleetd_pid));
    Ok((cpu_start, phase))
}

/// 2. One request over the command bound, as the review sent it: `--oversized` copies of
///    `list`; `null` when that is 0.
async fn oversized_request(
    args: &Args,
    ca: &str,
    cert: &str,
    key: &str,
    name: &str,
    list: &Value,
) -> Value {
    if args.oversized == 0 {
        return Value::Null;
    }
    let t0 = Instant::now();
    let payload = json!({"commands": vec![list.clone(); args.oversized]}).to_string();
    let mut answer = match raw_request(&args.server, ca, cert, key, name, payload).await {
        Ok(answer) => {
            let responses = answer["responses"].as_array().cloned().unwrap_or_default();
            let mut tally = Tally::default();
            tally.add(&responses);
            json!({
                "commands_sent": args.oversized,
                "responses": responses.len(),
                "answer": tally.by_code,
                "first": responses.first(),
            })
        }
        Err(e) => json!({"commands_sent": args.oversized, "request_error": e.to_string()}),
    };
    answer["ms"] = json!(t0.elapsed().as_secs_f64() * 1000.0);
    answer
}

/// 3. The read flood: requests of `list` for `--seconds`; returns the phase and when it ended,
///    seconds into the run.
async fn read_flood(
    args: &Args,
    client: &Arc<OperatorClient>,
    list: &Value,
    t_start: Instant,
) -> anyhow::Result<(Phase, f64)> {
    let begin = t_start.elapsed().as_secs_f64();
    let until = Instant::now() + Duration::from_secs_f64(args.seconds);
    let list_batch = args.list_batch;
    let flood_requests = std::iter::repeat_with(|| vec![list.clone(); list_batch]);
    let t_flood = Instant::now();
    let sent = send_all(client, flood_requests, args.list_in_flight, Some(until)).await?;
    let seconds = t_flood.elapsed().as_secs_f64();
    let end = t_start.elapsed().as_secs_f64();
    let phase = Phase::new(begin, seconds, sent, Cpu::now(args.fleetd_pid));
    Ok((phase, end))
}

/// The honest client's CONNACK times and errors by phase (by when each probe started), and
/// over the whole attack (fill and flood).
fn honest_connack(
    probes: &[Probe],
    fill_begin: f64,
    flood_begin: f64,
    flood_end: f64,
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut phases: Vec<(&str, Histogram<u64>, BTreeMap<String, u64>)> =
        ["baseline", "fill", "flood", "after"]
            .iter()
            .map(|p| (*p, Histogram::<u64>::new(3).unwrap(), BTreeMap::new()))
            .collect();
    let mut all = Histogram::<u64>::new(3)?;
    let mut all_errors: BTreeMap<String, u64> = BTreeMap::new();
    for (at, r) in probes {
        let i = if *at < fill_begin {
            0
        } else if *at < flood_begin {
            1
        } else if *at < flood_end {
            2
        } else {
            3
        };
        match r {
            Ok(d) => {
                let us = (d.as_micros() as u64).max(1);
                phases[i].1.record(us).ok();
                if (1..=2).contains(&i) {
                    all.record(us).ok();
                }
            }
            Err(e) => {
                let key: String = e.chars().take(80).collect();
                *phases[i].2.entry(key.clone()).or_default() += 1;
                if (1..=2).contains(&i) {
                    *all_errors.entry(key).or_default() += 1;
                }
            }
        }
    }
    let mut honest = serde_json::Map::new();
    honest.insert(
        "during_attack_ms".into(),
        json!({"latency": ms(&all), "errors": all_errors}),
    );
    for (phase, h, errors) in &phases {
        honest.insert((*phase).into(), json!({"latency": ms(h), "errors": errors}));
    }
    Ok(honest)
}

/// Everything a run measured, for its report.
struct Measured {
    operator: String,
    rss_start: (u64, u64),
    rss_peak: u64,
    rss_end: (u64, u64),
    rss_timeline: Vec<(f64, u64)>,
    cpu_start: Cpu,
    fill: Phase,
    oversized: Value,
    flood: Phase,
    seq_before: u64,
    seq_after: u64,
    audit_records: Option<u64>,
    honest: serde_json::Map<String, Value>,
}

/// The JSON report printed on stdout.
fn report(args: &Args, m: Measured) -> Value {
    json!({
        "server": args.server,
        "operator": m.operator,
        "fleetd": {
            "pid": args.fleetd_pid,
            "vm_rss_kib_start": m.rss_start.0,
            "vm_hwm_kib_start": m.rss_start.1,
            "vm_rss_kib_peak_sampled": m.rss_peak,
            "vm_hwm_kib_end": m.rss_end.1,
            "vm_rss_kib_end": m.rss_end.0,
            "cpu_s_fill": m.fill.cpu_end.fleetd - m.cpu_start.fleetd,
            "cpu_s_flood": m.flood.cpu_end.fleetd - m.fill.cpu_end.fleetd,
        },
        "tool": {
            "cpu_s_fill": m.fill.cpu_end.tool - m.cpu_start.tool,
            "cpu_s_flood": m.flood.cpu_end.tool - m.fill.cpu_end.tool,
        },
        "fleetd_rss_timeline_kib": m.rss_timeline,
        "fill": {
            "command": args.fill_command,
            "commands_sent": args.fill,
            "per_request": args.fill_batch.max(1),
            "in_flight": args.fill_in_flight,
            "seconds": m.fill.seconds,
            "answers": m.fill.answers.json(),
            "request_ms": ms(&m.fill.rtt),
        },
        "oversized_request": m.oversized,
        "flood": {
            "per_request": args.list_batch,
            "limit": args.list_limit,
            "in_flight": args.list_in_flight,
            "seconds": m.flood.seconds,
            "answers": m.flood.answers.json(),
            "request_ms": ms(&m.flood.rtt),
        },
        "audit": {
            "newest_seq_before": m.seq_before,
            "newest_seq_after": m.seq_after,
            "tenant_records_at_end": m.audit_records,
        },
        "honest_connack": m.honest,
        "probe": {
            "interval_ms": args.probe_interval_ms,
            "source": args.probe_source,
            "client": "certificate-less legacy station, full TLS handshake, MQTT 3.1.1",
        },
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = std::fs::read_to_string(&args.ca).context("CA")?;
    let cert = std::fs::read_to_string(&args.cert).context("operator certificate")?;
    let key = std::fs::read_to_string(&args.key).context("operator key")?;
    let name = fleet_ctl::operator_name(&cert)?;
    let pid = args.fleetd_pid;
    let server: SocketAddr = tokio::net::lookup_host(&args.server)
        .await?
        .next()
        .context("server address")?;

    let stop = Arc::new(AtomicBool::new(false));
    let rss_start = rss(pid).context("fleetd's /proc status")?;
    let t_start = Instant::now();
    let sampler = sample_rss(pid, &stop, t_start);
    let (prober, probes) = spawn_prober(&args, &ca, server, &stop, t_start)?;

    let client = Arc::new(
        OperatorClient::connect(&args.server, &ca, &cert, &key, &name)
            .await?
            .with_timeout(Duration::from_secs(120)),
    );
    let seq_before = newest_seq(&client).await?;
    tokio::time::sleep(Duration::from_secs_f64(args.baseline_s)).await;

    let (cpu_start, fill) = fill_audit(&args, &client, t_start).await?;
    let list = json!({"command": "listAuditLog", "limit": args.list_limit});
    let oversized = oversized_request(&args, &ca, &cert, &key, &name, &list).await;
    let (flood, flood_end) = read_flood(&args, &client, &list, t_start).await?;

    // Probing continues a little after the flood, then stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    prober.await?;
    sampler.task.await?;
    let rss_end = rss(pid).unwrap_or((0, 0));

    let seq_after = newest_seq(&client).await?;
    let audit_records = if args.count_audit {
        Some(count_audit(&client).await?)
    } else {
        None
    };

    let honest = honest_connack(&probes.lock().unwrap(), fill.begin, flood.begin, flood_end)?;
    let measured = Measured {
        operator: name,
        rss_start,
        rss_peak: sampler.peak.load(Ordering::Relaxed),
        rss_end,
        rss_timeline: sampler.timeline.lock().unwrap().clone(),
        cpu_start,
        fill,
        oversized,
        flood,
        seq_before,
        seq_after,
        audit_records,
        honest,
    };
    let report = report(&args, measured);
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
