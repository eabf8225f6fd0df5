//! fleetd's Prometheus metrics and its `/metrics` and `/healthz` endpoint.
//!
//! [`Metrics`] holds typed metric families (prometheus-client) that the front door and the
//! controller both count into: the front door its CONNECTs and TLS handshakes, the controller
//! its operator commands, store commits and batches. What is a state rather than an event
//! (sessions by kind, pending stations, locked phones, address blocks) is read at scrape time
//! from whoever knows it ([`Probe`]), not maintained on the hot paths.
//!
//! On the hot paths (a CONNECT, a handshake) counting is one atomic add: the labelled counters
//! they use are looked up once, when [`Metrics`] is made, never per event.
//!
//! The endpoint is off unless configured (`[metrics] listen`), plain HTTP, and loopback-only
//! unless the configuration says otherwise (`fleet_config::MetricsConfig`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::watch;

use crate::admission::Refusal;

/// The kinds of session `fleetd_sessions` counts.
pub const SESSION_KINDS: [&str; 4] = ["station", "phone", "operator", "other"];

/// Label of a metric counted by one reason (`reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Label of a metric counted by kind (`kind`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Labels of an operator command: its name (PROTOCOL §6) and outcome (`ok` or the error code).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabels {
    command: String,
    outcome: String,
}

/// Why a CONNECT was refused, as the label `reason` of `fleetd_connects_refused_total`: the
/// refusal's MQTT meaning, or the front door's own step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusedConnect {
    /// The admission or the front door refused it with this code.
    Refusal(Refusal),
    /// The CONNECT broke the standard (malformed, protocol error, extended authentication).
    ProtocolError,
}

impl RefusedConnect {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            RefusedConnect::Refusal(Refusal::NotAuthorized) => "not_authorized",
            RefusedConnect::Refusal(Refusal::BadUserNameOrPassword) => "bad_username_or_password",
            RefusedConnect::Refusal(Refusal::ClientIdentifierNotValid) => "client_id_not_valid",
            RefusedConnect::Refusal(Refusal::ServerUnavailable) => "server_unavailable",
            RefusedConnect::Refusal(Refusal::QuotaExceeded) => "quota_exceeded",
            RefusedConnect::ProtocolError => "protocol_error",
        }
    }

    const ALL: [RefusedConnect; 6] = [
        RefusedConnect::Refusal(Refusal::NotAuthorized),
        RefusedConnect::Refusal(Refusal::BadUserNameOrPassword),
        RefusedConnect::Refusal(Refusal::ClientIdentifierNotValid),
        RefusedConnect::Refusal(Refusal::ServerUnavailable),
        RefusedConnect::Refusal(Refusal::QuotaExceeded),
        RefusedConnect::ProtocolError,
    ];
}

/// The gauges read at scrape time ([`Probe::read`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readings {
    /// Live sessions by kind, in the order of [`SESSION_KINDS`].
    pub sessions: [i64; 4],
    pub pending_stations: i64,
    pub locked_phones: i64,
    pub address_blocks: i64,
    /// 1 while this fleetd has a controller that answers its admissions: always in the single
    /// process and on a controller; on an edge of a cluster, while a controller's beat was
    /// heard within the last 3 s (without one, new devices are refused as server unavailable).
    pub controller_heard: i64,
}

/// What the controller tells a scrape and a health check.
pub trait Probe: Send + Sync + 'static {
    /// The gauges of a scrape: called on the blocking pool before the answer is encoded, so
    /// that it may take the controller's lock briefly; it must not hold it beyond its return.
    fn read(&self) -> Readings;

    /// What is not alive on the probe's side (e.g. `store writer`); empty when all is. Cheap:
    /// `/healthz` asks it, and computes no gauge.
    fn dead(&self) -> Vec<&'static str>;
}

