//! Integration test harness: starts the real fleet service (front door, router, controller,
//! store) on `127.0.0.1:0` with real TLS and real certificates, and connects simulated stations
//! and operators to it. Tests wait for events with a timeout, never sleep for them.

pub mod churn;
pub mod cluster;
pub mod door;
pub mod local_cluster;
pub mod nats;
pub mod postgres;
pub mod process;
pub mod raw;

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleet_config::{Config, FirmwareImage};
use fleet_controller::clock::Clock;
use fleet_controller::Fleet;
use fleet_ctl::{ClientError, OperatorClient};
use fleet_protocol::{EventKind, Mac, Serial, StationLeaf, Topic};
use fleet_sim::{spawn_station, SimConfig, SimEvent, StationHandle, StationProfile, StationState};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::mpsc::UnboundedReceiver;

/// How long any single expected thing may take before a test fails.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A running fleet service in its own temporary directory.
pub struct TestFleet {
    pub fleet: Fleet,
    pub dir: TempDir,
    pub config: Config,
    /// The service's clock: simulated, so that 30-minute and 8-hour rules are tested by
    /// advancing it, never by sleeping.
    pub clock: Clock,
}

/// Size of the test firmware image: several chunks, so that the transfer is exercised.
pub const FIRMWARE_SIZE: usize = 70_000;

impl TestFleet {
    /// Starts fleetd with a generated CA and a firmware catalog holding 6.1.0.
    pub async fn start() -> TestFleet {
        Self::start_with(|_| {}).await
    }

    /// Like [`TestFleet::start`], with the configuration changed by `configure` first.
    pub async fn start_with(configure: impl FnOnce(&mut Config)) -> TestFleet {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("firmware-6.1.0.bin");
        let bytes: Vec<u8> = (0..FIRMWARE_SIZE).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&image, bytes).expect("firmware image");
        let mut config = Config::default();
        config.server.data_dir = dir.path().join("fleet-data");
        config.server.listen = "127.0.0.1:0".parse().expect("addr");
        // An upper bound only: a cut closes as soon as the final `cmd` is written. Generous,
        // because CI machines are shared and slow.
        config.server.cut_grace_ms = 3000;
        config.firmware.images.push(FirmwareImage {
            version: "6.1.0".into(),
            file: image,
            sha256: None,
        });
        configure(&mut config);
        let clock = Clock::simulated();
        let fleet = Fleet::start_with_clock(&config, clock.clone())
            .await
            .expect("fleet starts");
        TestFleet {
            fleet,
            dir,
            config,
            clock,
        }
    }

    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.fleet.local_addr().port())
    }

    pub fn ca_pem(&self) -> String {
        self.fleet.files.ca.cert_pem().to_owned()
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.server.data_dir
    }

    /// The `admin` operator of tenant `default`.
    pub async fn operator(&self) -> Operator {
        let cert = std::fs::read_to_string(&self.fleet.files.admin_cert_path).expect("admin.pem");
        let key = std::fs::read_to_string(&self.fleet.files.admin_key_path).expect("admin.key");
        let client = OperatorClient::connect(&self.server(), &self.ca_pem(), &cert, &key, "admin")
            .await
            .expect("operator connects");
        Operator::new(client, "default").await
    }

    /// An operator of `tenant`, with a certificate issued like `fleetd issue-operator` does.
    pub async fn operator_as(&self, name: &str, tenant: &str) -> Operator {
        // Each tenant's files in a folder of their own: two tenants may have operators of
        // the same name.
        let out = self.dir.path().join(format!("operators-of-{tenant}"));
        let (cert, key) =
            fleet_certs::data_dir::issue_operator_files_into(self.data_dir(), name, tenant, &out)
                .expect("issue operator");
        let cert = std::fs::read_to_string(cert).expect("cert");
        let key = std::fs::read_to_string(key).expect("key");
        let client = OperatorClient::connect(&self.server(), &self.ca_pem(), &cert, &key, name)
            .await
            .expect("operator connects");
        Operator::new(client, tenant).await
    }

    /// A simulated station with its own state directory, booted.
    pub fn station(&self, serial: &str, firmware: &str) -> Station {
        Station::boot(
            self.station_dir(serial),
            serial,
            firmware,
            self.server(),
            self.ca_pem(),
        )
    }

    /// The state directory of the station [`TestFleet::station`] made for `serial`.
    pub fn station_dir(&self, serial: &str) -> PathBuf {
        self.dir.path().join("stations").join(serial)
    }
}

pub struct Station {
    pub serial: String,
    pub dir: PathBuf,
    pub handle: StationHandle,
}

impl Station {
    /// Makes station `serial` with `firmware` in the state directory `dir` and boots it
    /// against `server`, which it trusts by `ca_pem`.
    pub fn boot(
        dir: PathBuf,
        serial: &str,
        firmware: &str,
        server: String,
        ca_pem: String,
    ) -> Self {
        StationState::init(&dir, &StationProfile::new(serial, firmware)).expect("station init");
        let mut config = SimConfig::new(server, ca_pem);
        config.retry = Duration::from_millis(200);
        let handle = spawn_station(&dir, config);
        Station {
            serial: serial.to_owned(),
            dir,
            handle,
        }
    }

