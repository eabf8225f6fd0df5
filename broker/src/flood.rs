//! Per-source-address limits the accept loop checks before any TLS work is spent on a
//! connection: the connection rate (a token bucket per address) and the sockets still in their
//! TLS handshake or waiting for CONNECT. Pure: the caller passes `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Above this many tracked addresses, full buckets are forgotten (they carry no state).
const MAX_TRACKED: usize = 65_536;

#[derive(Debug)]
pub struct ConnectionRate {
    /// Tokens per address; also the burst.
    capacity: f64,
    /// Tokens regained per second.
    refill_per_sec: f64,
    buckets: HashMap<IpAddr, (f64, Instant)>,
}

impl ConnectionRate {
    /// `per_minute` connections per address and minute, with a burst of as many.
    pub fn new(per_minute: u32) -> ConnectionRate {
        let per_minute = f64::from(per_minute.max(1));
        ConnectionRate {
            capacity: per_minute,
            refill_per_sec: per_minute / 60.0,
            buckets: HashMap::new(),
        }
    }

    /// Whether a new connection from `ip` may proceed at `now` (and spends a token if so).
    pub fn admit(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() >= MAX_TRACKED {
            let (capacity, rate) = (self.capacity, self.refill_per_sec);
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + rate * now.saturating_duration_since(*at).as_secs_f64() < capacity
            });
        }
        let (capacity, rate) = (self.capacity, self.refill_per_sec);
        let (tokens, at) = self.buckets.entry(ip).or_insert((capacity, now));
        let elapsed = now.saturating_duration_since(*at);
        *tokens = (*tokens + rate * elapsed.as_secs_f64()).min(capacity);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Time until `ip` has a token again (for logs).
    pub fn retry_after(&self, ip: IpAddr) -> Duration {
        match self.buckets.get(&ip) {
            Some((tokens, _)) if *tokens < 1.0 => {
                Duration::from_secs_f64((1.0 - tokens) / self.refill_per_sec)
            }
            _ => Duration::ZERO,
        }
    }
}

/// Connections from each source address that are in their TLS handshake or waiting for
/// CONNECT. One address may hold only so many: the socket cap above them cannot tell an operator
/// from a flood before the handshake, and without this one address could fill it.
#[derive(Debug)]
pub struct PendingHandshakes {
    per_address: usize,
    pending: HashMap<IpAddr, usize>,
}

impl PendingHandshakes {
    /// At most `per_address` unfinished handshakes from one address (at least 1).
    pub fn new(per_address: usize) -> PendingHandshakes {
        PendingHandshakes {
            per_address: per_address.max(1),
            pending: HashMap::new(),
        }
    }

    /// Counts a new connection from `ip`, or returns false (and counts nothing) when `ip`
    /// already has its share.
    pub fn begin(&mut self, ip: IpAddr) -> bool {
        let pending = self.pending.entry(ip).or_insert(0);
        if *pending >= self.per_address {
            return false;
        }
        *pending += 1;
        true
    }

    /// A connection from `ip` counted by [`PendingHandshakes::begin`] finished its handshake
    /// and CONNECT, or ended.
    pub fn end(&mut self, ip: IpAddr) {
        if let Some(pending) = self.pending.get_mut(&ip) {
            *pending = pending.saturating_sub(1);
            if *pending == 0 {
                self.pending.remove(&ip);
            }
        }
    }

    /// Unfinished handshakes from `ip`.
    pub fn pending(&self, ip: IpAddr) -> usize {
        self.pending.get(&ip).copied().unwrap_or(0)
    }

    /// Addresses with an unfinished handshake (the map forgets the others).
    pub fn addresses(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_address_holds_its_share_of_handshakes_and_no_more() {
        let mut pending = PendingHandshakes::new(2);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        assert!(pending.begin(a));
        assert!(pending.begin(a));
        assert!(!pending.begin(a), "a's share is taken");
        assert!(pending.begin(b), "another address is not affected");
        pending.end(a);
        assert!(pending.begin(a), "a finished one: room again");
        pending.end(a);
        pending.end(a);
        pending.end(b);
        assert_eq!(pending.addresses(), 0, "nothing kept for idle addresses");
        pending.end(b);
        assert_eq!(pending.pending(b), 0);
    }

    proptest! {
        /// However `begin` and `end` interleave, an address never holds more than its share, and
        /// the count is what was begun and not ended.
        #[test]
        fn the_share_holds_under_any_interleaving(
            steps in proptest::collection::vec((0u8..3, any::<bool>()), 0..64),
            share in 1usize..4,
        ) {
            let mut pending = PendingHandshakes::new(share);
            let mut model = [0usize; 3];
            for (who, begin) in steps {
                let ip = IpAddr::from([192, 0, 2, who]);
                let slot = &mut model[usize::from(who)];
                if begin {
                    let admitted = pending.begin(ip);
                    prop_assert_eq!(admitted, *slot < share);
                    if admitted {
                        *slot += 1;
                    }
                } else if *slot > 0 {
                    pending.end(ip);
                    *slot -= 1;
                }
                prop_assert_eq!(pending.pending(ip), *slot);
                prop_assert!(pending.pending(ip) <= share);
            }
        }
    }

    #[test]
    fn a_burst_is_allowed_then_the_rate_holds_per_address() {
        let mut rate = ConnectionRate::new(60);
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..60 {
            assert!(rate.admit(a, t0));
        }
        assert!(!rate.admit(a, t0), "burst spent");
        assert!(rate.admit(b, t0), "another address is not affected");
        assert!(!rate.admit(a, t0 + Duration::from_millis(500)));
        assert!(
            rate.admit(a, t0 + Duration::from_millis(1100)),
            "one per second again"
        );
        assert!(!rate.admit(a, t0 + Duration::from_millis(1200)));
        assert!(rate.retry_after(a) > Duration::ZERO);
    }
}
