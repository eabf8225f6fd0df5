//! Stations in the controller's shell: the messages stations send (`auth/request`,
//! `firmware/request`; PROTOCOL §3), the transitions of the pure `station` state machine
//! written into the batch with their audit records, their effects queued for after the commit,
//! and the expiry of stations that waited unseen for too long.

use std::io::{Read, Seek, SeekFrom};
use std::net::IpAddr;

use serde_json::json;
use tracing::warn;

use super::durable::{Batch, Recorded};
use super::effects::{Outbox, Output};
use super::live::{Live, LiveSession, PendingIndex};
use super::{rfc3339, Controller};
use crate::audit::{AuditRecord, Outcome};
use crate::firmware::parse_version;
use crate::identity::Identity;
use crate::station::{self, AuthRequest, Effect, Standing, Station, Transition};
use crate::store::Change;
use fleet_protocol::payload::{FirmwareChunk, FirmwareRequest};
use fleet_protocol::{CommandError, EventKind, Serial, Topic};

impl Controller {
    pub(super) fn on_auth_request(
        &self,
        live: &mut Live,
        cx: &mut Batch<'_>,
        serial: Serial,
        payload: &[u8],
    ) {
        // Only the station's own session may publish here (the front door enforces it), so the
        // sender is the client id's live session, or its last one if it already closed.
        let Some((presented, ip)) = live.last_station_session.get(&serial.client_id()) else {
            return;
        };
        let presented = *presented;
        let ip = ip.to_string();
        let record = match cx.txn().station(&serial) {
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
                let body = json!({"event": "bad_request", "serial": serial.as_str(), "error": e.to_string()});
                return cx.out.event(&tenant, EventKind::Stations, body, self.now());
            }
        };
        if record.is_none() {
            if let Err(reason) = self.may_add_pending(live, &serial, &ip) {
                let audit = AuditRecord::new(
                    self.now(),
                    &tenant,
                    serial.client_id(),
                    Some(serial.to_string()),
                    "auth_request",
                    Outcome::Refused,
                    Some(reason.clone()),
                );
                let _ = cx.record(Vec::new(), audit);
                let body = json!({"event": "refused", "serial": serial.as_str(), "error": reason});
                return cx.out.event(&tenant, EventKind::Stations, body, self.now());
            }
        }
        let before = record.as_ref().map(|r| r.standing.clone());
        let stored = record.clone();
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
        if let Some(stored) = stored {
            if self.reaffirm(live, cx, &stored, &transition) {
                return;
            }
        }
        let reason = match &transition.station {
            Some(s) => format!(
                "{} -> {}",
                before.as_ref().map(|b| b.label()).unwrap_or("new"),
                s.standing.label()
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
        match self.apply_transition(live, cx, &serial, transition, audit) {
            // Counted at once, so that one batch cannot pass the limits either; the index is
            // rebuilt from the store if the batch's commit fails.
            Ok((record, _)) => live.pending.update(&serial, record.as_ref()),
            Err(e) => warn!("auth request of {serial} not applied: {e}"),
        }
    }

    /// An auth request that only reaffirms the stored record (`station::reaffirms`: an
    /// authorized station after a reboot, a station that asks again while it waits) decides
    /// nothing: nothing is written or audited (its CONNECT was audited), and it is answered
    /// as the record stands, with the operators' `state` event (the station is back online).
    /// An authorized station's `authorized` goes to its live session only if that session
    /// presents the pinned key; otherwise the request takes the full path, whose
    /// `authorize_holder` cuts the impostor and audits it. Returns whether it was handled.
    fn reaffirm(
        &self,
        live: &Live,
        cx: &mut Batch<'_>,
        stored: &Station,
        transition: &Transition,
    ) -> bool {
        // An event (an identity mismatch) is told only with an audit record: the full path.
        let raises_event = (transition.effects.iter()).any(|e| matches!(e, Effect::Event { .. }));
        let Some(after) = transition
            .station
            .as_ref()
            .filter(|after| !raises_event && station::reaffirms(stored, after))
        else {
            return false;
        };
        let serial = &stored.serial;
        let mut effects = transition.effects.clone();
        if effects.contains(&Effect::Send(station::Command::Authorized)) {
            let holder = live
                .sessions
                .get(&serial.client_id())
                .and_then(|s| match &s.identity {
                    Identity::Station { presented, .. } => Some((*presented, s.session_id)),
                    _ => None,
                });
            match holder {
                Some((presented, session_id)) if presented.key() == after.fingerprint => {
                    effects.retain(|e| *e != Effect::Send(station::Command::Authorized));
                    cx.out.push(authorized_to(serial, session_id));
                }
                // No live session: nobody to answer. Another key: the full path decides.
                None => effects.retain(|e| *e != Effect::Send(station::Command::Authorized)),
                Some(_) => return false,
            }
        }
        self.run_effects(live, &mut cx.out, serial, &effects, &stored.tenant);
        let body = json!({"event": "state", "station": self.view(live, stored)});
        cx.out
            .event(&stored.tenant, EventKind::Stations, body, self.now());
        true
    }

    /// Whether a new station record may be made for `serial`, requested from `ip`: within the
    /// pending-station limits, and no other station's serial differs from it only in case.
    pub(super) fn may_add_pending(
        &self,
        live: &Live,
        serial: &Serial,
        ip: &str,
    ) -> Result<(), String> {
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
        let mut guard = self.lock();
        let live = &guard.live;
        let now = self.now();
        let expiry = self.settings.pending.expiry;
        let mut changes = Vec::new();
        let mut expired = Vec::new();
        for serial in live.pending.waiting.keys() {
            if live.sessions.contains_key(&serial.client_id()) {
                continue;
            }
            let Ok(Some(record)) = self.store.station(serial) else {
                continue;
            };
            let seen = [record.last_seen, live.last_seen.get(serial).copied()]
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
                expired.push((serial.clone(), record.tenant));
            }
        }
        if expired.is_empty() {
            return 0;
        }
        let records = match guard.durable.commit(changes) {
            Ok(records) => records,
            Err(e) => {
                warn!("expired stations not deleted: {e}");
                return 0;
            }
        };
        let mut told = Outbox::default();
        for (serial, tenant) in &expired {
            guard.live.pending.update(serial, None);
            guard.live.forget_seen(serial);
            let body = json!({"event": "expired", "serial": serial.as_str()});
            told.event(tenant, EventKind::Stations, body, self.now());
        }
        self.carry_out(&records, told, &Default::default());
        expired.len()
    }

