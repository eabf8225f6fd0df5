//! Readable output of `fleetctl`: tables and detail views with the manuals' labels.

use fleet_ctl::{phone_label, station_label};
use serde_json::Value;

/// How to show a command's `data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    Stations,
    Station,
    Phones,
    Phone,
    Whitelist,
    Operators,
    Operator,
    Blocks,
    Firmware,
    Audit,
    Csv,
    Import,
    Done,
    Raw,
}

/// A field as text: strings bare, null or absent as `-`, booleans as yes/no.
fn text(value: &Value, field: &str) -> String {
    match value.get(field) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "yes".to_owned(),
        Some(Value::Bool(false)) => "no".to_owned(),
        Some(other) => other.to_string(),
    }
}

fn station_state(station: &Value) -> String {
    match station.get("label").and_then(Value::as_str) {
        Some(label) => label.to_owned(),
        None => station_label(&text(station, "state")).to_owned(),
    }
}

fn phone_state(phone: &Value) -> String {
    match phone.get("label").and_then(Value::as_str) {
        Some(label) => label.to_owned(),
        None => phone_label(&text(phone, "auth_state")).to_owned(),
    }
}

fn list<'a>(data: &'a Value, field: &str) -> &'a [Value] {
    data.get(field)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// Renders rows under headers, columns padded to their widest cell.
pub(crate) fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

fn details(pairs: &[(&str, String)]) -> String {
    // Room for the longest key and its colon.
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$}  {v}\n", format!("{k}:")))
        .collect()
}

/// What a table cell shows of an item.
#[derive(Clone, Copy)]
enum Cell {
    /// The field, as [`text`] writes it.
    Field(&'static str),
    /// A station's state by its label.
    StationState,
    /// A phone's authentication state by its label.
    PhoneState,
}

impl Cell {
    fn of(self, item: &Value) -> String {
        match self {
            Cell::Field(field) => text(item, field),
            Cell::StationState => station_state(item),
            Cell::PhoneState => phone_state(item),
        }
    }
}

/// A list of the answer shown as a table: the answer's field that holds it, its columns
/// (header and cell), and what to say when it is empty.
struct Table {
    field: &'static str,
    columns: &'static [(&'static str, Cell)],
    empty: &'static str,
}

const STATIONS: Table = Table {
    field: "stations",
    columns: &[
        ("SERIAL", Cell::Field("serial")),
        ("MODEL", Cell::Field("model")),
        ("FIRMWARE", Cell::Field("firmware")),
        ("STATE", Cell::StationState),
        ("ONLINE", Cell::Field("online")),
        ("IP", Cell::Field("ip")),
        ("LAST SEEN", Cell::Field("last_seen")),
    ],
    empty: "no stations\n",
};

const PHONES: Table = Table {
    field: "phones",
    columns: &[
        ("MAC", Cell::Field("mac")),
        ("VENDOR", Cell::Field("vendor")),
        ("TYPE", Cell::Field("type")),
        ("SITE", Cell::Field("site")),
        ("AUTHENTICATION", Cell::PhoneState),
        ("PAP", Cell::Field("pap")),
        ("CREATED", Cell::Field("created_at")),
    ],
    empty: "no phones\n",
};

const OPERATORS: Table = Table {
    field: "operators",
    columns: &[
        ("NAME", Cell::Field("name")),
        ("TENANT", Cell::Field("tenant")),
        ("SERIAL", Cell::Field("serial")),
        ("ISSUED", Cell::Field("issued_at")),
        ("REVOKED", Cell::Field("revoked_at")),
        ("ONLINE", Cell::Field("online")),
        ("FINGERPRINT", Cell::Field("fingerprint")),
    ],
    empty: "no operators\n",
};

const BLOCKS: Table = Table {
    field: "blocks",
    columns: &[
        ("ADDRESS", Cell::Field("address")),
        ("UNTIL", Cell::Field("until")),
        ("FAILURES", Cell::Field("failures")),
    ],
    empty: "no address blocks\n",
};

const FIRMWARE: Table = Table {
    field: "images",
    columns: &[
        ("VERSION", Cell::Field("version")),
        ("SIZE", Cell::Field("size")),
        ("INSTALLABLE", Cell::Field("installable")),
        ("SHA-256", Cell::Field("sha256")),
    ],
    empty: "the firmware catalog is empty\n",
};

