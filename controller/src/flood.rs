//! Per-source-address limits on failed authentications, across all devices (a PAP sprayer
//! guessing over many MACs is slowed, then refused), the budget of refusal audit records (a
//! flood must not fill the disk), each operator's command budget, and the limits on stations
//! waiting for approval (devices must not fill the store with records). Pure: `now` is passed
//! in.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;

use time::{Duration, OffsetDateTime};

/// Above this many tracked addresses (or operators), those with nothing recent are forgotten.
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

/// An address refused right now, for an operator's list of blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub ip: IpAddr,
    pub until: OffsetDateTime,
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

    /// The addresses refused at `now`, sorted by address.
    pub fn blocks(&self, now: OffsetDateTime) -> Vec<Block> {
        let mut blocks: Vec<Block> = self
            .by_ip
            .iter()
            .filter_map(|(ip, entry)| match entry.blocked_until {
                Some(until) if until > now => Some(Block { ip: *ip, until }),
                _ => None,
            })
            .collect();
        blocks.sort_by_key(|block| block.ip);
        blocks
    }

    /// Ends the block of `ip` and forgets its failures, so that its next failure starts from
    /// nothing rather than blocking it again at once; false if it was not blocked at `now`
    /// (its failures are forgotten all the same: an operator who lifts an address means it).
    pub fn lift(&mut self, ip: IpAddr, now: OffsetDateTime) -> bool {
        self.by_ip
            .remove(&ip)
            .is_some_and(|entry| entry.blocked_until.is_some_and(|until| until > now))
    }

    /// The failures of `ip` within the window at `now`; the count starts again from 0 when a
    /// block starts.
    pub fn failures(&self, ip: IpAddr, now: OffsetDateTime) -> u32 {
        let window = self.policy.window;
        self.by_ip.get(&ip).map_or(0, |entry| {
            let recent = entry.failures.iter().filter(|t| **t + window > now).count();
            u32::try_from(recent).unwrap_or(u32::MAX)
        })
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

/// Nanotokens per token: an [`OperatorBudget`] counts in billionths of a command so that a
/// refill of `per_second` tokens per second is exact per nanosecond, with no rounding to drift.
const NANOS: i128 = 1_000_000_000;

/// What [`OperatorBudget::take`] granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// How many of the commands asked for may run; the rest are answered `rate_limited`.
    pub granted: u32,
    /// When some were not granted: how long until one more token is there.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Nanotokens, between 0 and `burst * NANOS`.
    nanotokens: i128,
    /// When `nanotokens` was last brought up to date.
    at: OffsetDateTime,
}

/// A token bucket per operator: `per_second` commands per second on average, `burst` at once
/// after a quiet spell. Every bucket starts full, so a key that is forgotten loses nothing.
#[derive(Debug, Clone)]
pub struct OperatorBudget<K> {
    per_second: i128,
    burst: i128,
    buckets: HashMap<K, Bucket>,
}

impl<K: Eq + Hash + Clone> OperatorBudget<K> {
    /// A budget of `per_second` commands per second and `burst` at once. The configuration
    /// makes both at least 1; a 0 is taken as 1 so that a bucket always refills (a finite
    /// `retry_after`) and can always grant something.
    pub fn new(per_second: u32, burst: u32) -> OperatorBudget<K> {
        OperatorBudget {
            per_second: i128::from(per_second.max(1)),
            burst: i128::from(burst.max(1)),
            buckets: HashMap::new(),
        }
    }

    fn full(&self, now: OffsetDateTime) -> Bucket {
        Bucket {
            nanotokens: self.burst * NANOS,
            at: now,
        }
    }

    /// The bucket brought up to `now`. A clock that went back refills nothing and does not
    /// move the bucket's time back, so that it cannot refill the same span twice.
    fn refilled(&self, bucket: Bucket, now: OffsetDateTime) -> Bucket {
        if now <= bucket.at {
            return bucket;
        }
        let elapsed = (now - bucket.at).whole_nanoseconds();
        Bucket {
            nanotokens: bucket
                .nanotokens
                .saturating_add(elapsed.saturating_mul(self.per_second))
                .min(self.burst * NANOS),
            at: now,
        }
    }

