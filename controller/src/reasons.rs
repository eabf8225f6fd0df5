//! Pure. Why a device or an address is where it is, in words: the short public reason a
//! refused MQTT 5 client reads in its CONNACK (never a secret: no PAP, no key but its own), and
//! for operators (`explain`, `fleetctl why`) why a station or phone is in its state and the
//! rule of the manuals (`shared/seeds/000_*`, the station manual, and `002_*`, the phone
//! manual) that applies, and which audit records are a subject's refusals.

use std::net::IpAddr;

use time::{Duration, OffsetDateTime};

use crate::audit::{AuditRecord, Outcome};
use crate::phone::{AuthState, Phone, PhonePolicy};
use crate::station::{DenyReason, Standing, Station, StationState};
use crate::times::rfc3339;

/// How recent an identity mismatch of an authorized station must be for its rule to be the
/// one that applies (and for `fleetctl stations list` to flag it).
pub const RECENT_MISMATCH: Duration = Duration::hours(24);

/// A time for a reason text (RFC 3339 UTC).
fn at(t: OffsetDateTime) -> String {
    rfc3339(t).unwrap_or_else(|| t.to_string())
}

// ------------------------------------------------------------------ public reasons (CONNACK)

/// The public reason of a station's refusal: the audit reason names both keys, this names
/// neither.
pub fn station_refused(reason: &DenyReason) -> String {
    match reason {
        DenyReason::Rejected => "station rejected by an operator".to_owned(),
        DenyReason::IdentityMismatch {
            presented: Some(_), ..
        } => "identity mismatch: not the key this station was accepted with".to_owned(),
        DenyReason::IdentityMismatch {
            presented: None, ..
        } => {
            "identity mismatch: this station was accepted with a key, and presented none".to_owned()
        }
    }
}

/// The public reason of a wrong or missing PAP, given the phone as that attempt left it: it
/// says when the attempt locked the phone out, or blocked it.
pub fn wrong_pap(phone: &Phone, now: OffsetDateTime) -> String {
    match phone.state_at(now) {
        AuthState::Failed { until } => {
            format!(
                "authentication failed: wrong PAP, locked until {}",
                at(until)
            )
        }
        AuthState::Blocked => {
            "authentication blocked: wrong PAP; Reset Authentication is needed".to_owned()
        }
        AuthState::Needed | AuthState::Successful => "wrong or missing PAP".to_owned(),
    }
}

/// The public reason of a phone refused without its PAP being checked: locked out, blocked,
/// or provisioned (it must use its certificate).
pub fn pap_not_checked(phone: &Phone, now: OffsetDateTime) -> String {
    match phone.state_at(now) {
        AuthState::Failed { until } => {
            format!("authentication failed: locked until {}", at(until))
        }
        AuthState::Blocked => "authentication blocked: Reset Authentication is needed".to_owned(),
        AuthState::Successful => {
            "phone is provisioned: it must connect with its certificate".to_owned()
        }
        AuthState::Needed => "not authorized".to_owned(),
    }
}

/// The public reason of a CONNECT refused because its address is blocked.
pub fn address_blocked(until: OffsetDateTime) -> String {
    format!(
        "address blocked until {}: too many failed authentications",
        at(until)
    )
}

// ------------------------------------------------------------------ states and rules

/// Why a station is in its state (`explain`'s `why`).
pub fn station_why(station: &Station, online: bool, now: OffsetDateTime) -> String {
    let key = station
        .fingerprint
        .map_or_else(|| "no key".to_owned(), |k| format!("key {k}"));
    let firmware = if station.firmware.is_empty() {
        "an unknown firmware".to_owned()
    } else {
        format!("firmware {}", station.firmware)
    };
    let mut why = match &station.standing {
        Standing::Unauthorized => {
            format!("it asked to be authorized with {firmware} and {key}; no operator has accepted or rejected it yet")
        }
        Standing::UpdateRequired => {
            format!("its {firmware} is older than 6.1.0: it must be updated before it can be authorized")
        }
        Standing::Updating { version, .. } => {
            format!("an update from {firmware} to {version} was started and has not finished")
        }
        Standing::Unsupported { reason } => format!("it cannot be authorized nor updated: {reason}"),
        Standing::Authorized if online => format!("it was accepted with {key} and is connected"),
        Standing::Authorized => format!("it was accepted with {key} and is not connected"),
        Standing::Rejected => {
            "an operator rejected it: it is refused, and its authorization requests ignored, until an operator clears it".to_owned()
        }
    };
    if let Some(mismatch) = recent_mismatch(station, now) {
        why.push_str(&format!(
            "; at {} a client with another key, or none, was refused for its identity",
            at(mismatch)
        ));
    }
    why
}

