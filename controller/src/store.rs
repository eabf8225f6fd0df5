//! The durable store of stations, phones, whitelists and audit records; the only module that
//! knows redb.
//!
//! Writes are group-committed: [`Store::apply`] and [`Store::apply_async`] hand their changes to
//! one writer thread, which commits everything queued at that moment in ONE transaction (one
//! fsync) and only then answers each caller. A caller is never answered before its changes are
//! durable. [`Store::begin`] opens a transaction of the caller's own, whose reads see its own
//! writes: the controller handles a batch of messages in one (see `control.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use fleet_broker::metrics::Metrics;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

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

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (another fleetd) has the file open: redb locks it.
    #[error("{} is in use by another process", .0.display())]
    AlreadyOpen(PathBuf),
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
    /// The writer thread is gone (the store is shutting down).
    #[error("the store is closed")]
    Closed,
    /// An earlier write of this transaction failed; it will not be committed.
    #[error("an earlier write of this transaction failed: {0}")]
    Poisoned(String),
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
    /// Notes an identity-mismatch refusal of the station at `at` (`station::mismatch_noted`),
    /// read and written in the commit's own transaction, so that an admission never overwrites
    /// what a batch changed meanwhile; nothing if the station is gone.
    NoteMismatch {
        serial: Serial,
        at: time::OffsetDateTime,
    },
    Audit(AuditRecord),
    /// When a station was last seen (whole seconds since the Unix epoch); no audit record.
    /// Skipped if the station has no record when it is committed.
    Seen(Serial, i64),
}

/// Most requests the writer commits in one transaction.
const MAX_GROUP: usize = 512;
/// How long the writer waits for more requests before a commit while it is busy.
const GROUP_LINGER: std::time::Duration = std::time::Duration::from_micros(500);

type WriteResult = Result<Vec<AuditRecord>, StoreError>;

enum Reply {
    Sync(mpsc::SyncSender<WriteResult>),
    Async(tokio::sync::oneshot::Sender<WriteResult>),
}

impl Reply {
    fn send(self, result: WriteResult) {
        // A caller that stopped waiting (a dropped future) does not need the answer; its
        // changes are committed all the same.
        match self {
            Reply::Sync(tx) => {
                let _ = tx.send(result);
            }
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
        }
    }
}

struct WriteRequest {
    changes: Vec<Change>,
    reply: Reply,
}

/// The controller's durable state, in one redb file.
pub struct Store {
    db: Arc<Database>,
    writer: Option<mpsc::Sender<WriteRequest>>,
    thread: Option<JoinHandle<()>>,
    timer: CommitTimer,
    /// True while the writer thread runs ([`Store::writer_alive`]).
    alive: Arc<AtomicBool>,
}

/// Where the time of each commit goes, once fleetd has its metrics ([`Store::time_commits`]).
#[derive(Clone, Default)]
struct CommitTimer(Arc<OnceLock<Arc<Metrics>>>);

impl CommitTimer {
    /// Commits `txn` (durably: redb's default durability fsyncs), timed.
    fn commit(&self, txn: WriteTransaction) -> Result<(), redb::CommitError> {
        let start = Instant::now();
        let result = txn.commit();
        if let Some(metrics) = self.0.get() {
            metrics.store_commit(start.elapsed());
        }
        result
    }
}

