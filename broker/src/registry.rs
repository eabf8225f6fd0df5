//! The live sessions of the front door, by client id: their current rights and a control channel
//! to their pump, and how many come from each source address. Implements [`SessionControl`] for
//! the controller.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use tokio::sync::Notify;

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

/// The registry's way to one session's pump: its [`Control`] messages in order, and a wakeup.
///
/// A queue of its own instead of a tokio channel: an idle session holds one of these for its
/// whole life, and an mpsc channel allocates a block of 32 slots up front (about 2 KiB a
/// session, heaptrack); an empty `VecDeque` allocates nothing.
#[derive(Debug, Default)]
pub(crate) struct ControlQueue {
    queue: Mutex<VecDeque<Control>>,
    ready: Notify,
    /// The pump has stopped taking messages.
    closed: AtomicBool,
}

impl ControlQueue {
    /// Queues `control` for the pump; gives it back if the pump has stopped.
    pub(crate) fn send(&self, control: Control) -> Result<(), Control> {
        let mut queue = lock(&self.queue);
        if self.closed.load(Ordering::Acquire) {
            return Err(control);
        }
        queue.push_back(control);
        drop(queue);
        // Stores a permit when the pump is not waiting: no wakeup is lost.
        self.ready.notify_one();
        Ok(())
    }

    /// The next message, waiting for one. Cancel-safe: a message is taken only when returned.
    pub(crate) async fn recv(&self) -> Control {
        loop {
            if let Some(control) = lock(&self.queue).pop_front() {
                return control;
            }
            self.ready.notified().await;
        }
    }

    /// The pump has ended: what is queued and whatever comes later is refused.
    pub(crate) fn close(&self) {
        let mut queue = lock(&self.queue);
        self.closed.store(true, Ordering::Release);
        queue.clear();
    }
}

/// Rights shared between the registry (writer) and a pump (reader, on every packet).
pub(crate) type SharedRights = Arc<RwLock<Rights>>;

/// Messages queued to one session and not yet taken by its pump; shared by both.
pub(crate) type Undelivered = Arc<Backlog>;

/// Bytes of messages one session may have queued and not taken, at most: with
/// `max_undelivered` messages, what bounds a session that reads just too slowly (responses may
/// be megabytes each).
pub const MAX_UNDELIVERED_BYTES: usize = 32 << 20;

/// What is queued to one session and not taken yet: messages and their bytes.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    messages: AtomicUsize,
    bytes: AtomicUsize,
}

impl Backlog {
    /// The pump took a message of `len` bytes.
    pub(crate) fn taken(&self, len: usize) {
        self.messages.fetch_sub(1, Ordering::AcqRel);
        self.bytes.fetch_sub(len, Ordering::AcqRel);
    }
}

/// How many sessions the registry holds, in all and from one source address, and how many of
/// them only clients admitted as `reserved` (operators) may use: a flood of devices, from one
/// address or many, never locks the operators out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SessionCaps {
    /// Sessions in all; nobody gets more.
    pub(crate) max_sessions: usize,
    /// Sessions from one address for a client that is not reserved.
    pub(crate) per_address: usize,
    /// Of `max_sessions`, the slots only reserved clients may use; a reserved client may also
    /// have this many more from one address than `per_address`.
    pub(crate) reserved: usize,
}

/// Which cap a session would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CapExceeded {
    /// The sessions in all (for a client that is not reserved: those it may use).
    Total,
    /// The sessions from its source address.
    Address,
}

impl CapExceeded {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            CapExceeded::Total => "connection limit reached",
            CapExceeded::Address => "too many sessions from this address",
        }
    }
}

impl SessionCaps {
    /// No caps.
    pub(crate) const UNLIMITED: SessionCaps = SessionCaps {
        max_sessions: usize::MAX,
        per_address: usize::MAX,
        reserved: 0,
    };

    /// Whether one more session fits beside `total` live sessions, `from_address` of them from
    /// its own address (neither counting a session it takes over).
    pub(crate) fn admits(
        &self,
        total: usize,
        from_address: usize,
        reserved: bool,
    ) -> Result<(), CapExceeded> {
        let (total_cap, address_cap) = if reserved {
            (
                self.max_sessions,
                self.per_address.saturating_add(self.reserved),
            )
        } else {
            (
                self.max_sessions.saturating_sub(self.reserved),
                self.per_address,
            )
        };
        if total >= total_cap {
            Err(CapExceeded::Total)
        } else if from_address >= address_cap {
            Err(CapExceeded::Address)
        } else {
            Ok(())
        }
    }
}

