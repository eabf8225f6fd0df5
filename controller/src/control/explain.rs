//! `explain` (docs/protocol.md §6): why a station, a phone or an address is where it stands, for
//! `fleetctl why` and the console. A read: it changes nothing and is audited like the other
//! reads. It sees the operator's tenant only: another tenant's device does not exist for it,
//! and its refusals come from the tenant's own audit log. Address blocks are fleet-wide (one
//! address may be shared by devices of several tenants), so outside the `default` tenant, which
//! sees them all with `listAddressBlocks`, a block is shown only where the tenant already knows
//! the address (its own device's, or one its own refusals came from), with its end but without
//! the fleet-wide count of failures. The words are `crate::reasons`'s.

use std::net::IpAddr;

use serde_json::{json, Value};

use super::commands::{Answer, Asking};
use super::{rfc3339, Controller};
use crate::audit::AuditRecord;
use crate::phone::{AuthState, Phone};
use crate::reasons::{self, AddressStanding, RefusalsOf};
use crate::station::{self, Station};
use fleet_protocol::{CommandError, Subject};

/// How many of the tenant's newest audit records `explain` reads to find a subject's refusals:
/// a bound on the work of one read, whatever the size of the log (the store reads a tenant's
/// records through its index, so other tenants' records are not walked).
pub(super) const AUDIT_SCAN: usize = 1000;

/// How many refusals `explain` shows, newest first.
pub(super) const MAX_REFUSALS: usize = 5;

impl Controller {
    pub(super) fn explain(
        &self,
        cx: &mut Asking<'_, '_>,
        subject: &Subject,
    ) -> Result<Answer, CommandError> {
        let internal = |e: crate::store::StoreError| CommandError::internal(e.to_string());
        let records = cx
            .cx
            .txn()
            .audit(cx.tenant(), AUDIT_SCAN)
            .map_err(internal)?;
        let data = match subject {
            Subject::Address(ip) => self.explain_address(cx, ip.get(), &records)?,
            Subject::Device { text, serial, mac } => {
                let tenant = cx.tenant().to_owned();
                // Another tenant's device does not exist for this operator.
                let phone = match mac {
                    Some(mac) => cx.cx.txn().phone(mac).map_err(internal)?,
                    None => None,
                }
                .filter(|p| p.tenant == tenant);
                let station = match (serial, &phone) {
                    (Some(serial), None) => cx.cx.txn().station(serial).map_err(internal)?,
                    _ => None,
                }
                .filter(|s| s.tenant == tenant);
                match (phone, station) {
                    (Some(phone), _) => self.explain_phone(cx, &phone, &records),
                    (None, Some(station)) => self.explain_station(cx, &station, &records),
                    (None, None) => {
                        return Err(CommandError::not_found(format!(
                            "no station or phone {text}"
                        )))
                    }
                }
            }
        };
        Ok(Answer::Read(data))
    }

    fn explain_station(
        &self,
        cx: &Asking<'_, '_>,
        station: &Station,
        records: &[AuditRecord],
    ) -> Value {
        let online = cx.live.sessions.contains_key(&station.serial.client_id());
        let state = station.state(online);
        let mismatch = reasons::recent_mismatch(station, cx.at);
        let names = [station.serial.to_string(), station.serial.client_id()];
        let refused = reasons::refusals(records, RefusalsOf::Device(&names), MAX_REFUSALS);
        let ip = station
            .ip
            .as_deref()
            .and_then(|ip| ip.parse::<IpAddr>().ok());
        json!({
            "subject": station.serial.as_str(),
            "kind": "station",
            "state": state.as_str(),
            "label": state.label(),
            "why": reasons::station_why(station, online, cx.at),
            "rule": reasons::station_rule(state, mismatch.is_some()),
            "station": self.view(cx.live, station),
            "refusals": refusals_view(&refused),
            "block": ip.and_then(|ip| self.block_view(cx, ip)),
            "scanned": records.len(),
        })
    }

