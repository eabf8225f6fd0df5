//! Reading fleetd's JSON objects (docs/protocol.md §5) for the pages. Everything in them may come
//! from a device, so nothing here trusts a field: a missing or odd one reads as empty, and the
//! templates escape every string.

use fleet_protocol::{PhoneState, StationState};
use serde_json::Value;

/// The string field `key` of `value`, or `""`.
pub(crate) fn text<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The string field `key`, if it is one and not empty.
pub(crate) fn some_text<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    Some(text(value, key)).filter(|t| !t.is_empty())
}

/// An RFC 3339 time as people read it, `2026-01-05 10:00:00 UTC` (to the second); anything
/// else as it is.
pub(crate) fn when(text: &str) -> String {
    use time::format_description::well_known::Rfc3339;
    let shown =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::parse(text, &Rfc3339)
        .ok()
        .and_then(|t| t.to_offset(time::UtcOffset::UTC).format(&shown).ok())
        .unwrap_or_else(|| text.to_owned())
}

/// What people see for a station's state (PROTOCOL §5).
pub(crate) fn station_label(station: &Value) -> String {
    let state = text(station, "state");
    match StationState::from_name(state) {
        Some(known) => known.label().to_owned(),
        None => some_text(station, "label").unwrap_or(state).to_owned(),
    }
}

/// What people see for a phone's `auth_state` (PROTOCOL §5).
pub(crate) fn phone_label(phone: &Value) -> String {
    let state = text(phone, "auth_state");
    match PhoneState::from_name(state) {
        Some(known) => known.label().to_owned(),
        None => some_text(phone, "label").unwrap_or(state).to_owned(),
    }
}

/// The items of a list answer's `field`.
pub(crate) fn items(data: &Value, field: &str) -> Vec<Value> {
    data.get(field)
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// A fingerprint in groups for reading aloud: four lines of eight byte pairs, for a person to
/// compare with the station's local admin page. Anything that is not 32 pairs is shown as it is,
/// in one group.
pub(crate) fn fingerprint_groups(fingerprint: &str) -> Vec<String> {
    let pairs: Vec<&str> = fingerprint.split(':').collect();
    let well_formed = pairs.len() == 32
        && pairs
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !well_formed {
        return vec![fingerprint.to_owned()];
    }
    pairs.chunks(8).map(|line| line.join(" ")).collect()
}

/// A MAC (12 hex digits as fleetd stores it) as people write it, `AA:BB:CC:DD:EE:FF`; anything
/// else as it is.
pub(crate) fn mac_display(mac: &str) -> String {
    if mac.len() != 12 || !mac.chars().all(|c| c.is_ascii_hexdigit()) {
        return mac.to_owned();
    }
    mac.as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).to_ascii_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// Lower-case hex digits only: how a MAC is searched, whatever its separators.
pub(crate) fn mac_key(text: &str) -> String {
    text.chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Whether `query` is (part of) a MAC in any of its spellings: hex digits and separators only.
fn is_mac_like(query: &str) -> bool {
    query
        .chars()
        .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '-' | '.'))
}

/// Whether `station` matches the free-text search `query` (serial, MACs, model, firmware).
pub(crate) fn station_matches(station: &Value, query: &str) -> bool {
    let query = query.trim().to_lowercase();
    if query.is_empty() {
        return true;
    }
    let fields = ["serial", "model", "firmware", "ip"];
    if fields
        .iter()
        .any(|f| text(station, f).to_lowercase().contains(&query))
    {
        return true;
    }
    // A MAC query is hex digits with or without separators; "a" alone would match too much.
    let wanted = mac_key(&query);
    is_mac_like(&query)
        && wanted.len() >= 4
        && ["mac_streaming", "mac_control"]
            .iter()
            .any(|f| mac_key(text(station, f)).contains(&wanted))
}