struct Entry {
    session_id: u64,
    /// The source address the session counts against.
    address: IpAddr,
    undelivered: Undelivered,
    rights: SharedRights,
    control: Arc<ControlQueue>,
    /// Resolves (or fails, when its sender is dropped) once this session has released its link
    /// in the router.
    released: tokio::sync::oneshot::Receiver<()>,
}

#[derive(Default)]
struct Sessions {
    by_id: HashMap<String, Entry>,
    /// Live sessions per source address (addresses with none are not kept).
    per_address: HashMap<IpAddr, usize>,
}

impl Sessions {
    fn count(&mut self, address: IpAddr) {
        *self.per_address.entry(address).or_insert(0) += 1;
    }

    fn uncount(&mut self, address: IpAddr) {
        if let Some(n) = self.per_address.get_mut(&address) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_address.remove(&address);
            }
        }
    }
}

/// An admitted session, to be registered.
pub(crate) struct NewSession {
    pub(crate) session_id: u64,
    /// The source address it counts against.
    pub(crate) address: IpAddr,
    /// The admission said it may use the reserved slots.
    pub(crate) reserved: bool,
    pub(crate) rights: SharedRights,
    pub(crate) control: Arc<ControlQueue>,
    /// Resolves once the session released its router link (see [`Registry::register`]).
    pub(crate) released: tokio::sync::oneshot::Receiver<()>,
    pub(crate) undelivered: Undelivered,
}

pub struct Registry {
    sessions: Mutex<Sessions>,
    next_session: AtomicU64,
    /// Messages one session may have queued and not written; past it the session is cut.
    max_undelivered: usize,
    caps: SessionCaps,
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

/// Withdraws a session's rights now and tells its pump to close once a message on
/// `last_topic` is written (or after the cut's grace); true.
fn revoke(entry: &Entry, last_topic: Option<String>) -> bool {
    set(&entry.rights, Rights::none());
    let _ = entry.control.send(Control::Cut { last_topic });
    true
}

impl Registry {
    /// A registry whose sessions may each have `max_undelivered` messages queued at most.
    pub fn new(max_undelivered: usize) -> Registry {
        Registry::with_caps(max_undelivered, SessionCaps::UNLIMITED)
    }

    /// A registry that registers no session beyond `caps`.
    pub(crate) fn with_caps(max_undelivered: usize, caps: SessionCaps) -> Registry {
        Registry {
            sessions: Mutex::new(Sessions::default()),
            next_session: AtomicU64::new(0),
            max_undelivered: max_undelivered.max(1),
            caps,
        }
    }

    pub(crate) fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Numbers the sessions from `base` on (`base + 1` is the next): the edges of a cluster
    /// start from random bases so that a session id names one session across the cluster.
    /// Call before the first session.
    pub fn number_sessions_from(&self, base: u64) {
        self.next_session.store(base, Ordering::Relaxed);
    }

    /// The session id of `client_id`'s live session, if it has one.
    pub fn session_of(&self, client_id: &str) -> Option<u64> {
        lock(&self.sessions)
            .by_id
            .get(client_id)
            .map(|e| e.session_id)
    }

    /// The rights of `client_id`'s live session as they are now, if it has one.
    pub fn rights_of(&self, client_id: &str) -> Option<Rights> {
        lock(&self.sessions)
            .by_id
            .get(client_id)
            .map(|e| read(&e.rights).clone())
    }

    /// Every live session: its client id and session id.
    pub fn live_sessions(&self) -> Vec<(String, u64)> {
        lock(&self.sessions)
            .by_id
            .iter()
            .map(|(client_id, e)| (client_id.clone(), e.session_id))
            .collect()
    }