/// The station's last identity mismatch, if it is authorized and the mismatch is recent.
pub fn recent_mismatch(station: &Station, now: OffsetDateTime) -> Option<OffsetDateTime> {
    station
        .last_mismatch
        .filter(|m| station.standing == Standing::Authorized && *m + RECENT_MISMATCH > now)
}

/// The rule of the station manual that applies to a station in `state`; a recent identity
/// mismatch of an authorized station has its own.
pub fn station_rule(state: StationState, recent_mismatch: bool) -> &'static str {
    if recent_mismatch && matches!(state, StationState::Running | StationState::NotRunning) {
        return "Security Recommendations: a station whose authentication was deleted on its \
                local admin interface without removing it from the Manager first (or a clone) \
                presents another key. Remove the Station, then reboot it; it asks to be \
                authorized again.";
    }
    match state {
        StationState::Unauthorized => {
            "Authorize a Station: check the serial number and both MAC addresses, verify that \
             the fingerprint matches the one on the station's local admin interface, then \
             Accept it; Reject denies access and ignores all further authorization requests."
        }
        StationState::UpdateRequired => {
            "Update and Authorize a Station: firmware 6.0.2 to 6.0.7 must first be updated to \
             6.1.0 or higher with Start Update; the station reboots into the new version and \
             shows as Unauthorized."
        }
        StationState::Updating => {
            "Update and Authorize a Station: the station updates and reboots into the new \
             version; it then shows as Unauthorized, to be authorized."
        }
        StationState::Unsupported => {
            "Only firmware 6.0.2 to 6.0.7 can be updated by the Manager, and 6.1.0 or higher \
             authorized: this station can be neither until its firmware is one of those."
        }
        StationState::Running => {
            "Reset Authorization with the Manager: Reset Device with Delete Authentication \
             re-initiates the authorization of a Running station."
        }
        StationState::NotRunning => {
            "Reset Authorization with the Local Admin Interface: for a station that is Not \
             Running, Remove Device, then Reset Device with Delete Authentication on the \
             station itself."
        }
        StationState::Rejected => {
            "Reauthorize a Rejected Station: Clear it under Rejected Stations, then reboot the \
             station; it shows as Unauthorized."
        }
    }
}

/// Why a phone is in its authentication state (`explain`'s `why`).
pub fn phone_why(phone: &Phone, policy: &PhonePolicy, now: OffsetDateTime) -> String {
    let mut why = match phone.state_at(now) {
        AuthState::Needed => format!(
            "it has not authenticated yet; {} of {} wrong PAPs before a lockout, {} of {} \
             lockouts before the block",
            phone.failures, policy.pap_attempts, phone.lockouts, policy.lockouts_before_block
        ),
        AuthState::Failed { until } => format!(
            "{} wrong PAPs in a row locked it out until {} (lockout {} of {} before the block)",
            policy.pap_attempts,
            at(until),
            phone.lockouts,
            policy.lockouts_before_block
        ),
        AuthState::Blocked => format!(
            "{} lockouts without a success blocked it for good",
            phone.lockouts
        ),
        AuthState::Successful => {
            "it was fully provisioned and connects with its certificate".to_owned()
        }
    };
    if let Some(until) = phone.suspended_until.filter(|u| *u > now) {
        why.push_str(&format!(
            "; authentication is suspended until {}",
            at(until)
        ));
    }
    why
}