    /// Takes up to `n` tokens for `key` at `now`: as many as the bucket holds.
    pub fn take(&mut self, key: &K, n: u32, now: OffsetDateTime) -> Taken {
        let bucket = match self.buckets.get(key) {
            Some(bucket) => self.refilled(*bucket, now),
            None => {
                if self.buckets.len() >= MAX_TRACKED {
                    self.forget_full(now);
                }
                self.full(now)
            }
        };
        let granted = (bucket.nanotokens / NANOS).min(i128::from(n));
        let left = bucket.nanotokens - granted * NANOS;
        self.buckets.insert(
            key.clone(),
            Bucket {
                nanotokens: left,
                at: bucket.at,
            },
        );
        // `granted` is at most `n`, a u32.
        let granted = u32::try_from(granted).unwrap_or(u32::MAX);
        let retry_after = (granted < n).then(|| {
            // Refused some, so less than one token is left: the time to refill the rest of it,
            // rounded up so that the token is really there then.
            let missing = NANOS - left;
            let nanos = (missing + self.per_second - 1) / self.per_second;
            Duration::nanoseconds(i64::try_from(nanos).unwrap_or(i64::MAX))
        });
        Taken {
            granted,
            retry_after,
        }
    }

    /// Drops the buckets that are full again at `now`: a new bucket is full, so nothing is lost.
    fn forget_full(&mut self, now: OffsetDateTime) {
        let full = self.burst * NANOS;
        let buckets = std::mem::take(&mut self.buckets);
        self.buckets = buckets
            .into_iter()
            .filter(|(_, bucket)| self.refilled(*bucket, now).nanotokens < full)
            .collect();
    }
}

/// The limits on stations waiting for approval: records that devices create by themselves,
/// so that a flood of made-up serials cannot fill the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingLimits {
    /// Most pending stations whose last request came from one source address.
    pub per_ip: u32,
    /// Most pending stations in total.
    pub total: u32,
}

/// Why a new pending station is not recorded. A value, not an error: the device is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingRefusal {
    /// The address already has `limit` stations waiting.
    PerAddress { limit: u32 },
    /// `limit` stations are waiting in total.
    Total { limit: u32 },
}

impl fmt::Display for PendingRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (limit, whence) = match self {
            PendingRefusal::PerAddress { limit } => (limit, " from this address"),
            PendingRefusal::Total { limit } => (limit, ""),
        };
        let (stations, are) = if *limit == 1 {
            ("station", "is")
        } else {
            ("stations", "are")
        };
        write!(
            f,
            "{limit} {stations}{whence} {are} already waiting for approval"
        )
    }
}

impl PendingLimits {
    /// Whether a device may create one more pending station, given how many are pending from
    /// its address and in total. The address is checked first: when one address floods, the
    /// reason names the address rather than the whole server.
    pub fn admit_new_pending(
        &self,
        pending_from_ip: u32,
        pending_total: u32,
    ) -> Result<(), PendingRefusal> {
        if pending_from_ip >= self.per_ip {
            return Err(PendingRefusal::PerAddress { limit: self.per_ip });
        }
        if pending_total >= self.total {
            return Err(PendingRefusal::Total { limit: self.total });
        }
        Ok(())
    }
}

