//! The controller's shell: it owns the store, the clock, the in-memory view of live sessions
//! and the session registry, and runs the pure state machines against them. Every decision is
//! committed to the store before anyone (station, operator, event subscriber) is told about it:
//! what a decision says and does waits in an `effects::Outbox` until its commit returned.
//!
//! - `admission.rs`: CONNECTs (the front door's `Admission`) and the life of sessions;
//! - `stations.rs`, `phones.rs`: what stations and phones send;
//! - `commands.rs`, `phone_commands.rs`: operator requests, one method per command;
//! - `durable.rs`: the ways to the store, as types; `effects.rs`: the outbox;
//! - `live.rs`: the in-memory view; `settings.rs`: the settings; `readings.rs`: what a
//!   metrics scrape reads.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use fleet_broker::handover::Handover;
use fleet_broker::{Rights, SessionControl};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::flood::{AuditBudget, FailureLimiter, OperatorBudget};
use crate::identity::{self, Identity, OperatorId, StationRights};
use crate::station::{self, Admit, Presented, Station};
use crate::store::{Store, StoreError};
use fleet_certs::{FleetCa, OperatorRegistry};
use fleet_protocol::{CommandError, Serial, Topic};
use ring::rand::SystemRandom;

mod admission;
mod commands;
mod durable;
mod effects;
mod explain;
mod live;
mod phone_commands;
mod phones;
mod readings;
mod settings;
mod stations;
#[cfg(test)]
mod tests;

pub use admission::ControllerAdmission;
pub use effects::{Publication, Published};
pub use settings::{ControlSettings, FloodSettings, PendingSettings, RequestLimits};

use durable::{Durable, Shared};
use live::{Live, PendingIndex};

/// Bus messages handled in one batch at most (one store transaction, one fsync).
pub const MAX_BATCH: usize = 256;

/// Messages (devices' and operators') queued from the front door's inbox and not yet handled,
/// at most; a full queue holds the sending sessions back (the front door reads nothing more
/// from them).
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

/// The two queues of the front door's inbox, for the bus task: operators' requests (taken
/// first) and devices' messages.
pub struct Inbox {
    pub requests: mpsc::Receiver<InboxItem>,
    pub devices: mpsc::Receiver<InboxItem>,
}

/// What the front door's inbox hands the controller.
#[derive(Debug)]
pub enum InboxItem {
    /// An operator's request.
    Request(InboxRequest),
    /// A device's message to the controller, from its session's inbox (every topic a device
    /// speaks to the controller on: `identity::station_rights`, `identity::phone_rights`).
    /// With `handled`, its session acknowledges it only once `handled` fires, after the batch
    /// that handled it was committed, so that a device told "done" is never lost in a crash
    /// (a phone's `provision/complete`); `handled` says whether that commit succeeded. Without
    /// it, the session acknowledges it as soon as it is queued here.
    Device {
        topic: String,
        payload: Vec<u8>,
        handled: Option<tokio::sync::oneshot::Sender<bool>>,
    },
    /// A phone's CONNECT with a PAP (or none): its attempt is decided in a batch, in order with
    /// everything else that changes the phone, and committed with it.
    Pap(PapAsk),
}

impl InboxItem {
    /// The item as one message of a batch.
    pub fn incoming(&self) -> Incoming<'_> {
        match self {
            InboxItem::Request(r) => Incoming::Request {
                from: &r.from,
                payload: &r.payload[..],
            },
            InboxItem::Device { topic, payload, .. } => Incoming::Device {
                topic: topic.as_str(),
                payload: &payload[..],
            },
            InboxItem::Pap(ask) => Incoming::Pap(ask),
        }
    }

    /// The batch that handled the item was committed (or not): a device waiting for that to
    /// acknowledge its message hears it now.
    pub fn handled(self, committed: bool) {
        if let InboxItem::Device {
            handled: Some(handled),
            ..
        } = self
        {
            let _ = handled.send(committed);
        }
    }
}

/// A phone's PAP attempt for the bus (`InboxItem::Pap`): decided by the batch that takes it,
/// against the phone as the batch sees it; its judgement goes back to the waiting admission
/// once the batch is committed (or could not be).
pub struct PapAsk {
    info: fleet_broker::ConnectInfo,
    mac: fleet_protocol::Mac,
    password: Option<String>,
    at: OffsetDateTime,
    /// Taken by the batch that decides it (a shared borrow of the batch's messages holds it).
    reply: Mutex<Option<tokio::sync::oneshot::Sender<admission::Judgement>>>,
}

