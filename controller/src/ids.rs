//! Identifiers parsed once at the edge (serials, fingerprints) and the errors of operator commands.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// SHA-256 over a station's DER SubjectPublicKeyInfo (PROTOCOL §1); one type for the whole fleet.
pub use fleet_certs::Fingerprint;

/// Longest serial a station may have (PROTOCOL §1).
pub const MAX_SERIAL_LEN: usize = 64;

/// Prefix of a station's MQTT client id: `station-<serial>`.
pub const STATION_CLIENT_ID_PREFIX: &str = "station-";

/// Why a text is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("serial is empty")]
    EmptySerial,
    #[error("serial is longer than {MAX_SERIAL_LEN} characters")]
    SerialTooLong,
    #[error("serial {serial:?} contains {found:?}; only A-Z, a-z, 0-9 and - are allowed")]
    SerialCharacter { serial: String, found: char },
    #[error("client id {0:?} is not station-<serial>")]
    ClientId(String),
}

/// A station's serial number: 1 to 64 of `A-Z a-z 0-9 -`. A `Serial` that exists is valid, so
/// it can go into topics and store keys as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(String);

impl Serial {
    /// Parses a serial, refusing anything outside PROTOCOL §1.
    pub fn parse(text: &str) -> Result<Serial, IdError> {
        if text.is_empty() {
            return Err(IdError::EmptySerial);
        }
        if text.len() > MAX_SERIAL_LEN {
            return Err(IdError::SerialTooLong);
        }
        if let Some(found) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(IdError::SerialCharacter {
                serial: text.to_owned(),
                found,
            });
        }
        Ok(Serial(text.to_owned()))
    }

    /// The serial of a station's MQTT client id, `station-<serial>`.
    pub fn from_client_id(client_id: &str) -> Result<Serial, IdError> {
        let serial = client_id
            .strip_prefix(STATION_CLIENT_ID_PREFIX)
            .ok_or_else(|| IdError::ClientId(shorten(client_id)))?;
        Serial::parse(serial)
    }

    /// The client id this station must connect with.
    pub fn client_id(&self) -> String {
        format!("{STATION_CLIENT_ID_PREFIX}{}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Serial {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Serial::parse(text)
    }
}

impl Serialize for Serial {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Serial {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Serial::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Keeps untrusted text quoted in an error message short.
fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Machine-readable code of an operator command error (PROTOCOL §6), the `code` of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    InvalidArgument,
    WrongState,
    FingerprintMismatch,
    Forbidden,
    Internal,
}

impl ErrorCode {
    /// The JSON name of the code.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidArgument => "invalid_argument",
            ErrorCode::WrongState => "wrong_state",
            ErrorCode::FingerprintMismatch => "fingerprint_mismatch",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An operator command that could not be carried out: the `error` text and `code` of a response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::NotFound, message)
    }

    pub fn invalid_argument(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::InvalidArgument, message)
    }

    pub fn wrong_state(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::WrongState, message)
    }

    pub fn fingerprint_mismatch(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::FingerprintMismatch, message)
    }

    pub fn forbidden(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::Forbidden, message)
    }

    pub fn internal(message: impl Into<String>) -> CommandError {
        CommandError::new(ErrorCode::Internal, message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_accepts_letters_digits_and_dashes() {
        let serial = Serial::parse("MC-6100-abc9").unwrap();
        assert_eq!(serial.as_str(), "MC-6100-abc9");
        assert_eq!(serial.to_string(), "MC-6100-abc9");
        assert_eq!("MC-1".parse::<Serial>().unwrap().as_str(), "MC-1");
        assert!(Serial::parse(&"A".repeat(64)).is_ok());
    }

    #[test]
    fn serial_refuses_the_wrong_form() {
        assert_eq!(Serial::parse(""), Err(IdError::EmptySerial));
        assert_eq!(Serial::parse(&"A".repeat(65)), Err(IdError::SerialTooLong));
        for bad in ["a b", "a/b", "a+", "a#", "ä", "a_b", "a.b", "a:b"] {
            assert!(
                matches!(Serial::parse(bad), Err(IdError::SerialCharacter { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn serial_from_client_id() {
        assert_eq!(
            Serial::from_client_id("station-S1").unwrap(),
            Serial::parse("S1").unwrap()
        );
        assert_eq!(Serial::parse("S1").unwrap().client_id(), "station-S1");
        assert!(matches!(
            Serial::from_client_id("phone-S1"),
            Err(IdError::ClientId(_))
        ));
        assert_eq!(
            Serial::from_client_id("station-"),
            Err(IdError::EmptySerial)
        );
        assert!(Serial::from_client_id("station-a/b").is_err());
        let long = "x".repeat(500);
        let message = Serial::from_client_id(&long).unwrap_err().to_string();
        assert!(message.len() < 120, "{message}");
    }

    #[test]
    fn serial_serde_validates() {
        let serial = Serial::parse("S-1").unwrap();
        assert_eq!(serde_json::to_string(&serial).unwrap(), "\"S-1\"");
        assert_eq!(serde_json::from_str::<Serial>("\"S-1\"").unwrap(), serial);
        assert!(serde_json::from_str::<Serial>("\"S 1\"").is_err());
        assert!(serde_json::from_str::<Serial>("\"\"").is_err());
    }

    #[test]
    fn fingerprint_round_trips_through_text_and_json() {
        let fp = Fingerprint::from_bytes([0xab; 32]);
        let text = fp.to_string();
        assert!(text.starts_with("AB:AB:"));
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(serde_json::from_str::<Fingerprint>(&json).unwrap(), fp);
    }

    #[test]
    fn error_codes_have_their_json_names() {
        for code in [
            ErrorCode::NotFound,
            ErrorCode::InvalidArgument,
            ErrorCode::WrongState,
            ErrorCode::FingerprintMismatch,
            ErrorCode::Forbidden,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::json!(code.as_str())
            );
        }
        let error = CommandError::wrong_state("station S1 is Rejected");
        assert_eq!(error.code, ErrorCode::WrongState);
        assert_eq!(error.to_string(), "station S1 is Rejected");
    }
}
