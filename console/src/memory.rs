//! An in-memory fleetd for the console's unit tests: stations, phones, whitelist and audit log
//! as JSON objects shaped like fleetd's (docs/protocol.md §5), with the state rules the pages
//! rely on (accept only Unauthorized with the right fingerprint, clear only Rejected, …). It
//! records every command it was sent, so that a test can check what a click sent.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use fleet_protocol::{OperatorCommand, PhoneState, StationState};
use serde_json::{json, Value};

use crate::fleetd::{ChainVerdict, Fleetd, FleetdError, Listing, Reply};

#[derive(Default)]
struct Memory {
    stations: BTreeMap<String, Value>,
    phones: BTreeMap<String, Value>,
    permanent: BTreeSet<String>,
    temporary: Vec<Value>,
    audit: Vec<Value>,
    sent: Vec<Value>,
    unreachable: bool,
    paps: u32,
    /// What `explain` answers, by subject, as the test set it ([`MemoryFleetd::explain_as`]):
    /// the explanation is fleetd's to compute; the console only shows it.
    explanations: BTreeMap<String, Value>,
}

/// The in-memory fleetd.
pub struct MemoryFleetd {
    operator: String,
    memory: Mutex<Memory>,
}

fn refused(code: &str, error: impl Into<String>) -> FleetdError {
    FleetdError::Refused {
        code: code.into(),
        error: error.into(),
    }
}

/// A station object in `state`, as an auth request from a station with these fields makes it.
pub fn station(serial: &str, model: &str, state: StationState, fingerprint: Option<&str>) -> Value {
    json!({
        "serial": serial, "model": model, "firmware": "6.1.0",
        "mac_streaming": "0242ac110002", "mac_control": "0242ac110003",
        "fingerprint": fingerprint, "state": state.as_str(), "label": state.label(),
        "online": true, "last_seen": "2026-01-05T10:00:00Z", "ip": "127.0.0.1",
    })
}

fn set_state(station: &mut Value, state: StationState) {
    station["state"] = json!(state.as_str());
    station["label"] = json!(state.label());
}

