//! The controller's shell around the pure station state machine: admission of CONNECTs, the
//! messages stations send, operator commands. Every decision is committed to the store before
//! anyone (station, operator, event subscriber) is told about it.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine;
use fleet_broker::{Admission, BoxFuture, ConnectInfo, Decision, Refusal, Rights, SessionControl};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::audit::{AuditRecord, Outcome};
use crate::clock::Clock;
use crate::firmware::{parse_version, Catalog, FirmwareImage, FirmwarePolicy};
use crate::flood::{
    AuditBudget, FailureLimiter, FailurePolicy, OperatorBudget, PendingLimits, Verdict,
};
use crate::identity::{self, Identity, OperatorId, StationRights};
use crate::phone::PhonePolicy;
use crate::request::{
    after_arg, after_seq_arg, bool_arg, fingerprint_arg, limit_arg, page_limit_arg, parse_request,
    serial_arg, text_arg,
};
use crate::store::StoreError;
use crate::whitelist::Whitelists;
use fleet_certs::{FleetCa, OperatorRegistry};
use ring::rand::SystemRandom;

mod phones;

use crate::station::{
    self, Admit, AuthRequest, DenyReason, Effect, Presented, Standing, Station, StationState,
    Transition,
};
use crate::store::{Change, Store, StoreTxn};
use fleet_protocol::{ClaimedClient, CommandError, ErrorCode, EventKind, Serial, Topic};

/// Bus messages handled in one batch at most (one store transaction, one fsync).
pub const MAX_BATCH: usize = 256;

/// Operator requests queued from the front door's inbox and not yet handled, at most; a full
/// queue holds the sending sessions back (the front door reads nothing more from them).
pub const INBOX_CAPACITY: usize = 1024;

/// The operator session that sent a request: the answer goes to that session only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    pub client_id: String,
    pub session_id: u64,
    pub operator: OperatorId,
}

/// An operator request from the front door's inbox, tagged with the session that sent it.
#[derive(Debug)]
pub struct InboxRequest {
    pub from: Requester,
    pub payload: Vec<u8>,
}

/// What the front door's inbox hands the controller.
#[derive(Debug)]
pub enum InboxItem {
    /// An operator's request.
    Request(InboxRequest),
    /// A device's message on one of its inbox topics (a phone's `provision/complete`): its
    /// session acknowledges it only once `handled` fires, after the batch that handled it was
    /// committed, so that a device told "done" is never lost in a crash. `handled` says
    /// whether that commit succeeded.
    Device {
        topic: String,
        payload: Vec<u8>,
        handled: tokio::sync::oneshot::Sender<bool>,
    },
}

/// One message of a batch ([`Controller::handle_batch`]).
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'m> {
    /// A message from the router (station and phone topics).
    Routed { topic: &'m str, payload: &'m [u8] },
    /// An operator request from its session's inbox.
    Request {
        from: &'m Requester,
        payload: &'m [u8],
    },
}

/// A future that completes once an audit record is durable (and published).
/// It says whether the record was stored.
type AuditFuture = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'static>>;

/// One batch of bus messages handled together ([`Controller::handle_batch`]): reads see the
/// batch's own writes, all its changes are committed in ONE transaction at the end, and
/// everything it says or does to anyone is held back (in `out`) until that commit.
pub(crate) struct Cx {
    txn: StoreTxn,
    out: Vec<Output>,
    /// Every station record the batch wrote, as it stands at the end of the batch (`None`:
    /// deleted): after the commit, the store holds exactly these.
    written: HashMap<Serial, Option<Station>>,
}

/// Something a batch says or does, once its changes are durable.
enum Output {
    Publish(Publication),
    /// An operator's response; if the commit fails, every command of it is answered with the
    /// store's error instead.
    Respond {
        to: Requester,
        commands: Vec<(Value, Value)>,
        responses: Vec<Value>,
    },
    /// End a session (after a message to `after`, if any).
    Cut {
        client_id: String,
        after: Option<String>,
    },
    /// Re-read the rights of the station's live session: they grow in place, or it is cut.
    Recheck(Serial),
    /// End an address's block for failed authentications.
    LiftBlock(IpAddr),
    /// A mailbox message to one session only.
    DeliverTo {
        client_id: String,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    },
}

impl Cx {
    fn commit(&mut self, changes: Vec<Change>) -> Result<(), CommandError> {
        for change in &changes {
            match change {
                Change::PutStation(s) => {
                    self.written.insert(s.serial.clone(), Some(s.clone()));
                }
                Change::DeleteStation(serial) => {
                    self.written.insert(serial.clone(), None);
                }
                _ => {}
            }
        }
        self.txn.apply(changes).map_err(|e| {
            warn!("store: {e}");
            CommandError::internal(format!("the store refused the change: {e}"))
        })
    }

    fn publish(&mut self, topic: String, payload: &Value) {
        self.out.push(Output::Publish(Publication {
            topic,
            payload: payload.to_string().into_bytes(),
        }));
    }
}

/// A message for the bus task to publish, in order.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Settings of the controller, already validated.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub policy: FirmwarePolicy,
    pub catalog: Catalog,
    pub chunk_size: usize,
    pub max_payload_bytes: usize,
    pub phones: PhonePolicy,
    pub flood: FloodSettings,
    pub requests: RequestLimits,
    pub pending: PendingSettings,
    /// Shortest prefix of a permanent whitelist range (IPv4, IPv6) without `force`.
    pub whitelist_min_prefix: (u8, u8),
    pub clock: Clock,
}

impl ControlSettings {
    /// The controller's settings from a checked configuration (`fleet_config::Config::validate`),
    /// with the firmware policy and catalog the shell read from disk, on `clock`.
    pub fn from_config(
        config: &fleet_config::Config,
        policy: FirmwarePolicy,
        catalog: Catalog,
        clock: Clock,
    ) -> ControlSettings {
        let phones = &config.phones;
        let limits = &config.limits;
        let minutes = |m: u64| time::Duration::minutes(i64::try_from(m).unwrap_or(i64::MAX));
        ControlSettings {
            policy,
            catalog,
            chunk_size: config.firmware.chunk_size,
            max_payload_bytes: config.limits.max_payload_bytes,
            phones: PhonePolicy {
                pap_attempts: phones.pap_attempts,
                lockout: minutes(phones.lockout_minutes),
                lockouts_before_block: phones.lockouts_before_block,
                temporary_whitelist: minutes(phones.temporary_whitelist_hours.saturating_mul(60)),
                suspend: minutes(phones.suspend_minutes),
            },
            flood: FloodSettings {
                failures: FailurePolicy {
                    max_failures: limits.failed_auth_per_ip,
                    window: minutes(limits.failed_auth_window_minutes),
                    block: minutes(limits.failed_auth_block_minutes),
                },
                failed_auth_delay: std::time::Duration::from_millis(limits.failed_auth_delay_ms),
                refusal_audits_per_minute: limits.refusal_audits_per_ip_per_minute,
            },
            requests: RequestLimits {
                max_commands: limits.max_commands_per_request as usize,
                page_size: limits.max_page_size as usize,
                max_response_bytes: limits.max_response_bytes,
                commands_per_second: limits.operator_commands_per_second,
                burst: limits.operator_command_burst,
            },
            pending: PendingSettings {
                limits: PendingLimits {
                    per_ip: limits.pending_stations_per_ip,
                    total: limits.max_pending_stations,
                },
                expiry: minutes(limits.pending_expiry_hours.saturating_mul(60)),
            },
            whitelist_min_prefix: (
                phones.min_whitelist_prefix_v4,
                phones.min_whitelist_prefix_v6,
            ),
            clock,
        }
    }
}

/// What one operator request, and one operator, may ask of the controller.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_commands: usize,
    /// Items of a list command's page at most.
    pub page_size: usize,
    /// Bytes of a request's whole response at most (decisions are answered regardless; reads
    /// beyond it get `too_large`).
    pub max_response_bytes: usize,
    pub commands_per_second: u32,
    pub burst: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_commands: 100,
            page_size: 500,
            max_response_bytes: 4 << 20,
            commands_per_second: 20,
            burst: 200,
        }
    }
}

/// Stations waiting for approval: how many, and for how long unseen.
#[derive(Debug, Clone)]
pub struct PendingSettings {
    pub limits: PendingLimits,
    pub expiry: time::Duration,
}

impl Default for PendingSettings {
    fn default() -> Self {
        PendingSettings {
            limits: PendingLimits {
                per_ip: 1000,
                total: 20_000,
            },
            expiry: time::Duration::days(7),
        }
    }
}

/// Refuses a CONNECT: refusal, reason, tenant, device, and whether it counts as a failed
/// authentication of the address.
type DenyFn<'a> = dyn Fn(Refusal, String, &str, Option<String>, bool) -> Decision + 'a;

/// Limits on failed authentications and on refusal audits per source address.
#[derive(Debug, Clone)]
pub struct FloodSettings {
    pub failures: FailurePolicy,
    pub failed_auth_delay: std::time::Duration,
    pub refusal_audits_per_minute: u32,
}

struct LiveSession {
    session_id: u64,
    identity: Identity,
    ip: IpAddr,
    /// The session this one replaces, until this one is registered by the front door
    /// (`opened`): if its registration fails (a cap), the previous one is still the live one.
    previous: Option<Box<LiveSession>>,
}