/// Clears the writer's liveness flag when its thread ends, however it ends.
struct WriterAlive(Arc<AtomicBool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

impl Drop for Store {
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
        // While requests keep coming (the last group had company), wait a moment for more:
        // fewer, larger commits. An isolated request is committed at once.
        let linger_until = busy.then(|| std::time::Instant::now() + GROUP_LINGER);
        while group.len() < MAX_GROUP {
            let next = match linger_until {
                Some(until) => {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    queue.recv_timeout(left).ok()
                }
                None => queue.try_recv().ok(),
            };
            match next {
                Some(request) => group.push(request),
                None => break,
            }
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
    let mut results = Vec::with_capacity(group.len());
    for request in group {
        match write_changes(&txn, &request.changes) {
            Ok(records) => results.push(records),
            Err(error) => {
                let _ = txn.abort();
                return Err(error);
            }
        }
    }
    timer.commit(txn)?;
    Ok(results)
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
    timer.commit(txn)?;
    Ok(stored)
}

/// The reads of records, the same through a read transaction ([`Store`]) and through a write
/// transaction ([`StoreTxn`], which sees its own writes): `$txn` is what tables are opened on.
macro_rules! record_reads {
    ($self:ident => $txn:expr) => {
        /// The record of one station.
        pub fn station(&$self, serial: &Serial) -> Result<Option<Station>, StoreError> {
            read_station(&$txn.open_table(STATIONS)?, serial)
        }

        /// All station records, sorted by serial.
        pub fn stations(&$self) -> Result<Vec<Station>, StoreError> {
            read_stations(&$txn.open_table(STATIONS)?)
        }

        /// The record of one phone.
        pub fn phone(&$self, mac: &Mac) -> Result<Option<Phone>, StoreError> {
            read_phone(&$txn.open_table(PHONES)?, mac)
        }

        /// The phone records of `tenant` (of all tenants for `None`), sorted by MAC.
        pub fn phones(&$self, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError> {
            read_phones(&$txn.open_table(PHONES)?, tenant)
        }

        /// A page of stations: up to `limit` records with a serial after `after` that `keep`
        /// accepts, in serial order, and whether more such records follow. Reads one record at
        /// a time: memory is bounded by the page, whatever the size of the table.
        pub fn stations_page(
            &$self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Station) -> bool,
        ) -> Result<(Vec<Station>, bool), StoreError> {
            read_page(&$txn.open_table(STATIONS)?, after, limit, decode_station, keep)
        }

        /// A page of phones, as `stations_page`.
        pub fn phones_page(
            &$self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Phone) -> bool,
        ) -> Result<(Vec<Phone>, bool), StoreError> {
            read_page(&$txn.open_table(PHONES)?, after, limit, decode_phone, keep)
        }

        /// The newest `limit` audit records of `tenant`, oldest first.
        pub fn audit(&$self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
            let (index, audit) = ($txn.open_table(AUDIT_BY_TENANT)?, $txn.open_table(AUDIT)?);
            read_audit(&index, &audit, tenant, limit)
        }

        /// Up to `limit` audit records of `tenant` with `seq` above `after_seq`, oldest first:
        /// a page of the tenant's whole chain, from `after_seq` 0 on, each next page after the
        /// last `seq`.
        pub fn audit_page(
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

/// redb's page cache, at most. Its default (1 GiB) keeps every page written in memory, so the
/// audit log (a record per CONNECT) grew fleetd's memory with every session it had seen; the
/// stations, phones and whitelists of a large fleet and the newest audit pages fit in this.
pub const CACHE_BYTES: usize = 64 << 20;

impl Store {
    /// Opens the store at `path`, creating the file and its tables if missing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
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
        let timer = CommitTimer::default();
        let alive = Arc::new(AtomicBool::new(true));
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn({
                let (db, timer, alive) = (db.clone(), timer.clone(), WriterAlive(alive.clone()));
                move || {
                    let _alive = alive;
                    run_writer(db, queue, timer)
                }
            })
            .map_err(|e| StoreError::Encode(format!("cannot start the store writer: {e}")))?;
        Ok(Store {
            db,
            writer: Some(writer),
            thread: Some(thread),
            timer,
            alive,
        })
    }

    /// When each station was last seen ([`Change::Seen`]), in whole seconds since the Unix
    /// epoch. An entry that names no valid serial (never written by fleetd) is skipped.
    pub fn sightings(&self) -> Result<Vec<(Serial, i64)>, StoreError> {
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

    /// From now on, the time of every commit (the writer's and [`StoreTxn::commit`]'s) goes
    /// to `metrics`. Only the first call counts.
    pub fn time_commits(&self, metrics: Arc<Metrics>) {
        let _ = self.timer.0.set(metrics);
    }

    /// True while the writer thread runs (for `/healthz`).
    pub fn writer_alive(&self) -> Arc<AtomicBool> {
        self.alive.clone()
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

    /// Applies all changes atomically (with whatever else is queued at the moment, in one
    /// transaction) and returns the audit records with their assigned `seq`, `prev_hash` and
    /// `hash`: each record is chained onto its tenant's newest one (PROTOCOL §7). Either every
    /// change is stored or none is. Returns once the changes are durable; blocks the thread.
    pub fn apply(&self, changes: Vec<Change>) -> Result<Vec<AuditRecord>, StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(changes, Reply::Sync(tx))?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    /// [`Store::apply`] for async callers: the returned future completes once the changes are
    /// durable. The changes are queued at once, whether the future is awaited or not.
    pub fn apply_async(
        &self,
        changes: Vec<Change>,
    ) -> impl std::future::Future<Output = Result<Vec<AuditRecord>, StoreError>> + Send + 'static
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let queued = self.submit(changes, Reply::Async(tx));
        async move {
            queued?;
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    fn submit(&self, changes: Vec<Change>, reply: Reply) -> Result<(), StoreError> {
        self.writer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(WriteRequest { changes, reply })
            .map_err(|_| StoreError::Closed)
    }

    /// A write transaction of the caller's own: its reads see its own writes; nothing is
    /// durable (or visible to anyone else) before [`StoreTxn::commit`].
    pub fn begin(&self) -> Result<StoreTxn, StoreError> {
        Ok(StoreTxn {
            txn: self.db.begin_write()?,
            timer: self.timer.clone(),
            records: Vec::new(),
            poisoned: None,
            wrote: false,
        })
    }

    record_reads!(self => self.db.begin_read()?);
}

/// A write transaction held by its caller ([`Store::begin`]). Reads go through it and see its
/// own writes. If any write fails, the transaction is poisoned and will not commit.
pub struct StoreTxn {
    txn: WriteTransaction,
    timer: CommitTimer,
    records: Vec<AuditRecord>,
    poisoned: Option<String>,
    /// Whether any change was written.
    wrote: bool,
}

impl StoreTxn {
    record_reads!(self => self.txn);

    /// Writes changes into the transaction; their audit records, with `seq` and hashes, come
    /// back from [`StoreTxn::commit`].
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), StoreError> {
        if let Some(reason) = &self.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        self.wrote |= !changes.is_empty();
        match write_changes(&self.txn, &changes) {
            Ok(records) => {
                self.records.extend(records);
                Ok(())
            }
            Err(error) => {
                // Part of the changes may be written: the whole transaction is void.
                self.poisoned = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Commits (durably: one fsync) and returns every audit record written, in order. A
    /// transaction that wrote nothing (a batch of `status` messages) costs no fsync.
    pub fn commit(self) -> Result<Vec<AuditRecord>, StoreError> {
        if let Some(reason) = self.poisoned {
            let _ = self.txn.abort();
            return Err(StoreError::Poisoned(reason));
        }
        if !self.wrote {
            self.txn.abort()?;
            return Ok(self.records);
        }
        self.timer.commit(self.txn)?;
        Ok(self.records)
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
    // A table is opened only when a change needs it: opening one looks it up, and closing it
    // writes its root back, and a batch applies one command's changes at a time (an accept
    // touches two of the six tables).
    let mut stations = None;
    let mut phones = None;
    let mut singles = None;
    let mut seen = None;
    let mut chain = None;
    let mut stored = Vec::new();
    for change in changes {
        match change {
            Change::PutStation(station) => {
                let table = opened(&mut stations, txn, STATIONS)?;
                table.insert(station.serial.as_str(), encode(station)?.as_slice())?;
            }
            Change::NoteMismatch { serial, at } => {
                let table = opened(&mut stations, txn, STATIONS)?;
                if let Some(station) = read_station(&*table, serial)? {
                    let noted = crate::station::mismatch_noted(station, *at);
                    table.insert(serial.as_str(), encode(&noted)?.as_slice())?;
                }
            }
            Change::DeleteStation(serial) => {
                opened(&mut stations, txn, STATIONS)?.remove(serial.as_str())?;
                opened(&mut seen, txn, SEEN)?.remove(serial.as_str())?;
            }
            Change::Seen(serial, at) => {
                // Only for a station that has a record: one removed since it was seen is not
                // brought back as a sighting. Never back in time: two sweeps' commits (the
                // minute's and a stop's) may land in either order.
                let known = opened(&mut stations, txn, STATIONS)?
                    .get(serial.as_str())?
                    .is_some();
                let table = opened(&mut seen, txn, SEEN)?;
                let before = table.get(serial.as_str())?.map(|v| v.value());
                if known && before.is_none_or(|before| before < *at) {
                    table.insert(serial.as_str(), *at)?;
                }
            }
            Change::PutPhone(phone) => {
                let table = opened(&mut phones, txn, PHONES)?;
                table.insert(phone.mac.as_str(), encode(phone)?.as_slice())?;
            }
            Change::DeletePhone(mac) => {
                opened(&mut phones, txn, PHONES)?.remove(mac.as_str())?;
            }
            Change::PutWhitelists(whitelists) => {
                let table = opened(&mut singles, txn, SINGLES)?;
                table.insert(WHITELISTS, encode(whitelists)?.as_slice())?;
            }
            Change::Audit(record) => {
                let chain = match &mut chain {
                    Some(chain) => chain,
                    None => chain.insert(AuditChain::open(txn)?),
                };
                stored.push(chain.append(record)?);
            }
        }
    }
    if let Some(chain) = chain {
        chain.finish()?;
    }
    Ok(stored)
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

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Encode(error.to_string()))
}

fn decode_audit(seq: u64, bytes: &[u8]) -> Result<AuditRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("audit record {seq}: {error}")))
}

/// A JSON record stored under `key`, which must be its own key (`own_key`): a record under
/// another key means the file was damaged.
fn decode_keyed<T: serde::de::DeserializeOwned>(
    what: &str,
    key: &str,
    bytes: &[u8],
    own_key: impl Fn(&T) -> &str,
) -> Result<T, StoreError> {
    let record: T = serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("{what} {key:?}: {error}")))?;
    let holder = own_key(&record);
    if holder != key {
        return Err(StoreError::Corrupt(format!(
            "{what} {key:?} holds the record of {holder}"
        )));
    }
    Ok(record)
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

fn decode_station(key: &str, bytes: &[u8]) -> Result<Station, StoreError> {
    decode_keyed("station", key, bytes, |s: &Station| s.serial.as_str())
}

fn decode_phone(key: &str, bytes: &[u8]) -> Result<Phone, StoreError> {
    decode_keyed("phone", key, bytes, |p: &Phone| p.mac.as_str())
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
            fingerprint: Some(fleet_protocol::Fingerprint::from_bytes([7; 32])),
            standing: Standing::Unauthorized,
            created_at: T0,
            updated_at: T0,
            last_seen: Some(T0),
            ip: Some("192.0.2.1".into()),
            tenant: "default".into(),
            last_mismatch: None,
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
    fn a_sighting_is_kept_across_a_reopen_and_deleted_with_its_station() {
        let dir = tempfile::tempdir().unwrap();
        let s1 = Serial::parse("S1").unwrap();
        let s2 = Serial::parse("S2").unwrap();
        {
            let store = open(&dir);
            store
                .apply(vec![
                    Change::PutStation(station("S1")),
                    Change::PutStation(station("S2")),
                    Change::Seen(s1.clone(), 1_700_000_000),
                    Change::Seen(s2.clone(), 1_700_000_001),
                    Change::Seen(s1.clone(), 1_700_000_060),
                ])
                .unwrap();
        }
        let store = open(&dir);
        assert_eq!(
            store.sightings().unwrap(),
            [(s1.clone(), 1_700_000_060), (s2.clone(), 1_700_000_001)]
        );
        store
            .apply(vec![Change::DeleteStation(s1.clone())])
            .unwrap();
        assert_eq!(store.sightings().unwrap(), [(s2.clone(), 1_700_000_001)]);
        // An older sighting committed after a newer one does not move it back.
        store
            .apply(vec![Change::Seen(s2.clone(), 1_700_000_000)])
            .unwrap();
        assert_eq!(store.sightings().unwrap(), [(s2.clone(), 1_700_000_001)]);
        // A sighting of a station removed since (or never recorded) does not bring it back.
        store.apply(vec![Change::Seen(s1, 1_700_000_120)]).unwrap();
        assert_eq!(store.sightings().unwrap(), [(s2, 1_700_000_001)]);
    }

    #[test]
    fn a_store_open_elsewhere_is_refused_as_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(&dir);
        let path = dir.path().join("fleet.redb");
        match Store::open(&path) {
            Err(StoreError::AlreadyOpen(p)) => assert_eq!(p, path),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("opened twice"),
        }
    }

    #[test]
    fn commits_are_timed_once_asked_to_be_and_the_writer_is_alive() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let metrics = Arc::new(Metrics::new());
        store.time_commits(metrics.clone());
        assert!(store.writer_alive().load(Ordering::Relaxed));
        store
            .apply(vec![Change::PutStation(station("T1"))])
            .unwrap();
        let text = metrics.encode(&Default::default());
        assert!(
            text.lines()
                .any(|l| l == "fleetd_store_commit_seconds_count 1"),
            "{text}"
        );
        let alive = store.writer_alive();
        drop(store);
        assert!(
            !alive.load(Ordering::Relaxed),
            "the writer ended with the store"
        );
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
    fn concurrent_applies_are_grouped_yet_each_is_atomic_and_chained() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(open(&dir));
        let mut bad = station("BAD");
        bad.updated_at = T0.to_offset(time::UtcOffset::from_hms(0, 0, 30).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                let bad = bad.clone();
                std::thread::spawn(move || {
                    let mut ok = 0;
                    for i in 0..25 {
                        let serial = format!("T{t}N{i}");
                        let mut changes = vec![
                            Change::PutStation(station(&serial)),
                            Change::Audit(record("default", "auth_request")),
                        ];
                        // Every fifth request cannot be stored: it must fail alone.
                        if i % 5 == 4 {
                            changes.push(Change::PutStation(bad.clone()));
                        }
                        match store.apply(changes) {
                            Ok(records) => {
                                assert_eq!(records.len(), 1);
                                ok += 1;
                            }
                            Err(e) => assert!(matches!(e, StoreError::Encode(_)), "{e}"),
                        }
                    }
                    ok
                })
            })
            .collect();
        let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(ok, 8 * 20);
        let stations = store.stations().unwrap();
        assert_eq!(stations.len(), 8 * 20);
        assert!(stations
            .iter()
            .all(|s| !s.serial.as_str().starts_with("BAD")));
        for t in 0..8 {
            for i in 0..25 {
                let stored = store
                    .station(&Serial::parse(&format!("T{t}N{i}")).unwrap())
                    .unwrap();
                assert_eq!(stored.is_some(), i % 5 != 4, "T{t}N{i}");
            }
        }
        // One unbroken chain with gapless sequence numbers.
        let chain = whole_chain(&store, "default", 7);
        assert_eq!(chain.len(), 8 * 20);
        for (n, pair) in chain.windows(2).enumerate() {
            assert_eq!(pair[1].prev_hash, pair[0].hash, "record {n}");
            assert_eq!(pair[1].seq, pair[0].seq + 1);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn apply_async_answers_after_the_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let pending: Vec<_> = (0..50)
            .map(|i| {
                store.apply_async(vec![
                    Change::PutStation(station(&format!("A{i}"))),
                    Change::Audit(record("default", "connect")),
                ])
            })
            .collect();
        let mut seqs = Vec::new();
        for p in pending {
            seqs.push(p.await.unwrap()[0].seq);
        }
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
        assert_eq!(store.stations().unwrap().len(), 50);
    }

    #[test]
    fn a_callers_transaction_reads_its_own_writes_and_commits_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut txn = store.begin().unwrap();
        let serial = Serial::parse("S1").unwrap();
        txn.apply(vec![
            Change::PutStation(station("S1")),
            Change::Audit(record("default", "a")),
        ])
        .unwrap();
        assert!(txn.station(&serial).unwrap().is_some());
        assert_eq!(txn.stations().unwrap().len(), 1);
        assert_eq!(txn.audit("default", 10).unwrap().len(), 1);
        let records = txn.commit().unwrap();
        assert_eq!(records.len(), 1);
        assert!(store.station(&serial).unwrap().is_some());

        // A failed write poisons the transaction: nothing of it is committed.
        let mut txn = store.begin().unwrap();
        txn.apply(vec![Change::DeleteStation(serial.clone())])
            .unwrap();
        let mut bad = station("S2");
        bad.updated_at = T0.to_offset(time::UtcOffset::from_hms(0, 0, 30).unwrap());
        assert!(txn.apply(vec![Change::PutStation(bad)]).is_err());
        assert!(matches!(
            txn.apply(vec![Change::Audit(record("default", "b"))]),
            Err(StoreError::Poisoned(_))
        ));
        assert!(matches!(txn.commit(), Err(StoreError::Poisoned(_))));
        assert!(store.station(&serial).unwrap().is_some());
        assert_eq!(store.audit("default", 10).unwrap().len(), 1);
    }

    /// The store in `dir` after `changes` were applied and it was closed and opened again.
    fn reopened(dir: &tempfile::TempDir, changes: Vec<Change>) -> Store {
        open(dir).apply(changes).unwrap();
        open(dir)
    }

    #[test]
    fn reopen_keeps_everything_and_seq_keeps_rising() {
        let dir = tempfile::tempdir().unwrap();
        let store = reopened(
            &dir,
            vec![
                Change::PutStation(station("S1")),
                Change::Audit(record("default", "a")),
                Change::Audit(record("default", "b")),
            ],
        );
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

    /// A store with ten audit records `a0`…`a9`, the even ones of `default`, the odd of `other`.
    fn with_ten_audit_records(dir: &tempfile::TempDir) -> Store {
        let store = open(dir);
        let changes = (0..10)
            .map(|i| {
                let tenant = if i % 2 == 0 { "default" } else { "other" };
                Change::Audit(record(tenant, &format!("a{i}")))
            })
            .collect();
        store.apply(changes).unwrap();
        store
    }

    #[test]
    fn audit_is_per_tenant_newest_last_and_limited() {
        let dir = tempfile::tempdir().unwrap();
        let store = with_ten_audit_records(&dir);
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
        let store = with_ten_audit_records(&dir);
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

    #[test]
    fn a_small_tenant_reads_its_own_records_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir);
        let mut changes: Vec<Change> = (0..500)
            .map(|i| Change::Audit(record("big", &format!("b{i}"))))
            .collect();
        changes.insert(10, Change::Audit(record("small", "first")));
        changes.push(Change::Audit(record("small", "last")));
        store.apply(changes).unwrap();
        let small = store.audit("small", 10).unwrap();
        assert_eq!(
            small.iter().map(|r| r.action.as_str()).collect::<Vec<_>>(),
            ["first", "last"]
        );
        assert_eq!(store.audit("big", 3).unwrap().len(), 3);
        assert_eq!(whole_chain(&store, "small", 1).len(), 2);
        // The index names (tenant, seq): a page after the tenant's first record starts at its
        // second, and nothing of another tenant is read in between.
        let first = small[0].seq;
        let page = store.audit_page("small", first, 10).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].action, "last");
        // A record put into the file without the store (not in the index) is not shown.
        let txn = store.db.begin_write().unwrap();
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
    }

    #[test]
    fn a_store_from_before_the_index_gets_it_when_opened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.redb");
        {
            let store = Store::open(&path).unwrap();
            store
                .apply(vec![
                    Change::Audit(record("a", "1")),
                    Change::Audit(record("b", "2")),
                    Change::Audit(record("a", "3")),
                ])
                .unwrap();
            // As a store written before the index: no index, no mark.
            let txn = store.db.begin_write().unwrap();
            txn.delete_table(AUDIT_BY_TENANT).unwrap();
            txn.open_table(META).unwrap().remove(AUDIT_INDEXED).unwrap();
            txn.commit().unwrap();
        }
        let store = Store::open(&path).unwrap();
        let a = whole_chain(&store, "a", 1);
        assert_eq!(a.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(crate::audit::verify_chain(&a, None), Ok(()));
        assert_eq!(store.audit("b", 10).unwrap().len(), 1);
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
        let store = reopened(
            &dir,
            vec![
                Change::PutPhone(phone("000000000001", "default")),
                Change::PutWhitelists(whitelists()),
                Change::PutStation(station("S1")),
            ],
        );
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