    /// Waits until the station reports an event for which `pick` returns something.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&SimEvent) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match tokio::time::timeout_at(deadline, self.handle.next_event()).await {
                Ok(Some(event)) => {
                    // Shown when a test fails: the station's story.
                    eprintln!("[{}] {event:?}", self.serial);
                    if let Some(t) = pick(&event) {
                        return t;
                    }
                }
                Ok(None) => panic!("station {} stopped while waiting for {what}", self.serial),
                Err(_) => panic!("station {} never reported {what}", self.serial),
            }
        }
    }

    pub async fn wait_event(&mut self, expected: SimEvent) {
        let what = format!("{expected:?}");
        self.wait_for(&what, |e| (*e == expected).then_some(()))
            .await
    }

    /// The fingerprint as the station's local admin interface shows it.
    pub fn local_fingerprint(&self) -> String {
        fleet_sim::fingerprint(&self.dir)
            .expect("local admin")
            .expect("station has a key")
            .to_string()
    }
}

pub struct Operator {
    pub client: OperatorClient,
    pub events: UnboundedReceiver<(String, Value)>,
    /// How long a wait for a station's view or an event may take ([`PATIENCE`] unless set).
    pub patience: Duration,
}

impl Operator {
    /// `client`, hearing the events of `tenant`.
    pub async fn new(client: OperatorClient, tenant: &str) -> Self {
        let events = client.subscribe_events(tenant).await.expect("events");
        Operator {
            client,
            events,
            patience: PATIENCE,
        }
    }

    pub async fn call(&self, command: &str, args: Value) -> Result<Value, ClientError> {
        self.client.call(command, args).await
    }

    pub async fn station(&self, serial: &str) -> Value {
        self.call("getStation", json!({"serial": serial}))
            .await
            .expect("getStation")
    }

    /// Waits until the station's `state` is `state`: checks now, then on every state event.
    pub async fn wait_state(&mut self, serial: &str, state: &str) -> Value {
        self.wait_view(serial, state, |v| v["state"] == state).await
    }

    /// Waits until station `serial` asked to be authorized: Unauthorized, with the key of its
    /// latest request (after a reset the record shows no key until the rebooted station asked
    /// again). Returns that key's fingerprint.
    pub async fn wait_request(&mut self, serial: &str) -> String {
        let view = self
            .wait_view(serial, "unauthorized with a key", |v| {
                v["state"] == "unauthorized" && v["fingerprint"].is_string()
            })
            .await;
        view["fingerprint"]
            .as_str()
            .expect("a fingerprint")
            .to_owned()
    }

    /// Creates a phone in the portal (with [`new_phone`]) and returns its PAP.
    pub async fn create_phone(&self, mac: &str) -> String {
        let view = self
            .call("createPhone", new_phone(mac))
            .await
            .expect("createPhone");
        view["pap"].as_str().expect("a PAP").to_owned()
    }

    /// Waits until the station's view satisfies `done`: checks now, then on every event.
    pub async fn wait_view(
        &mut self,
        serial: &str,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            if let Ok(view) = self.call("getStation", json!({"serial": serial})).await {
                if done(&view) {
                    return view;
                }
            }
            // Re-check on station events only: every getStation is itself audited, and audit
            // events would wake this loop forever.
            loop {
                let event = tokio::time::timeout_at(deadline, self.events.recv()).await;
                match event {
                    _ if tokio::time::Instant::now() >= deadline => {
                        let last = self.call("getStation", json!({"serial": serial})).await;
                        panic!("station {serial} never reached {what}; last: {last:?}")
                    }
                    Ok(Some((topic, _))) if is_event(&topic, EventKind::Audit) => {}
                    Ok(Some(_)) => break,
                    Ok(None) => panic!("event stream closed"),
                    Err(_) => {}
                }
            }
        }
    }

    /// Waits for an event of `kind` (on `fleet/events/<tenant>/<kind>`) matching `pick`.
    pub async fn wait_event(
        &mut self,
        kind: EventKind,
        mut pick: impl FnMut(&Value) -> bool,
    ) -> Value {
        let kind_name = kind.as_str();
        let deadline = tokio::time::Instant::now() + self.patience;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                _ if tokio::time::Instant::now() >= deadline => {
                    panic!("no {kind_name} event came")
                }
                Ok(Some((topic, event))) if is_event(&topic, kind) && pick(&event) => return event,
                Ok(Some(_)) => {}
                Ok(None) => panic!("event stream closed"),
                Err(_) => panic!("no {kind_name} event came"),
            }
        }
    }
}

/// Whether `topic` is an event of `kind` (of any tenant).
fn is_event(topic: &str, kind: EventKind) -> bool {
    matches!(Topic::parse(topic), Some(Topic::Event(_, k)) if k == kind)
}

/// The serial `text`; panics unless it is one (tests name their stations with valid ones).
pub fn serial(text: &str) -> Serial {
    Serial::parse(text).expect("a valid serial")
}