#[derive(Default)]
struct Live {
    /// Admitted sessions by client id.
    sessions: HashMap<String, LiveSession>,
    /// Last activity of stations, kept in memory (not worth an fsync per message).
    last_seen: HashMap<Serial, OffsetDateTime>,
    /// Identity and address of the last admitted session of each station client id: a message
    /// published just before its session closed (`mosquitto_pub` does exactly that) reaches the
    /// controller after the close, and is still attributed to the session that sent it.
    last_station_session: HashMap<String, (Presented, IpAddr)>,
    /// Address of the last admitted session of each phone client id, for the same reason
    /// (`provision/complete` is often the phone's last message before it disconnects).
    last_phone_ip: HashMap<String, IpAddr>,
    /// Permanent and temporary whitelists of every tenant (mirrors the store).
    whitelists: Whitelists,
    /// Stations waiting for approval, and who is who case-insensitively (mirrors the store).
    pending: PendingIndex,
}

/// The stations waiting for approval (records a device created, neither accepted nor rejected)
/// with the address of their last request, and every serial by its lower-case form: what the
/// pending-station limits and the one-serial-per-case rule are checked against without a scan.
#[derive(Default)]
struct PendingIndex {
    waiting: HashMap<Serial, Option<IpAddr>>,
    per_ip: HashMap<IpAddr, u32>,
    folded: HashMap<String, Serial>,
}

impl PendingIndex {
    fn build(stations: &[Station]) -> PendingIndex {
        let mut index = PendingIndex::default();
        for s in stations {
            index.update(&s.serial, Some(s));
        }
        index
    }

    fn is_waiting(s: &Station) -> bool {
        !matches!(s.standing, Standing::Authorized | Standing::Rejected)
    }

    /// Records the station's record as it now stands (`None`: deleted). A waiting station counts
    /// against the address that first made its record, whichever address asks again later:
    /// moving records to another address would free the first one's share.
    fn update(&mut self, serial: &Serial, record: Option<&Station>) {
        let counted = self.waiting.get(serial).copied();
        if let Some(Some(ip)) = self.waiting.remove(serial) {
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
        let folded = serial.as_str().to_ascii_lowercase();
        match record {
            Some(s) => {
                self.folded.insert(folded, serial.clone());
                if Self::is_waiting(s) {
                    let ip = counted.unwrap_or_else(|| {
                        s.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok())
                    });
                    if let Some(ip) = ip {
                        *self.per_ip.entry(ip).or_default() += 1;
                    }
                    self.waiting.insert(serial.clone(), ip);
                }
            }
            None => {
                if self.folded.get(&folded) == Some(serial) {
                    self.folded.remove(&folded);
                }
            }
        }
    }

    fn waiting_from(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    fn total(&self) -> u32 {
        u32::try_from(self.waiting.len()).unwrap_or(u32::MAX)
    }

    /// Another station whose serial differs from `serial` only in case and that an operator
    /// decided on (accepted or rejected): a look-alike of it is refused. Twins that are both
    /// waiting are both shown (their fingerprints tell them apart), so that a squatter's
    /// lower-case record cannot lock the real station out.
    fn case_twin(&self, serial: &Serial) -> Option<&Serial> {
        self.folded
            .get(&serial.as_str().to_ascii_lowercase())
            .filter(|other| *other != serial && !self.waiting.contains_key(*other))
    }
}

pub struct Controller {
    store: Store,
    /// The issued operator certificates (`fleet_certs::operators`).
    operators: OperatorRegistry,
    /// Live operator sessions by session id, for the inbox: a request is attributed to the
    /// session that sent it when it arrives, whether or not that session is still open when
    /// it is handled. Kept apart from `live`, which batches hold across their commit.
    operator_sessions: Mutex<HashMap<u64, Requester>>,
    inbox: mpsc::Sender<InboxItem>,
    inbox_rx: Mutex<Option<mpsc::Receiver<InboxItem>>>,
    /// Signs phone certificates at provisioning.
    ca: Arc<FleetCa>,
    rng: SystemRandom,
    failures: Mutex<FailureLimiter>,
    audit_budget: Mutex<AuditBudget>,
    /// Commands per second of each operator (`rate_limited` past it).
    budget: Mutex<OperatorBudget<OperatorId>>,
    /// When each operator's rate-limited commands were last audited, and how many were left out
    /// since: one record a minute at most, so that a flood of tiny requests cannot fill the log.
    rate_audits: Mutex<HashMap<OperatorId, (OffsetDateTime, u64)>>,
    /// Operators revoked while this process runs (the registry has them too).
    revoked: Mutex<std::collections::HashSet<OperatorId>>,
    sessions: Arc<dyn SessionControl>,
    /// Serialises decisions: a decision and the rights of live sessions change together.
    live: Mutex<Live>,
    settings: ControlSettings,
    out: mpsc::UnboundedSender<Publication>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Controller {
    pub fn new(
        store: Store,
        ca: Arc<FleetCa>,
        sessions: Arc<dyn SessionControl>,
        operators: OperatorRegistry,
        settings: ControlSettings,
    ) -> Result<(Arc<Controller>, mpsc::UnboundedReceiver<Publication>), StoreError> {
        let (out, rx) = mpsc::unbounded_channel();
        let (inbox, inbox_rx) = mpsc::channel(INBOX_CAPACITY);
        let live = Live {
            whitelists: store.whitelists()?,
            pending: PendingIndex::build(&store.stations()?),
            ..Live::default()
        };
        let controller = Arc::new(Controller {
            store,
            operators,
            operator_sessions: Mutex::new(HashMap::new()),
            inbox,
            inbox_rx: Mutex::new(Some(inbox_rx)),
            ca,
            rng: SystemRandom::new(),
            failures: Mutex::new(FailureLimiter::new(settings.flood.failures.clone())),
            audit_budget: Mutex::new(AuditBudget::new(settings.flood.refusal_audits_per_minute)),
            rate_audits: Mutex::new(HashMap::new()),
            revoked: Mutex::new(std::collections::HashSet::new()),
            budget: Mutex::new(OperatorBudget::new(
                settings.requests.commands_per_second,
                settings.requests.burst,
            )),
            sessions,
            live: Mutex::new(live),
            settings,
            out,
        });
        Ok((controller, rx))
    }

    /// The operator requests of the front door's inbox, for the bus task (once).
    pub fn take_inbox(&self) -> Option<mpsc::Receiver<InboxItem>> {
        self.inbox_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// The live operator session `session_id` of `client_id`, if it is one.
    fn requester(&self, client_id: &str, session_id: u64) -> Option<Requester> {
        self.operator_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&session_id)
            .filter(|r| r.client_id == client_id)
            .cloned()
    }

    /// Queues a request of an operator session from the front door's inbox; waits while the
    /// queue is full.
    async fn inbox_request(&self, client_id: &str, session_id: u64, payload: Vec<u8>) -> bool {
        let Some(from) = self.requester(client_id, session_id) else {
            debug!(client_id = %client_id.escape_default(), "inbox message of no operator session dropped");
            return true;
        };
        if self
            .inbox
            .send(InboxItem::Request(InboxRequest { from, payload }))
            .await
            .is_err()
        {
            warn!("controller inbox closed: operator request dropped");
            return false;
        }
        true
    }

    /// Queues a device's inbox message and waits until the batch that handled it is committed
    /// (or dropped: then the device is not acknowledged either, and its session goes on).
    async fn inbox_device(&self, topic: String, payload: Vec<u8>) -> bool {
        let (handled, done) = tokio::sync::oneshot::channel();
        let item = InboxItem::Device {
            topic,
            payload,
            handled,
        };
        if self.inbox.send(item).await.is_err() {
            warn!("controller inbox closed: device message dropped");
            return false;
        }
        done.await.unwrap_or(false)
    }

    /// Handles one operator request of a live operator session at once (a batch of one);
    /// false when `session_id` is no operator session of `client_id`.
    pub fn handle_request(&self, client_id: &str, session_id: u64, payload: &[u8]) -> bool {
        let Some(from) = self.requester(client_id, session_id) else {
            return false;
        };
        self.handle_batch([Incoming::Request {
            from: &from,
            payload,
        }]);
        true
    }

    /// The shell's clock (the state machines get `now` from here).
    pub fn now(&self) -> OffsetDateTime {
        self.settings.clock.now()
    }

    fn lock(&self) -> MutexGuard<'_, Live> {
        // Every critical section leaves `Live` consistent before it can panic (single map
        // operations), so a poisoned lock is still usable.
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, topic: String, payload: &Value) {
        self.send_out(Publication {
            topic,
            payload: payload.to_string().into_bytes(),
        });
    }

    /// A message to a device's mailbox (`cmd`, firmware chunks, provisioning answers) goes
    /// straight to its session (see `fleet_broker::mailbox`); everything else to the router.
    fn send_out(&self, p: Publication) {
        match identity::mailbox_owner(&p.topic) {
            Some(client_id) => {
                self.sessions.deliver(&client_id, p.topic, p.payload);
            }
            None => {
                let _ = self.out.send(p);
            }
        }
    }

    fn event(&self, tenant: &str, kind: EventKind, body: Value) {
        let mut body = body;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("type".into(), json!(kind.as_str()));
            obj.insert("time".into(), json!(rfc3339(self.now())));
        }
        self.publish(Topic::Event(tenant.to_owned(), kind).to_string(), &body);
    }

