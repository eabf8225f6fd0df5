//! The durable store of stations, phones, whitelists and audit records, behind one interface
//! with two backends: an embedded redb file ([`Store::open`], the default) and a PostgreSQL
//! database ([`Store::open_postgres`]). Only this module knows either.
//!
//! Writes are group-committed: [`Store::apply`] and [`Store::apply_async`] hand their changes to
//! one writer (a thread for redb, a task on the store's own thread for PostgreSQL), which
//! commits everything queued at that moment in ONE transaction (one fsync) and only then answers
//! each caller. A caller is never answered before its changes are durable. [`Store::begin`]
//! opens a transaction of the caller's own, whose reads see its own writes: the controller
//! handles a batch of messages in one (see `control.rs`).
//!
//! Both backends keep the same rules, and `suite.rs` holds the one test suite that both pass:
//! - one write transaction at a time. redb has only one; PostgreSQL's write transactions take
//!   the transaction-level advisory lock [`postgres::WRITE_LOCK`] first, so the writer and a
//!   caller's transaction wait for each other exactly as they do on redb (`control/durable.rs`
//!   relies on that order, and never waits for the writer while it holds a transaction);
//! - records are the same serde JSON (a redb value; a PostgreSQL `json` column, which keeps the
//!   text as written), under their key (serial, MAC; a PostgreSQL column `COLLATE "C"`, so keys
//!   sort in byte order as redb sorts them), and a record under another key is corrupt;
//! - the audit log: a global sequence number that is never reused (redb: `meta`'s
//!   `next_audit_seq`; PostgreSQL: the row `counters.next_audit_seq`, read and written in the
//!   commit's transaction, so a rolled-back transaction leaves no gap), each tenant's head (the
//!   `hash` of its newest record, `audit_heads`) from which the next record's `prev_hash` comes,
//!   and an index by (tenant, seq) (redb: the table `audit_by_tenant`; PostgreSQL: the index
//!   `audit_by_tenant` on `audit`);
//! - [`Change::NoteMismatch`] reads the station and writes it in the commit's own transaction;
//!   [`Change::Seen`] is skipped for a station without a record and never moves a sighting back
//!   (PostgreSQL: one `INSERT … WHERE EXISTS … ON CONFLICT … DO UPDATE … WHERE seen.at < …`), and
//!   a sighting is deleted with its station (PostgreSQL: a foreign key `ON DELETE CASCADE`);
//! - pages are read a bounded number of records at a time (redb: a range iterator; PostgreSQL:
//!   keyset queries `WHERE key > $after ORDER BY key LIMIT n`).
//!
//! PostgreSQL's schema is in `controller/migrations/`, plain SQL, versioned; [`Store::open_postgres`]
//! applies the missing ones in one transaction and refuses a database migrated by a newer fleetd.
//!
//! Several fleetds may open one PostgreSQL database: one serves, the others wait in
//! [`Store::open_postgres`] (active/standby on PostgreSQL's advisory lock, fenced by a
//! controller epoch: `lease.rs`). redb needs nothing of the kind: the file is locked.

mod lease;
mod postgres;
mod redb;

#[cfg(test)]
mod suite;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Instant;

use fleet_broker::metrics::Metrics;

use crate::audit::AuditRecord;
use crate::phone::Phone;
use crate::station::Station;
use crate::whitelist::Whitelists;
use fleet_protocol::{Mac, Serial};

pub use self::lease::Lease;
pub use self::redb::CACHE_BYTES;