    /// Cuts the live session of `client_id` if it is `session_id` (a takeover on another
    /// node of a cluster); true if it was cut.
    pub fn cut_session(&self, client_id: &str, session_id: u64) -> bool {
        match lock(&self.sessions).by_id.get(client_id) {
            Some(entry) if entry.session_id == session_id => revoke(entry, None),
            _ => false,
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        lock(&self.sessions).by_id.len()
    }

    /// Number of live sessions from `address`.
    pub fn sessions_from(&self, address: IpAddr) -> usize {
        lock(&self.sessions)
            .per_address
            .get(&address)
            .copied()
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Registers an admitted session, or refuses it when it would exceed the registry's caps
    /// ([`SessionCaps::admits`]). A live session with the same client id is taken over, and its
    /// slot is the new session's: a takeover never counts twice. Returns, for a takeover, what
    /// resolves once the old session released its router link: the new link must not be built
    /// before (the router would see two sessions with one client id, and the old one's late
    /// DISCONNECT would end the new one).
    pub(crate) fn register(
        &self,
        client_id: &str,
        session: NewSession,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<()>>, CapExceeded> {
        let NewSession {
            session_id,
            address,
            reserved,
            rights,
            control,
            released,
            undelivered,
        } = session;
        let mut sessions = lock(&self.sessions);
        // Checked and inserted under one lock: concurrent admissions cannot overshoot a cap.
        let replaced = sessions.by_id.get(client_id).map(|old| old.address);
        let total = sessions
            .by_id
            .len()
            .saturating_sub(usize::from(replaced.is_some()));
        let from_address = sessions
            .per_address
            .get(&address)
            .copied()
            .unwrap_or(0)
            .saturating_sub(usize::from(replaced == Some(address)));
        self.caps.admits(total, from_address, reserved)?;
        let old = sessions.by_id.insert(
            client_id.to_owned(),
            Entry {
                session_id,
                address,
                undelivered,
                rights,
                control,
                released,
            },
        );
        sessions.count(address);
        Ok(old.map(|old| {
            sessions.uncount(old.address);
            set(&old.rights, Rights::none());
            let _ = old.control.send(Control::TakenOver);
            old.released
        }))
    }

    /// Removes a session if it is still the registered one for its client id.
    pub(crate) fn unregister(&self, client_id: &str, session_id: u64) -> bool {
        let mut sessions = lock(&self.sessions);
        match sessions.by_id.get(client_id) {
            Some(e) if e.session_id == session_id => {
                let address = e.address;
                sessions.by_id.remove(client_id);
                sessions.uncount(address);
                true
            }
            _ => false,
        }
    }
}

impl SessionControl for Registry {
    fn set_rights(&self, client_id: &str, rights: Rights) -> bool {
        match lock(&self.sessions).by_id.get(client_id) {
            Some(entry) => {
                set(&entry.rights, rights);
                true
            }
            None => false,
        }
    }

    fn set_rights_of(&self, client_id: &str, session_id: u64, rights: Rights) -> bool {
        match lock(&self.sessions).by_id.get(client_id) {
            Some(entry) if entry.session_id == session_id => {
                set(&entry.rights, rights);
                true
            }
            _ => false,
        }
    }

    fn cut(&self, client_id: &str, last_topic: Option<String>) -> bool {
        // Rights are withdrawn synchronously, before this returns: from now on the session can
        // neither publish nor subscribe, whatever the pump is doing.
        match lock(&self.sessions).by_id.get(client_id) {
            Some(entry) => revoke(entry, last_topic),
            None => false,
        }
    }

    fn is_connected(&self, client_id: &str) -> bool {
        lock(&self.sessions).by_id.contains_key(client_id)
    }

    fn deliver(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool {
        match lock(&self.sessions).by_id.get(client_id) {
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
        match lock(&self.sessions).by_id.get(client_id) {
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
        let backlog = &entry.undelivered;
        let len = payload.len();
        let messages = backlog.messages.fetch_add(1, Ordering::AcqRel);
        let bytes = backlog.bytes.fetch_add(len, Ordering::AcqRel);
        if messages >= self.max_undelivered || bytes + len > MAX_UNDELIVERED_BYTES {
            backlog.taken(len);
            set(&entry.rights, Rights::none());
            let _ = entry.control.send(Control::Overflow);
            return false;
        }
        if entry
            .control
            .send(Control::Deliver { topic, payload })
            .is_err()
        {
            backlog.taken(len);
            return false;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CAPS: SessionCaps = SessionCaps {
        max_sessions: 10,
        per_address: 3,
        reserved: 2,
    };

    #[tokio::test]
    async fn the_control_queue_keeps_order_loses_no_wakeup_and_refuses_once_closed() {
        let queue = Arc::new(ControlQueue::default());
        // Sent before anyone waits: the wakeup is kept.
        assert!(queue.send(Control::TakenOver).is_ok());
        assert!(matches!(queue.recv().await, Control::TakenOver));
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move {
                let first = queue.recv().await;
                let second = queue.recv().await;
                (first, second)
            }
        });
        tokio::task::yield_now().await;
        assert!(queue
            .send(Control::Cut {
                last_topic: Some("a".into())
            })
            .is_ok());
        assert!(queue.send(Control::Overflow).is_ok());
        let (first, second) = waiter.await.expect("waiter");
        assert!(matches!(first, Control::Cut { last_topic: Some(t) } if t == "a"));
        assert!(matches!(second, Control::Overflow));
        queue.close();
        assert!(queue.send(Control::Overflow).is_err());
    }

    #[test]
    fn reserved_slots_are_kept_for_reserved_clients() {
        // Devices: 8 in all (10 minus 2 reserved), 3 per address.
        assert_eq!(CAPS.admits(7, 0, false), Ok(()));
        assert_eq!(CAPS.admits(8, 0, false), Err(CapExceeded::Total));
        assert_eq!(CAPS.admits(2, 3, false), Err(CapExceeded::Address));
        // Operators: all 10, and 5 per address.
        assert_eq!(CAPS.admits(9, 4, true), Ok(()));
        assert_eq!(CAPS.admits(10, 0, true), Err(CapExceeded::Total));
        assert_eq!(CAPS.admits(2, 5, true), Err(CapExceeded::Address));
        assert_eq!(
            SessionCaps::UNLIMITED.admits(usize::MAX - 1, 7, false),
            Ok(())
        );
    }

    fn register(
        registry: &Registry,
        client_id: &str,
        address: IpAddr,
        reserved: bool,
    ) -> Result<Option<tokio::sync::oneshot::Receiver<()>>, CapExceeded> {
        let control = Arc::new(ControlQueue::default());
        let (_, released) = tokio::sync::oneshot::channel();
        let session = NewSession {
            session_id: registry.next_session_id(),
            address,
            reserved,
            rights: SharedRights::default(),
            control,
            released,
            undelivered: Undelivered::default(),
        };
        registry.register(client_id, session)
    }

    #[test]
    fn sessions_are_counted_per_address_and_a_takeover_counts_once() {
        let registry = Registry::with_caps(8, CAPS);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        for id in ["a1", "a2", "a3"] {
            assert!(matches!(register(&registry, id, a, false), Ok(None)));
        }
        assert_eq!(
            register(&registry, "a4", a, false).err(),
            Some(CapExceeded::Address)
        );
        // A takeover of a1 from the same address replaces its slot.
        assert!(matches!(register(&registry, "a1", a, false), Ok(Some(_))));
        assert_eq!(registry.sessions_from(a), 3);
        // A takeover from another address moves the slot.
        assert!(matches!(register(&registry, "a1", b, false), Ok(Some(_))));
        assert_eq!(
            (registry.sessions_from(a), registry.sessions_from(b)),
            (2, 1)
        );
        // An operator may use the reserved slots of its address.
        assert!(matches!(register(&registry, "op", a, true), Ok(None)));
        assert_eq!(registry.len(), 4);
        let gone = lock(&registry.sessions).by_id["a2"].session_id;
        assert!(registry.unregister("a2", gone));
        assert_eq!(registry.sessions_from(a), 2);
    }

    proptest! {
        /// Whatever registers and leaves, devices never hold more than `max - reserved` in all
        /// nor `per_address` from one address, and the per-address counts add up to the total.
        #[test]
        fn caps_hold_under_any_sequence(
            steps in proptest::collection::vec((0u8..12, 0u8..3, any::<bool>(), any::<bool>()), 0..80),
        ) {
            let registry = Registry::with_caps(8, CAPS);
            for (id, from, reserved, join) in steps {
                let client_id = format!("c{id}");
                let address = IpAddr::from([192, 0, 2, from]);
                if join {
                    let _ = register(&registry, &client_id, address, reserved);
                } else {
                    let session = lock(&registry.sessions).by_id.get(&client_id).map(|e| e.session_id);
                    if let Some(session) = session {
                        registry.unregister(&client_id, session);
                    }
                }
                let sessions = lock(&registry.sessions);
                prop_assert!(sessions.by_id.len() <= CAPS.max_sessions);
                prop_assert_eq!(sessions.per_address.values().sum::<usize>(), sessions.by_id.len());
                for n in sessions.per_address.values() {
                    prop_assert!(*n <= CAPS.per_address + CAPS.reserved);
                }
            }
        }
    }
}
