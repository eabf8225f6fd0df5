//! Admission of CONNECTs (PROTOCOL §2) and the life of admitted sessions: who the client is,
//! whether it may connect and with which rights, and its audit record, which is durable before
//! the front door hears the decision. A refusal is plain data ([`Refused`]): it is counted
//! against the address, audited within the address's budget, and what it tells (an
//! `identity_mismatch` security event) waits for its audit record.

use std::net::IpAddr;
use std::sync::Arc;

use fleet_broker::{Admission, BoxFuture, ConnectInfo, Decision, Reason, Refusal, Rights};
use serde_json::json;
use time::OffsetDateTime;
use tracing::{debug, info};

use super::effects::{Outbox, Pending};
use super::live::{Live, LiveSession};
use super::{rfc3339, Controller, Requester, Wait};
use crate::audit::{AuditRecord, Outcome};
use crate::flood::Verdict;
use crate::identity::{self, Identity, OperatorId, PhonePresented, StationRights};
use crate::reasons;
use crate::station::{self, Admit, DenyReason, Presented};
use crate::store::Change;
use fleet_protocol::{ClaimedClient, EventKind, Mac, Serial};

/// Longest client id quoted as the device of a refusal's record, in characters.
const MAX_QUOTED_CLIENT_ID: usize = 80;

/// An admission before it is told: the decision, whether a refusal waits first (the address
/// is half-way to being refused for failed authentications), and the commit that must be
/// durable before the decision is told (its audit record, and what it says once stored).
pub(super) struct Admitted {
    decision: Decision,
    slow: bool,
    pending: Option<Pending>,
}

/// A refused CONNECT.
pub(super) struct Refused {
    pub(super) refusal: Refusal,
    /// For the log and the audit record.
    pub(super) reason: String,
    /// For the client: an MQTT 5 CONNACK's Reason String. Never a secret (no PAP, no key but
    /// the client's own); `crate::reasons` words the ones that differ from `reason`.
    pub(super) public: String,
    /// Stored with the refusal, audited or not (a station's `last_mismatch`).
    pub(super) noted: Vec<Change>,
    /// The tenant whose audit log records it.
    pub(super) tenant: String,
    pub(super) device: Option<String>,
    /// Whether it counts as a failed authentication of the address (wrong PAP, unknown
    /// device, an identity that does not fit); a station an operator rejected does not.
    pub(super) counts: bool,
    /// Told once the refusal's audit record is durable.
    pub(super) told: Outbox,
}

/// What an admitted client gets.
pub(super) struct Granted {
    pub(super) rights: Rights,
    /// The tenant and device its audit record names.
    pub(super) tenant: String,
    pub(super) device: Option<String>,
    /// The rights by name, for the record: `admitted with <level> rights`.
    pub(super) level: &'static str,
    /// Whether it may use the connection slots kept for operators.
    pub(super) reserved: bool,
}

/// How an admission is decided.
pub(super) enum Judgement {
    Admit(Granted),
    Refuse(Refused),
    /// The store could not be read: refused as unavailable, without a record (none could be
    /// stored either).
    Unavailable(String),
}

/// How far an admission gets off the bus: decided, or a phone's PAP attempt that a batch
/// must decide (it changes the phone, in order with everything else that does).
pub(super) enum Step {
    Decided(Admitted),
    Pap {
        mac: Mac,
        password: Option<String>,
        at: OffsetDateTime,
    },
}

