//! `fleetctl watch`: the tenant's events (`fleet/events/<tenant>/…`, docs/protocol.md §3.2),
//! one readable line each, as they come.

use fleet_ctl::filter::AuditFilter;
use fleet_ctl::{phone_label, station_label};
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::table::Clock;

/// Prints each event until Ctrl-C, as [`line`] writes it, or with `json` its payload as it
/// came, one a line. Ends with an error when fleetd closes the connection.
#[allow(clippy::print_stdout)]
pub(crate) async fn follow(
    mut events: UnboundedReceiver<(String, Value)>,
    all: bool,
    json: bool,
    offset: UtcOffset,
) -> anyhow::Result<()> {
    let shown = AuditFilter {
        all,
        ..AuditFilter::default()
    };
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some((topic, payload)) = event else {
                    anyhow::bail!("fleetd closed the connection");
                };
                if json {
                    println!("{payload}");
                    continue;
                }
                let clock = Clock { now: OffsetDateTime::now_utc(), offset };
                if let Some(line) = line(&topic, &payload, &clock, &shown) {
                    println!("{}", fleet_ctl::printable(&line));
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value.get(field).and_then(Value::as_str).unwrap_or("-")
}

/// One event as a line: its time (local), its kind and what happened; `None` for an audit
/// record that `shown` hides (operators' connects and reads, unless `--all`).
pub(crate) fn line(
    topic: &str,
    event: &Value,
    clock: &Clock,
    shown: &AuditFilter,
) -> Option<String> {
    let kind = topic.rsplit('/').next().unwrap_or(topic);
    let what = match kind {
        "stations" => station_event(event),
        "phones" => phone_event(event),
        "security" => security_event(event),
        "audit" => {
            if !shown.matches(event) {
                return None;
            }
            audit_event(event)
        }
        _ => event.to_string(),
    };
    Some(format!("{}  {kind:<8}  {what}", clock.stamp(event, "time")))
}

fn station_event(event: &Value) -> String {
    let station = event.get("station").unwrap_or(&Value::Null);
    let serial = event
        .get("serial")
        .or_else(|| station.get("serial"))
        .and_then(Value::as_str)
        .unwrap_or("-");
    match text(event, "event") {
        "state" if station.get("removed") == Some(&Value::Bool(true)) => {
            format!("{serial} removed")
        }
        "state" => {
            let label = station
                .get("label")
                .and_then(Value::as_str)
                .unwrap_or_else(|| station_label(text(station, "state")));
            let mut line = format!("{serial} is {label}");
            if let Some(reason) = station.get("reason").and_then(Value::as_str) {
                line.push_str(&format!(": {reason}"));
            }
            line
        }
        "offline" => format!("{serial} went offline"),
        "bad_request" => format!("{serial}: malformed auth request: {}", text(event, "error")),
        "station_unauthorized" => {
            format!("{serial} waits for an operator: {}", text(event, "detail"))
        }
        "update_progress" => {
            let received = event.get("received").and_then(Value::as_u64).unwrap_or(0);
            let size = event.get("size").and_then(Value::as_u64).unwrap_or(0);
            let percent = (received * 100).checked_div(size).unwrap_or(0);
            format!(
                "{serial} updating to {}: {received} of {size} bytes ({percent}%)",
                text(event, "version")
            )
        }
        other => format!("{serial}: {other} {event}"),
    }
}

fn phone_event(event: &Value) -> String {
    let phone = event.get("phone").unwrap_or(&Value::Null);
    match text(event, "event") {
        "state" => {
            let label = phone
                .get("label")
                .and_then(Value::as_str)
                .unwrap_or_else(|| phone_label(text(phone, "auth_state")));
            let mut line = format!("{} is {label}", text(phone, "mac"));
            if let Some(failures) = phone.get("failures").and_then(Value::as_u64) {
                if failures > 0 {
                    line.push_str(&format!(", {failures} wrong PAPs in a row"));
                }
            }
            line
        }
        "deleted" => format!("{} deleted", text(event, "mac")),
        other => format!("{other} {event}"),
    }
}

fn security_event(event: &Value) -> String {
    let serial = text(event, "serial");
    match (
        text(event, "event"),
        event.get("detail").and_then(Value::as_str),
    ) {
        ("identity_mismatch", Some(detail)) => format!("IDENTITY MISMATCH {serial}: {detail}"),
        ("identity_mismatch", None) => format!(
            "IDENTITY MISMATCH {serial} refused from {}: presented {}, pinned {}. {}",
            text(event, "ip"),
            event
                .get("presented")
                .and_then(Value::as_str)
                .unwrap_or("no key"),
            text(event, "pinned"),
            text(event, "advice")
        ),
        (other, _) => format!("{other} {event}"),
    }
}

fn audit_event(record: &Value) -> String {
    let seq = record
        .get("seq")
        .and_then(Value::as_u64)
        .map_or_else(|| "-".to_owned(), |seq| seq.to_string());
    let mut line = format!(
        "#{seq} {} {} {} {}",
        text(record, "actor"),
        text(record, "action"),
        text(record, "device"),
        text(record, "outcome")
    );
    if let Some(reason) = record.get("reason").and_then(Value::as_str) {
        line.push_str(&format!(": {reason}"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::{EventKind, Topic};
    use serde_json::json;
    use time::macros::datetime;

    fn clock() -> Clock {
        Clock {
            now: datetime!(2024-05-01 12:30:00 UTC),
            offset: UtcOffset::UTC,
        }
    }

    /// The topic of `kind`'s events of tenant `default`, as fleet-protocol spells it.
    fn topic(kind: EventKind) -> String {
        Topic::Event("default".to_owned(), kind).to_string()
    }

    fn shown(kind: EventKind, event: Value) -> Option<String> {
        line(&topic(kind), &event, &clock(), &AuditFilter::default())
    }

    #[test]
    fn every_kind_of_event_is_one_readable_line() {
        let at = "2024-05-01T12:29:00Z";
        assert_eq!(
            shown(
                EventKind::Stations,
                json!({"event": "state", "time": at, "type": "stations",
                "station": {"serial": "ST-1", "state": "not_running", "label": "Not Running"}})
            )
            .as_deref(),
            Some("12:29:00  stations  ST-1 is Not Running")
        );
        assert_eq!(
            shown(
                EventKind::Stations,
                json!({"event": "state", "time": at,
                "station": {"serial": "ST-1", "state": null, "removed": true}})
            )
            .as_deref(),
            Some("12:29:00  stations  ST-1 removed")
        );
        assert_eq!(
            shown(
                EventKind::Stations,
                json!({"event": "update_progress", "time": at, "serial": "ST-3",
                "version": "6.1.0", "received": 50, "size": 200})
            )
            .as_deref(),
            Some("12:29:00  stations  ST-3 updating to 6.1.0: 50 of 200 bytes (25%)")
        );
        assert_eq!(
            shown(
                EventKind::Phones,
                json!({"event": "state", "time": at,
                "phone": {"mac": "aabbccddee01", "auth_state": "authentication_needed",
                    "failures": 2}})
            )
            .as_deref(),
            Some(
                "12:29:00  phones    aabbccddee01 is Authentication needed, 2 wrong PAPs in a row"
            )
        );
        assert_eq!(
            shown(
                EventKind::Phones,
                json!({"event": "deleted", "mac": "aabbccddee01", "time": at})
            )
            .as_deref(),
            Some("12:29:00  phones    aabbccddee01 deleted")
        );
        let mismatch = shown(
            EventKind::Security,
            json!({"event": "identity_mismatch", "time": at,
            "serial": "ST-1", "pinned": "AA", "presented": null, "ip": "203.0.113.7",
            "advice": "Check the station."}),
        )
        .unwrap();
        assert!(
            mismatch.contains(
                "IDENTITY MISMATCH ST-1 refused from 203.0.113.7: presented no key, pinned AA"
            ),
            "{mismatch}"
        );
    }

    #[test]
    fn audit_records_hide_operator_noise_unless_all() {
        let record = |action: &str, reason: &str| {
            json!({"seq": 7, "time": "2024-05-01T12:29:00Z", "tenant": "default",
                "actor": "admin", "device": "ST-1", "action": action, "outcome": "ok",
                "reason": reason})
        };
        assert_eq!(
            shown(
                EventKind::Audit,
                record("acceptStation", "Unauthorized -> Running")
            )
            .as_deref(),
            Some("12:29:00  audit     #7 admin acceptStation ST-1 ok: Unauthorized -> Running")
        );
        assert_eq!(shown(EventKind::Audit, record("listStations", "")), None);
        assert_eq!(
            shown(
                EventKind::Audit,
                record("connect", "admitted with operator rights")
            ),
            None
        );
        let all = AuditFilter {
            all: true,
            ..AuditFilter::default()
        };
        assert!(line(
            &topic(EventKind::Audit),
            &record("listStations", ""),
            &clock(),
            &all
        )
        .is_some());
    }
}