impl MemoryFleetd {
    /// An empty fleet, operated by `operator`.
    pub fn new(operator: &str) -> MemoryFleetd {
        MemoryFleetd {
            operator: operator.to_owned(),
            memory: Mutex::new(Memory::default()),
        }
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        // Tests only: a panic in one does not make the maps inconsistent for another.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds (or replaces) a station object.
    pub fn add_station(&self, station: Value) {
        let serial = station["serial"].as_str().unwrap_or_default().to_owned();
        self.memory().stations.insert(serial, station);
    }

    /// The station object of `serial`.
    pub fn station(&self, serial: &str) -> Option<Value> {
        self.memory().stations.get(serial).cloned()
    }

    /// The phone object of `mac`.
    pub fn phone(&self, mac: &str) -> Option<Value> {
        self.memory().phones.get(mac).cloned()
    }

    /// Sets a phone's wrong PAPs in a row and its lockouts, as PAP attempts would.
    pub fn set_pap_counts(&self, mac: &str, failures: u32, lockouts: u32) {
        if let Some(phone) = self.memory().phones.get_mut(mac) {
            phone["failures"] = json!(failures);
            phone["lockouts"] = json!(lockouts);
        }
    }

    /// Adds a temporary whitelist entry.
    pub fn add_temporary(&self, ip: &str, expires_at: &str) {
        self.memory()
            .temporary
            .push(json!({"ip": ip, "expires_at": expires_at}));
    }

    /// From now on every call fails as if fleetd were down (`false`), or works again.
    pub fn set_reachable(&self, reachable: bool) {
        self.memory().unreachable = !reachable;
    }

    /// From now on, `explain` of `subject` answers `data` (else `not_found`).
    pub fn explain_as(&self, subject: &str, data: Value) {
        self.memory().explanations.insert(subject.to_owned(), data);
    }

    /// Adds an audit record of `action` on `device` by `actor`, as fleetd records every command
    /// (reads included) that the in-memory fleetd does not record itself.
    pub fn record(&self, actor: &str, device: &str, action: &str) {
        MemoryFleetd::audit(&mut self.memory(), actor, device, action);
    }

    /// Every command sent so far, in its wire form.
    pub fn sent(&self) -> Vec<Value> {
        self.memory().sent.clone()
    }

    fn audit(memory: &mut Memory, actor: &str, device: &str, action: &str) {
        let seq = memory.audit.len() as u64 + 1;
        memory.audit.push(json!({
            "seq": seq, "time": "2026-01-05T10:00:00Z", "tenant": "default", "actor": actor,
            "device": device, "action": action, "outcome": "ok", "reason": null,
        }));
    }

    fn handle(&self, command: &OperatorCommand) -> Result<Value, FleetdError> {
        let mut memory = self.memory();
        if memory.unreachable {
            return Err(FleetdError::Unreachable("connection refused".into()));
        }
        memory.sent.push(command.to_json());
        let action = command.name().as_str();
        let result = match command {
            OperatorCommand::ListStations { state, .. } => {
                let stations: Vec<Value> = memory
                    .stations
                    .values()
                    .filter(|s| state.is_none_or(|st| s["state"] == st.as_str()))
                    .cloned()
                    .collect();
                Ok(json!({ "stations": stations }))
            }
            OperatorCommand::ListRejectedStations { .. } => {
                let rejected = StationState::Rejected.as_str();
                let stations: Vec<Value> = memory
                    .stations
                    .values()
                    .filter(|s| s["state"] == rejected)
                    .cloned()
                    .collect();
                Ok(json!({ "stations": stations }))
            }
            OperatorCommand::ListPhones { .. } => {
                let phones: Vec<Value> = memory.phones.values().cloned().collect();
                Ok(json!({ "phones": phones }))
            }
            OperatorCommand::ListWhitelist => Ok(json!({
                "permanent": memory.permanent.iter().collect::<Vec<_>>(),
                "temporary": memory.temporary,
            })),
            OperatorCommand::ListAuditLog { .. } => Ok(json!({ "records": memory.audit })),
            OperatorCommand::Explain { .. } => {
                let name = command.arguments()["subject"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                memory
                    .explanations
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| refused("not_found", format!("no station or phone {name}")))
            }
            OperatorCommand::ListFirmware => Ok(json!({ "images": [
                {"version": "6.1.0", "size": 70000, "sha256": "ab".repeat(32), "installable": true},
                {"version": "6.0.7", "size": 60000, "sha256": "cd".repeat(32), "installable": false},
            ]})),
            other => {
                let result = change(&mut memory, other);
                if result.is_ok() {
                    let device = device_of(other);
                    MemoryFleetd::audit(&mut memory, &self.operator, &device, action);
                }
                result
            }
        };
        result
    }
}

fn device_of(command: &OperatorCommand) -> String {
    let arguments = command.arguments();
    ["serial", "mac", "entry"]
        .iter()
        .find_map(|k| arguments.get(*k).and_then(Value::as_str))
        .unwrap_or_default()
        .to_owned()
}

fn station_mut<'a>(memory: &'a mut Memory, serial: &str) -> Result<&'a mut Value, FleetdError> {
    memory
        .stations
        .get_mut(serial)
        .ok_or_else(|| refused("not_found", format!("no station {serial}")))
}

fn phone_mut<'a>(memory: &'a mut Memory, mac: &str) -> Result<&'a mut Value, FleetdError> {
    memory
        .phones
        .get_mut(mac)
        .ok_or_else(|| refused("not_found", format!("no phone {mac}")))
}

fn in_state(station: &Value, allowed: &[StationState]) -> Result<(), FleetdError> {
    if allowed.iter().any(|s| station["state"] == s.as_str()) {
        Ok(())
    } else {
        Err(refused(
            "wrong_state",
            format!("the station is {}", station["label"]),
        ))
    }
}

