//! The devices CSV of the phone manual's Batch Import/Export: export of a tenant's phones, and
//! the checked rows of an import. RFC 4180 through the `csv` crate; cells that a spreadsheet
//! would run as a formula are neutralised on export.
//!
//! Pure: no clock (the auth state is taken at the `now` passed in) and no I/O.

use std::collections::HashMap;

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

use crate::phone::{AuthState, Phone};
use fleet_protocol::Mac;

/// The columns, in export order (PROTOCOL §6).
pub const HEADER: [&str; 7] = fleet_protocol::payload::DEVICES_CSV_COLUMNS;

/// Most data rows one import takes; the rest is refused with one error.
pub const MAX_IMPORT_ROWS: usize = 10_000;

/// Longest vendor, type or site accepted from an import.
pub const MAX_FIELD_LEN: usize = 256;

/// First characters that make a spreadsheet treat a cell as a formula (CSV injection).
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// Why an export could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot write the CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("cannot write the CSV: {0}")]
    Finish(String),
    #[error("phone {mac}: creation time {reason}")]
    Time { mac: Mac, reason: String },
}

/// The devices CSV of `phones`: the header and one row per phone, auth state at `now`, the PAP
/// only while the phone is not provisioned.
pub fn export(phones: &[Phone], now: OffsetDateTime) -> Result<String, ExportError> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::CRLF)
        .from_writer(Vec::new());
    writer.write_record(HEADER)?;
    for phone in phones {
        let created_at = phone
            .created_at
            .to_offset(UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(|error| ExportError::Time {
                mac: phone.mac.clone(),
                reason: error.to_string(),
            })?;
        let state = phone.state_at(now);
        let pap = match (&phone.pap, state) {
            (Some(pap), state) if state != AuthState::Successful => pap.as_str(),
            _ => "",
        };
        let row = [
            phone.vendor.as_str(),
            phone.kind.as_str(),
            phone.mac.as_str(),
            created_at.as_str(),
            phone.site.as_str(),
            state.name(),
            pap,
        ];
        writer.write_record(row.map(formula_safe))?;
    }
    let bytes = writer
        .into_inner()
        .map_err(|error| ExportError::Finish(error.to_string()))?;
    // Every cell came from a `&str`, so the bytes are UTF-8.
    String::from_utf8(bytes).map_err(|error| ExportError::Finish(error.to_string()))
}

/// A cell a spreadsheet shows as text: a leading `'` before a formula start.
fn formula_safe(cell: &str) -> String {
    if cell.starts_with(FORMULA_STARTS) {
        format!("'{cell}")
    } else {
        cell.to_owned()
    }
}

/// Undoes `formula_safe`, so that an exported file imports with the values it was made from.
fn formula_unsafe(cell: &str) -> &str {
    match cell.strip_prefix('\'') {
        Some(rest) if rest.starts_with(FORMULA_STARTS) => rest,
        _ => cell,
    }
}

/// One good row of an import: a phone to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    /// Line of the file where the row starts (the header is line 1).
    pub line: u64,
    pub vendor: String,
    pub kind: String,
    pub mac: Mac,
    pub site: String,
}

/// One bad row of an import, or a problem with the whole file (line 1 for the header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportError {
    pub line: u64,
    pub error: String,
}

impl ImportError {
    fn new(line: u64, error: impl Into<String>) -> ImportError {
        ImportError {
            line,
            error: error.into(),
        }
    }
}

/// Where the columns an import uses are.
struct Columns {
    vendor: usize,
    kind: usize,
    mac: usize,
    site: Option<usize>,
    count: usize,
}

impl Columns {
    fn find(header: &csv::StringRecord) -> Result<Columns, String> {
        let names: Vec<String> = header
            .iter()
            .map(|name| name.trim().to_ascii_lowercase())
            .collect();
        let position = |wanted: &str| names.iter().position(|name| name == wanted);
        let required = |wanted: &'static str| {
            position(wanted).ok_or_else(|| format!("the header has no {wanted:?} column"))
        };
        for (i, name) in names.iter().enumerate() {
            if !name.is_empty() && names[..i].contains(name) {
                return Err(format!("the header has the {name:?} column twice"));
            }
        }
        Ok(Columns {
            vendor: required("vendor")?,
            kind: required("type")?,
            mac: required("mac")?,
            site: position("site"),
            count: names.len(),
        })
    }
}