impl std::fmt::Debug for PapAsk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the PAP itself: it is a secret.
        f.debug_struct("PapAsk")
            .field("client_id", &self.info.client_id)
            .field("session_id", &self.info.session_id)
            .field("peer_addr", &self.info.peer_addr)
            .field("pap_given", &self.password.is_some())
            .field("at", &self.at)
            .finish_non_exhaustive()
    }
}

/// One message of a batch ([`Controller::handle_batch`]).
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'m> {
    /// A device's message to the controller (station and phone topics), from its session.
    Device { topic: &'m str, payload: &'m [u8] },
    /// An operator request from its session's inbox.
    Request {
        from: &'m Requester,
        payload: &'m [u8],
    },
    /// A phone's PAP attempt from its CONNECT.
    Pap(&'m PapAsk),
}

/// How a call of the front door's takes the controller's lock.
///
/// A batch holds the lock across its commit (an fsync, milliseconds), so a call that waits for
/// it runs on a blocking thread. But in a connect storm no batch runs, and the hand-off to a
/// blocking thread and back was a fifth of fleetd's CPU per connection (two thread switches
/// each way, and the preemptions they cause on two cores; BENCHMARKS.md, issue 11, eleventh
/// day): so the front door first asks on its async worker with [`Wait::Never`], and only if
/// that cannot be answered at once on the pool with [`Wait::Block`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Wait {
    /// Waits for the lock: on a blocking thread only.
    Block,
    /// Takes the lock only if it is free at once, and only where the store's reads are local
    /// (redb: a point read is a few pages of redb's cache or the page cache, microseconds,
    /// like the lock itself; PostgreSQL's are round trips, so `Never` never runs there).
    /// Otherwise the call does nothing and says so, and the caller moves it to the pool.
    Never,
}

/// What decisions change, behind the controller's one lock: the in-memory view, and the only
/// write access to the store (`durable.rs`). A decision and the rights of live sessions change
/// together.
struct Decisions {
    live: Live,
    durable: Durable,
}

pub struct Controller {
    /// Reads of the store, and commits queued without waiting.
    store: Shared,
    /// The issued operator certificates (`fleet_certs::operators`).
    operators: OperatorRegistry,
    /// Live operator sessions by session id, for the inbox: a request is attributed to the
    /// session that sent it when it arrives, whether or not that session is still open when
    /// it is handled. Kept apart from `decisions`, which batches hold across their commit.
    operator_sessions: Mutex<HashMap<u64, Requester>>,
    /// Devices' messages from the front door's inbox.
    inbox: mpsc::Sender<InboxItem>,
    /// Operators' requests from the front door's inbox: a queue of their own, which the bus
    /// task takes first, so that a reject is not queued behind a reconnect storm's messages.
    requests: mpsc::Sender<InboxItem>,
    inbox_rx: Mutex<Option<Inbox>>,
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
    revoked: Mutex<HashSet<OperatorId>>,
    sessions: Arc<dyn SessionControl>,
    decisions: Mutex<Decisions>,
    settings: ControlSettings,
    /// What the controller publishes, for the bus task ([`Published`]).
    out: Arc<Handover<Publication>>,
    /// The locked-out phones counted by the last scrape, and when (`readings.rs`).
    locked_phones: Mutex<Option<(OffsetDateTime, usize)>>,
}

/// RFC 3339 in UTC, "" for a time it cannot write.
fn rfc3339(t: OffsetDateTime) -> String {
    crate::times::rfc3339(t).unwrap_or_default()
}

