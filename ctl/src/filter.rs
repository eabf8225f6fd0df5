//! What `fleetctl` filters lists by: states by the manual's labels or their JSON names, and the
//! client-side filters of phones and audit records (the controller filters only stations by
//! state, PROTOCOL §6; everything else is matched here, page by page).

use fleet_protocol::command::CommandName;
use fleet_protocol::{PhoneState, StationState};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};

/// A state name as people may type it: case, spaces, `_` and `-` do not matter.
fn squeezed(text: &str) -> String {
    text.chars()
        .filter(|c| !(c.is_whitespace() || matches!(c, '_' | '-')))
        .flat_map(char::to_lowercase)
        .collect()
}

/// A station state by its label ("Not Running") or its JSON name (`not_running`), in any case.
/// A wrong one is refused with the list of the valid labels.
pub fn station_state(text: &str) -> Result<StationState, String> {
    let wanted = squeezed(text);
    StationState::ALL
        .into_iter()
        .find(|state| squeezed(state.label()) == wanted || squeezed(state.as_str()) == wanted)
        .ok_or_else(|| {
            let labels: Vec<&str> = StationState::ALL.iter().map(|s| s.label()).collect();
            format!(
                "unknown station state {text:?}: one of {} (case does not matter)",
                quoted(&labels)
            )
        })
}

/// A phone state by its label ("Authentication failed (temporarily blocked)"), its JSON name
/// (`authentication_failed`), or the label's word after "Authentication" (`failed`).
pub fn phone_state(text: &str) -> Result<PhoneState, String> {
    let wanted = squeezed(text);
    PhoneState::ALL
        .into_iter()
        .find(|state| {
            let short = squeezed(state.as_str().trim_start_matches("authentication_"));
            squeezed(state.label()) == wanted
                || squeezed(state.as_str()) == wanted
                || short == wanted
        })
        .ok_or_else(|| {
            let labels: Vec<&str> = PhoneState::ALL.iter().map(|s| s.label()).collect();
            format!(
                "unknown phone state {text:?}: one of {}, or just needed, failed, blocked or \
                 successful (case does not matter)",
                quoted(&labels)
            )
        })
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|name| format!("\"{name}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Text fields compare without regard to case or surrounding spaces.
fn same(field: Option<&Value>, wanted: &str) -> bool {
    field
        .and_then(Value::as_str)
        .is_some_and(|value| value.trim().eq_ignore_ascii_case(wanted.trim()))
}

/// The phones `phones list` shows; every given part must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PhoneFilter {
    pub state: Option<PhoneState>,
    /// The site, in any case.
    pub site: Option<String>,
    /// The vendor, in any case.
    pub vendor: Option<String>,
}

impl PhoneFilter {
    /// Whether it lets every phone through.
    pub fn is_empty(&self) -> bool {
        *self == PhoneFilter::default()
    }

    /// Whether `phone` (a phone object, PROTOCOL §5) passes.
    pub fn matches(&self, phone: &Value) -> bool {
        self.state
            .is_none_or(|state| same(phone.get("auth_state"), state.as_str()))
            && self
                .site
                .as_deref()
                .is_none_or(|site| same(phone.get("site"), site))
            && self
                .vendor
                .as_deref()
                .is_none_or(|vendor| same(phone.get("vendor"), vendor))
    }
}

/// An audit `outcome` (PROTOCOL §7).
pub fn outcome(text: &str) -> Result<String, String> {
    let lower = text.trim().to_ascii_lowercase();
    match lower.as_str() {
        "ok" | "refused" | "error" => Ok(lower),
        _ => Err(format!(
            "unknown outcome {text:?}: one of \"ok\", \"refused\", \"error\""
        )),
    }
}

/// `--since`: an RFC 3339 time (`2026-05-01T10:00:00Z`) or a duration back from now: a number
/// and `s`, `m` (or `min`), `h` or `d`, e.g. `90s`, `15m`, `2h`, `7d`. Parsed first, turned into
/// a time with [`Since::at`] once there is a `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    At(OffsetDateTime),
    Back(Duration),
}

impl std::str::FromStr for Since {
    type Err = String;