/// Reads an import: the header (by name, any order; `pap`, `auth_state` and `created_at` are
/// ignored), then each row checked on its own. Bad rows are reported with their line and
/// skipped; the good ones come back in file order.
pub fn parse_import(csv: &str) -> (Vec<ImportRow>, Vec<ImportError>) {
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    // A spreadsheet may save a byte order mark in front of the header.
    let csv = csv.strip_prefix('\u{feff}').unwrap_or(csv);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(csv.as_bytes());
    let columns = match reader.headers() {
        Ok(header) if header.iter().all(|name| name.trim().is_empty()) => {
            Err("the header is missing".to_owned())
        }
        Ok(header) => Columns::find(header),
        Err(error) => Err(format!("the header cannot be read: {error}")),
    };
    let columns = match columns {
        Ok(columns) => columns,
        Err(error) => {
            errors.push(ImportError::new(1, error));
            return (rows, errors);
        }
    };
    let mut seen: HashMap<Mac, u64> = HashMap::new();
    let mut record = csv::StringRecord::new();
    let mut count = 0usize;
    let mut lines = LineCounter::new(csv);
    loop {
        let line = lines.line_at(reader.position().byte());
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(error) => {
                let line = error.position().map_or(line, |p| lines.line_at(p.byte()));
                errors.push(ImportError::new(line, format!("cannot be read: {error}")));
                // A reader error other than a bad record (there is none for a `&str`) would
                // repeat for ever; a bad record is skipped by the reader itself.
                if !matches!(error.kind(), csv::ErrorKind::UnequalLengths { .. }) {
                    break;
                }
                continue;
            }
        }
        let line = record.position().map_or(line, |p| lines.line_at(p.byte()));
        count += 1;
        if count > MAX_IMPORT_ROWS {
            errors.push(ImportError::new(
                line,
                format!("more than {MAX_IMPORT_ROWS} rows; this row and the rest are ignored"),
            ));
            break;
        }
        match check_row(&record, &columns, line) {
            Ok(row) => {
                if let Some(first) = seen.get(&row.mac) {
                    errors.push(ImportError::new(
                        line,
                        format!("MAC {} is on line {first} already", row.mac),
                    ));
                } else {
                    seen.insert(row.mac.clone(), line);
                    rows.push(row);
                }
            }
            Err(error) => errors.push(ImportError::new(line, error)),
        }
    }
    (rows, errors)
}

/// Line numbers from byte offsets. The reader's own line count is one short for records after
/// a CRLF (it counts the `\n` as the start of the next record), so lines are counted here.
struct LineCounter<'a> {
    text: &'a [u8],
    offset: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> LineCounter<'a> {
        LineCounter {
            text: text.as_bytes(),
            offset: 0,
            line: 1,
        }
    }

    /// The line of the first character at or after `byte` that is not a line break: where a
    /// record starting at `byte` really begins. Offsets must not go backwards.
    fn line_at(&mut self, byte: u64) -> u64 {
        let mut target = usize::try_from(byte)
            .unwrap_or(usize::MAX)
            .min(self.text.len());
        while self
            .text
            .get(target)
            .is_some_and(|b| *b == b'\r' || *b == b'\n')
        {
            target += 1;
        }
        if target > self.offset {
            let newlines = self.text[self.offset..target]
                .iter()
                .filter(|b| **b == b'\n')
                .count();
            self.line += newlines as u64;
            self.offset = target;
        }
        self.line
    }
}

