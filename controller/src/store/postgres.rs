//! The PostgreSQL backend of the store: plain SQL through `tokio-postgres`, a pool of
//! connections (`deadpool-postgres`), and one thread of the store's own that runs a
//! current-thread tokio runtime: the group-committing writer, every read and every caller's
//! transaction run there, and the store's synchronous callers wait for their answer on a
//! channel (never by `block_on` on anyone's runtime, so async callers are safe too).
//!
//! The schema is `controller/migrations/*.sql`, applied by [`PgStore::open`]; `store/mod.rs`
//! says how each of redb's rules maps onto it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use deadpool_postgres::{
    ClientWrapper, Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod,
};
use fleet_broker::BoxFuture;
use tokio::sync::mpsc as channel;
use tokio::sync::{oneshot, watch};
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::lease::{self, Lease};
use super::{
    decode_audit, decode_phone, decode_station, decode_whitelists, take_queued, Change,
    CommitTimer, RecordReads, StoreError, WriteRequest, WriteResult, WriterAlive, GROUP_LINGER,
    MAX_GROUP,
};
use crate::audit::{record_hash, AuditRecord, GENESIS_PREV_HASH};
use crate::phone::Phone;
use crate::station::Station;
use crate::whitelist::Whitelists;
use fleet_protocol::{Mac, Serial};

/// The key of the transaction-level advisory lock that every write transaction takes first
/// (`pg_advisory_xact_lock`): one write transaction at a time, as in redb. ASCII "fleetstw".
pub(super) const WRITE_LOCK: i64 = 0x666c_6565_7473_7477;

/// One version of the schema: a file of `controller/migrations/`.
pub(super) struct Migration {
    pub(super) version: i32,
    pub(super) name: &'static str,
    pub(super) sql: &'static str,
}

/// Every migration, in order; a database has applied a prefix of them
/// (`schema_migrations`).
pub(super) const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_store.sql",
    sql: include_str!("../../migrations/0001_store.sql"),
}];

/// Connections the store keeps at most: the writer's, a caller's transaction's, and reads.
const POOL_SIZE: usize = 8;
/// How long a connection attempt may take, unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a request waits for a free connection before it fails.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// Rows a page read fetches at a time (keyset: the next chunk starts after the last key).
const PAGE_CHUNK: usize = 256;
/// The name of every tenant's whitelists in `singles`.
const WHITELISTS: &str = "whitelists";
/// The name of the next audit sequence number in `counters`.
const NEXT_AUDIT_SEQ: &str = "next_audit_seq";

