//! Phones in the controller's shell: admission with PAP and whitelists (PROTOCOL §2, §5) and
//! provisioning over MQTT (§3); the operator's phone commands are `phone_commands.rs`. The
//! rules themselves are the pure `phone` and `whitelist` modules; this file does the I/O around
//! them, and commits every decision before anyone is told.

use std::net::IpAddr;

use fleet_broker::{Refusal, Rights};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tracing::warn;

use super::admission::{register, Granted, Judgement, Refused};
use super::durable::Batch;
use super::effects::{Outbox, Output};
use super::live::Live;
use super::{Controller, InboxItem, PapAsk};
use crate::audit::{AuditRecord, Outcome};
use crate::identity::{self, Identity, PhonePresented, PhoneRights};
use crate::phone::{self, Attempt, PapDecision, Phone};
use crate::store::Change;
use fleet_protocol::payload::{ProvisionRequest, ProvisionResponse};
use fleet_protocol::{CommandError, EventKind, Mac, Topic};

/// A PAP attempt: the password given (or none), from where, and when.
struct PapAttempt<'a> {
    password: Option<&'a str>,
    ip: IpAddr,
    at: OffsetDateTime,
}

pub(super) fn internal(e: impl std::fmt::Display) -> CommandError {
    CommandError::internal(e.to_string())
}

/// A phone's refusal: every one counts as a failed authentication of the address. The client
/// reads `reason` too, unless [`refuse_saying`] words it for it.
fn refuse(mac: &Mac, refusal: Refusal, reason: String, tenant: String) -> Judgement {
    let public = match refusal {
        Refusal::ServerUnavailable => "server unavailable".to_owned(),
        _ => reason.clone(),
    };
    refuse_saying(mac, refusal, reason, public, tenant)
}

/// A phone's refusal whose client reads `public` (`crate::reasons`), not the audit's reason.
fn refuse_saying(
    mac: &Mac,
    refusal: Refusal,
    reason: String,
    public: String,
    tenant: String,
) -> Judgement {
    Judgement::Refuse(Refused {
        refusal,
        reason,
        public,
        noted: Vec::new(),
        tenant,
        device: Some(mac.to_string()),
        counts: true,
        told: Outbox::default(),
    })
}

/// An admitted phone.
fn granted(mac: &Mac, rights: PhoneRights, tenant: String, level: &'static str) -> Judgement {
    Judgement::Admit(Granted {
        rights: identity::phone_rights(mac, rights),
        tenant,
        device: Some(mac.to_string()),
        level,
        reserved: false,
    })
}

impl Controller {
    /// Admission of a phone by its certificate, against the committed record. A phone without
    /// one is admitted by its PAP attempt, which a batch decides ([`Self::on_pap_attempt`]).
    pub(super) fn admit_phone(&self, mac: &Mac, presented: &PhonePresented) -> Judgement {
        let unknown_tenant = crate::station::DEFAULT_TENANT.to_owned();
        let phone = match self.store.phone(mac) {
            Ok(Some(p)) => p,
            Ok(None) => {
                let reason = format!("unknown phone {mac}");
                return refuse(mac, Refusal::NotAuthorized, reason, unknown_tenant);
            }
            Err(e) => {
                let reason = format!("store: {e}");
                return refuse(mac, Refusal::ServerUnavailable, reason, unknown_tenant);
            }
        };
        match presented {
            PhonePresented::Certificate { serial, tenant } => {
                if *tenant != phone.tenant || !phone::certificate_valid(&phone, serial) {
                    let reason = "certificate revoked, or not this phone's".to_owned();
                    return refuse(mac, Refusal::NotAuthorized, reason, phone.tenant);
                }
                let level = "provisioned phone";
                granted(mac, PhoneRights::Provisioned, phone.tenant, level)
            }
            PhonePresented::Pap { .. } => Judgement::Unavailable(
                "a phone without certificate is admitted by its PAP attempt".to_owned(),
            ),
        }
    }

    /// Hands a phone's PAP attempt to the bus and waits, holding nothing, until the batch
    /// that decided it was committed.
    pub(super) async fn pap_on_the_bus(
        &self,
        info: &fleet_broker::ConnectInfo,
        mac: Mac,
        password: Option<String>,
        at: OffsetDateTime,
    ) -> Judgement {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let ask = PapAsk {
            info: info.clone(),
            mac,
            password,
            at,
            reply: std::sync::Mutex::new(Some(reply)),
        };
        if self.inbox.send(InboxItem::Pap(ask)).await.is_err() {
            return Judgement::Unavailable("the controller's inbox is closed".to_owned());
        }
        answer.await.unwrap_or_else(|_| {
            Judgement::Unavailable("the PAP attempt was dropped undecided".to_owned())
        })
    }

