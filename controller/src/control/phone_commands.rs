//! The phone, whitelist and CSV operator commands (PROTOCOL §6), each limited to the operator's
//! tenant; state events go to `fleet/events/<tenant>/phones`, without the PAP.

use serde_json::{json, Value};

use super::commands::{Answer, Asking};
use super::durable::Batch;
use super::phones::{internal, without_pap};
use super::Controller;
use crate::devices_csv;
use crate::phone::{self, Pap, Phone};
use crate::store::Change;
use crate::whitelist::{self, WhitelistEntry};
use fleet_protocol::{After, CommandError, CommandName, EventKind, Mac, PageLimit, Text};

impl Controller {
    fn new_pap(&self) -> Result<Pap, CommandError> {
        Pap::generate(&self.rng).map_err(|_| CommandError::internal("no randomness for a PAP"))
    }

    /// The phone `mac` (in this tenant), as the batch sees it.
    fn find_phone(&self, cx: &Batch<'_>, tenant: &str, mac: &Mac) -> Result<Phone, CommandError> {
        match cx.txn().phone(mac).map_err(internal)? {
            // Another tenant's phone does not exist for this operator.
            Some(p) if p.tenant == tenant => Ok(p),
            _ => Err(CommandError::not_found(format!("no phone {mac}"))),
        }
    }

    /// Announces a phone's new state on the tenant's events, without its PAP.
    fn phone_event(&self, cx: &mut Asking<'_, '_>, view: &Value) {
        let body = json!({"event": "state", "phone": without_pap(view)});
        cx.cx
            .out
            .event(&cx.operator.tenant, EventKind::Phones, body, self.now());
    }

    pub(super) fn create_phone(
        &self,
        cx: &mut Asking<'_, '_>,
        mac: Mac,
        vendor: Text,
        kind: Text,
        site: Text,
    ) -> Result<Answer, CommandError> {
        if cx.cx.txn().phone(&mac).map_err(internal)?.is_some() {
            return Err(CommandError::invalid_argument(format!(
                "a phone with MAC {mac} exists already"
            )));
        }
        let phone = Phone::new(
            mac.clone(),
            cx.tenant().into(),
            vendor.into_string(),
            kind.into_string(),
            site.into_string(),
            self.new_pap()?,
            cx.at,
        );
        let view = phone.view(cx.at);
        let audit = cx.done(CommandName::CreatePhone, Some(mac.to_string()), None);
        let recorded = cx.cx.record(vec![Change::PutPhone(phone)], audit)?;
        self.phone_event(cx, &view);
        Ok(Answer::Decided(view, recorded))
    }

    pub(super) fn list_phones(
        &self,
        cx: &mut Asking<'_, '_>,
        limit: Option<PageLimit>,
        after: Option<After>,
    ) -> Result<Answer, CommandError> {
        let page_size = self.settings.requests.page_size;
        let limit = limit.map_or(page_size, PageLimit::get).min(page_size);
        let tenant = cx.tenant();
        let (page, more) = cx
            .cx
            .txn()
            .phones_page(after.as_ref().map(After::as_str), limit, &|p| {
                p.tenant == tenant
            })
            .map_err(internal)?;
        let mut data = json!({
            "phones": page.iter().map(|p| p.view(cx.at)).collect::<Vec<_>>(),
        });
        if let (true, Some(last)) = (more, page.last()) {
            data["next"] = json!(last.mac.as_str());
        }
        Ok(Answer::Read(data))
    }

    pub(super) fn get_phone(
        &self,
        cx: &mut Asking<'_, '_>,
        mac: &Mac,
    ) -> Result<Answer, CommandError> {
        let phone = self.find_phone(cx.cx, cx.tenant(), mac)?;
        Ok(Answer::Read(phone.view(cx.at)))
    }

    pub(super) fn suspend_phone_authentication(
        &self,
        cx: &mut Asking<'_, '_>,
        mac: &Mac,
    ) -> Result<Answer, CommandError> {
        let phone = self.find_phone(cx.cx, cx.tenant(), mac)?;
        let phone = phone::suspend(phone, &self.settings.phones, cx.at);
        let view = phone.view(cx.at);
        let audit = cx.done(
            CommandName::SuspendPhoneAuthentication,
            Some(mac.to_string()),
            None,
        );
        let recorded = cx.cx.record(vec![Change::PutPhone(phone)], audit)?;
        self.phone_event(cx, &view);
        Ok(Answer::Decided(view, recorded))
    }

    pub(super) fn reset_phone_authentication(
        &self,
        cx: &mut Asking<'_, '_>,
        mac: &Mac,
    ) -> Result<Answer, CommandError> {
        let phone = self.find_phone(cx.cx, cx.tenant(), mac)?;
        let phone = phone::reset_authentication(phone, self.new_pap()?, cx.at);
        let view = phone.view(cx.at);
        let audit = cx.done(
            CommandName::ResetPhoneAuthentication,
            Some(mac.to_string()),
            Some("PAP and certificate voided".to_owned()),
        );
        let recorded = cx.cx.record(vec![Change::PutPhone(phone)], audit)?;
        // The old PAP and certificate are invalid at once: the live session goes too, (after
        // the commit) before the operator hears of it.
        cx.cx.out.cut(mac.client_id(), None);
        self.phone_event(cx, &view);
        Ok(Answer::Decided(view, recorded))
    }