/// The store in a PostgreSQL database.
pub(super) struct PgStore {
    runtime: tokio::runtime::Handle,
    pool: Pool,
    writer: Option<channel::UnboundedSender<WriteRequest>>,
    thread: Option<JoinHandle<()>>,
    /// This store's controller epoch (`lease.rs`): every write transaction is fenced on it.
    epoch: i64,
    lease: watch::Receiver<Lease>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it has committed what was queued; its thread
        // then releases the controller lock and ends, and with it the runtime and every
        // connection.
        self.writer.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The SQLSTATE of `fleet_fence` (`migrations/`): another fleetd took over the database.
const FENCED: &str = "FG001";

/// A failed statement or connection, with what was being done and PostgreSQL's own words.
fn pg_error(what: &str, error: &tokio_postgres::Error) -> StoreError {
    if let Some(db) = error.as_db_error() {
        if db.code().code() == FENCED {
            return StoreError::NotLeader(db.message().to_owned());
        }
    }
    match std::error::Error::source(error) {
        Some(cause) => StoreError::Postgres(format!("{what}: {error}: {cause}")),
        None => StoreError::Postgres(format!("{what}: {error}")),
    }
}

fn pool_error(error: PoolError) -> StoreError {
    match error {
        PoolError::Backend(error) => pg_error("cannot connect", &error),
        other => StoreError::Postgres(format!("no connection: {other}")),
    }
}

/// What a request does with a connection: it gets the connection and gives it back with
/// its answer (so the same closure serves the pool's reads and a transaction's connection).
type Job = Box<dyn FnOnce(Object) -> BoxFuture<'static, Object> + Send>;

impl PgStore {
    /// Connects to `url`, applies the missing migrations and starts the store's thread.
    pub(super) fn open(
        url: &str,
        timer: CommitTimer,
        alive: WriterAlive,
    ) -> Result<PgStore, StoreError> {
        let mut config: tokio_postgres::Config =
            url.parse().map_err(|e| pg_error("the store's URL", &e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // As libpq does: a password from the environment rather than the configuration file.
        if config.get_password().is_none() {
            if let Some(password) = std::env::var_os("PGPASSWORD") {
                config.password(password.as_encoded_bytes());
            }
        }
        if config.get_application_name().is_none() {
            config.application_name(format!("fleetd {}", std::process::id()));
        }
        let lock_config = config.clone();
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                // A connection whose server went away is closed: checked when it is taken.
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot make the pool: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Postgres(format!("cannot start the store's runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (writer, queue) = channel::unbounded_channel();
        let (ready, started) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("store-postgres".into())
            .spawn({
                let pool = pool.clone();
                move || {
                    let _alive = alive;
                    // Reads and callers' transactions are tasks on this runtime too; they run
                    // while the writer does, and end with it.
                    runtime.block_on(serve(lock_config, pool, queue, timer, ready));
                }
            })
            .map_err(|e| StoreError::Postgres(format!("cannot start the store's thread: {e}")))?;
        // Blocks while another fleetd holds the controller lock: this one is the standby.
        let (epoch, lease) = match started.recv() {
            Ok(Ok(started)) => started,
            Ok(Err(error)) => {
                let _ = thread.join();
                return Err(error);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(StoreError::Closed);
            }
        };
        Ok(PgStore {
            runtime: handle,
            pool,
            writer: Some(writer),
            thread: Some(thread),
            epoch,
            lease,
        })
    }

    /// Where the store stands with the controller lock.
    pub(super) fn lease(&self) -> watch::Receiver<Lease> {
        self.lease.clone()
    }

    /// Runs `f` on a pooled connection on the store's thread and waits for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = (Object, Result<T, StoreError>)> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let pool = self.pool.clone();
        self.runtime.spawn(async move {
            let result = match pool.get().await {
                Ok(conn) => f(conn).await.1,
                Err(error) => Err(pool_error(error)),
            };
            let _ = tx.send(result);
        });
        // A runtime that is gone dropped the task, and with it the sender.
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    pub(super) fn sightings(&self) -> Result<Vec<(Serial, i64)>, StoreError> {
        self.call(|conn| async move {
            let result = read_sightings(&conn).await;
            (conn, result)
        })
    }

    pub(super) fn whitelists(&self) -> Result<Whitelists, StoreError> {
        self.call(|conn| async move {
            let result = read_whitelists(&conn).await;
            (conn, result)
        })
    }

    pub(super) fn submit(&self, request: WriteRequest) -> Result<(), StoreError> {
        self.writer
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(request)
            .map_err(|_| StoreError::Closed)
    }

    /// A write transaction on a connection of its own; waits for the write lock.
    pub(super) fn begin(&self, timer: CommitTimer) -> Result<PgTxn, StoreError> {
        if let Some(error) = not_leader(&self.lease.borrow()) {
            return Err(error);
        }
        let (ready, started) = mpsc::sync_channel(1);
        let pool = self.pool.clone();
        let epoch = self.epoch;
        self.runtime.spawn(async move {
            let conn = match pool.get().await {
                Ok(conn) => conn,
                Err(error) => {
                    let _ = ready.send(Err(pool_error(error)));
                    return;
                }
            };
            if let Err(error) = begin_write(&conn, Some(epoch)).await {
                let _ = ready.send(Err(error));
                return;
            }
            let (steps, queue) = channel::unbounded_channel();
            if ready.send(Ok(steps)).is_err() {
                // The caller is gone already: nothing was written.
                rollback(conn).await;
                return;
            }
            run_txn(conn, queue).await;
        });
        let steps = started.recv().map_err(|_| StoreError::Closed)??;
        Ok(PgTxn { steps, timer })
    }
}

/// A write transaction held by its caller: a task on the store's thread that owns the
/// transaction's connection and runs the caller's steps on it, in order.
pub(super) struct PgTxn {
    steps: channel::UnboundedSender<Step>,
    timer: CommitTimer,
}

enum Step {
    Run(Job),
    /// COMMIT (`true`) or ROLLBACK, the transaction's last step.
    Finish {
        commit: bool,
        timer: CommitTimer,
        reply: mpsc::SyncSender<Result<(), StoreError>>,
    },
}

impl PgTxn {
    /// Runs `f` on the transaction's connection and waits for its answer.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = (Object, Result<T, StoreError>)> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn| {
            Box::pin(async move {
                let (conn, result) = f(conn).await;
                let _ = tx.send(result);
                conn
            })
        });
        self.steps
            .send(Step::Run(job))
            .map_err(|_| StoreError::Closed)?;
        rx.recv().map_err(|_| StoreError::Closed)?
    }

    pub(super) fn write(&self, changes: Vec<Change>) -> Result<Vec<AuditRecord>, StoreError> {
        self.call(move |conn| async move {
            let result = write_changes(&conn, &changes).await;
            (conn, result)
        })
    }

    /// Commits (`true`, timed) or rolls back, and gives the connection back.
    pub(super) fn finish(self, commit: bool) -> Result<(), StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        self.steps
            .send(Step::Finish {
                commit,
                timer: self.timer.clone(),
                reply,
            })
            .map_err(|_| StoreError::Closed)?;
        answer.recv().map_err(|_| StoreError::Closed)?
    }
}

/// The task of a caller's transaction: its steps, then COMMIT or ROLLBACK. A caller that drops
/// its transaction without finishing it gets it rolled back.
async fn run_txn(mut conn: Object, mut steps: channel::UnboundedReceiver<Step>) {
    while let Some(step) = steps.recv().await {
        match step {
            Step::Run(job) => conn = job(conn).await,
            Step::Finish {
                commit: true,
                timer,
                reply,
            } => {
                let result = commit(&conn, &timer).await;
                if result.is_err() {
                    // Its state is unknown: the connection is not given back to the pool.
                    drop(Object::take(conn));
                } else {
                    drop(conn);
                }
                let _ = reply.send(result);
                return;
            }
            Step::Finish {
                commit: false,
                reply,
                ..
            } => {
                let result = conn
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| pg_error("rollback", &e));
                if result.is_err() {
                    drop(Object::take(conn));
                }
                let _ = reply.send(result);
                return;
            }
        }
    }
    rollback(conn).await;
}

/// The reads of records through `$self.call`, the same for the pool and for a transaction.
macro_rules! pg_reads {
    () => {
        fn station(&self, serial: &Serial) -> Result<Option<Station>, StoreError> {
            let serial = serial.clone();
            self.call(move |conn| async move {
                let result = read_station(&conn, serial.as_str()).await;
                (conn, result)
            })
        }

        fn stations(&self) -> Result<Vec<Station>, StoreError> {
            self.call(|conn| async move {
                let result = read_stations(&conn).await;
                (conn, result)
            })
        }

        fn phone(&self, mac: &Mac) -> Result<Option<Phone>, StoreError> {
            let mac = mac.clone();
            self.call(move |conn| async move {
                let result = read_phone(&conn, mac.as_str()).await;
                (conn, result)
            })
        }

        fn phones(&self, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError> {
            let tenant = tenant.map(str::to_owned);
            self.call(move |conn| async move {
                let result = read_phones(&conn, tenant.as_deref()).await;
                (conn, result)
            })
        }

        fn stations_page(
            &self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Station) -> bool,
        ) -> Result<(Vec<Station>, bool), StoreError> {
            read_page(after, limit, keep, decode_station, |after| {
                self.call(move |conn| async move {
                    let result = read_chunk(&conn, CHUNK_OF_STATIONS, &after).await;
                    (conn, result)
                })
            })
        }

        fn phones_page(
            &self,
            after: Option<&str>,
            limit: usize,
            keep: &dyn Fn(&Phone) -> bool,
        ) -> Result<(Vec<Phone>, bool), StoreError> {
            read_page(after, limit, keep, decode_phone, |after| {
                self.call(move |conn| async move {
                    let result = read_chunk(&conn, CHUNK_OF_PHONES, &after).await;
                    (conn, result)
                })
            })
        }

        fn audit(&self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
            let tenant = tenant.to_owned();
            self.call(move |conn| async move {
                let result = read_audit(&conn, &tenant, limit).await;
                (conn, result)
            })
        }

        fn audit_page(
            &self,
            tenant: &str,
            after_seq: u64,
            limit: usize,
        ) -> Result<Vec<AuditRecord>, StoreError> {
            let tenant = tenant.to_owned();
            self.call(move |conn| async move {
                let result = read_audit_page(&conn, &tenant, after_seq, limit).await;
                (conn, result)
            })
        }
    };
}

