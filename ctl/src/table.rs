//! Readable output of `fleetctl`: tables that fit 100 columns and detail views, with the
//! manuals' labels and times in local time and relative to now ("3 min ago").

use fleet_ctl::{phone_label, station_label};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

/// The widest a table gets: wider columns are cut, with `…`.
pub(crate) const WIDTH: usize = 100;

/// A mismatch this recent flags its station in the list.
const RECENT_MISMATCH: time::Duration = time::Duration::DAY;

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

/// When output is made: times are shown in `offset` (the machine's, else UTC) and relative
/// to `now`. Read once, before any thread starts (reading the local offset needs that).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    pub(crate) now: OffsetDateTime,
    pub(crate) offset: UtcOffset,
}

impl Clock {
    /// The wall clock and the machine's UTC offset, UTC when it cannot be read.
    pub(crate) fn of_this_machine() -> Clock {
        Clock {
            now: OffsetDateTime::now_utc(),
            offset: UtcOffset::current_local_offset().unwrap_or(UtcOffset::UTC),
        }
    }

    /// An RFC 3339 field as a time.
    fn time(item: &Value, field: &str) -> Option<OffsetDateTime> {
        let text = item.get(field)?.as_str()?;
        OffsetDateTime::parse(text, &Rfc3339).ok()
    }

    /// How long ago `at` was, or how far ahead: `12 s ago`, `3 min ago`, `in 20 min`, `5 h
    /// ago`, `3 d ago`; `now` within the second.
    pub(crate) fn ago(&self, at: OffsetDateTime) -> String {
        let seconds = (self.now - at).whole_seconds();
        let span = seconds.unsigned_abs();
        let amount = match span {
            0 => return "now".to_owned(),
            1..=59 => format!("{span} s"),
            60..=3599 => format!("{} min", span / 60),
            3600..=172_799 => format!("{} h", span / 3600),
            _ => format!("{} d", span / 86_400),
        };
        if seconds > 0 {
            format!("{amount} ago")
        } else {
            format!("in {amount}")
        }
    }

    /// `at` in local time to the second.
    fn local(&self, at: OffsetDateTime) -> String {
        let format = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
        at.to_offset(self.offset)
            .format(&format)
            .unwrap_or_else(|_| at.to_string())
    }

    /// `at` for a table cell: the time of day when it is today, the date and time otherwise.
    fn short(&self, at: OffsetDateTime) -> String {
        let local = at.to_offset(self.offset);
        if local.date() == self.now.to_offset(self.offset).date() {
            let format = format_description!("[hour]:[minute]:[second]");
            local.format(&format).unwrap_or_else(|_| at.to_string())
        } else {
            let format = format_description!("[year]-[month]-[day] [hour]:[minute]");
            local.format(&format).unwrap_or_else(|_| at.to_string())
        }
    }

    /// A time field for a detail view: `2026-05-01 12:04:05 (3 min ago)`; the text as it is
    /// when it is not a time, `-` when null or absent.
    fn full(&self, item: &Value, field: &str) -> String {
        match Clock::time(item, field) {
            Some(at) => format!("{} ({})", self.local(at), self.ago(at)),
            None => text(item, field),
        }
    }

    /// A time field for a table cell: `12:04:05 (3 min ago)`.
    fn cell(&self, item: &Value, field: &str) -> String {
        match Clock::time(item, field) {
            Some(at) => format!("{} ({})", self.short(at), self.ago(at)),
            None => text(item, field),
        }
    }

    /// A time field for the audit table: its time only, the log being read by time.
    pub(crate) fn stamp(&self, item: &Value, field: &str) -> String {
        match Clock::time(item, field) {
            Some(at) => self.short(at),
            None => text(item, field),
        }
    }

