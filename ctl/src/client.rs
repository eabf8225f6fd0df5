//! The operator client: MQTT over mutual TLS to fleetd, operator commands on
//! `fleet/control/<name>/request`, answers matched by `correlationData`, and events.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fleet_protocol::envelope::{request_json, COMMAND, CORRELATION_DATA, RESPONSES};
use fleet_protocol::{CommandError, Filter, OperatorCommand, Topic};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, Incoming, MqttOptions, Outgoing, QoS,
    SubscribeReasonCode, TlsConfiguration, Transport,
};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How long a request waits for its responses unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting (TLS, CONNACK, SUBACK) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before the client connects again after losing the connection.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);

/// What went wrong talking to fleetd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Certificates or keys could not be used.
    #[error("certificates: {0}")]
    Certificate(#[from] fleet_certs::CertError),
    /// The server address is not `HOST:PORT`.
    #[error("server address {0:?} is not HOST:PORT")]
    Address(String),
    /// The operator name could not be found in the certificate.
    #[error("operator name: {0}")]
    Name(String),
    /// The broker refused the CONNECT (e.g. `NotAuthorized`).
    #[error("connection refused: {0}")]
    Refused(String),
    /// The connection could not be made or was lost.
    #[error("connection: {0}")]
    Connection(String),
    /// The broker denied a subscription.
    #[error("subscription to {0} denied")]
    SubscribeDenied(String),
    /// No complete answer in time.
    #[error("no response within {0:?}")]
    Timeout(Duration),
    /// The client's task has ended.
    #[error("client closed")]
    Closed,
    /// A command's arguments are not a JSON object, or a response is malformed.
    #[error("malformed: {0}")]
    Malformed(String),
    /// The controller answered the command with an error.
    #[error("{code}: {error}")]
    CommandFailed {
        /// Machine code: `not_found`, `invalid_argument`, `wrong_state`, ….
        code: String,
        /// Human-readable text.
        error: String,
    },
}

impl From<CommandError> for ClientError {
    /// A command refused before it was sent, by the rules the controller applies to it: reported
    /// as the controller reports it.
    fn from(e: CommandError) -> ClientError {
        ClientError::CommandFailed {
            code: e.code.as_str().to_owned(),
            error: e.message,
        }
    }
}

type Waiters = HashMap<String, oneshot::Sender<Value>>;

#[derive(Default)]
struct Routes {
    /// Responses awaited, by correlationData.
    responses: Waiters,
    /// Subscriptions sent, not yet given a packet id, in order.
    unsent_subscriptions: VecDeque<(String, oneshot::Sender<bool>)>,
    /// Subscriptions waiting for their SUBACK, by packet id.
    suback: HashMap<u16, (String, oneshot::Sender<bool>)>,
    /// Event listeners: (topic prefix, channel).
    events: Vec<(String, mpsc::UnboundedSender<(String, Value)>)>,
    /// Everything subscribed, to subscribe again after a reconnect.
    filters: Vec<String>,
}

struct Shared {
    routes: Mutex<Routes>,
}

impl Shared {
    fn routes(&self) -> MutexGuard<'_, Routes> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way
        // that matters: every entry stands alone.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connected operator.
pub struct OperatorClient {
    client: AsyncClient,
    name: String,
    client_id: String,
    next: AtomicU64,
    timeout: Duration,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for OperatorClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorClient")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

impl Drop for OperatorClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub use fleet_certs::split_server;

/// The operator name: the CN of the operator certificate.
pub fn operator_name(cert_pem: &str) -> Result<String, ClientError> {
    fleet_certs::inspect_pem(cert_pem)?
        .common_name
        .ok_or_else(|| ClientError::Name("the certificate has no common name".into()))
}

/// A few random hex digits, unique enough to tell apart clients of the same operator.
fn random_tag() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

impl OperatorClient {
    /// Connects as operator `operator_name` (the CN of `cert_pem`) and subscribes to its
    /// response topic; returns once the SUBACK arrived.
    pub async fn connect(
        server: &str,
        ca_pem: &str,
        cert_pem: &str,
        key_pem: &str,
        operator_name: &str,
    ) -> Result<OperatorClient, ClientError> {
        let (host, port) =
            split_server(server).ok_or_else(|| ClientError::Address(server.to_owned()))?;
        let tls = fleet_certs::client_config(ca_pem, Some((cert_pem, key_pem)))?;
        let client_id = fleet_protocol::operator_client_id(operator_name, &random_tag());
        let mut options = MqttOptions::new(client_id.clone(), host, port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(16 * 1024 * 1024, 16 * 1024 * 1024)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls),
            )));
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        // Without TCP_NODELAY (rumqttc's default is off), the last segment of a request larger
        // than one segment (an envelope of 100 accepts is about 20 KB) waits for the ACK of
        // the one before, which the server's delayed ACK holds back for up to 40 ms.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);