impl RecordReads for PgStore {
    pg_reads!();
}

impl RecordReads for PgTxn {
    pg_reads!();
}

// --- the store's thread ---

/// What the store's thread hands `open` once it serves: its epoch and its lease.
type Started = Result<(i64, watch::Receiver<Lease>), StoreError>;

/// The store's thread: takes the controller lock (waiting while another fleetd holds it),
/// migrates the schema, raises the controller epoch, tells `open`, then runs the writer until
/// the store is dropped, and releases the lock last (after the writer's final commits).
async fn serve(
    config: tokio_postgres::Config,
    pool: Pool,
    queue: channel::UnboundedReceiver<WriteRequest>,
    timer: CommitTimer,
    ready: mpsc::SyncSender<Started>,
) {
    let started = async {
        let session = lease::acquire(&config).await?;
        let conn = pool.get().await.map_err(pool_error)?;
        migrate(&conn).await?;
        let epoch = raise_epoch(&conn).await?;
        Ok::<_, StoreError>((session, epoch))
    }
    .await;
    let (session, epoch) = match started {
        Ok(started) => started,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    tracing::info!(
        epoch,
        "the PostgreSQL store is open; this fleetd holds the controller lock"
    );
    let (lease, leased) = watch::channel(Lease::Held);
    let (stop, stopped) = oneshot::channel();
    let keeper = tokio::spawn(lease::keep(config, session, epoch, lease, stopped));
    if ready.send(Ok((epoch, leased.clone()))).is_err() {
        return;
    }
    run_writer(pool, queue, timer, epoch, leased).await;
    drop(stop);
    let _ = keeper.await;
}

/// Raises the controller epoch (under the write lock) and returns the new one: this store's.
async fn raise_epoch(conn: &ClientWrapper) -> Result<i64, StoreError> {
    begin_write(conn, None).await?;
    let raised = conn
        .query_one(
            "UPDATE counters SET value = value + 1 WHERE name = 'controller_epoch' \
             RETURNING value",
            &[],
        )
        .await;
    match raised {
        Ok(row) => {
            let epoch = column(&row, 0)?;
            conn.batch_execute("COMMIT")
                .await
                .map_err(|e| pg_error("commit", &e))?;
            Ok(epoch)
        }
        Err(error) => {
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(pg_error("the controller epoch", &error))
        }
    }
}

/// Why a store that does not hold the controller lock writes nothing.
fn not_leader(lease: &Lease) -> Option<StoreError> {
    match lease {
        Lease::Held => None,
        Lease::Lost => Some(StoreError::NotLeader(
            "the controller lock's connection is lost; taking it again".to_owned(),
        )),
        Lease::Deposed(why) => Some(StoreError::NotLeader(why.clone())),
    }
}

// --- the writer ---

/// The writer: commits every request queued at the moment in one transaction, as redb's
/// writer thread does.
async fn run_writer(
    pool: Pool,
    mut queue: channel::UnboundedReceiver<WriteRequest>,
    timer: CommitTimer,
    epoch: i64,
    lease: watch::Receiver<Lease>,
) {
    let mut busy = false;
    while let Some(first) = queue.recv().await {
        let mut group = vec![first];
        take_queued(&mut group, || queue.try_recv().ok());
        // While requests keep coming, wait a moment for more: fewer, larger commits. As
        // redb's writer, it sleeps rather than waits on the queue, so that the requests that
        // arrive meanwhile do not each wake its thread.
        if busy && group.len() < MAX_GROUP {
            tokio::time::sleep(GROUP_LINGER).await;
            take_queued(&mut group, || queue.try_recv().ok());
        }
        busy = group.len() > 1;
        let refused = not_leader(&lease.borrow());
        if let Some(StoreError::NotLeader(why)) = refused {
            for request in group {
                request.reply.send(Err(StoreError::NotLeader(why.clone())));
            }
            continue;
        }
        commit_group(&pool, group, &timer, epoch).await;
    }
}

/// Why a group's transaction was not committed.
enum GroupFailed {
    /// A change failed before COMMIT: rolled back, nothing of it is stored.
    Rolledback,
    /// COMMIT itself failed (the connection was lost): whether it was stored is unknown.
    Commit(StoreError),
}

async fn commit_group(pool: &Pool, group: Vec<WriteRequest>, timer: &CommitTimer, epoch: i64) {
    let conn = match pool.get().await {
        Ok(conn) => conn,
        Err(error) => {
            let message = pool_error(error).to_string();
            for request in group {
                request
                    .reply
                    .send(Err(StoreError::Postgres(message.clone())));
            }
            return;
        }
    };
    if group.len() > 1 {
        match try_group(&conn, &group, timer, epoch).await {
            Ok(results) => {
                for (request, records) in group.into_iter().zip(results) {
                    request.reply.send(Ok(records));
                }
                return;
            }
            // Not retried: a retry of what may have been committed could store it twice.
            // Everyone hears of the failure; nothing is announced.
            Err(GroupFailed::Commit(error)) => {
                let message = error.to_string();
                drop(Object::take(conn));
                for request in group {
                    request
                        .reply
                        .send(Err(StoreError::Postgres(message.clone())));
                }
                return;
            }
            // Each request is tried on its own, so that one bad request fails alone.
            Err(GroupFailed::Rolledback) => {}
        }
    }
    for request in group {
        let result = apply_one(&conn, &request.changes, timer, epoch).await;
        request.reply.send(result);
    }
}

async fn try_group(
    conn: &ClientWrapper,
    group: &[WriteRequest],
    timer: &CommitTimer,
    epoch: i64,
) -> Result<Vec<Vec<AuditRecord>>, GroupFailed> {
    begin_write(conn, Some(epoch))
        .await
        .map_err(|_| GroupFailed::Rolledback)?;
    let mut results = Vec::with_capacity(group.len());
    for request in group {
        match write_changes(conn, &request.changes).await {
            Ok(records) => results.push(records),
            Err(_) => {
                let _ = conn.batch_execute("ROLLBACK").await;
                return Err(GroupFailed::Rolledback);
            }
        }
    }
    commit(conn, timer).await.map_err(GroupFailed::Commit)?;
    Ok(results)
}

async fn apply_one(
    conn: &ClientWrapper,
    changes: &[Change],
    timer: &CommitTimer,
    epoch: i64,
) -> WriteResult {
    begin_write(conn, Some(epoch)).await?;
    match write_changes(conn, changes).await {
        Ok(stored) => {
            // COMMIT returns once the commit record is flushed (`fsync` and
            // `synchronous_commit` on, PostgreSQL's defaults): durable before anyone hears.
            commit(conn, timer).await?;
            Ok(stored)
        }
        Err(error) => {
            // The first error is the one to report.
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(error)
        }
    }
}

/// Opens a write transaction: BEGIN, the write lock, then the fence on the store's controller
/// epoch (none only while the store opens: the migrations and the epoch's own raise), in one
/// round trip. A fenced transaction is [`StoreError::NotLeader`], rolled back.
async fn begin_write(conn: &ClientWrapper, epoch: Option<i64>) -> Result<(), StoreError> {
    let fence = epoch.map_or(String::new(), |epoch| {
        format!("; SELECT fleet_fence({epoch})")
    });
    let begun = conn
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK}){fence}"
        ))
        .await;
    if let Err(error) = begun {
        let _ = conn.batch_execute("ROLLBACK").await;
        return Err(pg_error("begin", &error));
    }
    Ok(())
}

