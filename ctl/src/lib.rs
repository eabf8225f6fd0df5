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

/// `text` as it may be written to a terminal: every control character but the line break
/// (an escape sequence that could move the cursor or recolour the screen, a carriage return
/// that could overwrite a line) is shown as `\u{..}`. Device-supplied fields (a station's
/// `model` and `firmware`) are refused with control characters by fleetd; this also covers
/// records stored before that, and any other text from the wire.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() && c != '\n' {
            out.push_str(&c.escape_unicode().to_string());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The arguments without a help text and the subcommands without an about, in `command` and
/// all its subcommands, each as `path id`: for the tests of fleetgate's command-line tools
/// (fleetctl, fleet-sim), which must have none.
pub fn undocumented(command: &clap::Command) -> Vec<String> {
    fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            if !matches!(id, "help" | "version") && help.trim().is_empty() {
                missing.push(format!("{path} {id}"));
            }
        }
        for sub in command.get_subcommands() {
            if sub
                .get_about()
                .is_none_or(|about| about.to_string().trim().is_empty())
            {
                missing.push(format!("{path} {} (no about)", sub.get_name()));
            }
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(command, command.get_name(), &mut missing);
    missing
}

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
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(printable("MC-6100\nnext"), "MC-6100\nnext");
        assert!(matches!(printable("plain"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(printable("MC\u{1b}[2J"), "MC\\u{1b}[2J");
        assert_eq!(printable("a\rb\u{9b}c"), "a\\u{d}b\\u{9b}c");
    }

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
