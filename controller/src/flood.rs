//! Per-source-address limits on failed authentications, across all devices (a PAP sprayer
//! guessing over many MACs is slowed, then refused), and the budget of refusal audit records (a
//! flood must not fill the disk). Pure: `now` is passed in.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

use time::{Duration, OffsetDateTime};

/// Above this many tracked addresses, those with nothing recent are forgotten.
const MAX_TRACKED: usize = 65_536;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailurePolicy {
    pub max_failures: u32,
    pub window: Duration,
    pub block: Duration,
}

/// What to do with a CONNECT from an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Half-way to the limit: answer failures only after a delay.
    Slow,
    /// Refused until the given time.
    Refuse {
        until: OffsetDateTime,
    },
}

#[derive(Debug, Default)]
struct Entry {
    failures: VecDeque<OffsetDateTime>,
    blocked_until: Option<OffsetDateTime>,
}

#[derive(Debug)]
pub struct FailureLimiter {
    policy: FailurePolicy,
    by_ip: HashMap<IpAddr, Entry>,
}

impl FailureLimiter {
    pub fn new(policy: FailurePolicy) -> FailureLimiter {
        FailureLimiter {
            policy,
            by_ip: HashMap::new(),
        }
    }

    fn prune(entry: &mut Entry, window: Duration, now: OffsetDateTime) {
        while entry.failures.front().is_some_and(|t| *t + window <= now) {
            entry.failures.pop_front();
        }
        if entry.blocked_until.is_some_and(|u| u <= now) {
            entry.blocked_until = None;
        }
    }

    fn verdict(&self, entry: &Entry) -> Verdict {
        if let Some(until) = entry.blocked_until {
            return Verdict::Refuse { until };
        }
        if entry.failures.len() as u64 * 2 >= u64::from(self.policy.max_failures) {
            Verdict::Slow
        } else {
            Verdict::Allow
        }
    }

    /// The verdict for a new CONNECT from `ip`.
    pub fn check(&mut self, ip: IpAddr, now: OffsetDateTime) -> Verdict {
        let window = self.policy.window;
        match self.by_ip.get_mut(&ip) {
            Some(entry) => {
                Self::prune(entry, window, now);
                self.verdict(&self.by_ip[&ip])
            }
            None => Verdict::Allow,
        }
    }

    /// Records a failed authentication from `ip`; returns the verdict for the next attempt.
    pub fn record_failure(&mut self, ip: IpAddr, now: OffsetDateTime) -> Verdict {
        if self.by_ip.len() >= MAX_TRACKED {
            let window = self.policy.window;
            self.by_ip.retain(|_, e| {
                Self::prune(e, window, now);
                !e.failures.is_empty() || e.blocked_until.is_some()
            });
        }
        let policy = self.policy.clone();
        let entry = self.by_ip.entry(ip).or_default();
        Self::prune(entry, policy.window, now);
        entry.failures.push_back(now);
        if entry.failures.len() as u64 >= u64::from(policy.max_failures) {
            entry.failures.clear();
            entry.blocked_until = Some(now + policy.block);
        }
        self.verdict(&self.by_ip[&ip])
    }
}

/// How many refusals of one address are audited per minute.
#[derive(Debug)]
pub struct AuditBudget {
    per_minute: u32,
    by_ip: HashMap<IpAddr, (OffsetDateTime, u32, u64)>,
}

impl AuditBudget {
    pub fn new(per_minute: u32) -> AuditBudget {
        AuditBudget {
            per_minute,
            by_ip: HashMap::new(),
        }
    }

    /// `Some(suppressed)` when this refusal is to be audited, with the number of refusals of
    /// this address left out since the last audited one; `None` when it is over the budget.
    pub fn spend(&mut self, ip: IpAddr, now: OffsetDateTime) -> Option<u64> {
        if self.by_ip.len() >= MAX_TRACKED {
            self.by_ip.retain(|_, (start, _, suppressed)| {
                *start + Duration::MINUTE > now || *suppressed > 0
            });
        }
        let (start, used, suppressed) = self.by_ip.entry(ip).or_insert((now, 0, 0));
        if *start + Duration::MINUTE <= now {
            *start = now;
            *used = 0;
        }
        if *used < self.per_minute {
            *used += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FailurePolicy {
        FailurePolicy {
            max_failures: 4,
            window: Duration::minutes(10),
            block: Duration::minutes(15),
        }
    }

    #[test]
    fn failures_slow_then_refuse_then_the_block_ends() {
        let mut limiter = FailureLimiter::new(policy());
        let ip: IpAddr = "198.51.100.7".parse().expect("ip");
        let other: IpAddr = "198.51.100.8".parse().expect("ip");
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000);
        assert_eq!(limiter.check(ip, t0), Verdict::Allow);
        assert_eq!(limiter.record_failure(ip, t0), Verdict::Allow);
        assert_eq!(limiter.record_failure(ip, t0), Verdict::Slow, "half-way");
        assert_eq!(limiter.record_failure(ip, t0), Verdict::Slow);
        let until = t0 + Duration::minutes(15);
        assert_eq!(limiter.record_failure(ip, t0), Verdict::Refuse { until });
        assert_eq!(
            limiter.check(ip, t0 + Duration::minutes(14)),
            Verdict::Refuse { until }
        );
        assert_eq!(limiter.check(other, t0), Verdict::Allow, "per address");
        assert_eq!(
            limiter.check(ip, t0 + Duration::minutes(15)),
            Verdict::Allow
        );
    }

    #[test]
    fn failures_outside_the_window_are_forgotten() {
        let mut limiter = FailureLimiter::new(policy());
        let ip: IpAddr = "2001:db8::1".parse().expect("ip");
        let t0 = OffsetDateTime::UNIX_EPOCH;
        for i in 0..3 {
            limiter.record_failure(ip, t0 + Duration::minutes(6 * i));
        }
        // Only the last two are within 10 minutes of t0+12.
        assert_eq!(limiter.check(ip, t0 + Duration::minutes(12)), Verdict::Slow);
        assert_eq!(
            limiter.check(ip, t0 + Duration::minutes(23)),
            Verdict::Allow
        );
    }

    #[test]
    fn the_audit_budget_counts_what_it_left_out() {
        let mut budget = AuditBudget::new(2);
        let ip: IpAddr = "192.0.2.9".parse().expect("ip");
        let t0 = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(budget.spend(ip, t0), Some(0));
        assert_eq!(budget.spend(ip, t0), Some(0));
        assert_eq!(budget.spend(ip, t0), None);
        assert_eq!(budget.spend(ip, t0), None);
        assert_eq!(budget.spend(ip, t0 + Duration::MINUTE), Some(2));
    }
}