    fn event_in(&self, cx: &mut Cx, tenant: &str, kind: EventKind, body: Value) {
        let mut body = body;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("type".into(), json!(kind.as_str()));
            obj.insert("time".into(), json!(rfc3339(self.now())));
        }
        cx.publish(Topic::Event(tenant.to_owned(), kind).to_string(), &body);
    }

    fn publish_audit(&self, records: &[AuditRecord]) {
        for r in records {
            if let Ok(v) = serde_json::to_value(r) {
                self.publish(
                    Topic::Event(r.tenant.clone(), EventKind::Audit).to_string(),
                    &v,
                );
            }
        }
    }

    /// Commits changes (with their audit records) durably, then publishes the audit records.
    fn commit(&self, changes: Vec<Change>) -> Result<(), CommandError> {
        match self.store.apply(changes) {
            Ok(records) => {
                self.publish_audit(&records);
                Ok(())
            }
            Err(e) => {
                warn!("store: {e}");
                Err(CommandError::internal(format!(
                    "the store refused the change: {e}"
                )))
            }
        }
    }

    /// Queues an audit record; the future completes once it is durable and published.
    fn audit_later(&self, record: AuditRecord) -> AuditFuture {
        let committed = self.store.apply_async(vec![Change::Audit(record)]);
        let out = self.out.clone();
        Box::pin(async move {
            match committed.await {
                Ok(records) => {
                    for r in records {
                        if let Ok(v) = serde_json::to_value(&r) {
                            let _ = out.send(Publication {
                                topic: Topic::Event(r.tenant.clone(), EventKind::Audit).to_string(),
                                payload: v.to_string().into_bytes(),
                            });
                        }
                    }
                    true
                }
                Err(e) => {
                    warn!("audit record not stored: {e}");
                    false
                }
            }
        })
    }

    fn online(&self, live: &Live, serial: &Serial) -> bool {
        live.sessions.contains_key(&serial.client_id())
    }

    fn view(&self, live: &Live, station: &Station) -> Value {
        let mut v = station.view(self.online(live, &station.serial));
        if let (Some(seen), Some(obj)) = (live.last_seen.get(&station.serial), v.as_object_mut()) {
            if station.last_seen.is_none_or(|stored| *seen > stored) {
                obj.insert("last_seen".into(), json!(rfc3339(*seen)));
            }
        }
        v
    }

    /// Rights of a station session with `presented` under the station's current record.
    fn station_decision(
        &self,
        serial: &Serial,
        presented: &Presented,
    ) -> Result<Admit, CommandError> {
        let record = self
            .store
            .station(serial)
            .map_err(|e| CommandError::internal(e.to_string()))?;
        Ok(station::admit(record.as_ref(), presented))
    }

    fn rights_of(&self, identity: &Identity) -> Result<Option<Rights>, CommandError> {
        Ok(match identity {
            Identity::Operator { id, serial, key } => self
                .operator_admits(id, serial, key)
                .ok()
                .map(|()| identity::operator_rights(&id.name, &id.tenant)),
            Identity::Phone { mac, presented } => self.phone_rights_now(mac, presented)?,
            Identity::Station { serial, presented } => match self
                .station_decision(serial, presented)?
            {
                Admit::Pending => Some(identity::station_rights(serial, StationRights::Pending)),
                Admit::Legacy => Some(identity::station_rights(serial, StationRights::Legacy)),
                Admit::Authorized => {
                    Some(identity::station_rights(serial, StationRights::Authorized))
                }
                Admit::Deny(_) => None,
            },
        })
    }

    /// Whether the operator registry admits `id` with the certificate `serial`: registered,
    /// not revoked, and this very certificate.
    fn operator_admits(
        &self,
        id: &OperatorId,
        serial: &str,
        key: &fleet_certs::Fingerprint,
    ) -> Result<(), String> {
        match self.operators.get(&id.tenant, &id.name) {
            // The very certificate issued: its serial and its key, for this tenant and name (a
            // case-insensitive file system could hand back another's record).
            Ok(Some(record)) if record.tenant != id.tenant || record.name != id.name => {
                Err(format!("operator {id} is not in the operator registry"))
            }
            Ok(Some(record)) if record.fingerprint != *key => {
                Err("not the key issued to this operator".to_owned())
            }
            Ok(Some(record)) => record.admits(serial).map_err(str::to_owned),
            Ok(None) => Err(format!(
                "operator {id} is not in the operator registry (a certificate issued elsewhere)"
            )),
            Err(e) => Err(format!("operator registry unreadable: {e}")),
        }
    }

    /// The tenant of the device a client id names (`phone-<mac>`, `station-<serial>`), if the
    /// device is known; else the default tenant.
    fn tenant_of_client_id(&self, client_id: &str) -> String {
        let tenant = match ClaimedClient::of(client_id) {
            ClaimedClient::Phone(mac) => mac
                .ok()
                .and_then(|mac| self.store.phone(&mac).ok().flatten())
                .map(|p| p.tenant),
            ClaimedClient::Station(serial) => serial
                .ok()
                .and_then(|serial| self.store.station(&serial).ok().flatten())
                .map(|s| s.tenant),
            ClaimedClient::Other => None,
        };
        tenant.unwrap_or_else(|| station::DEFAULT_TENANT.to_owned())
    }

    // ---------------------------------------------------------------- admission

    /// Audits a refused CONNECT within the per-address budget (a flood must not fill the disk);
    /// refusals over the budget are counted into the next audited one. The record is queued at
    /// once; the future says when it is durable.
    fn audit_refusal(
        &self,
        ip: IpAddr,
        at: OffsetDateTime,
        tenant: &str,
        actor: String,
        device: Option<String>,
        reason: &str,
    ) -> Option<AuditFuture> {
        let budget = self
            .audit_budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spend(ip, at);
        match budget {
            Some(0) => Some(self.audit_later(AuditRecord::new(
                at,
                tenant,
                actor,
                device,
                "connect",
                Outcome::Refused,
                Some(reason.to_owned()),
            ))),
            Some(left_out) => Some(self.audit_later(AuditRecord::new(
                at,
                tenant,
                actor,
                device,
                "connect",
                Outcome::Refused,
                Some(format!(
                    "{reason} (and {left_out} earlier refusals of this address not audited)"
                )),
            ))),
            None => {
                debug!(%ip, "refusal over the audit budget: {reason}");
                None
            }
        }
    }

    /// Admission; the flag says whether a refusal is to be answered only after a delay (the
    /// address is half-way to being refused for failed authentications). The decision may be
    /// told only once the returned audit records are durable.
    fn admit_now(&self, info: ConnectInfo) -> (Decision, bool, Vec<AuditFuture>) {
        let at = self.now();
        let ip = info.peer_addr.ip();
        let slow = std::cell::Cell::new(false);
        let audits = std::cell::RefCell::new(Vec::new());
        // `counts`: a failed authentication (wrong PAP, unknown device, identity that does not
        // fit); a station an operator rejected does not count.
        let deny = |refusal: Refusal,
                    reason: String,
                    tenant: &str,
                    device: Option<String>,
                    counts: bool| {
            info!(client_id = %info.client_id.escape_default(), peer = %info.peer_addr, "admission refused: {reason}");
            if counts {
                let verdict = self
                    .failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .record_failure(ip, at);
                slow.set(verdict != Verdict::Allow);
            }
            if let Some(audit) =
                self.audit_refusal(ip, at, tenant, info.peer_addr.to_string(), device, &reason)
            {
                audits.borrow_mut().push(audit);
            }
            Decision::Deny { refusal, reason }
        };
        // A valid operator certificate is never refused for the failures of others from the
        // same address (a PAP guesser beside the operator's machine must not lock it out).
        let operator = match identity::identify(&info) {
            Ok(Identity::Operator { id, serial, key }) => {
                self.operator_admits(&id, &serial, &key).is_ok()
            }
            _ => false,
        };
        let verdict = if operator {
            Verdict::Allow
        } else {
            self.failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check(ip, at)
        };
        if let Verdict::Refuse { until } = verdict {
            let reason = format!(
                "too many failed authentications from {ip}; refused until {}",
                rfc3339(until)
            );
            let device = Some(info.client_id.chars().take(80).collect());
            let decision = deny(
                Refusal::NotAuthorized,
                reason,
                station::DEFAULT_TENANT,
                device,
                false,
            );
            return (decision, true, audits.into_inner());
        }
        let (decision, audit) = self.decide_admission(&info, at, &deny);
        let mut audits = audits.into_inner();
        audits.extend(audit);
        (decision, slow.get(), audits)
    }

    /// The decision, and the audit record of an admitted session (refusals are audited by
    /// `deny`).
    fn decide_admission(
        &self,
        info: &ConnectInfo,
        at: OffsetDateTime,
        deny: &DenyFn<'_>,
    ) -> (Decision, Option<AuditFuture>) {
        let identity = match identity::identify(info) {
            Ok(i) => i,
            Err(reason) => {
                let device: String = info.client_id.chars().take(80).collect();
                // Audited in the device's tenant when the client id names a known device.
                let tenant = self.tenant_of_client_id(&info.client_id);
                let decision = deny(Refusal::NotAuthorized, reason, &tenant, Some(device), true);
                return (decision, None);
            }
        };
        let mut live = self.lock();
        // Operators may use any client id (PROTOCOL §1), but not one another operator's live
        // session holds: taking it over would let one operator (of any tenant) cut another.
        // Another operator is another tenant, or another name: both together are who it is.
        if let (
            Identity::Operator { id, .. },
            Some(LiveSession {
                identity: Identity::Operator { id: holder, .. },
                ..
            }),
        ) = (&identity, live.sessions.get(&info.client_id))
        {
            if holder != id {
                drop(live);
                let reason = "client id in use by another operator's session".to_owned();
                return (
                    deny(Refusal::NotAuthorized, reason, &id.tenant, None, false),
                    None,
                );
            }
        }
        let (rights, tenant, device, level) = match &identity {
            Identity::Phone { mac, presented } => {
                match self.admit_phone(&mut live, mac, presented, info.peer_addr.ip(), at) {
                    Ok((rights, tenant, level)) => (rights, tenant, Some(mac.to_string()), level),
                    Err((refusal, reason, tenant)) => {
                        drop(live);
                        return (
                            deny(refusal, reason, &tenant, Some(mac.to_string()), true),
                            None,
                        );
                    }
                }
            }
            Identity::Operator { id, serial, key } => {
                if let Err(reason) = self.operator_admits(id, serial, key) {
                    drop(live);
                    return (
                        deny(Refusal::NotAuthorized, reason, &id.tenant, None, false),
                        None,
                    );
                }
                self.operator_sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(
                        info.session_id,
                        Requester {
                            client_id: info.client_id.clone(),
                            session_id: info.session_id,
                            operator: id.clone(),
                        },
                    );
                (
                    identity::operator_rights(&id.name, &id.tenant),
                    id.tenant.clone(),
                    None,
                    "operator",
                )
            }
            Identity::Station { serial, presented } => {
                let record = match self.store.station(serial) {
                    Ok(r) => r,
                    Err(e) => {
                        drop(live);
                        let decision = Decision::Deny {
                            refusal: Refusal::ServerUnavailable,
                            reason: format!("store unavailable: {e}"),
                        };
                        return (decision, None);
                    }
                };
                let tenant = record
                    .as_ref()
                    .map(|r| r.tenant.clone())
                    .unwrap_or_else(|| station::DEFAULT_TENANT.to_owned());
                if record.is_none() {
                    let ip = info.peer_addr.ip().to_string();
                    if let Err(reason) = self.may_add_pending(&live, serial, &ip) {
                        drop(live);
                        let decision = deny(
                            Refusal::QuotaExceeded,
                            reason,
                            &tenant,
                            Some(serial.to_string()),
                            false,
                        );
                        return (decision, None);
                    }
                }
                let (level, name) = match station::admit(record.as_ref(), presented) {
                    Admit::Pending => (StationRights::Pending, "pending"),
                    Admit::Legacy => (StationRights::Legacy, "legacy"),
                    Admit::Authorized => (StationRights::Authorized, "authorized"),
                    Admit::Deny(reason) => {
                        drop(live);
                        let counts = !matches!(reason, DenyReason::Rejected);
                        let decision = deny(
                            Refusal::NotAuthorized,
                            reason.to_string(),
                            &tenant,
                            Some(serial.to_string()),
                            counts,
                        );
                        // The security event goes out after the refusal's audit record (queued
                        // by `deny`) is durable: `admit` awaits these in order.
                        let event = match &reason {
                            DenyReason::IdentityMismatch { pinned, presented } => {
                                let mut body = json!({
                                    "event": "identity_mismatch",
                                    "serial": serial.as_str(),
                                    "pinned": pinned.to_string(),
                                    "presented": presented.map(|p| p.to_string()),
                                    "ip": info.peer_addr.ip().to_string(),
                                    "advice": "possible clone, or authentication deleted on the station: remove the station, then reboot it",
                                    "type": EventKind::Security.as_str(),
                                });
                                body["time"] = json!(rfc3339(at));
                                let out = self.out.clone();
                                let publication = Publication {
                                    topic: Topic::Event(tenant.to_owned(), EventKind::Security)
                                        .to_string(),
                                    payload: body.to_string().into_bytes(),
                                };
                                let later: AuditFuture = Box::pin(async move {
                                    let _ = out.send(publication);
                                    true
                                });
                                Some(later)
                            }
                            _ => None,
                        };
                        return (decision, event);
                    }
                };
                (
                    identity::station_rights(serial, level),
                    tenant,
                    Some(serial.to_string()),
                    name,
                )
            }
        };
        let previous = live.sessions.remove(&info.client_id).map(|mut p| {
            p.previous = None;
            Box::new(p)
        });
        live.sessions.insert(
            info.client_id.clone(),
            LiveSession {
                session_id: info.session_id,
                identity: identity.clone(),
                ip: info.peer_addr.ip(),
                previous,
            },
        );
        if let Identity::Phone { .. } = &identity {
            live.last_phone_ip
                .insert(info.client_id.clone(), info.peer_addr.ip());
        }
        if let Identity::Station { serial, presented } = &identity {
            live.last_seen.insert(serial.clone(), at);
            live.last_station_session
                .insert(info.client_id.clone(), (*presented, info.peer_addr.ip()));
        }
        drop(live);
        let audit = self.audit_later(AuditRecord::new(
            at,
            tenant,
            info.peer_addr.to_string(),
            device,
            "connect",
            Outcome::Ok,
            Some(format!("admitted with {level} rights")),
        ));
        let reserved = matches!(identity, Identity::Operator { .. });
        (Decision::Allow { rights, reserved }, Some(audit))
    }

    fn opened(&self, client_id: &str, session_id: u64) -> Option<Rights> {
        let mut live = self.lock();
        let session = live
            .sessions
            .get_mut(client_id)
            .filter(|s| s.session_id == session_id)?;
        // Registered: the session it took over is gone.
        session.previous = None;
        self.rights_of(&session.identity).ok().flatten()
    }

    fn closed(&self, client_id: &str, session_id: u64) {
        self.operator_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session_id);
        let mut live = self.lock();
        // A session that was never registered (refused for a cap after its admission) leaves
        // the one it would have taken over in place, if the front door still holds it.
        let restore = live
            .sessions
            .get_mut(client_id)
            .filter(|s| s.session_id == session_id)
            .and_then(|s| s.previous.take())
            .filter(|_| self.sessions.is_connected(client_id));
        if let Some(previous) = restore {
            live.sessions.insert(client_id.to_owned(), *previous);
            return;
        }
        if live
            .sessions
            .get(client_id)
            .is_some_and(|s| s.session_id == session_id)
        {
            if let Some(LiveSession {
                identity: Identity::Station { serial, .. },
                ..
            }) = live.sessions.remove(client_id)
            {
                match self.store.station(&serial) {
                    Ok(Some(station)) => {
                        live.last_seen.insert(serial.clone(), self.now());
                        let view = self.view(&live, &station);
                        drop(live);
                        self.event(
                            &station.tenant,
                            EventKind::Stations,
                            json!({"event": "offline", "station": view}),
                        );
                    }
                    // No record (a client that never asked): nothing to remember it by.
                    _ => {
                        live.last_seen.remove(&serial);
                        Self::bound_last_sessions(&mut live);
                    }
                }
            } else {
                Self::bound_last_sessions(&mut live);
            }
        }
    }

    /// The identities of closed sessions are kept so that a message sent just before a close is
    /// still attributed (PROTOCOL §3); anonymous clients must not grow them without bound: past
    /// a bound, only those of live sessions are kept.
    fn bound_last_sessions(live: &mut Live) {
        let bound = 2 * live.sessions.len() + 10_000;
        if live.last_station_session.len() > bound {
            let sessions = &live.sessions;
            live.last_station_session
                .retain(|client_id, _| sessions.contains_key(client_id));
        }
        if live.last_phone_ip.len() > bound {
            let sessions = &live.sessions;
            live.last_phone_ip
                .retain(|client_id, _| sessions.contains_key(client_id));
        }
    }

    // ---------------------------------------------------------------- effects

    fn apply_transition(
        &self,
        live: &Live,
        cx: &mut Cx,
        serial: &Serial,
        transition: Transition,
        audit: AuditRecord,
        tenant: &str,
    ) -> Result<Option<Station>, CommandError> {
        let mut changes = Vec::with_capacity(2);
        match &transition.station {
            Some(s) => changes.push(Change::PutStation(s.clone())),
            None => changes.push(Change::DeleteStation(serial.clone())),
        }
        let at = audit.time;
        changes.push(Change::Audit(audit));
        // The live session holding the station's client id must present the key the record
        // pins; another key (an impostor that took the client id) never hears `authorized`:
        // it is cut, and the security event raised.
        let mut effects = transition.effects.clone();
        if let Some(record) = transition.station.as_ref().filter(|s| {
            s.standing == Standing::Authorized
                && effects.contains(&Effect::Send(station::Command::Authorized))
        }) {
            let holder = live
                .sessions
                .get(&serial.client_id())
                .and_then(|s| match &s.identity {
                    Identity::Station { presented, .. } => Some((*presented, s.ip, s.session_id)),
                    _ => None,
                });
            if let Some((_, _, session_id)) =
                holder.filter(|(p, _, _)| p.key() == record.fingerprint)
            {
                // `authorized` goes to the session whose key was checked, and to no other.
                effects.retain(|e| *e != Effect::Send(station::Command::Authorized));
                cx.out.push(Output::DeliverTo {
                    client_id: serial.client_id(),
                    session_id,
                    topic: Topic::StationCmd(serial.clone()).to_string(),
                    payload: station::Command::Authorized
                        .payload()
                        .to_string()
                        .into_bytes(),
                });
            }
            if let Some((presented, ip, _)) =
                holder.filter(|(p, _, _)| p.key() != record.fingerprint)
            {
                effects.retain(|e| !matches!(e, Effect::Send(_) | Effect::Rights));
                changes.push(Change::Audit(AuditRecord::new(
                    at,
                    tenant,
                    serial.client_id(),
                    Some(serial.to_string()),
                    "identity_mismatch",
                    Outcome::Refused,
                    Some(format!(
                        "the live session from {ip} presents {}, not the accepted key: cut",
                        presented
                            .key()
                            .map_or("no key".to_owned(), |k| k.to_string())
                    )),
                )));
                cx.out.push(Output::Cut {
                    client_id: serial.client_id(),
                    after: None,
                });
                self.event_in(
                    cx,
                    tenant,
                    EventKind::Security,
                    json!({
                        "event": "identity_mismatch",
                        "serial": serial.as_str(),
                        "pinned": record.fingerprint.map(|f| f.to_string()),
                        "presented": presented.key().map(|p| p.to_string()),
                        "ip": ip.to_string(),
                        "advice": "a session with another key held the station's client id when it was accepted: it was cut",
                    }),
                );
            }
        }
        // Durable first (at the batch's commit); only then does anyone hear of it.
        cx.commit(changes)?;
        self.run_effects(cx, serial, &effects, tenant);
        let view = match &transition.station {
            Some(s) => self.view(live, s),
            None => json!({"serial": serial.as_str(), "state": null, "removed": true}),
        };
        self.event_in(
            cx,
            tenant,
            EventKind::Stations,
            json!({"event": "state", "station": view}),
        );
        Ok(transition.station)
    }

    fn run_effects(&self, cx: &mut Cx, serial: &Serial, effects: &[Effect], tenant: &str) {
        let cmd_topic = Topic::StationCmd(serial.clone()).to_string();
        for effect in effects {
            match effect {
                Effect::Send(cmd) => cx.publish(cmd_topic.clone(), &cmd.payload()),
                Effect::Cut(cmd) => {
                    // The station is first sent its `cmd`, so that it knows why; the front door
                    // withdraws its rights now and closes once that message is written (bounded
                    // grace).
                    cx.publish(cmd_topic.clone(), &cmd.payload());
                    cx.out.push(Output::Cut {
                        client_id: serial.client_id(),
                        after: Some(cmd_topic.clone()),
                    });
                }
                Effect::Rights => cx.out.push(Output::Recheck(serial.clone())),
                Effect::Event { kind, detail } => self.event_in(
                    cx,
                    tenant,
                    if *kind == "identity_mismatch" {
                        EventKind::Security
                    } else {
                        EventKind::Stations
                    },
                    json!({"event": kind, "serial": serial.as_str(), "detail": detail}),
                ),
            }
        }
    }

    /// What a batch said or did, once it is committed; `live` is still locked. `written`: the
    /// station records the batch committed.
    fn perform(&self, live: &Live, written: &HashMap<Serial, Option<Station>>, output: Output) {
        match output {
            Output::Publish(p) => self.send_out(p),
            Output::Respond { to, responses, .. } => self.respond(&to, responses),
            Output::Cut { client_id, after } => {
                self.sessions.cut(&client_id, after);
            }
            Output::LiftBlock(ip) => {
                let now = self.now();
                self.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .lift(ip, now);
            }
            Output::DeliverTo {
                client_id,
                session_id,
                topic,
                payload,
            } => {
                self.sessions
                    .deliver_to(&client_id, session_id, topic, payload);
            }
            Output::Recheck(serial) => {
                let client_id = serial.client_id();
                let Some(LiveSession {
                    identity: Identity::Station { presented, .. },
                    session_id,
                    ..
                }) = live.sessions.get(&client_id)
                else {
                    return;
                };
                // Rights only grow in place (an accepted station gains them at once); any other
                // change cuts the session, so that no subscription made under the old rights
                // outlives them.
                // The batch's own record is the committed one; no need to read it back.
                let decision = match written.get(&serial) {
                    Some(record) => Ok(station::admit(record.as_ref(), presented)),
                    None => self.station_decision(&serial, presented),
                };
                match decision {
                    Ok(Admit::Authorized) => {
                        let rights = identity::station_rights(&serial, StationRights::Authorized);
                        // Only the session whose key was checked; one that took the client id
                        // over since is re-checked by its own admission.
                        self.sessions.set_rights_of(&client_id, *session_id, rights);
                    }
                    _ => {
                        self.sessions.cut(&client_id, None);
                    }
                }
            }
        }
    }

    /// Handles a batch of messages from the router in ONE store transaction: every change of
    /// the batch is committed (one fsync) before anything of it is published, answered or cut.
    /// Messages are handled in order, each seeing the changes of those before it. Never panics
    /// on what a peer sent.
    /// Returns whether the batch's changes were committed.
    pub fn handle_batch<'m>(&self, messages: impl IntoIterator<Item = Incoming<'m>>) -> bool {
        let mut live = self.lock();
        let txn = match self.store.begin() {
            Ok(txn) => txn,
            Err(e) => {
                warn!("store: cannot begin a transaction, messages dropped: {e}");
                return false;
            }
        };
        let mut cx = Cx {
            txn,
            out: Vec::new(),
            written: HashMap::new(),
        };
        let started = std::time::Instant::now();
        let mut handled = 0usize;
        for message in messages {
            match message {
                Incoming::Routed { topic, payload } => {
                    self.handle_in(&mut live, &mut cx, topic, payload)
                }
                Incoming::Request { from, payload } => {
                    self.on_operator_request(&mut live, &mut cx, from, payload)
                }
            }
            handled += 1;
        }
        let Cx { txn, out, written } = cx;
        let handled_at = started.elapsed();
        match txn.commit() {
            Ok(records) => {
                let committed_at = started.elapsed();
                for (serial, record) in &written {
                    live.pending.update(serial, record.as_ref());
                }
                self.publish_audit(&records);
                let outputs = out.len();
                for output in out {
                    self.perform(&live, &written, output);
                }
                debug!(
                    target: "fleet_controller::batch",
                    messages = handled,
                    records = records.len(),
                    outputs,
                    handled_ms = handled_at.as_secs_f64() * 1e3,
                    committed_ms = committed_at.as_secs_f64() * 1e3,
                    done_ms = started.elapsed().as_secs_f64() * 1e3,
                    "batch"
                );
                true
            }
            Err(e) => {
                warn!("store: a batch of messages was not committed: {e}");
                // The batch may have changed the in-memory whitelists and the pending index; the
                // store has the truth.
                match self.store.whitelists() {
                    Ok(w) => live.whitelists = w,
                    Err(e) => warn!("store: whitelists not reloaded: {e}"),
                }
                match self.store.stations() {
                    Ok(stations) => live.pending = PendingIndex::build(&stations),
                    Err(e) => warn!("store: pending stations not reloaded: {e}"),
                }
                let error = CommandError::internal(format!("the store refused the change: {e}"));
                for output in out {
                    // A cut is never wrong to carry out: it only takes rights away.
                    if let Output::Cut { client_id, after } = output {
                        self.sessions.cut(&client_id, after);
                        continue;
                    }
                    if let Output::Respond { to, commands, .. } = output {
                        let responses = commands
                            .iter()
                            .map(|(name, correlation)| error_response(name, correlation, &error))
                            .collect();
                        self.respond(&to, responses);
                    }
                }
                false
            }
        }
    }

    /// Handles one message from the router (a batch of one).
    pub fn handle_message(&self, topic: &str, payload: &[u8]) {
        self.handle_batch([Incoming::Routed { topic, payload }]);
    }

    // ---------------------------------------------------------------- station messages

    fn handle_in(&self, live: &mut Live, cx: &mut Cx, topic: &str, payload: &[u8]) {
        if payload.len() > self.settings.max_payload_bytes {
            warn!(topic = %topic.escape_default(), "payload over {} bytes dropped", self.settings.max_payload_bytes);
            return;
        }
        match Topic::parse(topic) {
            Some(Topic::StationAuthRequest(serial)) => {
                self.on_auth_request(live, cx, serial, payload)
            }
            Some(Topic::StationStatus(serial)) => {
                live.last_seen.insert(serial, self.now());
            }
            Some(Topic::StationFirmwareRequest(serial)) => {
                self.on_firmware_request(cx, serial, payload)
            }
            Some(Topic::PhoneProvisionRequest(mac)) => {
                self.on_provision_request(live, cx, mac, payload)
            }
            Some(Topic::PhoneProvisionComplete(mac)) => self.on_provision_complete(live, cx, mac),
            _ => {}
        }
    }

    fn on_auth_request(&self, live: &mut Live, cx: &mut Cx, serial: Serial, payload: &[u8]) {
        // Only the station's own session may publish here (the front door enforces it), so the
        // sender is the client id's live session, or its last one if it already closed.
        let Some((presented, ip)) = live.last_station_session.get(&serial.client_id()) else {
            return;
        };
        let presented = *presented;
        let ip = ip.to_string();
        let record = match cx.txn.station(&serial) {
            Ok(r) => r,
            Err(e) => {
                warn!("store: {e}");
                return;
            }
        };
        let tenant = record
            .as_ref()
            .map(|r| r.tenant.clone())
            .unwrap_or_else(|| station::DEFAULT_TENANT.to_owned());
        let request = match AuthRequest::parse(&serial, payload) {
            Ok(r) => r,
            Err(e) => {
                self.event_in(cx, &tenant, EventKind::Stations, json!({"event": "bad_request", "serial": serial.as_str(), "error": e.to_string()}));
                return;
            }
        };
        if record.is_none() {
            if let Err(reason) = self.may_add_pending(live, &serial, &ip) {
                let at = self.now();
                let _ = cx.commit(vec![Change::Audit(AuditRecord::new(
                    at,
                    &tenant,
                    serial.client_id(),
                    Some(serial.to_string()),
                    "auth_request",
                    Outcome::Refused,
                    Some(reason.clone()),
                ))]);
                self.event_in(
                    cx,
                    &tenant,
                    EventKind::Stations,
                    json!({"event": "refused", "serial": serial.as_str(), "error": reason}),
                );
                return;
            }
        }
        let before = record.as_ref().map(|r| r.standing.clone());
        let at = self.now();
        let transition = station::on_auth_request(
            record,
            serial.clone(),
            request,
            presented,
            Some(ip),
            &self.settings.policy,
            at,
        );
        let after = transition.station.as_ref().map(|s| s.standing.clone());
        let reason = match &after {
            Some(s) => format!(
                "{} -> {}",
                before.as_ref().map(|b| b.label()).unwrap_or("new"),
                s.label()
            ),
            None => "deleted".into(),
        };
        let audit = AuditRecord::new(
            at,
            &tenant,
            serial.client_id(),
            Some(serial.to_string()),
            "auth_request",
            Outcome::Ok,
            Some(reason),
        );
        match self.apply_transition(live, cx, &serial, transition, audit, &tenant) {
            // Counted at once, so that one batch cannot pass the limits either; the index is
            // rebuilt from the store if the batch's commit fails.
            Ok(record) => live.pending.update(&serial, record.as_ref()),
            Err(e) => warn!("auth request of {serial} not applied: {e}"),
        }
    }

    /// Whether a new station record may be made for `serial`, requested from `ip`: within the
    /// pending-station limits, and no other station's serial differs from it only in case.
    fn may_add_pending(&self, live: &Live, serial: &Serial, ip: &str) -> Result<(), String> {
        if let Some(twin) = live.pending.case_twin(serial) {
            return Err(format!(
                "serial {serial} differs from the known station {twin} only in case; serials are \
                 case-sensitive and no two stations may differ only in case"
            ));
        }
        let from_ip = ip
            .parse::<IpAddr>()
            .map_or(0, |ip| live.pending.waiting_from(ip));
        self.settings
            .pending
            .limits
            .admit_new_pending(from_ip, live.pending.total())
            .map_err(|e| e.to_string())
    }

    /// Deletes the stations that have waited for approval unseen for longer than
    /// `[limits] pending_expiry_hours` (and are not connected), each with an audit record.
    /// Returns how many. The bus task calls it every minute; tests call it after moving the
    /// simulated clock.
    pub fn expire_pending(&self) -> usize {
        let mut live = self.lock();
        let now = self.now();
        let expiry = self.settings.pending.expiry;
        let candidates: Vec<Serial> = live.pending.waiting.keys().cloned().collect();
        let mut changes = Vec::new();
        let mut expired = Vec::new();
        for serial in candidates {
            if live.sessions.contains_key(&serial.client_id()) {
                continue;
            }
            let Ok(Some(record)) = self.store.station(&serial) else {
                continue;
            };
            let seen = [record.last_seen, live.last_seen.get(&serial).copied()]
                .into_iter()
                .flatten()
                .fold(record.updated_at, |a, b| a.max(b));
            if PendingIndex::is_waiting(&record) && crate::flood::pending_expired(seen, now, expiry)
            {
                changes.push(Change::DeleteStation(serial.clone()));
                changes.push(Change::Audit(AuditRecord::new(
                    now,
                    &record.tenant,
                    "controller",
                    Some(serial.to_string()),
                    "expire",
                    Outcome::Ok,
                    Some(format!(
                        "waited for approval unseen since {}",
                        rfc3339(seen)
                    )),
                )));
                expired.push((serial, record.tenant));
            }
        }
        if expired.is_empty() {
            return 0;
        }
        if let Err(e) = self.commit(changes) {
            warn!("expired stations not deleted: {e}");
            return 0;
        }
        for (serial, tenant) in &expired {
            live.pending.update(serial, None);
            live.last_seen.remove(serial);
            self.event(
                tenant,
                EventKind::Stations,
                json!({"event": "expired", "serial": serial.as_str()}),
            );
        }
        expired.len()
    }

    fn on_firmware_request(&self, cx: &mut Cx, serial: Serial, payload: &[u8]) {
        let topic = Topic::StationFirmwareChunk(serial.clone()).to_string();
        let request: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                cx.publish(
                    topic,
                    &json!({"error": format!("not JSON: {e}"), "code": "invalid_argument"}),
                );
                return;
            }
        };
        let version_text = request
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let fail = |cx: &mut Cx, code: &str, error: String| {
            cx.publish(
                topic.clone(),
                &json!({"version": version_text, "error": error, "code": code}),
            );
        };
        let Some(offset) = request.get("offset").and_then(Value::as_u64) else {
            return fail(
                cx,
                "invalid_argument",
                "offset must be a non-negative integer".into(),
            );
        };
        let length = request
            .get("length")
            .and_then(Value::as_u64)
            .unwrap_or(self.settings.chunk_size as u64)
            .min(self.settings.chunk_size as u64);
        let record = match cx.txn.station(&serial) {
            Ok(Some(r)) => r,
            _ => return fail(cx, "not_found", "no such station".into()),
        };
        let Standing::Updating { version, .. } = &record.standing else {
            return fail(
                cx,
                "wrong_state",
                format!("station is {}, not updating", record.standing.label()),
            );
        };
        if *version != version_text {
            return fail(
                cx,
                "invalid_argument",
                format!("the update in progress is {version}"),
            );
        }
        let image = parse_version(version).and_then(|v| self.settings.catalog.find(&v).cloned());
        let Some(image) = image else {
            return fail(
                cx,
                "not_found",
                format!("firmware {version} is not in the catalog"),
            );
        };
        if offset > image.size {
            return fail(
                cx,
                "invalid_argument",
                format!("offset {offset} beyond the image size {}", image.size),
            );
        }
        let mut data = vec![0u8; (length.min(image.size - offset)) as usize];
        let read = std::fs::File::open(&image.path).and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(&mut data)
        });
        if let Err(e) = read {
            warn!("firmware image {}: {e}", image.path.display());
            return fail(cx, "internal", "the firmware image cannot be read".into());
        }
        cx.publish(
            topic.clone(),
            &json!({
                "version": version_text,
                "offset": offset,
                "total": image.size,
                "data": base64::engine::general_purpose::STANDARD.encode(&data),
            }),
        );
    }

    // ---------------------------------------------------------------- operators

    /// Answers the session that sent the request, and no other: responses bypass the router,
    /// where another operator of the same name (in another tenant) could subscribe.
    fn respond(&self, to: &Requester, responses: Vec<Value>) {
        let payload = json!({"responses": responses}).to_string().into_bytes();
        let topic = Topic::OperatorResponse(to.operator.name.clone()).to_string();
        if !self
            .sessions
            .deliver_to(&to.client_id, to.session_id, topic, payload)
        {
            debug!(client_id = %to.client_id, "response not delivered: the session is gone or was ended");
        }
    }

    /// Answers an operator once the batch is committed; `commands` (name, correlation data)
    /// are what to answer with an error if the commit fails.
    fn respond_in(
        &self,
        cx: &mut Cx,
        to: &Requester,
        commands: Vec<(Value, Value)>,
        responses: Vec<Value>,
    ) {
        cx.out.push(Output::Respond {
            to: to.clone(),
            commands,
            responses,
        });
    }

    fn on_operator_request(&self, live: &mut Live, cx: &mut Cx, from: &Requester, payload: &[u8]) {
        // The tenant of every command is the tenant of the session that sent it.
        let operator = from.operator.name.as_str();
        let tenant = from.operator.tenant.clone();
        // A request queued before its operator was revoked does not run after it. (Its session
        // was admitted with the registered certificate; what can change since is a revocation,
        // which `revokeOperator` records here too: no file read per request.)
        let revoked = self
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&from.operator);
        if revoked {
            let e = CommandError::forbidden(format!(
                "operator {} is revoked: its requests are not run",
                from.operator
            ));
            return self.respond_in(
                cx,
                from,
                vec![(Value::Null, Value::Null)],
                vec![error_response(&Value::Null, &Value::Null, &e)],
            );
        }
        if payload.len() > self.settings.max_payload_bytes {
            let e = CommandError::invalid_argument(format!(
                "request over {} bytes",
                self.settings.max_payload_bytes
            ));
            return self.respond_in(
                cx,
                from,
                vec![(Value::Null, Value::Null)],
                vec![error_response(&Value::Null, &Value::Null, &e)],
            );
        }
        let commands = match parse_request(payload, self.settings.requests.max_commands) {
            Ok(c) => c,
            Err(e) => {
                return self.respond_in(
                    cx,
                    from,
                    vec![(Value::Null, Value::Null)],
                    vec![error_response(&Value::Null, &Value::Null, &e)],
                );
            }
        };
        // One operator's share of the controller: commands past its budget are not run.
        let at = self.now();
        let wanted = u32::try_from(commands.len()).unwrap_or(u32::MAX);
        let taken =
            self.budget
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(&from.operator, wanted, at);
        let limited = CommandError::new(
            ErrorCode::RateLimited,
            format!(
                "more than {} commands a second (burst {}); retry in {} ms",
                self.settings.requests.commands_per_second,
                self.settings.requests.burst,
                taken
                    .retry_after
                    .map_or(0, |d| d.whole_milliseconds().max(1))
            ),
        );
        let mut granted = taken.granted;
        let mut refused = 0u32;
        let max_bytes = self.settings.requests.max_response_bytes;
        let mut bytes = 0usize;
        let mut responses = Vec::with_capacity(commands.len());
        let mut answered = Vec::with_capacity(commands.len());
        for command in commands {
            let name = command.args.get("command").cloned().unwrap_or(Value::Null);
            let correlation = command.correlation;
            if granted == 0 {
                refused += 1;
                responses.push(error_response(&name, &correlation, &limited));
                answered.push((name, correlation));
                continue;
            }
            granted -= 1;
            // Once the response is full, a read is not even run: its answer could only be
            // `too_large`, and reading and encoding a page for nothing is the work a flood wants.
            let read = command.name.as_deref().is_ok_and(is_read_command);
            if read && bytes >= max_bytes {
                let e = CommandError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the response reached {max_bytes} bytes: ask for a smaller page (limit, after) or fewer commands in one request"
                    ),
                );
                responses.push(error_response(&name, &correlation, &e));
                answered.push((name, correlation));
                continue;
            }
            let result = match &command.name {
                Ok(n) => self.run_command(live, cx, operator, &tenant, n, &command.args),
                Err(e) => Err(e.clone()),
            };
            let mut response = match result {
                Ok((data, decided)) => (
                    json!({"command": name, "correlationData": correlation, "data": data}),
                    decided,
                ),
                Err(e) => (error_response(&name, &correlation, &e), false),
            };
            // The whole response stays within its bound: a read that would pass it is answered
            // `too_large` instead (a decision is answered whatever its size; it is small).
            let size = serde_json::to_vec(&response.0).map_or(0, |v| v.len());
            if !response.1 && bytes + size > max_bytes {
                let e = CommandError::new(
                    ErrorCode::TooLarge,
                    format!(
                        "the response would exceed {max_bytes} bytes: ask for a smaller page (limit, after) or fewer commands in one request"
                    ),
                );
                response.0 = error_response(&name, &correlation, &e);
            } else {
                bytes += size;
            }
            responses.push(response.0);
            answered.push((name, correlation));
        }
        if refused > 0 {
            // One record a minute for the lot: a flooding operator cannot fill the audit log.
            let due = {
                let mut audits = self.rate_audits.lock().unwrap_or_else(|e| e.into_inner());
                let entry = audits
                    .entry(from.operator.clone())
                    .or_insert((at - time::Duration::MINUTE, 0));
                entry.1 += u64::from(refused);
                if entry.0 + time::Duration::MINUTE <= at {
                    entry.0 = at;
                    Some(std::mem::take(&mut entry.1))
                } else {
                    None
                }
            };
            if let Some(count) = due {
                let _ = cx.commit(vec![Change::Audit(AuditRecord::new(
                    at,
                    &tenant,
                    operator,
                    None,
                    "request",
                    Outcome::Refused,
                    Some(format!(
                        "rate_limited: {count} commands not run since the last such record"
                    )),
                ))]);
            }
        }
        self.respond_in(cx, from, answered, responses);
    }

    fn run_command(
        &self,
        live: &mut Live,
        cx: &mut Cx,
        operator: &str,
        tenant: &str,
        name: &str,
        args: &Value,
    ) -> Result<(Value, bool), CommandError> {
        let at = self.now();
        let device = args
            .get("serial")
            .and_then(Value::as_str)
            .map(|s| s.chars().take(80).collect::<String>());
        let result = self.dispatch(live, cx, operator, tenant, name, args, at);
        // Decisions carry their own audit record in their transaction; a refusal or a read is
        // audited on its own.
        if !matches!(&result, Ok((_, true))) {
            let (outcome, reason) = match &result {
                Ok(_) => (Outcome::Ok, None),
                Err(e) if e.code == ErrorCode::Internal => {
                    (Outcome::Error, Some(e.message.clone()))
                }
                Err(e) => (
                    Outcome::Refused,
                    Some(format!("{}: {}", e.code.as_str(), e.message)),
                ),
            };
            // A failure here fails the whole batch (its commit reports it).
            let _ = cx.commit(vec![Change::Audit(AuditRecord::new(
                at, tenant, operator, device, name, outcome, reason,
            ))]);
        }
        result
    }

    /// A page of the stations `keep` accepts, as the batch sees them: `{"stations": […]}`,
    /// with `"next"` (the `after` of the next page) when more follow.
    fn stations_page(
        &self,
        live: &Live,
        cx: &Cx,
        args: &Value,
        keep: &dyn Fn(&Station) -> bool,
    ) -> Result<Value, CommandError> {
        let limit = page_limit_arg(args, self.settings.requests.page_size)?
            .min(self.settings.requests.page_size);
        let after = after_arg(args)?;
        let (page, more) = cx
            .txn
            .stations_page(after.as_deref(), limit, keep)
            .map_err(|e| CommandError::internal(e.to_string()))?;
        let mut data = json!({
            "stations": page.iter().map(|s| self.view(live, s)).collect::<Vec<_>>(),
        });
        if let (true, Some(last)) = (more, page.last()) {
            data["next"] = json!(last.serial.as_str());
        }
        Ok(data)
    }

    /// The station named by `args` (in this tenant), as the batch sees it.
    fn find_station(&self, cx: &Cx, tenant: &str, args: &Value) -> Result<Station, CommandError> {
        let serial = serial_arg(args)?;
        match cx
            .txn
            .station(&serial)
            .map_err(|e| CommandError::internal(e.to_string()))?
        {
            // Another tenant's station does not exist for this operator.
            Some(s) if s.tenant == tenant => Ok(s),
            _ => Err(CommandError::not_found(format!("no station {serial}"))),
        }
    }

    /// Runs one command; the flag says whether it already committed its own audit record.
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        live: &mut Live,
        cx: &mut Cx,
        operator: &str,
        tenant: &str,
        name: &str,
        args: &Value,
        at: OffsetDateTime,
    ) -> Result<(Value, bool), CommandError> {
        if let Some(result) = self.phone_command(live, cx, operator, tenant, name, args, at) {
            return result;
        }
        // An operator decision on one station: find it (in this tenant), run the transition,
        // commit it with its audit record, apply its effects; the answer is the station as it
        // is now, or `{}` when the record is gone.
        type Step<'a> = dyn Fn(Station) -> Result<(Transition, Option<String>), CommandError> + 'a;
        let decide = |cx: &mut Cx, step: &Step<'_>| -> Result<(Value, bool), CommandError> {
            let s = self.find_station(cx, tenant, args)?;
            let serial = s.serial.clone();
            let (transition, reason) = step(s)?;
            let record = AuditRecord::new(
                at,
                tenant,
                operator,
                Some(serial.to_string()),
                name,
                Outcome::Ok,
                reason,
            );
            let after = self.apply_transition(live, cx, &serial, transition, record, tenant)?;
            let data = after.map_or_else(|| json!({}), |s| self.view(live, &s));
            Ok((data, true))
        };
        match name {
            "listStations" => {
                let filter = match args.get("state") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => {
                        Some(StationState::from_name(s).ok_or_else(|| {
                            CommandError::invalid_argument(format!("unknown state {s:?}"))
                        })?)
                    }
                    Some(_) => {
                        return Err(CommandError::invalid_argument("\"state\" must be a string"))
                    }
                };
                let keep = |s: &Station| {
                    s.tenant == tenant
                        && filter.is_none_or(|f| s.state(self.online(live, &s.serial)) == f)
                };
                Ok((self.stations_page(live, cx, args, &keep)?, false))
            }
            "listRejectedStations" => {
                let keep = |s: &Station| s.tenant == tenant && s.standing == Standing::Rejected;
                Ok((self.stations_page(live, cx, args, &keep)?, false))
            }
            "getStation" => {
                let s = self.find_station(cx, tenant, args)?;
                Ok((self.view(live, &s), false))
            }
            "acceptStation" => decide(cx, &|s| {
                let fingerprint = fingerprint_arg(args)?;
                Ok((
                    station::accept(s, fingerprint, at)?,
                    Some(format!("fingerprint {fingerprint}")),
                ))
            }),
            "rejectStation" => decide(cx, &|s| Ok((station::reject(s, at)?, None))),
            "clearRejectedStation" => decide(cx, &|s| Ok((station::clear_rejected(s, at)?, None))),
            "startStationUpdate" => decide(cx, &|s| {
                let image = self.update_image(args)?;
                let reason = format!("to {}", image.version);
                Ok((station::start_update(s, &image, at)?, Some(reason)))
            }),
            "resetStation" => decide(cx, &|s| {
                let delete_authentication = bool_arg(args, "delete_authentication")?;
                let delete_configuration = bool_arg(args, "delete_configuration")?;
                let reason = format!("delete_authentication={delete_authentication} delete_configuration={delete_configuration}");
                let t = station::reset(s, delete_authentication, delete_configuration, at)?;
                Ok((t, Some(reason)))
            }),
            "removeStation" => decide(cx, &|s| Ok((station::remove(s, at)?, None))),
            "listAuditLog" => {
                let limit = limit_arg(args)?.min(self.settings.requests.page_size);
                let records = match after_seq_arg(args)? {
                    // Paging through the whole chain (`fleetctl audit verify`): oldest first.
                    Some(after_seq) => cx.txn.audit_page(tenant, after_seq, limit),
                    None => cx.txn.audit(tenant, limit),
                }
                .map_err(|e| CommandError::internal(e.to_string()))?;
                Ok((json!({"records": records}), false))
            }
            "listOperators" => {
                let records = self
                    .operators
                    .list(tenant)
                    .map_err(|e| CommandError::internal(e.to_string()))?;
                let online: Vec<&OperatorId> = live
                    .sessions
                    .values()
                    .filter_map(|s| match &s.identity {
                        Identity::Operator { id, .. } => Some(id),
                        _ => None,
                    })
                    .collect();
                let operators: Vec<Value> = records
                    .iter()
                    .map(|r| {
                        let is_online = online
                            .iter()
                            .any(|id| id.tenant == r.tenant && id.name == r.name);
                        operator_view(r, is_online)
                    })
                    .collect();
                Ok((json!({"operators": operators}), false))
            }
            "revokeOperator" => {
                let name = text_arg(args, "name", true)?;
                if name == operator {
                    return Err(CommandError::invalid_argument(
                        "an operator cannot revoke itself; ask another operator of the tenant",
                    ));
                }
                let by = format!("{operator}@{tenant}");
                // Durable (fsynced) before anyone hears of it, and before the cut.
                let record = self
                    .operators
                    .revoke(tenant, &name, &by, at)
                    .map_err(|e| match e {
                        fleet_certs::CertError::InvalidName { .. } => {
                            CommandError::invalid_argument(e.to_string())
                        }
                        e => CommandError::internal(e.to_string()),
                    })?
                    .ok_or_else(|| CommandError::not_found(format!("no operator {name}")))?;
                cx.commit(vec![Change::Audit(AuditRecord::new(
                    at,
                    tenant,
                    operator,
                    Some(format!("operator {name}")),
                    "revokeOperator",
                    Outcome::Ok,
                    Some(format!("certificate {} revoked", record.serial)),
                ))])?;
                self.revoked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(OperatorId {
                        tenant: tenant.to_owned(),
                        name: name.clone(),
                    });
                // Nothing more of its sessions reaches the inbox...
                self.operator_sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|_, r| !(r.operator.tenant == tenant && r.operator.name == name));
                // ...and its live sessions end at once (after the commit, or even if it fails:
                // the registry already says revoked): their certificate is void.
                for (client_id, session) in &live.sessions {
                    if let Identity::Operator { id, .. } = &session.identity {
                        if id.tenant == tenant && id.name == name {
                            cx.out.push(Output::Cut {
                                client_id: client_id.clone(),
                                after: None,
                            });
                        }
                    }
                }
                Ok((operator_view(&record, false), true))
            }
            "listAddressBlocks" | "liftAddressBlock" if tenant != station::DEFAULT_TENANT => {
                Err(CommandError::forbidden(
                    "address blocks are fleet-wide: only operators of tenant default see and lift them",
                ))
            }
            "listAddressBlocks" => {
                let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
                let blocks: Vec<Value> = failures
                    .blocks(at)
                    .into_iter()
                    .map(|b| {
                        json!({
                            "address": b.ip.to_string(),
                            "until": rfc3339(b.until),
                            "failures": failures.failures(b.ip, at),
                        })
                    })
                    .collect();
                Ok((json!({"blocks": blocks}), false))
            }
            "liftAddressBlock" => {
                let text = text_arg(args, "address", true)?;
                let ip: IpAddr = text.parse().map_err(|_| {
                    CommandError::invalid_argument(format!("{text:?} is not an IP address"))
                })?;
                let ip = ip.to_canonical();
                let blocked = self
                    .failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .blocks(at)
                    .iter()
                    .any(|b| b.ip == ip);
                if !blocked {
                    return Err(CommandError::not_found(format!("{ip} is not blocked")));
                }
                // Lifted once its audit record is committed.
                cx.out.push(Output::LiftBlock(ip));
                cx.commit(vec![Change::Audit(AuditRecord::new(
                    at,
                    tenant,
                    operator,
                    Some(ip.to_string()),
                    "liftAddressBlock",
                    Outcome::Ok,
                    None,
                ))])?;
                Ok((json!({}), true))
            }
            other => Err(CommandError::invalid_argument(format!(
                "unknown command {:?}",
                other.chars().take(64).collect::<String>()
            ))),
        }
    }
}