/// Whether a pending station last seen at `last_seen` has gone unseen for `expiry` at `now`
/// (and is to be deleted). One seen "in the future" (a clock set back) is not expired.
pub fn pending_expired(last_seen: OffsetDateTime, now: OffsetDateTime, expiry: Duration) -> bool {
    // A difference, not `last_seen + expiry`: the sum can overflow for a huge expiry.
    now - last_seen >= expiry
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
    fn blocks_are_listed_until_they_end_or_are_lifted() {
        let mut limiter = FailureLimiter::new(policy());
        let a: IpAddr = "198.51.100.7".parse().expect("ip");
        let b: IpAddr = "2001:db8::1".parse().expect("ip");
        let c: IpAddr = "192.0.2.1".parse().expect("ip");
        let t0 = OffsetDateTime::UNIX_EPOCH + Duration::days(20_000);
        assert_eq!(limiter.blocks(t0), vec![]);
        for _ in 0..4 {
            limiter.record_failure(b, t0);
        }
        let t1 = t0 + Duration::minutes(1);
        for _ in 0..4 {
            limiter.record_failure(a, t1);
        }
        limiter.record_failure(c, t1);
        assert_eq!(limiter.failures(c, t1), 1);
        assert_eq!(
            limiter.failures(a, t1),
            0,
            "the block started a clean count"
        );
        let until_a = t1 + Duration::minutes(15);
        let until_b = t0 + Duration::minutes(15);
        assert_eq!(
            limiter.blocks(t1),
            vec![
                Block {
                    ip: a,
                    until: until_a
                },
                Block {
                    ip: b,
                    until: until_b
                },
            ],
            "sorted by address, slowed ones left out"
        );
        assert_eq!(
            limiter.blocks(until_b),
            vec![Block {
                ip: a,
                until: until_a
            }]
        );
        assert!(limiter.lift(a, t1));
        assert!(!limiter.lift(a, t1), "lifted already");
        assert_eq!(limiter.check(a, t1), Verdict::Allow);
        assert_eq!(limiter.blocks(t1).len(), 1);
        // Once lifted, it takes the full count again to block it.
        for _ in 0..3 {
            assert_ne!(
                limiter.record_failure(a, t1),
                Verdict::Refuse { until: until_a }
            );
        }
        assert!(matches!(
            limiter.record_failure(a, t1),
            Verdict::Refuse { .. }
        ));
        // Not blocked: false, but its failures are forgotten.
        assert!(!limiter.lift(c, t1));
        assert_eq!(limiter.failures(c, t1), 0);
        assert!(!limiter.lift(b, until_b), "the block had ended");
        assert!(!limiter.lift("203.0.113.1".parse().expect("ip"), t1));
    }

    #[test]
    fn failures_counts_only_the_window() {
        let mut limiter = FailureLimiter::new(policy());
        let ip: IpAddr = "192.0.2.5".parse().expect("ip");
        let t0 = OffsetDateTime::UNIX_EPOCH;
        assert_eq!(limiter.failures(ip, t0), 0);
        limiter.record_failure(ip, t0);
        limiter.record_failure(ip, t0 + Duration::minutes(5));
        assert_eq!(limiter.failures(ip, t0 + Duration::minutes(5)), 2);
        assert_eq!(limiter.failures(ip, t0 + Duration::minutes(10)), 1);
        assert_eq!(limiter.failures(ip, t0 + Duration::minutes(15)), 0);
    }

    const T0: OffsetDateTime = time::macros::datetime!(2024-03-01 10:00:00 UTC);

    #[test]
    fn an_operator_budget_starts_full_and_refills_evenly() {
        let mut budget = OperatorBudget::new(20, 200);
        let alice = ("a".to_owned(), "alice".to_owned());
        let bob = ("a".to_owned(), "bob".to_owned());
        assert_eq!(
            budget.take(&alice, 150, T0),
            Taken {
                granted: 150,
                retry_after: None
            }
        );
        assert_eq!(
            budget.take(&alice, 100, T0),
            Taken {
                granted: 50,
                retry_after: Some(Duration::milliseconds(50))
            }
        );
        assert_eq!(budget.take(&bob, 200, T0).granted, 200, "per operator");
        let later = T0 + Duration::milliseconds(49);
        assert_eq!(
            budget.take(&alice, 1, later),
            Taken {
                granted: 0,
                retry_after: Some(Duration::milliseconds(1))
            }
        );
        // 20 per second: 10 in half a second.
        let half = T0 + Duration::milliseconds(500);
        assert_eq!(budget.take(&alice, 100, half).granted, 10);
        // Never more than the burst, however long the pause.
        assert_eq!(
            budget.take(&alice, 1000, half + Duration::days(1)).granted,
            200
        );
        assert_eq!(
            budget.take(&alice, 0, half + Duration::days(1)),
            Taken {
                granted: 0,
                retry_after: None
            }
        );
    }

    #[test]
    fn a_clock_that_goes_back_refills_nothing() {
        let mut budget = OperatorBudget::new(1, 2);
        assert_eq!(budget.take(&1, 2, T0).granted, 2);
        assert_eq!(budget.take(&1, 1, T0 - Duration::hours(1)).granted, 0);
        assert_eq!(
            budget.take(&1, 1, T0 + Duration::milliseconds(999)).granted,
            0
        );
        assert_eq!(budget.take(&1, 5, T0 + Duration::SECOND).granted, 1);
    }

    #[test]
    fn zero_rates_are_taken_as_one() {
        let mut budget = OperatorBudget::new(0, 0);
        assert_eq!(budget.take(&"k", 5, T0).granted, 1);
        let taken = budget.take(&"k", 1, T0);
        assert_eq!(taken.retry_after, Some(Duration::SECOND));
    }

    #[test]
    fn full_buckets_are_forgotten_past_the_tracking_limit() {
        let mut budget = OperatorBudget::new(1, 10);
        for key in 0..MAX_TRACKED {
            budget.take(&key, 1, T0);
        }
        assert_eq!(budget.buckets.len(), MAX_TRACKED);
        // Nothing is full yet: all are kept.
        budget.take(&MAX_TRACKED, 1, T0);
        assert_eq!(budget.buckets.len(), MAX_TRACKED + 1);
        // Spend key 0 dry; a second later every other bucket is full again and forgotten.
        budget.take(&0, 9, T0);
        budget.take(&usize::MAX, 1, T0 + Duration::SECOND);
        assert_eq!(budget.buckets.len(), 2);
        assert_eq!(budget.take(&0, 10, T0 + Duration::SECOND).granted, 1);
        assert_eq!(budget.take(&5, 10, T0 + Duration::SECOND).granted, 10);
    }

    proptest::proptest! {
        /// Within any stretch of the sequence, the budget grants no more than the burst plus
        /// what the rate refilled; a bucket left alone long enough grants exactly the burst;
        /// and `retry_after` is exactly when the next token is there.
        #[test]
        fn an_operator_budget_never_grants_more_than_burst_plus_rate(
            per_second in 1u32..100,
            burst in 1u32..300,
            steps in proptest::collection::vec((0u32..400, 0i64..3_000_000_000), 1..60),
        ) {
            let mut budget = OperatorBudget::new(per_second, burst);
            let mut now = T0;
            let mut history: Vec<(OffsetDateTime, u32)> = Vec::new();
            for (n, step_nanos) in steps {
                now += Duration::nanoseconds(step_nanos);
                let taken = budget.take(&(), n, now);
                proptest::prop_assert!(taken.granted <= n);
                proptest::prop_assert_eq!(taken.retry_after.is_some(), taken.granted < n);
                if let Some(wait) = taken.retry_after {
                    proptest::prop_assert!(wait > Duration::ZERO);
                    let mut early = budget.clone();
                    proptest::prop_assert_eq!(
                        early.take(&(), 1, now + wait - Duration::NANOSECOND).granted,
                        0
                    );
                    let mut on_time = budget.clone();
                    proptest::prop_assert_eq!(on_time.take(&(), 1, now + wait).granted, 1);
                }
                let refill = Duration::seconds(i64::from(burst.div_ceil(per_second)));
                let mut rested = budget.clone();
                proptest::prop_assert_eq!(
                    rested.take(&(), burst.saturating_add(1), now + refill).granted,
                    burst
                );
                history.push((now, taken.granted));
            }
            for start in 0..history.len() {
                let mut granted = 0i128;
                for end in start..history.len() {
                    granted += i128::from(history[end].1);
                    let elapsed = (history[end].0 - history[start].0).whole_nanoseconds();
                    let allowed =
                        i128::from(burst) * NANOS + i128::from(per_second) * elapsed;
                    proptest::prop_assert!(
                        granted * NANOS <= allowed,
                        "granted {} from step {} to {}",
                        granted,
                        start,
                        end
                    );
                }
            }
        }

        /// A pending station is admitted exactly when both counts are below their limits, and
        /// the refusal names the limit that was reached.
        #[test]
        fn pending_admission_is_below_both_limits(
            per_ip in 0u32..50,
            total in 0u32..50,
            from_ip in 0u32..60,
            all in 0u32..60,
        ) {
            let limits = PendingLimits { per_ip, total };
            let decision = limits.admit_new_pending(from_ip, all);
            proptest::prop_assert_eq!(decision.is_ok(), from_ip < per_ip && all < total);
            match decision {
                Err(PendingRefusal::PerAddress { limit }) => {
                    proptest::prop_assert_eq!(limit, per_ip);
                    proptest::prop_assert!(from_ip >= per_ip);
                }
                Err(PendingRefusal::Total { limit }) => {
                    proptest::prop_assert_eq!(limit, total);
                    proptest::prop_assert!(from_ip < per_ip && all >= total);
                }
                Ok(()) => {}
            }
        }
    }

    #[test]
    fn pending_stations_are_refused_with_a_reason() {
        let limits = PendingLimits {
            per_ip: 1000,
            total: 20_000,
        };
        assert_eq!(limits.admit_new_pending(0, 0), Ok(()));
        assert_eq!(limits.admit_new_pending(999, 19_999), Ok(()));
        let per_address = limits.admit_new_pending(1000, 5).unwrap_err();
        assert_eq!(per_address, PendingRefusal::PerAddress { limit: 1000 });
        assert_eq!(
            per_address.to_string(),
            "1000 stations from this address are already waiting for approval"
        );
        let total = limits.admit_new_pending(3, 20_000).unwrap_err();
        assert_eq!(total, PendingRefusal::Total { limit: 20_000 });
        assert_eq!(
            total.to_string(),
            "20000 stations are already waiting for approval"
        );
        assert_eq!(
            limits.admit_new_pending(1000, 20_000),
            Err(PendingRefusal::PerAddress { limit: 1000 }),
            "the address is named first"
        );
        assert_eq!(
            PendingRefusal::PerAddress { limit: 1 }.to_string(),
            "1 station from this address is already waiting for approval"
        );
    }

    #[test]
    fn pending_stations_expire_after_the_expiry_unseen() {
        let week = Duration::hours(168);
        assert!(!pending_expired(T0, T0, week));
        assert!(!pending_expired(T0, T0 + week - Duration::SECOND, week));
        assert!(pending_expired(T0, T0 + week, week));
        assert!(pending_expired(T0, T0 + week + Duration::days(1), week));
        // Seen "later" than now: a clock set back expires nothing.
        assert!(!pending_expired(T0 + Duration::days(30), T0, week));
        // A huge expiry does not overflow.
        assert!(!pending_expired(T0, T0, Duration::MAX));
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
