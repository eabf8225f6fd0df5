//! The controller lock of a PostgreSQL store: which one of several fleetds on one database
//! serves (active/standby), on PostgreSQL's own session-level advisory lock, not an election of
//! ours.
//!
//! - A store takes the lock ([`CONTROLLER_LOCK`]) on a connection of its own before it writes
//!   anything; a second fleetd on the database waits for it ([`acquire`]): it is the standby.
//!   The lock belongs to the holder's database session, so PostgreSQL releases it when that
//!   session ends (the process was killed, its machine or its connection died) and hands it to
//!   the standby waiting for it.
//! - Every new holder raises the database's **controller epoch** (`counters.controller_epoch`)
//!   under the write lock, and every write transaction of the store checks first that the epoch
//!   is still its own (`fleet_fence`, in `migrations/`): a holder that lost the lock without
//!   knowing yet writes nothing once another has taken over. That is the fence; the lock alone
//!   is only who may try.
//! - The holder checks its lock connection every [`PING_EVERY`] ([`keep`]). When it is lost
//!   the store is [`Lease::Lost`] and refuses writes; it connects again and takes the lock again
//!   if the epoch is still its own (nobody served meanwhile: its state in memory is still the
//!   truth, so the controller goes on). If the epoch moved, another fleetd served in between: the
//!   store is [`Lease::Deposed`] for good, and fleetd stops (`Fleet::deposed`).

use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio_postgres::{Client, Config, NoTls};

use super::StoreError;

/// The key of the session-level advisory lock that the serving fleetd holds. ASCII
/// "fleetctl".
pub(super) const CONTROLLER_LOCK: i64 = 0x666c_6565_7463_746c;
/// How often the holder checks that its lock connection still answers.
const PING_EVERY: Duration = Duration::from_secs(1);
/// How long that check may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a lost connection waits before it is made again.
const RETRY_EVERY: Duration = Duration::from_millis(500);

/// Where a PostgreSQL store stands with the controller lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lease {
    /// It holds the lock: it writes.
    Held,
    /// Its lock connection was lost; it writes nothing while it takes the lock again.
    Lost,
    /// Another fleetd took over the database (the reason says how): it never writes again.
    Deposed(String),
}

/// The controller lock's connection: a client and the task that drives its connection.
pub(super) struct LockSession {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
}

async fn connect(config: &Config) -> Result<LockSession, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let connection = tokio::spawn(async move {
        // Its end (an error or a close) is how a lost session shows: `keep` watches for it.
        let _ = connection.await;
    });
    Ok(LockSession { client, connection })
}

impl Drop for LockSession {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

async fn try_lock(session: &LockSession) -> Result<bool, tokio_postgres::Error> {
    let row = session
        .client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&CONTROLLER_LOCK])
        .await?;
    row.try_get(0)
}

/// The database's controller epoch; `None` if the schema has none yet (before the first
/// migration).
async fn current_epoch(session: &LockSession) -> Result<Option<i64>, tokio_postgres::Error> {
    let exists = session
        .client
        .query_one("SELECT to_regclass('counters') IS NOT NULL", &[])
        .await?
        .try_get::<_, bool>(0)?;
    if !exists {
        return Ok(None);
    }
    let rows = session
        .client
        .query(
            "SELECT value FROM counters WHERE name = 'controller_epoch'",
            &[],
        )
        .await?;
    match rows.first() {
        Some(row) => Ok(Some(row.try_get(0)?)),
        None => Ok(None),
    }
}

/// Who holds the lock now, for the standby's log: `pid … from ADDR (APPLICATION)`.
async fn holder(session: &LockSession) -> String {
    let found = session
        .client
        .query(
            "SELECT a.pid::text, coalesce(host(a.client_addr), 'a local socket'), \
             coalesce(nullif(a.application_name, ''), '?') \
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
             WHERE l.locktype = 'advisory' AND l.granted \
             AND l.classid = ($1 >> 32)::oid AND l.objid = ($1 & 4294967295)::oid \
             AND l.objsubid = 1 AND l.database = \
             (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&CONTROLLER_LOCK],
        )
        .await;
    match found.as_deref() {
        Ok([row, ..]) => {
            let field = |i: usize| row.try_get::<_, String>(i).unwrap_or_default();
            format!(
                "database session {} from {} ({})",
                field(0),
                field(1),
                field(2)
            )
        }
        _ => "another session".to_owned(),
    }
}

fn lost(what: &str, error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{what}: {error}: {cause}"),
        None => format!("{what}: {error}"),
    }
}

