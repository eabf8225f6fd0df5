//! The pure station state machine of the station manual: admission, auth requests and operator
//! commands, each consuming the old record and returning the new one with its effects.
//!
//! No I/O and no clock here: the shell passes `now`, stores the returned record and carries out
//! the effects (publish, cut the session, re-evaluate rights, raise events).

use std::fmt;
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::firmware::{FirmwareClass, FirmwareImage, FirmwarePolicy};
use crate::times::utc;
pub use fleet_protocol::payload::{AuthRequest, AuthRequestError, StationCommand as Command};
use fleet_protocol::{Fingerprint, Serial};

/// The tenant every station belongs to until stations are assigned to tenants.
pub const DEFAULT_TENANT: &str = "default";

/// What the controller keeps about one station.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Station {
    pub serial: Serial,
    pub model: String,
    pub firmware: String,
    pub mac_streaming: String,
    pub mac_control: String,
    /// The key presented with the latest auth request; pinned once authorized.
    pub fingerprint: Option<Fingerprint>,
    pub standing: Standing,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_seen: Option<OffsetDateTime>,
    #[serde(default)]
    pub ip: Option<String>,
    pub tenant: String,
    /// The station's last identity-mismatch refusal (another key, or none, for its client id
    /// while authorized): what `fleetctl stations list` flags. Absent in older stores.
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_mismatch: Option<OffsetDateTime>,
}

/// Where a station stands with the operators; whether it is connected is not kept here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Standing {
    /// Current firmware with its own key: waiting for an operator to accept or reject it.
    Unauthorized,
    /// Firmware 6.0.2 to 6.0.7: must be updated before it can be authorized.
    UpdateRequired,
    /// An update was started and has not finished.
    Updating {
        version: String,
        sha256: String,
        size: u64,
    },
    /// Cannot be authorized nor updated; the reason is shown to operators.
    Unsupported { reason: String },
    /// Accepted by an operator with the pinned fingerprint.
    Authorized,
    /// Refused until an operator clears it.
    Rejected,
}

impl Standing {
    /// How operators call this standing, for messages.
    pub fn label(&self) -> &'static str {
        match self {
            Standing::Unauthorized => "Unauthorized",
            Standing::UpdateRequired => "Update Required",
            Standing::Updating { .. } => "Updating",
            Standing::Unsupported { .. } => "Unsupported",
            Standing::Authorized => "Authorized",
            Standing::Rejected => "Rejected",
        }
    }
}

pub use fleet_protocol::StationState;

impl Station {
    /// A record for a serial seen for the first time; the auth request fills in the rest.
    fn first_seen(serial: Serial, now: OffsetDateTime) -> Station {
        Station {
            serial,
            model: String::new(),
            firmware: String::new(),
            mac_streaming: String::new(),
            mac_control: String::new(),
            fingerprint: None,
            standing: Standing::Unauthorized,
            created_at: now,
            updated_at: now,
            last_seen: None,
            ip: None,
            tenant: DEFAULT_TENANT.to_owned(),
            last_mismatch: None,
        }
    }

    /// The state to show, given whether the station is connected now.
    pub fn state(&self, online: bool) -> StationState {
        match self.standing {
            Standing::Unauthorized => StationState::Unauthorized,
            Standing::UpdateRequired => StationState::UpdateRequired,
            Standing::Updating { .. } => StationState::Updating,
            Standing::Unsupported { .. } => StationState::Unsupported,
            Standing::Authorized if online => StationState::Running,
            Standing::Authorized => StationState::NotRunning,
            Standing::Rejected => StationState::Rejected,
        }
    }

    /// Takes in what an auth request says about the station.
    fn refresh(&mut self, req: AuthRequest, ip: Option<String>, now: OffsetDateTime) {
        self.model = req.model;
        self.firmware = req.firmware;
        self.mac_streaming = req.mac_streaming;
        self.mac_control = req.mac_control;
        self.last_seen = Some(now);
        if ip.is_some() {
            self.ip = ip;
        }
        self.updated_at = now;
    }

    /// The pinned key, if the station is authorized.
    fn pinned(&self) -> Option<Fingerprint> {
        match self.standing {
            Standing::Authorized => self.fingerprint,
            _ => None,
        }
    }
}

/// What a station presents at CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Presented {
    /// A client certificate with this key.
    Key(Fingerprint),
    /// No client certificate: legacy firmware.
    NoCertificate,
}

impl Presented {
    pub fn key(&self) -> Option<Fingerprint> {
        match self {
            Presented::Key(fp) => Some(*fp),
            Presented::NoCertificate => None,
        }
    }
}

/// The admission decision for a station's CONNECT (PROTOCOL §2), naming the rights it gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Admitted with the pending rights: it may ask for authorization.
    Pending,
    /// Admitted with the legacy rights: pending, plus the firmware topics.
    Legacy,
    /// Admitted with the authorized rights.
    Authorized,
    Deny(DenyReason),
}

/// Why a station is refused at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// An operator rejected it; refused until cleared.
    Rejected,
    /// Authorized with another key: a clone, or a station whose authentication was deleted
    /// locally. Refused until an operator removes it.
    IdentityMismatch {
        pinned: Fingerprint,
        presented: Option<Fingerprint>,
    },
}

impl DenyReason {
    /// Short machine name, also the kind of the security event it raises.
    pub fn as_str(&self) -> &'static str {
        match self {
            DenyReason::Rejected => "rejected",
            DenyReason::IdentityMismatch { .. } => "identity_mismatch",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::Rejected => {
                f.write_str("station is rejected; refused until an operator clears it")
            }
            DenyReason::IdentityMismatch {
                pinned,
                presented: Some(presented),
            } => write!(
                f,
                "identity mismatch: station is authorized with key {pinned} but presented key \
                 {presented}; refused until an operator removes it"
            ),
            DenyReason::IdentityMismatch {
                pinned,
                presented: None,
            } => write!(
                f,
                "identity mismatch: station is authorized with key {pinned} but presented no \
                 certificate; refused until an operator removes it"
            ),
        }
    }
}