fn check_row(
    record: &csv::StringRecord,
    columns: &Columns,
    line: u64,
) -> Result<ImportRow, String> {
    if record.len() != columns.count {
        return Err(format!(
            "has {} fields; the header has {}",
            record.len(),
            columns.count
        ));
    }
    let field = |index: usize, name: &str| -> Result<String, String> {
        let value = formula_unsafe(record.get(index).unwrap_or_default().trim());
        if value.len() > MAX_FIELD_LEN {
            return Err(format!("{name} is longer than {MAX_FIELD_LEN} bytes"));
        }
        Ok(value.to_owned())
    };
    let vendor = field(columns.vendor, "vendor")?;
    if vendor.is_empty() {
        return Err("vendor is missing".into());
    }
    let kind = field(columns.kind, "type")?;
    if kind.is_empty() {
        return Err("type is missing".into());
    }
    let mac_text = field(columns.mac, "mac")?;
    if mac_text.is_empty() {
        return Err("mac is missing".into());
    }
    let mac = Mac::parse(&mac_text).map_err(|error| error.to_string())?;
    let site = match columns.site {
        Some(index) => field(index, "site")?,
        None => String::new(),
    };
    Ok(ImportRow {
        line,
        vendor,
        kind,
        mac,
        site,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phone::{self, Pap, PhonePolicy};
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-03-01 10:00:00 UTC);

    fn phone(mac: &str, vendor: &str, kind: &str, site: &str) -> Phone {
        Phone::new(
            Mac::parse(mac).unwrap(),
            "default".into(),
            vendor.into(),
            kind.into(),
            site.into(),
            Pap::parse("012345").unwrap(),
            T0,
        )
    }

    fn read(csv: &str) -> Vec<Vec<String>> {
        csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(csv.as_bytes())
            .records()
            .map(|r| r.unwrap().iter().map(str::to_owned).collect())
            .collect()
    }

    #[test]
    fn export_has_the_header_and_one_row_per_phone() {
        let csv = export(&[phone("001a2b3c4d5e", "Yealink", "T54W", "Berlin")], T0).unwrap();
        assert_eq!(
            csv,
            "vendor,type,mac,created_at,site,auth_state,pap\r\n\
             Yealink,T54W,001a2b3c4d5e,2024-03-01T10:00:00Z,Berlin,authentication_needed,012345\r\n"
        );
        assert_eq!(
            export(&[], T0).unwrap(),
            "vendor,type,mac,created_at,site,auth_state,pap\r\n"
        );
    }

    #[test]
    fn export_quotes_commas_quotes_and_newlines() {
        let tricky = phone("001a2b3c4d5e", "Snom, Inc.", "D\"785\"", "Floor 1\nRoom 2");
        let csv = export(&[tricky], T0).unwrap();
        assert!(
            csv.contains("\"Snom, Inc.\",\"D\"\"785\"\"\",001a2b3c4d5e"),
            "{csv}"
        );
        assert!(csv.contains("\"Floor 1\nRoom 2\""), "{csv}");
        let rows = read(&csv);
        assert_eq!(rows[1][0], "Snom, Inc.");
        assert_eq!(rows[1][1], "D\"785\"");
        assert_eq!(rows[1][4], "Floor 1\nRoom 2");
    }

    #[test]
    fn export_neutralises_formula_cells() {
        let evil = [
            phone("000000000001", "=HYPERLINK(\"x\")", "+1", "-2"),
            phone("000000000002", "@SUM(A1)", "\tT", "\rR"),
            phone("000000000003", "plain=ok", "a-b", "'quoted"),
        ];
        let rows = read(&export(&evil, T0).unwrap());
        assert_eq!(rows[1][0], "'=HYPERLINK(\"x\")");
        assert_eq!(rows[1][1], "'+1");
        assert_eq!(rows[1][4], "'-2");
        assert_eq!(rows[2][0], "'@SUM(A1)");
        assert_eq!(rows[2][1], "'\tT");
        assert_eq!(rows[2][4], "'\rR");
        assert_eq!(rows[3][0], "plain=ok");
        assert_eq!(rows[3][1], "a-b");
        assert_eq!(rows[3][4], "'quoted");
        for row in &rows {
            for cell in row {
                assert!(!cell.starts_with(FORMULA_STARTS), "{cell:?}");
            }
        }
    }

    #[test]
    fn export_shows_the_pap_only_while_not_successful() {
        let policy = PhonePolicy::default();
        let needed = phone("000000000001", "v", "t", "s");
        let done = phone::complete(
            phone::issue_certificate(phone("000000000002", "v", "t", "s"), "01".into(), T0)
                .unwrap(),
            T0,
        )
        .unwrap();
        let blocked = Phone {
            auth: AuthState::Blocked,
            ..phone("000000000003", "v", "t", "s")
        };
        let suspended = phone::suspend(phone("000000000004", "v", "t", "s"), &policy, T0);
        let failed = Phone {
            auth: AuthState::Failed {
                until: T0 + time::Duration::minutes(30),
            },
            ..phone("000000000005", "v", "t", "s")
        };
        let phones = [needed, done, blocked, suspended, failed.clone()];
        let rows = read(&export(&phones, T0).unwrap());
        let states: Vec<(&str, &str)> = rows[1..]
            .iter()
            .map(|r| (r[5].as_str(), r[6].as_str()))
            .collect();
        assert_eq!(
            states,
            [
                ("authentication_needed", "012345"),
                ("authentication_successful", ""),
                ("authentication_blocked", "012345"),
                ("authentication_needed", "012345"),
                ("authentication_failed", "012345"),
            ]
        );
        // A lockout that is over shows as needed.
        let later = T0 + time::Duration::minutes(31);
        let rows = read(&export(&[failed], later).unwrap());
        assert_eq!(rows[1][5], "authentication_needed");
    }

    #[test]
    fn import_reads_columns_by_name_in_any_order() {
        let csv = "MAC, Site ,type,vendor,pap,auth_state,created_at\r\n\
                   00:1A:2B:3C:4D:5E,Berlin,T54W,Yealink,999999,authentication_successful,x\r\n\
                   001a2b3c4d5f,,D785,Snom,,,\r\n";
        let (rows, errors) = parse_import(csv);
        assert_eq!(errors, []);
        assert_eq!(
            rows,
            [
                ImportRow {
                    line: 2,
                    vendor: "Yealink".into(),
                    kind: "T54W".into(),
                    mac: Mac::parse("001a2b3c4d5e").unwrap(),
                    site: "Berlin".into(),
                },
                ImportRow {
                    line: 3,
                    vendor: "Snom".into(),
                    kind: "D785".into(),
                    mac: Mac::parse("001a2b3c4d5f").unwrap(),
                    site: String::new(),
                },
            ]
        );
        // No site column: sites are empty.
        let (rows, errors) = parse_import("vendor,type,mac\nv,t,001a2b3c4d5e\n");
        assert_eq!(errors, []);
        assert_eq!(rows[0].site, "");
    }

    #[test]
    fn import_reports_bad_lines_by_number_and_keeps_the_good_ones() {
        let csv = "vendor,type,mac,site\n\
                   Yealink,T54W,001a2b3c4d5e,Berlin\n\
                   Yealink,T54W,nonsense,Berlin\n\
                   ,T54W,001a2b3c4d60,Berlin\n\
                   Yealink,,001a2b3c4d61,Berlin\n\
                   Yealink,T54W,001a2b3c4d62\n\
                   Snom,\"D7\n85\",001a2b3c4d63,Hamburg\n\
                   Snom,D785,00-1A-2B-3C-4D-5E,Hamburg\n\
                   Snom,D785,001a2b3c4d64,Hamburg,extra\n\
                   Snom,D785,,Hamburg\n\
                   Snom,D785,001a2b3c4d65,Köln\n";
        let (rows, errors) = parse_import(csv);
        let good: Vec<(u64, &str)> = rows.iter().map(|r| (r.line, r.mac.as_str())).collect();
        assert_eq!(
            good,
            [
                (2, "001a2b3c4d5e"),
                (7, "001a2b3c4d63"),
                (12, "001a2b3c4d65")
            ]
        );
        assert_eq!(rows[1].kind, "D7\n85");
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5, 6, 9, 10, 11], "{errors:?}");
        assert!(errors[0].error.contains("nonsense"), "{}", errors[0].error);
        assert!(errors[1].error.contains("vendor is missing"));
        assert!(errors[2].error.contains("type is missing"));
        assert!(errors[3].error.contains("has 3 fields; the header has 4"));
        assert!(
            errors[4].error.contains("on line 2 already"),
            "{}",
            errors[4].error
        );
        assert!(errors[5].error.contains("has 5 fields"));
        assert!(errors[6].error.contains("mac is missing"));

        // The same lines with CRLF line ends and blank lines in between.
        let crlf = csv
            .replace('\n', "\r\n")
            .replace("Hamburg\r\n", "Hamburg\r\n\r\n");
        let (rows, errors) = parse_import(&crlf);
        let good: Vec<u64> = rows.iter().map(|r| r.line).collect();
        assert_eq!(good, [2, 7, 15]);
        let lines: Vec<u64> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, [3, 4, 5, 6, 10, 12, 13], "{errors:?}");
    }

    #[test]
    fn import_needs_a_header_with_the_required_columns() {
        for (csv, says) in [
            ("", "header is missing"),
            ("vendor,type\nv,t\n", "\"mac\""),
            ("001a2b3c4d5e,v,t\n", "\"vendor\""),
            ("vendor,type,mac,mac\nv,t,1,2\n", "twice"),
        ] {
            let (rows, errors) = parse_import(csv);
            assert!(rows.is_empty());
            assert_eq!(errors.len(), 1, "{csv:?}");
            assert_eq!(errors[0].line, 1);
            assert!(errors[0].error.contains(says), "{}", errors[0].error);
        }
        let (rows, errors) = parse_import("\u{feff}vendor,type,mac\nv,t,001a2b3c4d5e\n");
        assert_eq!((rows.len(), errors.len()), (1, 0));
    }

    #[test]
    fn import_takes_at_most_10000_rows() {
        let mut csv = String::from("vendor,type,mac\n");
        for i in 0..(MAX_IMPORT_ROWS + 5) {
            csv.push_str(&format!("v,t,{i:012x}\n"));
        }
        let (rows, errors) = parse_import(&csv);
        assert_eq!(rows.len(), MAX_IMPORT_ROWS);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].line, MAX_IMPORT_ROWS as u64 + 2);
        assert!(errors[0].error.contains("more than 10000 rows"));
    }

    #[test]
    fn an_export_imports_back_with_its_values() {
        let phones = [
            phone("001a2b3c4d5e", "=cmd", "T, 54\"W\"", "Floor 1\nRoom 2"),
            phone("001a2b3c4d5f", "Snom", "-D785", "@home"),
        ];
        let (rows, errors) = parse_import(&export(&phones, T0).unwrap());
        assert_eq!(errors, []);
        for (row, phone) in rows.iter().zip(&phones) {
            assert_eq!(row.mac, phone.mac);
            assert_eq!(row.vendor, phone.vendor);
            assert_eq!(row.kind, phone.kind);
            assert_eq!(row.site, phone.site);
        }
    }
}
