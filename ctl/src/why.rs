//! `fleetctl why SERIAL|MAC|ADDRESS`: the `explain` command (docs/protocol.md §6) and its data
//! written for people: the state and why, the manual's rule, an address block, a phone's
//! wrong PAPs and lockout, whitelist entries, and the last refusals from the audit log.

use std::fmt::Write as _;

use fleet_protocol::command::arg;
use fleet_protocol::OperatorCommand;
use serde_json::Value;

use crate::ClientError;

/// Width the text is wrapped to.
const WIDTH: usize = 100;

/// Width of the field names before their text.
const LABEL: usize = 11;

/// The `explain` command for `subject`, refused here in the controller's words if it is none.
pub fn command(subject: &str) -> Result<OperatorCommand, ClientError> {
    Ok(OperatorCommand::Explain {
        subject: arg::subject(subject)?,
    })
}

/// `explain`'s data as `fleetctl why` prints it.
pub fn render(data: &Value) -> String {
    let text = |key: &str| data.get(key).and_then(Value::as_str).unwrap_or("");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({}): {} [{}]",
        text("subject"),
        text("kind"),
        text("label"),
        text("state")
    );
    field(&mut out, "why", text("why"));
    field(&mut out, "rule", text("rule"));
    station_fields(&mut out, data);
    phone_fields(&mut out, data);
    address_fields(&mut out, data);
    refusal_lines(&mut out, data);
    out
}

/// A station's key, address, last seen and last identity mismatch.
fn station_fields(out: &mut String, data: &Value) {
    if let Some(station) = data.get("station") {
        let s = |key: &str| station.get(key).and_then(Value::as_str);
        if let Some(fp) = s("fingerprint") {
            field(out, "key", fp);
        }
        if let Some(ip) = s("ip") {
            field(out, "address", ip);
        }
        if let Some(seen) = s("last_seen") {
            field(out, "last seen", seen);
        }
        if let Some(mismatch) = s("last_mismatch") {
            field(
                out,
                "mismatch",
                &format!("last identity mismatch at {mismatch}"),
            );
        }
    }
}

/// A phone's wrong PAPs, lockouts and suspension.
fn phone_fields(out: &mut String, data: &Value) {
    if data.get("kind").and_then(Value::as_str) == Some("phone") {
        let n = |key: &str| data.get(key).and_then(Value::as_u64).unwrap_or(0);
        let mut line = format!(
            "{} of {} wrong PAPs before a lockout; {} of {} lockouts before the block",
            n("wrong_paps"),
            n("pap_attempts"),
            n("lockouts"),
            n("lockouts_before_block")
        );
        if let Some(until) = data.get("locked_until").and_then(Value::as_str) {
            let _ = write!(line, "; locked until {until}");
        }
        field(out, "PAP", &line);
        let suspended = data
            .pointer("/phone/suspended_until")
            .and_then(Value::as_str);
        if let Some(until) = suspended {
            field(out, "suspended", &format!("until {until}"));
        }
    }
}

/// The block of the address (or of the device's last address), and what whitelists it.
fn address_fields(out: &mut String, data: &Value) {
    if let Some(block) = data.get("block").filter(|b| !b.is_null()) {
        let s = |key: &str| block.get(key).and_then(Value::as_str).unwrap_or("?");
        let mut line = format!("{} blocked until {}", s("address"), s("until"));
        // Another tenant than `default` is not told the fleet-wide count (`null`).
        if let Some(failures) = block.get("failures").and_then(Value::as_u64) {
            let _ = write!(line, " ({failures} failed authentications)");
        }
        field(out, "block", &line);
    }
    for entry in data
        .get("whitelist")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let s = |key: &str| entry.get(key).and_then(Value::as_str);
        let mut line = format!(
            "{} ({})",
            s("entry").unwrap_or("?"),
            s("kind").unwrap_or("?")
        );
        if let Some(expires) = s("expires_at") {
            let _ = write!(line, ", expires {expires}");
        }
        field(out, "whitelist", &line);
    }
}