fn new_pap(memory: &mut Memory) -> String {
    memory.paps += 1;
    format!("{:06}", 314_159 + memory.paps)
}

/// The commands that change something (and reads of one object).
fn change(memory: &mut Memory, command: &OperatorCommand) -> Result<Value, FleetdError> {
    use OperatorCommand as C;
    match command {
        C::GetStation { serial } => station_mut(memory, serial.as_str()).map(|s| s.clone()),
        C::AcceptStation {
            serial,
            fingerprint,
        } => {
            let station = station_mut(memory, serial.as_str())?;
            in_state(station, &[StationState::Unauthorized])?;
            if station["fingerprint"] != fingerprint.to_string() {
                return Err(refused("fingerprint_mismatch", "not the station's key"));
            }
            set_state(station, StationState::Running);
            Ok(station.clone())
        }
        C::RejectStation { serial } => {
            let station = station_mut(memory, serial.as_str())?;
            if station["state"] == StationState::Rejected.as_str() {
                return Err(refused("wrong_state", "the station is Rejected"));
            }
            set_state(station, StationState::Rejected);
            Ok(station.clone())
        }
        C::ClearRejectedStation { serial } => {
            in_state(
                station_mut(memory, serial.as_str())?,
                &[StationState::Rejected],
            )?;
            memory.stations.remove(serial.as_str());
            Ok(json!({}))
        }
        C::StartStationUpdate { serial, version } => {
            let station = station_mut(memory, serial.as_str())?;
            in_state(
                station,
                &[StationState::UpdateRequired, StationState::Updating],
            )?;
            set_state(station, StationState::Updating);
            station["update_version"] = json!(version.as_ref().map_or("6.1.0", |v| v.as_str()));
            Ok(station.clone())
        }
        C::ResetStation {
            serial,
            delete_authentication,
            ..
        } => {
            let station = station_mut(memory, serial.as_str())?;
            in_state(station, &[StationState::Running, StationState::NotRunning])?;
            if *delete_authentication {
                set_state(station, StationState::Unauthorized);
                station["fingerprint"] = Value::Null;
            }
            Ok(station.clone())
        }
        C::RemoveStation { serial } => {
            station_mut(memory, serial.as_str())?;
            memory.stations.remove(serial.as_str());
            Ok(json!({}))
        }
        other => change_phone_or_whitelist(memory, other),
    }
}

fn phone(mac: &str, vendor: &str, kind: &str, site: &str, pap: &str) -> Value {
    let state = PhoneState::ALL[0];
    json!({
        "mac": mac, "vendor": vendor, "type": kind, "site": site,
        "created_at": "2026-01-05T10:00:00Z", "auth_state": state.as_str(),
        "label": state.label(), "pap": pap, "suspended_until": null,
        "failures": 0, "lockouts": 0,
    })
}

