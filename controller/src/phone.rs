//! The pure phone state machine of the phone manual: PAP admission, lockouts, provisioning,
//! Suspend and Reset Authentication, each consuming the old record and returning the new one.
//!
//! No I/O and no clock here: the shell passes `now` and a `PhonePolicy`, stores the returned
//! record and acts on the decision (CONNACK code, temporary whitelist, audit).

use std::fmt;

use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::times::{rfc3339, utc};
use fleet_protocol::{Mac, PhoneState};

/// Counts and durations of the phone rules (PROTOCOL §5); the defaults are the manual's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonePolicy {
    /// Consecutive wrong PAPs that lock the phone out.
    pub pap_attempts: u32,
    /// How long a lockout (`authentication_failed`) lasts.
    pub lockout: Duration,
    /// Lockouts without a success in between that block the phone for good.
    pub lockouts_before_block: u32,
    /// How long a correct PAP or a provisioning keeps the client's IP on the temporary whitelist.
    pub temporary_whitelist: Duration,
    /// How long Suspend Authentication lifts the PAP requirement.
    pub suspend: Duration,
}

impl Default for PhonePolicy {
    fn default() -> PhonePolicy {
        PhonePolicy {
            pap_attempts: 3,
            lockout: Duration::minutes(30),
            lockouts_before_block: 3,
            temporary_whitelist: Duration::hours(8),
            suspend: Duration::minutes(30),
        }
    }
}

/// Number of digits of a PAP.
pub const PAP_DIGITS: usize = 6;

/// Why a PAP could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PapError {
    #[error("the system's random number generator failed")]
    Random,
    #[error("a PAP is {PAP_DIGITS} ASCII digits")]
    Form,
}

/// A Phone Authentication PIN: 6 ASCII digits. Its `Debug` hides the digits so that it never
/// ends up in a log by accident; `as_str` is there for the places that must show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Pap(String);

impl Pap {
    /// Draws a PAP uniformly from 000000..=999999.
    pub fn generate(rng: &dyn ring::rand::SecureRandom) -> Result<Pap, PapError> {
        Pap::from_draws(|| {
            let mut bytes = [0u8; 4];
            rng.fill(&mut bytes).map_err(|_| PapError::Random)?;
            Ok(u32::from_le_bytes(bytes))
        })
    }

    /// Turns uniform 32-bit draws into a uniform PAP (apart so that tests can feed the draws;
    /// ring's `SecureRandom` cannot be implemented outside ring).
    fn from_draws(mut draw: impl FnMut() -> Result<u32, PapError>) -> Result<Pap, PapError> {
        const SPACE: u32 = 1_000_000;
        // The largest multiple of SPACE that fits in a u32: values at or above it are drawn
        // again, so that every PAP is equally likely (no modulo bias).
        const LIMIT: u32 = (u32::MAX / SPACE) * SPACE;
        // A draw is rejected with probability < 0.03 %; a generator that is rejected 64 times
        // in a row is broken, and an error beats looping for ever.
        for _ in 0..64 {
            let value = draw()?;
            if value < LIMIT {
                return Ok(Pap(format!("{:06}", value % SPACE)));
            }
        }
        Err(PapError::Random)
    }

    /// Reads a PAP written out earlier (store, tests); 6 ASCII digits only.
    pub fn parse(text: &str) -> Result<Pap, PapError> {
        if text.len() == PAP_DIGITS && text.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Pap(text.to_owned()))
        } else {
            Err(PapError::Form)
        }
    }

    /// Whether `candidate` is this PAP. The time taken does not depend on where the first wrong
    /// digit is, so that a client cannot find the PAP digit by digit by timing its CONNECTs.
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Compares two byte strings in time that depends only on their lengths: every byte pair is
/// XORed and the differences ORed together, with no early exit. A length mismatch returns at
/// once; the length of a PAP is public anyway.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keeps the optimiser from turning the fold back into a short-circuiting comparison.
    std::hint::black_box(difference) == 0
}

impl fmt::Debug for Pap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pap(******)")
    }
}

impl Serialize for Pap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Pap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Pap::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A phone's authentication state (PROTOCOL §5, the manual's four states).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuthState {
    /// Set up, not yet authenticated: a PAP is needed unless whitelisted or suspended.
    Needed,
    /// Locked out after too many wrong PAPs until `until`; no PAP is checked meanwhile.
    Failed {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// Locked out for good; only Reset Authentication (or a suspension) lets the phone in.
    Blocked,
    /// Fully provisioned: the phone uses its certificate, the PAP is gone.
    Successful,
}

impl AuthState {
    /// The state people see, without its lockout's end.
    pub fn shown(&self) -> PhoneState {
        match self {
            AuthState::Needed => PhoneState::Needed,
            AuthState::Failed { .. } => PhoneState::Failed,
            AuthState::Blocked => PhoneState::Blocked,
            AuthState::Successful => PhoneState::Successful,
        }
    }

    /// The JSON name, `auth_state` of a phone.
    pub fn name(&self) -> &'static str {
        self.shown().as_str()
    }

    /// What people see.
    pub fn label(&self) -> &'static str {
        self.shown().label()
    }
}

