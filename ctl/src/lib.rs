//! fleetgate's operator client library: connect to fleetd with an operator certificate, run
//! operator commands (PROTOCOL §6), page through their lists and watch the tenant's events.
//! `fleetctl` is built on it.

pub mod audit;
mod client;
pub mod filter;
pub mod paging;
pub mod why;

use fleet_protocol::StationState;

pub use client::{
    operator_name, response_data, split_server, ClientError, OperatorClient, DEFAULT_TIMEOUT,
};

/// The label people see for a station `state` (PROTOCOL §5); the state itself when unknown.
pub fn station_label(state: &str) -> &str {
    match StationState::from_name(state) {
        Some(known) => known.label(),
        None => state,
    }
}

/// The label people see for a phone `auth_state` (PROTOCOL §5); the state itself when unknown.
pub fn phone_label(auth_state: &str) -> &str {
    fleet_protocol::PhoneState::from_name(auth_state).map_or(auth_state, |s| s.label())
}

/// Whether the fingerprint an operator typed is `expected`: case, spaces and the choice of
/// `:`/`-`/no separator do not matter; every one of the 32 bytes does.
pub fn fingerprint_matches(typed: &str, expected: &str) -> bool {
    let digits = |text: &str| -> String {
        text.chars()
            .filter(|c| !(matches!(c, ':' | '-') || c.is_whitespace()))
            .map(|c| c.to_ascii_uppercase())
            .collect()
    };
    let typed = digits(typed);
    typed.len() == 64 && typed.chars().all(|c| c.is_ascii_hexdigit()) && typed == digits(expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_the_manual() {
        assert_eq!(station_label("update_required"), "Update Required");
        assert_eq!(station_label("not_running"), "Not Running");
        assert_eq!(station_label("martian"), "martian");
        assert_eq!(
            phone_label("authentication_needed"),
            "Authentication needed"
        );
    }

    #[test]
    fn fingerprints_compare_loosely_in_form_strictly_in_value() {
        let expected = ["AB"; 32].join(":");
        assert!(fingerprint_matches(&expected.to_lowercase(), &expected));
        assert!(fingerprint_matches(
            &format!("{}\r\n", "ab".repeat(32)),
            &expected
        ));
        assert!(fingerprint_matches(
            &format!("  {} ", ["ab"; 32].join("-")),
            &expected
        ));
        assert!(!fingerprint_matches(&"ab".repeat(31), &expected));
        assert!(!fingerprint_matches(
            &format!("{}AC", "AB".repeat(31)),
            &expected
        ));
        assert!(!fingerprint_matches("", ""));
    }
}
