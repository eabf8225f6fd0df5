//! The redb backend of the store: one file, `fleet.redb`, and a writer thread that
//! group-commits.

use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::{
    decode_audit, decode_phone, decode_station, decode_whitelists, encode, take_queued, Change,
    CommitTimer, RecordReads, StoreError, WriteRequest, WriteResult, WriterAlive, GROUP_LINGER,
    MAX_GROUP,
};
use crate::audit::{record_hash, AuditRecord, GENESIS_PREV_HASH};
use crate::phone::Phone;
use crate::station::Station;
use crate::whitelist::Whitelists;
use fleet_protocol::{Mac, Serial};

/// Serial → station record as JSON.
const STATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("stations");
/// Sequence number → audit record as JSON.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Tenant → `hash` of the tenant's newest audit record: the head of its chain, where the next
/// record's `prev_hash` comes from. Updated in the transaction that stores that record.
const AUDIT_HEADS: TableDefinition<&str, &str> = TableDefinition::new("audit_heads");
/// (tenant, sequence number) of every audit record: the index by which a tenant's records are
/// read, so that a read of one tenant's newest records, or a page of its chain, walks those
/// records only, however many other tenants have. Written with the record.
const AUDIT_BY_TENANT: TableDefinition<(&str, u64), ()> = TableDefinition::new("audit_by_tenant");
/// MAC → phone record as JSON.
const PHONES: TableDefinition<&str, &[u8]> = TableDefinition::new("phones");
/// Records of which there is one for the whole controller, by name, as JSON.
const SINGLES: TableDefinition<&str, &[u8]> = TableDefinition::new("singles");
/// The key of every tenant's whitelists in `SINGLES`.
const WHITELISTS: &str = "whitelists";
/// Serial → when the station was last seen, in whole seconds since the Unix epoch. Kept apart
/// from its record (a few bytes, written by the minute for every online station: see
/// `Controller::record_sightings`), and deleted with it.
const SEEN: TableDefinition<&str, i64> = TableDefinition::new("seen");
/// Counters that must survive restarts.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Next audit sequence number. Kept apart from the audit table so that numbers are never
/// reused, even if old records are pruned one day.
const NEXT_AUDIT_SEQ: &str = "next_audit_seq";
/// Present in `META` once `AUDIT_BY_TENANT` indexes every audit record (a store from before
/// the index gets it built when it is opened).
const AUDIT_INDEXED: &str = "audit_indexed";

/// The store in one redb file.
pub(super) struct RedbStore {
    db: Arc<Database>,
    writer: Option<mpsc::Sender<WriteRequest>>,
    thread: Option<JoinHandle<()>>,
}

/// Commits `txn` (durably: redb's default durability fsyncs), timed.
fn commit_timed(timer: &CommitTimer, txn: WriteTransaction) -> Result<(), redb::CommitError> {
    let start = Instant::now();
    let result = txn.commit();
    timer.observe(start);
    result
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what was queued; joining it
        // releases the database file before `drop` returns (a restart can reopen it at once).
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writer thread: commits every request queued at the moment in one transaction.
fn run_writer(db: Arc<Database>, queue: mpsc::Receiver<WriteRequest>, timer: CommitTimer) {
    let mut busy = false;
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        take_queued(&mut group, || queue.try_recv().ok());
        // While requests keep coming (the last group had company), wait a moment for more:
        // fewer, larger commits. An isolated request is committed at once. The writer sleeps
        // rather than waits on the queue, so the requests that arrive meanwhile do not each
        // wake it (a futex call and a context switch per request, in a storm of CONNECTs).
        if busy && group.len() < MAX_GROUP {
            std::thread::sleep(GROUP_LINGER);
            take_queued(&mut group, || queue.try_recv().ok());
        }
        busy = group.len() > 1;
        commit_group(&db, group, &timer);
    }
}