fn change_phone_or_whitelist(
    memory: &mut Memory,
    command: &OperatorCommand,
) -> Result<Value, FleetdError> {
    use OperatorCommand as C;
    match command {
        C::CreatePhone {
            mac,
            vendor,
            kind,
            site,
        } => {
            if memory.phones.contains_key(mac.as_str()) {
                return Err(refused(
                    "invalid_argument",
                    format!("phone {mac} exists already"),
                ));
            }
            let pap = new_pap(memory);
            let created = phone(
                mac.as_str(),
                vendor.as_str(),
                kind.as_str(),
                site.as_str(),
                &pap,
            );
            memory.phones.insert(mac.to_string(), created.clone());
            Ok(created)
        }
        C::GetPhone { mac } => phone_mut(memory, mac.as_str()).map(|p| p.clone()),
        C::SuspendPhoneAuthentication { mac } => {
            let phone = phone_mut(memory, mac.as_str())?;
            phone["suspended_until"] = json!("2026-01-05T10:30:00Z");
            Ok(phone.clone())
        }
        C::ResetPhoneAuthentication { mac } => {
            let pap = new_pap(memory);
            let phone = phone_mut(memory, mac.as_str())?;
            let needed = PhoneState::ALL[0];
            phone["pap"] = json!(pap);
            phone["auth_state"] = json!(needed.as_str());
            phone["label"] = json!(needed.label());
            phone["failures"] = json!(0);
            phone["lockouts"] = json!(0);
            Ok(phone.clone())
        }
        C::DeletePhone { mac } => {
            phone_mut(memory, mac.as_str())?;
            memory.phones.remove(mac.as_str());
            Ok(json!({}))
        }
        C::AddWhitelistEntry { entry, .. } => {
            memory.permanent.insert(entry.to_string());
            Ok(json!({}))
        }
        C::RemoveWhitelistEntry { entry } => {
            if memory.permanent.remove(&entry.to_string()) {
                Ok(json!({}))
            } else {
                Err(refused(
                    "not_found",
                    format!("{entry} is not on the whitelist"),
                ))
            }
        }
        C::ExportDevicesCsv => {
            let columns = fleet_protocol::payload::DEVICES_CSV_COLUMNS;
            let mut csv = columns.join(",") + "\r\n";
            for p in memory.phones.values() {
                let cell = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
                let row = columns.map(cell).join(",");
                csv.push_str(&row);
                csv.push_str("\r\n");
            }
            Ok(json!({ "csv": csv }))
        }
        C::ImportPhonesCsv { csv } => Ok(import(memory, csv)),
        other => Err(refused(
            "invalid_argument",
            format!("the in-memory fleetd does not know {}", other.name()),
        )),
    }
}

/// A plain CSV import (no quoting): `vendor,type,mac[,site]` by header name.
fn import(memory: &mut Memory, csv: &str) -> Value {
    let mut lines = csv.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim().to_lowercase())
        .collect();
    let column = |name: &str| header.iter().position(|c| c == name);
    let (Some(vendor), Some(kind), Some(mac)) = (column("vendor"), column("type"), column("mac"))
    else {
        return json!({"created": [], "errors": [{"line": 1, "error": "missing column"}]});
    };
    let site = column("site");
    let mut created = Vec::new();
    let mut errors = Vec::new();
    for (at, line) in lines.enumerate() {
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        let cell = |i: usize| cells.get(i).copied().unwrap_or_default();
        match fleet_protocol::Mac::parse(cell(mac)) {
            Ok(m) if !memory.phones.contains_key(m.as_str()) => {
                let pap = new_pap(memory);
                let site = site.map(cell).unwrap_or_default();
                let new = phone(m.as_str(), cell(vendor), cell(kind), site, &pap);
                memory.phones.insert(m.to_string(), new.clone());
                created.push(new);
            }
            Ok(m) => {
                errors.push(json!({"line": at + 2, "error": format!("phone {m} exists already")}))
            }
            Err(e) => errors.push(json!({"line": at + 2, "error": e.to_string()})),
        }
    }
    json!({"created": created, "errors": errors})
}

impl Fleetd for MemoryFleetd {
    fn operator(&self) -> &str {
        &self.operator
    }

    fn run(&self, command: OperatorCommand) -> Reply<'_, Value> {
        let result = self.handle(&command);
        Box::pin(async move { result })
    }

    fn list_all(&self, listing: Listing) -> Reply<'_, Vec<Value>> {
        // The whole list at once: the in-memory fleetd does not page.
        let command = listing.page(None, None);
        let result = self
            .handle(&command)
            .map(|data| crate::views::items(&data, listing.field()));
        Box::pin(async move { result })
    }

    fn verify_audit(&self) -> Reply<'_, ChainVerdict> {
        let memory = self.memory();
        let result = if memory.unreachable {
            Err(FleetdError::Unreachable("connection refused".into()))
        } else {
            Ok(ChainVerdict {
                records: memory.audit.len() as u64,
                unchained: 0,
                broken: None,
            })
        };
        Box::pin(async move { result })
    }
}
