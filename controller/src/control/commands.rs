//! Operator requests in the controller's shell (PROTOCOL §6): the request's own checks
//! (revocation, size, the operator's command budget, the response bound), then one exhaustive
//! `match` over [`OperatorCommand`] that hands each command to its own method (mini-redis's
//! `Command::apply`), within the operator's tenant and the batch's transaction. Every method
//! returns an [`Answer`] that says how the command is audited. The phone, whitelist and CSV
//! commands are in `phone_commands.rs`.

use serde_json::{json, Value};
use time::OffsetDateTime;

use super::durable::{Batch, Recorded};
use super::effects::Output;
use super::live::Live;
use super::{rfc3339, Controller, Requester};
use crate::audit::{AuditRecord, Outcome};
use crate::firmware::FirmwareImage;
use crate::identity::{Identity, OperatorId};
use crate::request::{parse_request, EntryCommand, RequestEntry, Responses};
use crate::station::{self, Standing, Station, StationState, Transition};
use fleet_protocol::envelope::ResponseEntry;
use fleet_protocol::{
    names_a_read, After, CommandError, CommandName, ErrorCode, Fingerprint, FirmwareVersion,
    IpAddress, OperatorCommand, PageLimit, Serial, Text, DEFAULT_AUDIT_LIMIT,
};

/// What a command that ran answers, and how it is audited.
pub(super) enum Answer {
    /// It changed nothing: the dispatcher audits it (outcome ok) once it ran.
    Read(Value),
    /// A decision: its audit record is in the batch's transaction already, with the change
    /// itself (the [`Recorded`] receipt says so).
    Decided(Value, Recorded),
}

/// The context of one operator command: the batch it runs in, who asks, and when.
pub(super) struct Asking<'a, 'd> {
    pub(super) live: &'a mut Live,
    pub(super) cx: &'a mut Batch<'d>,
    pub(super) operator: &'a OperatorId,
    pub(super) at: OffsetDateTime,
}

impl Asking<'_, '_> {
    /// The tenant the command runs in: the operator's own.
    pub(super) fn tenant(&self) -> &str {
        &self.operator.tenant
    }

    /// The audit record of a command that did what it was asked.
    pub(super) fn done(
        &self,
        command: CommandName,
        device: Option<String>,
        reason: Option<String>,
    ) -> AuditRecord {
        AuditRecord::new(
            self.at,
            self.tenant(),
            self.operator.name.as_str(),
            device,
            command.as_str(),
            Outcome::Ok,
            reason,
        )
    }
}

impl Controller {
    /// Handles one operator request of `from`: every entry in order, each answered in its
    /// place; the response goes to `from` once the batch is committed.
    pub(super) fn on_operator_request(
        &self,
        live: &mut Live,
        cx: &mut Batch<'_>,
        from: &Requester,
        payload: &[u8],
    ) {
        let entries = match self.usable_request(from, payload) {
            Ok(entries) => entries,
            Err(e) => {
                let whole = ResponseEntry::to_request(e);
                return cx.out.push(Output::Respond {
                    to: from.clone(),
                    commands: vec![(Value::Null, Value::Null)],
                    responses: vec![whole.to_json()],
                });
            }
        };
        // One operator's share of the controller: commands past its budget are not run.
        let at = self.now();
        let wanted = u32::try_from(entries.len()).unwrap_or(u32::MAX);
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
        let mut responses =
            Responses::new(self.settings.requests.max_response_bytes, entries.len());
        for entry in entries {
            if granted == 0 {
                refused += 1;
                self.count_command(entry.name(), Some(ErrorCode::RateLimited));
                responses.refuse(entry.echo, entry.correlation, limited.clone());
                continue;
            }
            granted -= 1;
            if responses.is_full() && entry.name().is_some_and(names_a_read) {
                responses.refuse_full(entry.echo, entry.correlation);
                continue;
            }
            let mut asking = Asking {
                live: &mut *live,
                cx: &mut *cx,
                operator: &from.operator,
                at: self.now(),
            };
            self.run_entry(&mut asking, entry, &mut responses);
        }
        if refused > 0 {
            self.audit_rate_limited(cx, &from.operator, refused, at);
        }
        let (commands, responses) = responses.finish();
        cx.out.push(Output::Respond {
            to: from.clone(),
            commands,
            responses,
        });
    }