/// The record after an identity-mismatch refusal at `now` ([`DenyReason::IdentityMismatch`]):
/// `last_mismatch` is `now`, unless a later one is recorded already (refusals that were decided
/// concurrently may be stored out of order). Nothing else changes: a mismatch is the operator's
/// to answer (Remove Device), not the state machine's.
pub fn mismatch_noted(mut station: Station, now: OffsetDateTime) -> Station {
    let now = utc(now);
    if station.last_mismatch.is_none_or(|last| last < now) {
        station.last_mismatch = Some(now);
    }
    station
}

/// Decides a station's CONNECT from its record and what it presents.
pub fn admit(record: Option<&Station>, presented: &Presented) -> Admit {
    let unknown_or_waiting = match presented {
        Presented::Key(_) => Admit::Pending,
        Presented::NoCertificate => Admit::Legacy,
    };
    let Some(station) = record else {
        return unknown_or_waiting;
    };
    match (&station.standing, station.fingerprint) {
        (Standing::Rejected, _) => Admit::Deny(DenyReason::Rejected),
        (Standing::Authorized, Some(pinned)) if presented.key() == Some(pinned) => {
            Admit::Authorized
        }
        (Standing::Authorized, Some(pinned)) => Admit::Deny(DenyReason::IdentityMismatch {
            pinned,
            presented: presented.key(),
        }),
        // Authorized without a pinned key cannot be reached through this module; should a
        // record say so anyway, it gets no more than a station waiting for an operator.
        _ => unknown_or_waiting,
    }
}

/// Something the shell must do after a transition, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Publish the command on `stations/<serial>/cmd`.
    Send(Command),
    /// Publish the command, then cut the live session (after a short bounded grace).
    Cut(Command),
    /// Re-evaluate the live session's rights: call `admit` again with the new record.
    Rights,
    /// Raise an event on `fleet/events/<tenant>/…`, e.g. `identity_mismatch`.
    Event { kind: &'static str, detail: String },
}

/// The outcome of a transition: the new record and what the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The record to store; `None` deletes it.
    pub station: Option<Station>,
    pub effects: Vec<Effect>,
}

impl Transition {
    fn unchanged(station: Station) -> Transition {
        Transition {
            station: Some(station),
            effects: Vec::new(),
        }
    }
}

/// Whether `after`, what an auth request made of the stored record `before`, says nothing
/// that `before` does not: the same record but for when it was updated and last seen (a
/// sighting, which the controller keeps apart). Such a request decides nothing: an authorized
/// station after a reboot, a waiting one that asks again, a rejected one (ignored).
pub fn reaffirms(before: &Station, after: &Station) -> bool {
    let mut same = after.clone();
    same.updated_at = before.updated_at;
    same.last_seen = before.last_seen;
    same == *before
}

/// A station asks to be authorized (`stations/<serial>/auth/request`). `record` is the stored
/// record of `serial`, if any; `presented` is what the station's session presented at CONNECT.
pub fn on_auth_request(
    record: Option<Station>,
    serial: Serial,
    req: AuthRequest,
    presented: Presented,
    ip: Option<String>,
    policy: &FirmwarePolicy,
    now: OffsetDateTime,
) -> Transition {
    let now = utc(now);
    let key = presented.key();
    let mut station = match station_to_refresh(record, serial, key, now) {
        ControlFlow::Continue(station) => station,
        ControlFlow::Break(unchanged) => return unchanged,
    };

    let was_authorized = station.pinned().is_some();
    let was_waiting_with = match station.standing {
        Standing::Unauthorized => Some(station.fingerprint),
        _ => None,
    };
    let class = policy.classify(&req.firmware);
    let firmware = req.firmware.clone();
    station.refresh(req, ip, now);
    station.fingerprint = key;

    let mut effects = Vec::new();
    station.standing = match class {
        // Here the key is the pinned one, checked above.
        FirmwareClass::Current if was_authorized => {
            // A rebooted station learns it is still authorized.
            effects.push(Effect::Send(Command::Authorized));
            Standing::Authorized
        }
        FirmwareClass::Current => match key {
            Some(fingerprint) => {
                if was_waiting_with != Some(Some(fingerprint)) {
                    effects.push(Effect::Event {
                        kind: "station_unauthorized",
                        detail: format!(
                            "station {} (model {}, firmware {}) waits for authorization with key \
                             {fingerprint}",
                            station.serial, station.model, station.firmware
                        ),
                    });
                }
                Standing::Unauthorized
            }
            None => Standing::Unsupported {
                reason: format!("firmware {firmware} must present its own certificate"),
            },
        },
        FirmwareClass::UpdateRequired => match station.standing {
            // An interrupted update resumes.
            Standing::Updating {
                version,
                sha256,
                size,
            } => {
                effects.push(Effect::Send(Command::Update {
                    version: version.clone(),
                    sha256: sha256.clone(),
                    size,
                }));
                Standing::Updating {
                    version,
                    sha256,
                    size,
                }
            }
            _ => Standing::UpdateRequired,
        },
        FirmwareClass::Unsupported { reason } => Standing::Unsupported { reason },
    };
    if was_authorized && station.standing != Standing::Authorized {
        effects.push(Effect::Rights);
    }
    Transition {
        station: Some(station),
        effects,
    }
}