impl Controller {
    /// Admission: the decision, and what must be durable before it is told; or, for a phone's
    /// PAP attempt, what the bus must decide. `None` only with [`Wait::Never`]: the lock was
    /// not free at once (or the store's reads are remote), and nothing was changed.
    pub(super) fn admit_now(&self, info: &ConnectInfo, wait: Wait) -> Option<Step> {
        if wait == Wait::Never && !self.store.reads_are_local() {
            return None;
        }
        let at = self.now();
        let ip = info.peer_addr.ip();
        let identity = identity::identify(info);
        // A valid operator certificate is never refused for the failures of others from the
        // same address (a PAP guesser beside the operator's machine must not lock it out).
        let operator = match &identity {
            Ok(Identity::Operator { id, serial, key }) => {
                self.operator_admits(id, serial, key).is_ok()
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
            let refused = Refused {
                refusal: Refusal::NotAuthorized,
                reason,
                public: reasons::address_blocked(until),
                noted: Vec::new(),
                tenant: station::DEFAULT_TENANT.to_owned(),
                device: Some(quoted(&info.client_id)),
                counts: false,
                told: Outbox::default(),
            };
            let mut admitted = self.refuse(info, at, refused);
            admitted.slow = true;
            return Some(Step::Decided(admitted));
        }
        match identity {
            Ok(Identity::Phone {
                mac,
                presented: PhonePresented::Pap { password },
            }) => Some(Step::Pap { mac, password, at }),
            identity => {
                let judgement = self.judge(info, identity, at, wait)?;
                Some(Step::Decided(self.conclude(info, at, judgement)))
            }
        }
    }

    /// What a judgement tells, and what must be durable first: an admission's record, or a
    /// refusal (counted against the address and audited within its budget).
    fn conclude(&self, info: &ConnectInfo, at: OffsetDateTime, judgement: Judgement) -> Admitted {
        match judgement {
            Judgement::Admit(granted) => {
                let record = AuditRecord::new(
                    at,
                    granted.tenant,
                    info.peer_addr.to_string(),
                    granted.device,
                    "connect",
                    Outcome::Ok,
                    Some(format!("admitted with {} rights", granted.level)),
                );
                Admitted {
                    decision: Decision::Allow {
                        rights: granted.rights,
                        reserved: granted.reserved,
                    },
                    slow: false,
                    pending: Some(Pending {
                        committed: self.store.queue(vec![Change::Audit(record)]),
                        out: Outbox::default(),
                    }),
                }
            }
            Judgement::Refuse(refused) => self.refuse(info, at, refused),
            Judgement::Unavailable(reason) => Admitted {
                decision: Decision::Deny {
                    refusal: Refusal::ServerUnavailable,
                    reason: Reason::new(reason, "server unavailable"),
                },
                slow: false,
                pending: None,
            },
        }
    }

    /// Logs, counts and audits a refusal.
    fn refuse(&self, info: &ConnectInfo, at: OffsetDateTime, refused: Refused) -> Admitted {
        info!(client_id = %info.client_id.escape_default(), peer = %info.peer_addr, "admission refused: {}", refused.reason);
        let ip = info.peer_addr.ip();
        let mut slow = false;
        if refused.counts {
            let verdict = self
                .failures
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .record_failure(ip, at);
            slow = verdict != Verdict::Allow;
        }
        let record = RefusalRecord {
            ip,
            at,
            tenant: &refused.tenant,
            actor: info.peer_addr.to_string(),
            device: refused.device,
            reason: &refused.reason,
        };
        let pending = self.audit_refusal(record, refused.noted, refused.told);
        Admitted {
            decision: Decision::Deny {
                refusal: refused.refusal,
                reason: Reason::new(refused.reason, refused.public),
            },
            slow,
            pending,
        }
    }

    /// Audits a refused CONNECT within the per-address budget (a flood must not fill the
    /// disk); refusals over the budget are counted into the next audited one. The record is
    /// queued at once; `told` waits for it. Over the budget there is no record to wait for,
    /// and `told` goes out at once. `noted` is stored either way, with the record if there is
    /// one.
    fn audit_refusal(
        &self,
        r: RefusalRecord<'_>,
        mut noted: Vec<Change>,
        told: Outbox,
    ) -> Option<Pending> {
        let budget = self
            .audit_budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .spend(r.ip, r.at);
        let reason = match budget {
            Some(0) => r.reason.to_owned(),
            Some(left_out) => format!(
                "{} (and {left_out} earlier refusals of this address not audited)",
                r.reason
            ),
            None => {
                debug!(ip = %r.ip, "refusal over the audit budget: {}", r.reason);
                if !noted.is_empty() {
                    // Queued at once, durable soon; nothing waits for it.
                    drop(self.store.queue(noted));
                }
                self.tell(told);
                return None;
            }
        };
        let record = AuditRecord::new(
            r.at,
            r.tenant,
            r.actor,
            r.device,
            "connect",
            Outcome::Refused,
            Some(reason),
        );
        noted.push(Change::Audit(record));
        Some(Pending {
            committed: self.store.queue(noted),
            out: told,
        })
    }

    /// Who the client is, and whether it may connect; an admitted session is registered as
    /// live (the front door has yet to open it). `None`: the lock was not free at once
    /// ([`Wait::Never`]).
    fn judge(
        &self,
        info: &ConnectInfo,
        identity: Result<Identity, String>,
        at: OffsetDateTime,
        wait: Wait,
    ) -> Option<Judgement> {
        let identity = match identity {
            Ok(i) => i,
            Err(reason) => {
                return Some(Judgement::Refuse(Refused {
                    refusal: Refusal::NotAuthorized,
                    // What the client presented, and why it identifies nothing: no secret.
                    public: reason.clone(),
                    noted: Vec::new(),
                    reason,
                    // Audited in the device's tenant when the client id names a known device.
                    tenant: self.tenant_of_client_id(&info.client_id),
                    device: Some(quoted(&info.client_id)),
                    counts: true,
                    told: Outbox::default(),
                }));
            }
        };
        let mut guard = self.lock_with(wait)?;
        let judgement = match &identity {
            Identity::Phone { mac, presented } => self.admit_phone(mac, presented),
            Identity::Operator { id, serial, key } => {
                self.admit_operator(&guard.live, info, id, serial, key)
            }
            Identity::Station { serial, presented } => {
                self.admit_station(&guard.live, info, serial, presented, at)
            }
        };
        if let Judgement::Admit(_) = judgement {
            register(&mut guard.live, info, identity, at);
        }
        Some(judgement)
    }

    fn admit_operator(
        &self,
        live: &Live,
        info: &ConnectInfo,
        id: &OperatorId,
        serial: &str,
        key: &fleet_certs::Fingerprint,
    ) -> Judgement {
        let refuse = |reason: String| {
            Judgement::Refuse(Refused {
                refusal: Refusal::NotAuthorized,
                public: reason.clone(),
                noted: Vec::new(),
                reason,
                tenant: id.tenant.clone(),
                device: None,
                counts: false,
                told: Outbox::default(),
            })
        };
        // Operators may use any client id (PROTOCOL §1), but not one another operator's live
        // session holds: taking it over would let one operator (of any tenant) cut another.
        // Another operator is another tenant, or another name: both together are who it is.
        if let Some(LiveSession {
            identity: Identity::Operator { id: holder, .. },
            ..
        }) = live.sessions.get(&info.client_id)
        {
            if holder != id {
                return refuse("client id in use by another operator's session".to_owned());
            }
        }
        if let Err(reason) = self.operator_admits(id, serial, key) {
            return refuse(reason);
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
        Judgement::Admit(Granted {
            rights: identity::operator_rights(&id.name, &id.tenant),
            tenant: id.tenant.clone(),
            device: None,
            level: "operator",
            reserved: true,
        })
    }

    fn admit_station(
        &self,
        live: &Live,
        info: &ConnectInfo,
        serial: &Serial,
        presented: &Presented,
        at: OffsetDateTime,
    ) -> Judgement {
        let record = match self.store.station(serial) {
            Ok(r) => r,
            Err(e) => return Judgement::Unavailable(format!("store unavailable: {e}")),
        };
        let tenant = record
            .as_ref()
            .map(|r| r.tenant.clone())
            .unwrap_or_else(|| station::DEFAULT_TENANT.to_owned());
        let refuse = |refusal, reason: String, public: String, noted, counts, told| {
            Judgement::Refuse(Refused {
                refusal,
                reason,
                public,
                noted,
                tenant: tenant.clone(),
                device: Some(serial.to_string()),
                counts,
                told,
            })
        };
        if record.is_none() {
            let ip = info.peer_addr.ip().to_string();
            if let Err(reason) = self.may_add_pending(live, serial, &ip) {
                let public = reason.clone();
                let (none, told) = (Vec::new(), Outbox::default());
                return refuse(Refusal::QuotaExceeded, reason, public, none, false, told);
            }
        }
        let (level, name) = match station::admit(record.as_ref(), presented) {
            Admit::Pending => (StationRights::Pending, "pending"),
            Admit::Legacy => (StationRights::Legacy, "legacy"),
            Admit::Authorized => (StationRights::Authorized, "authorized"),
            Admit::Deny(reason) => {
                let counts = !matches!(reason, DenyReason::Rejected);
                let mut told = Outbox::default();
                let mut noted = Vec::new();
                if let DenyReason::IdentityMismatch { pinned, presented } = &reason {
                    noted.push(Change::NoteMismatch {
                        serial: serial.clone(),
                        at,
                    });
                    let body = json!({
                        "event": "identity_mismatch",
                        "serial": serial.as_str(),
                        "pinned": pinned.to_string(),
                        "presented": presented.map(|p| p.to_string()),
                        "ip": info.peer_addr.ip().to_string(),
                        "advice": "possible clone, or authentication deleted on the station: remove the station, then reboot it",
                    });
                    told.event(&tenant, EventKind::Security, body, at);
                }
                let public = reasons::station_refused(&reason);
                let refusal = Refusal::NotAuthorized;
                return refuse(refusal, reason.to_string(), public, noted, counts, told);
            }
        };
        Judgement::Admit(Granted {
            rights: identity::station_rights(serial, level),
            tenant: tenant.clone(),
            device: Some(serial.to_string()),
            level: name,
            reserved: false,
        })
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

    /// The front door registered the session: the one it took over is gone. Its rights as they
    /// are now (a decision may have been taken while it was admitted); the outer `None`: the
    /// lock was not free at once ([`Wait::Never`]), nothing was done.
    pub(super) fn opened(
        &self,
        client_id: &str,
        session_id: u64,
        wait: Wait,
    ) -> Option<Option<Rights>> {
        let mut guard = self.lock_with(wait)?;
        let Some(session) = guard
            .live
            .sessions
            .get_mut(client_id)
            .filter(|s| s.session_id == session_id)
        else {
            return Some(None);
        };
        session.previous = None;
        Some(self.rights_of(&session.identity).ok().flatten())
    }

    pub(super) fn closed(&self, client_id: &str, session_id: u64) {
        let done = self.closed_with(client_id, session_id, Wait::Block);
        debug_assert!(done, "a blocking close always takes the lock");
    }

    /// The end of a session; false: the lock was not free at once ([`Wait::Never`]), nothing
    /// was done.
    pub(super) fn closed_with(&self, client_id: &str, session_id: u64, wait: Wait) -> bool {
        // First, as always (and harmlessly again if the close moves to the pool).
        self.operator_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&session_id);
        let Some(mut guard) = self.lock_with(wait) else {
            return false;
        };
        let live = &mut guard.live;
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
            return true;
        }
        if live
            .sessions
            .get(client_id)
            .is_none_or(|s| s.session_id != session_id)
        {
            return true;
        }
        let Some(LiveSession {
            identity: Identity::Station { serial, .. },
            ..
        }) = live.sessions.remove(client_id)
        else {
            bound_last_sessions(live);
            return true;
        };
        match self.store.station(&serial) {
            Ok(Some(station)) => {
                live.saw(&serial, self.now());
                let view = self.view(live, &station);
                drop(guard);
                let mut told = Outbox::default();
                let body = json!({"event": "offline", "station": view});
                told.event(&station.tenant, EventKind::Stations, body, self.now());
                self.tell(told);
            }
            // No record (a client that never asked): nothing to remember it by.
            _ => {
                live.forget_seen(&serial);
                bound_last_sessions(live);
            }
        }
        true
    }
}

/// What the audit record of a refused CONNECT says.
struct RefusalRecord<'a> {
    ip: IpAddr,
    at: OffsetDateTime,
    tenant: &'a str,
    actor: String,
    device: Option<String>,
    reason: &'a str,
}