fn commit_group(db: &Database, group: Vec<WriteRequest>, timer: &CommitTimer) {
    if group.len() > 1 {
        if let Ok(results) = try_group(db, &group, timer) {
            for (request, records) in group.into_iter().zip(results) {
                request.reply.send(Ok(records));
            }
            return;
        }
        // Something in the group failed: nothing of it was committed. Each request is tried
        // on its own, so that one bad request fails alone with its own error.
    }
    for request in group {
        let result = apply_one(db, &request.changes, timer);
        request.reply.send(result);
    }
}

fn try_group(
    db: &Database,
    group: &[WriteRequest],
    timer: &CommitTimer,
) -> Result<Vec<Vec<AuditRecord>>, StoreError> {
    let txn = db.begin_write()?;
    let written = (|| {
        let mut tables = Tables::new(&txn);
        let mut results = Vec::with_capacity(group.len());
        for request in group {
            results.push(tables.apply(&request.changes)?);
        }
        tables.finish()?;
        Ok(results)
    })();
    match written {
        Ok(results) => {
            commit_timed(timer, txn)?;
            Ok(results)
        }
        Err(error) => {
            let _ = txn.abort();
            Err(error)
        }
    }
}

fn apply_one(db: &Database, changes: &[Change], timer: &CommitTimer) -> WriteResult {
    let txn = db.begin_write()?;
    let stored = match write_changes(&txn, changes) {
        Ok(stored) => stored,
        Err(error) => {
            // The first error is the one to report; an abort that fails as well leaves the
            // transaction uncommitted all the same.
            let _ = txn.abort();
            return Err(error);
        }
    };
    // redb's default durability is `Immediate`: commit returns only once the transaction is
    // fsynced. A decision must be on disk before anyone (a station, an operator) is told about
    // it; otherwise a crash could undo a rejection that was already announced.
    commit_timed(timer, txn)?;
    Ok(stored)
}

/// The reads of records, the same through a read transaction ([`RedbStore`]) and through a
/// write transaction ([`RedbTxn`], which sees its own writes): `$txn` is what tables are opened
/// on.
macro_rules! redb_reads {
    ($self:ident => $txn:expr) => {
        fn station(&$self, serial: &Serial) -> Result<Option<Station>, StoreError> {
            read_station(&$txn.open_table(STATIONS)?, serial)
        }

        fn stations(&$self) -> Result<Vec<Station>, StoreError> {
            read_stations(&$txn.open_table(STATIONS)?)
        }

        fn phone(&$self, mac: &Mac) -> Result<Option<Phone>, StoreError> {
            read_phone(&$txn.open_table(PHONES)?, mac)
        }

        fn phones(&$self, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError> {
            read_phones(&$txn.open_table(PHONES)?, tenant)
        }

        fn stations_page(
            &$self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Station) -> bool,
        ) -> Result<(Vec<Station>, bool), StoreError> {
            read_page(&$txn.open_table(STATIONS)?, after, limit, decode_station, keep)
        }

        fn phones_page(
            &$self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Phone) -> bool,
        ) -> Result<(Vec<Phone>, bool), StoreError> {
            read_page(&$txn.open_table(PHONES)?, after, limit, decode_phone, keep)
        }

        fn audit(&$self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
            let (index, audit) = ($txn.open_table(AUDIT_BY_TENANT)?, $txn.open_table(AUDIT)?);
            read_audit(&index, &audit, tenant, limit)
        }

        fn audit_page(
            &$self,
            tenant: &str,
            after_seq: u64,
            limit: usize,
        ) -> Result<Vec<AuditRecord>, StoreError> {
            let (index, audit) = ($txn.open_table(AUDIT_BY_TENANT)?, $txn.open_table(AUDIT)?);
            read_audit_page(&index, &audit, tenant, after_seq, limit)
        }
    };
}