    fn from_str(text: &str) -> Result<Since, String> {
        let text = text.trim();
        if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
            return Ok(Since::At(at));
        }
        let wrong = || {
            format!(
                "{text:?} is neither an RFC 3339 time (2026-05-01T10:00:00Z) nor a duration \
                 such as 90s, 15m, 2h or 7d"
            )
        };
        let digits = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(wrong)?;
        let count: i32 = text[..digits].parse().map_err(|_| wrong())?;
        let per = match text[digits..].trim() {
            "s" | "sec" => Duration::SECOND,
            "m" | "min" => Duration::MINUTE,
            "h" => Duration::HOUR,
            "d" => Duration::DAY,
            _ => return Err(wrong()),
        };
        per.checked_mul(count).map(Since::Back).ok_or_else(wrong)
    }
}

impl Since {
    /// The time it names, durations counted back from `now`.
    pub fn at(self, now: OffsetDateTime) -> OffsetDateTime {
        match self {
            Since::At(at) => at,
            Since::Back(back) => now.checked_sub(back).unwrap_or(OffsetDateTime::UNIX_EPOCH),
        }
    }
}

/// [`Since`] parsed and resolved against `now` at once.
pub fn since(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    text.parse::<Since>().map(|since| since.at(now))
}

/// The audit records `fleetctl audit` shows. Without `all`, an operator's own `connect`
/// records and the records of read-only commands (`list…`, `get…`, `export…`) are left out:
/// they are recorded, and `--all` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    pub all: bool,
    /// The device (serial or MAC; a MAC in any of its forms).
    pub device: Option<String>,
    /// The actor: an operator name, `station-<serial>`, an address…
    pub actor: Option<String>,
    /// The action, e.g. `acceptStation` or `connect`, in any case.
    pub action: Option<String>,
    /// `ok`, `refused` or `error`.
    pub outcome: Option<String>,
    /// Records from this time on.
    pub since: Option<OffsetDateTime>,
}

/// A device as compared: a MAC in any form as its 12 lower-case digits, a serial as it is.
fn device_key(text: &str) -> String {
    match fleet_protocol::command::arg::mac(text) {
        Ok(mac) => mac.as_str().to_owned(),
        Err(_) => text.trim().to_owned(),
    }
}

/// Whether `record` is an operator's admission: recorded, but noise in the log people read.
fn is_operator_connect(record: &Value) -> bool {
    same(record.get("action"), "connect")
        && same(record.get("outcome"), "ok")
        && record
            .get("reason")
            .and_then(Value::as_str)
            .is_some_and(|reason| reason.starts_with("admitted with operator rights"))
}

/// Whether `record` is of a command that only reads.
fn is_read_command(record: &Value) -> bool {
    record
        .get("action")
        .and_then(Value::as_str)
        .and_then(CommandName::parse)
        .is_some_and(CommandName::is_read)
}