async fn commit(conn: &ClientWrapper, timer: &CommitTimer) -> Result<(), StoreError> {
    let start = Instant::now();
    let result = conn.batch_execute("COMMIT").await;
    timer.observe(start);
    result.map_err(|e| pg_error("commit", &e))
}

/// Rolls back and gives the connection back to the pool, or drops it if even that failed.
async fn rollback(conn: Object) {
    if conn.batch_execute("ROLLBACK").await.is_err() {
        drop(Object::take(conn));
    }
}

// --- statements ---

const PUT_STATION: &str = "INSERT INTO stations (serial, record) VALUES ($1, $2::text::json) \
     ON CONFLICT (serial) DO UPDATE SET record = EXCLUDED.record";
/// Its sighting goes with it (`seen` references `stations` `ON DELETE CASCADE`).
const DELETE_STATION: &str = "DELETE FROM stations WHERE serial = $1";
/// Only for a station that has a record, and never back in time.
const SEEN: &str = "INSERT INTO seen (serial, at) \
     SELECT $1, $2 WHERE EXISTS (SELECT 1 FROM stations WHERE serial = $1) \
     ON CONFLICT (serial) DO UPDATE SET at = EXCLUDED.at WHERE seen.at < EXCLUDED.at";
const PUT_PHONE: &str = "INSERT INTO phones (mac, tenant, record) VALUES ($1, $2, $3::text::json) \
     ON CONFLICT (mac) DO UPDATE SET tenant = EXCLUDED.tenant, record = EXCLUDED.record";
const DELETE_PHONE: &str = "DELETE FROM phones WHERE mac = $1";
const PUT_SINGLE: &str = "INSERT INTO singles (name, record) VALUES ($1, $2::text::json) \
     ON CONFLICT (name) DO UPDATE SET record = EXCLUDED.record";
const NEXT_SEQ: &str = "SELECT value FROM counters WHERE name = $1";
const SET_NEXT_SEQ: &str = "UPDATE counters SET value = $2 WHERE name = $1";
const HEAD: &str = "SELECT hash FROM audit_heads WHERE tenant = $1";
/// A record and its tenant's new head, in one statement.
const APPEND_AUDIT: &str = "WITH stored AS \
     (INSERT INTO audit (seq, tenant, record) VALUES ($1, $2, $3::text::json)) \
     INSERT INTO audit_heads (tenant, hash) VALUES ($2, $4) \
     ON CONFLICT (tenant) DO UPDATE SET hash = EXCLUDED.hash";

const STATION: &str = "SELECT record::text FROM stations WHERE serial = $1";
const STATIONS: &str = "SELECT serial, record::text FROM stations ORDER BY serial";
const PHONE: &str = "SELECT record::text FROM phones WHERE mac = $1";
const PHONES: &str = "SELECT mac, record::text FROM phones ORDER BY mac";
const PHONES_OF: &str = "SELECT mac, record::text FROM phones WHERE tenant = $1 ORDER BY mac";
/// Keys are never empty (a `Serial` or a `Mac`), so a first page starts after "".
const CHUNK_OF_STATIONS: &str =
    "SELECT serial, record::text FROM stations WHERE serial > $1 ORDER BY serial LIMIT $2";
const CHUNK_OF_PHONES: &str =
    "SELECT mac, record::text FROM phones WHERE mac > $1 ORDER BY mac LIMIT $2";
const AUDIT_NEWEST: &str = "SELECT seq, record::text FROM audit WHERE tenant = $1 \
     ORDER BY seq DESC LIMIT $2";
const AUDIT_AFTER: &str = "SELECT seq, record::text FROM audit WHERE tenant = $1 AND seq > $2 \
     ORDER BY seq LIMIT $3";
const SIGHTINGS: &str = "SELECT serial, at FROM seen ORDER BY serial";
const SINGLE: &str = "SELECT record::text FROM singles WHERE name = $1";

async fn execute(
    conn: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, StoreError> {
    let statement = conn
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error("prepare", &e))?;
    conn.execute(&statement, params)
        .await
        .map_err(|e| pg_error("write", &e))
}

async fn query(
    conn: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>, StoreError> {
    let statement = conn
        .prepare_cached(sql)
        .await
        .map_err(|e| pg_error("prepare", &e))?;
    conn.query(&statement, params)
        .await
        .map_err(|e| pg_error("read", &e))
}

/// Column `index` of `row`; a column of another type than the schema's is corrupt.
fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
    row: &'r Row,
    index: usize,
) -> Result<T, StoreError> {
    row.try_get(index)
        .map_err(|e| StoreError::Corrupt(format!("column {index}: {e}")))
}

fn encode_text<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|error| StoreError::Encode(error.to_string()))
}

fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::Encode(format!("{what} {value} is too large")))
}