    fn explain_phone(&self, cx: &Asking<'_, '_>, phone: &Phone, records: &[AuditRecord]) -> Value {
        let state = phone.state_at(cx.at);
        let suspended = phone.is_suspended(cx.at);
        let names = [phone.mac.to_string(), phone.mac.client_id()];
        let refused = reasons::refusals(records, RefusalsOf::Device(&names), MAX_REFUSALS);
        // The address it last came from: its session's, or that of its newest refusal.
        let client_id = phone.mac.client_id();
        let ip = cx
            .live
            .sessions
            .get(&client_id)
            .map(|s| s.ip)
            .or_else(|| cx.live.last_phone_ip.get(&client_id).copied())
            .or_else(|| refused.first().and_then(|r| reasons::actor_ip(&r.actor)));
        let policy = &self.settings.phones;
        let locked_until = match state {
            AuthState::Failed { until } => Some(rfc3339(until)),
            _ => None,
        };
        json!({
            "subject": phone.mac.as_str(),
            "kind": "phone",
            "state": state.name(),
            "label": state.label(),
            "why": reasons::phone_why(phone, policy, cx.at),
            "rule": reasons::phone_rule(state, suspended),
            // The phone object without its PAP: what is explained is not a secret.
            "phone": {
                "mac": phone.mac.as_str(),
                "vendor": phone.vendor,
                "type": phone.kind,
                "site": phone.site,
                "auth_state": state.name(),
                "label": state.label(),
                "suspended_until": phone.suspended_until.filter(|u| *u > cx.at).map(rfc3339),
            },
            "wrong_paps": phone.failures,
            "pap_attempts": policy.pap_attempts,
            "lockouts": phone.lockouts,
            "lockouts_before_block": policy.lockouts_before_block,
            "locked_until": locked_until,
            "refusals": refusals_view(&refused),
            "block": ip.and_then(|ip| self.block_view(cx, ip)),
            "scanned": records.len(),
        })
    }

    fn explain_address(
        &self,
        cx: &Asking<'_, '_>,
        ip: IpAddr,
        records: &[AuditRecord],
    ) -> Result<Value, CommandError> {
        let tenant = cx.tenant();
        let whitelists = &cx.live.whitelists;
        let mut covering: Vec<Value> = whitelists
            .permanent(tenant)
            .into_iter()
            .filter(|e| e.contains(ip))
            .map(|e| json!({"entry": e.to_string(), "kind": "permanent", "expires_at": null}))
            .collect();
        covering.extend(
            whitelists
                .temporary(tenant, cx.at)
                .filter(|(t, _)| *t == ip)
                .map(|(t, until)| {
                    json!({"entry": t.to_string(), "kind": "temporary", "expires_at": rfc3339(until)})
                }),
        );
        let refused = reasons::refusals(records, RefusalsOf::Address(ip), MAX_REFUSALS);
        // The tenant knows this address if its own records or whitelists name it.
        let known = !refused.is_empty() || !covering.is_empty();
        let (until, failures) = self.address_view(cx, ip, known);
        let standing = match (until, covering.is_empty()) {
            (Some(until), _) => AddressStanding::Blocked { until },
            (None, false) => AddressStanding::Whitelisted,
            (None, true) => AddressStanding::Open,
        };
        if standing == AddressStanding::Open && refused.is_empty() && failures.unwrap_or(0) == 0 {
            return Err(CommandError::not_found(format!(
                "nothing is known about address {ip}: no block, no whitelist entry, no \
                 refusal among the tenant's newest {AUDIT_SCAN} audit records"
            )));
        }
        let (state, label) = standing.name();
        Ok(json!({
            "subject": ip.to_string(),
            "kind": "address",
            "state": state,
            "label": label,
            "why": standing.why(failures),
            "rule": standing.rule(),
            "failures": failures,
            "refusals": refusals_view(&refused),
            "block": until.map(|until| block_json(ip, until, failures)),
            "whitelist": covering,
            "scanned": records.len(),
        }))
    }

    /// What `cx`'s tenant may see of `ip` in the failure limiter: the end of the block in force,
    /// if any (the `default` tenant sees every block; another only one of an address it
    /// `knows`), and the failed authentications counted at `ip` (`None` outside `default`:
    /// they are counted over every tenant's devices).
    fn address_view(
        &self,
        cx: &Asking<'_, '_>,
        ip: IpAddr,
        knows: bool,
    ) -> (Option<time::OffsetDateTime>, Option<u32>) {
        let fleet_wide = cx.tenant() == station::DEFAULT_TENANT;
        let limiter = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let until = limiter
            .blocks(cx.at)
            .into_iter()
            .find(|b| b.ip == ip)
            .map(|b| b.until)
            .filter(|_| fleet_wide || knows);
        (until, fleet_wide.then(|| limiter.failures(ip, cx.at)))
    }

    /// The block in force at a device's own address (which its tenant knows), as
    /// [`block_json`] shows it.
    fn block_view(&self, cx: &Asking<'_, '_>, ip: IpAddr) -> Option<Value> {
        let (until, failures) = self.address_view(cx, ip, true);
        until.map(|until| block_json(ip, until, failures))
    }
}

/// An address block as `listAddressBlocks` shows it, with `failures` `null` where the reader
/// may not know them.
fn block_json(ip: IpAddr, until: time::OffsetDateTime, failures: Option<u32>) -> Value {
    json!({
        "address": ip.to_string(),
        "until": rfc3339(until),
        "failures": failures,
    })
}

/// Refusals as `explain` lists them, newest first.
fn refusals_view(refused: &[&AuditRecord]) -> Vec<Value> {
    refused
        .iter()
        .map(|r| {
            json!({
                "seq": r.seq,
                "time": rfc3339(r.time),
                "action": r.action,
                "actor": r.actor,
                "reason": r.reason,
            })
        })
        .collect()
}