/// The rule of the phone manual that applies to a phone in `state`.
pub fn phone_rule(state: AuthState, suspended: bool) -> &'static str {
    if suspended && state != AuthState::Successful {
        return "Suspend Authentication: no authentication is required for this phone while \
                the suspension lasts.";
    }
    match state {
        AuthState::Needed => {
            "Authentication needed: the PAP is required unless the phone's public IP address is \
             whitelisted; three wrong PAPs in a row make it Authentication failed."
        }
        AuthState::Failed { .. } => {
            "Authentication failed: temporarily blocked, no PAP is accepted; it returns to \
             Authentication needed by itself after the lockout (30 minutes), or at once with \
             Reset Authentication."
        }
        AuthState::Blocked => {
            "Authentication blocked: permanently blocked from authentication after multiple \
             unsuccessful attempts; Reset Authentication (a new PAP) lets it authenticate again."
        }
        AuthState::Successful => {
            "Authentication successful: the PAP is no longer required. If the phone lost its \
             configuration or was reset to factory defaults, Reset Authentication must be \
             executed to get a new PAP."
        }
    }
}

/// What is known about an address, for its state and rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressStanding {
    /// Refused for failed authentications until then.
    Blocked { until: OffsetDateTime },
    /// On the tenant's permanent or temporary whitelist.
    Whitelisted,
    /// Neither.
    Open,
}

impl AddressStanding {
    /// The state's name and label, as `explain` writes them.
    pub fn name(self) -> (&'static str, &'static str) {
        match self {
            AddressStanding::Blocked { .. } => ("blocked", "Blocked"),
            AddressStanding::Whitelisted => ("whitelisted", "Whitelisted"),
            AddressStanding::Open => ("open", "Not blocked, not whitelisted"),
        }
    }

    /// Why the address is in its state; `failures` are the recent failed authentications
    /// from it, where the reader may know them (`None`: not said).
    pub fn why(self, failures: Option<u32>) -> String {
        match self {
            AddressStanding::Blocked { until } => format!(
                "too many failed authentications from it: every CONNECT from it is refused \
                 until {}",
                at(until)
            ),
            AddressStanding::Whitelisted => {
                "it is on the tenant's whitelist: phones connecting from it need no PAP".to_owned()
            }
            AddressStanding::Open => match failures {
                Some(failures) => format!(
                    "no block and no whitelist entry cover it ({failures} recent failed \
                     authentications)"
                ),
                None => "no block and no whitelist entry cover it".to_owned(),
            },
        }
    }

    /// The rule that applies.
    pub fn rule(self) -> &'static str {
        match self {
            AddressStanding::Blocked { .. } => {
                "Too many failed authentications from one address block it, for every device, \
                 until the block ends or an operator of tenant default lifts it."
            }
            AddressStanding::Whitelisted => {
                "IP Whitelisting: no PAP is required for provisioning requests from a whitelisted \
                 address (permanent until removed; temporary for 8 hours, extended by every \
                 successful provisioning)."
            }
            AddressStanding::Open => {
                "Authentication needed: phones connecting from an address that is not \
                 whitelisted must present their PAP."
            }
        }
    }
}

// ------------------------------------------------------------------ refusals from the audit

/// Whose refusals to pick from the audit log.
#[derive(Debug, Clone, Copy)]
pub enum RefusalsOf<'a> {
    /// A device's: records whose `device` is one of these names (its serial or MAC, and its
    /// client id, which refusals before identification name).
    Device(&'a [String]),
    /// An address's: records whose actor is that address (`ip` or `ip:port`).
    Address(IpAddr),
}

/// The actions of audit records that are a device's or an address's refusals: a refused
/// CONNECT, and a live session cut for another key when its station was accepted. (An
/// operator's refused command names its device too, but refused the operator.)
pub const REFUSAL_ACTIONS: [&str; 2] = ["connect", "identity_mismatch"];