/// A count or limit for SQL: `usize` beyond `i64` is no limit at all.
fn sql_limit(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

fn stored_seq(value: i64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt(format!("audit sequence {value}")))
}

/// Applies the migrations the database lacks, in one transaction under the write lock (two
/// fleetds opening one new database do not both migrate it).
async fn migrate(conn: &ClientWrapper) -> Result<(), StoreError> {
    let schema = |e: tokio_postgres::Error| match pg_error("migration", &e) {
        StoreError::Postgres(message) => StoreError::Schema(message),
        other => other,
    };
    begin_write(conn, None).await?;
    let result = async {
        conn.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (\
                 version integer PRIMARY KEY, \
                 name text NOT NULL, \
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .map_err(schema)?;
        let row = conn
            .query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .await
            .map_err(schema)?;
        let applied: i32 = column(&row, 0)?;
        let known = MIGRATIONS.last().map_or(0, |m| m.version);
        if applied > known {
            return Err(StoreError::Schema(format!(
                "the database is at migration {applied}, this fleetd knows up to {known}: \
                 it was opened by a newer fleetd"
            )));
        }
        for migration in MIGRATIONS.iter().filter(|m| m.version > applied) {
            conn.batch_execute(migration.sql).await.map_err(|e| {
                StoreError::Schema(format!("{}: {}", migration.name, pg_error("", &e)))
            })?;
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&migration.version, &migration.name],
            )
            .await
            .map_err(schema)?;
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) => conn
            .batch_execute("COMMIT")
            .await
            .map_err(|e| pg_error("commit", &e)),
        Err(error) => {
            let _ = conn.batch_execute("ROLLBACK").await;
            Err(error)
        }
    }
}

// --- writes ---

async fn write_changes(
    conn: &ClientWrapper,
    changes: &[Change],
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut chain: Option<AuditChain> = None;
    let mut stored = Vec::new();
    for change in changes {
        match change {
            Change::PutStation(station) => {
                let record = encode_text(station)?;
                execute(conn, PUT_STATION, &[&station.serial.as_str(), &record]).await?;
            }
            Change::NoteMismatch { serial, at } => {
                if let Some(station) = read_station(conn, serial.as_str()).await? {
                    let noted = crate::station::mismatch_noted(station, *at);
                    let record = encode_text(&noted)?;
                    execute(conn, PUT_STATION, &[&serial.as_str(), &record]).await?;
                }
            }
            Change::DeleteStation(serial) => {
                execute(conn, DELETE_STATION, &[&serial.as_str()]).await?;
            }
            Change::Seen(serial, at) => {
                execute(conn, SEEN, &[&serial.as_str(), at]).await?;
            }
            Change::PutPhone(phone) => {
                let record = encode_text(phone)?;
                let params: [&(dyn ToSql + Sync); 3] =
                    [&phone.mac.as_str(), &phone.tenant.as_str(), &record];
                execute(conn, PUT_PHONE, &params).await?;
            }
            Change::DeletePhone(mac) => {
                execute(conn, DELETE_PHONE, &[&mac.as_str()]).await?;
            }
            Change::PutWhitelists(whitelists) => {
                let record = encode_text(whitelists)?;
                execute(conn, PUT_SINGLE, &[&WHITELISTS, &record]).await?;
            }
            Change::Audit(record) => {
                let chain = match &mut chain {
                    Some(chain) => chain,
                    None => chain.insert(AuditChain::open(conn).await?),
                };
                stored.push(chain.append(conn, record).await?);
            }
        }
    }
    if let Some(chain) = chain {
        chain.finish(conn).await?;
    }
    Ok(stored)
}

/// The audit log while records are appended in one transaction: each record gets the next
/// sequence number and is chained to its tenant's newest record. The counter and the heads
/// are read once and kept here (the write lock keeps everyone else out meanwhile).
struct AuditChain {
    next_seq: u64,
    heads: HashMap<String, String>,
}

impl AuditChain {
    async fn open(conn: &ClientWrapper) -> Result<AuditChain, StoreError> {
        let rows = query(conn, NEXT_SEQ, &[&NEXT_AUDIT_SEQ]).await?;
        let next_seq = match rows.first() {
            Some(row) => stored_seq(column(row, 0)?)?,
            None => {
                return Err(StoreError::Corrupt(format!(
                    "counters has no {NEXT_AUDIT_SEQ}"
                )))
            }
        };
        Ok(AuditChain {
            next_seq,
            heads: HashMap::new(),
        })
    }

    async fn append(
        &mut self,
        conn: &ClientWrapper,
        record: &AuditRecord,
    ) -> Result<AuditRecord, StoreError> {
        let mut record = record.clone();
        record.seq = self.next_seq;
        record.prev_hash = match self.heads.get(&record.tenant) {
            Some(head) => head.clone(),
            None => match query(conn, HEAD, &[&record.tenant.as_str()]).await?.first() {
                Some(row) => column(row, 0)?,
                None => GENESIS_PREV_HASH.to_owned(),
            },
        };
        record.hash = record_hash(&record);
        let encoded = encode_text(&record)?;
        let seq = to_i64(record.seq, "audit sequence")?;
        let params: [&(dyn ToSql + Sync); 4] = [
            &seq,
            &record.tenant.as_str(),
            &encoded,
            &record.hash.as_str(),
        ];
        execute(conn, APPEND_AUDIT, &params).await?;
        self.heads
            .insert(record.tenant.clone(), record.hash.clone());
        self.next_seq += 1;
        Ok(record)
    }

    /// Stores the next sequence number.
    async fn finish(self, conn: &ClientWrapper) -> Result<(), StoreError> {
        let next = to_i64(self.next_seq, "audit sequence")?;
        execute(conn, SET_NEXT_SEQ, &[&NEXT_AUDIT_SEQ, &next]).await?;
        Ok(())
    }
}

// --- reads ---

async fn read_station(conn: &ClientWrapper, serial: &str) -> Result<Option<Station>, StoreError> {
    match query(conn, STATION, &[&serial]).await?.first() {
        Some(row) => decode_station(serial, column::<&str>(row, 0)?.as_bytes()).map(Some),
        None => Ok(None),
    }
}

async fn read_stations(conn: &ClientWrapper) -> Result<Vec<Station>, StoreError> {
    query(conn, STATIONS, &[])
        .await?
        .iter()
        .map(|row| decode_station(column(row, 0)?, column::<&str>(row, 1)?.as_bytes()))
        .collect()
}

