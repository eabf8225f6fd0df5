//! Per-source-address connection rate limit of the front door: a token bucket per address,
//! checked when a TCP connection is accepted, before any TLS work is spent on it. Pure: the
//! caller passes `now`.

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

#[cfg(test)]
mod tests {
    use super::*;

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
