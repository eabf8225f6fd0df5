//! Audit records (PROTOCOL §7): who did what to which device, when, and how it ended; and the
//! per-tenant hash chain that makes a removed or edited record detectable.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The `prev_hash` of a tenant's first chained record: 64 zeros.
pub const GENESIS_PREV_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// The first field of every hashed message, so that no other SHA-256 use can collide with it.
const HASH_DOMAIN: &str = "fleetgate-audit-v1";

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
    /// `hash` of the tenant's previous record; [`GENESIS_PREV_HASH`] for its first. Empty only in
    /// records stored before the chain existed (hence the default) and in unstored ones.
    #[serde(default)]
    pub prev_hash: String,
    /// [`record_hash`] of this record, 64 lowercase hex digits, assigned by the store.
    #[serde(default)]
    pub hash: String,
}

impl AuditRecord {
    /// A record not yet stored (`seq` 0, hashes empty; the store assigns them).
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
            prev_hash: String::new(),
            hash: String::new(),
        }
    }
}

/// The chain hash of `record`, as 64 lowercase hex digits; covers every field but `hash`.
///
/// It is SHA-256 over this byte string, where `str(s)` is the length of the UTF-8 bytes of `s`
/// as 8 bytes big-endian followed by those bytes, `u64(n)` is `n` as 8 bytes big-endian, and
/// `opt(x)` is the single byte `0x00` when `x` is null or absent, else `0x01` followed by
/// `str(x)`:
///
/// ```text
/// str("fleetgate-audit-v1") u64(seq) str(time) str(tenant) str(actor) opt(device)
/// str(action) str(outcome) opt(reason) str(prev_hash)
/// ```
///
/// Every string is exactly as in the record's JSON (PROTOCOL §6, §7): `time` is the RFC 3339
/// text the controller writes (`2024-05-01T10:00:00Z`), `outcome` is `ok`, `refused` or
/// `error`, `prev_hash` is 64 lowercase hex digits. A program that has a record's JSON can thus
/// recompute its hash without parsing the time.
///
/// A time that RFC 3339 cannot express (an offset with seconds, a year past 9999) is hashed as
/// the empty string; such a record cannot be written as JSON, so the store refuses it anyway.
pub fn record_hash(record: &AuditRecord) -> String {
    let time = record.time.format(&Rfc3339).unwrap_or_default();
    let mut hasher = Sha256::new();
    string(&mut hasher, HASH_DOMAIN);
    hasher.update(record.seq.to_be_bytes());
    string(&mut hasher, &time);
    string(&mut hasher, &record.tenant);
    string(&mut hasher, &record.actor);
    optional(&mut hasher, record.device.as_deref());
    string(&mut hasher, &record.action);
    string(&mut hasher, record.outcome.as_str());
    optional(&mut hasher, record.reason.as_deref());
    string(&mut hasher, &record.prev_hash);
    hex::encode(hasher.finalize())
}

/// `str(s)` of [`record_hash`].
fn string(hasher: &mut Sha256, s: &str) {
    hasher.update((s.len() as u64).to_be_bytes());
    hasher.update(s.as_bytes());
}

/// `opt(x)` of [`record_hash`].
fn optional(hasher: &mut Sha256, value: Option<&str>) {
    match value {
        None => hasher.update([0]),
        Some(s) => {
            hasher.update([1]);
            string(hasher, s);
        }
    }
}

/// Where and why a tenant's audit chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {problem}")]
pub struct ChainBreak {
    /// The first record that does not fit.
    pub seq: u64,
    pub problem: String,
}

