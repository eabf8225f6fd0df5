//! What a scrape of the metrics endpoint reads from the controller: live sessions by kind,
//! stations waiting for approval, locked-out phones and address blocks, computed when asked
//! instead of kept up to date on every message.

use fleet_broker::metrics::{Readings, SESSION_KINDS};

use super::Controller;
use crate::identity::Identity;
use crate::phone::AuthState;

impl Controller {
    /// The gauges of a scrape. Takes the controller's lock only to count the live view (no I/O
    /// under it), then reads the phones from the store without the lock; the caller writes
    /// the answer to the scraper after this has returned.
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
        let mut dead = Vec::new();
        // A scan of the phones: a scrape every few seconds reads them all (no lock held).
        let locked_phones = match self.store.phones() {
            Ok(phones) => phones
                .iter()
                .filter(|p| {
                    matches!(
                        p.state_at(now),
                        AuthState::Failed { .. } | AuthState::Blocked
                    )
                })
                .count(),
            Err(_) => {
                dead.push("store");
                0
            }
        };
        Readings {
            sessions,
            pending_stations,
            locked_phones: i64::try_from(locked_phones).unwrap_or(i64::MAX),
            address_blocks: i64::try_from(address_blocks).unwrap_or(i64::MAX),
            dead,
        }
    }
}