/// redb's page cache, at most, unless `[store] cache_mib` says otherwise. redb's default
/// (1 GiB) keeps every page written in memory, so the audit log (a record per CONNECT) grew
/// fleetd's memory with every session it had seen. At 64 MiB, fleetd's RSS grew 1.39-1.45x
/// over a churn of 10,000 stations x 20 rounds, at 16 MiB 1.13-1.19x, with no slower
/// onboarding in those runs (BENCHMARKS.md, seventh day).
pub const CACHE_BYTES: usize = (fleet_config::DEFAULT_STORE_CACHE_MIB as usize) << 20;

impl RedbStore {
    /// Opens the store at `path` with a page cache of `cache_bytes` at most, creating the file
    /// and its tables if missing, and starts its writer thread, which holds `alive` while it
    /// runs.
    pub(super) fn open(
        path: &Path,
        cache_bytes: usize,
        timer: CommitTimer,
        alive: WriterAlive,
    ) -> Result<RedbStore, StoreError> {
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)
            .map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    StoreError::AlreadyOpen(path.to_path_buf())
                }
                e => e.into(),
            })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(STATIONS)?;
            txn.open_table(PHONES)?;
            txn.open_table(SINGLES)?;
            txn.open_table(AUDIT)?;
            txn.open_table(AUDIT_HEADS)?;
            txn.open_table(META)?;
            txn.open_table(SEEN)?;
            index_audit(&txn)?;
        }
        txn.commit()?;
        let db = Arc::new(db);
        let (writer, queue) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn({
                let db = db.clone();
                move || {
                    let _alive = alive;
                    run_writer(db, queue, timer)
                }
            })
            .map_err(|e| StoreError::Encode(format!("cannot start the store writer: {e}")))?;
        Ok(RedbStore {
            db,
            writer: Some(writer),
            thread: Some(thread),
        })
    }

    pub(super) fn sightings(&self) -> Result<Vec<(Serial, i64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SEEN)?;
        let mut seen = Vec::new();
        for entry in table.iter()? {
            let (serial, at) = entry?;
            if let Ok(serial) = Serial::parse(serial.value()) {
                seen.push((serial, at.value()));
            }
        }
        Ok(seen)
    }

    pub(super) fn whitelists(&self) -> Result<Whitelists, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(SINGLES)?;
        let Some(value) = table.get(WHITELISTS)? else {
            return Ok(Whitelists::default());
        };
        decode_whitelists(value.value())
    }

    pub(super) fn submit(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.writer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(request)
            .map_err(|_| StoreError::Closed)
    }

    /// redb's only write transaction, for the caller; waits while the writer has it.
    pub(super) fn begin(&self, timer: CommitTimer) -> Result<RedbTxn, StoreError> {
        Ok(RedbTxn {
            txn: self.db.begin_write()?,
            timer,
        })
    }

    /// The database itself, for tests that edit the file behind the store's back.
    #[cfg(test)]
    pub(super) fn database(&self) -> &Database {
        &self.db
    }
}

impl RecordReads for RedbStore {
    redb_reads!(self => self.db.begin_read()?);
}

/// A write transaction held by its caller (`Store::begin`).
pub(super) struct RedbTxn {
    txn: WriteTransaction,
    timer: CommitTimer,
}

impl RecordReads for RedbTxn {
    redb_reads!(self => self.txn);
}

impl RedbTxn {
    pub(super) fn write(&self, changes: &[Change]) -> Result<Vec<AuditRecord>, StoreError> {
        write_changes(&self.txn, changes)
    }

    pub(super) fn commit(self) -> Result<(), StoreError> {
        Ok(commit_timed(&self.timer, self.txn)?)
    }

    pub(super) fn abort(self) -> Result<(), StoreError> {
        Ok(self.txn.abort()?)
    }
}
/// One JSON record by key, decoded with `decode` (which also checks that it is the key's own).
fn read_one<T>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    decode: fn(&str, &[u8]) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let Some(value) = table.get(key)? else {
        return Ok(None);
    };
    decode(key, value.value()).map(Some)
}