    /// Whether the station was refused for another key within the last 24 h (`last_mismatch`,
    /// absent from fleetds before it).
    fn recent_mismatch(&self, station: &Value) -> Option<OffsetDateTime> {
        Clock::time(station, "last_mismatch").filter(|at| self.now - *at <= RECENT_MISMATCH)
    }
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

/// `cell` cut to `width` characters, the last one `…`.
fn cut(cell: &str, width: usize) -> String {
    if cell.chars().count() <= width {
        return cell.to_owned();
    }
    let mut out: String = cell.chars().take(width.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Renders rows under headers, columns padded to their widest cell; nothing is cut.
pub(crate) fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    render_fitted(headers, rows, &[])
}

/// Renders rows under headers within [`WIDTH`] columns: while too wide, the widest of the
/// columns marked in `shrinks` loses a character (no narrower than its header or 6), its
/// longer cells cut with `…`. Columns not marked (serials, MACs, addresses) are never cut.
fn render_fitted(headers: &[&str], rows: &[Vec<String>], shrinks: &[bool]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let floor = |i: usize| headers[i].chars().count().max(6);
    loop {
        let total = widths.iter().sum::<usize>() + 2 * widths.len().saturating_sub(1);
        if total <= WIDTH {
            break;
        }
        let widest = (0..widths.len())
            .filter(|&i| shrinks.get(i) == Some(&true) && widths[i] > floor(i))
            .max_by_key(|&i| widths[i]);
        match widest {
            Some(i) => widths[i] -= 1,
            None => break,
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, &width)| format!("{:<width$}", cut(cell, width)))
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
    /// The field, as [`text`] writes it; never cut.
    Key(&'static str),
    /// The field, as [`text`] writes it; cut when the table is too wide.
    Field(&'static str),
    /// A time field, local and relative.
    Time(&'static str),
    /// A time field, local only.
    Stamp(&'static str),
    /// A station's state by its label.
    StationState,
    /// `!` for a station refused for another key within the last 24 h.
    Mismatch,
    /// A phone's authentication state by its label.
    PhoneState,
}

impl Cell {
    fn of(self, item: &Value, clock: &Clock) -> String {
        match self {
            Cell::Key(field) | Cell::Field(field) => text(item, field),
            Cell::Time(field) => clock.cell(item, field),
            Cell::Stamp(field) => clock.stamp(item, field),
            Cell::StationState => station_state(item),
            Cell::Mismatch => match clock.recent_mismatch(item) {
                Some(_) => "!".to_owned(),
                None => String::new(),
            },
            Cell::PhoneState => phone_state(item),
        }
    }

    fn shrinks(self) -> bool {
        matches!(self, Cell::Field(_))
    }
}

/// A list of the answer shown as a table: the answer's field that holds it, its columns
/// (header and cell), what to say when it is empty, and the notes under it.
struct Table {
    field: &'static str,
    columns: &'static [(&'static str, Cell)],
    empty: &'static str,
    notes: fn(&Value, &Clock) -> Vec<String>,
}

fn no_notes(_: &Value, _: &Clock) -> Vec<String> {
    Vec::new()
}

const STATIONS: Table = Table {
    field: "stations",
    columns: &[
        ("!", Cell::Mismatch),
        ("SERIAL", Cell::Key("serial")),
        ("MODEL", Cell::Field("model")),
        ("FIRMWARE", Cell::Field("firmware")),
        ("STATUS", Cell::StationState),
        ("ONLINE", Cell::Field("online")),
        ("IP", Cell::Key("ip")),
        ("LAST SEEN", Cell::Time("last_seen")),
    ],
    empty: "no stations\n",
    notes: station_notes,
};

/// Under the station list: an Unsupported station's reason, and the stations flagged `!`.
fn station_notes(station: &Value, clock: &Clock) -> Vec<String> {
    let serial = text(station, "serial");
    let mut notes = Vec::new();
    if let Some(reason) = station.get("reason").and_then(Value::as_str) {
        notes.push(format!("{serial}: {}: {reason}", station_state(station)));
    }
    if let Some(at) = clock.recent_mismatch(station) {
        notes.push(format!(
            "! {serial}: refused for presenting another key {} (fleetctl audit --device \
             {serial})",
            clock.ago(at)
        ));
    }
    notes
}

const PHONES: Table = Table {
    field: "phones",
    columns: &[
        ("MAC", Cell::Key("mac")),
        ("VENDOR", Cell::Field("vendor")),
        ("TYPE", Cell::Field("type")),
        ("SITE", Cell::Field("site")),
        ("AUTHENTICATION", Cell::PhoneState),
        ("PAP", Cell::Key("pap")),
        ("WRONG PAPS", Cell::Key("failures")),
    ],
    empty: "no phones\n",
    notes: phone_notes,
};

/// Under the phone list: lockouts and suspensions in force, with their ends.
fn phone_notes(phone: &Value, clock: &Clock) -> Vec<String> {
    let mac = text(phone, "mac");
    let mut notes = Vec::new();
    if let Some(at) = Clock::time(phone, "failed_until") {
        notes.push(format!(
            "{mac}: locked out until {} ({})",
            clock.local(at),
            clock.ago(at)
        ));
    }
    if let Some(at) = Clock::time(phone, "suspended_until") {
        notes.push(format!(
            "{mac}: authentication suspended until {} ({})",
            clock.local(at),
            clock.ago(at)
        ));
    }
    notes
}

const OPERATORS: Table = Table {
    field: "operators",
    columns: &[
        ("NAME", Cell::Key("name")),
        ("TENANT", Cell::Key("tenant")),
        ("SERIAL", Cell::Key("serial")),
        ("ISSUED", Cell::Stamp("issued_at")),
        ("REVOKED", Cell::Stamp("revoked_at")),
        ("ONLINE", Cell::Field("online")),
        ("FINGERPRINT", Cell::Field("fingerprint")),
    ],
    empty: "no operators\n",
    notes: no_notes,
};

const BLOCKS: Table = Table {
    field: "blocks",
    columns: &[
        ("ADDRESS", Cell::Key("address")),
        ("UNTIL", Cell::Time("until")),
        ("FAILURES", Cell::Key("failures")),
    ],
    empty: "no address blocks\n",
    notes: no_notes,
};

const FIRMWARE: Table = Table {
    field: "images",
    columns: &[
        ("VERSION", Cell::Key("version")),
        ("SIZE", Cell::Key("size")),
        ("INSTALLABLE", Cell::Key("installable")),
        ("SHA-256", Cell::Key("sha256")),
    ],
    empty: "the firmware catalog is empty\n",
    notes: no_notes,
};

const AUDIT: Table = Table {
    field: "records",
    columns: &[
        ("TIME", Cell::Stamp("time")),
        ("ACTOR", Cell::Field("actor")),
        ("DEVICE", Cell::Key("device")),
        ("ACTION", Cell::Key("action")),
        ("OUTCOME", Cell::Key("outcome")),
        ("REASON", Cell::Field("reason")),
    ],
    empty: "no audit records\n",
    notes: no_notes,
};

fn render_list(table: &Table, data: &Value, clock: &Clock) -> String {
    let items = list(data, table.field);
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|item| {
            table
                .columns
                .iter()
                .map(|(_, cell)| cell.of(item, clock))
                .collect()
        })
        .collect();
    if rows.is_empty() {
        return table.empty.to_owned();
    }
    let headers: Vec<&str> = table.columns.iter().map(|(header, _)| *header).collect();
    let shrinks: Vec<bool> = table
        .columns
        .iter()
        .map(|(_, cell)| cell.shrinks())
        .collect();
    let mut out = render_fitted(&headers, &rows, &shrinks);
    let notes: Vec<String> = items
        .iter()
        .flat_map(|item| (table.notes)(item, clock))
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        for note in notes {
            out.push_str(&note);
            out.push('\n');
        }
    }
    out
}

/// Renders `data` as `shape` says, its times relative to `clock`.
pub(crate) fn render(shape: Shape, data: &Value, clock: &Clock) -> String {
    match shape {
        Shape::Stations => render_list(&STATIONS, data, clock),
        Shape::Station => station(data, clock),
        Shape::Phones => render_list(&PHONES, data, clock),
        Shape::Phone => phone(data, clock),
        Shape::Whitelist => whitelist(data, clock),
        Shape::Operators => render_list(&OPERATORS, data, clock),
        Shape::Operator => details(&[
            ("Name", text(data, "name")),
            ("Tenant", text(data, "tenant")),
            ("Serial", text(data, "serial")),
            ("Fingerprint", text(data, "fingerprint")),
            ("Issued", clock.full(data, "issued_at")),
            ("Revoked", clock.full(data, "revoked_at")),
            ("Online", text(data, "online")),
        ]),
        Shape::Blocks => render_list(&BLOCKS, data, clock),
        Shape::Firmware => render_list(&FIRMWARE, data, clock),
        Shape::Audit => render_list(&AUDIT, data, clock),
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

/// What `stations accept` shows before it asks for the fingerprint: the station, but not the
/// fingerprint itself, which the operator must read on the station.
pub(crate) fn station_to_accept(data: &Value) -> String {
    details(&[
        ("Serial", text(data, "serial")),
        ("Model", text(data, "model")),
        ("Firmware", text(data, "firmware")),
        ("Status", station_state(data)),
        ("MAC streaming", text(data, "mac_streaming")),
        ("MAC control", text(data, "mac_control")),
        ("IP", text(data, "ip")),
    ])
}

/// What `phones suspend` changed, from the phone read before and the answer after. A
/// provisioned phone is said to be unaffected: it must connect with its certificate whatever
/// the suspension (PROTOCOL §5).
pub(crate) fn suspension(before: &Value, after: &Value, clock: &Clock) -> String {
    let mac = text(after, "mac");
    let provisioned = after.get("auth_state").and_then(Value::as_str)
        == Some(fleet_protocol::PhoneState::Successful.as_str());
    if provisioned {
        return format!(
            "{mac} is {}: a suspension has no effect on it, it must connect with its \
             certificate (phones reset-authentication gives it a new PAP to provision again)\n",
            phone_state(after)
        );
    }
    let until = match Clock::time(after, "suspended_until") {
        Some(at) => format!("until {} ({})", clock.local(at), clock.ago(at)),
        None => "(fleetd answered without an end)".to_owned(),
    };
    let mut out = format!(
        "authentication of {mac} suspended {until}: it may connect without PAP, even from a \
         lockout or block, until then\n"
    );
    if let Some(was) = Clock::time(before, "suspended_until") {
        out.push_str(&format!(
            "(it was suspended until {} already: the period started again)\n",
            clock.local(was)
        ));
    }
    out
}

fn station(data: &Value, clock: &Clock) -> String {
    let mut pairs = vec![
        ("Serial", text(data, "serial")),
        ("Model", text(data, "model")),
        ("Firmware", text(data, "firmware")),
        ("Status", station_state(data)),
    ];
    if data.get("reason").is_some() {
        pairs.push(("Reason", text(data, "reason")));
    }
    if data.get("update_version").is_some() {
        pairs.push(("Installing", text(data, "update_version")));
    }
    pairs.extend([
        ("MAC streaming", text(data, "mac_streaming")),
        ("MAC control", text(data, "mac_control")),
        ("Fingerprint", text(data, "fingerprint")),
        ("Online", text(data, "online")),
        ("Last seen", clock.full(data, "last_seen")),
        ("IP", text(data, "ip")),
    ]);
    if let Some(Value::String(_)) = data.get("last_mismatch") {
        pairs.push((
            "Last mismatch",
            format!(
                "{}: refused for presenting another key",
                clock.full(data, "last_mismatch")
            ),
        ));
    }
    details(&pairs)
}

fn phone(data: &Value, clock: &Clock) -> String {
    let mut pairs = vec![
        ("MAC", text(data, "mac")),
        ("Vendor", text(data, "vendor")),
        ("Type", text(data, "type")),
        ("Site", text(data, "site")),
        ("Authentication", phone_state(data)),
        ("PAP", text(data, "pap")),
        ("Created", clock.full(data, "created_at")),
    ];
    if data.get("failed_until").is_some_and(|v| !v.is_null()) {
        pairs.push(("Locked out until", clock.full(data, "failed_until")));
    }
    pairs.push(("Suspended until", clock.full(data, "suspended_until")));
    if data.get("failures").is_some() {
        pairs.push(("Wrong PAPs", text(data, "failures")));
    }
    if data.get("lockouts").is_some() {
        pairs.push(("Lockouts", text(data, "lockouts")));
    }
    details(&pairs)
}

fn whitelist(data: &Value, clock: &Clock) -> String {
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
        .map(|t| vec![text(t, "ip"), clock.full(t, "expires_at")])
        .collect();
    if temporary.is_empty() {
        out.push_str("  (empty)\n");
    } else {
        out.push_str(&render_table(&["IP", "EXPIRES"], &temporary));
    }
    out
}

/// What `phones import` says: the phones created, with their PAPs, each refused line, and the
/// count of both.
fn import(data: &Value) -> String {
    let created = list(data, "created");
    let errors = list(data, "errors");
    let mut out = String::new();
    for phone in created {
        out.push_str(&format!(
            "  {}  PAP {}\n",
            text(phone, "mac"),
            text(phone, "pap")
        ));
    }
    for error in errors {
        out.push_str(&format!(
            "line {}: {}\n",
            text(error, "line"),
            text(error, "error")
        ));
    }
    out.push_str(&format!(
        "imported {} phones, refused {} lines\n",
        created.len(),
        errors.len()
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use time::macros::datetime;

    /// Half past noon UTC, shown in UTC.
    fn utc() -> Clock {
        Clock {
            now: datetime!(2024-05-01 12:30:00 UTC),
            offset: UtcOffset::UTC,
        }
    }

    #[test]
    fn times_are_relative_to_now_and_in_the_local_offset() {
        let clock = utc();
        let at = |t: OffsetDateTime| clock.ago(t);
        assert_eq!(at(datetime!(2024-05-01 12:30:00 UTC)), "now");
        assert_eq!(at(datetime!(2024-05-01 12:29:48 UTC)), "12 s ago");
        assert_eq!(at(datetime!(2024-05-01 12:27:00 UTC)), "3 min ago");
        assert_eq!(at(datetime!(2024-05-01 12:50:00 UTC)), "in 20 min");
        assert_eq!(at(datetime!(2024-04-30 12:30:00 UTC)), "24 h ago");
        assert_eq!(at(datetime!(2024-04-28 12:30:00 UTC)), "3 d ago");
        let berlin = Clock {
            offset: UtcOffset::from_hms(2, 0, 0).unwrap(),
            ..clock
        };
        let seen = json!({"last_seen": "2024-05-01T12:29:55Z"});
        assert_eq!(
            berlin.full(&seen, "last_seen"),
            "2024-05-01 14:29:55 (5 s ago)"
        );
        assert_eq!(berlin.cell(&seen, "last_seen"), "14:29:55 (5 s ago)");
        // Another day shows its date; a text that is not a time is shown as it is.
        assert_eq!(
            clock.cell(&json!({"t": "2024-04-29T08:00:00Z"}), "t"),
            "2024-04-29 08:00 (2 d ago)"
        );
        assert_eq!(clock.cell(&json!({"t": "soon"}), "t"), "soon");
        assert_eq!(clock.cell(&json!({"t": null}), "t"), "-");
    }

    #[test]
    fn stations_table_uses_the_labels_and_explains_unsupported() {
        let data = json!({"stations": [
            {"serial": "ST-1", "model": "MC-Station", "firmware": "6.1.0", "state": "unauthorized",
             "online": true, "ip": "127.0.0.1", "last_seen": "2024-05-01T12:29:17Z"},
            {"serial": "OLD", "model": "MC-Station", "firmware": "6.0.5", "state": "update_required",
             "label": "Update Required", "online": false},
            {"serial": "ANCIENT", "model": "MC-Station", "firmware": "5.0.0",
             "state": "unsupported", "label": "Unsupported", "online": false,
             "reason": "firmware 5.0.0 is below 6.0.2"},
        ]});
        let out = render(Shape::Stations, &data, &utc());
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("!  SERIAL   MODEL"), "{out}");
        // The manual's word, as `stations get` says it.
        assert!(lines[0].contains("  STATUS  "), "{out}");
        assert!(lines[1].contains("Unauthorized"));
        assert!(lines[1].contains("yes"));
        assert!(lines[1].ends_with("12:29:17 (43 s ago)"), "{out}");
        assert!(lines[2].contains("Update Required"));
        assert_eq!(
            lines.last(),
            Some(&"ANCIENT: Unsupported: firmware 5.0.0 is below 6.0.2")
        );
        assert!(
            lines[1..4].iter().all(|l| l.starts_with("   ")),
            "no flag: {out}"
        );
        assert_eq!(
            render(Shape::Stations, &json!({"stations": []}), &utc()),
            "no stations\n"
        );
    }

    #[test]
    fn a_recent_identity_mismatch_flags_the_station() {
        let station = |serial: &str, mismatch: Value| {
            json!({"serial": serial, "state": "running", "online": true,
                "last_mismatch": mismatch})
        };
        let data = json!({"stations": [
            station("RECENT", json!("2024-05-01T12:27:00Z")),
            station("OLDER", json!("2024-04-29T12:00:00Z")),
            station("NEVER", Value::Null),
            {"serial": "PREVIOUS-FLEETD", "state": "running"},
        ]});
        let out = render(Shape::Stations, &data, &utc());
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("!  RECENT"), "{out}");
        for line in &lines[2..5] {
            assert!(line.starts_with("   "), "{out}");
        }
        assert!(out.contains(
            "! RECENT: refused for presenting another key 3 min ago (fleetctl audit --device \
             RECENT)"
        ));
        assert!(!out.contains("OLDER: refused"), "{out}");
        let detail = render(Shape::Station, &data["stations"][0], &utc());
        assert!(
            detail.contains("Last mismatch:  2024-05-01 12:27:00 (3 min ago): refused"),
            "{detail}"
        );
    }

    #[test]
    fn tables_fit_100_columns_cutting_text_not_keys() {
        let long = "x".repeat(80);
        let data = json!({"records": [
            {"time": "2024-05-01T12:00:00Z", "actor": "203.0.113.200:65000", "device": "aabbccddee01",
             "action": "suspendPhoneAuthentication", "outcome": "refused", "reason": long},
        ]});
        let out = render(Shape::Audit, &data, &utc());
        for line in out.lines() {
            assert!(
                line.chars().count() <= WIDTH,
                "{} > {WIDTH}: {line}",
                line.len()
            );
        }
        assert!(out.contains("aabbccddee01  suspendPhoneAuthentication  refused"));
        assert!(out.contains("xxx…"), "{out}");
        let phones = json!({"phones": [
            {"mac": "aabbccddee01", "vendor": "A vendor with a very long name indeed",
             "type": "T54W", "site": "Headquarters, second floor, east wing",
             "auth_state": "authentication_failed", "pap": "123456", "failures": 3},
        ]});
        let out = render(Shape::Phones, &phones, &utc());
        let first = out.lines().nth(1).unwrap();
        assert!(first.chars().count() <= WIDTH, "{out}");
        assert!(
            first.contains("Authentication failed (temporarily blocked)  123456  3"),
            "{out}"
        );
    }

    #[test]
    fn phones_show_wrong_paps_lockouts_and_suspensions() {
        let data = json!({"phones": [
            {"mac": "aabbccddee01", "vendor": "Yealink", "type": "T54W", "site": "Berlin",
             "auth_state": "authentication_failed", "pap": "123456", "failures": 3,
             "failed_until": "2024-05-01T12:50:00Z", "suspended_until": null},
            {"mac": "aabbccddee02", "vendor": "Yealink", "type": "T54W", "site": "Berlin",
             "auth_state": "authentication_needed", "pap": "654321", "failures": 1,
             "suspended_until": "2024-05-01T12:58:00Z"},
        ]});
        let out = render(Shape::Phones, &data, &utc());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "MAC           VENDOR   TYPE  SITE    AUTHENTICATION                               PAP     WRONG PAPS"
        );
        assert!(lines[2].ends_with("Authentication needed                        654321  1"));
        assert!(
            out.contains("aabbccddee01: locked out until 2024-05-01 12:50:00 (in 20 min)"),
            "{out}"
        );
        assert!(
            out.contains(
                "aabbccddee02: authentication suspended until 2024-05-01 12:58:00 (in 28 min)"
            ),
            "{out}"
        );
        let one = render(Shape::Phone, &data["phones"][0], &utc());
        assert!(
            one.contains("Locked out until:  2024-05-01 12:50:00 (in 20 min)"),
            "{one}"
        );
        assert!(one.contains("Wrong PAPs:        3"), "{one}");
        assert!(one.contains("Suspended until:   -"), "{one}");
    }

    #[test]
    fn station_details_show_what_the_operator_checks() {
        let data = json!({"serial": "ST-1", "mac_streaming": "aabbccddeeff",
            "mac_control": "001122334455", "fingerprint": "AB:CD", "state": "running"});
        let out = render(Shape::Station, &data, &utc());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "Serial:         ST-1");
        assert_eq!(lines[3], "Status:         Running");
        assert!(lines.contains(&"Fingerprint:    AB:CD"), "{out}");
        assert!(lines.contains(&"MAC streaming:  aabbccddeeff"), "{out}");
        let to_accept = station_to_accept(&data);
        assert!(to_accept.contains("MAC control:    001122334455"));
        assert!(!to_accept.contains("AB:CD"), "{to_accept}");
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
        let out = render(Shape::Operators, &data, &utc());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "NAME   TENANT   SERIAL  ISSUED            REVOKED           ONLINE  FINGERPRINT"
        );
        assert_eq!(
            lines[1],
            "admin  default  01AB    10:00:00          -                 yes     AA:BB"
        );
        assert!(
            lines[2].contains("2024-06-01 00:00  no      CC:DD"),
            "{out}"
        );
        assert_eq!(
            render(Shape::Operators, &json!({"operators": []}), &utc()),
            "no operators\n"
        );
    }

    #[test]
    fn a_revoked_operator_says_when() {
        let data = json!({"name": "bob", "tenant": "default", "serial": "02CD",
            "fingerprint": "CC:DD", "issued_at": "2024-05-02T10:00:00Z",
            "revoked_at": "2024-06-01T00:00:00Z", "online": false});
        let out = render(Shape::Operator, &data, &utc());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "Name:         bob");
        assert!(
            lines.contains(&"Revoked:      2024-06-01 00:00:00 (in 30 d)"),
            "{out}"
        );
        assert!(lines.contains(&"Online:       no"), "{out}");
    }

