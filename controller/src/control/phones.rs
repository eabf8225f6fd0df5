//! Phones in the controller's shell: admission with PAP and whitelists (PROTOCOL §2, §5),
//! provisioning over MQTT (§3), and the phone, whitelist and CSV operator commands (§6). The
//! rules themselves are the pure `phone` and `whitelist` modules; this file does the I/O around
//! them, and commits every decision before anyone is told.

use std::net::IpAddr;

use fleet_broker::{Refusal, Rights};
use serde_json::{json, Value};
use time::OffsetDateTime;
use tracing::warn;

use super::{Controller, Cx, Live, Output};
use crate::audit::{AuditRecord, Outcome};
use crate::devices_csv;
use crate::identity::{self, PhonePresented, PhoneRights};
use crate::phone::{self, Attempt, Pap, PapDecision, Phone};
use crate::request::{after_arg, bool_arg, mac_arg, page_limit_arg, text_arg};
use crate::store::Change;
use crate::whitelist::{self, WhitelistEntry};
use fleet_protocol::{CommandError, EventKind, Mac, Topic};

type AdmitResult = Result<(Rights, String, &'static str), (Refusal, String, String)>;

fn internal(e: impl std::fmt::Display) -> CommandError {
    CommandError::internal(e.to_string())
}

impl Controller {
    fn new_pap(&self) -> Result<Pap, CommandError> {
        Pap::generate(&self.rng).map_err(|_| CommandError::internal("no randomness for a PAP"))
    }

    /// Admission of a phone. Commits what the attempt changed (failure counts, lockouts, the
    /// temporary whitelist) before answering.
    pub(super) fn admit_phone(
        &self,
        live: &mut Live,
        mac: &Mac,
        presented: &PhonePresented,
        ip: IpAddr,
        at: OffsetDateTime,
    ) -> AdmitResult {
        let unknown_tenant = crate::station::DEFAULT_TENANT.to_owned();
        let phone = match self.store.phone(mac) {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Err((
                    Refusal::NotAuthorized,
                    format!("unknown phone {mac}"),
                    unknown_tenant,
                ))
            }
            Err(e) => {
                return Err((
                    Refusal::ServerUnavailable,
                    format!("store: {e}"),
                    unknown_tenant,
                ))
            }
        };
        let tenant = phone.tenant.clone();
        match presented {
            PhonePresented::Certificate {
                serial,
                tenant: cert_tenant,
            } => {
                if *cert_tenant != phone.tenant || !phone::certificate_valid(&phone, serial) {
                    return Err((
                        Refusal::NotAuthorized,
                        "certificate revoked, or not this phone's".into(),
                        tenant,
                    ));
                }
                let rights = identity::phone_rights(mac, PhoneRights::Provisioned);
                Ok((rights, tenant, "provisioned phone"))
            }
            PhonePresented::Pap { password } => {
                let policy = &self.settings.phones;
                let whitelisted = live.whitelists.is_whitelisted(&tenant, ip, at);
                let before = phone.state_at(at).name();
                let attempt = Attempt {
                    password: password.as_deref(),
                    whitelisted,
                };
                let (phone, decision) = phone::attempt(phone, &attempt, policy, at);
                let after = phone.state_at(at).name();
                let view = phone.view(at);
                let mut changes = vec![Change::PutPhone(phone)];
                if before != after {
                    changes.push(Change::Audit(AuditRecord::new(
                        at,
                        &tenant,
                        ip.to_string(),
                        Some(mac.to_string()),
                        "auth_state",
                        Outcome::Ok,
                        Some(format!("{before} -> {after}")),
                    )));
                }
                let result = match decision {
                    PapDecision::AdmitUnprovisioned { pap_checked } => {
                        if pap_checked {
                            // A correct PAP puts the client's address on the tenant's temporary
                            // whitelist.
                            live.whitelists.expire(at);
                            live.whitelists.grant_temporary(
                                &tenant,
                                ip,
                                at,
                                policy.temporary_whitelist,
                            );
                            changes.push(Change::PutWhitelists(live.whitelists.clone()));
                        }
                        let rights = identity::phone_rights(mac, PhoneRights::Unprovisioned);
                        let level = if pap_checked {
                            "unprovisioned phone, correct PAP"
                        } else {
                            "unprovisioned phone, no PAP required"
                        };
                        Ok((rights, tenant.clone(), level))
                    }
                    PapDecision::WrongPap => Err((
                        Refusal::BadUserNameOrPassword,
                        "wrong or missing PAP".to_owned(),
                        tenant.clone(),
                    )),
                    PapDecision::Locked { reason } | PapDecision::NotAllowed { reason } => {
                        Err((Refusal::NotAuthorized, reason, tenant.clone()))
                    }
                };
                if let Err(e) = self.commit(changes) {
                    return Err((Refusal::ServerUnavailable, e.message, tenant));
                }
                if before != after {
                    self.event(
                        &tenant,
                        EventKind::Phones,
                        json!({"event": "state", "phone": view}),
                    );
                }
                result
            }
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
    pub(super) fn on_provision_request(&self, live: &Live, cx: &mut Cx, mac: Mac, payload: &[u8]) {
        let topic = Topic::PhoneProvisionResponse(mac.clone()).to_string();
        let fail = |cx: &mut Cx, e: CommandError| {
            cx.publish(
                topic.clone(),
                &json!({"error": e.message, "code": e.code.as_str()}),
            );
        };
        let request: Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => return fail(cx, CommandError::invalid_argument(format!("not JSON: {e}"))),
        };
        let Some(csr) = request.get("csr").and_then(Value::as_str) else {
            return fail(
                cx,
                CommandError::invalid_argument("missing \"csr\" (a PEM string)"),
            );
        };
        let at = self.now();
        let phone = match cx.txn.phone(&mac) {
            Ok(Some(p)) => p,
            Ok(None) => return fail(cx, CommandError::not_found(format!("no phone {mac}"))),
            Err(e) => return fail(cx, internal(e)),
        };
        // The CSR must carry the phone's own MAC as CN; the certificate gets OU=phone and the
        // phone's tenant whatever the CSR asked for.
        let issued = match self
            .ca
            .issue_client_from_csr(csr, mac.as_str(), "phone", &phone.tenant)
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
            Err(e) => return fail(cx, e),
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
        if let Err(e) = cx.commit(vec![Change::PutPhone(phone), Change::Audit(audit)]) {
            return fail(cx, e);
        }
        cx.publish(
            topic,
            &json!({
                "certificate": issued.cert_pem,
                "ca": self.ca.cert_pem(),
                "config": {
                    "tenant": tenant,
                    "site": site,
                    "client_id": mac.client_id(),
                    "data_topic": Topic::PhoneData(mac.clone(), String::new()).to_string(),
                },
            }),
        );
    }

    /// `phones/<mac>/provision/complete`: the phone stored its certificate; its PAP is void.
    pub(super) fn on_provision_complete(&self, live: &mut Live, cx: &mut Cx, mac: Mac) {
        let at = self.now();
        let phone = match cx.txn.phone(&mac) {
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
        changes.push(Change::Audit(AuditRecord::new(
            at,
            &tenant,
            mac.client_id(),
            Some(mac.to_string()),
            "provision_complete",
            Outcome::Ok,
            Some("authentication_successful".into()),
        )));
        if cx.commit(changes).is_err() {
            return;
        }
        self.event_in(
            cx,
            &tenant,
            EventKind::Phones,
            json!({"event": "state", "phone": without_pap(&view)}),
        );
    }

    fn find_phone(&self, cx: &Cx, tenant: &str, args: &Value) -> Result<Phone, CommandError> {
        let mac = mac_arg(args)?;
        match cx.txn.phone(&mac).map_err(internal)? {
            // Another tenant's phone does not exist for this operator.
            Some(p) if p.tenant == tenant => Ok(p),
            _ => Err(CommandError::not_found(format!("no phone {mac}"))),
        }
    }

    /// The phone, whitelist and CSV commands; `None` when `name` is none of them. The flag says
    /// whether the command committed its own audit record.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn phone_command(
        &self,
        live: &mut Live,
        cx: &mut Cx,
        operator: &str,
        tenant: &str,
        name: &str,
        args: &Value,
        at: OffsetDateTime,
    ) -> Option<Result<(Value, bool), CommandError>> {
        let audit = |device: Option<String>, reason: Option<String>| {
            Change::Audit(AuditRecord::new(
                at,
                tenant,
                operator,
                device,
                name,
                Outcome::Ok,
                reason,
            ))
        };
        let result = match name {
            "createPhone" => (|| {
                let mac = mac_arg(args)?;
                let vendor = text_arg(args, "vendor", true)?;
                let kind = text_arg(args, "type", true)?;
                let site = text_arg(args, "site", false)?;
                if cx.txn.phone(&mac).map_err(internal)?.is_some() {
                    return Err(CommandError::invalid_argument(format!(
                        "a phone with MAC {mac} exists already"
                    )));
                }
                let phone = Phone::new(
                    mac.clone(),
                    tenant.into(),
                    vendor,
                    kind,
                    site,
                    self.new_pap()?,
                    at,
                );
                let view = phone.view(at);
                cx.commit(vec![
                    Change::PutPhone(phone),
                    audit(Some(mac.to_string()), None),
                ])?;
                self.event_in(
                    cx,
                    tenant,
                    EventKind::Phones,
                    json!({"event": "state", "phone": without_pap(&view)}),
                );
                Ok((view, true))
            })(),
            "listPhones" => (|| {
                let page_size = self.settings.requests.page_size;
                let limit = page_limit_arg(args, page_size)?.min(page_size);
                let after = after_arg(args)?;
                let (page, more) = cx
                    .txn
                    .phones_page(after.as_deref(), limit, &|p| p.tenant == tenant)
                    .map_err(internal)?;
                let mut data = json!({
                    "phones": page.iter().map(|p| p.view(at)).collect::<Vec<_>>(),
                });
                if let (true, Some(last)) = (more, page.last()) {
                    data["next"] = json!(last.mac.as_str());
                }
                Ok((data, false))
            })(),
            "getPhone" => self
                .find_phone(cx, tenant, args)
                .map(|p| (p.view(at), false)),
            "suspendPhoneAuthentication" => (|| {
                let phone = self.find_phone(cx, tenant, args)?;
                let mac = phone.mac.to_string();
                let phone = phone::suspend(phone, &self.settings.phones, at);
                let view = phone.view(at);
                cx.commit(vec![Change::PutPhone(phone), audit(Some(mac), None)])?;
                self.event_in(
                    cx,
                    tenant,
                    EventKind::Phones,
                    json!({"event": "state", "phone": without_pap(&view)}),
                );
                Ok((view, true))
            })(),
            "resetPhoneAuthentication" => (|| {
                let phone = self.find_phone(cx, tenant, args)?;
                let mac = phone.mac.clone();
                let phone = phone::reset_authentication(phone, self.new_pap()?, at);
                let view = phone.view(at);
                let reason = Some("PAP and certificate voided".to_owned());
                cx.commit(vec![
                    Change::PutPhone(phone),
                    audit(Some(mac.to_string()), reason),
                ])?;
                // The old PAP and certificate are invalid at once: the live session goes too,
                // (after the commit) before the operator hears of it.
                cx.out.push(Output::Cut {
                    client_id: mac.client_id(),
                    after: None,
                });
                self.event_in(
                    cx,
                    tenant,
                    EventKind::Phones,
                    json!({"event": "state", "phone": without_pap(&view)}),
                );
                Ok((view, true))
            })(),
            "deletePhone" => (|| {
                let phone = self.find_phone(cx, tenant, args)?;
                let mac = phone.mac.clone();
                cx.commit(vec![
                    Change::DeletePhone(mac.clone()),
                    audit(Some(mac.to_string()), None),
                ])?;
                cx.out.push(Output::Cut {
                    client_id: mac.client_id(),
                    after: None,
                });
                self.event_in(
                    cx,
                    tenant,
                    EventKind::Phones,
                    json!({"event": "deleted", "mac": mac.as_str()}),
                );
                Ok((json!({}), true))
            })(),
            "addWhitelistEntry" | "removeWhitelistEntry" => (|| {
                let entry: WhitelistEntry = match args.get("entry") {
                    Some(Value::String(s)) => s
                        .parse()
                        .map_err(|e| CommandError::invalid_argument(format!("entry: {e}")))?,
                    Some(_) => {
                        return Err(CommandError::invalid_argument("\"entry\" must be a string"))
                    }
                    None => return Err(CommandError::invalid_argument("missing \"entry\"")),
                };
                let mut whitelists = live.whitelists.clone();
                if name == "addWhitelistEntry" {
                    let force = bool_arg(args, "force")?;
                    let (v4, v6) = self.settings.whitelist_min_prefix;
                    whitelist::check_breadth(&entry, v4, v6, force)
                        .map_err(|e| CommandError::invalid_argument(format!("entry: {e}")))?;
                    whitelists.add_permanent(tenant, entry.clone());
                } else if !whitelists.remove(tenant, &entry).found() {
                    // A temporary entry can be removed too (Removed::Temporary).
                    return Err(CommandError::not_found(format!(
                        "{entry} is not on the whitelist"
                    )));
                }
                cx.commit(vec![
                    Change::PutWhitelists(whitelists.clone()),
                    audit(None, Some(entry.to_string())),
                ])?;
                live.whitelists = whitelists;
                Ok((json!({}), true))
            })(),
            "listWhitelist" => Ok((live.whitelists.list(tenant, at), false)),
            "exportDevicesCsv" => (|| {
                let phones = cx.txn.phones(Some(tenant)).map_err(internal)?;
                let csv = devices_csv::export(&phones, at).map_err(internal)?;
                Ok((json!({"csv": csv}), false))
            })(),
            "importPhonesCsv" => (|| {
                let Some(text) = args.get("csv").and_then(Value::as_str) else {
                    return Err(CommandError::invalid_argument("\"csv\" must be a string"));
                };
                let (rows, bad) = devices_csv::parse_import(text);
                let mut errors: Vec<Value> = bad
                    .iter()
                    .map(|e| json!({"line": e.line, "error": e.error}))
                    .collect();
                let mut created = Vec::new();
                let mut changes = Vec::new();
                for row in rows {
                    if cx.txn.phone(&row.mac).map_err(internal)?.is_some() {
                        errors.push(json!({"line": row.line, "error": format!("a phone with MAC {} exists already", row.mac)}));
                        continue;
                    }
                    let phone = Phone::new(
                        row.mac,
                        tenant.into(),
                        row.vendor,
                        row.kind,
                        row.site,
                        self.new_pap()?,
                        at,
                    );
                    created.push(phone.view(at));
                    changes.push(Change::PutPhone(phone));
                }
                changes.push(audit(
                    None,
                    Some(format!(
                        "{} created, {} errors",
                        created.len(),
                        errors.len()
                    )),
                ));
                // All phones of the file in one transaction: all or none.
                cx.commit(changes)?;
                Ok((json!({"created": created, "errors": errors}), true))
            })(),
            _ => return None,
        };
        Some(result)
    }
}

/// A phone's view for an event: without its PAP, which goes only to the operator who created or
/// reset it (in the command's answer), never to every subscriber of the tenant's events.
fn without_pap(view: &Value) -> Value {
    let mut view = view.clone();
    if let Some(obj) = view.as_object_mut() {
        obj.remove("pap");
    }
    view
}