        // The first CONNACK (or refusal) decides whether connect succeeds.
        let connack = tokio::time::timeout(CONNECT_TIMEOUT, eventloop.poll()).await;
        match connack {
            Err(_) => return Err(ClientError::Timeout(CONNECT_TIMEOUT)),
            Ok(Err(ConnectionError::ConnectionRefused(code))) => {
                return Err(ClientError::Refused(format!("{code:?}")))
            }
            Ok(Err(e)) => return Err(ClientError::Connection(e.to_string())),
            Ok(Ok(Event::Incoming(Incoming::ConnAck(_)))) => {}
            Ok(Ok(other)) => {
                return Err(ClientError::Connection(format!(
                    "expected CONNACK, got {other:?}"
                )))
            }
        }
        let shared = Arc::new(Shared {
            routes: Mutex::new(Routes::default()),
        });
        let task = tokio::spawn(drive(eventloop, client.clone(), Arc::clone(&shared)));
        let operator = OperatorClient {
            client,
            name: operator_name.to_owned(),
            client_id,
            next: AtomicU64::new(1),
            timeout: DEFAULT_TIMEOUT,
            shared,
            task,
        };
        let response_topic = Topic::OperatorResponse(operator_name.to_owned()).to_string();
        tokio::time::timeout(CONNECT_TIMEOUT, operator.subscribe(&response_topic))
            .await
            .map_err(|_| ClientError::Timeout(CONNECT_TIMEOUT))??;
        Ok(operator)
    }

    /// Waits `timeout` for the responses of each request from now on.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The operator's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    async fn subscribe(&self, filter: &str) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut routes = self.shared.routes();
            // Queued before the request so that the packet id is matched to it in order.
            routes
                .unsent_subscriptions
                .push_back((filter.to_owned(), tx));
            if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce) {
                routes.unsent_subscriptions.pop_back();
                return Err(ClientError::Connection(e.to_string()));
            }
        }
        match rx.await {
            Ok(true) => {
                self.shared.routes().filters.push(filter.to_owned());
                Ok(())
            }
            Ok(false) => Err(ClientError::SubscribeDenied(filter.to_owned())),
            Err(_) => Err(ClientError::Closed),
        }
    }

    /// Subscribes to `fleet/events/<tenant>/#`; every event arrives as (topic, JSON payload).
    pub async fn subscribe_events(
        &self,
        tenant: &str,
    ) -> Result<mpsc::UnboundedReceiver<(String, Value)>, ClientError> {
        let prefix = Filter::events_prefix(tenant);
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.routes().events.push((prefix, tx));
        self.subscribe(&Filter::Events(tenant.to_owned()).to_string())
            .await?;
        Ok(rx)
    }

    /// Subscribes to `fleet/events/<tenant>/<kind>` of each of `kinds` only (a tool that needs
    /// no audit records spares fleetd and itself one event per decision); they arrive as
    /// (topic, JSON payload) on one receiver.
    pub async fn subscribe_event_kinds(
        &self,
        tenant: &str,
        kinds: &[fleet_protocol::EventKind],
    ) -> Result<mpsc::UnboundedReceiver<(String, Value)>, ClientError> {
        let prefix = Filter::events_prefix(tenant);
        let (tx, rx) = mpsc::unbounded_channel();
        self.shared.routes().events.push((prefix, tx));
        for kind in kinds {
            let topic = Topic::Event(tenant.to_owned(), *kind);
            self.subscribe(&topic.to_string()).await?;
        }
        Ok(rx)
    }

    /// Sends `commands` (each a JSON object with `command` and its arguments) in one request
    /// and returns their responses in the same order: each `{"command", "correlationData",
    /// "data"}` or `{…, "error", "code"}`.
    pub async fn request(&self, commands: Vec<Value>) -> Result<Vec<Value>, ClientError> {
        let mut waiting = Vec::with_capacity(commands.len());
        let mut sent = Vec::with_capacity(commands.len());
        let mut keys = Vec::with_capacity(commands.len());
        for command in commands {
            let Value::Object(mut fields) = command else {
                return Err(ClientError::Malformed(
                    "a command must be a JSON object".into(),
                ));
            };
            // Unique across clients of the same operator, which share the response topic.
            let key = format!(
                "{}-{}",
                self.client_id,
                self.next.fetch_add(1, Ordering::Relaxed)
            );
            fields.insert(CORRELATION_DATA.into(), Value::String(key.clone()));
            let (tx, rx) = oneshot::channel();
            keys.push(key);
            waiting.push(rx);
            sent.push(Value::Object(fields));
            self.shared
                .routes()
                .responses
                .insert(keys[keys.len() - 1].clone(), tx);
        }
        let payload = request_json(sent).to_string();
        let topic = Topic::OperatorRequest(self.name.clone()).to_string();
        let outcome = async {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .map_err(|e| ClientError::Connection(e.to_string()))?;
            let mut responses = Vec::with_capacity(waiting.len());
            for rx in waiting {
                responses.push(rx.await.map_err(|_| ClientError::Closed)?);
            }
            Ok(responses)
        };
        let result = match tokio::time::timeout(self.timeout, outcome).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout(self.timeout)),
        };
        if result.is_err() {
            let mut routes = self.shared.routes();
            for key in &keys {
                routes.responses.remove(key);
            }
        }
        result
    }

    /// Runs `command` and returns its `data`, or [`ClientError::CommandFailed`] with the
    /// controller's code and text.
    pub async fn run(&self, command: &OperatorCommand) -> Result<Value, ClientError> {
        self.exchange(command.to_json()).await
    }

    /// Runs the command named `command` with `args` (a JSON object, or null for none), as they
    /// are: for commands only known at run time (`fleetctl call`) and for tests that send what
    /// no [`OperatorCommand`] can hold.
    pub async fn call(&self, command: &str, args: Value) -> Result<Value, ClientError> {
        let mut fields = match args {
            Value::Object(fields) => fields,
            Value::Null => Map::new(),
            _ => {
                return Err(ClientError::Malformed(
                    "arguments must be a JSON object".into(),
                ))
            }
        };
        fields.insert(COMMAND.into(), Value::String(command.to_owned()));
        self.exchange(Value::Object(fields)).await
    }

    /// Sends one command entry and returns its data.
    async fn exchange(&self, entry: Value) -> Result<Value, ClientError> {
        let mut responses = self.request(vec![entry]).await?;
        let response = responses
            .pop()
            .ok_or_else(|| ClientError::Malformed("no response".into()))?;
        response_data(response)
    }
}