impl Controller {
    /// The image a `startStationUpdate` asks for: `version`, or the latest of the catalog.
    fn update_image(&self, args: &Value) -> Result<FirmwareImage, CommandError> {
        let image = match args.get("version") {
            None | Some(Value::Null) => self
                .settings
                .catalog
                .latest()
                .cloned()
                .ok_or_else(|| CommandError::not_found("the firmware catalog is empty"))?,
            Some(Value::String(v)) => {
                let version = parse_version(v).ok_or_else(|| {
                    CommandError::invalid_argument(format!("version {v:?} is not a version"))
                })?;
                self.settings
                    .catalog
                    .find(&version)
                    .cloned()
                    .ok_or_else(|| {
                        CommandError::not_found(format!("firmware {v} is not in the catalog"))
                    })?
            }
            Some(_) => {
                return Err(CommandError::invalid_argument(
                    "\"version\" must be a string",
                ))
            }
        };
        if image.version < self.settings.policy.min_firmware {
            return Err(CommandError::invalid_argument(format!(
                "firmware {} is below {}",
                image.version, self.settings.policy.min_firmware
            )));
        }
        Ok(image)
    }
}

/// Whether an operator command only reads (it changes nothing and is audited as a read).
fn is_read_command(name: &str) -> bool {
    name.starts_with("list") || name.starts_with("get") || name.starts_with("export")
}