impl fmt::Display for AuthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// What the controller keeps about one phone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phone {
    pub mac: Mac,
    pub tenant: String,
    pub vendor: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub site: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the record last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
    pub auth: AuthState,
    /// Valid until the phone is fully provisioned; `None` once successful.
    pub pap: Option<Pap>,
    /// Consecutive wrong PAPs since the last success or lockout.
    pub failures: u32,
    /// Lockouts since the last success.
    pub lockouts: u32,
    /// Authentication is not required until then (Suspend Authentication).
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub suspended_until: Option<OffsetDateTime>,
    /// The one certificate currently valid for this phone (lower-hex serial).
    #[serde(default)]
    pub certificate_serial: Option<String>,
}

impl Phone {
    /// A phone just created by an operator: authentication needed, with a fresh PAP.
    pub fn new(
        mac: Mac,
        tenant: String,
        vendor: String,
        kind: String,
        site: String,
        pap: Pap,
        now: OffsetDateTime,
    ) -> Phone {
        let now = utc(now);
        Phone {
            mac,
            tenant,
            vendor,
            kind,
            site,
            created_at: now,
            updated_at: now,
            auth: AuthState::Needed,
            pap: Some(pap),
            failures: 0,
            lockouts: 0,
            suspended_until: None,
            certificate_serial: None,
        }
    }

    /// The state at `now`: a lockout whose time has passed is over by itself (transition 3).
    pub fn state_at(&self, now: OffsetDateTime) -> AuthState {
        match self.auth {
            AuthState::Failed { until } if until <= now => AuthState::Needed,
            state => state,
        }
    }

    /// Whether Suspend Authentication is in force at `now`.
    pub fn is_suspended(&self, now: OffsetDateTime) -> bool {
        self.suspended_until.is_some_and(|until| until > now)
    }

    /// Ends a lockout whose time has passed, as the record to store.
    fn settle(mut self, now: OffsetDateTime) -> Phone {
        if self.auth != self.state_at(now) {
            self.auth = AuthState::Needed;
            self.failures = 0;
        }
        self
    }
}

/// What a CONNECT without a client certificate presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt<'a> {
    /// The CONNECT password; `None` or empty when the phone sent none.
    pub password: Option<&'a str>,
    /// The client's IP is on the tenant's permanent or temporary whitelist.
    pub whitelisted: bool,
}

/// The decision on a phone's CONNECT without a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PapDecision {
    /// Admitted with the rights of a phone that is not provisioned yet. `pap_checked`: a
    /// correct PAP was presented, so the caller puts the client's IP on the temporary whitelist.
    AdmitUnprovisioned { pap_checked: bool },
    /// A wrong or missing PAP: CONNACK 4 / 0x86.
    WrongPap,
    /// Failed or blocked, no PAP even checked: CONNACK 5 / 0x87.
    Locked { reason: String },
    /// Not allowed this way at all, e.g. already provisioned: CONNACK 5 / 0x87.
    NotAllowed { reason: String },
}

/// Decides a CONNECT of a phone that presented no certificate (PROTOCOL §5), and counts a
/// wrong PAP towards a lockout (transition 2) and a block (transition 4).
pub fn attempt(
    phone: Phone,
    attempt: &Attempt<'_>,
    policy: &PhonePolicy,
    now: OffsetDateTime,
) -> (Phone, PapDecision) {
    let now = utc(now);
    let before = phone.clone();
    let mut phone = phone.settle(now);
    let decision = decide(&mut phone, attempt, policy, now);
    if phone != before {
        phone.updated_at = now;
    }
    (phone, decision)
}

fn decide(
    phone: &mut Phone,
    attempt: &Attempt<'_>,
    policy: &PhonePolicy,
    now: OffsetDateTime,
) -> PapDecision {
    if phone.auth == AuthState::Successful {
        // Suspension does not reach here: the manual wants Reset Authentication for a phone
        // that lost its provisioning, so that nobody else can take over a provisioned MAC.
        return PapDecision::NotAllowed {
            reason: format!(
                "phone {} is provisioned and must connect with its certificate; after a factory \
                 reset, Reset Authentication is needed",
                phone.mac
            ),
        };
    }
    if phone.is_suspended(now) {
        return PapDecision::AdmitUnprovisioned { pap_checked: false };
    }
    match phone.auth {
        AuthState::Blocked => {
            return PapDecision::Locked {
                reason: format!(
                    "authentication of phone {} is blocked permanently; Reset Authentication \
                     is needed",
                    phone.mac
                ),
            };
        }
        AuthState::Failed { until } => {
            return PapDecision::Locked {
                reason: format!(
                    "authentication of phone {} failed; temporarily blocked until {}",
                    phone.mac,
                    rfc3339(until).unwrap_or_else(|| until.to_string())
                ),
            };
        }
        AuthState::Needed | AuthState::Successful => {}
    }
    if attempt.whitelisted {
        return PapDecision::AdmitUnprovisioned { pap_checked: false };
    }
    let correct = match (&phone.pap, attempt.password) {
        (Some(pap), Some(password)) => pap.matches(password),
        _ => false,
    };
    if correct {
        phone.failures = 0;
        phone.lockouts = 0;
        return PapDecision::AdmitUnprovisioned { pap_checked: true };
    }
    phone.failures = phone.failures.saturating_add(1);
    if phone.failures >= policy.pap_attempts {
        phone.failures = 0;
        phone.lockouts = phone.lockouts.saturating_add(1);
        phone.auth = if phone.lockouts >= policy.lockouts_before_block {
            AuthState::Blocked
        } else {
            AuthState::Failed {
                until: now + policy.lockout,
            }
        };
    }
    PapDecision::WrongPap
}

