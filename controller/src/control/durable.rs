//! The controller's ways to the store, as types. Reads and queued commits ([`Shared`]) are
//! open to anyone: nothing waits for a queued commit while it holds a transaction. The two
//! ways of writing that hold or wait for redb's only write transaction ([`Durable::begin`], a
//! batch's own transaction, and [`Durable::commit`], a single commit that waits for the
//! writer thread) both take `&mut Durable`, and a [`Batch`] borrows it for its whole life: a
//! single commit cannot even be asked for while a batch's transaction is alive (the writer
//! thread would wait for that transaction, and the batch for the writer). `Durable` lives under
//! the controller's lock, so no other thread can ask for either meanwhile.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;

use fleet_broker::BoxFuture;
use tracing::warn;

use super::effects::Outbox;
use crate::audit::AuditRecord;
use crate::phone::Phone;
use crate::station::Station;
use crate::store::{Change, Store, StoreError, StoreTxn};
use crate::whitelist::Whitelists;
use fleet_protocol::{CommandError, Mac, Serial};

/// Every station record a batch wrote, as it stands at the end of the batch (`None`:
/// deleted): once the batch is committed, the store holds exactly these.
pub(super) type Written = HashMap<Serial, Option<Station>>;

/// A commit queued for the writer thread; it completes once the changes are durable.
pub(super) type Queued = BoxFuture<'static, Result<Vec<AuditRecord>, StoreError>>;

/// Reads of the committed state, and commits queued without waiting.
pub(super) struct Shared(Arc<Store>);

impl Shared {
    pub(super) fn station(&self, serial: &Serial) -> Result<Option<Station>, StoreError> {
        self.0.station(serial)
    }

    pub(super) fn stations(&self) -> Result<Vec<Station>, StoreError> {
        self.0.stations()
    }

    pub(super) fn phone(&self, mac: &Mac) -> Result<Option<Phone>, StoreError> {
        self.0.phone(mac)
    }

    /// Every phone of every tenant.
    pub(super) fn phones(&self) -> Result<Vec<Phone>, StoreError> {
        self.0.phones(None)
    }

    /// Whether reads are served from the local file on the caller's thread (redb), not by a
    /// server over the network (PostgreSQL): see `Wait::Never`.
    pub(super) fn reads_are_local(&self) -> bool {
        self.0.reads_are_local()
    }

    pub(super) fn whitelists(&self) -> Result<Whitelists, StoreError> {
        self.0.whitelists()
    }

    /// The newest `limit` audit records of `tenant` (the shell's tests read what was audited).
    #[cfg(test)]
    pub(super) fn audit(&self, tenant: &str, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.0.audit(tenant, limit)
    }

    /// Commits `changes` through the writer thread and waits until they are durable: only for
    /// a caller that holds neither the controller's lock nor a batch (the writer may wait for
    /// a batch's transaction; see the module's comment). The sightings use it, so that their
    /// fsync by the minute does not hold the lock.
    pub(super) fn commit_unlocked(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        self.0.apply(changes).map(drop)
    }

    /// Queues `changes` for the writer thread, grouped with whatever else is queued (one fsync
    /// for a connect storm); the future completes once they are durable.
    pub(super) fn queue(&self, changes: Vec<Change>) -> Queued {
        Box::pin(self.0.apply_async(changes))
    }
}

/// The exclusive ways of writing: a batch's transaction, or a single commit that waits.
pub(super) struct Durable(Arc<Store>);

/// The store as the controller holds it: shared reads and queued commits, and the exclusive
/// write access (for under the controller's lock).
pub(super) fn open(store: Store) -> (Shared, Durable) {
    let store = Arc::new(store);
    (Shared(Arc::clone(&store)), Durable(store))
}

impl Durable {
    /// A transaction of the batch's own: its reads see its writes, and nothing of it is durable
    /// or visible before [`Batch::commit`].
    pub(super) fn begin(&mut self) -> Result<Batch<'_>, StoreError> {
        Ok(Batch {
            txn: self.0.begin()?,
            out: Outbox::default(),
            written: Written::new(),
            _exclusive: PhantomData,
        })
    }

    /// Commits `changes` through the writer thread and waits until they are durable (for a
    /// decision that the next one must see: the sweep of expired stations). Returns the audit
    /// records as stored, for the caller to publish.
    pub(super) fn commit(
        &mut self,
        changes: Vec<Change>,
    ) -> Result<Vec<AuditRecord>, CommandError> {
        self.0.apply(changes).map_err(|e| refused(&e))
    }
}

fn refused(e: &StoreError) -> CommandError {
    warn!("store: {e}");
    CommandError::internal(format!("the store refused the change: {e}"))
}

/// The receipt of [`Batch::record`]: a change and its audit record are in the batch's
/// transaction. Only `record` makes one, so a command that answers with it has been audited.
pub(super) struct Recorded(());

/// One batch of messages handled together (`Controller::handle_batch`): reads see the batch's
/// own writes, all its changes are committed in ONE transaction at the end, and everything it
/// says or does is held back in `out` until that commit.
pub(super) struct Batch<'d> {
    txn: StoreTxn,
    pub(super) out: Outbox,
    written: Written,
    /// The batch holds the exclusive write access while it lives.
    _exclusive: PhantomData<&'d mut Durable>,
}

/// A batch that was committed: its audit records as stored, what it says and does, and the
/// station records it wrote.
pub(super) struct Committed {
    pub(super) records: Vec<AuditRecord>,
    pub(super) out: Outbox,
    pub(super) written: Written,
}

/// A batch that was not committed: why, and what it would have said and done.
pub(super) struct Abandoned {
    pub(super) error: StoreError,
    pub(super) out: Outbox,
}

impl Batch<'_> {
    /// Reads, as the batch sees the store.
    pub(super) fn txn(&self) -> &StoreTxn {
        &self.txn
    }

    /// Writes `changes` and then their `audit` record into the batch's transaction.
    pub(super) fn record(
        &mut self,
        mut changes: Vec<Change>,
        audit: AuditRecord,
    ) -> Result<Recorded, CommandError> {
        for change in &changes {
            match change {
                Change::PutStation(s) => {
                    self.written.insert(s.serial.clone(), Some(s.clone()));
                }
                Change::DeleteStation(serial) => {
                    self.written.insert(serial.clone(), None);
                }
                _ => {}
            }
        }
        changes.push(Change::Audit(audit));
        self.txn.apply(changes).map_err(|e| refused(&e))?;
        Ok(Recorded(()))
    }

    /// Writes `changes` that have no audit record of their own into the batch's transaction:
    /// a phone's count of wrong PAPs while its state stays the same.
    pub(super) fn write(&mut self, changes: Vec<Change>) -> Result<(), CommandError> {
        debug_assert!(changes
            .iter()
            .all(|c| !matches!(c, Change::PutStation(_) | Change::DeleteStation(_))));
        self.txn.apply(changes).map_err(|e| refused(&e))
    }

    /// Commits the batch (one fsync; none if it wrote nothing).
    pub(super) fn commit(self) -> Result<Committed, Abandoned> {
        let Batch {
            txn, out, written, ..
        } = self;
        match txn.commit() {
            Ok(records) => Ok(Committed {
                records,
                out,
                written,
            }),
            Err(error) => Err(Abandoned { error, out }),
        }
    }
}