/// An operator as `listOperators` shows it.
fn operator_view(r: &fleet_certs::OperatorRecord, online: bool) -> Value {
    json!({
        "name": r.name,
        "tenant": r.tenant,
        "serial": r.serial,
        "fingerprint": r.fingerprint.to_string(),
        "issued_at": rfc3339(r.issued_at),
        "revoked_at": r.revoked_at.map(rfc3339),
        "revoked_by": r.revoked_by,
        "online": online,
    })
}

fn error_response(command: &Value, correlation: &Value, e: &CommandError) -> Value {
    json!({"command": command, "correlationData": correlation, "error": e.message, "code": e.code.as_str()})
}

/// The controller as the front door's [`Admission`].
pub struct ControllerAdmission(pub Arc<Controller>);

impl Admission for ControllerAdmission {
    fn admit(&self, info: ConnectInfo) -> BoxFuture<'_, Decision> {
        Box::pin(async move {
            let (client_id, session_id) = (info.client_id.clone(), info.session_id);
            let (decision, slow, audits) = self.0.admit_now(info);
            // Audited before answered; concurrent admissions share one commit.
            let mut stored = true;
            for audit in audits {
                stored &= audit.await;
            }
            if !stored && matches!(decision, Decision::Allow { .. }) {
                // No admission without its audit record.
                self.0.closed(&client_id, session_id);
                return Decision::Deny {
                    refusal: Refusal::ServerUnavailable,
                    reason: "the admission could not be audited".into(),
                };
            }
            if slow && matches!(decision, Decision::Deny { .. }) {
                // A guesser is slowed down before it is refused for good.
                tokio::time::sleep(self.0.settings.flood.failed_auth_delay).await;
            }
            decision
        })
    }

    fn session_opened(&self, client_id: &str, session_id: u64) -> Option<Rights> {
        self.0.opened(client_id, session_id)
    }

    fn session_closed(&self, client_id: &str, session_id: u64) {
        self.0.closed(client_id, session_id);
    }

    fn message(
        &self,
        client_id: &str,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, bool> {
        // Operators' requests, and devices' messages that are acknowledged once committed
        // (`identity::phone_rights`).
        let client_id = client_id.to_owned();
        Box::pin(async move {
            if let ClaimedClient::Phone(_) = ClaimedClient::of(&client_id) {
                self.0.inbox_device(topic, payload).await
            } else {
                self.0.inbox_request(&client_id, session_id, payload).await
            }
        })
    }

    fn refused(&self, client_id: &str, peer_addr: std::net::SocketAddr, reason: &str) {
        // Queued without waiting: the accept loop must not wait for the disk. The future only
        // publishes the record once it is durable.
        let audit = self.0.audit_refusal(
            peer_addr.ip(),
            self.0.now(),
            station::DEFAULT_TENANT,
            peer_addr.to_string(),
            Some(client_id.to_owned()),
            reason,
        );
        if let (Some(audit), Ok(runtime)) = (audit, tokio::runtime::Handle::try_current()) {
            runtime.spawn(audit);
        }
    }
}
