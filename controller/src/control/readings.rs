//! What a scrape of the metrics endpoint reads from the controller: live sessions by kind,
//! stations waiting for approval, locked-out phones and address blocks, computed when asked
//! instead of kept up to date on every message. The locked-out phones need a read of every
//! phone, so that count is reused for [`LOCKED_PHONES_FOR`], however often scrapers ask.

use fleet_broker::metrics::{Readings, SESSION_KINDS};

use super::Controller;

/// How long a count of the locked-out phones is reused by later scrapes.
pub(crate) const LOCKED_PHONES_FOR: time::Duration = time::Duration::seconds(10);
use crate::identity::Identity;
use crate::phone::AuthState;

impl Controller {
    /// The gauges of a scrape. Takes the controller's lock only to count the live view (no I/O
    /// under it), then counts the locked-out phones without it; the caller writes the answer
    /// to the scraper after this has returned.
    pub fn readings(&self) -> Readings {
        let now = self.now();
        let mut sessions = [0i64; SESSION_KINDS.len()];
        let pending_stations = {
            let guard = self.lock();
            for session in guard.live.sessions.values() {
                let kind = match session.identity {
                    Identity::Station { .. } => 0,
                    Identity::Phone { .. } => 1,
                    Identity::Operator { .. } => 2,
                };
                if let Some(n) = sessions.get_mut(kind) {
                    *n += 1;
                }
            }
            i64::from(guard.live.pending.total())
        };
        let address_blocks = self
            .failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .blocks(now)
            .len();
        let locked_phones = self.locked_phones(now);
        Readings {
            sessions,
            pending_stations,
            locked_phones: i64::try_from(locked_phones).unwrap_or(i64::MAX),
            address_blocks: i64::try_from(address_blocks).unwrap_or(i64::MAX),
            // The controller answers: it is this one.
            controller_heard: 1,
        }
    }

    /// The phones locked out (`authentication_failed`) or blocked at `now`: a read of every
    /// phone without the lock, at most once per [`LOCKED_PHONES_FOR`]. A store that cannot be
    /// read leaves the last count (the store's health is `/healthz`'s).
    fn locked_phones(&self, now: time::OffsetDateTime) -> usize {
        let mut cached = self.locked_phones.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, count)) = *cached {
            if now >= at && now - at < LOCKED_PHONES_FOR {
                return count;
            }
        }
        let Ok(phones) = self.store.phones() else {
            return cached.map_or(0, |(_, count)| count);
        };
        let count = phones
            .iter()
            .filter(|p| {
                matches!(
                    p.state_at(now),
                    AuthState::Failed { .. } | AuthState::Blocked
                )
            })
            .count();
        *cached = Some((now, count));
        count
    }
}