impl AuditFilter {
    /// Whether `record` (PROTOCOL §7) is shown.
    pub fn matches(&self, record: &Value) -> bool {
        if !self.all && (is_operator_connect(record) || is_read_command(record)) {
            return false;
        }
        let device_ok = self.device.as_deref().is_none_or(|wanted| {
            record
                .get("device")
                .and_then(Value::as_str)
                .is_some_and(|device| device_key(device) == device_key(wanted))
        });
        let since_ok = self.since.is_none_or(|since| {
            record
                .get("time")
                .and_then(Value::as_str)
                .and_then(|time| OffsetDateTime::parse(time, &Rfc3339).ok())
                .is_some_and(|time| time >= since)
        });
        device_ok
            && since_ok
            && self
                .actor
                .as_deref()
                .is_none_or(|actor| same(record.get("actor"), actor))
            && self
                .action
                .as_deref()
                .is_none_or(|action| same(record.get("action"), action))
            && self
                .outcome
                .as_deref()
                .is_none_or(|outcome| same(record.get("outcome"), outcome))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    #[test]
    fn station_states_by_label_or_json_name_in_any_case() {
        assert_eq!(station_state("Not Running"), Ok(StationState::NotRunning));
        assert_eq!(station_state("not running"), Ok(StationState::NotRunning));
        assert_eq!(station_state("NOT_RUNNING"), Ok(StationState::NotRunning));
        assert_eq!(
            station_state("update-required"),
            Ok(StationState::UpdateRequired)
        );
        assert_eq!(
            station_state("Unauthorized"),
            Ok(StationState::Unauthorized)
        );
        let wrong = station_state("stopped").unwrap_err();
        assert!(wrong.contains("\"stopped\""), "{wrong}");
        for state in StationState::ALL {
            assert!(wrong.contains(state.label()), "{wrong}");
        }
    }

    #[test]
    fn phone_states_by_label_json_name_or_short_word() {
        assert_eq!(phone_state("failed"), Ok(PhoneState::Failed));
        assert_eq!(
            phone_state("Authentication blocked (permanently)"),
            Ok(PhoneState::Blocked)
        );
        assert_eq!(
            phone_state("authentication_successful"),
            Ok(PhoneState::Successful)
        );
        let wrong = phone_state("locked").unwrap_err();
        assert!(wrong.contains("Authentication needed"), "{wrong}");
    }

    #[test]
    fn phone_filter_takes_every_part() {
        let phone = json!({"mac": "aabbccddee01", "vendor": "Yealink", "site": "Berlin",
            "auth_state": "authentication_needed"});
        assert!(PhoneFilter::default().matches(&phone));
        let berlin = PhoneFilter {
            site: Some("berlin".into()),
            ..PhoneFilter::default()
        };
        assert!(berlin.matches(&phone));
        let snom_in_berlin = PhoneFilter {
            vendor: Some("Snom".into()),
            ..berlin.clone()
        };
        assert!(!snom_in_berlin.matches(&phone));
        let failed = PhoneFilter {
            state: Some(PhoneState::Failed),
            ..PhoneFilter::default()
        };
        assert!(!failed.matches(&phone));
        assert!(!berlin.matches(&json!({"mac": "aabbccddee02"})), "no site");
    }

    #[test]
    fn since_takes_a_time_or_a_duration_back() {
        let now = datetime!(2026-05-01 12:00:00 UTC);
        assert_eq!(since("2h", now), Ok(datetime!(2026-05-01 10:00:00 UTC)));
        assert_eq!(since("90s", now), Ok(datetime!(2026-05-01 11:58:30 UTC)));
        assert_eq!(since("15min", now), Ok(datetime!(2026-05-01 11:45:00 UTC)));
        assert_eq!(since("7d", now), Ok(datetime!(2026-04-24 12:00:00 UTC)));
        assert_eq!(
            since("2026-04-30T08:00:00+02:00", now),
            Ok(datetime!(2026-04-30 06:00:00 UTC))
        );
        for wrong in ["", "2", "h", "2 weeks", "-2h", "yesterday", "99999999999d"] {
            assert!(since(wrong, now).is_err(), "{wrong:?}");
        }
    }

    fn record(action: &str, outcome: &str, reason: &str) -> Value {
        json!({"seq": 1, "time": "2026-05-01T10:00:00Z", "tenant": "default",
            "actor": "admin", "device": "aabbccddee01", "action": action,
            "outcome": outcome, "reason": reason})
    }

    #[test]
    fn audit_hides_operator_connects_and_reads_unless_all() {
        let connect = record("connect", "ok", "admitted with operator rights");
        let station_connect = record("connect", "ok", "admitted with pending rights");
        let refused = record("connect", "refused", "unknown client");
        let list = record("listPhones", "ok", "");
        let accept = record("acceptStation", "ok", "");
        let default = AuditFilter::default();
        assert!(!default.matches(&connect));
        assert!(!default.matches(&list));
        assert!(default.matches(&station_connect));
        assert!(default.matches(&refused));
        assert!(default.matches(&accept));
        let all = AuditFilter {
            all: true,
            ..AuditFilter::default()
        };
        assert!(all.matches(&connect) && all.matches(&list));
    }

    #[test]
    fn audit_filters_by_device_actor_action_outcome_and_time() {
        let accept = record("acceptStation", "ok", "");
        let by = |filter: AuditFilter| filter.matches(&accept);
        let device = |d: &str| AuditFilter {
            device: Some(d.into()),
            ..AuditFilter::default()
        };
        assert!(by(device("AA:BB:CC:DD:EE:01")));
        assert!(!by(device("ST-1")));
        assert!(by(AuditFilter {
            actor: Some("Admin".into()),
            action: Some("acceptstation".into()),
            outcome: Some("ok".into()),
            ..AuditFilter::default()
        }));
        assert!(!by(AuditFilter {
            outcome: Some("refused".into()),
            ..AuditFilter::default()
        }));
        assert!(by(AuditFilter {
            since: Some(datetime!(2026-05-01 10:00:00 UTC)),
            ..AuditFilter::default()
        }));
        assert!(!by(AuditFilter {
            since: Some(datetime!(2026-05-01 10:00:01 UTC)),
            ..AuditFilter::default()
        }));
        assert_eq!(outcome(" Refused"), Ok("refused".into()));
        assert!(outcome("failed").is_err());
    }
}
