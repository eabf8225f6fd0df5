//! The durable store of stations, phones, whitelists and audit records; the only module that
//! knows redb.

use std::ops::Bound;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use crate::audit::{record_hash, AuditRecord, GENESIS_PREV_HASH};
use crate::ids::{Mac, Serial};
use crate::phone::Phone;
use crate::station::Station;
use crate::whitelist::Whitelists;

/// Serial → station record as JSON.
const STATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("stations");
/// Sequence number → audit record as JSON.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Tenant → `hash` of the tenant's newest audit record: the head of its chain, where the next
/// record's `prev_hash` comes from. Updated in the transaction that stores that record.
const AUDIT_HEADS: TableDefinition<&str, &str> = TableDefinition::new("audit_heads");
/// MAC → phone record as JSON.
const PHONES: TableDefinition<&str, &[u8]> = TableDefinition::new("phones");
/// Records of which there is one for the whole controller, by name, as JSON.
const SINGLES: TableDefinition<&str, &[u8]> = TableDefinition::new("singles");
/// The key of every tenant's whitelists in `SINGLES`.
const WHITELISTS: &str = "whitelists";
/// Counters that must survive restarts.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Next audit sequence number. Kept apart from the audit table so that numbers are never
/// reused, even if old records are pruned one day.
const NEXT_AUDIT_SEQ: &str = "next_audit_seq";

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store: {0}")]
    Database(#[from] redb::DatabaseError),
    #[error("store transaction: {0}")]
    Transaction(#[from] redb::TransactionError),
    #[error("store table: {0}")]
    Table(#[from] redb::TableError),
    #[error("store storage: {0}")]
    Storage(#[from] redb::StorageError),
    #[error("store commit: {0}")]
    Commit(#[from] redb::CommitError),
    /// A stored record that does not decode: the store was damaged or written by a newer version.
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    /// A record that cannot be written as JSON (a time RFC 3339 cannot express).
    #[error("cannot encode a record: {0}")]
    Encode(String),
}

/// One change to the store; `Store::apply` commits a batch of them atomically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    PutStation(Station),
    DeleteStation(Serial),
    PutPhone(Phone),
    DeletePhone(Mac),
    /// Replaces every tenant's whitelists.
    PutWhitelists(Whitelists),
    Audit(AuditRecord),
}

/// The controller's durable state, in one redb file.
pub struct Store {
    db: Database,
}

impl Store {
    /// Opens the store at `path`, creating the file and its tables if missing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::create(path)?;
        let txn = db.begin_write()?;
        {
            txn.open_table(STATIONS)?;
            txn.open_table(PHONES)?;
            txn.open_table(SINGLES)?;
            txn.open_table(AUDIT)?;
            txn.open_table(AUDIT_HEADS)?;
            txn.open_table(META)?;
        }
        txn.commit()?;
        Ok(Store { db })
    }

    /// The record of one station.
    pub fn station(&self, serial: &Serial) -> Result<Option<Station>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(STATIONS)?;
        let Some(value) = table.get(serial.as_str())? else {
            return Ok(None);
        };
        decode_station(serial.as_str(), value.value()).map(Some)
    }

    /// All station records, sorted by serial.
    pub fn stations(&self) -> Result<Vec<Station>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(STATIONS)?;
        let mut stations = Vec::new();
        // redb iterates `&str` keys in byte order, which is the order of `Serial`.
        for entry in table.iter()? {
            let (key, value) = entry?;
            stations.push(decode_station(key.value(), value.value())?);
        }
        Ok(stations)
    }

    /// The record of one phone.
    pub fn phone(&self, mac: &Mac) -> Result<Option<Phone>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PHONES)?;
        let Some(value) = table.get(mac.as_str())? else {
            return Ok(None);
        };
        decode_phone(mac.as_str(), value.value()).map(Some)
    }

    /// The phone records of `tenant` (of all tenants for `None`), sorted by MAC.
    pub fn phones(&self, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(PHONES)?;
        let mut phones = Vec::new();
        // redb iterates `&str` keys in byte order, which is the order of `Mac`.
        for entry in table.iter()? {
            let (key, value) = entry?;
            let phone = decode_phone(key.value(), value.value())?;
            if tenant.is_none_or(|tenant| phone.tenant == tenant) {
                phones.push(phone);
            }
        }
        Ok(phones)
    }

    /// Every tenant's whitelists; empty ones if none were ever stored.
    pub fn whitelists(&self) -> Result<Whitelists, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SINGLES)?;
        let Some(value) = table.get(WHITELISTS)? else {
            return Ok(Whitelists::default());
        };
        serde_json::from_slice(value.value())
            .map_err(|error| StoreError::Corrupt(format!("whitelists: {error}")))
    }

    /// Applies all changes in ONE write transaction and returns the audit records with their
    /// assigned `seq`, `prev_hash` and `hash`: each record is chained onto its tenant's
    /// newest one (PROTOCOL §7). Either every change is stored or none is.
    pub fn apply(&self, changes: Vec<Change>) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.db.begin_write()?;
        let stored = match write_changes(&txn, changes) {
            Ok(stored) => stored,
            Err(error) => {
                // The first error is the one to report; an abort that fails as well leaves the
                // transaction uncommitted all the same.
                let _ = txn.abort();
                return Err(error);
            }
        };
        // redb's default durability is `Immediate`: commit returns only once the transaction
        // is fsynced. A decision must be on disk before anyone (a station, an operator) is told
        // about it; otherwise a crash could undo a rejection that was already announced.
        txn.commit()?;
        Ok(stored)
    }

    /// The newest `limit` audit records of `tenant`, oldest first.
    pub fn audit(&self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut records = Vec::new();
        if limit == 0 {
            return Ok(records);
        }
        for entry in table.iter()?.rev() {
            let (key, value) = entry?;
            let record = decode_audit(key.value(), value.value())?;
            if record.tenant == tenant {
                records.push(record);
                if records.len() == limit {
                    break;
                }
            }
        }
        records.reverse();
        Ok(records)
    }

    /// Up to `limit` audit records of `tenant` with `seq` above `after_seq`, oldest first: a page
    /// of the tenant's whole chain, from `after_seq` 0 on, each next page after the last `seq`.
    pub fn audit_page(
        &self,
        tenant: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AUDIT)?;
        let mut records = Vec::new();
        if limit == 0 {
            return Ok(records);
        }
        for entry in table.range::<u64>((Bound::Excluded(after_seq), Bound::Unbounded))? {
            let (key, value) = entry?;
            let record = decode_audit(key.value(), value.value())?;
            if record.tenant == tenant {
                records.push(record);
                if records.len() == limit {
                    break;
                }
            }
        }
        Ok(records)
    }
}