    /// The answer to a request that no transaction could be begun for (the store is
    /// unavailable), for `abandon` to refuse each of its commands with that error: none ran.
    /// A request that is not usable gets its own refusal, as always.
    pub(super) fn unbegun_request(&self, from: &Requester, payload: &[u8]) -> Output {
        let commands = match self.usable_request(from, payload) {
            Ok(entries) => entries
                .into_iter()
                .map(|entry| (entry.echo, entry.correlation))
                .collect(),
            Err(refused) => {
                return Output::Respond {
                    to: from.clone(),
                    commands: vec![(Value::Null, Value::Null)],
                    responses: vec![ResponseEntry::to_request(refused).to_json()],
                }
            }
        };
        Output::Respond {
            to: from.clone(),
            commands,
            responses: Vec::new(),
        }
    }

    /// The entries of a request that may run at all; `Err` answers the request as a whole.
    fn usable_request(
        &self,
        from: &Requester,
        payload: &[u8],
    ) -> Result<Vec<RequestEntry>, CommandError> {
        // A request queued before its operator was revoked does not run after it. (Its session
        // was admitted with the registered certificate; what can change since is a revocation,
        // which `revokeOperator` records here too: no file read per request.)
        let revoked = self
            .revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&from.operator);
        if revoked {
            return Err(CommandError::forbidden(format!(
                "operator {} is revoked: its requests are not run",
                from.operator
            )));
        }
        if payload.len() > self.settings.max_payload_bytes {
            return Err(CommandError::invalid_argument(format!(
                "request over {} bytes",
                self.settings.max_payload_bytes
            )));
        }
        parse_request(payload, self.settings.requests.max_commands)
    }

    /// Runs one entry and audits what its command does not audit itself: a read (outcome ok)
    /// or a refusal. An entry without a command name asked for nothing and is not audited.
    fn run_entry(&self, cx: &mut Asking<'_, '_>, entry: RequestEntry, responses: &mut Responses) {
        let (name, device, parsed) = match entry.command {
            EntryCommand::Unnamed(e) => {
                return responses.answer(entry.echo, entry.correlation, Err(e), false)
            }
            EntryCommand::Named {
                name,
                named_serial,
                parsed,
            } => (name, named_serial, parsed),
        };
        let answer = self.answer(cx, &name, parsed);
        self.count_command(Some(&name), answer.as_ref().err().map(|e| e.code));
        let (outcome, reason, data) = match answer {
            Ok(Answer::Decided(data, _recorded)) => {
                return responses.answer(entry.echo, entry.correlation, Ok(data), true)
            }
            Ok(Answer::Read(data)) => (Outcome::Ok, None, Ok(data)),
            Err(e) if e.code == ErrorCode::Internal => {
                (Outcome::Error, Some(e.message.clone()), Err(e))
            }
            Err(e) => (
                Outcome::Refused,
                Some(format!("{}: {}", e.code.as_str(), e.message)),
                Err(e),
            ),
        };
        let record = AuditRecord::new(
            cx.at,
            cx.tenant(),
            cx.operator.name.as_str(),
            device,
            name,
            outcome,
            reason,
        );
        // A failure here fails the whole batch (its commit reports it).
        let _ = cx.cx.record(Vec::new(), record);
        responses.answer(entry.echo, entry.correlation, data, false);
    }

    /// The answer to a named entry: the rights its command needs are checked before its
    /// arguments (a fleet-wide command is `forbidden` to other tenants whatever it names).
    fn answer(
        &self,
        cx: &mut Asking<'_, '_>,
        name: &str,
        parsed: Result<OperatorCommand, CommandError>,
    ) -> Result<Answer, CommandError> {
        let fleet_wide = CommandName::parse(name).is_some_and(CommandName::is_fleet_wide);
        if fleet_wide && cx.tenant() != station::DEFAULT_TENANT {
            return Err(CommandError::forbidden(
                "address blocks are fleet-wide: only operators of tenant default see and lift them",
            ));
        }
        self.apply(cx, parsed?)
    }

    /// Counts a command in the metrics (`fleetd_operator_commands_total`) by its name (one of
    /// PROTOCOL §6, else `unknown`: the label's values are bounded) and outcome (`ok` or the
    /// error code). Every command that ran or was refused passes here or through `run_entry`,
    /// which calls it: the one place where each command's outcome is known.
    fn count_command(&self, name: Option<&str>, error: Option<ErrorCode>) {
        let command = name
            .and_then(CommandName::parse)
            .map_or("unknown", CommandName::as_str);
        let outcome = error.map_or("ok", |code| code.as_str());
        self.settings.metrics.operator_command(command, outcome);
    }

    /// Rate-limited commands are audited once a minute per operator, with how many there were
    /// since: a flooding operator cannot fill the audit log.
    fn audit_rate_limited(
        &self,
        cx: &mut Batch<'_>,
        operator: &OperatorId,
        refused: u32,
        at: OffsetDateTime,
    ) {
        let due = {
            let mut audits = self.rate_audits.lock().unwrap_or_else(|e| e.into_inner());
            let entry = audits
                .entry(operator.clone())
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
            let record = AuditRecord::new(
                at,
                &operator.tenant,
                operator.name.as_str(),
                None,
                "request",
                Outcome::Refused,
                Some(format!(
                    "rate_limited: {count} commands not run since the last such record"
                )),
            );
            let _ = cx.record(Vec::new(), record);
        }
    }

    /// Hands each command to its own method.
    fn apply(
        &self,
        cx: &mut Asking<'_, '_>,
        command: OperatorCommand,
    ) -> Result<Answer, CommandError> {
        use OperatorCommand as C;
        match command {
            C::ListStations {
                state,
                limit,
                after,
            } => self.list_stations(cx, state, limit, after),
            C::GetStation { serial } => self.get_station(cx, &serial),
            C::AcceptStation {
                serial,
                fingerprint,
            } => self.accept_station(cx, &serial, fingerprint),
            C::RejectStation { serial } => self.reject_station(cx, &serial),
            C::ListRejectedStations { limit, after } => {
                self.list_rejected_stations(cx, limit, after)
            }
            C::ClearRejectedStation { serial } => self.clear_rejected_station(cx, &serial),
            C::StartStationUpdate { serial, version } => {
                self.start_station_update(cx, &serial, version.as_ref())
            }
            C::ResetStation {
                serial,
                delete_authentication,
                delete_configuration,
            } => self.reset_station(cx, &serial, delete_authentication, delete_configuration),
            C::RemoveStation { serial } => self.remove_station(cx, &serial),
            C::CreatePhone {
                mac,
                vendor,
                kind,
                site,
            } => self.create_phone(cx, mac, vendor, kind, site),
            C::ListPhones { limit, after } => self.list_phones(cx, limit, after),
            C::GetPhone { mac } => self.get_phone(cx, &mac),
            C::SuspendPhoneAuthentication { mac } => self.suspend_phone_authentication(cx, &mac),
            C::ResetPhoneAuthentication { mac } => self.reset_phone_authentication(cx, &mac),
            C::DeletePhone { mac } => self.delete_phone(cx, &mac),
            C::AddWhitelistEntry { entry, force } => self.add_whitelist_entry(cx, entry, force),
            C::RemoveWhitelistEntry { entry } => self.remove_whitelist_entry(cx, entry),
            C::ListWhitelist => self.list_whitelist(cx),
            C::ListFirmware => Ok(Answer::Read(self.list_firmware())),
            C::ExportDevicesCsv => self.export_devices_csv(cx),
            C::ImportPhonesCsv { csv } => self.import_phones_csv(cx, &csv),
            C::ListAuditLog { limit, after_seq } => self.list_audit_log(cx, limit, after_seq),
            C::ListOperators => self.list_operators(cx),
            C::RevokeOperator { name } => self.revoke_operator(cx, &name),
            C::ListAddressBlocks => self.list_address_blocks(cx),
            C::LiftAddressBlock { address } => self.lift_address_block(cx, address),
            C::Explain { subject } => self.explain(cx, &subject),
        }
    }

    // ---------------------------------------------------------------- stations

    fn list_stations(
        &self,
        cx: &mut Asking<'_, '_>,
        state: Option<StationState>,
        limit: Option<PageLimit>,
        after: Option<After>,
    ) -> Result<Answer, CommandError> {
        let live = &*cx.live;
        let keep = |s: &Station| {
            s.tenant == cx.operator.tenant
                && state.is_none_or(|f| s.state(self.online(live, &s.serial)) == f)
        };
        let page = self.stations_page(live, cx.cx, limit, after.as_ref(), &keep)?;
        Ok(Answer::Read(page))
    }

    fn list_rejected_stations(
        &self,
        cx: &mut Asking<'_, '_>,
        limit: Option<PageLimit>,
        after: Option<After>,
    ) -> Result<Answer, CommandError> {
        let keep = |s: &Station| s.tenant == cx.operator.tenant && s.standing == Standing::Rejected;
        let page = self.stations_page(cx.live, cx.cx, limit, after.as_ref(), &keep)?;
        Ok(Answer::Read(page))
    }

    fn get_station(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
    ) -> Result<Answer, CommandError> {
        let s = self.find_station(cx.cx, cx.tenant(), serial)?;
        Ok(Answer::Read(self.view(cx.live, &s)))
    }

    fn accept_station(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
        fingerprint: Fingerprint,
    ) -> Result<Answer, CommandError> {
        let at = cx.at;
        self.decide_station(cx, CommandName::AcceptStation, serial, |s| {
            let reason = format!("fingerprint {fingerprint}");
            Ok((station::accept(s, fingerprint, at)?, Some(reason)))
        })
    }

    fn reject_station(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
    ) -> Result<Answer, CommandError> {
        let at = cx.at;
        self.decide_station(cx, CommandName::RejectStation, serial, |s| {
            Ok((station::reject(s, at)?, None))
        })
    }

    fn clear_rejected_station(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
    ) -> Result<Answer, CommandError> {
        let at = cx.at;
        self.decide_station(cx, CommandName::ClearRejectedStation, serial, |s| {
            Ok((station::clear_rejected(s, at)?, None))
        })
    }

    fn start_station_update(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
        version: Option<&FirmwareVersion>,
    ) -> Result<Answer, CommandError> {
        let at = cx.at;
        self.decide_station(cx, CommandName::StartStationUpdate, serial, |s| {
            let image = self.update_image(version)?;
            let reason = format!("to {}", image.version);
            Ok((station::start_update(s, &image, at)?, Some(reason)))
        })
    }

    fn reset_station(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
        delete_authentication: bool,
        delete_configuration: bool,
    ) -> Result<Answer, CommandError> {
        let at = cx.at;
        self.decide_station(cx, CommandName::ResetStation, serial, |s| {
            let reason = format!("delete_authentication={delete_authentication} delete_configuration={delete_configuration}");
            let t = station::reset(s, delete_authentication, delete_configuration, at)?;
            Ok((t, Some(reason)))
        })
    }

    fn remove_station(
        &self,
        cx: &mut Asking<'_, '_>,
        serial: &Serial,
    ) -> Result<Answer, CommandError> {
        let at = cx.at;
        self.decide_station(cx, CommandName::RemoveStation, serial, |s| {
            Ok((station::remove(s, at)?, None))
        })
    }

    /// An operator decision on one station: find it (in this tenant), run `step`'s transition,
    /// record it with its audit record (`step`'s reason), queue its effects. The answer is the
    /// station as it is now, or `{}` when the record is gone.
    fn decide_station(
        &self,
        cx: &mut Asking<'_, '_>,
        command: CommandName,
        serial: &Serial,
        step: impl FnOnce(Station) -> Result<(Transition, Option<String>), CommandError>,
    ) -> Result<Answer, CommandError> {
        let s = self.find_station(cx.cx, cx.tenant(), serial)?;
        let (transition, reason) = step(s)?;
        let record = cx.done(command, Some(serial.to_string()), reason);
        let (after, recorded) =
            self.apply_transition(cx.live, cx.cx, serial, transition, record)?;
        let data = after.map_or_else(|| json!({}), |s| self.view(cx.live, &s));
        Ok(Answer::Decided(data, recorded))
    }

    /// A page of the stations `keep` accepts, as the batch sees them: `{"stations": […]}`,
    /// with `"next"` (the `after` of the next page) when more follow.
    fn stations_page(
        &self,
        live: &Live,
        cx: &Batch<'_>,
        limit: Option<PageLimit>,
        after: Option<&After>,
        keep: &dyn Fn(&Station) -> bool,
    ) -> Result<Value, CommandError> {
        let page_size = self.settings.requests.page_size;
        let limit = limit.map_or(page_size, PageLimit::get).min(page_size);
        let (page, more) = cx
            .txn()
            .stations_page(after.map(After::as_str), limit, keep)
            .map_err(|e| CommandError::internal(e.to_string()))?;
        let mut data = json!({
            "stations": page.iter().map(|s| self.view(live, s)).collect::<Vec<_>>(),
        });
        if let (true, Some(last)) = (more, page.last()) {
            data["next"] = json!(last.serial.as_str());
        }
        Ok(data)
    }

    /// The station `serial` (in this tenant), as the batch sees it.
    fn find_station(
        &self,
        cx: &Batch<'_>,
        tenant: &str,
        serial: &Serial,
    ) -> Result<Station, CommandError> {
        match cx
            .txn()
            .station(serial)
            .map_err(|e| CommandError::internal(e.to_string()))?
        {
            // Another tenant's station does not exist for this operator.
            Some(s) if s.tenant == tenant => Ok(s),
            _ => Err(CommandError::not_found(format!("no station {serial}"))),
        }
    }

    /// `listFirmware`: the catalog, latest first (the image a `startStationUpdate` without
    /// `version` installs comes first), with whether each may be installed.
    fn list_firmware(&self) -> Value {
        let min = &self.settings.policy.min_firmware;
        let images: Vec<Value> = self
            .settings
            .catalog
            .images
            .iter()
            .rev()
            .map(|image| {
                json!({
                    "version": image.version.to_string(),
                    "size": image.size,
                    "sha256": image.sha256,
                    "installable": image.version >= *min,
                })
            })
            .collect();
        json!({ "images": images })
    }

    /// The image a `startStationUpdate` asks for: `version`, or the latest of the catalog.
    fn update_image(
        &self,
        version: Option<&FirmwareVersion>,
    ) -> Result<FirmwareImage, CommandError> {
        let catalog = &self.settings.catalog;
        let image = match version {
            None => catalog
                .latest()
                .cloned()
                .ok_or_else(|| CommandError::not_found("the firmware catalog is empty"))?,
            Some(v) => catalog.find(v.version()).cloned().ok_or_else(|| {
                CommandError::not_found(format!("firmware {} is not in the catalog", v.as_str()))
            })?,
        };
        if image.version < self.settings.policy.min_firmware {
            return Err(CommandError::invalid_argument(format!(
                "firmware {} is below {}",
                image.version, self.settings.policy.min_firmware
            )));
        }
        Ok(image)
    }

    // ---------------------------------------------------------------- the fleet

    fn list_audit_log(
        &self,
        cx: &mut Asking<'_, '_>,
        limit: Option<PageLimit>,
        after_seq: Option<u64>,
    ) -> Result<Answer, CommandError> {
        let limit = limit
            .map_or(DEFAULT_AUDIT_LIMIT, PageLimit::get)
            .min(self.settings.requests.page_size);
        let txn = cx.cx.txn();
        let records = match after_seq {
            // Paging through the whole chain (`fleetctl audit verify`): oldest first.
            Some(after_seq) => txn.audit_page(cx.tenant(), after_seq, limit),
            None => txn.audit(cx.tenant(), limit),
        }
        .map_err(|e| CommandError::internal(e.to_string()))?;
        Ok(Answer::Read(json!({"records": records})))
    }

    fn list_operators(&self, cx: &mut Asking<'_, '_>) -> Result<Answer, CommandError> {
        let records = self
            .operators
            .list(cx.tenant())
            .map_err(|e| CommandError::internal(e.to_string()))?;
        let online: Vec<&OperatorId> = cx
            .live
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
        Ok(Answer::Read(json!({"operators": operators})))
    }

    fn revoke_operator(
        &self,
        cx: &mut Asking<'_, '_>,
        name: &Text,
    ) -> Result<Answer, CommandError> {
        let name = name.as_str();
        if name == cx.operator.name {
            return Err(CommandError::invalid_argument(
                "an operator cannot revoke itself; ask another operator of the tenant",
            ));
        }
        let tenant = cx.operator.tenant.clone();
        // Durable (fsynced) before anyone hears of it, and before the cut.
        let record = self
            .operators
            .revoke(&tenant, name, &cx.operator.to_string(), cx.at)
            .map_err(|e| match e {
                fleet_certs::CertError::InvalidName { .. } => {
                    CommandError::invalid_argument(e.to_string())
                }
                e => CommandError::internal(e.to_string()),
            })?
            .ok_or_else(|| CommandError::not_found(format!("no operator {name}")))?;
        let audit = cx.done(
            CommandName::RevokeOperator,
            Some(format!("operator {name}")),
            Some(format!("certificate {} revoked", record.serial)),
        );
        let recorded = cx.cx.record(Vec::new(), audit)?;
        let revoked = OperatorId {
            tenant,
            name: name.to_owned(),
        };
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(revoked.clone());
        // Nothing more of its sessions reaches the inbox...
        self.operator_sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, r| r.operator != revoked);
        // ...and its live sessions end at once (after the commit, or even if it fails: the
        // registry already says revoked): their certificate is void.
        for (client_id, session) in &cx.live.sessions {
            if matches!(&session.identity, Identity::Operator { id, .. } if *id == revoked) {
                cx.cx.out.cut(client_id.clone(), None);
            }
        }
        Ok(Answer::Decided(operator_view(&record, false), recorded))
    }

    fn list_address_blocks(&self, cx: &mut Asking<'_, '_>) -> Result<Answer, CommandError> {
        let failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let blocks: Vec<Value> = failures
            .blocks(cx.at)
            .into_iter()
            .map(|b| {
                json!({
                    "address": b.ip.to_string(),
                    "until": rfc3339(b.until),
                    "failures": failures.failures(b.ip, cx.at),
                })
            })
            .collect();
        Ok(Answer::Read(json!({"blocks": blocks})))
    }

    fn lift_address_block(
        &self,
        cx: &mut Asking<'_, '_>,
        address: IpAddress,
    ) -> Result<Answer, CommandError> {
        let ip = address.get();
        let blocked = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocks(cx.at)
            .iter()
            .any(|b| b.ip == ip);
        if !blocked {
            return Err(CommandError::not_found(format!("{ip} is not blocked")));
        }
        // Lifted once its audit record is committed.
        cx.cx.out.push(Output::LiftBlock(ip));
        let audit = cx.done(CommandName::LiftAddressBlock, Some(ip.to_string()), None);
        let recorded = cx.cx.record(Vec::new(), audit)?;
        Ok(Answer::Decided(json!({}), recorded))
    }
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
