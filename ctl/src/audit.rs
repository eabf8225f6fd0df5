//! The audit log's hash chain as fleetctl checks it: the controller's record hash, recomputed
//! from a record's JSON, so that checking needs nothing of the controller but its answers.

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// The `prev_hash` of a tenant's first chained record: 64 zeros.
pub const GENESIS_PREV_HASH: &str =
    "0000000000000000000000000000000000000000000000000000000000000000";

/// The first field of every hashed message.
const HASH_DOMAIN: &str = "fleetgate-audit-v1";

/// An audit record whose JSON lacks a field the hash covers, or has one of the wrong type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed audit record: {0}")]
pub struct MalformedRecord(pub String);

/// The chain hash of an audit record given as JSON (PROTOCOL §7), as 64 lowercase hex digits.
///
/// SHA-256 over `str("fleetgate-audit-v1") u64(seq) str(time) str(tenant) str(actor)
/// opt(device) str(action) str(outcome) opt(reason) str(prev_hash)`, where `str(s)` is the
/// length of the UTF-8 bytes of `s` as 8 bytes big-endian followed by those bytes, `u64(n)` is
/// `n` as 8 bytes big-endian, and `opt(x)` is `0x00` when `x` is null or absent, else `0x01`
/// followed by `str(x)`. The strings are taken from the JSON as they are; a missing `prev_hash`
/// counts as empty. The controller's `fleet_controller::audit::record_hash` is the same function
/// over its own record type; the tests of both hold the same vectors.
pub fn record_hash(record: &Value) -> Result<String, MalformedRecord> {
    let seq = record
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| MalformedRecord("\"seq\" is not an unsigned integer".into()))?;
    let mut hasher = Sha256::new();
    string(&mut hasher, HASH_DOMAIN);
    hasher.update(seq.to_be_bytes());
    for field in ["time", "tenant", "actor"] {
        string(&mut hasher, required(record, field)?);
    }
    optional(&mut hasher, record, "device")?;
    for field in ["action", "outcome"] {
        string(&mut hasher, required(record, field)?);
    }
    optional(&mut hasher, record, "reason")?;
    string(&mut hasher, text_or_empty(record, "prev_hash")?);
    Ok(hex::encode(hasher.finalize()))
}

fn required<'a>(record: &'a Value, field: &str) -> Result<&'a str, MalformedRecord> {
    record
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| MalformedRecord(format!("{field:?} is not a string")))
}

/// A string field that records from before the chain do not have.
fn text_or_empty<'a>(record: &'a Value, field: &str) -> Result<&'a str, MalformedRecord> {
    match record.get(field) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(MalformedRecord(format!("{field:?} is not a string"))),
    }
}

/// `str(s)` of [`record_hash`].
fn string(hasher: &mut Sha256, s: &str) {
    hasher.update((s.len() as u64).to_be_bytes());
    hasher.update(s.as_bytes());
}

/// `opt(x)` of [`record_hash`].
fn optional(hasher: &mut Sha256, record: &Value, field: &str) -> Result<(), MalformedRecord> {
    match record.get(field) {
        None | Some(Value::Null) => hasher.update([0]),
        Some(Value::String(s)) => {
            hasher.update([1]);
            string(hasher, s);
        }
        Some(_) => return Err(MalformedRecord(format!("{field:?} is not a string"))),
    }
    Ok(())
}

/// The newest record of an operator's chain as `fleetctl audit head` prints it, `SEQ:HASH`,
/// to be kept elsewhere and given to `fleetctl audit verify --head` later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    /// 64 lower-case hex digits.
    pub hash: String,
}

impl Head {
    /// The head of a chained record; `None` for a record without `seq` or `hash`.
    pub fn of(record: &Value) -> Option<Head> {
        let seq = record.get("seq").and_then(Value::as_u64)?;
        let hash = record.get("hash").and_then(Value::as_str)?;
        (!hash.is_empty()).then(|| Head {
            seq,
            hash: hash.to_owned(),
        })
    }
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.seq, self.hash)
    }
}

impl std::str::FromStr for Head {
    type Err = String;