const AUDIT: Table = Table {
    field: "records",
    columns: &[
        ("TIME", Cell::Field("time")),
        ("ACTOR", Cell::Field("actor")),
        ("DEVICE", Cell::Field("device")),
        ("ACTION", Cell::Field("action")),
        ("OUTCOME", Cell::Field("outcome")),
        ("REASON", Cell::Field("reason")),
    ],
    empty: "no audit records\n",
};

fn render_list(table: &Table, data: &Value) -> String {
    let rows: Vec<Vec<String>> = list(data, table.field)
        .iter()
        .map(|item| {
            table
                .columns
                .iter()
                .map(|(_, cell)| cell.of(item))
                .collect()
        })
        .collect();
    if rows.is_empty() {
        return table.empty.to_owned();
    }
    let headers: Vec<&str> = table.columns.iter().map(|(header, _)| *header).collect();
    render_table(&headers, &rows)
}

/// Renders `data` as `shape` says.
pub(crate) fn render(shape: Shape, data: &Value) -> String {
    match shape {
        Shape::Stations => render_list(&STATIONS, data),
        Shape::Station => station(data),
        Shape::Phones => render_list(&PHONES, data),
        Shape::Phone => details(&[
            ("MAC", text(data, "mac")),
            ("Vendor", text(data, "vendor")),
            ("Type", text(data, "type")),
            ("Site", text(data, "site")),
            ("Authentication", phone_state(data)),
            ("PAP", text(data, "pap")),
            ("Created", text(data, "created_at")),
        ]),
        Shape::Whitelist => whitelist(data),
        Shape::Operators => render_list(&OPERATORS, data),
        Shape::Operator => details(&[
            ("Name", text(data, "name")),
            ("Tenant", text(data, "tenant")),
            ("Serial", text(data, "serial")),
            ("Fingerprint", text(data, "fingerprint")),
            ("Issued", text(data, "issued_at")),
            ("Revoked", text(data, "revoked_at")),
            ("Online", text(data, "online")),
        ]),
        Shape::Blocks => render_list(&BLOCKS, data),
        Shape::Firmware => render_list(&FIRMWARE, data),
        Shape::Audit => render_list(&AUDIT, data),
        Shape::Csv => {
            let mut csv = text(data, "csv");
            if !csv.ends_with('\n') {
                csv.push('\n');
            }
            csv
        }
        Shape::Import => import(data),
        Shape::Done => "ok\n".to_owned(),
        Shape::Raw => format!(
            "{}\n",
            serde_json::to_string_pretty(data).unwrap_or_else(|_| data.to_string())
        ),
    }
}

fn station(data: &Value) -> String {
    let mut pairs = vec![
        ("Serial", text(data, "serial")),
        ("Model", text(data, "model")),
        ("Firmware", text(data, "firmware")),
        ("Status", station_state(data)),
    ];
    if data.get("reason").is_some() {
        pairs.push(("Reason", text(data, "reason")));
    }
    pairs.extend([
        ("MAC streaming", text(data, "mac_streaming")),
        ("MAC control", text(data, "mac_control")),
        ("Fingerprint", text(data, "fingerprint")),
        ("Online", text(data, "online")),
        ("Last seen", text(data, "last_seen")),
        ("IP", text(data, "ip")),
    ]);
    details(&pairs)
}

fn whitelist(data: &Value) -> String {
    let mut out = String::from("Permanent whitelist:\n");
    let permanent = list(data, "permanent");
    if permanent.is_empty() {
        out.push_str("  (empty)\n");
    }
    for entry in permanent {
        let entry = entry
            .as_str()
            .map_or_else(|| entry.to_string(), str::to_owned);
        out.push_str(&format!("  {entry}\n"));
    }
    out.push_str("Temporary whitelist:\n");
    let temporary: Vec<Vec<String>> = list(data, "temporary")
        .iter()
        .map(|t| vec![text(t, "ip"), text(t, "expires_at")])
        .collect();
    if temporary.is_empty() {
        out.push_str("  (empty)\n");
    } else {
        out.push_str(&render_table(&["IP", "EXPIRES"], &temporary));
    }
    out
}

