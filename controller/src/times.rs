//! Times as the fleet keeps and writes them: in UTC, written RFC 3339 (PROTOCOL §6, "Times are
//! RFC 3339 UTC"). Pure: the time is passed in.

use time::format_description::well_known::Rfc3339;
use time::{OffsetDateTime, UtcOffset};

/// `time` in UTC.
pub fn utc(time: OffsetDateTime) -> OffsetDateTime {
    time.to_offset(UtcOffset::UTC)
}

/// RFC 3339 in UTC; `None` only for a time RFC 3339 cannot write (beyond year 9999, or before
/// year 0).
pub fn rfc3339(time: OffsetDateTime) -> Option<String> {
    utc(time).format(&Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn times_are_written_in_utc() {
        let t = datetime!(2024-05-01 12:00:00 +02:00);
        assert_eq!(rfc3339(t).as_deref(), Some("2024-05-01T10:00:00Z"));
        assert_eq!(utc(t).offset(), UtcOffset::UTC);
        assert_eq!(rfc3339(datetime!(-0001-01-01 0:00 UTC)), None);
    }
}