    /// `SEQ:HASH`, the hash in either case.
    fn from_str(text: &str) -> Result<Head, String> {
        let wrong = || {
            format!(
                "{text:?} is not a head as `fleetctl audit head` prints it: SEQ:HASH, e.g. \
                 42:{}",
                "ab".repeat(32)
            )
        };
        let (seq, hash) = text.trim().split_once(':').ok_or_else(wrong)?;
        let seq = seq.parse().map_err(|_| wrong())?;
        if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(wrong());
        }
        Ok(Head {
            seq,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

/// Where and why a tenant's audit chain does not hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at seq {seq}: {problem}")]
pub struct ChainBreak {
    /// The first record that does not fit (0 if that record has no seq at all).
    pub seq: u64,
    pub problem: String,
}

/// Checks one tenant's audit records, fed in ascending `seq` order a page at a time, against
/// the chain: each `hash` is [`record_hash`] of its record and each `prev_hash` the `hash` of
/// the record before. A leading run of records without hashes (stored before the chain
/// existed) is counted but not covered.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    /// What the next chained record's `prev_hash` must be.
    expected_prev: String,
    /// Whether a start other than the tenant's first record was given.
    anchored: bool,
    last_seq: Option<u64>,
    chained: u64,
    unchained: u64,
}

impl ChainVerifier {
    /// A verifier for a list that starts at the tenant's first record (`None`), or right after
    /// the record whose `hash` is `expected_first_prev`.
    pub fn new(expected_first_prev: Option<&str>) -> ChainVerifier {
        ChainVerifier {
            expected_prev: expected_first_prev.unwrap_or(GENESIS_PREV_HASH).to_owned(),
            anchored: expected_first_prev.is_some(),
            last_seq: None,
            chained: 0,
            unchained: 0,
        }
    }

    /// Checks the next record. After a break the verifier's state is unspecified.
    pub fn push(&mut self, record: &Value) -> Result<(), ChainBreak> {
        let Some(seq) = record.get("seq").and_then(Value::as_u64) else {
            return Err(ChainBreak {
                seq: 0,
                problem: match self.last_seq {
                    Some(last) => format!("the record after seq {last} has no valid seq"),
                    None => "the first record has no valid seq".to_owned(),
                },
            });
        };
        let broken = |problem: String| ChainBreak { seq, problem };
        let hash = text_or_empty(record, "hash").map_err(|e| broken(e.to_string()))?;
        let prev_hash = text_or_empty(record, "prev_hash").map_err(|e| broken(e.to_string()))?;
        if self.chained == 0 && hash.is_empty() && prev_hash.is_empty() {
            self.unchained += 1;
            self.last_seq = Some(seq);
            return Ok(());
        }
        if hash.is_empty() {
            return Err(broken("the record has no hash".to_owned()));
        }
        if hash != record_hash(record).map_err(|e| broken(e.to_string()))? {
            return Err(broken(
                "the record does not match its hash (edited)".to_owned(),
            ));
        }
        if prev_hash != self.expected_prev {
            let previous = if self.chained == 0 {
                None
            } else {
                self.last_seq
            };
            return Err(broken(match previous {
                Some(last) => format!(
                    "prev_hash is not the hash of the record before it (seq {last}): \
                     a record is missing or out of order"
                ),
                None if self.anchored => {
                    "prev_hash is not the expected one: records before it are missing".to_owned()
                }
                None => "prev_hash is not that of a first record: records before it are missing"
                    .to_owned(),
            }));
        }
        if let Some(last) = self.last_seq.filter(|&last| last >= seq) {
            return Err(broken(format!("seq does not follow seq {last}")));
        }
        hash.clone_into(&mut self.expected_prev);
        self.last_seq = Some(seq);
        self.chained += 1;
        Ok(())
    }

    /// How many records were checked, chained or not.
    pub fn records(&self) -> u64 {
        self.chained + self.unchained
    }

    /// How many leading records predate the chain and are not covered by it.
    pub fn unchained(&self) -> u64 {
        self.unchained
    }

    /// The `seq` of the last record checked.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// The `hash` of the last chained record: the head, to remember and give as
    /// `expected_first_prev` later.
    pub fn head(&self) -> Option<&str> {
        (self.chained > 0).then_some(self.expected_prev.as_str())
    }
}

/// Checks `records`, one tenant's in ascending `seq` order (see [`ChainVerifier`]), and returns
/// how many there were.
pub fn verify_chain(
    records: &[Value],
    expected_first_prev: Option<&str>,
) -> Result<u64, ChainBreak> {
    let mut verifier = ChainVerifier::new(expected_first_prev);
    for record in records {
        verifier.push(record)?;
    }
    Ok(verifier.records())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The vectors of the controller's `record_hash` tests, computed by a separate program from
    /// the documented encoding.
    const VECTOR_FIRST: &str = "ae8be7224381edcf8f0ce3b11b9d5365a9d492d088d05f5d23c1d0b7e73b3c41";
    const VECTOR_SECOND: &str = "923f66dc5a2d97671ab31055e994590f3d56770fdb29e2004e392d23c21e60b4";

    fn vector_records() -> [Value; 2] {
        [
            json!({
                "seq": 42, "time": "2024-05-01T10:00:00Z", "tenant": "default",
                "actor": "admin", "device": "S1", "action": "rejectStation",
                "outcome": "refused", "reason": "station S1 is Rejected already",
                "prev_hash": GENESIS_PREV_HASH, "hash": VECTOR_FIRST,
            }),
            // An absent `device` is null; `reason` is not ASCII.
            json!({
                "seq": 43, "time": "2024-05-01T10:00:00.25Z", "tenant": "default",
                "actor": "controller", "action": "connect",
                "outcome": "ok", "reason": "café ✓",
                "prev_hash": VECTOR_FIRST, "hash": VECTOR_SECOND,
            }),
        ]
    }

    /// `n` chained records, seqs 10, 13, 16, …
    fn chain(n: u64) -> Vec<Value> {
        let mut records: Vec<Value> = Vec::new();
        for i in 0..n {
            let prev = records
                .last()
                .map_or(GENESIS_PREV_HASH, |r| r["hash"].as_str().unwrap_or(""));
            let mut record = json!({
                "seq": 10 + 3 * i, "time": format!("2024-05-01T10:0{i}:00Z"),
                "tenant": "default", "actor": "admin", "device": format!("S{i}"),
                "action": format!("action{i}"), "outcome": "ok", "reason": null,
                "prev_hash": prev,
            });
            record["hash"] = json!(record_hash(&record).unwrap());
            records.push(record);
        }
        records
    }

    fn break_seq(records: &[Value], expected_first_prev: Option<&str>) -> Option<u64> {
        verify_chain(records, expected_first_prev)
            .err()
            .map(|b| b.seq)
    }

    #[test]
    fn record_hash_matches_the_controllers_vectors() {
        let [first, second] = vector_records();
        assert_eq!(record_hash(&first).unwrap(), VECTOR_FIRST);
        assert_eq!(record_hash(&second).unwrap(), VECTOR_SECOND);
        assert_eq!(verify_chain(&[first, second], None), Ok(2));
    }

    #[test]
    fn null_and_absent_are_the_same_but_empty_is_not() {
        let [_, second] = vector_records();
        let mut null_device = second.clone();
        null_device["device"] = Value::Null;
        assert_eq!(record_hash(&null_device).unwrap(), VECTOR_SECOND);
        let mut empty_device = second;
        empty_device["device"] = json!("");
        assert_ne!(record_hash(&empty_device).unwrap(), VECTOR_SECOND);
    }

    #[test]
    fn malformed_records_are_errors() {
        let [first, _] = vector_records();
        for (field, value) in [
            ("seq", json!(-1)),
            ("seq", json!("42")),
            ("time", Value::Null),
            ("device", json!(5)),
            ("prev_hash", json!(true)),
        ] {
            let mut record = first.clone();
            record[field] = value;
            assert!(record_hash(&record).is_err(), "{field}");
        }
        let mut record = first;
        if let Some(object) = record.as_object_mut() {
            object.remove("actor");
        }
        assert!(record_hash(&record).is_err());
        let problem = verify_chain(&[json!({"seq": "x"})], None).unwrap_err();
        assert_eq!(problem.seq, 0);
    }

    #[test]
    fn an_untouched_chain_verifies_and_tells_its_head() {
        let records = chain(6);
        assert_eq!(verify_chain(&records, None), Ok(6));
        assert_eq!(verify_chain(&[], None), Ok(0));
        let mut verifier = ChainVerifier::new(records[1]["hash"].as_str());
        for record in &records[2..] {
            verifier.push(record).unwrap();
        }
        assert_eq!(verifier.head(), records[5]["hash"].as_str());
        assert_eq!(verifier.last_seq(), Some(25));
    }

    #[test]
    fn an_edit_of_any_field_is_detected_at_that_record() {
        for (field, value) in [
            ("seq", json!(17)),
            ("time", json!("2024-05-01T10:02:01Z")),
            ("tenant", json!("other")),
            ("actor", json!("mallory")),
            ("device", Value::Null),
            ("action", json!("acceptStation")),
            ("outcome", json!("refused")),
            ("reason", json!("")),
            ("prev_hash", json!("1".repeat(64))),
            ("hash", json!("2".repeat(64))),
        ] {
            let mut records = chain(6);
            records[2][field] = value;
            let problem = verify_chain(&records, None).unwrap_err();
            assert!((16..=17).contains(&problem.seq), "{field}: {problem}");
            assert!(problem.problem.contains("edited"), "{field}: {problem}");
        }
    }

    #[test]
    fn removed_reordered_and_truncated_are_detected() {
        let mut removed = chain(6);
        removed.remove(3);
        assert_eq!(break_seq(&removed, None), Some(22));
        let mut swapped = chain(6);
        swapped.swap(2, 3);
        assert_eq!(break_seq(&swapped, None), Some(19));
        let records = chain(6);
        assert_eq!(break_seq(&records[1..], None), Some(13));
        assert_eq!(
            break_seq(&records[3..], records[1]["hash"].as_str()),
            Some(19)
        );
    }

    #[test]
    fn records_from_before_the_chain_are_counted_but_only_at_the_start() {
        let legacy = |seq: u64| {
            json!({"seq": seq, "time": "2024-01-01T00:00:00Z", "tenant": "default",
                   "actor": "admin", "device": null, "action": "old", "outcome": "ok",
                   "reason": null})
        };
        let mut records = vec![legacy(1), legacy(2)];
        records.extend(chain(3));
        let mut verifier = ChainVerifier::new(None);
        for record in &records {
            verifier.push(record).unwrap();
        }
        assert_eq!((verifier.records(), verifier.unchained()), (5, 2));
        records.push(legacy(99));
        let problem = verify_chain(&records, None).unwrap_err();
        assert_eq!(problem.seq, 99);
        assert!(problem.problem.contains("no hash"), "{problem}");
    }
}