/// Why a step of a phone's provisioning cannot be taken now: the text names the phone and its
/// state. The shell answers it as `wrong_state` (`views.rs`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Provisioning signed a certificate for the phone: it becomes the one valid certificate,
/// replacing any earlier one. Only while authentication is needed or suspended.
pub fn issue_certificate(
    phone: Phone,
    serial: String,
    now: OffsetDateTime,
) -> Result<Phone, Refused> {
    let now = utc(now);
    let mut phone = phone.settle(now);
    let state = phone.auth;
    let allowed = match state {
        AuthState::Needed => true,
        AuthState::Failed { .. } | AuthState::Blocked => phone.is_suspended(now),
        AuthState::Successful => false,
    };
    if !allowed {
        return Err(Refused(format!(
            "phone {} is in state {}; no certificate is issued",
            phone.mac, state
        )));
    }
    phone.certificate_serial = Some(serial);
    phone.updated_at = now;
    Ok(phone)
}

/// The phone stored its certificate and configuration (`…/provision/complete`): authentication
/// successful, the PAP is no longer valid (transition 1).
pub fn complete(phone: Phone, now: OffsetDateTime) -> Result<Phone, Refused> {
    let now = utc(now);
    let mut phone = phone.settle(now);
    if phone.auth == AuthState::Successful {
        return Err(Refused(format!(
            "phone {} is provisioned already",
            phone.mac
        )));
    }
    if phone.certificate_serial.is_none() {
        return Err(Refused(format!(
            "phone {}: no certificate issued",
            phone.mac
        )));
    }
    phone.auth = AuthState::Successful;
    phone.pap = None;
    phone.failures = 0;
    phone.lockouts = 0;
    phone.updated_at = now;
    Ok(phone)
}

/// Suspend Authentication: no authentication needed for this phone for `policy.suspend`.
pub fn suspend(phone: Phone, policy: &PhonePolicy, now: OffsetDateTime) -> Phone {
    let now = utc(now);
    let mut phone = phone.settle(now);
    phone.suspended_until = Some(now + policy.suspend);
    phone.updated_at = now;
    phone
}

/// Reset Authentication (transition 5): a new PAP; the old PAP and certificate are invalid at
/// once, counts and suspension are gone, authentication needed.
pub fn reset_authentication(phone: Phone, new_pap: Pap, now: OffsetDateTime) -> Phone {
    let now = utc(now);
    Phone {
        auth: AuthState::Needed,
        pap: Some(new_pap),
        failures: 0,
        lockouts: 0,
        suspended_until: None,
        certificate_serial: None,
        updated_at: now,
        ..phone
    }
}