fn write_changes(
    txn: &WriteTransaction,
    changes: Vec<Change>,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut stations = txn.open_table(STATIONS)?;
    let mut phones = txn.open_table(PHONES)?;
    let mut singles = txn.open_table(SINGLES)?;
    let mut audit = txn.open_table(AUDIT)?;
    let mut heads = txn.open_table(AUDIT_HEADS)?;
    let mut meta = txn.open_table(META)?;
    let mut next_seq = match meta.get(NEXT_AUDIT_SEQ)? {
        Some(value) => value.value(),
        None => 1,
    };
    let mut stored = Vec::new();
    for change in changes {
        match change {
            Change::PutStation(station) => {
                stations.insert(station.serial.as_str(), encode(&station)?.as_slice())?;
            }
            Change::DeleteStation(serial) => {
                stations.remove(serial.as_str())?;
            }
            Change::PutPhone(phone) => {
                phones.insert(phone.mac.as_str(), encode(&phone)?.as_slice())?;
            }
            Change::DeletePhone(mac) => {
                phones.remove(mac.as_str())?;
            }
            Change::PutWhitelists(whitelists) => {
                singles.insert(WHITELISTS, encode(&whitelists)?.as_slice())?;
            }
            Change::Audit(mut record) => {
                record.seq = next_seq;
                record.prev_hash = match heads.get(record.tenant.as_str())? {
                    Some(head) => head.value().to_owned(),
                    None => GENESIS_PREV_HASH.to_owned(),
                };
                record.hash = record_hash(&record);
                heads.insert(record.tenant.as_str(), record.hash.as_str())?;
                audit.insert(next_seq, encode(&record)?.as_slice())?;
                next_seq += 1;
                stored.push(record);
            }
        }
    }
    meta.insert(NEXT_AUDIT_SEQ, next_seq)?;
    Ok(stored)
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Encode(error.to_string()))
}