/// Whether `phone` matches `query` (MAC, vendor, type, site).
pub(crate) fn phone_matches(phone: &Value, query: &str) -> bool {
    let query = query.trim().to_lowercase();
    if query.is_empty() {
        return true;
    }
    let wanted = mac_key(&query);
    ["vendor", "type", "site"]
        .iter()
        .any(|f| text(phone, f).to_lowercase().contains(&query))
        || (is_mac_like(&query) && !wanted.is_empty() && text(phone, "mac").contains(&wanted))
}

/// A phone's way towards a lockout and a block, as the phones list says it: "2 wrong PAPs",
/// "1 lockout", both, or `None` while both counts are 0 (or fleetd did not send them).
pub(crate) fn pap_counts(phone: &Value) -> Option<String> {
    let count = |key: &str| phone.get(key).and_then(Value::as_u64).unwrap_or(0);
    let plural = |n: u64, one: &str| format!("{n} {one}{}", if n == 1 { "" } else { "s" });
    let parts: Vec<String> = [("failures", "wrong PAP"), ("lockouts", "lockout")]
        .into_iter()
        .filter_map(|(key, one)| Some(count(key)).filter(|n| *n > 0).map(|n| plural(n, one)))
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pap_counts_are_said_only_when_there_are_some() {
        assert_eq!(pap_counts(&json!({"failures": 0, "lockouts": 0})), None);
        assert_eq!(pap_counts(&json!({})), None);
        assert_eq!(
            pap_counts(&json!({"failures": 2, "lockouts": 0})).as_deref(),
            Some("2 wrong PAPs")
        );
        assert_eq!(
            pap_counts(&json!({"failures": 1, "lockouts": 1})).as_deref(),
            Some("1 wrong PAP, 1 lockout")
        );
        assert_eq!(
            pap_counts(&json!({"failures": "x", "lockouts": 2})).as_deref(),
            Some("2 lockouts")
        );
    }

    #[test]
    fn times_are_shown_to_the_second() {
        assert_eq!(
            when("2026-12-02T05:02:43.879729527Z"),
            "2026-12-02 05:02:43 UTC"
        );
        assert_eq!(when("2026-01-05T11:00:00+01:00"), "2026-01-05 10:00:00 UTC");
        assert_eq!(when("soon"), "soon");
    }

    #[test]
    fn fingerprints_are_grouped_for_people() {
        let fp = ["AB"; 32].join(":");
        let groups = fingerprint_groups(&fp);
        assert_eq!(groups.len(), 4);
        assert_eq!(groups[0], ["AB"; 8].join(" "));
        assert_eq!(fingerprint_groups("odd"), vec!["odd".to_owned()]);
    }

    #[test]
    fn stations_are_found_by_serial_mac_and_model() {
        let station = json!({"serial": "ST-0001", "model": "MC-200", "mac_streaming": "0242ac110002",
            "mac_control": "0242ac110003"});
        for query in ["st-0001", "mc-2", "02:42:AC:11:00:03", "0242ac11", ""] {
            assert!(station_matches(&station, query), "{query}");
        }
        for query in ["ST-0002", "ffff", "02:42:AC:11:00:09"] {
            assert!(!station_matches(&station, query), "{query}");
        }
        assert_eq!(mac_display("0242ac110002"), "02:42:AC:11:00:02");
        assert_eq!(mac_display("<b>"), "<b>");
    }

    #[test]
    fn labels_come_from_the_protocol_then_the_object() {
        assert_eq!(
            station_label(&json!({"state": "not_running"})),
            "Not Running"
        );
        assert_eq!(station_label(&json!({"state": "x", "label": "Y"})), "Y");
        assert_eq!(
            phone_label(&json!({"auth_state": "authentication_blocked"})),
            "Authentication blocked (permanently)"
        );
        assert!(phone_matches(
            &json!({"mac": "aabbccddee01", "vendor": "Yealink"}),
            "AA:BB:CC"
        ));
        assert!(phone_matches(
            &json!({"mac": "aabbccddee01", "vendor": "Yealink"}),
            "yea"
        ));
        assert!(!phone_matches(
            &json!({"mac": "aabbccddee01", "vendor": "Yealink"}),
            "snom"
        ));
    }
}