fn read_station(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    serial: &Serial,
) -> Result<Option<Station>, StoreError> {
    read_one(table, serial.as_str(), decode_station)
}

fn read_stations(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<Vec<Station>, StoreError> {
    let mut stations = Vec::new();
    // redb iterates `&str` keys in byte order, which is the order of `Serial`.
    for entry in table.iter()? {
        let (key, value) = entry?;
        stations.push(decode_station(key.value(), value.value())?);
    }
    Ok(stations)
}

fn read_phone(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    mac: &Mac,
) -> Result<Option<Phone>, StoreError> {
    read_one(table, mac.as_str(), decode_phone)
}

fn read_phones(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    tenant: Option<&str>,
) -> Result<Vec<Phone>, StoreError> {
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

/// The audit records that `seqs` (from `AUDIT_BY_TENANT`, in their order) name for `tenant`,
/// `limit` at most. An index entry whose record is gone, or is another tenant's, is skipped:
/// the file was edited behind the store's back, and the chain's check shows where.
fn tenant_records<'a>(
    seqs: impl Iterator<
        Item = Result<
            (
                redb::AccessGuard<'a, (&'static str, u64)>,
                redb::AccessGuard<'a, ()>,
            ),
            redb::StorageError,
        >,
    >,
    audit: &impl ReadableTable<u64, &'static [u8]>,
    tenant: &str,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut records = Vec::new();
    if limit == 0 {
        return Ok(records);
    }
    for entry in seqs {
        let (key, _) = entry?;
        let (_, seq) = key.value();
        let Some(value) = audit.get(seq)? else {
            continue;
        };
        let record = decode_audit(seq, value.value())?;
        if record.tenant == tenant {
            records.push(record);
            if records.len() == limit {
                break;
            }
        }
    }
    Ok(records)
}