/// What went wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (another fleetd) has the file open: redb locks it.
    #[error("{} is in use by another process", .0.display())]
    AlreadyOpen(PathBuf),
    #[error("cannot open the store: {0}")]
    Database(#[from] ::redb::DatabaseError),
    #[error("store transaction: {0}")]
    Transaction(#[from] ::redb::TransactionError),
    #[error("store table: {0}")]
    Table(#[from] ::redb::TableError),
    #[error("store storage: {0}")]
    Storage(#[from] ::redb::StorageError),
    #[error("store commit: {0}")]
    Commit(#[from] ::redb::CommitError),
    /// PostgreSQL refused a statement, or the connection to it failed or was lost (the
    /// message says which). A lost connection is replaced by the next request.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The PostgreSQL database was migrated by a newer fleetd, or its migrations cannot run.
    #[error("the PostgreSQL schema: {0}")]
    Schema(String),
    /// A stored record that does not decode: the store was damaged or written by a newer version.
    #[error("corrupt record in the store: {0}")]
    Corrupt(String),
    /// A record that cannot be written as JSON (a time RFC 3339 cannot express).
    #[error("cannot encode a record: {0}")]
    Encode(String),
    /// The writer is gone (the store is shutting down).
    #[error("the store is closed")]
    Closed,
    /// A PostgreSQL store that does not hold the controller lock (`lease.rs`) writes nothing:
    /// its lock connection is lost, or another fleetd took over the database.
    #[error("not the serving controller: {0}")]
    NotLeader(String),
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
/// How long the writer sleeps before it takes more requests into a commit while it is busy
/// (an isolated request is committed at once), for both backends; the figures here are
/// redb's. It sleeps rather than waits on its queue, so the requests that arrive meanwhile do
/// not each wake it. A commit costs about 0.2 ms of CPU however few records it holds; in a storm of CONNECTs (an audit record each) 2 ms makes groups of about
/// six instead of two and a half, halves the commits and cuts the writer's CPU by a third,
/// for at most 2 ms more before a CONNACK (BENCHMARKS.md, issue 11, ninth day).
const GROUP_LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// Adds to `group` what `next` gives without waiting (what is queued), up to [`MAX_GROUP`]:
/// both backends' writers take their groups this way.
fn take_queued(group: &mut Vec<WriteRequest>, mut next: impl FnMut() -> Option<WriteRequest>) {
    while group.len() < MAX_GROUP {
        match next() {
            Some(request) => group.push(request),
            None => break,
        }
    }
}

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

/// Changes queued for the writer, and where its answer goes.
struct WriteRequest {
    changes: Vec<Change>,
    reply: Reply,
}

/// Where the time of each commit goes, once fleetd has its metrics ([`Store::time_commits`]).
#[derive(Clone, Default)]
struct CommitTimer(Arc<OnceLock<Arc<Metrics>>>);

impl CommitTimer {
    /// Records a commit that started at `start` and has just ended.
    fn observe(&self, start: Instant) {
        if let Some(metrics) = self.0.get() {
            metrics.store_commit(start.elapsed());
        }
    }
}

/// Clears the writer's liveness flag when the writer ends, however it ends.
struct WriterAlive(Arc<AtomicBool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// The reads of records, the same through the store (committed state) and through a caller's
/// transaction (which sees its own writes); each backend implements them on both.
trait RecordReads {
    fn station(&self, serial: &Serial) -> Result<Option<Station>, StoreError>;
    fn stations(&self) -> Result<Vec<Station>, StoreError>;
    fn phone(&self, mac: &Mac) -> Result<Option<Phone>, StoreError>;
    fn phones(&self, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError>;
    fn stations_page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&Station) -> bool,
    ) -> Result<(Vec<Station>, bool), StoreError>;
    fn phones_page(
        &self,
        after: Option<&str>,
        limit: usize,
        keep: &dyn Fn(&Phone) -> bool,
    ) -> Result<(Vec<Phone>, bool), StoreError>;
    fn audit(&self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    fn audit_page(
        &self,
        tenant: &str,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// The public reads of [`Store`] and [`StoreTxn`], each handed to `$self.reads()`.
macro_rules! record_reads {
    ($self:ident) => {
        /// The record of one station.
        pub fn station(&$self, serial: &Serial) -> Result<Option<Station>, StoreError> {
            $self.reads().station(serial)
        }

        /// All station records, sorted by serial.
        pub fn stations(&$self) -> Result<Vec<Station>, StoreError> {
            $self.reads().stations()
        }

        /// The record of one phone.
        pub fn phone(&$self, mac: &Mac) -> Result<Option<Phone>, StoreError> {
            $self.reads().phone(mac)
        }

        /// The phone records of `tenant` (of all tenants for `None`), sorted by MAC.
        pub fn phones(&$self, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError> {
            $self.reads().phones(tenant)
        }

        /// A page of stations: up to `limit` records with a serial after `after` that `keep`
        /// accepts, in serial order, and whether more such records follow. Reads a bounded
        /// number of records at a time: memory is bounded by the page, whatever the size of
        /// the table.
        pub fn stations_page(
            &$self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Station) -> bool,
        ) -> Result<(Vec<Station>, bool), StoreError> {
            $self.reads().stations_page(after, limit, keep)
        }

        /// A page of phones, as `stations_page`.
        pub fn phones_page(
            &$self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Phone) -> bool,
        ) -> Result<(Vec<Phone>, bool), StoreError> {
            $self.reads().phones_page(after, limit, keep)
        }

        /// The newest `limit` audit records of `tenant`, oldest first.
        pub fn audit(&$self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
            $self.reads().audit(tenant, limit)
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
            $self.reads().audit_page(tenant, after_seq, limit)
        }
    };
}

/// The controller's durable state: a redb file or a PostgreSQL database.
pub struct Store {
    backend: Backend,
    timer: CommitTimer,
    /// True while the writer runs ([`Store::writer_alive`]).
    alive: Arc<AtomicBool>,
}

enum Backend {
    Redb(redb::RedbStore),
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens the redb store at `path`, creating the file and its tables if missing. A file that
    /// another process has open is [`StoreError::AlreadyOpen`].
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(path, redb::CACHE_BYTES)
    }

    /// Whether reads are served on the caller's thread from the local file (redb: from redb's
    /// page cache or the system's, microseconds), not by a server over the network
    /// (PostgreSQL).
    pub fn reads_are_local(&self) -> bool {
        matches!(self.backend, Backend::Redb(_))
    }

    /// As [`Store::open`], with redb's page cache at most `cache_bytes` (`[store] cache_mib`).
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        let (timer, alive) = (CommitTimer::default(), Arc::new(AtomicBool::new(true)));
        let backend =
            redb::RedbStore::open(path, cache_bytes, timer.clone(), WriterAlive(alive.clone()))?;
        Ok(Store {
            backend: Backend::Redb(backend),
            timer,
            alive,
        })
    }

    /// Opens the store in the PostgreSQL database at `url` (`postgres://user@host:port/db`,
    /// or libpq's `key=value` form; no TLS), after applying the schema's missing migrations
    /// (`controller/migrations/`) in one transaction. Blocks until the database answered; an
    /// unreachable server, a refused login or a schema from a newer fleetd is an error. The
    /// store keeps a pool of connections on a thread of its own, and any thread may call it
    /// (async code too: nothing blocks on a runtime's thread but the caller's own wait).
    ///
    /// Returns only once this store holds the database's controller lock: while another
    /// fleetd serves the database, this one waits here (the standby). See [`Store::lease`].
    pub fn open_postgres(url: &str) -> Result<Store, StoreError> {
        let (timer, alive) = (CommitTimer::default(), Arc::new(AtomicBool::new(true)));
        let backend = postgres::PgStore::open(url, timer.clone(), WriterAlive(alive.clone()))?;
        Ok(Store {
            backend: Backend::Postgres(backend),
            timer,
            alive,
        })
    }

    fn reads(&self) -> &dyn RecordReads {
        match &self.backend {
            Backend::Redb(store) => store,
            Backend::Postgres(store) => store,
        }
    }

    /// When each station was last seen ([`Change::Seen`]), in whole seconds since the Unix
    /// epoch, by serial. An entry that names no valid serial (never written by fleetd) is
    /// skipped.
    pub fn sightings(&self) -> Result<Vec<(Serial, i64)>, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.sightings(),
            Backend::Postgres(store) => store.sightings(),
        }
    }

    /// From now on, the time of every commit (the writer's and [`StoreTxn::commit`]'s) goes
    /// to `metrics`. Only the first call counts.
    pub fn time_commits(&self, metrics: Arc<Metrics>) {
        let _ = self.timer.0.set(metrics);
    }

    /// Where the store stands with the controller lock: `None` for redb (one process has the
    /// file), a PostgreSQL store's [`Lease`] otherwise.
    pub fn lease(&self) -> Option<tokio::sync::watch::Receiver<Lease>> {
        match &self.backend {
            Backend::Redb(_) => None,
            Backend::Postgres(store) => Some(store.lease()),
        }
    }

    /// True while the writer runs (for `/healthz`).
    pub fn writer_alive(&self) -> Arc<AtomicBool> {
        self.alive.clone()
    }

    /// Every tenant's whitelists; empty ones if none were ever stored.
    pub fn whitelists(&self) -> Result<Whitelists, StoreError> {
        match &self.backend {
            Backend::Redb(store) => store.whitelists(),
            Backend::Postgres(store) => store.whitelists(),
        }
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
        let request = WriteRequest { changes, reply };
        match &self.backend {
            Backend::Redb(store) => store.submit(request),
            Backend::Postgres(store) => store.submit(request),
        }
    }

    /// A write transaction of the caller's own: its reads see its own writes; nothing is
    /// durable (or visible to anyone else) before [`StoreTxn::commit`]. Waits while another
    /// write transaction (the writer's, or another caller's) is open.
    pub fn begin(&self) -> Result<StoreTxn, StoreError> {
        let txn = match &self.backend {
            Backend::Redb(store) => Txn::Redb(Box::new(store.begin(self.timer.clone())?)),
            Backend::Postgres(store) => Txn::Postgres(store.begin(self.timer.clone())?),
        };
        Ok(StoreTxn {
            txn,
            records: Vec::new(),
            poisoned: None,
            wrote: false,
        })
    }

    record_reads!(self);
}

/// A write transaction held by its caller ([`Store::begin`]). Reads go through it and see its
/// own writes. If any write fails, the transaction is poisoned and will not commit.
pub struct StoreTxn {
    txn: Txn,
    records: Vec<AuditRecord>,
    poisoned: Option<String>,
    /// Whether any change was written.
    wrote: bool,
}

/// redb's transaction is large (736 bytes) and PostgreSQL's a channel: boxed, one allocation
/// per transaction, so that a `StoreTxn` moves cheaply.
enum Txn {
    Redb(Box<redb::RedbTxn>),
    Postgres(postgres::PgTxn),
}

impl StoreTxn {
    fn reads(&self) -> &dyn RecordReads {
        match &self.txn {
            Txn::Redb(txn) => txn.as_ref(),
            Txn::Postgres(txn) => txn,
        }
    }

    record_reads!(self);

    /// Writes changes into the transaction; their audit records, with `seq` and hashes, come
    /// back from [`StoreTxn::commit`].
    pub fn apply(&mut self, changes: Vec<Change>) -> Result<(), StoreError> {
        if let Some(reason) = &self.poisoned {
            return Err(StoreError::Poisoned(reason.clone()));
        }
        self.wrote |= !changes.is_empty();
        let written = match &mut self.txn {
            Txn::Redb(txn) => txn.write(&changes),
            Txn::Postgres(txn) => txn.write(changes),
        };
        match written {
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
            // The first error is the one to report; an abort that fails as well leaves the
            // transaction uncommitted all the same.
            let _ = self.txn.abort();
            return Err(StoreError::Poisoned(reason));
        }
        if !self.wrote {
            self.txn.abort()?;
            return Ok(self.records);
        }
        self.txn.commit()?;
        Ok(self.records)
    }
}

impl Txn {
    fn abort(self) -> Result<(), StoreError> {
        match self {
            Txn::Redb(txn) => txn.abort(),
            Txn::Postgres(txn) => txn.finish(false),
        }
    }

    fn commit(self) -> Result<(), StoreError> {
        match self {
            Txn::Redb(txn) => txn.commit(),
            Txn::Postgres(txn) => txn.finish(true),
        }
    }
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|error| StoreError::Encode(error.to_string()))
}

fn decode_audit(seq: u64, bytes: &[u8]) -> Result<AuditRecord, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("audit record {seq}: {error}")))
}

fn decode_whitelists(bytes: &[u8]) -> Result<Whitelists, StoreError> {
    serde_json::from_slice(bytes)
        .map_err(|error| StoreError::Corrupt(format!("whitelists: {error}")))
}

/// A JSON record stored under `key`, which must be its own key (`own_key`): a record under
/// another key means the store was damaged.
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

fn decode_station(key: &str, bytes: &[u8]) -> Result<Station, StoreError> {
    decode_keyed("station", key, bytes, |s: &Station| s.serial.as_str())
}

fn decode_phone(key: &str, bytes: &[u8]) -> Result<Phone, StoreError> {
    decode_keyed("phone", key, bytes, |p: &Phone| p.mac.as_str())
}