/// Checks that `records`, one tenant's in ascending `seq` order, form an unbroken chain: each
/// `hash` is [`record_hash`] of its record and each `prev_hash` is the previous record's `hash`.
///
/// The first record's `prev_hash` must be `expected_first_prev` when given (the `hash` of the
/// record before the list, which the caller knows from elsewhere), else [`GENESIS_PREV_HASH`]:
/// without it, the list must start at the tenant's first record. A leading run of records
/// without hashes (stored before the chain existed) is skipped; the chain starts after them.
pub fn verify_chain(
    records: &[AuditRecord],
    expected_first_prev: Option<&str>,
) -> Result<(), ChainBreak> {
    let unchained = records
        .iter()
        .take_while(|r| r.hash.is_empty() && r.prev_hash.is_empty())
        .count();
    let mut expected_prev = expected_first_prev.unwrap_or(GENESIS_PREV_HASH);
    let mut last_seq: Option<u64> = None;
    for record in &records[unchained..] {
        let broken = |problem: String| ChainBreak {
            seq: record.seq,
            problem,
        };
        if record.hash != record_hash(record) {
            return Err(broken(if record.hash.is_empty() {
                "the record has no hash".to_owned()
            } else {
                "the record does not match its hash (edited)".to_owned()
            }));
        }
        if record.prev_hash != expected_prev {
            return Err(broken(match last_seq {
                Some(seq) => format!(
                    "prev_hash is not the hash of the record before it (seq {seq}): \
                     a record is missing or out of order"
                ),
                None if expected_first_prev.is_some() => {
                    "prev_hash is not the expected one: records before it are missing".to_owned()
                }
                None => "prev_hash is not that of a first record: records before it are missing"
                    .to_owned(),
            }));
        }
        if let Some(seq) = last_seq.filter(|&seq| seq >= record.seq) {
            return Err(broken(format!("seq does not follow seq {seq}")));
        }
        expected_prev = &record.hash;
        last_seq = Some(record.seq);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    /// Hashes computed by a separate program (Python's hashlib over the encoding documented at
    /// [`record_hash`]); fleet-ctl's tests hold the same vectors.
    const VECTOR_FIRST: &str = "ae8be7224381edcf8f0ce3b11b9d5365a9d492d088d05f5d23c1d0b7e73b3c41";
    const VECTOR_SECOND: &str = "923f66dc5a2d97671ab31055e994590f3d56770fdb29e2004e392d23c21e60b4";

    /// An operator's refused `rejectStation`, the first test vector's record.
    fn refused_reject() -> AuditRecord {
        AuditRecord::new(
            datetime!(2024-05-01 12:00:00 +02:00),
            "default",
            "admin",
            Some("S1".into()),
            "rejectStation",
            Outcome::Refused,
            Some("station S1 is Rejected already".into()),
        )
    }

    fn vector_records() -> [AuditRecord; 2] {
        let mut first = refused_reject();
        first.seq = 42;
        first.prev_hash = GENESIS_PREV_HASH.into();
        first.hash = record_hash(&first);
        let mut second = AuditRecord::new(
            datetime!(2024-05-01 10:00:00.25 UTC),
            "default",
            "controller",
            None,
            "connect",
            Outcome::Ok,
            Some("café ✓".into()),
        );
        second.seq = 43;
        second.prev_hash = first.hash.clone();
        second.hash = record_hash(&second);
        [first, second]
    }

    #[test]
    fn record_hash_matches_the_documented_encoding() {
        let [first, second] = vector_records();
        assert_eq!(first.hash, VECTOR_FIRST);
        assert_eq!(second.hash, VECTOR_SECOND);
        assert_eq!(
            serde_json::to_value(&second).unwrap()["time"],
            "2024-05-01T10:00:00.25Z"
        );
    }

    #[test]
    fn fleet_ctl_computes_the_same_hashes_from_json() {
        for record in vector_records().into_iter().chain(chain(6)) {
            let json = serde_json::to_value(&record).unwrap();
            assert_eq!(
                fleet_ctl::audit::record_hash(&json).unwrap(),
                record_hash(&record)
            );
        }
    }

    #[test]
    fn field_boundaries_and_absence_are_unambiguous() {
        let [base, _] = vector_records();
        let moved = AuditRecord {
            tenant: "defaulta".into(),
            actor: "dmin".into(),
            ..base.clone()
        };
        assert_ne!(record_hash(&moved), record_hash(&base));
        let none = AuditRecord {
            device: None,
            ..base.clone()
        };
        let empty = AuditRecord {
            device: Some(String::new()),
            ..base.clone()
        };
        assert_ne!(record_hash(&none), record_hash(&empty));
        // `hash` itself is not covered.
        let rehashed = AuditRecord {
            hash: "x".into(),
            ..base.clone()
        };
        assert_eq!(record_hash(&rehashed), record_hash(&base));
    }

    /// `n` chained records of tenant `default`, seqs 10, 13, 16, … (another tenant's records sit
    /// in the gaps), as the store would write them.
    fn chain(n: usize) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        for i in 0..n {
            let mut record = AuditRecord::new(
                datetime!(2024-05-01 10:00:00 UTC) + time::Duration::minutes(i as i64),
                "default",
                "admin",
                (i % 2 == 0).then(|| format!("S{i}")),
                format!("action{i}"),
                Outcome::Ok,
                (i % 3 == 0).then(|| format!("reason {i}")),
            );
            record.seq = 10 + 3 * i as u64;
            record.prev_hash = records
                .last()
                .map_or(GENESIS_PREV_HASH.to_owned(), |r| r.hash.clone());
            record.hash = record_hash(&record);
            records.push(record);
        }
        records
    }

    fn break_seq(records: &[AuditRecord], expected_first_prev: Option<&str>) -> Option<u64> {
        verify_chain(records, expected_first_prev)
            .err()
            .map(|b| b.seq)
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let records = chain(6);
        assert_eq!(verify_chain(&records, None), Ok(()));
        assert_eq!(verify_chain(&records, Some(GENESIS_PREV_HASH)), Ok(()));
        assert_eq!(verify_chain(&[], None), Ok(()));
        assert_eq!(verify_chain(&records[2..], Some(&records[1].hash)), Ok(()));
    }

    #[test]
    fn an_edit_of_any_field_is_detected_at_that_record() {
        type Edit = fn(&mut AuditRecord);
        let edits: Vec<(&str, Edit)> = vec![
            ("seq", |r| r.seq += 1),
            ("time", |r| r.time += time::Duration::seconds(1)),
            ("tenant", |r| r.tenant = "other".into()),
            ("actor", |r| r.actor = "mallory".into()),
            ("device", |r| r.device = Some("S9".into())),
            ("device absent", |r| r.device = None),
            ("action", |r| r.action = "acceptStation".into()),
            ("outcome", |r| r.outcome = Outcome::Refused),
            ("reason", |r| r.reason = Some("nothing to see".into())),
            ("prev_hash", |r| r.prev_hash = "1".repeat(64)),
            ("hash", |r| r.hash = "2".repeat(64)),
        ];
        for (field, edit) in edits {
            let mut records = chain(6);
            edit(&mut records[2]);
            let problem = verify_chain(&records, None).unwrap_err();
            // The record is reported under the seq it now has.
            assert_eq!(problem.seq, records[2].seq, "{field}: {problem}");
            assert!((16..=17).contains(&problem.seq), "{field}: {problem}");
            assert!(problem.problem.contains("edited"), "{field}: {problem}");
        }
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_is_detected_at_the_next_record() {
        let mut records = chain(6);
        records[2].actor = "mallory".into();
        records[2].hash = record_hash(&records[2]);
        assert_eq!(break_seq(&records, None), Some(19));
    }

    #[test]
    fn a_removed_record_is_detected_at_the_one_after_it() {
        let mut records = chain(6);
        records.remove(3);
        let problem = verify_chain(&records, None).unwrap_err();
        assert_eq!(problem.seq, 22);
        assert!(problem.problem.contains("seq 16"), "{problem}");
        // The last one removed is only seen by who knows the head (the store does).
        let mut records = chain(6);
        let head = records.pop().unwrap();
        assert_eq!(verify_chain(&records, None), Ok(()));
        assert_ne!(records.last().unwrap().hash, head.hash);
    }

    #[test]
    fn reordered_records_are_detected() {
        let mut records = chain(6);
        records.swap(2, 3);
        assert_eq!(break_seq(&records, None), Some(19));
        let mut records = chain(6);
        records.reverse();
        assert_eq!(break_seq(&records, None), Some(25));
    }

    #[test]
    fn a_truncated_head_is_detected() {
        let records = chain(6);
        // Without an expected prev, a list must start at the tenant's first record.
        assert_eq!(break_seq(&records[1..], None), Some(13));
        // With one, it must start right after the record that has it.
        assert_eq!(break_seq(&records[3..], Some(&records[1].hash)), Some(19));
        assert_eq!(break_seq(&records, Some(&records[1].hash)), Some(10));
    }

    #[test]
    fn records_from_before_the_chain_are_skipped_only_at_the_start() {
        let legacy = |seq: u64| AuditRecord {
            seq,
            ..AuditRecord::new(
                datetime!(2024-01-01 00:00:00 UTC),
                "default",
                "admin",
                None,
                "old",
                Outcome::Ok,
                None,
            )
        };
        let mut records = vec![legacy(1), legacy(2)];
        records.extend(chain(3));
        assert_eq!(verify_chain(&records, None), Ok(()));
        records.push(legacy(99));
        let problem = verify_chain(&records, None).unwrap_err();
        assert_eq!(problem.seq, 99);
        assert!(problem.problem.contains("no hash"), "{problem}");
    }

    #[test]
    fn records_from_before_the_chain_still_decode() {
        let json = serde_json::json!({
            "seq": 3, "time": "2024-05-01T10:00:00Z", "tenant": "default", "actor": "admin",
            "device": null, "action": "x", "outcome": "ok", "reason": null,
        });
        let record: AuditRecord = serde_json::from_value(json).unwrap();
        assert_eq!((record.prev_hash.as_str(), record.hash.as_str()), ("", ""));
    }

    #[test]
    fn json_has_rfc3339_time_and_outcome_names() {
        let record = refused_reject();
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