fn read_audit(
    index: &impl ReadableTable<(&'static str, u64), ()>,
    audit: &impl ReadableTable<u64, &'static [u8]>,
    tenant: &str,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    // Newest first while collecting, then oldest first.
    let seqs = index.range::<(&str, u64)>((tenant, 0)..=(tenant, u64::MAX))?;
    let mut records = tenant_records(seqs.rev(), audit, tenant, limit)?;
    records.reverse();
    Ok(records)
}

fn read_audit_page(
    index: &impl ReadableTable<(&'static str, u64), ()>,
    audit: &impl ReadableTable<u64, &'static [u8]>,
    tenant: &str,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    let Some(first) = after_seq.checked_add(1) else {
        return Ok(Vec::new());
    };
    let seqs = index.range::<(&str, u64)>((tenant, first)..=(tenant, u64::MAX))?;
    tenant_records(seqs, audit, tenant, limit)
}

/// Builds `AUDIT_BY_TENANT` from the audit table, once, for a store from before the index.
/// A record that does not decode is left out of the index (and so out of every read): the
/// chain's check shows the gap.
fn index_audit(txn: &WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    if meta.get(AUDIT_INDEXED)?.is_some() {
        return Ok(());
    }
    let audit = txn.open_table(AUDIT)?;
    let mut index = txn.open_table(AUDIT_BY_TENANT)?;
    for entry in audit.iter()? {
        let (seq, value) = entry?;
        if let Ok(record) = decode_audit(seq.value(), value.value()) {
            index.insert((record.tenant.as_str(), seq.value()), ())?;
        }
    }
    meta.insert(AUDIT_INDEXED, 1)?;
    Ok(())
}

fn write_changes(
    txn: &WriteTransaction,
    changes: &[Change],
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut tables = Tables::new(txn);
    let stored = tables.apply(changes)?;
    tables.finish()?;
    Ok(stored)
}

/// The tables a transaction's changes are written to, each opened when a change first needs
/// it and kept open until [`Tables::finish`]: opening one looks it up, and closing it writes
/// its root back, so the writer's group of many small requests (an audit record per CONNECT)
/// opens each table once, not once per request. Nothing may read through the transaction
/// while they are open (redb refuses a second opening of a table).
struct Tables<'t> {
    txn: &'t WriteTransaction,
    stations: Option<redb::Table<'t, &'static str, &'static [u8]>>,
    phones: Option<redb::Table<'t, &'static str, &'static [u8]>>,
    singles: Option<redb::Table<'t, &'static str, &'static [u8]>>,
    seen: Option<redb::Table<'t, &'static str, i64>>,
    chain: Option<AuditChain<'t>>,
}

impl<'t> Tables<'t> {
    fn new(txn: &'t WriteTransaction) -> Self {
        Tables {
            txn,
            stations: None,
            phones: None,
            singles: None,
            seen: None,
            chain: None,
        }
    }

    /// Writes `changes` in order; returns the audit records among them as stored.
    fn apply(&mut self, changes: &[Change]) -> Result<Vec<AuditRecord>, StoreError> {
        let txn = self.txn;
        let mut stored = Vec::new();
        for change in changes {
            match change {
                Change::PutStation(station) => {
                    let table = opened(&mut self.stations, txn, STATIONS)?;
                    table.insert(station.serial.as_str(), encode(station)?.as_slice())?;
                }
                Change::NoteMismatch { serial, at } => {
                    let table = opened(&mut self.stations, txn, STATIONS)?;
                    if let Some(station) = read_station(&*table, serial)? {
                        let noted = crate::station::mismatch_noted(station, *at);
                        table.insert(serial.as_str(), encode(&noted)?.as_slice())?;
                    }
                }
                Change::DeleteStation(serial) => {
                    opened(&mut self.stations, txn, STATIONS)?.remove(serial.as_str())?;
                    opened(&mut self.seen, txn, SEEN)?.remove(serial.as_str())?;
                }
                Change::Seen(serial, at) => {
                    // Only for a station that has a record: one removed since it was seen is
                    // not brought back as a sighting. Never back in time: two sweeps' commits
                    // (the minute's and a stop's) may land in either order.
                    let known = opened(&mut self.stations, txn, STATIONS)?
                        .get(serial.as_str())?
                        .is_some();
                    let table = opened(&mut self.seen, txn, SEEN)?;
                    let before = table.get(serial.as_str())?.map(|v| v.value());
                    if known && before.is_none_or(|before| before < *at) {
                        table.insert(serial.as_str(), *at)?;
                    }
                }
                Change::PutPhone(phone) => {
                    let table = opened(&mut self.phones, txn, PHONES)?;
                    table.insert(phone.mac.as_str(), encode(phone)?.as_slice())?;
                }
                Change::DeletePhone(mac) => {
                    opened(&mut self.phones, txn, PHONES)?.remove(mac.as_str())?;
                }
                Change::PutWhitelists(whitelists) => {
                    let table = opened(&mut self.singles, txn, SINGLES)?;
                    table.insert(WHITELISTS, encode(whitelists)?.as_slice())?;
                }
                Change::Audit(record) => {
                    let chain = match &mut self.chain {
                        Some(chain) => chain,
                        None => self.chain.insert(AuditChain::open(txn)?),
                    };
                    stored.push(chain.append(record)?);
                }
            }
        }
        Ok(stored)
    }

    /// Stores the audit log's next sequence number, and closes every table.
    fn finish(self) -> Result<(), StoreError> {
        if let Some(chain) = self.chain {
            chain.finish()?;
        }
        Ok(())
    }
}

/// The table in `slot`, opened in `txn` the first time it is asked for.
fn opened<'s, 't, K: redb::Key + 'static, V: redb::Value + 'static>(
    slot: &'s mut Option<redb::Table<'t, K, V>>,
    txn: &'t WriteTransaction,
    table: TableDefinition<'_, K, V>,
) -> Result<&'s mut redb::Table<'t, K, V>, StoreError> {
    Ok(match slot {
        Some(open) => open,
        None => slot.insert(txn.open_table(table)?),
    })
}

/// The audit log's tables while records are appended: each record gets the next sequence
/// number and is chained to its tenant's newest record.
struct AuditChain<'t> {
    audit: redb::Table<'t, u64, &'static [u8]>,
    heads: redb::Table<'t, &'static str, &'static str>,
    index: redb::Table<'t, (&'static str, u64), ()>,
    meta: redb::Table<'t, &'static str, u64>,
    next_seq: u64,
}