fn decode_audit(seq: u64, bytes: &[u8]) -> Result<AuditRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("audit record {seq}: {error}")))
}

fn decode_station(key: &str, bytes: &[u8]) -> Result<Station, StoreError> {
    let station: Station = serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("station {key:?}: {error}")))?;
    if station.serial.as_str() != key {
        return Err(StoreError::Corrupt(format!(
            "station {key:?} holds the record of {}",
            station.serial
        )));
    }
    Ok(station)
}

fn decode_phone(key: &str, bytes: &[u8]) -> Result<Phone, StoreError> {
    let phone: Phone = serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("phone {key:?}: {error}")))?;
    if phone.mac.as_str() != key {
        return Err(StoreError::Corrupt(format!(
            "phone {key:?} holds the record of {}",
            phone.mac
        )));
    }
    Ok(phone)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Outcome;
    use crate::station::Standing;
    use time::macros::datetime;
    use time::OffsetDateTime;

    const T0: OffsetDateTime = datetime!(2024-03-01 10:00:00 UTC);

    fn station(serial: &str) -> Station {
        Station {
            serial: Serial::parse(serial).unwrap(),
            model: "MC-6100".into(),
            firmware: "6.1.0".into(),
            mac_streaming: "001122334455".into(),
            mac_control: "001122334466".into(),
            fingerprint: Some(crate::ids::Fingerprint::from_bytes([7; 32])),
            standing: Standing::Unauthorized,
            created_at: T0,
            updated_at: T0,
            last_seen: Some(T0),
            ip: Some("192.0.2.1".into()),
            tenant: "default".into(),
        }
    }

    fn record(tenant: &str, action: &str) -> AuditRecord {
        AuditRecord::new(
            T0,
            tenant,
            "admin",
            Some("S1".into()),
            action,
            Outcome::Ok,
            None,
        )
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("fleet.redb")).unwrap()
    }

    #[test]
    fn put_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let s1 = Serial::parse("S1").unwrap();
        assert_eq!(store.station(&s1).unwrap(), None);
        store
            .apply(vec![
                Change::PutStation(station("S2")),
                Change::PutStation(station("S1")),
            ])
            .unwrap();
        assert_eq!(store.station(&s1).unwrap(), Some(station("S1")));
        let serials: Vec<String> = store
            .stations()
            .unwrap()
            .iter()
            .map(|s| s.serial.to_string())
            .collect();
        assert_eq!(serials, ["S1", "S2"]);
        store
            .apply(vec![Change::DeleteStation(s1.clone())])
            .unwrap();
        assert_eq!(store.station(&s1).unwrap(), None);
        assert_eq!(store.stations().unwrap().len(), 1);
        // Deleting what is not there is no error.
        store.apply(vec![Change::DeleteStation(s1)]).unwrap();
    }

    #[test]
    fn apply_is_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut rejected = station("S1");
        rejected.standing = Standing::Rejected;
        let stored = store
            .apply(vec![
                Change::PutStation(station("S1")),
                Change::Audit(record("default", "auth_request")),
                Change::PutStation(rejected.clone()),
                Change::Audit(record("default", "rejectStation")),
            ])
            .unwrap();
        assert_eq!(stored.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            store.station(&rejected.serial).unwrap(),
            Some(rejected.clone())
        );

        // A batch with a record that cannot be encoded stores nothing at all.
        let mut bad = station("S3");
        // RFC 3339 cannot write an offset with seconds.
        bad.updated_at = T0.to_offset(time::UtcOffset::from_hms(0, 0, 30).unwrap());
        let result = store.apply(vec![
            Change::DeleteStation(rejected.serial.clone()),
            Change::Audit(record("default", "removeStation")),
            Change::PutStation(bad),
        ]);
        assert!(matches!(result, Err(StoreError::Encode(_))), "{result:?}");
        assert_eq!(store.station(&rejected.serial).unwrap(), Some(rejected));
        assert_eq!(store.audit("default", 10).unwrap().len(), 2);
        let next = store
            .apply(vec![Change::Audit(record("default", "x"))])
            .unwrap();
        assert_eq!(next[0].seq, 3);
    }

    #[test]
    fn reopen_keeps_everything_and_seq_keeps_rising() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir);
            store
                .apply(vec![
                    Change::PutStation(station("S1")),
                    Change::Audit(record("default", "a")),
                    Change::Audit(record("default", "b")),
                ])
                .unwrap();
        }
        let store = open(&dir);
        assert_eq!(store.stations().unwrap(), vec![station("S1")]);
        let stored = store
            .apply(vec![Change::Audit(record("default", "c"))])
            .unwrap();
        assert_eq!(stored[0].seq, 3);
        let log = store.audit("default", 100).unwrap();
        assert_eq!(log.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(log[2].action, "c");
        assert_eq!(log[0].time, T0);
    }

    #[test]
    fn audit_is_per_tenant_newest_last_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut changes = Vec::new();
        for i in 0..10 {
            let tenant = if i % 2 == 0 { "default" } else { "other" };
            changes.push(Change::Audit(record(tenant, &format!("a{i}"))));
        }
        store.apply(changes).unwrap();
        let log = store.audit("default", 3).unwrap();
        let actions: Vec<&str> = log.iter().map(|r| r.action.as_str()).collect();
        assert_eq!(actions, ["a4", "a6", "a8"]);
        assert_eq!(store.audit("other", 100).unwrap().len(), 5);
        assert!(store.audit("nobody", 100).unwrap().is_empty());
        assert!(store.audit("default", 0).unwrap().is_empty());
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        store
            .apply(vec![Change::Audit(record("default", "a"))])
            .unwrap();
        let other = serde_json::to_vec(&station("S9")).unwrap();
        let txn = store.db.begin_write().unwrap();
        {
            let mut stations = txn.open_table(STATIONS).unwrap();
            stations.insert("S1", b"{not json".as_slice()).unwrap();
            stations.insert("S2", other.as_slice()).unwrap();
            let mut audit = txn.open_table(AUDIT).unwrap();
            audit.insert(99, b"[]".as_slice()).unwrap();
        }
        txn.commit().unwrap();

        let s1 = Serial::parse("S1").unwrap();
        assert!(matches!(store.station(&s1), Err(StoreError::Corrupt(_))));
        let s2 = Serial::parse("S2").unwrap();
        assert!(matches!(store.station(&s2), Err(StoreError::Corrupt(_))));
        assert!(matches!(store.stations(), Err(StoreError::Corrupt(_))));
        let error = store.audit("default", 10).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)));
        assert!(error.to_string().contains("99"));
    }

    // --- the audit chain ---

    /// The whole chain of `tenant`, paged as fleetctl pages it.
    fn whole_chain(store: &Store, tenant: &str, page: usize) -> Vec<AuditRecord> {
        let mut records: Vec<AuditRecord> = Vec::new();
        loop {
            let after = records.last().map_or(0, |r| r.seq);
            let next = store.audit_page(tenant, after, page).unwrap();
            if next.is_empty() {
                return records;
            }
            records.extend(next);
        }
    }

    /// Changes one stored audit record behind the store's back, as someone with the file could.
    fn tamper_audit(store: &Store, seq: u64, edit: impl FnOnce(&mut AuditRecord)) {
        let txn = store.db.begin_write().unwrap();
        {
            let mut audit = txn.open_table(AUDIT).unwrap();
            let mut record: AuditRecord =
                serde_json::from_slice(audit.get(seq).unwrap().unwrap().value()).unwrap();
            edit(&mut record);
            let bytes = serde_json::to_vec(&record).unwrap();
            audit.insert(seq, bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    /// Removes one stored audit record behind the store's back.
    fn remove_audit(store: &Store, seq: u64) {
        let txn = store.db.begin_write().unwrap();
        txn.open_table(AUDIT).unwrap().remove(seq).unwrap();
        txn.commit().unwrap();
    }

    #[test]
    fn audit_hashes_chain_across_transactions_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let first = {
            let store = open(&dir);
            let stored = store
                .apply(vec![
                    Change::Audit(record("default", "a")),
                    Change::PutStation(station("S1")),
                    Change::Audit(record("default", "b")),
                ])
                .unwrap();
            assert_eq!(stored[0].prev_hash, GENESIS_PREV_HASH);
            assert_eq!(stored[1].prev_hash, stored[0].hash);
            store
                .apply(vec![Change::Audit(record("default", "c"))])
                .unwrap();
            stored
        };
        let store = open(&dir);
        let stored = store
            .apply(vec![Change::Audit(record("default", "d"))])
            .unwrap();
        let log = whole_chain(&store, "default", 2);
        assert_eq!(log.len(), 4);
        assert_eq!(log[..2], first[..]);
        assert_eq!(log[3], stored[0]);
        assert_eq!(log[3].prev_hash, log[2].hash);
        for record in &log {
            assert_eq!(record.hash, crate::audit::record_hash(record));
            assert_eq!(record.hash.len(), 64);
        }
        assert_eq!(crate::audit::verify_chain(&log, None), Ok(()));
        // What `audit` shows is the same records.
        assert_eq!(store.audit("default", 100).unwrap(), log);
    }

    #[test]
    fn tenants_have_independent_chains() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for i in 0..3 {
            store
                .apply(vec![
                    Change::Audit(record("default", &format!("d{i}"))),
                    Change::Audit(record("other", &format!("o{i}"))),
                ])
                .unwrap();
        }
        let default = whole_chain(&store, "default", 1000);
        let other = whole_chain(&store, "other", 1000);
        assert_eq!(default.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3, 5]);
        assert_eq!(other.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 4, 6]);
        assert_eq!(default[0].prev_hash, GENESIS_PREV_HASH);
        assert_eq!(other[0].prev_hash, GENESIS_PREV_HASH);
        assert_eq!(crate::audit::verify_chain(&default, None), Ok(()));
        assert_eq!(crate::audit::verify_chain(&other, None), Ok(()));
        // Removing a record of one tenant leaves the other's chain whole.
        remove_audit(&store, 3);
        assert_eq!(
            crate::audit::verify_chain(&whole_chain(&store, "other", 1000), None),
            Ok(())
        );
        let broken = crate::audit::verify_chain(&whole_chain(&store, "default", 1000), None);
        assert_eq!(broken.map_err(|b| b.seq), Err(5));
    }

    #[test]
    fn audit_page_is_ascending_after_seq_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut changes = Vec::new();
        for i in 0..10 {
            let tenant = if i % 2 == 0 { "default" } else { "other" };
            changes.push(Change::Audit(record(tenant, &format!("a{i}"))));
        }
        store.apply(changes).unwrap();
        let seqs = |after: u64, limit: usize| -> Vec<u64> {
            store
                .audit_page("default", after, limit)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect()
        };
        assert_eq!(seqs(0, 100), [1, 3, 5, 7, 9]);
        assert_eq!(seqs(0, 2), [1, 3]);
        assert_eq!(seqs(3, 2), [5, 7]);
        assert_eq!(seqs(4, 100), [5, 7, 9]);
        assert!(seqs(9, 100).is_empty());
        assert!(seqs(u64::MAX, 100).is_empty());
        assert!(seqs(0, 0).is_empty());
        assert!(store.audit_page("nobody", 0, 100).unwrap().is_empty());
    }

    #[test]
    fn a_record_edited_in_the_file_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        for action in ["a", "b", "c", "d"] {
            store
                .apply(vec![Change::Audit(record("default", action))])
                .unwrap();
        }
        let verify = |store: &Store| {
            crate::audit::verify_chain(&whole_chain(store, "default", 3), None).map_err(|b| b.seq)
        };
        assert_eq!(verify(&store), Ok(()));
        tamper_audit(&store, 2, |r| r.outcome = Outcome::Refused);
        assert_eq!(verify(&store), Err(2));
        // Recomputing the edited record's hash moves the break to the next record.
        tamper_audit(&store, 2, |r| r.hash = crate::audit::record_hash(r));
        assert_eq!(verify(&store), Err(3));
    }

    #[test]
    fn records_from_before_the_chain_decode_and_the_chain_starts_after_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.redb");
        {
            // A store written before the chain: no heads table, records without hashes.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut audit = txn.open_table(AUDIT).unwrap();
                for seq in 1..=2 {
                    let old = serde_json::json!({
                        "seq": seq, "time": "2024-03-01T10:00:00Z", "tenant": "default",
                        "actor": "admin", "device": null, "action": "old", "outcome": "ok",
                        "reason": null,
                    });
                    let bytes = serde_json::to_vec(&old).unwrap();
                    audit.insert(seq, bytes.as_slice()).unwrap();
                }
                txn.open_table(META)
                    .unwrap()
                    .insert(NEXT_AUDIT_SEQ, 3)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let stored = store
            .apply(vec![Change::Audit(record("default", "new"))])
            .unwrap();
        assert_eq!(stored[0].seq, 3);
        assert_eq!(stored[0].prev_hash, GENESIS_PREV_HASH);
        let log = whole_chain(&store, "default", 1000);
        assert_eq!(log.len(), 3);
        assert!(log[0].hash.is_empty());
        assert_eq!(crate::audit::verify_chain(&log, None), Ok(()));
    }

    // --- phones and whitelists ---

    fn phone(mac: &str, tenant: &str) -> Phone {
        Phone::new(
            Mac::parse(mac).unwrap(),
            tenant.into(),
            "Yealink".into(),
            "T54W".into(),
            "Berlin".into(),
            crate::phone::Pap::parse("123456").unwrap(),
            T0,
        )
    }

    fn whitelists() -> Whitelists {
        let mut lists = Whitelists::default();
        lists.add_permanent(
            "default",
            crate::whitelist::WhitelistEntry::parse("203.0.113.0/24").unwrap(),
        );
        lists.grant_temporary(
            "default",
            "192.0.2.1".parse().unwrap(),
            T0,
            time::Duration::hours(8),
        );
        lists
    }

    #[test]
    fn phones_put_get_list_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let m1 = Mac::parse("000000000001").unwrap();
        assert_eq!(store.phone(&m1).unwrap(), None);
        assert!(store.phones(None).unwrap().is_empty());
        store
            .apply(vec![
                Change::PutPhone(phone("000000000003", "other")),
                Change::PutPhone(phone("000000000002", "default")),
                Change::PutPhone(phone("000000000001", "default")),
            ])
            .unwrap();
        assert_eq!(
            store.phone(&m1).unwrap(),
            Some(phone("000000000001", "default"))
        );
        let macs = |tenant: Option<&str>| -> Vec<String> {
            store
                .phones(tenant)
                .unwrap()
                .iter()
                .map(|p| p.mac.to_string())
                .collect()
        };
        assert_eq!(macs(None), ["000000000001", "000000000002", "000000000003"]);
        assert_eq!(macs(Some("default")), ["000000000001", "000000000002"]);
        assert_eq!(macs(Some("other")), ["000000000003"]);
        assert!(macs(Some("nobody")).is_empty());
        // A put replaces the record.
        let suspended = crate::phone::suspend(
            phone("000000000001", "default"),
            &crate::phone::PhonePolicy::default(),
            T0,
        );
        store
            .apply(vec![Change::PutPhone(suspended.clone())])
            .unwrap();
        assert_eq!(store.phone(&m1).unwrap(), Some(suspended));
        store.apply(vec![Change::DeletePhone(m1.clone())]).unwrap();
        assert_eq!(store.phone(&m1).unwrap(), None);
        assert_eq!(macs(None).len(), 2);
        // Deleting what is not there is no error.
        store.apply(vec![Change::DeletePhone(m1)]).unwrap();
        // Stations and phones do not mix.
        assert!(store.stations().unwrap().is_empty());
    }

    #[test]
    fn whitelists_default_then_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        assert_eq!(store.whitelists().unwrap(), Whitelists::default());
        store
            .apply(vec![Change::PutWhitelists(whitelists())])
            .unwrap();
        assert_eq!(store.whitelists().unwrap(), whitelists());
        store
            .apply(vec![Change::PutWhitelists(Whitelists::default())])
            .unwrap();
        assert_eq!(store.whitelists().unwrap(), Whitelists::default());
    }

    #[test]
    fn phone_changes_are_atomic_with_audit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let stored = store
            .apply(vec![
                Change::PutPhone(phone("000000000001", "default")),
                Change::PutWhitelists(whitelists()),
                Change::Audit(record("default", "createPhone")),
            ])
            .unwrap();
        assert_eq!(stored[0].seq, 1);

        // A batch with a phone that cannot be encoded stores nothing at all.
        let mut bad = phone("000000000002", "default");
        bad.updated_at = T0.to_offset(time::UtcOffset::from_hms(0, 0, 30).unwrap());
        let result = store.apply(vec![
            Change::DeletePhone(Mac::parse("000000000001").unwrap()),
            Change::PutWhitelists(Whitelists::default()),
            Change::Audit(record("default", "deletePhone")),
            Change::PutPhone(bad),
        ]);
        assert!(matches!(result, Err(StoreError::Encode(_))), "{result:?}");
        assert_eq!(
            store.phones(None).unwrap(),
            vec![phone("000000000001", "default")]
        );
        assert_eq!(store.whitelists().unwrap(), whitelists());
        assert_eq!(store.audit("default", 10).unwrap().len(), 1);
    }

    #[test]
    fn reopen_keeps_phones_and_whitelists() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = open(&dir);
            store
                .apply(vec![
                    Change::PutPhone(phone("000000000001", "default")),
                    Change::PutWhitelists(whitelists()),
                    Change::PutStation(station("S1")),
                ])
                .unwrap();
        }
        let store = open(&dir);
        assert_eq!(
            store.phones(Some("default")).unwrap(),
            vec![phone("000000000001", "default")]
        );
        assert_eq!(store.whitelists().unwrap(), whitelists());
        assert_eq!(store.stations().unwrap(), vec![station("S1")]);
    }

    #[test]
    fn a_store_from_before_phones_opens_with_none() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.redb");
        {
            // Only the tables of the station-only store.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(STATIONS).unwrap();
            txn.open_table(AUDIT).unwrap();
            txn.open_table(META).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert!(store.phones(None).unwrap().is_empty());
        assert_eq!(store.whitelists().unwrap(), Whitelists::default());
    }

    #[test]
    fn corrupt_phone_records_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let other = serde_json::to_vec(&phone("000000000009", "default")).unwrap();
        let txn = store.db.begin_write().unwrap();
        {
            let mut phones = txn.open_table(PHONES).unwrap();
            phones
                .insert("000000000001", b"{not json".as_slice())
                .unwrap();
            phones.insert("000000000002", other.as_slice()).unwrap();
            let mut singles = txn.open_table(SINGLES).unwrap();
            singles
                .insert(WHITELISTS, b"{\"permanent\": 5}".as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        for mac in ["000000000001", "000000000002"] {
            let mac = Mac::parse(mac).unwrap();
            assert!(matches!(store.phone(&mac), Err(StoreError::Corrupt(_))));
        }
        assert!(matches!(store.phones(None), Err(StoreError::Corrupt(_))));
        assert!(matches!(store.whitelists(), Err(StoreError::Corrupt(_))));
    }
}