/// The `data` of a response, or its error.
pub fn response_data(response: Value) -> Result<Value, ClientError> {
    if let Some(error) = response.get("error") {
        return Err(ClientError::CommandFailed {
            code: response
                .get("code")
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned(),
            error: error
                .as_str()
                .map_or_else(|| error.to_string(), str::to_owned),
        });
    }
    match response {
        Value::Object(mut fields) => Ok(fields.remove("data").unwrap_or(Value::Null)),
        other => Err(ClientError::Malformed(format!("response {other}"))),
    }
}

/// Routes what the broker sends; reconnects (and subscribes again) when the link drops.
async fn drive(mut eventloop: EventLoop, client: AsyncClient, shared: Arc<Shared>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::Publish(publish))) => {
                route(&shared, &publish.topic, &publish.payload);
            }
            Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => {
                let mut routes = shared.routes();
                if let Some(waiter) = routes.unsent_subscriptions.pop_front() {
                    routes.suback.insert(pkid, waiter);
                }
            }
            Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                let waiter = shared.routes().suback.remove(&ack.pkid);
                let granted = !ack.return_codes.contains(&SubscribeReasonCode::Failure);
                if let Some((filter, tx)) = waiter {
                    if !granted {
                        tracing::warn!("subscription to {filter} denied");
                    }
                    let _ = tx.send(granted);
                }
            }
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                // A new session after a reconnect: subscribe again.
                let filters = shared.routes().filters.clone();
                for filter in filters {
                    let (tx, _rx) = oneshot::channel();
                    let mut routes = shared.routes();
                    routes.unsent_subscriptions.push_back((filter.clone(), tx));
                    if client.try_subscribe(filter, QoS::AtLeastOnce).is_err() {
                        routes.unsent_subscriptions.pop_back();
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("connection to fleetd lost: {e}");
                // Messages read in the same batch as the close are still queued: route them.
                let buffered: Vec<Event> = eventloop.state.events.drain(..).collect();
                for event in buffered {
                    if let Event::Incoming(Incoming::Publish(publish)) = event {
                        route(&shared, &publish.topic, &publish.payload);
                    }
                }
                {
                    // Requests in flight will not be answered on a new session.
                    let mut routes = shared.routes();
                    routes.responses.clear();
                    routes.suback.clear();
                }
                tokio::time::sleep(RECONNECT_PAUSE).await;
            }
        }
    }
}