impl<'t> AuditChain<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self, StoreError> {
        let meta = txn.open_table(META)?;
        let next_seq = match meta.get(NEXT_AUDIT_SEQ)? {
            Some(value) => value.value(),
            None => 1,
        };
        Ok(AuditChain {
            audit: txn.open_table(AUDIT)?,
            heads: txn.open_table(AUDIT_HEADS)?,
            index: txn.open_table(AUDIT_BY_TENANT)?,
            meta,
            next_seq,
        })
    }

    /// Appends `record`; returns it as stored (with `seq` and hashes).
    fn append(&mut self, record: &AuditRecord) -> Result<AuditRecord, StoreError> {
        let mut record = record.clone();
        record.seq = self.next_seq;
        record.prev_hash = match self.heads.get(record.tenant.as_str())? {
            Some(head) => head.value().to_owned(),
            None => GENESIS_PREV_HASH.to_owned(),
        };
        record.hash = record_hash(&record);
        self.heads
            .insert(record.tenant.as_str(), record.hash.as_str())?;
        self.audit
            .insert(self.next_seq, encode(&record)?.as_slice())?;
        self.index
            .insert((record.tenant.as_str(), self.next_seq), ())?;
        self.next_seq += 1;
        Ok(record)
    }

    /// Stores the next sequence number.
    fn finish(mut self) -> Result<(), StoreError> {
        self.meta.insert(NEXT_AUDIT_SEQ, self.next_seq)?;
        Ok(())
    }
}