    /// Writes to the store when stations were last seen, so that `last_seen` never goes back
    /// after a restart (by more than one sweep after a crash; not at all after a clean stop,
    /// which calls this last). Every station with a session open now counts as seen now: the
    /// front door ends a session that is silent for 1.5 × its keepalive, so an open one has
    /// spoken (a message or a PINGREQ) within that. One transaction without audit records for
    /// all the sightings since the last call; the bus task calls it every minute, so the rate
    /// of these writes is bounded by the sweep, not by the stations' traffic. The lock is held
    /// only to collect them, not for the commit. Returns how many sightings were handed to the
    /// store (which skips those of stations without a record).
    pub fn record_sightings(&self) -> usize {
        let mut guard = self.lock();
        let now = self.now();
        let live = &mut guard.live;
        let online: Vec<Serial> = live
            .sessions
            .values()
            .filter_map(|session| match &session.identity {
                Identity::Station { serial, .. } => Some(serial.clone()),
                _ => None,
            })
            .collect();
        for serial in &online {
            live.saw(serial, now);
        }
        // From memory only: the writer skips a sighting of a station that has no record by
        // the time it commits (removed meanwhile), so nothing is read from the store here.
        let mut serials = Vec::new();
        let mut changes = Vec::new();
        for serial in std::mem::take(&mut live.seen_unwritten) {
            if let Some(at) = live.last_seen.get(&serial) {
                changes.push(Change::Seen(serial.clone(), at.unix_timestamp()));
                serials.push(serial);
            }
        }
        drop(guard);
        if changes.is_empty() {
            return 0;
        }
        let written = changes.len();
        match self.store.commit_unlocked(changes) {
            Ok(()) => written,
            Err(e) => {
                warn!("sightings not written: {e}");
                self.lock().live.seen_unwritten.extend(serials);
                0
            }
        }
    }