/// The record an auth request may refresh: the known station or a new one. `Break`: the
/// request changes nothing (the station is rejected, or asks with a key other than its pinned
/// one).
fn station_to_refresh(
    record: Option<Station>,
    serial: Serial,
    key: Option<Fingerprint>,
    now: OffsetDateTime,
) -> ControlFlow<Transition, Station> {
    ControlFlow::Continue(match record {
        // The manual: Reject "ignore[s] all further authorization requests from this device".
        Some(station) if station.standing == Standing::Rejected => {
            return ControlFlow::Break(Transition::unchanged(station))
        }
        // An authorized station asking with another key: admission refuses such a session, and
        // should a request get through anyway it must not replace the pinned key (a clone
        // would otherwise unpin the real station).
        Some(station) => match station.pinned() {
            Some(pinned) if Some(pinned) != key => {
                let reason = DenyReason::IdentityMismatch {
                    pinned,
                    presented: key,
                };
                let detail = format!("station {}: {reason}", station.serial);
                return ControlFlow::Break(Transition {
                    station: Some(station),
                    effects: vec![Effect::Event {
                        kind: reason.as_str(),
                        detail,
                    }],
                });
            }
            _ => station,
        },
        None => Station::first_seen(serial, now),
    })
}

/// Why an operator command cannot change a station; the text names the station and what is
/// wrong. The shell answers it with the matching error code (`views.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The station is not in a state the command applies to.
    #[error("{0}")]
    WrongState(String),
    /// The station's key is not the one the operator checked.
    #[error("{0}")]
    FingerprintMismatch(String),
    /// The command's arguments ask for nothing the station can do.
    #[error("{0}")]
    InvalidArgument(String),
}

impl Refused {
    /// The text of the refusal.
    pub fn message(&self) -> &str {
        match self {
            Refused::WrongState(m)
            | Refused::FingerprintMismatch(m)
            | Refused::InvalidArgument(m) => m,
        }
    }
}

fn not_in(station: &Station, wanted: &str) -> Refused {
    Refused::WrongState(format!(
        "station {} is {}, not {wanted}",
        station.serial,
        station.standing.label()
    ))
}

/// Accept: the operator checked `fingerprint` against the station's local admin interface.
pub fn accept(
    mut station: Station,
    fingerprint: Fingerprint,
    now: OffsetDateTime,
) -> Result<Transition, Refused> {
    if station.standing != Standing::Unauthorized {
        return Err(not_in(&station, "Unauthorized"));
    }
    match station.fingerprint {
        Some(key) if key == fingerprint => {}
        Some(key) => {
            return Err(Refused::FingerprintMismatch(format!(
                "station {} presented key {key}, not {fingerprint}",
                station.serial
            )))
        }
        None => {
            return Err(Refused::FingerprintMismatch(format!(
                "station {} has not presented a key since its authentication was reset, so it \
                 cannot be {fingerprint}",
                station.serial
            )))
        }
    }
    station.standing = Standing::Authorized;
    station.updated_at = utc(now);
    Ok(Transition {
        station: Some(station),
        effects: vec![Effect::Send(Command::Authorized), Effect::Rights],
    })
}

/// Reject: deny access and ignore all further authorization requests until cleared.
pub fn reject(mut station: Station, now: OffsetDateTime) -> Result<Transition, Refused> {
    if station.standing == Standing::Rejected {
        return Err(Refused::WrongState(format!(
            "station {} is Rejected already",
            station.serial
        )));
    }
    station.standing = Standing::Rejected;
    station.updated_at = utc(now);
    Ok(Transition {
        station: Some(station),
        effects: vec![Effect::Cut(Command::Rejected)],
    })
}

/// Clear a rejected station: it is forgotten; after its next reboot it asks again and shows as
/// Unauthorized.
pub fn clear_rejected(station: Station, _now: OffsetDateTime) -> Result<Transition, Refused> {
    if station.standing != Standing::Rejected {
        return Err(not_in(&station, "Rejected"));
    }
    Ok(Transition {
        station: None,
        effects: Vec::new(),
    })
}

/// Start Update: the station pulls `image` and reboots into it.
pub fn start_update(
    mut station: Station,
    image: &FirmwareImage,
    now: OffsetDateTime,
) -> Result<Transition, Refused> {
    if !matches!(
        station.standing,
        Standing::UpdateRequired | Standing::Updating { .. }
    ) {
        return Err(not_in(&station, "Update Required"));
    }
    let version = image.version.to_string();
    station.standing = Standing::Updating {
        version: version.clone(),
        sha256: image.sha256.clone(),
        size: image.size,
    };
    station.updated_at = utc(now);
    Ok(Transition {
        station: Some(station),
        effects: vec![Effect::Send(Command::Update {
            version,
            sha256: image.sha256.clone(),
            size: image.size,
        })],
    })
}

/// Reset Device of an authorized station; it reboots. Deleting its authentication sends it
/// back to Unauthorized (its old key is no longer pinned); deleting only its configuration
/// keeps it authorized.
pub fn reset(
    mut station: Station,
    delete_authentication: bool,
    delete_configuration: bool,
    now: OffsetDateTime,
) -> Result<Transition, Refused> {
    if !delete_authentication && !delete_configuration {
        return Err(Refused::InvalidArgument(
            "reset needs delete_authentication, delete_configuration or both".into(),
        ));
    }
    if station.standing != Standing::Authorized {
        return Err(not_in(&station, "Authorized"));
    }
    if delete_authentication {
        station.standing = Standing::Unauthorized;
        station.fingerprint = None;
    }
    station.updated_at = utc(now);
    Ok(Transition {
        station: Some(station),
        effects: vec![Effect::Cut(Command::Reset {
            delete_authentication,
            delete_configuration,
        })],
    })
}