/// The newest `max` refusals of `of` among `records` (oldest first, as the store reads them),
/// newest first.
pub fn refusals<'r>(
    records: &'r [AuditRecord],
    of: RefusalsOf<'_>,
    max: usize,
) -> Vec<&'r AuditRecord> {
    records
        .iter()
        .rev()
        .filter(|r| r.outcome == Outcome::Refused && REFUSAL_ACTIONS.contains(&r.action.as_str()))
        .filter(|r| match of {
            RefusalsOf::Device(names) => r
                .device
                .as_deref()
                .is_some_and(|d| names.iter().any(|n| n == d)),
            RefusalsOf::Address(ip) => actor_ip(&r.actor) == Some(ip),
        })
        .take(max)
        .collect()
}

/// The IP address of an audit actor written `ip`, `ip:port` or `[ipv6]:port`.
pub fn actor_ip(actor: &str) -> Option<IpAddr> {
    if let Ok(addr) = actor.parse::<std::net::SocketAddr>() {
        return Some(addr.ip().to_canonical());
    }
    actor.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::Pap;
    use fleet_protocol::{Fingerprint, Mac, Serial};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2026-01-05 10:00:00 UTC);

    fn station(standing: Standing) -> Station {
        Station {
            serial: Serial::parse("ST-1").unwrap(),
            model: "MC".into(),
            firmware: "6.1.0".into(),
            mac_streaming: String::new(),
            mac_control: String::new(),
            fingerprint: Some(Fingerprint::from_bytes([1; 32])),
            standing,
            created_at: T0,
            updated_at: T0,
            last_seen: None,
            ip: None,
            tenant: "default".into(),
            last_mismatch: None,
        }
    }

    fn phone(auth: AuthState) -> Phone {
        let mut p = Phone::new(
            Mac::parse("aabbccddeeff").unwrap(),
            "default".into(),
            "v".into(),
            "t".into(),
            String::new(),
            Pap::parse("123456").unwrap(),
            T0,
        );
        p.auth = auth;
        p
    }

    #[test]
    fn public_reasons_name_no_key_and_no_pap() {
        let pinned = Fingerprint::from_bytes([1; 32]);
        let other = Fingerprint::from_bytes([2; 32]);
        let mismatch = DenyReason::IdentityMismatch {
            pinned,
            presented: Some(other),
        };
        let public = station_refused(&mismatch);
        assert!(public.starts_with("identity mismatch"), "{public}");
        // The audit reason names both keys; the public one neither.
        assert!(mismatch.to_string().contains(&pinned.to_string()));
        for key in [pinned, other] {
            assert!(!public.contains(&key.to_string()[..8]), "{public}");
        }
        assert_eq!(
            station_refused(&DenyReason::Rejected),
            "station rejected by an operator"
        );
        let until = T0 + Duration::minutes(30);
        let locked = phone(AuthState::Failed { until });
        assert_eq!(
            wrong_pap(&locked, T0),
            "authentication failed: wrong PAP, locked until 2026-01-05T10:30:00Z"
        );
        assert!(!wrong_pap(&locked, T0).contains("123456"));
        // Once the lockout is over the phone is Needed again.
        assert_eq!(wrong_pap(&locked, until), "wrong or missing PAP");
        assert_eq!(
            pap_not_checked(&phone(AuthState::Blocked), T0),
            "authentication blocked: Reset Authentication is needed"
        );
        assert!(pap_not_checked(&phone(AuthState::Successful), T0).contains("certificate"));
        assert_eq!(
            address_blocked(until),
            "address blocked until 2026-01-05T10:30:00Z: too many failed authentications"
        );
    }

    #[test]
    fn every_station_state_has_its_own_rule() {
        let rules: std::collections::HashSet<_> = StationState::ALL
            .iter()
            .map(|s| station_rule(*s, false))
            .collect();
        assert_eq!(rules.len(), StationState::ALL.len());
        assert!(station_rule(StationState::Rejected, false).starts_with("Reauthorize"));
        // A recent mismatch changes the rule of an authorized station only.
        assert!(station_rule(StationState::NotRunning, true).contains("Remove the Station"));
        assert_eq!(
            station_rule(StationState::Rejected, true),
            station_rule(StationState::Rejected, false)
        );
    }

    #[test]
    fn a_mismatch_is_recent_for_a_day_and_only_while_authorized() {
        let mut s = station(Standing::Authorized);
        assert_eq!(recent_mismatch(&s, T0), None);
        s.last_mismatch = Some(T0);
        assert_eq!(recent_mismatch(&s, T0 + Duration::hours(23)), Some(T0));
        assert_eq!(recent_mismatch(&s, T0 + Duration::hours(24)), None);
        assert!(station_why(&s, false, T0).contains("refused for its identity"));
        s.standing = Standing::Rejected;
        assert_eq!(recent_mismatch(&s, T0), None);
        assert!(station_why(&s, false, T0).starts_with("an operator rejected it"));
    }

    #[test]
    fn a_phone_says_how_far_it_is_towards_a_lockout() {
        let policy = PhonePolicy::default();
        let mut p = phone(AuthState::Needed);
        p.failures = 2;
        let why = phone_why(&p, &policy, T0);
        assert!(why.contains("2 of 3 wrong PAPs"), "{why}");
        let until = T0 + Duration::minutes(30);
        let failed = phone(AuthState::Failed { until });
        assert!(phone_why(&failed, &policy, T0).contains("until 2026-01-05T10:30:00Z"));
        assert!(phone_rule(failed.state_at(T0), false).starts_with("Authentication failed"));
        assert!(phone_rule(AuthState::Blocked, false).contains("Reset Authentication"));
        assert!(phone_rule(AuthState::Blocked, true).starts_with("Suspend"));
        assert!(phone_rule(AuthState::Successful, true).starts_with("Authentication successful"));
    }

    fn record(device: Option<&str>, actor: &str, outcome: Outcome, reason: &str) -> AuditRecord {
        AuditRecord::new(
            T0,
            "default",
            actor,
            device.map(str::to_owned),
            "connect",
            outcome,
            Some(reason.to_owned()),
        )
    }

    #[test]
    fn refusals_are_the_newest_of_the_subject() {
        let client_id = Serial::parse("ST-1").unwrap().client_id();
        let records = vec![
            record(Some("ST-1"), "192.0.2.1:5000", Outcome::Refused, "first"),
            record(Some("ST-1"), "192.0.2.1:5001", Outcome::Ok, "admitted"),
            record(Some("ST-2"), "192.0.2.9:5002", Outcome::Refused, "other"),
            record(
                Some(&client_id),
                "192.0.2.1:5003",
                Outcome::Refused,
                "second",
            ),
            record(
                Some("ST-1"),
                "[2001:db8::1]:5004",
                Outcome::Refused,
                "third",
            ),
            // An operator's command refused: not the station's refusal.
            AuditRecord {
                action: "acceptStation".into(),
                ..record(Some("ST-1"), "admin", Outcome::Refused, "wrong_state")
            },
        ];
        let serial = Serial::parse("ST-1").unwrap();
        let names = [serial.to_string(), serial.client_id()];
        let reasons = |picked: Vec<&AuditRecord>| -> Vec<String> {
            picked.iter().filter_map(|r| r.reason.clone()).collect()
        };
        assert_eq!(
            reasons(refusals(&records, RefusalsOf::Device(&names), 10)),
            ["third", "second", "first"]
        );
        assert_eq!(
            reasons(refusals(&records, RefusalsOf::Device(&names), 2)),
            ["third", "second"]
        );
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            reasons(refusals(&records, RefusalsOf::Address(ip), 10)),
            ["second", "first"]
        );
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            reasons(refusals(&records, RefusalsOf::Address(v6), 10)),
            ["third"]
        );
        assert_eq!(actor_ip("admin"), None);
        assert_eq!(actor_ip("::ffff:192.0.2.1"), Some(ip));
    }

    #[test]
    fn an_address_says_what_covers_it() {
        let until = T0 + Duration::minutes(15);
        let blocked = AddressStanding::Blocked { until };
        assert_eq!(blocked.name(), ("blocked", "Blocked"));
        assert!(blocked
            .why(Some(20))
            .contains("refused until 2026-01-05T10:15:00Z"));
        assert!(AddressStanding::Whitelisted
            .rule()
            .starts_with("IP Whitelisting"));
        assert_ne!(AddressStanding::Open.rule(), blocked.rule());
    }
}