    pub(super) fn delete_phone(
        &self,
        cx: &mut Asking<'_, '_>,
        mac: &Mac,
    ) -> Result<Answer, CommandError> {
        self.find_phone(cx.cx, cx.tenant(), mac)?;
        let audit = cx.done(CommandName::DeletePhone, Some(mac.to_string()), None);
        let recorded = cx
            .cx
            .record(vec![Change::DeletePhone(mac.clone())], audit)?;
        cx.cx.out.cut(mac.client_id(), None);
        let body = json!({"event": "deleted", "mac": mac.as_str()});
        cx.cx
            .out
            .event(&cx.operator.tenant, EventKind::Phones, body, self.now());
        Ok(Answer::Decided(json!({}), recorded))
    }

    pub(super) fn add_whitelist_entry(
        &self,
        cx: &mut Asking<'_, '_>,
        entry: WhitelistEntry,
        force: bool,
    ) -> Result<Answer, CommandError> {
        let (v4, v6) = self.settings.whitelist_min_prefix;
        whitelist::check_breadth(&entry, v4, v6, force)
            .map_err(|e| CommandError::invalid_argument(format!("entry: {e}")))?;
        let mut whitelists = cx.live.whitelists.clone();
        whitelists.add_permanent(cx.tenant(), entry.clone());
        self.store_whitelists(cx, CommandName::AddWhitelistEntry, whitelists, &entry)
    }

    pub(super) fn remove_whitelist_entry(
        &self,
        cx: &mut Asking<'_, '_>,
        entry: WhitelistEntry,
    ) -> Result<Answer, CommandError> {
        let mut whitelists = cx.live.whitelists.clone();
        // A temporary entry can be removed too (Removed::Temporary).
        if !whitelists.remove(cx.tenant(), &entry).found() {
            return Err(CommandError::not_found(format!(
                "{entry} is not on the whitelist"
            )));
        }
        self.store_whitelists(cx, CommandName::RemoveWhitelistEntry, whitelists, &entry)
    }

    /// Records the tenants' whitelists as `command` changed them; the in-memory mirror follows
    /// (and is reloaded from the store if the batch is not committed).
    fn store_whitelists(
        &self,
        cx: &mut Asking<'_, '_>,
        command: CommandName,
        whitelists: whitelist::Whitelists,
        entry: &WhitelistEntry,
    ) -> Result<Answer, CommandError> {
        let audit = cx.done(command, None, Some(entry.to_string()));
        let recorded = cx
            .cx
            .record(vec![Change::PutWhitelists(whitelists.clone())], audit)?;
        cx.live.whitelists = whitelists;
        Ok(Answer::Decided(json!({}), recorded))
    }

    pub(super) fn list_whitelist(&self, cx: &mut Asking<'_, '_>) -> Result<Answer, CommandError> {
        Ok(Answer::Read(cx.live.whitelists.list(cx.tenant(), cx.at)))
    }

    pub(super) fn export_devices_csv(
        &self,
        cx: &mut Asking<'_, '_>,
    ) -> Result<Answer, CommandError> {
        let phones = cx.cx.txn().phones(Some(cx.tenant())).map_err(internal)?;
        let csv = devices_csv::export(&phones, cx.at).map_err(internal)?;
        Ok(Answer::Read(json!({"csv": csv})))
    }

    /// Every good row becomes a phone, all in one transaction: all or none.
    pub(super) fn import_phones_csv(
        &self,
        cx: &mut Asking<'_, '_>,
        text: &str,
    ) -> Result<Answer, CommandError> {
        let (rows, bad) = devices_csv::parse_import(text);
        let mut errors: Vec<Value> = bad
            .iter()
            .map(|e| json!({"line": e.line, "error": e.error}))
            .collect();
        let mut created = Vec::new();
        let mut changes = Vec::new();
        for row in rows {
            if cx.cx.txn().phone(&row.mac).map_err(internal)?.is_some() {
                errors.push(json!({"line": row.line, "error": format!("a phone with MAC {} exists already", row.mac)}));
                continue;
            }
            let phone = Phone::new(
                row.mac,
                cx.tenant().into(),
                row.vendor,
                row.kind,
                row.site,
                self.new_pap()?,
                cx.at,
            );
            created.push(phone.view(cx.at));
            changes.push(Change::PutPhone(phone));
        }
        let reason = format!("{} created, {} errors", created.len(), errors.len());
        let audit = cx.done(CommandName::ImportPhonesCsv, None, Some(reason));
        let recorded = cx.cx.record(changes, audit)?;
        Ok(Answer::Decided(
            json!({"created": created, "errors": errors}),
            recorded,
        ))
    }
}
