//! The live sessions of the front door, by client id: their current rights and a control channel
//! to their pump. Implements [`SessionControl`] for the controller.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::mpsc;

use crate::acl::Rights;
use crate::admission::SessionControl;

/// What the registry asks of a session's pump.
#[derive(Debug)]
pub(crate) enum Control {
    /// Close once a message on `last_topic` was written, or at once when `None`; the grace is
    /// bounded by the pump.
    Cut { last_topic: Option<String> },
    /// Another connection took this client id over.
    TakenOver,
    /// A message on one of the session's mailbox topics (`crate::mailbox`).
    Deliver { topic: String, payload: Vec<u8> },
    /// More messages were queued to the session than it has taken: end it, with a reason.
    Overflow,
}

/// Rights shared between the registry (writer) and a pump (reader, on every packet).
pub(crate) type SharedRights = Arc<RwLock<Rights>>;

/// Messages queued to one session and not yet taken by its pump; shared by both.
pub(crate) type Undelivered = Arc<AtomicUsize>;

struct Entry {
    session_id: u64,
    undelivered: Undelivered,
    rights: SharedRights,
    control: mpsc::UnboundedSender<Control>,
    /// Resolves (or fails, when its sender is dropped) once this session has released its link
    /// in the router.
    released: tokio::sync::oneshot::Receiver<()>,
}

pub struct Registry {
    sessions: Mutex<HashMap<String, Entry>>,
    next_session: AtomicU64,
    /// Messages one session may have queued and not written; past it the session is cut.
    max_undelivered: usize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry::new(1024)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the map half-updated (single inserts and
    // removes), so a poisoned lock is still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn set(rights: &SharedRights, new: Rights) {
    *rights.write().unwrap_or_else(|e| e.into_inner()) = new;
}

pub(crate) fn read(rights: &SharedRights) -> std::sync::RwLockReadGuard<'_, Rights> {
    rights.read().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    /// A registry whose sessions may each have `max_undelivered` messages queued at most.
    pub fn new(max_undelivered: usize) -> Registry {
        Registry {
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(0),
            max_undelivered: max_undelivered.max(1),
        }
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        lock(&self.sessions).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers an admitted session; a live session with the same client id is taken over.
    /// Returns, for a takeover, what resolves once the old session released its router link:
    /// the new link must not be built before (the router would see two sessions with one
    /// client id, and the old one's late DISCONNECT would end the new one).
    pub(crate) fn register(
        &self,
        client_id: &str,
        session_id: u64,
        rights: SharedRights,
        control: mpsc::UnboundedSender<Control>,
        released: tokio::sync::oneshot::Receiver<()>,
        undelivered: Undelivered,
    ) -> Option<tokio::sync::oneshot::Receiver<()>> {
        let old = lock(&self.sessions).insert(
            client_id.to_owned(),
            Entry {
                session_id,
                undelivered,
                rights,
                control,
                released,
            },
        );
        old.map(|old| {
            set(&old.rights, Rights::none());
            let _ = old.control.send(Control::TakenOver);
            old.released
        })
    }

    /// Removes a session if it is still the registered one for its client id.
    pub(crate) fn unregister(&self, client_id: &str, session_id: u64) -> bool {
        let mut sessions = lock(&self.sessions);
        if sessions
            .get(client_id)
            .is_some_and(|e| e.session_id == session_id)
        {
            sessions.remove(client_id);
            true
        } else {
            false
        }
    }

    /// Cuts every live session (shutdown).
    pub(crate) fn cut_all(&self) {
        for entry in lock(&self.sessions).values() {
            set(&entry.rights, Rights::none());
            let _ = entry.control.send(Control::Cut { last_topic: None });
        }
    }
}

impl SessionControl for Registry {
    fn set_rights(&self, client_id: &str, rights: Rights) -> bool {
        match lock(&self.sessions).get(client_id) {
            Some(entry) => {
                set(&entry.rights, rights);
                true
            }
            None => false,
        }
    }

    fn cut(&self, client_id: &str, last_topic: Option<String>) -> bool {
        // Rights are withdrawn synchronously, before this returns: from now on the session can
        // neither publish nor subscribe, whatever the pump is doing.
        match lock(&self.sessions).get(client_id) {
            Some(entry) => {
                set(&entry.rights, Rights::none());
                let _ = entry.control.send(Control::Cut { last_topic });
                true
            }
            None => false,
        }
    }

    fn is_connected(&self, client_id: &str) -> bool {
        lock(&self.sessions).contains_key(client_id)
    }

    fn deliver(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool {
        match lock(&self.sessions).get(client_id) {
            Some(entry) => self.queue(entry, topic, payload),
            None => false,
        }
    }

    fn deliver_to(
        &self,
        client_id: &str,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> bool {
        match lock(&self.sessions).get(client_id) {
            Some(entry) if entry.session_id == session_id => self.queue(entry, topic, payload),
            _ => false,
        }
    }
}

impl Registry {
    /// Queues a message to a session's pump, or cuts the session when it has too many queued
    /// already (it is not reading them): a message is never dropped while the session goes on.
    fn queue(&self, entry: &Entry, topic: String, payload: Vec<u8>) -> bool {
        // The same channel as `cut`: a message delivered before a cut is written before it.
        if entry.undelivered.fetch_add(1, Ordering::AcqRel) >= self.max_undelivered {
            entry.undelivered.fetch_sub(1, Ordering::AcqRel);
            set(&entry.rights, Rights::none());
            let _ = entry.control.send(Control::Overflow);
            return false;
        }
        if entry
            .control
            .send(Control::Deliver { topic, payload })
            .is_err()
        {
            entry.undelivered.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }
}
