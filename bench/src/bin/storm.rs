//! Connect storm: N mTLS clients, C at a time, each with its own certificate (made before the
//! clock starts), MQTT 3.1.1 CONNECT + CONNACK (or the TLS handshake only), connections held
//! open until every client has finished so the server's RSS per connection can be read.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
use fleet_protocol::Serial;
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};
use tokio_rustls::TlsConnector;

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum Mode {
    Mqtt,
    TlsOnly,
}

#[derive(Parser)]
struct Args {
    /// Server address HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8883")]
    addr: String,
    /// TLS server name the server certificate is verified against.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// PEM file of the CA(s) trusted for the server certificate.
    #[arg(long)]
    server_ca: std::path::PathBuf,
    /// Issue client certificates from this CA (PEM cert + key); otherwise self-signed stations.
    #[arg(long, requires = "issuer_key")]
    issuer_cert: Option<std::path::PathBuf>,
    #[arg(long)]
    issuer_key: Option<std::path::PathBuf>,
    /// Number of clients.
    #[arg(short = 'n', long, default_value_t = 2000)]
    clients: usize,
    /// Clients connecting at once.
    #[arg(short = 'c', long, default_value_t = 50)]
    concurrency: usize,
    #[arg(long, value_enum, default_value = "mqtt")]
    mode: Mode,
    /// Server process to read CPU time and RSS of.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Prefix of serials; each client connects as its station (`Serial::client_id`).
    #[arg(long, default_value = "BENCH")]
    serial_prefix: String,
    /// Seconds to wait before reading RSS after the last connect.
    #[arg(long, default_value_t = 1.0)]
    settle_s: f64,
    /// Per-client timeout in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    /// Then close every connection (MQTT DISCONNECT, TLS close_notify) and connect them all
    /// again with the same client configurations: a reconnect storm that resumes TLS sessions
    /// where the server allows it. Reported under "reconnect".
    #[arg(long)]
    reconnect: bool,
}

/// One storm's outcome.
struct Round {
    held: Vec<Conn>,
    seconds: f64,
    hist: Histogram<u64>,
    errors: std::collections::BTreeMap<String, u64>,
    resumed: usize,
}

/// Connects every client, `concurrency` at once, and keeps the connections.
async fn round(
    clients: &[(Serial, Arc<ClientConfig>)],
    args: &Args,
    name: &ServerName<'static>,
) -> anyhow::Result<Round> {
    let sem = Arc::new(Semaphore::new(args.concurrency));
    let held: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::with_capacity(clients.len())));
    let hist = Arc::new(std::sync::Mutex::new(Histogram::<u64>::new(3)?));
    let errors: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>> = Default::default();
    let addr: Arc<str> = args.addr.clone().into();
    let timeout = Duration::from_secs(args.timeout_s);
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(clients.len());
    for (serial, cfg) in clients {
        let permit = sem.clone().acquire_owned().await?;
        let (held, hist, errors, addr, name, cfg) = (
            held.clone(),
            hist.clone(),
            errors.clone(),
            addr.clone(),
            name.clone(),
            cfg.clone(),
        );
        let pkt = match args.mode {
            Mode::Mqtt => Some(fleet_bench::connect_packet(&serial.client_id(), 600)?),
            Mode::TlsOnly => None,
        };
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let r = tokio::time::timeout(timeout, one(cfg, &addr, name, pkt)).await;
            let us = t0.elapsed().as_micros() as u64;
            drop(permit);
            match r {
                Ok(Ok(conn)) => {
                    hist.lock().unwrap().record(us.max(1)).ok();
                    held.lock().await.push(conn);
                }
                Ok(Err(e)) => {
                    let key: String = e.chars().take(80).collect();
                    *errors.lock().unwrap().entry(key).or_default() += 1;
                }
                Err(_) => *errors.lock().unwrap().entry("timeout".into()).or_default() += 1,
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let held = std::mem::take(&mut *held.lock().await);
    let resumed = held
        .iter()
        .filter(|c| c.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed))
        .count();
    let hist = hist.lock().unwrap().clone();
    let errors = errors.lock().unwrap().clone();
    Ok(Round {
        held,
        seconds,
        hist,
        errors,
        resumed,
    })
}

fn latency(h: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "p50": h.value_at_quantile(0.50) as f64 / 1000.0,
        "p99": h.value_at_quantile(0.99) as f64 / 1000.0,
        "max": h.max() as f64 / 1000.0,
    })
}

type Conn = tokio_rustls::client::TlsStream<TcpStream>;

async fn one(
    cfg: Arc<ClientConfig>,
    addr: &str,
    name: ServerName<'static>,
    connect: Option<Vec<u8>>,
) -> Result<Conn, String> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("tcp: {e}"))?;
    tcp.set_nodelay(true).ok();
    let mut tls = TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    if let Some(pkt) = connect {
        fleet_bench::connack(&mut tls, &pkt).await?;
    }
    Ok(tls)
}