/// A client id as the device of a refusal's record: shortened.
fn quoted(client_id: &str) -> String {
    client_id.chars().take(MAX_QUOTED_CLIENT_ID).collect()
}

/// Makes the admitted session the live one of its client id (keeping the one it replaces until
/// the front door has registered it), and remembers who it is beyond its end.
pub(super) fn register(
    live: &mut Live,
    info: &ConnectInfo,
    identity: Identity,
    at: OffsetDateTime,
) {
    let previous = live.sessions.remove(&info.client_id).map(|mut p| {
        p.previous = None;
        Box::new(p)
    });
    let ip = info.peer_addr.ip();
    match &identity {
        Identity::Phone { .. } => {
            live.last_phone_ip.insert(info.client_id.clone(), ip);
        }
        Identity::Station { serial, presented } => {
            live.saw(serial, at);
            live.last_station_session
                .insert(info.client_id.clone(), (*presented, ip));
        }
        Identity::Operator { .. } => {}
    }
    live.sessions.insert(
        info.client_id.clone(),
        LiveSession {
            session_id: info.session_id,
            identity,
            ip,
            previous,
        },
    );
}

/// The identities of closed sessions are kept so that a message sent just before a close is
/// still attributed (PROTOCOL §3); anonymous clients must not grow them without bound: past a
/// bound, only those of live sessions are kept.
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