    /// `stations/<serial>/firmware/request`: a chunk of the image of the update in progress,
    /// or an error, on `…/firmware/chunk`.
    pub(super) fn on_firmware_request(&self, cx: &mut Batch<'_>, serial: Serial, payload: &[u8]) {
        let topic = Topic::StationFirmwareChunk(serial.clone());
        let request = match FirmwareRequest::read(payload, self.settings.chunk_size as u64) {
            Ok(request) => request,
            Err(e) => return cx.out.publish(&topic, &e.reply()),
        };
        match self.firmware_chunk(cx, &serial, &request) {
            // Read from the file after the batch, off the controller's lock.
            Ok((read, tenant)) => {
                if let Some(body) = progress(&serial, &read) {
                    cx.out.event(&tenant, EventKind::Stations, body, self.now());
                }
                cx.out.push(Output::FirmwareChunk { serial, read });
            }
            Err((code, error)) => {
                let answer = FirmwareChunk::Error {
                    version: request.version,
                    error,
                    code: code.to_owned(),
                };
                cx.out.publish(&topic, &answer.to_json());
            }
        }
    }

    /// Which part of which image a firmware request asks for, or its error code and text.
    fn firmware_chunk(
        &self,
        cx: &Batch<'_>,
        serial: &Serial,
        request: &FirmwareRequest,
    ) -> Result<(ChunkRead, String), (&'static str, String)> {
        let invalid = |error: String| ("invalid_argument", error);
        let (offset, length) = (
            request.offset,
            request.length.min(self.settings.chunk_size as u64),
        );
        let record = match cx.txn().station(serial) {
            Ok(Some(r)) => r,
            _ => return Err(("not_found", "no such station".into())),
        };
        let Standing::Updating { version, .. } = &record.standing else {
            let label = record.standing.label();
            return Err(("wrong_state", format!("station is {label}, not updating")));
        };
        if *version != request.version {
            return Err(invalid(format!("the update in progress is {version}")));
        }
        let image = parse_version(version).and_then(|v| self.settings.catalog.find(&v).cloned());
        let Some(image) = image else {
            let error = format!("firmware {version} is not in the catalog");
            return Err(("not_found", error));
        };
        if offset > image.size {
            let size = image.size;
            return Err(invalid(format!(
                "offset {offset} beyond the image size {size}"
            )));
        }
        let read = ChunkRead {
            version: request.version.clone(),
            path: image.path,
            offset,
            length: length.min(image.size - offset),
            total: image.size,
        };
        Ok((read, record.tenant))
    }

    /// Writes a station's transition into the batch with its audit record (in `audit`'s
    /// tenant) and queues its effects and its `state` event for after the commit. Returns the
    /// record as it now stands (`None`: deleted).
    pub(super) fn apply_transition(
        &self,
        live: &Live,
        cx: &mut Batch<'_>,
        serial: &Serial,
        transition: Transition,
        audit: AuditRecord,
    ) -> Result<(Option<Station>, Recorded), CommandError> {
        let mut transition = transition;
        let mut effects = transition.effects.clone();
        let accepted = transition.station.as_ref().filter(|s| {
            s.standing == Standing::Authorized
                && effects.contains(&Effect::Send(station::Command::Authorized))
        });
        let mismatch = accepted
            .and_then(|record| self.authorize_holder(live, cx, record, &mut effects, &audit));
        // The impostor's cut is an identity-mismatch refusal of the station too.
        if let Some(m) = &mismatch {
            let noted = |s| station::mismatch_noted(s, m.time);
            transition.station = transition.station.take().map(noted);
        }
        let change = match &transition.station {
            Some(s) => Change::PutStation(s.clone()),
            None => Change::DeleteStation(serial.clone()),
        };
        // Durable first (at the batch's commit); only then does anyone hear of it.
        let tenant = audit.tenant.clone();
        let recorded = cx.record(vec![change], audit)?;
        if let Some(mismatch) = mismatch {
            cx.record(Vec::new(), mismatch)?;
        }
        self.run_effects(live, &mut cx.out, serial, &effects, &tenant);
        let view = match &transition.station {
            Some(s) => self.view(live, s),
            None => json!({"serial": serial.as_str(), "state": null, "removed": true}),
        };
        let body = json!({"event": "state", "station": view});
        cx.out.event(&tenant, EventKind::Stations, body, self.now());
        Ok((transition.station, recorded))
    }