async fn read_phone(conn: &ClientWrapper, mac: &str) -> Result<Option<Phone>, StoreError> {
    match query(conn, PHONE, &[&mac]).await?.first() {
        Some(row) => decode_phone(mac, column::<&str>(row, 0)?.as_bytes()).map(Some),
        None => Ok(None),
    }
}

async fn read_phones(conn: &ClientWrapper, tenant: Option<&str>) -> Result<Vec<Phone>, StoreError> {
    let rows = match tenant {
        Some(tenant) => query(conn, PHONES_OF, &[&tenant]).await?,
        None => query(conn, PHONES, &[]).await?,
    };
    let mut phones = Vec::new();
    for row in &rows {
        let phone = decode_phone(column(row, 0)?, column::<&str>(row, 1)?.as_bytes())?;
        // The record's tenant decides, as in redb (the column is its copy, for the index).
        if tenant.is_none_or(|tenant| phone.tenant == tenant) {
            phones.push(phone);
        }
    }
    Ok(phones)
}

/// Up to `PAGE_CHUNK` (key, record) rows with a key after `after`, in key order.
async fn read_chunk(
    conn: &ClientWrapper,
    sql: &str,
    after: &str,
) -> Result<Vec<(String, String)>, StoreError> {
    let limit = sql_limit(PAGE_CHUNK);
    query(conn, sql, &[&after, &limit])
        .await?
        .iter()
        .map(|row| Ok((column(row, 0)?, column(row, 1)?)))
        .collect()
}

/// Up to `limit` records after `after` that `keep` accepts, and whether more follow, read
/// `PAGE_CHUNK` rows at a time by `chunk` (the rows after a key): `keep` runs on the caller's
/// thread, and memory holds one chunk and the page.
fn read_page<T>(
    after: Option<&str>,
    limit: usize,
    keep: &dyn Fn(&T) -> bool,
    decode: fn(&str, &[u8]) -> Result<T, StoreError>,
    chunk: impl Fn(String) -> Result<Vec<(String, String)>, StoreError>,
) -> Result<(Vec<T>, bool), StoreError> {
    let mut page = Vec::new();
    let mut after = after.unwrap_or_default().to_owned();
    loop {
        let rows = chunk(after)?;
        let complete = rows.len() < PAGE_CHUNK;
        let Some(last) = rows.last().map(|(key, _)| key.clone()) else {
            return Ok((page, false));
        };
        for (key, value) in &rows {
            let record = decode(key, value.as_bytes())?;
            if keep(&record) {
                if page.len() == limit {
                    return Ok((page, true));
                }
                page.push(record);
            }
        }
        if complete {
            return Ok((page, false));
        }
        after = last;
    }
}

/// Decoded audit rows of `tenant`; a row whose record is another tenant's is skipped, as
/// redb skips an index entry that names another tenant's record (the chain's check shows it).
fn tenant_records(rows: &[Row], tenant: &str) -> Result<Vec<AuditRecord>, StoreError> {
    let mut records = Vec::new();
    for row in rows {
        let seq = stored_seq(column(row, 0)?)?;
        let record = decode_audit(seq, column::<&str>(row, 1)?.as_bytes())?;
        if record.tenant == tenant {
            records.push(record);
        }
    }
    Ok(records)
}

async fn read_audit(
    conn: &ClientWrapper,
    tenant: &str,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let rows = query(conn, AUDIT_NEWEST, &[&tenant, &sql_limit(limit)]).await?;
    let mut records = tenant_records(&rows, tenant)?;
    records.reverse();
    Ok(records)
}

