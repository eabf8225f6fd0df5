//! The front door alone (fleet-broker without the controller) on `127.0.0.1:0`, with real TLS
//! and an admission of the test's own: for the tests of what the front door does by itself
//! (caps, MQTT 5 obligations), which the fleet's configuration cannot reach or would hide.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_broker::{
    Admission, BoxFuture, Broker, ConnectInfo, Decision, Refusal, Rights, Settings,
};
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

/// What reached an [`OpenAdmission`]'s inbox: (client id, topic, payload).
pub type Received = (String, String, Vec<u8>);

/// An admission of a front-door test's own: admits every client with the rights
/// `rights(client_id)`, and records what reaches its inbox, taking one permit of `gate` per
/// message (the others wait for `gate.add_permits`).
pub struct OpenAdmission {
    rights: fn(&str) -> Rights,
    messages: Mutex<Vec<Received>>,
    pub gate: Semaphore,
}

impl OpenAdmission {
    /// `permits`: inbox messages it takes before it makes the next ones wait.
    pub fn new(rights: fn(&str) -> Rights, permits: usize) -> Arc<OpenAdmission> {
        Arc::new(OpenAdmission {
            rights,
            messages: Mutex::new(Vec::new()),
            gate: Semaphore::new(permits.min(Semaphore::MAX_PERMITS)),
        })
    }

    /// Every inbox message so far, in the order they came.
    pub fn received(&self) -> Vec<Received> {
        self.messages.lock().expect("messages").clone()
    }
}

impl Admission for OpenAdmission {
    fn admit(&self, info: ConnectInfo) -> BoxFuture<'_, Decision> {
        Box::pin(async move {
            Decision::Allow {
                rights: (self.rights)(&info.client_id),
                reserved: false,
            }
        })
    }

    fn session_opened(&self, client_id: &str, _session_id: u64) -> Result<Rights, Refusal> {
        Ok((self.rights)(client_id))
    }

    fn refused(&self, _client_id: &str, _peer_addr: SocketAddr, _reason: &str) {}

    fn session_closed(&self, _client_id: &str, _session_id: u64) {}

    fn message(
        &self,
        client_id: &str,
        _session_id: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, bool> {
        let client_id = client_id.to_owned();
        Box::pin(async move {
            match self.gate.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return false,
            }
            let mut messages = self.messages.lock().expect("messages");
            messages.push((client_id, topic, payload));
            true
        })
    }
}

/// A front door serving a test's admission, and a client TLS configuration that trusts it.
pub struct FrontDoor {
    pub broker: Broker,
    /// Trusts the door's certificate and presents none.
    pub connector: TlsConnector,
    pub port: u16,
}

impl FrontDoor {
    /// Binds a front door with a fresh CA and server certificate and generous limits, changed
    /// by `configure` first, and serves `admission`.
    pub async fn start(
        admission: Arc<dyn Admission>,
        configure: impl FnOnce(&mut Settings),
    ) -> FrontDoor {
        let ca = fleet_certs::FleetCa::generate("front door test CA").expect("CA");
        let issued = ca
            .issue_server(&["localhost".into()], &["127.0.0.1".parse().expect("ip")])
            .expect("server certificate");
        let mut settings = Settings {
            listen: "127.0.0.1:0".parse().expect("address"),
            server_chain: fleet_certs::certs_from_pem(&issued.cert_pem).expect("chain"),
            server_key: fleet_certs::key_from_pem(&issued.key_pem).expect("key"),
            fleet_ca: fleet_certs::certs_from_pem(ca.cert_pem()).expect("CA"),
            manufacturer_cas: vec![],
            allow_self_signed: true,
            max_connections: 100,
            handshake_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            max_packet_size: 64 * 1024,
            idle_timeout: Duration::from_secs(60),
            cut_grace: Duration::from_secs(1),
            write_timeout: Duration::from_secs(5),
            connections_per_ip_per_minute: 100_000,
            sessions_per_ip: 100,
            reserved_sessions: 2,
            handshakes_per_ip: 64,
            max_undelivered: 64,
            // Connections move from the openings' runtime to the test's, as in fleetd.
            handshake_threads: 1,
        };
        configure(&mut settings);
        let broker = Broker::bind(settings).await.expect("broker binds");
        broker.serve(admission);
        let config = fleet_certs::client_config(ca.cert_pem(), None).expect("client TLS");
        FrontDoor {
            port: broker.local_addr().port(),
            broker,
            connector: TlsConnector::from(Arc::new(config)),
        }
    }
}