    /// A phone's PAP attempt, in a batch: decided against the phone as the batch sees it, its
    /// changes written into the batch's transaction, an admitted session registered; the
    /// judgement goes back to the admission once the batch is committed (`Output::Judged`).
    pub(super) fn on_pap_attempt(&self, live: &mut Live, cx: &mut Batch<'_>, ask: &PapAsk) {
        let reply = ask.reply.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(reply) = reply else {
            return;
        };
        let judgement = self.judge_pap(live, cx, ask);
        if let Judgement::Admit(_) = judgement {
            let presented = PhonePresented::Pap {
                password: ask.password.clone(),
            };
            let identity = Identity::Phone {
                mac: ask.mac.clone(),
                presented,
            };
            register(live, &ask.info, identity, ask.at);
        }
        cx.out.push(Output::Judged {
            reply,
            judgement: Box::new(judgement),
        });
    }

    fn judge_pap(&self, live: &mut Live, cx: &mut Batch<'_>, ask: &PapAsk) -> Judgement {
        let (mac, unknown_tenant) = (&ask.mac, crate::station::DEFAULT_TENANT.to_owned());
        match cx.txn().phone(mac) {
            Ok(Some(phone)) => {
                let attempt = PapAttempt {
                    password: ask.password.as_deref(),
                    ip: ask.info.peer_addr.ip(),
                    at: ask.at,
                };
                self.attempt_pap(live, cx, phone, attempt)
            }
            Ok(None) => {
                let reason = format!("unknown phone {mac}");
                refuse(mac, Refusal::NotAuthorized, reason, unknown_tenant)
            }
            Err(e) => {
                let reason = format!("store: {e}");
                refuse(mac, Refusal::ServerUnavailable, reason, unknown_tenant)
            }
        }
    }

    /// A phone without certificate: counts wrong PAPs towards lockout and block, and a
    /// correct one whitelists the address. What the attempt changed is written into the
    /// batch, so that the next attempt (in this batch or a later one) sees it; should the
    /// batch not be committed, the in-memory whitelists are reloaded from the store.
    fn attempt_pap(
        &self,
        live: &mut Live,
        cx: &mut Batch<'_>,
        phone: Phone,
        pap: PapAttempt<'_>,
    ) -> Judgement {
        let (mac, tenant, at, ip) = (phone.mac.clone(), phone.tenant.clone(), pap.at, pap.ip);
        let policy = &self.settings.phones;
        let attempt = Attempt {
            password: pap.password,
            whitelisted: live.whitelists.is_whitelisted(&tenant, ip, at),
        };
        let before = phone.state_at(at).name();
        let counts = (phone.failures, phone.lockouts);
        let (phone, decision) = phone::attempt(phone, &attempt, policy, at);
        let after = phone.state_at(at).name();
        // Told when the state or the count of wrong PAPs moved (at most `pap_attempts` events
        // before a lockout), so that a console shows the count as it grows.
        if before != after || counts != (phone.failures, phone.lockouts) {
            let body = json!({"event": "state", "phone": without_pap(&phone.view(at))});
            cx.out.event(&tenant, EventKind::Phones, body, self.now());
        }
        let phone_after = phone.clone();
        let mut changes = vec![Change::PutPhone(phone)];
        let judgement = match decision {
            PapDecision::AdmitUnprovisioned { pap_checked } => {
                if pap_checked {
                    // A correct PAP puts the client's address on the tenant's temporary
                    // whitelist.
                    live.whitelists.expire(at);
                    let duration = policy.temporary_whitelist;
                    live.whitelists.grant_temporary(&tenant, ip, at, duration);
                    changes.push(Change::PutWhitelists(live.whitelists.clone()));
                }
                let level = if pap_checked {
                    "unprovisioned phone, correct PAP"
                } else {
                    "unprovisioned phone, no PAP required"
                };
                granted(&mac, PhoneRights::Unprovisioned, tenant.clone(), level)
            }
            PapDecision::WrongPap => {
                let reason = "wrong or missing PAP".to_owned();
                let public = crate::reasons::wrong_pap(&phone_after, at);
                let refusal = Refusal::BadUserNameOrPassword;
                refuse_saying(&mac, refusal, reason, public, tenant.clone())
            }
            PapDecision::Locked { reason } | PapDecision::NotAllowed { reason } => {
                let public = crate::reasons::pap_not_checked(&phone_after, at);
                refuse_saying(&mac, Refusal::NotAuthorized, reason, public, tenant.clone())
            }
        };
        let written = match before != after {
            true => {
                let record = AuditRecord::new(
                    at,
                    &tenant,
                    ip.to_string(),
                    Some(mac.to_string()),
                    "auth_state",
                    Outcome::Ok,
                    Some(format!("{before} -> {after}")),
                );
                cx.record(changes, record).map(drop)
            }
            false => cx.write(changes),
        };
        match written {
            Ok(()) => judgement,
            Err(e) => refuse(&mac, Refusal::ServerUnavailable, e.message, tenant),
        }
    }

    /// Rights of a phone session as they are now (`None`: cut it).
    pub(super) fn phone_rights_now(
        &self,
        mac: &Mac,
        presented: &PhonePresented,
    ) -> Result<Option<Rights>, CommandError> {
        let Some(phone) = self.store.phone(mac).map_err(internal)? else {
            return Ok(None);
        };
        Ok(match presented {
            PhonePresented::Certificate { serial, tenant } => (*tenant == phone.tenant
                && phone::certificate_valid(&phone, serial))
            .then(|| identity::phone_rights(mac, PhoneRights::Provisioned)),
            PhonePresented::Pap { .. } => {
                Some(identity::phone_rights(mac, PhoneRights::Unprovisioned))
            }
        })
    }