/// Remove Device, from any standing: the record is deleted, which forces re-authentication.
pub fn remove(station: Station, _now: OffsetDateTime) -> Result<Transition, Refused> {
    drop(station);
    Ok(Transition {
        station: None,
        effects: vec![Effect::Cut(Command::Removed)],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-03-01 10:00:00 UTC);

    fn key(n: u8) -> Fingerprint {
        Fingerprint::from_bytes([n; 32])
    }

    fn serial() -> Serial {
        Serial::parse("MC-1").unwrap()
    }

    fn request(firmware: &str) -> AuthRequest {
        AuthRequest {
            model: "MC-6100".into(),
            firmware: firmware.into(),
            mac_streaming: "001122334455".into(),
            mac_control: "001122334466".into(),
        }
    }

    fn ask(record: Option<Station>, firmware: &str, presented: Presented) -> Transition {
        on_auth_request(
            record,
            serial(),
            request(firmware),
            presented,
            Some("192.0.2.7".into()),
            &FirmwarePolicy::default(),
            T0,
        )
    }

    fn with_standing(standing: Standing, fingerprint: Option<Fingerprint>) -> Station {
        let mut station = ask(None, "6.1.0", Presented::Key(key(1))).station.unwrap();
        station.standing = standing;
        station.fingerprint = fingerprint;
        station
    }

    fn authorized() -> Station {
        with_standing(Standing::Authorized, Some(key(1)))
    }

    fn image() -> FirmwareImage {
        FirmwareImage {
            version: semver::Version::new(6, 1, 2),
            sha256: "ab".repeat(32),
            size: 4096,
            path: "fw-6.1.2.bin".into(),
        }
    }

    // --- reaffirmation ---

    #[test]
    fn a_rebooted_authorized_station_reaffirms_its_record() {
        let stored = authorized();
        let later = on_auth_request(
            Some(stored.clone()),
            serial(),
            request("6.1.0"),
            Presented::Key(key(1)),
            Some("192.0.2.7".into()),
            &FirmwarePolicy::default(),
            T0 + time::Duration::HOUR,
        );
        let after = later.station.unwrap();
        assert_eq!(after.updated_at, T0 + time::Duration::HOUR);
        assert_eq!(later.effects, vec![Effect::Send(Command::Authorized)]);
        assert!(reaffirms(&stored, &after));
    }

    #[test]
    fn a_request_that_changes_anything_but_the_times_does_not_reaffirm() {
        let stored = authorized();
        let changed: [fn(&mut Station); 6] = [
            |s| s.firmware = "6.1.1".into(),
            |s| s.model = "MC-6200".into(),
            |s| s.ip = Some("192.0.2.8".into()),
            |s| s.fingerprint = Some(key(2)),
            |s| s.standing = Standing::Unauthorized,
            |s| s.mac_control = "001122334477".into(),
        ];
        for change in changed {
            let mut after = stored.clone();
            change(&mut after);
            assert!(!reaffirms(&stored, &after), "{after:?}");
        }
        let mut seen = stored.clone();
        seen.last_seen = Some(T0 + time::Duration::DAY);
        assert!(reaffirms(&stored, &seen));
    }

    #[test]
    fn a_rejected_stations_request_reaffirms_its_record() {
        let stored = with_standing(Standing::Rejected, Some(key(1)));
        let asked = ask(Some(stored.clone()), "6.1.0", Presented::Key(key(2)));
        assert!(reaffirms(&stored, asked.station.as_ref().unwrap()));
        assert!(asked.effects.is_empty());
    }

    // --- admission ---

    #[test]
    fn a_mismatch_is_noted_and_never_goes_back_in_time() {
        let station = authorized();
        assert_eq!(station.last_mismatch, None);
        let noted = mismatch_noted(station.clone(), T0 + time::Duration::HOUR);
        assert_eq!(noted.last_mismatch, Some(T0 + time::Duration::HOUR));
        // Only the time moves: the standing and the pinned key stay.
        assert_eq!(
            Station {
                last_mismatch: None,
                ..noted.clone()
            },
            station
        );
        let earlier = mismatch_noted(noted.clone(), T0);
        assert_eq!(earlier.last_mismatch, Some(T0 + time::Duration::HOUR));
        let later = mismatch_noted(noted, T0 + time::Duration::DAY);
        assert_eq!(later.last_mismatch, Some(T0 + time::Duration::DAY));
    }

    #[test]
    fn a_record_stored_without_last_mismatch_reads_as_none() {
        let mut json = serde_json::to_value(authorized()).unwrap();
        json.as_object_mut().unwrap().remove("last_mismatch");
        let read: Station = serde_json::from_value(json).unwrap();
        assert_eq!(read.last_mismatch, None);
        let noted = mismatch_noted(authorized(), T0);
        let back: Station = serde_json::from_slice(&serde_json::to_vec(&noted).unwrap()).unwrap();
        assert_eq!(back, noted);
    }

    #[test]
    fn admit_unknown_station() {
        assert_eq!(admit(None, &Presented::Key(key(1))), Admit::Pending);
        assert_eq!(admit(None, &Presented::NoCertificate), Admit::Legacy);
    }

    #[test]
    fn admit_rejected_station_is_denied_with_any_key() {
        let station = with_standing(Standing::Rejected, Some(key(1)));
        for presented in [
            Presented::Key(key(1)),
            Presented::Key(key(2)),
            Presented::NoCertificate,
        ] {
            assert_eq!(
                admit(Some(&station), &presented),
                Admit::Deny(DenyReason::Rejected)
            );
        }
    }

    #[test]
    fn admit_authorized_station_only_with_its_pinned_key() {
        let station = authorized();
        assert_eq!(
            admit(Some(&station), &Presented::Key(key(1))),
            Admit::Authorized
        );
        assert_eq!(
            admit(Some(&station), &Presented::Key(key(2))),
            Admit::Deny(DenyReason::IdentityMismatch {
                pinned: key(1),
                presented: Some(key(2))
            })
        );
        let deny = admit(Some(&station), &Presented::NoCertificate);
        let Admit::Deny(reason) = deny else {
            panic!("{deny:?}")
        };
        assert_eq!(reason.as_str(), "identity_mismatch");
        assert!(reason.to_string().contains("no certificate"));
    }

    #[test]
    fn admit_waiting_stations_get_pending_or_legacy_rights() {
        for standing in [
            Standing::Unauthorized,
            Standing::UpdateRequired,
            Standing::Updating {
                version: "6.1.2".into(),
                sha256: "00".repeat(32),
                size: 1,
            },
            Standing::Unsupported { reason: "x".into() },
        ] {
            let station = with_standing(standing, Some(key(1)));
            assert_eq!(
                admit(Some(&station), &Presented::Key(key(2))),
                Admit::Pending
            );
            assert_eq!(
                admit(Some(&station), &Presented::NoCertificate),
                Admit::Legacy
            );
        }
        // An inconsistent record (authorized without a pinned key) grants no more.
        let odd = with_standing(Standing::Authorized, None);
        assert_eq!(admit(Some(&odd), &Presented::Key(key(1))), Admit::Pending);
    }

    // --- auth requests ---

    #[test]
    fn new_station_with_current_firmware_and_key_is_unauthorized() {
        let t = ask(None, "6.1.0", Presented::Key(key(1)));
        let station = t.station.unwrap();
        assert_eq!(station.standing, Standing::Unauthorized);
        assert_eq!(station.fingerprint, Some(key(1)));
        assert_eq!(station.serial, serial());
        assert_eq!(station.model, "MC-6100");
        assert_eq!(station.tenant, "default");
        assert_eq!(station.ip.as_deref(), Some("192.0.2.7"));
        assert_eq!(station.last_seen, Some(T0));
        assert!(matches!(
            t.effects.as_slice(),
            [Effect::Event {
                kind: "station_unauthorized",
                ..
            }]
        ));
        // Asking again with the same key raises no second event.
        let again = ask(Some(station), "6.1.0", Presented::Key(key(1)));
        assert!(again.effects.is_empty());
        // A new key is shown, and announced.
        let new_key = ask(again.station, "6.1.0", Presented::Key(key(2)));
        assert_eq!(new_key.station.unwrap().fingerprint, Some(key(2)));
        assert_eq!(new_key.effects.len(), 1);
    }

    #[test]
    fn current_firmware_without_certificate_is_unsupported() {
        let t = ask(None, "6.1.0", Presented::NoCertificate);
        assert_eq!(
            t.station.unwrap().standing,
            Standing::Unsupported {
                reason: "firmware 6.1.0 must present its own certificate".into()
            }
        );
        assert!(t.effects.is_empty());
    }

    #[test]
    fn old_firmware_requires_an_update() {
        let t = ask(None, "6.0.5", Presented::NoCertificate);
        let station = t.station.unwrap();
        assert_eq!(station.standing, Standing::UpdateRequired);
        assert_eq!(station.fingerprint, None);
        assert!(t.effects.is_empty());
    }

    #[test]
    fn too_old_or_garbage_firmware_is_unsupported() {
        let t = ask(None, "6.0.1", Presented::NoCertificate);
        assert_eq!(
            t.station.unwrap().standing,
            Standing::Unsupported {
                reason: "firmware 6.0.1 is below 6.0.2 and cannot be updated".into()
            }
        );
        let t = ask(None, "garbage", Presented::Key(key(1)));
        assert!(matches!(
            t.station.unwrap().standing,
            Standing::Unsupported { reason } if reason.contains("\"garbage\"")
        ));
    }

    #[test]
    fn rejected_station_requests_are_ignored() {
        let station = with_standing(Standing::Rejected, Some(key(1)));
        let t = ask(Some(station.clone()), "6.1.0", Presented::Key(key(2)));
        assert_eq!(t.station, Some(station));
        assert!(t.effects.is_empty());
    }

    #[test]
    fn rebooted_authorized_station_learns_it_is_still_authorized() {
        let mut before = authorized();
        before.ip = None;
        let mut req = request("6.2.0");
        req.model = "MC-6200".into();
        let later = T0 + time::Duration::hours(1);
        let t = on_auth_request(
            Some(before),
            serial(),
            req,
            Presented::Key(key(1)),
            Some("192.0.2.9".into()),
            &FirmwarePolicy::default(),
            later,
        );
        let station = t.station.unwrap();
        assert_eq!(station.standing, Standing::Authorized);
        assert_eq!(station.firmware, "6.2.0");
        assert_eq!(station.model, "MC-6200");
        assert_eq!(station.last_seen, Some(later));
        assert_eq!(station.ip.as_deref(), Some("192.0.2.9"));
        assert_eq!(t.effects, vec![Effect::Send(Command::Authorized)]);
    }

    #[test]
    fn authorized_station_with_old_firmware_loses_its_authorization() {
        let t = ask(Some(authorized()), "6.0.5", Presented::Key(key(1)));
        assert_eq!(t.station.unwrap().standing, Standing::UpdateRequired);
        assert_eq!(t.effects, vec![Effect::Rights]);
        let t = ask(Some(authorized()), "5.0.0", Presented::Key(key(1)));
        assert!(matches!(
            t.station.unwrap().standing,
            Standing::Unsupported { .. }
        ));
        assert_eq!(t.effects, vec![Effect::Rights]);
    }

    #[test]
    fn authorized_station_asking_with_another_key_keeps_its_pin() {
        for presented in [Presented::Key(key(2)), Presented::NoCertificate] {
            let t = ask(Some(authorized()), "6.1.0", presented);
            assert_eq!(t.station, Some(authorized()));
            assert!(matches!(
                t.effects.as_slice(),
                [Effect::Event {
                    kind: "identity_mismatch",
                    ..
                }]
            ));
        }
    }

    #[test]
    fn interrupted_update_resumes() {
        let updating = Standing::Updating {
            version: "6.1.2".into(),
            sha256: "ab".repeat(32),
            size: 4096,
        };
        let station = with_standing(updating.clone(), None);
        let t = ask(Some(station), "6.0.5", Presented::NoCertificate);
        assert_eq!(t.station.unwrap().standing, updating);
        assert_eq!(
            t.effects,
            vec![Effect::Send(Command::Update {
                version: "6.1.2".into(),
                sha256: "ab".repeat(32),
                size: 4096
            })]
        );
    }

    #[test]
    fn finished_update_leads_to_unauthorized() {
        let station = with_standing(Standing::UpdateRequired, None);
        let station = start_update(station, &image(), T0).unwrap().station;
        let t = ask(station, "6.1.2", Presented::Key(key(3)));
        let station = t.station.unwrap();
        assert_eq!(station.standing, Standing::Unauthorized);
        assert_eq!(station.fingerprint, Some(key(3)));
    }

    // --- operator commands ---

    #[test]
    fn accept_with_the_checked_fingerprint() {
        let station = with_standing(Standing::Unauthorized, Some(key(1)));
        let t = accept(station, key(1), T0).unwrap();
        assert_eq!(t.station.unwrap().standing, Standing::Authorized);
        assert_eq!(
            t.effects,
            vec![Effect::Send(Command::Authorized), Effect::Rights]
        );
    }

    #[test]
    fn accept_with_another_fingerprint_is_a_mismatch() {
        let station = with_standing(Standing::Unauthorized, Some(key(1)));
        let error = accept(station, key(2), T0).unwrap_err();
        assert!(
            matches!(error, Refused::FingerprintMismatch(_)),
            "{error:?}"
        );
        assert!(error.message().contains(&key(1).to_string()));
        assert!(error.message().contains(&key(2).to_string()));
        let keyless = with_standing(Standing::Unauthorized, None);
        let error = accept(keyless, key(2), T0).unwrap_err();
        assert!(
            matches!(error, Refused::FingerprintMismatch(_)),
            "{error:?}"
        );
    }

    #[test]
    fn accept_only_an_unauthorized_station() {
        for standing in [
            Standing::Authorized,
            Standing::Rejected,
            Standing::UpdateRequired,
            Standing::Unsupported { reason: "r".into() },
        ] {
            let label = standing.label();
            let error = accept(with_standing(standing, Some(key(1))), key(1), T0).unwrap_err();
            assert!(matches!(error, Refused::WrongState(_)), "{error:?}");
            assert!(error.message().contains(label), "{}", error.message());
        }
    }

    #[test]
    fn reject_from_any_standing_but_rejected() {
        for standing in [
            Standing::Authorized,
            Standing::Unauthorized,
            Standing::UpdateRequired,
            Standing::Unsupported { reason: "r".into() },
        ] {
            let t = reject(with_standing(standing, Some(key(1))), T0).unwrap();
            assert_eq!(t.station.unwrap().standing, Standing::Rejected);
            assert_eq!(t.effects, vec![Effect::Cut(Command::Rejected)]);
        }
        let error = reject(with_standing(Standing::Rejected, None), T0).unwrap_err();
        assert!(matches!(error, Refused::WrongState(_)), "{error:?}");
    }

    #[test]
    fn clear_rejected_forgets_the_station() {
        let t = clear_rejected(with_standing(Standing::Rejected, Some(key(1))), T0).unwrap();
        assert_eq!(t.station, None);
        assert!(t.effects.is_empty());
        // After its reboot it asks again and shows as Unauthorized.
        let t = ask(t.station, "6.1.0", Presented::Key(key(1)));
        assert_eq!(t.station.unwrap().state(true), StationState::Unauthorized);
        let error = clear_rejected(authorized(), T0).unwrap_err();
        assert!(matches!(error, Refused::WrongState(_)), "{error:?}");
    }

    #[test]
    fn start_update_only_when_an_update_is_required() {
        let t = start_update(with_standing(Standing::UpdateRequired, None), &image(), T0).unwrap();
        let station = t.station.unwrap();
        assert_eq!(station.state(false), StationState::Updating);
        let update = Command::Update {
            version: "6.1.2".into(),
            sha256: "ab".repeat(32),
            size: 4096,
        };
        assert_eq!(t.effects, vec![Effect::Send(update)]);
        // Starting again re-sends.
        assert!(start_update(station, &image(), T0).is_ok());
        let error = start_update(authorized(), &image(), T0).unwrap_err();
        assert!(matches!(error, Refused::WrongState(_)), "{error:?}");
    }

    #[test]
    fn reset_with_delete_authentication_unpins_the_key() {
        let t = reset(authorized(), true, false, T0).unwrap();
        let station = t.station.unwrap();
        assert_eq!(station.standing, Standing::Unauthorized);
        assert_eq!(station.fingerprint, None);
        assert_eq!(
            t.effects,
            vec![Effect::Cut(Command::Reset {
                delete_authentication: true,
                delete_configuration: false
            })]
        );
        // The reset station comes back with a new key and waits for an operator.
        assert_eq!(
            admit(Some(&station), &Presented::Key(key(9))),
            Admit::Pending
        );
    }

    #[test]
    fn reset_of_configuration_only_stays_authorized() {
        let t = reset(authorized(), false, true, T0).unwrap();
        let station = t.station.unwrap();
        assert_eq!(station.standing, Standing::Authorized);
        assert_eq!(station.fingerprint, Some(key(1)));
        assert!(matches!(
            t.effects.as_slice(),
            [Effect::Cut(Command::Reset {
                delete_authentication: false,
                delete_configuration: true
            })]
        ));
    }

    #[test]
    fn reset_needs_an_authorized_station_and_a_flag() {
        let error = reset(authorized(), false, false, T0).unwrap_err();
        assert!(matches!(error, Refused::InvalidArgument(_)), "{error:?}");
        let error = reset(with_standing(Standing::Unauthorized, None), true, true, T0).unwrap_err();
        assert!(matches!(error, Refused::WrongState(_)), "{error:?}");
    }

    #[test]
    fn remove_from_any_standing_forces_reauthentication() {
        let t = remove(authorized(), T0).unwrap();
        assert_eq!(t.station, None);
        assert_eq!(t.effects, vec![Effect::Cut(Command::Removed)]);
        // A station whose authentication was deleted locally comes back with a new key.
        let t = ask(None, "6.1.0", Presented::Key(key(2)));
        assert_eq!(t.station.unwrap().standing, Standing::Unauthorized);
        assert!(remove(with_standing(Standing::Rejected, None), T0).is_ok());
    }

    // --- views and payloads ---

    #[test]
    fn states_and_labels() {
        let cases = [
            (
                Standing::UpdateRequired,
                false,
                "update_required",
                "Update Required",
            ),
            (Standing::Unauthorized, true, "unauthorized", "Unauthorized"),
            (Standing::Authorized, true, "running", "Running"),
            (Standing::Authorized, false, "not_running", "Not Running"),
            (Standing::Rejected, true, "rejected", "Rejected"),
            (
                Standing::Unsupported { reason: "r".into() },
                false,
                "unsupported",
                "Unsupported",
            ),
        ];
        for (standing, online, name, label) in cases {
            let state = with_standing(standing, Some(key(1))).state(online);
            assert_eq!(state.as_str(), name);
            assert_eq!(state.label(), label);
            assert_eq!(serde_json::to_value(state).unwrap(), json!(name));
            assert_eq!(StationState::from_name(name), Some(state));
        }
        assert_eq!(StationState::from_name("bogus"), None);
    }

    #[test]
    fn view_is_the_protocol_station_object() {
        let view = authorized().view(true);
        assert_eq!(view["serial"], "MC-1");
        assert_eq!(view["model"], "MC-6100");
        assert_eq!(view["firmware"], "6.1.0");
        assert_eq!(view["mac_streaming"], "001122334455");
        assert_eq!(view["mac_control"], "001122334466");
        assert_eq!(view["fingerprint"], key(1).to_string());
        assert_eq!(view["state"], "running");
        assert_eq!(view["label"], "Running");
        assert_eq!(view["online"], true);
        assert_eq!(view["last_seen"], "2024-03-01T10:00:00Z");
        assert_eq!(view["ip"], "192.0.2.7");
        assert!(view.get("reason").is_none());

        let unsupported = ask(None, "6.0.1", Presented::NoCertificate)
            .station
            .unwrap();
        let view = unsupported.view(false);
        assert_eq!(view["fingerprint"], Value::Null);
        assert_eq!(
            view["reason"],
            "firmware 6.0.1 is below 6.0.2 and cannot be updated"
        );
        let updating = start_update(with_standing(Standing::UpdateRequired, None), &image(), T0)
            .unwrap()
            .station
            .unwrap();
        assert_eq!(updating.view(false)["update_version"], "6.1.2");
        let mut unseen = authorized();
        unseen.last_seen = None;
        assert_eq!(unseen.view(false)["last_seen"], Value::Null);
    }

    #[test]
    fn record_round_trips_through_json() {
        for station in [
            authorized(),
            with_standing(
                Standing::Updating {
                    version: "6.1.2".into(),
                    sha256: "ab".repeat(32),
                    size: 3,
                },
                None,
            ),
            with_standing(Standing::Unsupported { reason: "r".into() }, None),
        ] {
            let json = serde_json::to_string(&station).unwrap();
            let back: Station = serde_json::from_str(&json).unwrap();
            assert_eq!(back, station);
        }
    }

    // --- properties over random event sequences ---

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const A: u8 = 0xA;
        const B: u8 = 0xB;
        /// A key no station ever presents.
        const W: u8 = 0xE;
        const FIRMWARES: [&str; 5] = ["6.0.1", "6.0.5", "6.1.0", "7.0.0", "garbage"];

        #[derive(Debug, Clone)]
        enum Event {
            Request {
                key: Option<u8>,
                firmware: &'static str,
            },
            /// `None`: the fingerprint the station presented (as an operator who checked it).
            Accept {
                with: Option<u8>,
            },
            Reject,
            Clear,
            Reset {
                auth: bool,
                conf: bool,
            },
            Remove,
            StartUpdate,
        }

        fn event() -> impl Strategy<Value = Event> {
            prop_oneof![
                4 => (
                    prop::option::of(prop::sample::select(vec![A, B])),
                    prop::sample::select(FIRMWARES.to_vec()),
                )
                    .prop_map(|(key, firmware)| Event::Request { key, firmware }),
                3 => prop::option::of(prop::sample::select(vec![A, B, W]))
                    .prop_map(|with| Event::Accept { with }),
                1 => Just(Event::Reject),
                1 => Just(Event::Clear),
                1 => any::<(bool, bool)>().prop_map(|(auth, conf)| Event::Reset { auth, conf }),
                1 => Just(Event::Remove),
                1 => Just(Event::StartUpdate),
            ]
        }

        /// One serial's record, as the store would hold it, and what the test remembers.
        struct World {
            record: Option<Station>,
            rejected: bool,
            policy: FirmwarePolicy,
            now: OffsetDateTime,
        }

        impl World {
            fn apply(&mut self, event: &Event) -> Result<(), TestCaseError> {
                self.now += time::Duration::seconds(1);
                let now = self.now;
                let before = self.record.clone();
                let command = |result: Result<Transition, Refused>,
                               world: &mut World|
                 -> Option<Transition> {
                    match result {
                        Ok(t) => {
                            world.record = t.station.clone();
                            Some(t)
                        }
                        Err(_) => None,
                    }
                };
                match event {
                    Event::Request { key, firmware } => {
                        let presented = match key {
                            Some(n) => Presented::Key(super::key(*n)),
                            None => Presented::NoCertificate,
                        };
                        let t = on_auth_request(
                            self.record.take(),
                            serial(),
                            request(firmware),
                            presented,
                            None,
                            &self.policy,
                            now,
                        );
                        if let Some(old) = &before {
                            let pinned = old.pinned();
                            if old.standing == Standing::Rejected
                                || pinned.is_some_and(|p| Some(p) != presented.key())
                            {
                                prop_assert_eq!(&t.station, &before);
                            }
                        }
                        self.record = t.station;
                    }
                    Event::Accept { with } => {
                        let Some(station) = before.clone() else {
                            return Ok(());
                        };
                        let fingerprint = match with {
                            Some(n) => key(*n),
                            None => station.fingerprint.unwrap_or(key(A)),
                        };
                        if command(accept(station, fingerprint, now), self).is_some() {
                            // (4) accept succeeds only with the station's own key.
                            let old = before.as_ref().and_then(|s| s.fingerprint);
                            prop_assert_eq!(old, Some(fingerprint));
                            prop_assert_eq!(
                                self.record.as_ref().and_then(|s| s.pinned()),
                                Some(fingerprint)
                            );
                        }
                    }
                    Event::Reject => {
                        if let Some(station) = before.clone() {
                            if command(reject(station, now), self).is_some() {
                                self.rejected = true;
                            }
                        }
                    }
                    Event::Clear => {
                        if let Some(station) = before.clone() {
                            if command(clear_rejected(station, now), self).is_some() {
                                self.rejected = false;
                            }
                        }
                    }
                    Event::Reset { auth, conf } => {
                        if let Some(station) = before.clone() {
                            command(reset(station, *auth, *conf, now), self);
                        }
                    }
                    Event::Remove => {
                        if let Some(station) = before.clone() {
                            if command(remove(station, now), self).is_some() {
                                self.rejected = false;
                            }
                        }
                    }
                    Event::StartUpdate => {
                        if let Some(station) = before.clone() {
                            command(start_update(station, &image(), now), self);
                        }
                    }
                }
                Ok(())
            }

            fn check(&self) -> Result<(), TestCaseError> {
                let record = self.record.as_ref();
                let all = [
                    Presented::Key(key(A)),
                    Presented::Key(key(B)),
                    Presented::Key(key(W)),
                    Presented::NoCertificate,
                ];
                // (1) after reject and before clear/remove, every CONNECT is denied.
                if self.rejected {
                    for presented in &all {
                        prop_assert_eq!(
                            admit(record, presented),
                            Admit::Deny(DenyReason::Rejected)
                        );
                    }
                }
                let Some(station) = record else {
                    return Ok(());
                };
                if station.standing == Standing::Authorized {
                    // Authorized always means a pinned key.
                    let pinned = station.fingerprint;
                    prop_assert!(pinned.is_some());
                    // (2) only the pinned key is admitted.
                    for presented in &all {
                        let admitted = admit(record, presented);
                        if presented.key() == pinned {
                            prop_assert_eq!(admitted, Admit::Authorized);
                        } else {
                            let is_mismatch = matches!(
                                admitted,
                                Admit::Deny(DenyReason::IdentityMismatch { .. })
                            );
                            prop_assert!(is_mismatch);
                        }
                    }
                    // (3) firmware below min_firmware is never authorized.
                    prop_assert_eq!(
                        self.policy.classify(&station.firmware),
                        FirmwareClass::Current
                    );
                } else {
                    for presented in &all {
                        prop_assert_ne!(admit(record, presented), Admit::Authorized);
                    }
                }
                Ok(())
            }
        }

        impl World {
            /// No station yet, default policy, at T0.
            fn new() -> World {
                World {
                    record: None,
                    rejected: false,
                    policy: FirmwarePolicy::default(),
                    now: T0,
                }
            }
        }

        proptest! {
            #[test]
            fn invariants_hold_over_random_event_sequences(
                events in prop::collection::vec(event(), 1..60)
            ) {
                let mut world = World::new();
                for event in &events {
                    world.apply(event)?;
                    world.check()?;
                }
            }

            #[test]
            fn a_failed_command_changes_nothing(
                events in prop::collection::vec(event(), 1..40)
            ) {
                let mut world = World::new();
                for event in &events {
                    let before = world.record.clone();
                    let failed = match (event, before.clone()) {
                        (Event::Accept { with: Some(n) }, Some(s)) => {
                            accept(s, key(*n), world.now).is_err()
                        }
                        (Event::Reject, Some(s)) => reject(s, world.now).is_err(),
                        (Event::Clear, Some(s)) => clear_rejected(s, world.now).is_err(),
                        (Event::Reset { auth, conf }, Some(s)) => {
                            reset(s, *auth, *conf, world.now).is_err()
                        }
                        (Event::StartUpdate, Some(s)) => {
                            start_update(s, &image(), world.now).is_err()
                        }
                        _ => false,
                    };
                    world.apply(event)?;
                    if failed {
                        prop_assert_eq!(&world.record, &before);
                    }
                }
            }
        }
    }
}