/// The controller as the front door's [`Admission`].
pub struct ControllerAdmission(pub Arc<Controller>);

impl Admission for ControllerAdmission {
    fn admit(&self, info: ConnectInfo) -> BoxFuture<'_, Decision> {
        Box::pin(async move {
            // The decision takes the controller's lock, which a batch holds across its
            // commit: here if the lock is free at once, else on the blocking pool (`Wait`),
            // so that it never holds an async worker meanwhile.
            let step = match self.0.admit_now(&info, Wait::Never) {
                Some(step) => Some(step),
                None => {
                    let controller = Arc::clone(&self.0);
                    let asked = info.clone();
                    let blocking = move || controller.admit_now(&asked, Wait::Block);
                    tokio::task::spawn_blocking(blocking).await.ok().flatten()
                }
            };
            let Admitted {
                decision,
                slow,
                pending,
            } = match step {
                Some(Step::Decided(admitted)) => admitted,
                // A PAP attempt changes the phone (its count, its state, a whitelisted
                // address): a batch decides it and commits it with what else it handles, and
                // this admission waits for that without holding any lock or thread.
                Some(Step::Pap { mac, password, at }) => {
                    let judgement = self.0.pap_on_the_bus(&info, mac, password, at).await;
                    if let Judgement::Unavailable(_) = judgement {
                        // Registered by a batch whose commit failed: undone.
                        self.0.closed(&info.client_id, info.session_id);
                    }
                    self.0.conclude(&info, at, judgement)
                }
                None => {
                    return Decision::Deny {
                        refusal: Refusal::ServerUnavailable,
                        reason: Reason::new("the admission failed", "server unavailable"),
                    }
                }
            };
            // Audited before answered; concurrent admissions share one commit.
            let stored = match pending {
                Some(pending) => self.0.settle(pending).await,
                None => true,
            };
            if !stored && matches!(decision, Decision::Allow { .. }) {
                // No admission without its audit record.
                self.0.closed(&info.client_id, info.session_id);
                return Decision::Deny {
                    refusal: Refusal::ServerUnavailable,
                    reason: Reason::new("the admission could not be audited", "server unavailable"),
                };
            }
            if slow && matches!(decision, Decision::Deny { .. }) {
                // A guesser is slowed down before it is refused for good.
                tokio::time::sleep(self.0.settings.flood.failed_auth_delay).await;
            }
            decision
        })
    }

    fn session_opened(&self, client_id: &str, session_id: u64) -> Result<Rights, Refusal> {
        let opened = self.0.opened(client_id, session_id, Wait::Block);
        opened.flatten().ok_or(Refusal::NotAuthorized)
    }

    fn try_session_opened(
        &self,
        client_id: &str,
        session_id: u64,
    ) -> Option<Result<Rights, Refusal>> {
        let opened = self.0.opened(client_id, session_id, Wait::Never)?;
        Some(opened.ok_or(Refusal::NotAuthorized))
    }

    fn session_closed(&self, client_id: &str, session_id: u64) {
        self.0.closed(client_id, session_id);
    }

    fn try_session_closed(&self, client_id: &str, session_id: u64) -> bool {
        self.0.closed_with(client_id, session_id, Wait::Never)
    }

    fn message(
        &self,
        from: &str,
        session: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, bool> {
        // Operators' requests, and everything a device says to the controller
        // (`identity::station_rights`, `identity::phone_rights`): the front door checked the
        // topic against the session's rights, so it is the device's own.
        let client_id = from.to_owned();
        Box::pin(async move {
            match ClaimedClient::of(&client_id) {
                ClaimedClient::Phone(_) | ClaimedClient::Station(_) => {
                    self.0.inbox_device(topic, payload).await
                }
                ClaimedClient::Other => self.0.inbox_request(&client_id, session, payload).await,
            }
        })
    }

    fn refused(&self, client_id: &str, peer_addr: std::net::SocketAddr, reason: &str) {
        // Queued without waiting: the accept loop must not wait for the disk. The record is
        // published only once it is durable.
        let record = RefusalRecord {
            ip: peer_addr.ip(),
            at: self.0.now(),
            tenant: station::DEFAULT_TENANT,
            actor: peer_addr.to_string(),
            device: Some(client_id.to_owned()),
            reason,
        };
        let pending = self.0.audit_refusal(record, Vec::new(), Outbox::default());
        if let (Some(pending), Ok(runtime)) = (pending, tokio::runtime::Handle::try_current()) {
            let controller = Arc::clone(&self.0);
            runtime.spawn(async move { controller.settle(pending).await });
        }
    }
}