async fn read_audit_page(
    conn: &ClientWrapper,
    tenant: &str,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<AuditRecord>, StoreError> {
    // No stored seq is above i64::MAX.
    let Ok(after) = i64::try_from(after_seq) else {
        return Ok(Vec::new());
    };
    if limit == 0 {
        return Ok(Vec::new());
    }
    let rows = query(conn, AUDIT_AFTER, &[&tenant, &after, &sql_limit(limit)]).await?;
    tenant_records(&rows, tenant)
}

async fn read_sightings(conn: &ClientWrapper) -> Result<Vec<(Serial, i64)>, StoreError> {
    let mut seen = Vec::new();
    for row in query(conn, SIGHTINGS, &[]).await? {
        if let Ok(serial) = Serial::parse(column(&row, 0)?) {
            seen.push((serial, column(&row, 1)?));
        }
    }
    Ok(seen)
}

async fn read_whitelists(conn: &ClientWrapper) -> Result<Whitelists, StoreError> {
    match query(conn, SINGLE, &[&WHITELISTS]).await?.first() {
        Some(row) => decode_whitelists(column::<&str>(row, 0)?.as_bytes()),
        None => Ok(Whitelists::default()),
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::suite::{phone, record, station, Place};
    use super::super::Store;
    use super::*;
    use fleet_tests::postgres::{self as private_postgres, literal, query_text};

    /// A PostgreSQL store's place: a database of its own on the tests' private server.
    pub(in crate::store) struct PgPlace {
        url: String,
    }

    impl PgPlace {
        fn execute(&self, sql: &str) {
            private_postgres::execute(&self.url, sql).unwrap();
        }
    }

    impl Place for PgPlace {
        fn new() -> Self {
            PgPlace {
                url: private_postgres::database(),
            }
        }

        fn open(&self) -> Store {
            Store::open_postgres(&self.url).unwrap()
        }

        fn edit_audit(&self, _store: &Store, seq: u64, edit: &dyn Fn(&mut AuditRecord)) {
            let text = query_text(
                &self.url,
                &format!("SELECT record::text FROM audit WHERE seq = {seq}"),
            )
            .unwrap();
            let mut record: AuditRecord = serde_json::from_str(&text[0]).unwrap();
            edit(&mut record);
            let json = serde_json::to_string(&record).unwrap();
            self.execute(&format!(
                "UPDATE audit SET record = {} WHERE seq = {seq}",
                literal(&json)
            ));
        }

        fn remove_audit(&self, _store: &Store, seq: u64) {
            self.execute(&format!("DELETE FROM audit WHERE seq = {seq}"));
        }
    }

    #[test]
    fn corrupt_records_are_errors_not_panics() {
        let place = PgPlace::new();
        let store = place.open();
        store
            .apply(vec![Change::Audit(record("default", "a"))])
            .unwrap();
        let other = serde_json::to_string(&station("S9")).unwrap();
        let phone9 = serde_json::to_string(&phone("000000000009", "default")).unwrap();
        // Valid JSON (the column is `json`) that is not the record it should be.
        place.execute(&format!(
            "INSERT INTO stations VALUES ('S1', '{{\"serial\": 5}}'), ('S2', {});
             INSERT INTO audit VALUES (99, 'default', '[]');
             INSERT INTO phones VALUES ('000000000001', 'default', '\"text\"'),
                                       ('000000000002', 'default', {});
             INSERT INTO singles VALUES ('whitelists', '{{\"permanent\": 5}}');",
            literal(&other),
            literal(&phone9)
        ));
        for serial in ["S1", "S2"] {
            let serial = Serial::parse(serial).unwrap();
            assert!(matches!(
                store.station(&serial),
                Err(StoreError::Corrupt(_))
            ));
        }
        assert!(matches!(store.stations(), Err(StoreError::Corrupt(_))));
        let page = store.stations_page(None, 10, &|_| true);
        assert!(matches!(page, Err(StoreError::Corrupt(_))), "{page:?}");
        let error = store.audit("default", 10).unwrap_err();
        assert!(matches!(error, StoreError::Corrupt(_)));
        assert!(error.to_string().contains("99"), "{error}");
        for mac in ["000000000001", "000000000002"] {
            let mac = Mac::parse(mac).unwrap();
            assert!(matches!(store.phone(&mac), Err(StoreError::Corrupt(_))));
        }
        assert!(matches!(store.phones(None), Err(StoreError::Corrupt(_))));
        assert!(matches!(store.whitelists(), Err(StoreError::Corrupt(_))));
        // A store with corrupt records still writes: the counter and the heads are intact.
        let stored = store
            .apply(vec![Change::Audit(record("default", "b"))])
            .unwrap();
        assert_eq!(stored[0].seq, 2);
    }

    #[test]
    fn the_schema_is_migrated_once_and_a_newer_one_is_refused() {
        let place = PgPlace::new();
        drop(place.open());
        drop(place.open());
        let versions = query_text(
            &place.url,
            "SELECT version || ' ' || name FROM schema_migrations ORDER BY version",
        )
        .unwrap();
        let expected: Vec<String> = MIGRATIONS
            .iter()
            .map(|m| format!("{} {}", m.version, m.name))
            .collect();
        assert_eq!(versions, expected);
        // A database that a newer fleetd migrated is not written by this one.
        place.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'future')");
        match Store::open_postgres(&place.url) {
            Err(StoreError::Schema(message)) => assert!(message.contains("9999"), "{message}"),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("opened a database from the future"),
        }
    }

    #[test]
    fn the_migrations_are_the_files_of_the_migrations_folder_in_order() {
        let folder = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        let mut files: Vec<String> = std::fs::read_dir(&folder)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".sql"))
            .collect();
        files.sort();
        let names: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, names, "every file of {} is listed", folder.display());
        for (n, migration) in MIGRATIONS.iter().enumerate() {
            assert_eq!(migration.version, n as i32 + 1, "{}", migration.name);
            assert!(
                migration
                    .name
                    .starts_with(&format!("{:04}_", migration.version)),
                "{}",
                migration.name
            );
        }
    }

    #[test]
    fn an_unreachable_server_and_a_bad_url_are_errors() {
        // Port 1 on loopback: nothing listens there.
        let unreachable = Store::open_postgres("postgres://fleet@127.0.0.1:1/fleet");
        assert!(
            matches!(unreachable, Err(StoreError::Postgres(_))),
            "{:?}",
            unreachable.err()
        );
        let bad = Store::open_postgres("postgres://fleet@127.0.0.1:notaport/fleet");
        assert!(
            matches!(bad, Err(StoreError::Postgres(_))),
            "{:?}",
            bad.err()
        );
    }

    /// What `attempt` gives once it gives something, trying again every 20 ms for at most
    /// 20 s (a state that the store reaches by itself, after a connection is made again).
    fn eventually<T>(mut attempt: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(found) = attempt() {
                return found;
            }
            assert!(Instant::now() < deadline, "not within 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How many sessions wait for the controller lock.
    fn waiting_for_the_lock(place: &PgPlace) -> usize {
        query_text(
            &place.url,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .unwrap()[0]
            .parse()
            .unwrap()
    }

    /// Ends the database session that holds the controller lock.
    fn end_the_lock_session(place: &PgPlace) {
        let ended = query_text(
            &place.url,
            &format!(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' \
                 AND granted AND objid = ({} & 4294967295)::oid \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                lease::CONTROLLER_LOCK
            ),
        )
        .unwrap();
        assert_eq!(ended, vec!["t".to_owned()], "one lock session ended");
    }

    /// The store's lease once `done` accepts it, within 20 s.
    fn lease_becomes(store: &Store, done: impl Fn(&Lease) -> bool) -> Lease {
        let lease = store.lease().expect("a PostgreSQL store has a lease");
        eventually(|| {
            let now = lease.borrow().clone();
            done(&now).then_some(now)
        })
    }

    #[test]
    fn a_second_store_waits_for_the_first_and_serves_once_it_is_gone() {
        let place = PgPlace::new();
        let first = place.open();
        first
            .apply(vec![Change::PutStation(station("S1"))])
            .unwrap();
        let url = place.url.clone();
        let second = std::thread::spawn(move || Store::open_postgres(&url));
        // The second waits in PostgreSQL for the controller lock: the standby.
        eventually(|| (waiting_for_the_lock(&place) == 1).then_some(()));
        assert!(!second.is_finished());
        first
            .apply(vec![Change::Audit(record("default", "first"))])
            .unwrap();
        drop(first);
        let second = second.join().unwrap().unwrap();
        assert_eq!(second.stations().unwrap(), vec![station("S1")]);
        let stored = second
            .apply(vec![Change::Audit(record("default", "second"))])
            .unwrap();
        assert_eq!(
            stored[0].seq, 2,
            "the chain goes on where the first left it"
        );
        let epoch = query_text(
            &place.url,
            "SELECT value FROM counters WHERE name = 'controller_epoch'",
        )
        .unwrap();
        assert_eq!(
            epoch,
            vec!["2".to_owned()],
            "each holder raised the epoch once"
        );
    }

    #[test]
    fn a_store_whose_epoch_moved_writes_nothing_and_is_deposed() {
        let place = PgPlace::new();
        let store = place.open();
        store
            .apply(vec![Change::PutStation(station("S1"))])
            .unwrap();
        // Another fleetd took over, as far as the database is concerned, while this one still
        // believes it holds the lock: the fence refuses its writes, and changes nothing.
        place.execute("UPDATE counters SET value = value + 1 WHERE name = 'controller_epoch'");
        let refused = store.apply(vec![Change::DeleteStation(Serial::parse("S1").unwrap())]);
        assert!(
            matches!(refused, Err(StoreError::NotLeader(_))),
            "{refused:?}"
        );
        assert!(matches!(
            store.begin().and_then(|mut txn| {
                txn.apply(vec![Change::PutStation(station("S2"))])?;
                txn.commit()
            }),
            Err(StoreError::NotLeader(_))
        ));
        assert_eq!(store.stations().unwrap(), vec![station("S1")]);
        // Once its lock session is gone, it finds the epoch moved: deposed, for good.
        end_the_lock_session(&place);
        let lease = lease_becomes(&store, |lease| matches!(lease, Lease::Deposed(_)));
        let Lease::Deposed(why) = lease else {
            unreachable!()
        };
        assert!(why.contains("took over"), "{why}");
        let refused = store.apply(vec![Change::Audit(record("default", "late"))]);
        assert!(
            matches!(refused, Err(StoreError::NotLeader(_))),
            "{refused:?}"
        );
        assert!(store.audit("default", 10).unwrap().is_empty());
    }

    #[test]
    fn a_store_that_lost_its_lock_session_takes_the_lock_again_and_goes_on() {
        let place = PgPlace::new();
        let store = place.open();
        let holder = || {
            query_text(
                &place.url,
                "SELECT pid::text FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )
            .unwrap()
        };
        let before = holder();
        assert_eq!(before.len(), 1, "{before:?}");
        end_the_lock_session(&place);
        // Nobody else served meanwhile: the epoch is still its own, so it takes the lock again,
        // in a new session.
        eventually(|| {
            let now = holder();
            (now.len() == 1 && now != before).then_some(())
        });
        let write = eventually(
            || match store.apply(vec![Change::PutStation(station("S1"))]) {
                Err(StoreError::NotLeader(_)) => None,
                other => Some(other),
            },
        );
        assert!(write.is_ok(), "{write:?}");
        assert_eq!(
            lease_becomes(&store, |lease| *lease == Lease::Held),
            Lease::Held
        );
        let epoch = query_text(
            &place.url,
            "SELECT value FROM counters WHERE name = 'controller_epoch'",
        )
        .unwrap();
        assert_eq!(
            epoch,
            vec!["1".to_owned()],
            "the same holder, the same epoch"
        );
    }

    #[test]
    fn a_stopped_server_is_an_error_and_a_restarted_one_serves_again() {
        let server = private_postgres::Server::start().unwrap();
        let url = server.create_database("stopped").unwrap();
        let store = Store::open_postgres(&url).unwrap();
        store
            .apply(vec![Change::PutStation(station("S1"))])
            .unwrap();
        server.stop().unwrap();
        let serial = Serial::parse("S1").unwrap();
        let started = Instant::now();
        let read = store.station(&serial);
        eprintln!(
            "read while stopped: {:?} after {:?}",
            read,
            started.elapsed()
        );
        assert!(matches!(read, Err(StoreError::Postgres(_))), "{read:?}");
        let started = Instant::now();
        let write = store.apply(vec![Change::PutStation(station("S2"))]);
        eprintln!(
            "write while stopped: {:?} after {:?}",
            write,
            started.elapsed()
        );
        assert!(
            matches!(
                write,
                Err(StoreError::Postgres(_) | StoreError::NotLeader(_))
            ),
            "{write:?}"
        );
        let started = Instant::now();
        let txn = store.begin();
        eprintln!(
            "begin while stopped: {:?} after {:?}",
            txn.as_ref().err(),
            started.elapsed()
        );
        assert!(txn.is_err());
        drop(txn);
        server.restart().unwrap();
        let write = eventually(
            || match store.apply(vec![Change::PutStation(station("S2"))]) {
                Err(StoreError::Postgres(_) | StoreError::NotLeader(_)) => None,
                other => Some(other),
            },
        );
        assert!(write.is_ok(), "{write:?}");
        assert_eq!(store.stations().unwrap().len(), 2);
        assert_eq!(*store.lease().unwrap().borrow(), Lease::Held);
    }

    /// Ends every connection of the store's database but the one that asks.
    fn terminate_connections(place: &PgPlace) {
        query_text(
            &place.url,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    }

    #[test]
    fn a_lost_connection_is_an_error_and_the_next_request_has_a_new_one() {
        let place = PgPlace::new();
        let store = place.open();
        store
            .apply(vec![Change::PutStation(station("S1"))])
            .unwrap();
        let serial = Serial::parse("S1").unwrap();
        assert!(store.station(&serial).unwrap().is_some());
        let txn = store.begin().unwrap();
        terminate_connections(&place);
        // The caller's transaction lost its connection: an error, not a panic, and nothing
        // stays locked.
        assert!(matches!(txn.stations(), Err(StoreError::Postgres(_))));
        drop(txn);
        // A pooled connection that was ended may answer one request with an error; the pool
        // replaces it.
        let read = (0..POOL_SIZE + 1)
            .map(|_| store.station(&serial))
            .find(|read| !matches!(read, Err(StoreError::Postgres(_))));
        assert!(matches!(read, Some(Ok(Some(_)))), "{read:?}");
        // The controller lock's connection was ended too: writes wait (refused) until the
        // store has taken its lock again, which it does by itself.
        let write =
            eventually(
                || match store.apply(vec![Change::Audit(record("default", "after"))]) {
                    Err(StoreError::Postgres(_) | StoreError::NotLeader(_)) => None,
                    other => Some(other),
                },
            );
        assert!(write.is_ok(), "{write:?}");
        assert_eq!(*store.lease().unwrap().borrow(), Lease::Held);
        assert_eq!(store.audit("default", 10).unwrap().len(), 1);
        assert!(store
            .writer_alive()
            .load(std::sync::atomic::Ordering::Relaxed));
    }
}