/// Up to `limit` records of a keyed table after `after` (in key order) that `keep` accepts,
/// and whether more follow; one record decoded at a time.
fn read_page<T>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    after: Option<&str>,
    limit: usize,
    decode: fn(&str, &[u8]) -> Result<T, StoreError>,
    keep: &dyn Fn(&T) -> bool,
) -> Result<(Vec<T>, bool), StoreError> {
    let range = match after {
        Some(after) => {
            table.range::<&str>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))?
        }
        None => table.range::<&str>(..)?,
    };
    let mut page = Vec::new();
    for entry in range {
        let (key, value) = entry?;
        let record = decode(key.value(), value.value())?;
        if keep(&record) {
            if page.len() == limit {
                return Ok((page, true));
            }
            page.push(record);
        }
    }
    Ok((page, false))
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::suite::{phone, record, station, whole_chain, Place};
    use super::super::{Backend, Store};
    use super::*;

    /// A redb store's place: a file in a temporary directory.
    pub(in crate::store) struct RedbPlace(tempfile::TempDir);

    impl RedbPlace {
        fn path(&self) -> std::path::PathBuf {
            self.0.path().join("fleet.redb")
        }
    }

    /// The database under `store`, to edit behind its back.
    fn db(store: &Store) -> &Database {
        match &store.backend {
            Backend::Redb(store) => store.database(),
            Backend::Postgres(_) => panic!("not a redb store"),
        }
    }

    impl Place for RedbPlace {
        fn new() -> Self {
            RedbPlace(tempfile::tempdir().unwrap())
        }

        fn open(&self) -> Store {
            Store::open(&self.path()).unwrap()
        }

        fn edit_audit(&self, store: &Store, seq: u64, edit: &dyn Fn(&mut AuditRecord)) {
            let txn = db(store).begin_write().unwrap();
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

        fn remove_audit(&self, store: &Store, seq: u64) {
            let txn = db(store).begin_write().unwrap();
            txn.open_table(AUDIT).unwrap().remove(seq).unwrap();
            txn.commit().unwrap();
        }
    }

    #[test]
    fn a_store_open_elsewhere_is_refused_as_in_use() {
        let place = RedbPlace::new();
        let _first = place.open();
        match Store::open(&place.path()) {
            Err(StoreError::AlreadyOpen(p)) => assert_eq!(p, place.path()),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("opened twice"),
        }
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let place = RedbPlace::new();
        let store = place.open();
        store
            .apply(vec![Change::Audit(record("default", "a"))])
            .unwrap();
        let other = serde_json::to_vec(&station("S9")).unwrap();
        let txn = db(&store).begin_write().unwrap();
        {
            let mut stations = txn.open_table(STATIONS).unwrap();
            stations.insert("S1", b"{not json".as_slice()).unwrap();
            stations.insert("S2", other.as_slice()).unwrap();
            let mut audit = txn.open_table(AUDIT).unwrap();
            audit.insert(99, b"[]".as_slice()).unwrap();
            let mut index = txn.open_table(AUDIT_BY_TENANT).unwrap();
            index.insert(("default", 99), ()).unwrap();
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

    #[test]
    fn a_record_put_into_the_file_without_the_store_is_not_shown() {
        let place = RedbPlace::new();
        let store = place.open();
        store
            .apply(vec![
                Change::Audit(record("small", "first")),
                Change::Audit(record("small", "last")),
            ])
            .unwrap();
        // Not in the index (tenant, seq), so no read of the tenant finds it.
        let txn = db(&store).begin_write().unwrap();
        {
            let mut forged = record("small", "forged");
            forged.seq = 10_000;
            let bytes = serde_json::to_vec(&forged).unwrap();
            txn.open_table(AUDIT)
                .unwrap()
                .insert(10_000, bytes.as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
        assert_eq!(store.audit("small", 10).unwrap().len(), 2);
        assert_eq!(whole_chain(&store, "small", 10).len(), 2);
    }

    #[test]
    fn records_from_before_the_chain_decode_and_the_chain_starts_after_them() {
        let place = RedbPlace::new();
        {
            // A store written before the chain: no heads table, records without hashes.
            let db = Database::create(place.path()).unwrap();
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
        let store = place.open();
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

    #[test]
    fn a_store_from_before_the_index_gets_it_when_opened() {
        let place = RedbPlace::new();
        {
            let store = place.open();
            store
                .apply(vec![
                    Change::Audit(record("a", "1")),
                    Change::Audit(record("b", "2")),
                    Change::Audit(record("a", "3")),
                ])
                .unwrap();
            // As a store written before the index: no index, no mark.
            let txn = db(&store).begin_write().unwrap();
            txn.delete_table(AUDIT_BY_TENANT).unwrap();
            txn.open_table(META).unwrap().remove(AUDIT_INDEXED).unwrap();
            txn.commit().unwrap();
        }
        let store = place.open();
        let a = whole_chain(&store, "a", 1);
        assert_eq!(a.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(crate::audit::verify_chain(&a, None), Ok(()));
        assert_eq!(store.audit("b", 10).unwrap().len(), 1);
    }

    #[test]
    fn a_store_from_before_phones_opens_with_none() {
        let place = RedbPlace::new();
        {
            // Only the tables of the station-only store.
            let db = Database::create(place.path()).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(STATIONS).unwrap();
            txn.open_table(AUDIT).unwrap();
            txn.open_table(META).unwrap();
            txn.commit().unwrap();
        }
        let store = place.open();
        assert!(store.phones(None).unwrap().is_empty());
        assert_eq!(store.whitelists().unwrap(), Whitelists::default());
    }

    #[test]
    fn corrupt_phone_records_are_errors_not_panics() {
        let place = RedbPlace::new();
        let store = place.open();
        let other = serde_json::to_vec(&phone("000000000009", "default")).unwrap();
        let txn = db(&store).begin_write().unwrap();
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