    /// An accepted station's `authorized` goes only to the live session that presents the key
    /// its record pins. A session with another key (an impostor that took the client id) never
    /// hears it and gets no rights: it is cut and the security event raised; the audit record
    /// of that is returned, to be written after the acceptance's own.
    fn authorize_holder(
        &self,
        live: &Live,
        cx: &mut Batch<'_>,
        record: &Station,
        effects: &mut Vec<Effect>,
        audit: &AuditRecord,
    ) -> Option<AuditRecord> {
        let serial = &record.serial;
        let (presented, ip, session_id) =
            live.sessions
                .get(&serial.client_id())
                .and_then(|s| match &s.identity {
                    Identity::Station { presented, .. } => Some((*presented, s.ip, s.session_id)),
                    _ => None,
                })?;
        if presented.key() == record.fingerprint {
            effects.retain(|e| *e != Effect::Send(station::Command::Authorized));
            cx.out.push(authorized_to(serial, session_id));
            return None;
        }
        effects.retain(|e| !matches!(e, Effect::Send(_) | Effect::Rights));
        let presents = presented
            .key()
            .map_or("no key".to_owned(), |k| k.to_string());
        cx.out.cut(serial.client_id(), None);
        let body = json!({
            "event": "identity_mismatch",
            "serial": serial.as_str(),
            "pinned": record.fingerprint.map(|f| f.to_string()),
            "presented": presented.key().map(|p| p.to_string()),
            "ip": ip.to_string(),
            "advice": "a session with another key held the station's client id when it was accepted: it was cut",
        });
        cx.out
            .event(&audit.tenant, EventKind::Security, body, self.now());
        Some(AuditRecord::new(
            audit.time,
            &audit.tenant,
            serial.client_id(),
            Some(serial.to_string()),
            "identity_mismatch",
            Outcome::Refused,
            Some(format!(
                "the live session from {ip} presents {presents}, not the accepted key: cut"
            )),
        ))
    }

    fn run_effects(
        &self,
        live: &Live,
        out: &mut Outbox,
        serial: &Serial,
        effects: &[Effect],
        tenant: &str,
    ) {
        let cmd_topic = Topic::StationCmd(serial.clone());
        for effect in effects {
            match effect {
                Effect::Send(cmd) => out.publish(&cmd_topic, &cmd.payload()),
                Effect::Cut(cmd) => {
                    // The station is first sent its `cmd`, so that it knows why; the front door
                    // withdraws its rights now and closes once that message is written (bounded
                    // grace).
                    out.publish(&cmd_topic, &cmd.payload());
                    out.cut(serial.client_id(), Some(&cmd_topic));
                }
                Effect::Rights => {
                    // The session as it is now: the batch holds the lock until the re-check.
                    if let Some(LiveSession {
                        identity: Identity::Station { presented, .. },
                        session_id,
                        ..
                    }) = live.sessions.get(&serial.client_id())
                    {
                        out.push(Output::Recheck {
                            serial: serial.clone(),
                            session_id: *session_id,
                            presented: *presented,
                        });
                    }
                }
                Effect::Event { kind, detail } => {
                    let kind_of = if *kind == "identity_mismatch" {
                        EventKind::Security
                    } else {
                        EventKind::Stations
                    };
                    let body = json!({"event": kind, "serial": serial.as_str(), "detail": detail});
                    out.event(tenant, kind_of, body, self.now());
                }
            }
        }
    }
}