/// Whether a certificate with this serial (lower-hex) is the one currently valid for the phone.
pub fn certificate_valid(phone: &Phone, serial: &str) -> bool {
    phone.certificate_serial.as_deref() == Some(serial)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-03-01 10:00:00 UTC);

    fn mac() -> Mac {
        Mac::parse("001a2b3c4d5e").unwrap()
    }

    fn pap(text: &str) -> Pap {
        Pap::parse(text).unwrap()
    }

    fn phone() -> Phone {
        Phone::new(
            mac(),
            "default".into(),
            "Yealink".into(),
            "T54W".into(),
            "Berlin".into(),
            pap("123456"),
            T0,
        )
    }

    fn with(password: Option<&str>, whitelisted: bool) -> Attempt<'_> {
        Attempt {
            password,
            whitelisted,
        }
    }

    const RIGHT: Attempt<'static> = Attempt {
        password: Some("123456"),
        whitelisted: false,
    };
    const WRONG: Attempt<'static> = Attempt {
        password: Some("000000"),
        whitelisted: false,
    };

    fn minutes(n: i64) -> Duration {
        Duration::minutes(n)
    }

    /// Three wrong PAPs at `now`: the third one locks the phone out.
    fn lock_out(mut phone: Phone, now: OffsetDateTime) -> Phone {
        let policy = PhonePolicy::default();
        for _ in 0..3 {
            let (next, decision) = attempt(phone, &WRONG, &policy, now);
            assert_eq!(decision, PapDecision::WrongPap);
            phone = next;
        }
        phone
    }

    /// Feeds `values` as the random draws, repeating the last one.
    fn draw(values: &[u32]) -> Result<Pap, PapError> {
        let mut next = 0;
        Pap::from_draws(|| {
            let value = values[next.min(values.len() - 1)];
            next += 1;
            Ok(value)
        })
    }

    #[test]
    fn pap_generation_is_uniform_by_rejection() {
        assert_eq!(draw(&[0]).unwrap().as_str(), "000000");
        assert_eq!(draw(&[999_999]).unwrap().as_str(), "999999");
        assert_eq!(draw(&[1_000_042]).unwrap().as_str(), "000042");
        // 4_294_000_000 and above would favour the low PAPs: drawn again.
        assert_eq!(
            draw(&[4_294_000_000, u32::MAX, 7]).unwrap().as_str(),
            "000007"
        );
        assert_eq!(draw(&[4_293_999_999]).unwrap().as_str(), "999999");
        assert_eq!(draw(&[u32::MAX]), Err(PapError::Random));
        let rng = ring::rand::SystemRandom::new();
        let paps: std::collections::HashSet<String> = (0..50)
            .map(|_| Pap::generate(&rng).unwrap().as_str().to_owned())
            .collect();
        assert!(paps.len() > 40);
        assert!(paps
            .iter()
            .all(|p| p.len() == 6 && p.bytes().all(|b| b.is_ascii_digit())));
    }

    #[test]
    fn pap_matches_only_itself_and_hides_its_digits() {
        let pap = pap("012345");
        assert!(pap.matches("012345"));
        for wrong in ["012344", "112345", "01234", "0123456", "", "O12345"] {
            assert!(!pap.matches(wrong), "{wrong}");
        }
        assert_eq!(format!("{pap:?}"), "Pap(******)");
        assert!(!format!("{:?}", phone()).contains("123456"));
        assert_eq!(serde_json::to_string(&pap).unwrap(), "\"012345\"");
        assert_eq!(serde_json::from_str::<Pap>("\"012345\"").unwrap(), pap);
        for bad in ["\"12345\"", "\"1234567\"", "\"12345a\"", "\"١٢٣٤٥٦\""] {
            assert!(serde_json::from_str::<Pap>(bad).is_err(), "{bad}");
        }
        assert!(constant_time_eq(b"", b""));
        assert!(!constant_time_eq(b"a", b"b"));
    }

    #[test]
    fn states_have_their_names_and_labels() {
        let cases = [
            (
                AuthState::Needed,
                "authentication_needed",
                "Authentication needed",
            ),
            (
                AuthState::Failed { until: T0 },
                "authentication_failed",
                "Authentication failed (temporarily blocked)",
            ),
            (
                AuthState::Blocked,
                "authentication_blocked",
                "Authentication blocked (permanently)",
            ),
            (
                AuthState::Successful,
                "authentication_successful",
                "Authentication successful",
            ),
        ];
        for (state, name, label) in cases {
            assert_eq!(state.name(), name);
            assert_eq!(state.label(), label);
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(serde_json::from_str::<AuthState>(&json).unwrap(), state);
        }
    }

    #[test]
    fn a_new_phone_needs_authentication() {
        let phone = phone();
        assert_eq!(phone.auth, AuthState::Needed);
        assert_eq!(phone.state_at(T0), AuthState::Needed);
        assert_eq!(phone.pap, Some(pap("123456")));
        assert_eq!((phone.failures, phone.lockouts), (0, 0));
        assert_eq!(phone.created_at, T0);
        // A time with an offset is kept in UTC.
        let berlin = Phone::new(
            mac(),
            "t".into(),
            "v".into(),
            "k".into(),
            "s".into(),
            pap("000000"),
            datetime!(2024-03-01 12:00:00 +02:00),
        );
        assert_eq!(berlin.created_at.offset(), time::UtcOffset::UTC);
    }

    #[test]
    fn a_correct_pap_admits_and_resets_the_failure_count() {
        let policy = PhonePolicy::default();
        let (phone, decision) = attempt(phone(), &WRONG, &policy, T0);
        assert_eq!(decision, PapDecision::WrongPap);
        assert_eq!(phone.failures, 1);
        let (phone, decision) = attempt(phone, &RIGHT, &policy, T0);
        assert_eq!(
            decision,
            PapDecision::AdmitUnprovisioned { pap_checked: true }
        );
        assert_eq!(phone.failures, 0);
        assert_eq!(phone.auth, AuthState::Needed);
        // Two more wrong ones do not lock it out: the count started again.
        let (phone, _) = attempt(phone, &WRONG, &policy, T0);
        let (phone, decision) = attempt(phone, &WRONG, &policy, T0);
        assert_eq!(decision, PapDecision::WrongPap);
        assert_eq!(phone.auth, AuthState::Needed);
    }

    #[test]
    fn a_missing_or_empty_pap_is_a_wrong_pap() {
        let policy = PhonePolicy::default();
        let (phone, decision) = attempt(phone(), &with(None, false), &policy, T0);
        assert_eq!(decision, PapDecision::WrongPap);
        let (phone, decision) = attempt(phone, &with(Some(""), false), &policy, T0);
        assert_eq!(decision, PapDecision::WrongPap);
        assert_eq!(phone.failures, 2);
    }

    #[test]
    fn whitelisted_needs_no_pap_and_counts_nothing() {
        let policy = PhonePolicy::default();
        for password in [None, Some("000000"), Some("123456")] {
            let (phone, decision) = attempt(phone(), &with(password, true), &policy, T0);
            assert_eq!(
                decision,
                PapDecision::AdmitUnprovisioned { pap_checked: false }
            );
            assert_eq!(phone, self::phone());
        }
    }

    #[test]
    fn three_wrong_paps_lock_out_for_30_minutes_then_needed_by_itself() {
        let policy = PhonePolicy::default();
        let phone = lock_out(phone(), T0);
        assert_eq!(
            phone.auth,
            AuthState::Failed {
                until: T0 + minutes(30)
            }
        );
        assert_eq!((phone.failures, phone.lockouts), (0, 1));
        assert_eq!(phone.updated_at, T0);
        // While failed, not even the right PAP is checked, and whitelisting does not help.
        for tried in [RIGHT, WRONG, with(None, true)] {
            let (after, decision) = attempt(phone.clone(), &tried, &policy, T0 + minutes(29));
            assert!(
                matches!(decision, PapDecision::Locked { .. }),
                "{decision:?}"
            );
            assert_eq!(after, phone);
        }
        assert_eq!(
            phone.state_at(T0 + minutes(29)).name(),
            "authentication_failed"
        );
        // (3) back to needed by itself.
        assert_eq!(phone.state_at(T0 + minutes(30)), AuthState::Needed);
        assert_eq!(phone.state_at(T0 + minutes(31)), AuthState::Needed);
        let (after, decision) = attempt(phone, &RIGHT, &policy, T0 + minutes(31));
        assert_eq!(
            decision,
            PapDecision::AdmitUnprovisioned { pap_checked: true }
        );
        assert_eq!(after.auth, AuthState::Needed);
        assert_eq!((after.failures, after.lockouts), (0, 0));
    }

    #[test]
    fn an_expired_lockout_is_stored_as_needed() {
        let policy = PhonePolicy::default();
        let phone = lock_out(phone(), T0);
        let (after, decision) = attempt(phone, &WRONG, &policy, T0 + minutes(31));
        assert_eq!(decision, PapDecision::WrongPap);
        assert_eq!(after.auth, AuthState::Needed);
        assert_eq!((after.failures, after.lockouts), (1, 1));
        assert_eq!(after.updated_at, T0 + minutes(31));
    }

    #[test]
    fn three_lockouts_without_success_block_for_good() {
        let policy = PhonePolicy::default();
        let mut phone = phone();
        let mut now = T0;
        for lockout in 1..=3 {
            phone = lock_out(phone, now);
            assert_eq!(phone.lockouts, lockout);
            now += minutes(31);
        }
        assert_eq!(phone.auth, AuthState::Blocked);
        for later in [now, now + Duration::days(365)] {
            assert_eq!(phone.state_at(later), AuthState::Blocked);
            for tried in [RIGHT, WRONG, with(None, true)] {
                let (after, decision) = attempt(phone.clone(), &tried, &policy, later);
                assert!(matches!(decision, PapDecision::Locked { .. }));
                assert_eq!(after, phone);
            }
        }
    }

    #[test]
    fn a_success_between_lockouts_starts_the_lockout_count_again() {
        let policy = PhonePolicy::default();
        let phone = lock_out(lock_out(phone(), T0), T0 + minutes(31));
        assert_eq!(phone.lockouts, 2);
        let now = T0 + minutes(62);
        let (phone, _) = attempt(phone, &RIGHT, &policy, now);
        assert_eq!(phone.lockouts, 0);
        let phone = lock_out(phone, now);
        assert!(matches!(phone.auth, AuthState::Failed { .. }));
    }

    #[test]
    fn the_policy_sets_the_counts_and_durations() {
        let policy = PhonePolicy {
            pap_attempts: 2,
            lockout: minutes(5),
            lockouts_before_block: 1,
            ..PhonePolicy::default()
        };
        let (phone, _) = attempt(phone(), &WRONG, &policy, T0);
        assert_eq!(phone.auth, AuthState::Needed);
        let (phone, decision) = attempt(phone, &WRONG, &policy, T0);
        assert_eq!(decision, PapDecision::WrongPap);
        assert_eq!(phone.auth, AuthState::Blocked);

        let policy = PhonePolicy {
            lockout: minutes(5),
            ..PhonePolicy::default()
        };
        let phone = lock_out(self::phone(), T0);
        let phone = attempt(phone, &WRONG, &policy, T0).0;
        let phone = attempt(phone, &WRONG, &policy, T0 + minutes(31)).0;
        let phone = attempt(phone, &WRONG, &policy, T0 + minutes(31)).0;
        let phone = attempt(phone, &WRONG, &policy, T0 + minutes(31)).0;
        assert_eq!(
            phone.auth,
            AuthState::Failed {
                until: T0 + minutes(36)
            }
        );
    }

    #[test]
    fn suspension_lifts_the_pap_for_30_minutes_even_when_failed_or_blocked() {
        let policy = PhonePolicy::default();
        let blocked = Phone {
            auth: AuthState::Blocked,
            ..phone()
        };
        let failed = lock_out(phone(), T0);
        for phone in [self::phone(), failed, blocked] {
            let before = phone.auth;
            let phone = suspend(phone, &policy, T0);
            assert_eq!(phone.suspended_until, Some(T0 + minutes(30)));
            let (after, decision) = attempt(phone.clone(), &WRONG, &policy, T0 + minutes(29));
            assert_eq!(
                decision,
                PapDecision::AdmitUnprovisioned { pap_checked: false }
            );
            assert_eq!(after.auth, phone.state_at(T0 + minutes(29)));
            assert_eq!(after.failures, 0);
            let view = after.view(T0 + minutes(29));
            assert_eq!(view["suspended_until"], "2024-03-01T10:30:00Z");
            // Over after 30 minutes.
            let (after, decision) = attempt(phone, &WRONG, &policy, T0 + minutes(31));
            assert_ne!(
                decision,
                PapDecision::AdmitUnprovisioned { pap_checked: false },
                "{before:?}"
            );
            assert_eq!(after.view(T0 + minutes(31))["suspended_until"], Value::Null);
        }
    }

    #[test]
    fn a_provisioned_phone_must_use_its_certificate_even_when_suspended() {
        let policy = PhonePolicy::default();
        let phone = issue_certificate(phone(), "0a1b".into(), T0).unwrap();
        let phone = complete(phone, T0).unwrap();
        let phone = suspend(phone, &policy, T0);
        for tried in [RIGHT, WRONG, with(None, true)] {
            let (after, decision) = attempt(phone.clone(), &tried, &policy, T0);
            assert!(matches!(decision, PapDecision::NotAllowed { .. }));
            assert_eq!(after, phone);
        }
    }

    #[test]
    fn provisioning_issues_one_certificate_and_completes() {
        let phone = issue_certificate(phone(), "01".into(), T0).unwrap();
        assert!(certificate_valid(&phone, "01"));
        let phone = issue_certificate(phone, "02".into(), T0).unwrap();
        assert!(!certificate_valid(&phone, "01"));
        assert!(certificate_valid(&phone, "02"));
        let phone = complete(phone, T0 + minutes(1)).unwrap();
        assert_eq!(phone.auth, AuthState::Successful);
        assert_eq!(phone.pap, None);
        assert_eq!(phone.updated_at, T0 + minutes(1));
        assert!(certificate_valid(&phone, "02"));
        // Provisioned: no second certificate, no second completion.
        let error = issue_certificate(phone.clone(), "03".into(), T0).unwrap_err();
        assert!(matches!(error, Refused(_)), "{error:?}");
        assert!(complete(phone, T0).is_err());
        // No certificate, no completion.
        let error = complete(self::phone(), T0).unwrap_err();
        assert!(matches!(error, Refused(_)), "{error:?}");
        assert!(error.to_string().contains("no certificate issued"));
    }

    #[test]
    fn no_certificate_while_failed_or_blocked_unless_suspended() {
        let policy = PhonePolicy::default();
        let failed = lock_out(phone(), T0);
        assert!(issue_certificate(failed.clone(), "01".into(), T0 + minutes(29)).is_err());
        assert!(issue_certificate(failed.clone(), "01".into(), T0 + minutes(31)).is_ok());
        let blocked = Phone {
            auth: AuthState::Blocked,
            ..phone()
        };
        assert!(issue_certificate(blocked.clone(), "01".into(), T0).is_err());
        let suspended = suspend(blocked, &policy, T0);
        assert!(issue_certificate(suspended.clone(), "01".into(), T0 + minutes(29)).is_ok());
        assert!(issue_certificate(suspended, "01".into(), T0 + minutes(31)).is_err());
        let suspended = suspend(failed, &policy, T0);
        assert!(issue_certificate(suspended, "01".into(), T0 + minutes(29)).is_ok());
    }

    #[test]
    fn reset_authentication_invalidates_pap_and_certificate_from_any_state() {
        let policy = PhonePolicy::default();
        let provisioned =
            complete(issue_certificate(phone(), "01".into(), T0).unwrap(), T0).unwrap();
        let blocked = Phone {
            auth: AuthState::Blocked,
            lockouts: 3,
            ..phone()
        };
        let failed = lock_out(phone(), T0);
        let suspended = suspend(phone(), &policy, T0);
        for phone in [provisioned, blocked, failed, suspended, self::phone()] {
            let phone = reset_authentication(phone, pap("654321"), T0 + minutes(1));
            assert_eq!(phone.auth, AuthState::Needed);
            assert_eq!(phone.pap, Some(pap("654321")));
            assert_eq!((phone.failures, phone.lockouts), (0, 0));
            assert_eq!(phone.suspended_until, None);
            assert!(!certificate_valid(&phone, "01"));
            assert_eq!(phone.updated_at, T0 + minutes(1));
            let (_, decision) = attempt(phone.clone(), &RIGHT, &policy, T0 + minutes(1));
            assert_eq!(decision, PapDecision::WrongPap);
            let (_, decision) = attempt(
                phone,
                &with(Some("654321"), false),
                &policy,
                T0 + minutes(1),
            );
            assert_eq!(
                decision,
                PapDecision::AdmitUnprovisioned { pap_checked: true }
            );
        }
    }

    #[test]
    fn view_is_the_protocol_phone_object() {
        let view = phone().view(T0);
        assert_eq!(view["mac"], "001a2b3c4d5e");
        assert_eq!(view["vendor"], "Yealink");
        assert_eq!(view["type"], "T54W");
        assert_eq!(view["site"], "Berlin");
        assert_eq!(view["created_at"], "2024-03-01T10:00:00Z");
        assert_eq!(view["auth_state"], "authentication_needed");
        assert_eq!(view["label"], "Authentication needed");
        assert_eq!(view["pap"], "123456");
        assert_eq!(view["suspended_until"], Value::Null);
        assert!(view.get("failed_until").is_none());

        let failed = lock_out(phone(), T0);
        let view = failed.view(T0 + minutes(29));
        assert_eq!(view["auth_state"], "authentication_failed");
        assert_eq!(view["failed_until"], "2024-03-01T10:30:00Z");
        assert_eq!(view["pap"], "123456");
        let view = failed.view(T0 + minutes(31));
        assert_eq!(view["auth_state"], "authentication_needed");
        assert!(view.get("failed_until").is_none());

        let done = complete(issue_certificate(phone(), "01".into(), T0).unwrap(), T0).unwrap();
        let view = done.view(T0);
        assert_eq!(view["auth_state"], "authentication_successful");
        assert!(view.get("pap").is_none());
    }

    #[test]
    fn record_round_trips_through_json() {
        let policy = PhonePolicy::default();
        for phone in [
            phone(),
            lock_out(phone(), T0),
            suspend(phone(), &policy, T0),
            issue_certificate(phone(), "0a".into(), T0).unwrap(),
        ] {
            let json = serde_json::to_value(&phone).unwrap();
            assert_eq!(json["type"], "T54W");
            let back: Phone = serde_json::from_value(json).unwrap();
            assert_eq!(back, phone);
        }
    }

    // --- properties over random event sequences ---

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone, Copy)]
        enum Presented {
            Right,
            Wrong,
            Missing,
            /// A PAP that was valid once: replaced by a reset, or the one of a completed phone.
            Old,
        }

        #[derive(Debug, Clone)]
        enum Event {
            Attempt {
                presented: Presented,
                whitelisted: bool,
            },
            /// Minutes, up to a few days.
            Advance(i64),
            Suspend,
            Reset,
            Issue,
            Complete,
        }

        fn event() -> impl Strategy<Value = Event> {
            let presented = prop_oneof![
                1 => Just(Presented::Right),
                3 => Just(Presented::Wrong),
                1 => Just(Presented::Missing),
                1 => Just(Presented::Old),
            ];
            prop_oneof![
                12 => (presented, prop::bool::weighted(0.15)).prop_map(
                    |(presented, whitelisted)| Event::Attempt {
                        presented,
                        whitelisted
                    }
                ),
                4 => prop_oneof![0i64..40, 0i64..(4 * 24 * 60)].prop_map(Event::Advance),
                1 => Just(Event::Suspend),
                1 => Just(Event::Reset),
                2 => Just(Event::Issue),
                2 => Just(Event::Complete),
            ]
        }

        /// One phone, as the store would hold it, and what the test remembers about it.
        struct World {
            phone: Phone,
            policy: PhonePolicy,
            now: OffsetDateTime,
            /// PAPs handed out so far, distinct by construction.
            next_pap: u32,
            /// PAPs that must never be accepted again.
            dead_paps: Vec<String>,
            serials: Vec<String>,
            last_issued: Option<String>,
            /// WrongPap answers since the last success, completion or reset.
            wrong: u32,
        }

        impl World {
            fn new(policy: PhonePolicy) -> World {
                World {
                    phone: Phone::new(
                        mac(),
                        "default".into(),
                        "v".into(),
                        "k".into(),
                        "s".into(),
                        pap("000000"),
                        T0,
                    ),
                    policy,
                    now: T0,
                    next_pap: 1,
                    dead_paps: Vec::new(),
                    serials: Vec::new(),
                    last_issued: None,
                    wrong: 0,
                }
            }

            fn fresh_pap(&mut self) -> Pap {
                let pap = pap(&format!("{:06}", self.next_pap));
                self.next_pap += 1;
                pap
            }

            fn current_pap(&self) -> Option<String> {
                self.phone.pap.as_ref().map(|p| p.as_str().to_owned())
            }

            fn apply(&mut self, event: &Event) -> Result<(), TestCaseError> {
                let now = self.now;
                let before = self.phone.clone();
                let state = before.state_at(now);
                let suspended = before.is_suspended(now);
                match event {
                    Event::Attempt {
                        presented,
                        whitelisted,
                    } => {
                        let password = match presented {
                            Presented::Right => self.current_pap(),
                            Presented::Wrong => Some("99999x".to_owned()),
                            Presented::Missing => None,
                            Presented::Old => self.dead_paps.last().cloned(),
                        };
                        let tried = Attempt {
                            password: password.as_deref(),
                            whitelisted: *whitelisted,
                        };
                        let (after, decision) = attempt(before.clone(), &tried, &self.policy, now);
                        let admitted = matches!(decision, PapDecision::AdmitUnprovisioned { .. });
                        // Never admitted while blocked without a suspension (resets end
                        // the block, so a blocked state here had none since).
                        if state == AuthState::Blocked && !suspended {
                            prop_assert!(!admitted);
                        }
                        // While failed or blocked, no PAP is checked: everything is Locked
                        // and nothing changes.
                        if matches!(state, AuthState::Failed { .. } | AuthState::Blocked)
                            && !suspended
                        {
                            let locked = matches!(decision, PapDecision::Locked { .. });
                            prop_assert!(locked);
                            prop_assert_eq!(&after, &before);
                        }
                        // A checked PAP is always the current one.
                        if decision == (PapDecision::AdmitUnprovisioned { pap_checked: true }) {
                            prop_assert!(password.is_some());
                            prop_assert_eq!(&password, &self.current_pap());
                            prop_assert!(!self.dead_paps.contains(&password.unwrap_or_default()));
                            self.wrong = 0;
                        }
                        if state == AuthState::Successful {
                            let refused = matches!(decision, PapDecision::NotAllowed { .. });
                            prop_assert!(refused);
                        }
                        if decision == PapDecision::WrongPap {
                            self.wrong += 1;
                        }
                        let became_blocked =
                            state != AuthState::Blocked && after.auth == AuthState::Blocked;
                        if became_blocked {
                            prop_assert_eq!(&decision, &PapDecision::WrongPap);
                            prop_assert_eq!(
                                self.wrong,
                                self.policy.pap_attempts * self.policy.lockouts_before_block
                            );
                        }
                        self.phone = after;
                    }
                    Event::Advance(minutes) => {
                        self.now += Duration::minutes(*minutes);
                    }
                    Event::Suspend => {
                        self.phone = suspend(before, &self.policy, now);
                    }
                    Event::Reset => {
                        if let Some(old) = self.current_pap() {
                            self.dead_paps.push(old);
                        }
                        let new = self.fresh_pap();
                        self.phone = reset_authentication(before, new, now);
                        self.last_issued = None;
                        self.wrong = 0;
                    }
                    Event::Issue => {
                        let serial = format!("{:x}", 0x100 + self.serials.len());
                        self.serials.push(serial.clone());
                        match issue_certificate(before.clone(), serial.clone(), now) {
                            Ok(after) => {
                                let allowed = state == AuthState::Needed
                                    || (state != AuthState::Successful && suspended);
                                prop_assert!(allowed);
                                self.phone = after;
                                self.last_issued = Some(serial);
                            }
                            Err(_) => {
                                let refused = state == AuthState::Successful
                                    || (state != AuthState::Needed && !suspended);
                                prop_assert!(refused);
                            }
                        }
                    }
                    Event::Complete => match complete(before.clone(), now) {
                        Ok(after) => {
                            prop_assert!(before.certificate_serial.is_some());
                            if let Some(old) = self.current_pap() {
                                self.dead_paps.push(old);
                            }
                            self.phone = after;
                            self.wrong = 0;
                        }
                        Err(_) => {
                            prop_assert!(
                                before.certificate_serial.is_none()
                                    || state == AuthState::Successful
                            );
                            // A refused completion changes nothing.
                        }
                    },
                }
                Ok(())
            }

            fn check(&self) -> Result<(), TestCaseError> {
                let phone = &self.phone;
                // The PAP exists exactly until the phone is provisioned.
                prop_assert_eq!(phone.auth == AuthState::Successful, phone.pap.is_none());
                // Dead PAPs never match the current one.
                if let Some(pap) = &phone.pap {
                    for dead in &self.dead_paps {
                        prop_assert!(!pap.matches(dead));
                    }
                }
                // Only the last issued certificate is valid, and none after a reset.
                for serial in &self.serials {
                    prop_assert_eq!(
                        certificate_valid(phone, serial),
                        self.last_issued.as_deref() == Some(serial.as_str())
                    );
                }
                prop_assert!(phone.failures < self.policy.pap_attempts.max(1));
                Ok(())
            }
        }

        fn policy() -> impl Strategy<Value = PhonePolicy> {
            prop_oneof![
                3 => Just(PhonePolicy::default()),
                1 => (1u32..5, 1u32..4, 1i64..120).prop_map(|(attempts, blocks, lockout)| {
                    PhonePolicy {
                        pap_attempts: attempts,
                        lockouts_before_block: blocks,
                        lockout: Duration::minutes(lockout),
                        ..PhonePolicy::default()
                    }
                }),
            ]
        }

        proptest! {
            #[test]
            fn invariants_hold_over_random_event_sequences(
                policy in policy(),
                events in prop::collection::vec(event(), 1..120)
            ) {
                let mut world = World::new(policy);
                for event in &events {
                    world.apply(event)?;
                    world.check()?;
                }
            }

            #[test]
            fn wrong_paps_alone_block_after_attempts_times_lockouts(
                policy in policy(),
                gaps in prop::collection::vec(0i64..120, 1..40)
            ) {
                // Wrong PAPs only, with clock jumps: blocked exactly after
                // pap_attempts * lockouts_before_block of them were answered WrongPap.
                let mut phone = Phone::new(mac(), "t".into(), "v".into(), "k".into(), "s".into(), pap("000000"), T0);
                let mut now = T0;
                let mut wrong = 0;
                let wrong_pap = Attempt { password: Some("111111"), whitelisted: false };
                for gap in gaps.iter().cycle().take(400) {
                    now += Duration::minutes(*gap);
                    let (after, decision) = attempt(phone, &wrong_pap, &policy, now);
                    if decision == PapDecision::WrongPap {
                        wrong += 1;
                    }
                    phone = after;
                    if phone.auth == AuthState::Blocked {
                        break;
                    }
                }
                let needed = policy.pap_attempts * policy.lockouts_before_block;
                if phone.auth == AuthState::Blocked {
                    prop_assert_eq!(wrong, needed);
                } else {
                    prop_assert!(wrong < needed);
                }
            }
        }
    }
}