fn route(shared: &Shared, topic: &str, payload: &[u8]) {
    let value: Value = match serde_json::from_slice(payload) {
        Ok(value) => value,
        Err(e) => {
            tracing::warn!("ignoring non-JSON message on {topic}: {e}");
            return;
        }
    };
    let mut routes = shared.routes();
    if let Some(Topic::OperatorResponse(_)) = Topic::parse(topic) {
        let responses = value
            .get(RESPONSES)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for response in responses {
            let key = match response.get(CORRELATION_DATA) {
                Some(Value::String(key)) => key.clone(),
                Some(other) => other.to_string(),
                None => continue,
            };
            if let Some(tx) = routes.responses.remove(&key) {
                let _ = tx.send(response);
            }
        }
        return;
    }
    routes.events.retain(|(prefix, tx)| {
        if topic.starts_with(prefix.as_str()) {
            tx.send((topic.to_owned(), value.clone())).is_ok()
        } else {
            !tx.is_closed()
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::EventKind;
    use serde_json::json;

    #[test]
    fn response_data_and_errors() {
        let ok = json!({"command": "getStation", "correlationData": "x", "data": {"serial": "A"}});
        assert_eq!(response_data(ok).unwrap(), json!({"serial": "A"}));
        let failed = json!({"command": "getStation", "correlationData": "x",
            "error": "no station A", "code": "not_found"});
        match response_data(failed) {
            Err(ClientError::CommandFailed { code, error }) => {
                assert_eq!(code, "not_found");
                assert_eq!(error, "no station A");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn responses_are_routed_by_correlation_data() {
        let response = Topic::OperatorResponse("admin".into()).to_string();
        let security = |tenant: &str| Topic::Event(tenant.into(), EventKind::Security).to_string();
        let shared = Shared {
            routes: Mutex::new(Routes::default()),
        };
        let (tx1, mut rx1) = oneshot::channel();
        let (tx2, mut rx2) = oneshot::channel();
        shared.routes().responses.insert("c-1".into(), tx1);
        shared.routes().responses.insert("c-2".into(), tx2);
        let (etx, mut erx) = mpsc::unbounded_channel();
        shared
            .routes()
            .events
            .push((Filter::events_prefix("default"), etx));

        let payload = json!({"responses": [
            {"command": "b", "correlationData": "c-2", "data": {}},
            {"command": "z", "correlationData": "someone-else", "data": {}},
        ]});
        route(&shared, &response, payload.to_string().as_bytes());
        assert_eq!(rx2.try_recv().unwrap()["command"], "b");
        assert!(rx1.try_recv().is_err());
        route(&shared, &response, b"not json");

        let event = json!({"type": "identity_mismatch", "serial": "A"});
        route(&shared, &security("default"), event.to_string().as_bytes());
        route(&shared, &security("other"), event.to_string().as_bytes());
        let (topic, value) = erx.try_recv().unwrap();
        assert_eq!(topic, security("default"));
        assert_eq!(value, event);
        assert!(erx.try_recv().is_err());
    }

    #[test]
    fn operator_name_is_the_certificate_cn() {
        let ca = fleet_certs::FleetCa::generate("test CA").unwrap();
        let admin = ca.issue_operator("alice", "default").unwrap();
        assert_eq!(operator_name(&admin.cert_pem).unwrap(), "alice");
    }

    #[tokio::test]
    async fn connect_reports_an_unreachable_server() {
        let ca = fleet_certs::FleetCa::generate("test CA").unwrap();
        let admin = ca.issue_operator("alice", "default").unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let result = OperatorClient::connect(
            &format!("127.0.0.1:{port}"),
            ca.cert_pem(),
            &admin.cert_pem,
            &admin.key_pem,
            "alice",
        )
        .await;
        assert!(
            matches!(result, Err(ClientError::Connection(_))),
            "{result:?}"
        );
    }
}