/// A chunk of a firmware image to read and send to a station: decided in the batch (the
/// station is updating to this version, the range is inside the image), read after it, off the
/// controller's lock ([`ChunkRead::answer`]).
#[derive(Debug)]
pub(super) struct ChunkRead {
    version: String,
    path: std::path::PathBuf,
    offset: u64,
    length: u64,
    total: u64,
}

impl ChunkRead {
    /// Reads the chunk from the image file: the station's `firmware/chunk` message, data or
    /// error. Blocking I/O: for a blocking thread.
    pub(super) fn answer(self) -> FirmwareChunk {
        let mut data = vec![0u8; usize::try_from(self.length).unwrap_or(0)];
        let read = std::fs::File::open(&self.path).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.offset))?;
            f.read_exact(&mut data)
        });
        match read {
            Ok(()) => FirmwareChunk::Data {
                version: self.version,
                offset: self.offset,
                total: self.total,
                data,
            },
            Err(e) => {
                warn!("firmware image {}: {e}", self.path.display());
                FirmwareChunk::Error {
                    version: self.version,
                    error: "the firmware image cannot be read".into(),
                    code: "internal".into(),
                }
            }
        }
    }
}

/// The `update_progress` event of a chunk request that reaches another tenth of the image, or
/// its start or its end (docs/protocol.md §3.2): at most twelve events per download, whatever
/// the chunk size.
fn progress(serial: &Serial, read: &ChunkRead) -> Option<serde_json::Value> {
    let end = read.offset.saturating_add(read.length).min(read.total);
    let tenth = |bytes: u64| {
        bytes
            .saturating_mul(10)
            .checked_div(read.total)
            .unwrap_or(10)
    };
    let reached = read.offset == 0 || tenth(end) > tenth(read.offset) || end == read.total;
    reached.then(|| {
        json!({
            "event": "update_progress",
            "serial": serial.as_str(),
            "version": read.version,
            "received": end,
            "size": read.total,
        })
    })
}

/// `authorized` for the one session `session_id` of the station, and no other.
fn authorized_to(serial: &Serial, session_id: u64) -> Output {
    Output::DeliverTo {
        client_id: serial.client_id(),
        session_id,
        topic: Topic::StationCmd(serial.clone()).to_string(),
        payload: station::Command::Authorized
            .payload()
            .to_string()
            .into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_reports_its_progress_by_tenths_from_start_to_end() {
        let serial = Serial::parse("S1").expect("serial");
        let total = 1_000_003u64;
        let chunk = 65_536u64;
        let mut events = Vec::new();
        let mut offset = 0;
        while offset < total {
            let read = ChunkRead {
                version: "6.1.0".into(),
                path: "image.bin".into(),
                offset,
                length: chunk.min(total - offset),
                total,
            };
            events.extend(progress(&serial, &read));
            offset += chunk;
        }
        let received: Vec<u64> = events
            .iter()
            .map(|e| e["received"].as_u64().expect("received"))
            .collect();
        assert_eq!(received.first(), Some(&chunk), "no event at the start");
        assert_eq!(received.last(), Some(&total), "no event at the end");
        assert!(received.windows(2).all(|w| w[0] < w[1]));
        assert!((10..=12).contains(&events.len()), "{received:?}");
        assert_eq!(events[0]["event"], "update_progress");
        assert_eq!(events[0]["size"], total);
        // A request of a station that asks again at the end says nothing new but the end.
        let again = ChunkRead {
            version: "6.1.0".into(),
            path: "image.bin".into(),
            offset: total,
            length: 0,
            total,
        };
        assert!(progress(&serial, &again).is_some());
    }
}