/// Every metric of fleetd, and the liveness of the front door's parts.
pub struct Metrics {
    registry: Registry,
    connects_admitted: Counter,
    refused: [Counter; 6],
    handshakes_full: Counter,
    handshakes_resumed: Counter,
    commands: Family<CommandLabels, Counter>,
    commit_seconds: Histogram,
    batch_size: Histogram,
    sessions: Family<KindLabel, Gauge>,
    pending_stations: Gauge,
    locked_phones: Gauge,
    address_blocks: Gauge,
    controller_heard: Gauge,
    /// The accept loop runs.
    accepting: AtomicBool,
    /// Whether the router's thread still takes messages.
    router_alive: OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family registered under the prefix `fleetd`, with its help text.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("fleetd");
        let connects_admitted = Counter::default();
        registry.register(
            "connects_admitted",
            "CONNECTs admitted (a success CONNACK written)",
            connects_admitted.clone(),
        );
        let refused_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "connects_refused",
            "CONNECTs refused, by reason",
            refused_family.clone(),
        );
        let refused = RefusedConnect::ALL
            .map(|r| refused_family.get_or_create_owned(&ReasonLabel { reason: r.label() }));
        let handshakes = Family::<KindLabel, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes completed, full or resumed",
            handshakes.clone(),
        );
        let handshakes_full = handshakes.get_or_create_owned(&KindLabel { kind: "full" });
        let handshakes_resumed = handshakes.get_or_create_owned(&KindLabel { kind: "resumed" });
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register(
            "operator_commands",
            "Operator commands answered, by command and outcome (ok or the error code)",
            commands.clone(),
        );
        // 0.5 ms to about 16 s: an fsync is milliseconds, a stalled disk seconds.
        let commit_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register_with_unit(
            "store_commit",
            "Time of a store commit (write transaction and fsync)",
            Unit::Seconds,
            commit_seconds.clone(),
        );
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "batch_size",
            "Inbox messages handled in one controller batch (one transaction)",
            batch_size.clone(),
        );
        let sessions = Family::<KindLabel, Gauge>::default();
        registry.register(
            "sessions",
            "Live sessions, by kind (station, phone, operator, other)",
            sessions.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let pending_stations = gauge(
            &mut registry,
            "pending_stations",
            "Stations waiting for approval",
        );
        let locked_phones = gauge(
            &mut registry,
            "locked_phones",
            "Phones locked out (authentication failed or blocked)",
        );
        let address_blocks = gauge(
            &mut registry,
            "address_blocks",
            "Source addresses blocked now for failed authentications",
        );
        let controller_heard = gauge(
            &mut registry,
            "controller_heard",
            "1 while a controller answers this fleetd's admissions; 0 on an edge of a cluster \
             that has heard no controller for 3 s (it refuses new devices as server unavailable)",
        );
        Metrics {
            registry,
            connects_admitted,
            refused,
            handshakes_full,
            handshakes_resumed,
            commands,
            commit_seconds,
            batch_size,
            sessions,
            pending_stations,
            locked_phones,
            address_blocks,
            controller_heard,
            accepting: AtomicBool::new(false),
            router_alive: OnceLock::new(),
        }
    }

    /// A CONNECT was admitted and its CONNACK written.
    pub fn connect_admitted(&self) {
        self.connects_admitted.inc();
    }

    /// A CONNECT was refused.
    pub fn connect_refused(&self, why: RefusedConnect) {
        if let Some(i) = RefusedConnect::ALL.iter().position(|r| *r == why) {
            if let Some(counter) = self.refused.get(i) {
                counter.inc();
            }
        }
    }

    /// A TLS handshake completed; `resumed`: on a resumed session.
    pub fn handshake(&self, resumed: bool) {
        if resumed {
            self.handshakes_resumed.inc();
        } else {
            self.handshakes_full.inc();
        }
    }

    /// An operator command was answered with `outcome` (`ok` or its error code).
    pub fn operator_command(&self, command: &str, outcome: &str) {
        self.commands
            .get_or_create(&CommandLabels {
                command: command.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// A store commit took `took`.
    pub fn store_commit(&self, took: Duration) {
        self.commit_seconds.observe(took.as_secs_f64());
    }

    /// A controller batch handled `messages` inbox messages.
    pub fn batch(&self, messages: usize) {
        self.batch_size.observe(messages as f64);
    }

    /// Marks the accept loop as running until the returned guard is dropped.
    pub(crate) fn accepting(self: &Arc<Self>) -> AcceptingGuard {
        self.accepting.store(true, Ordering::Relaxed);
        AcceptingGuard(self.clone())
    }

    /// How to tell whether the router still runs (set once, by the front door).
    pub(crate) fn set_router_probe(&self, alive: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.router_alive.set(Box::new(alive));
    }

    /// The front door's parts that are not alive: the listener, the router.
    pub fn dead_parts(&self) -> Vec<&'static str> {
        let mut dead = Vec::new();
        if !self.accepting.load(Ordering::Relaxed) {
            dead.push("listener");
        }
        if !self.router_alive.get().is_some_and(|alive| alive()) {
            dead.push("router");
        }
        dead
    }

    /// The text exposition (OpenMetrics) of every metric, with the gauges set from `readings`.
    pub fn encode(&self, readings: &Readings) -> String {
        for (kind, n) in SESSION_KINDS.iter().zip(readings.sessions) {
            self.sessions.get_or_create(&KindLabel { kind }).set(n);
        }
        self.pending_stations.set(readings.pending_stations);
        self.locked_phones.set(readings.locked_phones);
        self.address_blocks.set(readings.address_blocks);
        self.controller_heard.set(readings.controller_heard);
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Clears [`Metrics::accepting`] when the accept loop ends, however it ends.
pub(crate) struct AcceptingGuard(Arc<Metrics>);

impl Drop for AcceptingGuard {
    fn drop(&mut self) {
        self.0.accepting.store(false, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Endpoint {
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
}

impl Endpoint {
    /// The probe's readings, on the blocking pool (it may wait for the controller's lock).
    async fn readings(&self) -> Readings {
        let probe = self.probe.clone();
        tokio::task::spawn_blocking(move || probe.read())
            .await
            .unwrap_or_default()
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` turns true. The answers are
/// built whole before anything is written: no lock is held while a scraper reads.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    probe: Arc<dyn Probe>,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(health))
        .with_state(Endpoint { metrics, probe });
    let stopped = async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stopped)
        .await
    {
        tracing::warn!("the metrics endpoint stopped: {e}");
    }
}

/// Binds the metrics endpoint's listener (`[metrics] listen`).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

async fn scrape(State(endpoint): State<Endpoint>) -> Response {
    let readings = endpoint.readings().await;
    let text = endpoint.metrics.encode(&readings);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// 200 `ok` while the listener, the router and the probe's parts (the store writer) are alive;
/// else 503 naming what is not.
async fn health(State(endpoint): State<Endpoint>) -> Response {
    let mut dead = endpoint.metrics.dead_parts();
    dead.extend(endpoint.probe.dead());
    if dead.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        let text = format!("not alive: {}\n", dead.join(", "));
        (StatusCode::SERVICE_UNAVAILABLE, text).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line<'a>(text: &'a str, start: &str) -> Option<&'a str> {
        text.lines().find(|l| l.starts_with(start))
    }

    #[test]
    fn counters_and_readings_appear_under_their_names() {
        let metrics = Metrics::new();
        metrics.connect_admitted();
        metrics.connect_refused(RefusedConnect::Refusal(Refusal::NotAuthorized));
        metrics.connect_refused(RefusedConnect::Refusal(Refusal::NotAuthorized));
        metrics.handshake(true);
        metrics.operator_command("acceptStation", "ok");
        metrics.store_commit(Duration::from_millis(3));
        metrics.batch(7);
        let readings = Readings {
            sessions: [2, 1, 1, 0],
            pending_stations: 5,
            locked_phones: 1,
            address_blocks: 0,
            controller_heard: 1,
        };
        let text = metrics.encode(&readings);
        assert_eq!(
            line(&text, "fleetd_connects_admitted_total "),
            Some("fleetd_connects_admitted_total 1")
        );
        assert_eq!(
            line(
                &text,
                "fleetd_connects_refused_total{reason=\"not_authorized\"}"
            ),
            Some("fleetd_connects_refused_total{reason=\"not_authorized\"} 2")
        );
        assert!(line(
            &text,
            "fleetd_connects_refused_total{reason=\"quota_exceeded\"} 0"
        )
        .is_some());
        assert!(line(&text, "fleetd_tls_handshakes_total{kind=\"resumed\"} 1").is_some());
        assert!(line(&text, "fleetd_tls_handshakes_total{kind=\"full\"} 0").is_some());
        assert!(line(
            &text,
            "fleetd_operator_commands_total{command=\"acceptStation\",outcome=\"ok\"} 1"
        )
        .is_some());
        assert!(line(&text, "fleetd_store_commit_seconds_count 1").is_some());
        assert!(line(&text, "fleetd_batch_size_sum 7.0").is_some(), "{text}");
        assert!(line(&text, "fleetd_sessions{kind=\"station\"} 2").is_some());
        assert!(line(&text, "fleetd_pending_stations 5").is_some());
        assert!(line(&text, "fleetd_locked_phones 1").is_some());
        assert!(line(&text, "fleetd_address_blocks 0").is_some());
        assert!(line(&text, "fleetd_controller_heard 1").is_some());
    }

    #[test]
    fn the_listener_and_the_router_are_dead_until_they_say_otherwise() {
        let metrics = Arc::new(Metrics::new());
        assert_eq!(metrics.dead_parts(), ["listener", "router"]);
        let alive = Arc::new(AtomicBool::new(true));
        metrics.set_router_probe({
            let alive = alive.clone();
            move || alive.load(Ordering::Relaxed)
        });
        let accepting = metrics.accepting();
        assert!(metrics.dead_parts().is_empty());
        alive.store(false, Ordering::Relaxed);
        assert_eq!(metrics.dead_parts(), ["router"]);
        drop(accepting);
        assert_eq!(metrics.dead_parts(), ["listener", "router"]);
    }

    /// A probe whose store writer is alive while `writer` is true, and that counts its reads.
    struct FakeProbe {
        writer: AtomicBool,
        reads: std::sync::atomic::AtomicUsize,
    }

    impl Probe for FakeProbe {
        fn read(&self) -> Readings {
            self.reads.fetch_add(1, Ordering::Relaxed);
            Readings::default()
        }

        fn dead(&self) -> Vec<&'static str> {
            match self.writer.load(Ordering::Relaxed) {
                true => Vec::new(),
                false => vec!["store writer"],
            }
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("request");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("answer");
        let status = answer
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn healthz_is_503_naming_what_is_dead_and_computes_no_gauge() {
        let metrics = Arc::new(Metrics::new());
        metrics.set_router_probe(|| true);
        let accepting = metrics.accepting();
        let probe = Arc::new(FakeProbe {
            writer: AtomicBool::new(true),
            reads: Default::default(),
        });
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, metrics.clone(), probe.clone(), stopped));

        assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
        probe.writer.store(false, Ordering::Relaxed);
        assert_eq!(
            get(addr, "/healthz").await,
            (503, "not alive: store writer\n".to_owned())
        );
        drop(accepting);
        assert_eq!(
            get(addr, "/healthz").await,
            (503, "not alive: listener, store writer\n".to_owned())
        );
        assert_eq!(
            probe.reads.load(Ordering::Relaxed),
            0,
            "no gauge for a health check"
        );
        assert_eq!(get(addr, "/metrics").await.0, 200);
        assert_eq!(probe.reads.load(Ordering::Relaxed), 1);
        let _ = stop.send(true);
        server.await.expect("the endpoint stops");
    }
}