fn import(data: &Value) -> String {
    let created = list(data, "created");
    let mut out = format!("created {} phones\n", created.len());
    for phone in created {
        out.push_str(&format!(
            "  {}  PAP {}\n",
            text(phone, "mac"),
            text(phone, "pap")
        ));
    }
    for error in list(data, "errors") {
        out.push_str(&format!(
            "line {}: {}\n",
            text(error, "line"),
            text(error, "error")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn stations_table_uses_the_labels() {
        let data = json!({"stations": [
            {"serial": "ST-1", "model": "MC-Station", "firmware": "6.1.0", "state": "unauthorized",
             "online": true, "ip": "127.0.0.1", "last_seen": null},
            {"serial": "OLD", "model": "MC-Station", "firmware": "6.0.5", "state": "update_required",
             "label": "Update Required", "online": false},
        ]});
        let out = render(Shape::Stations, &data);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("SERIAL  MODEL"));
        assert!(lines[1].contains("Unauthorized"));
        assert!(lines[1].contains("yes"));
        assert!(lines[2].contains("Update Required"));
        assert_eq!(
            render(Shape::Stations, &json!({"stations": []})),
            "no stations\n"
        );
    }

    #[test]
    fn station_details_show_what_the_operator_checks() {
        let data = json!({"serial": "ST-1", "mac_streaming": "aabbccddeeff",
            "mac_control": "001122334455", "fingerprint": "AB:CD", "state": "running"});
        let out = render(Shape::Station, &data);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "Serial:         ST-1");
        assert_eq!(lines[3], "Status:         Running");
        assert!(lines.contains(&"Fingerprint:    AB:CD"), "{out}");
        assert!(lines.contains(&"MAC streaming:  aabbccddeeff"), "{out}");
    }

    #[test]
    fn operators_table_shows_revocation_and_presence() {
        let data = json!({"operators": [
            {"name": "admin", "tenant": "default", "serial": "01AB", "fingerprint": "AA:BB",
             "issued_at": "2024-05-01T10:00:00Z", "revoked_at": null, "online": true},
            {"name": "bob", "tenant": "default", "serial": "02CD", "fingerprint": "CC:DD",
             "issued_at": "2024-05-02T10:00:00Z", "revoked_at": "2024-06-01T00:00:00Z",
             "online": false},
        ]});
        let out = render(Shape::Operators, &data);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NAME   TENANT   SERIAL  ISSUED                REVOKED               ONLINE  FINGERPRINT"
        );
        assert_eq!(
            lines[1],
            "admin  default  01AB    2024-05-01T10:00:00Z  -                     yes     AA:BB"
        );
        assert!(
            lines[2].contains("2024-06-01T00:00:00Z  no      CC:DD"),
            "{out}"
        );
        assert_eq!(
            render(Shape::Operators, &json!({"operators": []})),
            "no operators\n"
        );
    }

    #[test]
    fn a_revoked_operator_says_when() {
        let data = json!({"name": "bob", "tenant": "default", "serial": "02CD",
            "fingerprint": "CC:DD", "issued_at": "2024-05-02T10:00:00Z",
            "revoked_at": "2024-06-01T00:00:00Z", "online": false});
        let out = render(Shape::Operator, &data);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "Name:         bob");
        assert!(
            lines.contains(&"Revoked:      2024-06-01T00:00:00Z"),
            "{out}"
        );
        assert!(lines.contains(&"Online:       no"), "{out}");
    }

    #[test]
    fn blocks_table_lists_address_until_and_failures() {
        let data = json!({"blocks": [
            {"address": "203.0.113.7", "until": "2024-05-01T10:15:00Z", "failures": 12},
            {"address": "2001:db8::1", "until": "2024-05-01T10:20:00Z", "failures": 5},
        ]});
        let out = render(Shape::Blocks, &data);
        assert_eq!(
            out,
            "ADDRESS      UNTIL                 FAILURES\n\
             203.0.113.7  2024-05-01T10:15:00Z  12\n\
             2001:db8::1  2024-05-01T10:20:00Z  5\n"
        );
        assert_eq!(
            render(Shape::Blocks, &json!({"blocks": []})),
            "no address blocks\n"
        );
    }
}
