//! The controller's in-memory view, kept under its lock: the live sessions and who they are,
//! when stations were last seen, the tenants' whitelists and the stations waiting for
//! approval (mirrors of the store, rebuilt from it when a batch is not committed).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;

use time::OffsetDateTime;

use crate::identity::Identity;
use crate::station::{Presented, Standing, Station};
use crate::whitelist::Whitelists;
use fleet_protocol::Serial;

/// An admitted session, by its client id.
pub(super) struct LiveSession {
    pub(super) session_id: u64,
    pub(super) identity: Identity,
    pub(super) ip: IpAddr,
    /// The session this one replaces, until this one is registered by the front door
    /// (`opened`): if its registration fails (a cap), the previous one is still the live one.
    pub(super) previous: Option<Box<LiveSession>>,
}

/// What the controller knows in memory, beside the store.
#[derive(Default)]
pub(super) struct Live {
    /// Admitted sessions by client id.
    pub(super) sessions: HashMap<String, LiveSession>,
    /// Last activity of stations, kept in memory (not worth an fsync per message) and written
    /// to the store by the minute (`Controller::record_sightings`). Changed only through
    /// [`Live::saw`] and [`Live::forget_seen`].
    pub(super) last_seen: HashMap<Serial, OffsetDateTime>,
    /// The stations whose `last_seen` moved since it was last written to the store.
    pub(super) seen_unwritten: HashSet<Serial>,
    /// Identity and address of the last admitted session of each station client id: a message
    /// published just before its session closed (`mosquitto_pub` does exactly that) reaches the
    /// controller after the close, and is still attributed to the session that sent it.
    pub(super) last_station_session: HashMap<String, (Presented, IpAddr)>,
    /// Address of the last admitted session of each phone client id, for the same reason
    /// (`provision/complete` is often the phone's last message before it disconnects).
    pub(super) last_phone_ip: HashMap<String, IpAddr>,
    /// Permanent and temporary whitelists of every tenant (mirrors the store).
    pub(super) whitelists: Whitelists,
    /// Stations waiting for approval, and who is who case-insensitively (mirrors the store).
    pub(super) pending: PendingIndex,
}

impl Live {
    /// `serial` was seen at `at` (a message, its session's start or end, or its session still
    /// open at a sweep). Never moves a sighting back.
    pub(super) fn saw(&mut self, serial: &Serial, at: OffsetDateTime) {
        let seen = self.last_seen.entry(serial.clone()).or_insert(at);
        if at >= *seen {
            *seen = at;
            self.seen_unwritten.insert(serial.clone());
        }
    }

    /// `serial` has no record any more: nothing to remember it by.
    pub(super) fn forget_seen(&mut self, serial: &Serial) {
        self.last_seen.remove(serial);
        self.seen_unwritten.remove(serial);
    }
}

/// The stations waiting for approval (records a device created, neither accepted nor rejected)
/// with the address of their last request, and every serial by its lower-case form: what the
/// pending-station limits and the one-serial-per-case rule are checked against without a scan.
#[derive(Default)]
pub(super) struct PendingIndex {
    pub(super) waiting: HashMap<Serial, Option<IpAddr>>,
    per_ip: HashMap<IpAddr, u32>,
    folded: HashMap<String, Serial>,
}

impl PendingIndex {
    pub(super) fn build(stations: &[Station]) -> PendingIndex {
        let mut index = PendingIndex::default();
        for s in stations {
            index.update(&s.serial, Some(s));
        }
        index
    }

    pub(super) fn is_waiting(s: &Station) -> bool {
        !matches!(s.standing, Standing::Authorized | Standing::Rejected)
    }

    /// Records the station's record as it now stands (`None`: deleted). A waiting station counts
    /// against the address that first made its record, whichever address asks again later:
    /// moving records to another address would free the first one's share.
    pub(super) fn update(&mut self, serial: &Serial, record: Option<&Station>) {
        let counted = self.waiting.get(serial).copied();
        if let Some(Some(ip)) = self.waiting.remove(serial) {
            if let Some(n) = self.per_ip.get_mut(&ip) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_ip.remove(&ip);
                }
            }
        }
        let folded = serial.as_str().to_ascii_lowercase();
        match record {
            Some(s) => {
                self.folded.insert(folded, serial.clone());
                if Self::is_waiting(s) {
                    let ip = counted.unwrap_or_else(|| {
                        s.ip.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok())
                    });
                    if let Some(ip) = ip {
                        *self.per_ip.entry(ip).or_default() += 1;
                    }
                    self.waiting.insert(serial.clone(), ip);
                }
            }
            None => {
                if self.folded.get(&folded) == Some(serial) {
                    self.folded.remove(&folded);
                }
            }
        }
    }

    pub(super) fn waiting_from(&self, ip: IpAddr) -> u32 {
        self.per_ip.get(&ip).copied().unwrap_or(0)
    }

    pub(super) fn total(&self) -> u32 {
        u32::try_from(self.waiting.len()).unwrap_or(u32::MAX)
    }

    /// Another station whose serial differs from `serial` only in case and that an operator
    /// decided on (accepted or rejected): a look-alike of it is refused. Twins that are both
    /// waiting are both shown (their fingerprints tell them apart), so that a squatter's
    /// lower-case record cannot lock the real station out.
    pub(super) fn case_twin(&self, serial: &Serial) -> Option<&Serial> {
        self.folded
            .get(&serial.as_str().to_ascii_lowercase())
            .filter(|other| *other != serial && !self.waiting.contains_key(*other))
    }
}
