//! Audit records (PROTOCOL §7): who did what to which device, when, and how it ended.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done as asked.
    Ok,
    /// Refused by a rule: a denied CONNECT, a command in the wrong state, a forbidden request.
    Refused,
    /// Something went wrong while doing it.
    Error,
}

impl Outcome {
    /// The JSON name: `ok`, `refused` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }
}

/// One audited action, as kept in the store and published on `fleet/events/<tenant>/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the audit log, assigned by the store; 0 until stored.
    pub seq: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    pub tenant: String,
    /// Operator name, `controller` for the controller's own decisions, or the device itself.
    pub actor: String,
    /// Serial or MAC of the device concerned, if any.
    pub device: Option<String>,
    /// What was done: an operator command name, `connect`, a state change.
    pub action: String,
    pub outcome: Outcome,
    pub reason: Option<String>,
}

impl AuditRecord {
    /// A record not yet stored (`seq` 0; the store assigns it).
    pub fn new(
        time: OffsetDateTime,
        tenant: impl Into<String>,
        actor: impl Into<String>,
        device: Option<String>,
        action: impl Into<String>,
        outcome: Outcome,
        reason: Option<String>,
    ) -> AuditRecord {
        AuditRecord {
            seq: 0,
            // RFC 3339 in UTC, as PROTOCOL §6 wants all times.
            time: time.to_offset(time::UtcOffset::UTC),
            tenant: tenant.into(),
            actor: actor.into(),
            device,
            action: action.into(),
            outcome,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn json_has_rfc3339_time_and_outcome_names() {
        let record = AuditRecord::new(
            datetime!(2024-05-01 12:00:00 +02:00),
            "default",
            "admin",
            Some("S1".into()),
            "rejectStation",
            Outcome::Refused,
            Some("station S1 is Rejected already".into()),
        );
        let json = serde_json::to_value(&record).unwrap();
        assert_eq!(json["seq"], 0);
        assert_eq!(json["time"], "2024-05-01T10:00:00Z");
        assert_eq!(json["outcome"], "refused");
        assert_eq!(json["device"], "S1");
        let back: AuditRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, record);
        for outcome in [Outcome::Ok, Outcome::Refused, Outcome::Error] {
            assert_eq!(
                serde_json::to_value(outcome).unwrap(),
                serde_json::json!(outcome.as_str())
            );
        }
    }
}