/// Takes the controller lock, waiting as long as another session holds it (the standby). A
/// first connection that fails is an error (a wrong URL, an unreachable server); a
/// connection lost while waiting is made again.
pub(super) async fn acquire(config: &Config) -> Result<LockSession, StoreError> {
    let mut session = connect(config)
        .await
        .map_err(|e| StoreError::Postgres(lost("cannot connect", &e)))?;
    let mut said = false;
    loop {
        match try_lock(&session).await {
            Ok(true) => {
                if said {
                    tracing::info!("took the controller lock: this fleetd serves now");
                }
                return Ok(session);
            }
            Ok(false) if !said => {
                tracing::info!(
                    held_by = %holder(&session).await,
                    "standby: another fleetd serves this database; waiting for its controller lock"
                );
                said = true;
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!("standby: {}; connecting again", lost("lock", &error));
                session = reconnect(config).await;
                continue;
            }
        }
        // Wait in PostgreSQL for the lock: granted the moment its holder's session ends.
        let waited = session
            .client
            .batch_execute(&format!("SELECT pg_advisory_lock({CONTROLLER_LOCK})"))
            .await;
        match waited {
            Ok(()) => {
                tracing::info!("took the controller lock: this fleetd serves now");
                return Ok(session);
            }
            Err(error) => {
                tracing::warn!("standby: {}; connecting again", lost("lock", &error));
                session = reconnect(config).await;
            }
        }
    }
}

/// A new lock session, tried every [`RETRY_EVERY`] until one is made.
async fn reconnect(config: &Config) -> LockSession {
    loop {
        tokio::time::sleep(RETRY_EVERY).await;
        match connect(config).await {
            Ok(session) => return session,
            Err(error) => tracing::debug!("{}", lost("cannot connect", &error)),
        }
    }
}

/// Resolves when the lock session is gone: its connection ended, or it stopped answering.
async fn until_lost(session: &mut LockSession) -> String {
    loop {
        tokio::select! {
            _ = &mut session.connection => return "the connection ended".to_owned(),
            _ = tokio::time::sleep(PING_EVERY) => {}
        }
        match tokio::time::timeout(PING_TIMEOUT, session.client.simple_query("SELECT 1")).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return lost("check", &error),
            Err(_) => return format!("no answer within {PING_TIMEOUT:?}"),
        }
    }
}

/// Keeps the lock of a store whose epoch is `epoch` until `stop` fires or is dropped (then
/// releases it), telling `lease` where the store stands.
pub(super) async fn keep(
    config: Config,
    mut session: LockSession,
    epoch: i64,
    lease: watch::Sender<Lease>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => {
                let unlock = format!("SELECT pg_advisory_unlock({CONTROLLER_LOCK})");
                let _ = tokio::time::timeout(PING_TIMEOUT, session.client.batch_execute(&unlock))
                    .await;
                return;
            }
            why = until_lost(&mut session) => {
                let _ = lease.send(Lease::Lost);
                tracing::warn!("lost the controller lock's connection ({why}): writes wait until it is back");
            }
        }
        // Until the lock is ours again (the epoch unchanged) or another fleetd has served.
        let mut first = true;
        loop {
            let wait = if first { Duration::ZERO } else { RETRY_EVERY };
            first = false;
            tokio::select! {
                _ = &mut stop => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let Ok(candidate) = connect(&config).await else {
                continue;
            };
            match current_epoch(&candidate).await {
                Ok(Some(now)) if now != epoch => {
                    let why = format!(
                        "another fleetd took over this database (controller epoch {now}, ours {epoch})"
                    );
                    tracing::error!("{why}: this fleetd stops serving");
                    let _ = lease.send(Lease::Deposed(why));
                    return;
                }
                Ok(_) => {}
                Err(_) => continue,
            }
            // Our old session may still hold the lock on the server for a while (until the
            // server notices it is gone): try again until it is released or the epoch moves.
            if let Ok(true) = try_lock(&candidate).await {
                // Taken; did anyone serve between the check and the lock? The epoch only moves
                // under the lock, so a check now is final.
                match current_epoch(&candidate).await {
                    Ok(Some(now)) if now == epoch => {
                        session = candidate;
                        let _ = lease.send(Lease::Held);
                        tracing::info!("the controller lock is ours again: writes go on");
                        break;
                    }
                    Ok(now) => {
                        let why = format!(
                            "another fleetd took over this database (controller epoch {now:?}, ours {epoch})"
                        );
                        tracing::error!("{why}: this fleetd stops serving");
                        let _ = lease.send(Lease::Deposed(why));
                        return;
                    }
                    Err(_) => continue,
                }
            }
        }
    }
}