/// The last refusals, newest first, one per line.
fn refusal_lines(out: &mut String, data: &Value) {
    let refusals = data
        .get("refusals")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let scanned = data.get("scanned").and_then(Value::as_u64).unwrap_or(0);
    if refusals.is_empty() {
        let line = format!("none among the tenant's newest {scanned} audit records");
        field(out, "refusals", &line);
    } else {
        let _ = writeln!(
            out,
            "last refusals, newest first (of the tenant's newest {scanned} audit records):"
        );
        for r in refusals {
            let s = |key: &str| r.get(key).and_then(Value::as_str).unwrap_or("");
            let line = format!(
                "{} {} from {}: {}",
                s("time"),
                s("action"),
                s("actor"),
                s("reason")
            );
            wrap_into(out, "  ", "    ", &line);
        }
    }
}

/// One `name: text` line, wrapped with the text's indent.
fn field(out: &mut String, name: &str, text: &str) {
    let first = format!("{:<LABEL$}", format!("{name}:"));
    wrap_into(out, &first, &" ".repeat(LABEL), text);
}

/// `text` after `first`, then on lines after `rest`, broken between words within [`WIDTH`].
fn wrap_into(out: &mut String, first: &str, rest: &str, text: &str) {
    let mut line = first.to_owned();
    let mut empty = true;
    for word in text.split_whitespace() {
        if !empty && line.chars().count() + 1 + word.chars().count() > WIDTH {
            out.push_str(line.trim_end());
            out.push('\n');
            line = rest.to_owned();
            empty = true;
        }
        if !empty {
            line.push(' ');
        }
        line.push_str(word);
        empty = false;
    }
    out.push_str(line.trim_end());
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_subject_that_is_none_is_refused_before_anything_is_sent() {
        let e = command("not a serial!").expect_err("refused");
        assert!(
            e.to_string()
                .contains("neither a serial, a MAC nor an IP address"),
            "{e}"
        );
        assert!(matches!(
            command("203.0.113.7"),
            Ok(OperatorCommand::Explain { .. })
        ));
    }

    #[test]
    fn a_phone_shows_its_pap_counts_and_lockout() {
        let data = json!({
            "subject": "aabbccddeeff", "kind": "phone", "state": "authentication_failed",
            "label": "Authentication failed (temporarily blocked)",
            "why": "3 wrong PAPs in a row locked it out", "rule": "Authentication failed: ...",
            "wrong_paps": 0, "pap_attempts": 3, "lockouts": 1, "lockouts_before_block": 3,
            "locked_until": "2026-01-05T10:30:00Z",
            "refusals": [{"seq": 9, "time": "2026-01-05T10:00:00Z", "action": "connect",
                          "actor": "192.0.2.1:5000", "reason": "wrong or missing PAP"}],
            "block": null, "scanned": 12,
        });
        let text = render(&data);
        assert!(text.starts_with(
            "aabbccddeeff (phone): Authentication failed (temporarily blocked) [authentication_failed]\n"
        ), "{text}");
        // Wrapped within 100 columns; the words as written.
        let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(flat.contains("PAP: 0 of 3 wrong PAPs before a lockout; 1 of 3 lockouts before the block; locked until 2026-01-05T10:30:00Z"), "{text}");
        assert!(text.lines().all(|l| l.chars().count() <= WIDTH), "{text}");
        assert!(text.contains("newest 12 audit records"), "{text}");
        assert!(
            text.contains(
                "  2026-01-05T10:00:00Z connect from 192.0.2.1:5000: wrong or missing PAP"
            ),
            "{text}"
        );
        assert!(!text.contains("block:"), "{text}");
    }

    #[test]
    fn long_text_is_wrapped_under_its_label() {
        let mut out = String::new();
        field(&mut out, "rule", &"word ".repeat(40));
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines.len() > 1);
        assert!(lines.iter().all(|l| l.chars().count() <= WIDTH), "{out}");
        assert!(lines[0].starts_with("rule:      word"));
        assert!(lines[1].starts_with("           word"));
    }
}