impl Controller {
    pub fn new(
        store: Store,
        ca: Arc<FleetCa>,
        sessions: Arc<dyn SessionControl>,
        operators: OperatorRegistry,
        settings: ControlSettings,
    ) -> Result<(Arc<Controller>, Published), StoreError> {
        let out = Arc::new(Handover::default());
        let rx = Published {
            queue: Arc::clone(&out),
            ready: std::collections::VecDeque::new(),
        };
        let (inbox, devices) = mpsc::channel(INBOX_CAPACITY);
        let (requests, operators_rx) = mpsc::channel(INBOX_CAPACITY);
        let last_seen = store
            .sightings()?
            .into_iter()
            .filter_map(|(serial, at)| {
                Some((serial, OffsetDateTime::from_unix_timestamp(at).ok()?))
            })
            .collect();
        let live = Live {
            whitelists: store.whitelists()?,
            pending: PendingIndex::build(&store.stations()?),
            last_seen,
            ..Live::default()
        };
        let (store, durable) = durable::open(store);
        let controller = Arc::new(Controller {
            store,
            operators,
            operator_sessions: Mutex::new(HashMap::new()),
            inbox,
            requests,
            inbox_rx: Mutex::new(Some(Inbox {
                requests: operators_rx,
                devices,
            })),
            ca,
            rng: SystemRandom::new(),
            failures: Mutex::new(FailureLimiter::new(settings.flood.failures.clone())),
            audit_budget: Mutex::new(AuditBudget::new(settings.flood.refusal_audits_per_minute)),
            rate_audits: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashSet::new()),
            budget: Mutex::new(OperatorBudget::new(
                settings.requests.commands_per_second,
                settings.requests.burst,
            )),
            sessions,
            decisions: Mutex::new(Decisions { live, durable }),
            settings,
            out,
            locked_phones: Mutex::new(None),
        });
        Ok((controller, rx))
    }

    /// What the front door's inbox queued, for the bus task (once).
    pub fn take_inbox(&self) -> Option<Inbox> {
        self.inbox_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Serves the inbox without the bus task, one item per batch, for a shell that drives the
    /// controller itself (tests): phones' PAP attempts wait for a batch to decide them. Does
    /// nothing if the inbox was taken already.
    pub fn serve_inbox_alone(self: &Arc<Self>) {
        let Some(Inbox {
            mut requests,
            mut devices,
        }) = self.take_inbox()
        else {
            return;
        };
        let controller = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    Some(item) = requests.recv() => item,
                    Some(item) = devices.recv() => item,
                    else => return,
                };
                let committed = controller.handle_batch([item.incoming()]);
                item.handled(committed);
            }
        });
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
            .requests
            .send(InboxItem::Request(InboxRequest { from, payload }))
            .await
            .is_err()
        {
            warn!("controller inbox closed: operator request dropped");
            return false;
        }
        true
    }

    /// Queues a device's inbox message, waiting while the queue is full (the front door reads
    /// nothing more from that device meanwhile). A phone's `provision/complete` also waits
    /// until the batch that handled it is committed (or dropped: then the phone is not
    /// acknowledged either, and sends it again); anything else is the controller's once queued.
    async fn inbox_device(&self, topic: String, payload: Vec<u8>) -> bool {
        let durable = matches!(Topic::parse(&topic), Some(Topic::PhoneProvisionComplete(_)));
        let (handled, done) = match durable {
            true => {
                let (handled, done) = tokio::sync::oneshot::channel();
                (Some(handled), Some(done))
            }
            false => (None, None),
        };
        let item = InboxItem::Device {
            topic,
            payload,
            handled,
        };
        if self.inbox.send(item).await.is_err() {
            warn!("controller inbox closed: device message dropped");
            return false;
        }
        match done {
            Some(done) => done.await.unwrap_or(false),
            None => true,
        }
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

    fn lock(&self) -> MutexGuard<'_, Decisions> {
        // Every critical section leaves `Live` consistent before it can panic (single map
        // operations), so a poisoned lock is still usable.
        self.decisions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock as `wait` allows: with [`Wait::Never`], only if it is free at once and the
    /// store's reads are local (see [`Wait`]).
    fn lock_with(&self, wait: Wait) -> Option<MutexGuard<'_, Decisions>> {
        match wait {
            Wait::Block => Some(self.lock()),
            Wait::Never if !self.store.reads_are_local() => None,
            Wait::Never => match self.decisions.try_lock() {
                Ok(guard) => Some(guard),
                Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            },
        }
    }

    fn online(&self, live: &Live, serial: &Serial) -> bool {
        live.sessions.contains_key(&serial.client_id())
    }

    /// The station object, with `last_seen` the newest of its record's and the memory's
    /// sightings, in whole seconds (PROTOCOL §6 times; a fraction would only be noise).
    fn view(&self, live: &Live, station: &Station) -> Value {
        let mut v = station.view(self.online(live, &station.serial));
        let seen = [
            station.last_seen,
            live.last_seen.get(&station.serial).copied(),
        ]
        .into_iter()
        .flatten()
        .max();
        if let (Some(seen), Some(obj)) = (seen, v.as_object_mut()) {
            let seen = seen.replace_nanosecond(0).unwrap_or(seen);
            obj.insert("last_seen".into(), json!(rfc3339(seen)));
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

    /// Handles a batch of messages in ONE store transaction: every change of the batch is
    /// committed (one fsync) before anything of it is published, answered or cut. Messages
    /// are handled in order, each seeing the changes of those before it. Never panics on what
    /// a peer sent. Returns whether the batch's changes were committed.
    pub fn handle_batch<'m>(&self, messages: impl IntoIterator<Item = Incoming<'m>>) -> bool {
        let mut guard = self.lock();
        let Decisions { live, durable } = &mut *guard;
        let mut batch = match durable.begin() {
            Ok(batch) => batch,
            Err(e) => {
                // Nothing ran: devices ask again (their QoS 1 messages are not acknowledged),
                // operators and PAP attempts hear why now rather than time out.
                warn!("store: cannot begin a transaction, messages refused: {e}");
                let error = CommandError::internal(format!("the store is unavailable: {e}"));
                let mut out = effects::Outbox::default();
                for message in messages {
                    match message {
                        Incoming::Device { .. } => {}
                        Incoming::Request { from, payload } => {
                            out.push(self.unbegun_request(from, payload))
                        }
                        Incoming::Pap(ask) => {
                            let reply = ask.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
                            if let Some(reply) = reply {
                                // `abandon` answers it: unavailable, with the error.
                                out.push(effects::Output::Judged {
                                    reply,
                                    judgement: Box::new(admission::Judgement::Unavailable(
                                        String::new(),
                                    )),
                                });
                            }
                        }
                    }
                }
                self.abandon(out, &error);
                return false;
            }
        };
        let started = std::time::Instant::now();
        let mut handled = 0usize;
        for message in messages {
            match message {
                Incoming::Device { topic, payload } => {
                    self.on_routed(live, &mut batch, topic, payload)
                }
                Incoming::Request { from, payload } => {
                    self.on_operator_request(live, &mut batch, from, payload)
                }
                Incoming::Pap(ask) => self.on_pap_attempt(live, &mut batch, ask),
            }
            handled += 1;
        }
        let handled_at = started.elapsed();
        match batch.commit() {
            Ok(committed) => {
                let committed_at = started.elapsed();
                for (serial, record) in &committed.written {
                    live.pending.update(serial, record.as_ref());
                }
                let (records, outputs) = (committed.records.len(), committed.out.len());
                self.carry_out(&committed.records, committed.out, &committed.written);
                debug!(
                    target: "fleet_controller::batch",
                    messages = handled,
                    records,
                    outputs,
                    handled_ms = handled_at.as_secs_f64() * 1e3,
                    committed_ms = committed_at.as_secs_f64() * 1e3,
                    done_ms = started.elapsed().as_secs_f64() * 1e3,
                    "batch"
                );
                true
            }
            Err(abandoned) => {
                let e = abandoned.error;
                warn!("store: a batch of messages was not committed: {e}");
                self.reload(live);
                let error = CommandError::internal(format!("the store refused the change: {e}"));
                self.abandon(abandoned.out, &error);
                false
            }
        }
    }

    /// The batch may have changed the in-memory whitelists and the pending index, and was not
    /// committed: the store has the truth.
    fn reload(&self, live: &mut Live) {
        match self.store.whitelists() {
            Ok(w) => live.whitelists = w,
            Err(e) => warn!("store: whitelists not reloaded: {e}"),
        }
        match self.store.stations() {
            Ok(stations) => live.pending = PendingIndex::build(&stations),
            Err(e) => warn!("store: pending stations not reloaded: {e}"),
        }
    }

    /// Handles one message of a device (a batch of one).
    pub fn handle_message(&self, topic: &str, payload: &[u8]) {
        self.handle_batch([Incoming::Device { topic, payload }]);
    }

    /// A device's message, to whom it is for.
    fn on_routed(&self, live: &mut Live, cx: &mut durable::Batch<'_>, topic: &str, payload: &[u8]) {
        if payload.len() > self.settings.max_payload_bytes {
            warn!(topic = %topic.escape_default(), "payload over {} bytes dropped", self.settings.max_payload_bytes);
            return;
        }
        match Topic::parse(topic) {
            // A station's every message to the controller is a sighting.
            Some(Topic::StationAuthRequest(serial)) => {
                live.saw(&serial, self.now());
                self.on_auth_request(live, cx, serial, payload)
            }
            Some(Topic::StationStatus(serial)) => live.saw(&serial, self.now()),
            Some(Topic::StationFirmwareRequest(serial)) => {
                live.saw(&serial, self.now());
                self.on_firmware_request(cx, serial, payload)
            }
            Some(Topic::PhoneProvisionRequest(mac)) => {
                self.on_provision_request(live, cx, mac, payload)
            }
            Some(Topic::PhoneProvisionComplete(mac)) => self.on_provision_complete(live, cx, mac),
            _ => {}
        }
    }
}