    #[test]
    fn blocks_table_lists_address_until_and_failures() {
        let data = json!({"blocks": [
            {"address": "203.0.113.7", "until": "2024-05-01T12:45:00Z", "failures": 12},
            {"address": "2001:db8::1", "until": "2024-05-01T12:50:00Z", "failures": 5},
        ]});
        let out = render(Shape::Blocks, &data, &utc());
        assert_eq!(
            out,
            "ADDRESS      UNTIL                 FAILURES\n\
             203.0.113.7  12:45:00 (in 15 min)  12\n\
             2001:db8::1  12:50:00 (in 20 min)  5\n"
        );
        assert_eq!(
            render(Shape::Blocks, &json!({"blocks": []}), &utc()),
            "no address blocks\n"
        );
    }

    #[test]
    fn an_import_counts_what_it_created_and_refused() {
        let data = json!({"created": [{"mac": "aabbccddee01", "pap": "123456"}],
            "errors": [{"line": 3, "error": "mac: not a MAC"}, {"line": 4, "error": "exists"}]});
        let out = render(Shape::Import, &data, &utc());
        assert_eq!(
            out,
            "  aabbccddee01  PAP 123456\nline 3: mac: not a MAC\nline 4: exists\n\
             imported 1 phones, refused 2 lines\n"
        );
    }

    #[test]
    fn a_suspension_says_what_it_changed() {
        let phone = |state: &str, until: Value| json!({"mac": "aabbccddee01", "auth_state": state, "suspended_until": until});
        let ends = json!("2024-05-01T13:00:00Z");
        let out = suspension(
            &phone("authentication_failed", Value::Null),
            &phone("authentication_failed", ends.clone()),
            &utc(),
        );
        assert_eq!(
            out,
            "authentication of aabbccddee01 suspended until 2024-05-01 13:00:00 (in 30 min): it \
             may connect without PAP, even from a lockout or block, until then\n"
        );
        let again = suspension(
            &phone("authentication_needed", json!("2024-05-01T12:40:00Z")),
            &phone("authentication_needed", ends.clone()),
            &utc(),
        );
        assert!(
            again.contains("already: the period started again"),
            "{again}"
        );
        let provisioned = suspension(
            &phone("authentication_successful", Value::Null),
            &phone("authentication_successful", ends),
            &utc(),
        );
        assert!(
            provisioned.starts_with(
                "aabbccddee01 is Authentication successful: a suspension has no effect on it"
            ),
            "{provisioned}"
        );
    }
}