/// The MAC `text`, in any form PROTOCOL §1 allows; panics unless it is one.
pub fn mac(text: &str) -> Mac {
    Mac::parse(text).expect("a valid MAC")
}

/// The topic `leaf` of station `serial` (`stations/<serial>/<leaf>`).
pub fn station_topic(serial: &str, leaf: StationLeaf) -> String {
    Topic::station(crate::serial(serial), leaf).to_string()
}

/// Station `serial`'s application data topic `rest` (`stations/<serial>/data/<rest>`).
pub fn station_data(serial: &str, rest: &str) -> String {
    Topic::StationData(crate::serial(serial), rest.into()).to_string()
}

/// The filter of all of station `serial`'s application data (`stations/<serial>/data/#`).
/// fleet-protocol's `Filter` has no such variant (no one in the fleet subscribes to it): it is
/// the data topic's root, one level down.
pub fn station_data_filter(serial: &str) -> String {
    format!("{}/#", station_data(serial, ""))
}

/// The arguments of a `createPhone` of `mac`: a Yealink T54W in Berlin.
pub fn new_phone(mac: &str) -> Value {
    json!({"mac": mac, "vendor": "Yealink", "type": "T54W", "site": "Berlin"})
}

/// Another 6-digit PAP than `pap`: a wrong guess.
pub fn wrong_pap(pap: &str) -> String {
    let n: u32 = pap.parse().expect("digits");
    format!("{:06}", (n + 1) % 1_000_000)
}

/// The error code of a failed command.
pub fn code_of(result: Result<Value, ClientError>) -> String {
    match result {
        Err(ClientError::CommandFailed { code, .. }) => code,
        other => panic!("expected a command error, got {other:?}"),
    }
}

/// Authorizes a station end to end and returns its fingerprint.
pub async fn authorize(op: &mut Operator, station: &mut Station) -> String {
    let asked = op.wait_request(&station.serial).await;
    // The operator compares it with the station's local admin interface; the station has booted,
    // so reading its key does not race with the boot that makes it.
    let fingerprint = station.local_fingerprint();
    assert_eq!(asked, fingerprint);
    let view = op
        .call(
            "acceptStation",
            json!({"serial": station.serial, "fingerprint": fingerprint}),
        )
        .await
        .expect("accept");
    assert_eq!(view["fingerprint"], fingerprint.as_str());
    station.wait_event(SimEvent::Authorized).await;
    op.wait_state(&station.serial, "running").await;
    fingerprint
}

/// A simulated phone with its own state directory, playing a phone behind `source`.
pub struct TestPhone {
    pub mac: String,
    pub dir: PathBuf,
    pub target: fleet_sim::phone::PhoneTarget,
}

impl TestFleet {
    /// A phone with MAC `mac`, the PAP its user typed (if any), behind source address `source`.
    pub fn phone(&self, mac: &str, pap: Option<&str>, source: &str) -> TestPhone {
        use fleet_sim::phone::{PhoneProfile, PhoneState, PhoneTarget};
        let dir = self.dir.path().join("phones").join(mac);
        let mut profile = PhoneProfile::new(mac);
        profile.pap = pap.map(str::to_owned);
        PhoneState::init(&dir, &profile).expect("phone init");
        let source = source.parse().expect("source address");
        TestPhone {
            mac: mac.to_owned(),
            dir,
            target: PhoneTarget::new(self.server(), self.ca_pem()).with_source(source),
        }
    }
}

impl TestPhone {
    /// The same phone, moved behind another source address.
    pub fn behind(&self, source: &str) -> TestPhone {
        TestPhone {
            mac: self.mac.clone(),
            dir: self.dir.clone(),
            target: self
                .target
                .clone()
                .with_source(source.parse().expect("source address")),
        }
    }

    /// One provisioning attempt with the PAP the user typed.
    pub async fn provision(&self) -> fleet_sim::phone::ProvisionOutcome {
        fleet_sim::phone::provision(&self.dir, &self.target)
            .await
            .expect("provisioning ran")
    }

    /// Connects with the phone's certificate.
    pub async fn connect(
        &self,
    ) -> Result<fleet_sim::phone::PhoneSession, fleet_sim::phone::PhoneError> {
        fleet_sim::phone::connect_provisioned(&self.dir, &self.target).await
    }

    /// One unprovisioned CONNECT with `password`; the CONNACK code.
    pub async fn connect_raw(&self, password: Option<&str>) -> u8 {
        fleet_sim::phone::connect_raw(&self.dir, &self.target, password)
            .await
            .expect("connect ran")
    }

    pub fn set_pap(&self, pap: Option<&str>) {
        fleet_sim::phone::set_pap(&self.dir, pap.map(str::to_owned)).expect("set PAP");
    }

    pub fn factory_reset(&self) {
        fleet_sim::phone::factory_reset(&self.dir).expect("factory reset");
    }
}

/// `GET path` on a metrics endpoint (plain HTTP at `addr`): the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("answer");
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}