    fn phone_session_ip(&self, live: &Live, mac: &Mac) -> Option<IpAddr> {
        let client_id = mac.client_id();
        live.sessions
            .get(&client_id)
            .map(|s| s.ip)
            .or_else(|| live.last_phone_ip.get(&client_id).copied())
    }

    /// `phones/<mac>/provision/request`: check the CSR, sign it with the fleet CA, answer.
    pub(super) fn on_provision_request(
        &self,
        live: &Live,
        cx: &mut Batch<'_>,
        mac: Mac,
        payload: &[u8],
    ) {
        let topic = Topic::PhoneProvisionResponse(mac.clone());
        let fail = |cx: &mut Batch<'_>, e: CommandError| {
            let refused = ProvisionResponse::Refused {
                error: e.message,
                code: e.code.as_str().to_owned(),
            };
            cx.out.publish(&topic, &refused.to_json());
        };
        let csr = match ProvisionRequest::csr_of(payload) {
            Ok(csr) => csr,
            Err(e) => return fail(cx, e),
        };
        let at = self.now();
        let phone = match cx.txn().phone(&mac) {
            Ok(Some(p)) => p,
            Ok(None) => return fail(cx, CommandError::not_found(format!("no phone {mac}"))),
            Err(e) => return fail(cx, internal(e)),
        };
        // The CSR must carry the phone's own MAC as CN; the certificate gets OU=phone and the
        // phone's tenant whatever the CSR asked for.
        let issued = match self
            .ca
            .issue_client_from_csr(&csr, mac.as_str(), "phone", &phone.tenant)
        {
            Ok(c) => c,
            Err(e) => {
                return fail(
                    cx,
                    CommandError::invalid_argument(format!("CSR refused: {e}")),
                )
            }
        };
        let serial = match fleet_certs::inspect(&issued.cert_der) {
            Ok(info) => info.serial_number,
            Err(e) => return fail(cx, internal(e)),
        };
        let tenant = phone.tenant.clone();
        let site = phone.site.clone();
        let phone = match phone::issue_certificate(phone, serial.clone(), at) {
            Ok(p) => p,
            Err(e) => return fail(cx, e.into()),
        };
        let ip = self.phone_session_ip(live, &mac);
        let audit = AuditRecord::new(
            at,
            &tenant,
            ip.map(|i| i.to_string()).unwrap_or_else(|| mac.client_id()),
            Some(mac.to_string()),
            "provision_request",
            Outcome::Ok,
            Some(format!("certificate {serial} issued")),
        );
        if let Err(e) = cx.record(vec![Change::PutPhone(phone)], audit) {
            return fail(cx, e);
        }
        let issued = ProvisionResponse::Issued {
            certificate: issued.cert_pem,
            ca: self.ca.cert_pem().to_owned(),
            config: Some(json!({
                "tenant": tenant,
                "site": site,
                "client_id": mac.client_id(),
                "data_topic": Topic::PhoneData(mac.clone(), String::new()).to_string(),
            })),
        };
        cx.out.publish(&topic, &issued.to_json());
    }

    /// `phones/<mac>/provision/complete`: the phone stored its certificate; its PAP is void.
    pub(super) fn on_provision_complete(&self, live: &mut Live, cx: &mut Batch<'_>, mac: Mac) {
        let at = self.now();
        let phone = match cx.txn().phone(&mac) {
            Ok(Some(p)) => p,
            _ => return,
        };
        let tenant = phone.tenant.clone();
        let phone = match phone::complete(phone, at) {
            Ok(p) => p,
            Err(e) => {
                warn!(%mac, "provision/complete refused: {e}");
                return;
            }
        };
        let view = phone.view(at);
        let mut changes = vec![Change::PutPhone(phone)];
        // Every successful provisioning from a temporarily whitelisted address extends it.
        if let Some(ip) = self.phone_session_ip(live, &mac) {
            let duration = self.settings.phones.temporary_whitelist;
            if live
                .whitelists
                .extend_if_temporary(&tenant, ip, at, duration)
            {
                changes.push(Change::PutWhitelists(live.whitelists.clone()));
            }
        }
        let audit = AuditRecord::new(
            at,
            &tenant,
            mac.client_id(),
            Some(mac.to_string()),
            "provision_complete",
            Outcome::Ok,
            Some("authentication_successful".into()),
        );
        if cx.record(changes, audit).is_err() {
            return;
        }
        let body = json!({"event": "state", "phone": without_pap(&view)});
        cx.out.event(&tenant, EventKind::Phones, body, self.now());
    }
}

/// A phone's view for an event: without its PAP, which goes only to the operator who created or
/// reset it (in the command's answer), never to every subscriber of the tenant's events.
pub(super) fn without_pap(view: &Value) -> Value {
    let mut view = view.clone();
    if let Some(obj) = view.as_object_mut() {
        obj.remove("pap");
    }
    view
}