/// Every client's serial and TLS configuration with its own certificate, made before the clock
/// starts: issued by `issuer`, or self-signed stations without one.
fn make_clients(
    args: &Args,
    server_ca: &str,
    issuer: Option<&fleet_certs::FleetCa>,
) -> anyhow::Result<Vec<(Serial, Arc<ClientConfig>)>> {
    let t_gen = Instant::now();
    let mut clients = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        let serial = Serial::parse(&format!("{}{:06}", args.serial_prefix, i))?;
        let (cert, key) = match issuer {
            Some(ca) => {
                let (key, csr) = fleet_certs::phone_key_and_csr(serial.as_str())?;
                let cert = ca.issue_client_from_csr(&csr, serial.as_str(), "station", "bench")?;
                (cert.cert_pem, key)
            }
            None => {
                let c = fleet_certs::self_signed_station(serial.as_str())?;
                (c.cert_pem, c.key_pem)
            }
        };
        let cfg = fleet_certs::client_config(server_ca, Some((&cert, &key)))?;
        clients.push((serial, Arc::new(cfg)));
    }
    eprintln!(
        "made {} client certificates in {:?}",
        args.clients,
        t_gen.elapsed()
    );
    Ok(clients)
}

/// The reconnect storm: every held connection leaves cleanly, then all clients come back at
/// once; returns its report and the new connections.
async fn reconnect(
    mut held: Vec<Conn>,
    clients: &[(Serial, Arc<ClientConfig>)],
    args: &Args,
    name: &ServerName<'static>,
) -> anyhow::Result<(serde_json::Value, Vec<Conn>)> {
    for mut conn in held.drain(..) {
        if args.mode == Mode::Mqtt {
            let _ = conn.write_all(&[0xe0, 0]).await;
        }
        let _ = conn.shutdown().await;
    }
    tokio::time::sleep(Duration::from_secs_f64(args.settle_s)).await;
    let cpu0 = args.server_pid.map(fleet_bench::proc_sample).transpose()?;
    let again = round(clients, args, name).await?;
    let cpu1 = args.server_pid.map(fleet_bench::proc_sample).transpose()?;
    let ok = again.held.len();
    let mut reconnect = serde_json::json!({
        "connected": ok,
        "resumed": again.resumed,
        "seconds": again.seconds,
        "connections_per_s": ok as f64 / again.seconds,
        "connect_ms": latency(&again.hist),
        "errors_total": again.errors.values().sum::<u64>(),
        "errors": again.errors,
    });
    if let (Some((c0, _)), Some((c1, _))) = (cpu0, cpu1) {
        let cpu_ms = (c1 - c0) as f64 * 1000.0 / fleet_bench::CLK_TCK as f64;
        reconnect["cpu_ms_per_conn"] = serde_json::json!(cpu_ms / ok.max(1) as f64);
    }
    Ok((reconnect, again.held))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let server_ca = std::fs::read_to_string(&args.server_ca).context("server CA")?;
    let issuer = match (&args.issuer_cert, &args.issuer_key) {
        (Some(c), Some(k)) => Some(fleet_certs::FleetCa::from_pem(
            &std::fs::read_to_string(c)?,
            &std::fs::read_to_string(k)?,
        )?),
        _ => None,
    };
    let clients = make_clients(&args, &server_ca, issuer.as_ref())?;

    let name = ServerName::try_from(args.server_name.clone())?;
    let before = args.server_pid.map(fleet_bench::proc_sample).transpose()?;
    let first = round(&clients, &args, &name).await?;
    let secs = first.seconds;
    let cpu_after = args.server_pid.map(fleet_bench::proc_sample).transpose()?;
    tokio::time::sleep(Duration::from_secs_f64(args.settle_s)).await;
    let rss_after = args.server_pid.map(fleet_bench::proc_sample).transpose()?;

    let ok = first.held.len();
    let n_err: u64 = first.errors.values().sum();
    let mut report = serde_json::json!({
        "mode": if args.mode == Mode::Mqtt { "mqtt" } else { "tls-only" },
        "addr": args.addr,
        "clients": args.clients,
        "concurrency": args.concurrency,
        "connected": ok,
        "seconds": secs,
        "connections_per_s": ok as f64 / secs,
        "connect_ms": latency(&first.hist),
        "errors_total": n_err,
        "errors": first.errors,
    });
    if let (Some((cpu0, rss0)), Some((cpu1, _)), Some((_, rss1))) = (before, cpu_after, rss_after) {
        let n = ok.max(1) as f64;
        let cpu_ms = (cpu1 - cpu0) as f64 * 1000.0 / fleet_bench::CLK_TCK as f64;
        report["server"] = serde_json::json!({
            "pid": args.server_pid,
            "cpu_ms": cpu_ms,
            "cpu_ms_per_conn": cpu_ms / n,
            "rss_kib_before": rss0,
            "rss_kib_after": rss1,
            "rss_kib_per_conn": (rss1 as f64 - rss0 as f64) / n,
        });
    }
    let mut held = first.held;
    if args.reconnect {
        let (reconnect, again) = reconnect(held, &clients, &args, &name).await?;
        report["reconnect"] = reconnect;
        held = again;
    }
    println!("{}", serde_json::to_string(&report)?);
    drop(held);
    Ok(())
}
