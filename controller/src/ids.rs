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
    /// A MAC address that is not 12 hex digits, bare or in pairs joined by `:` or `-`.
    #[error("MAC {mac:?} {problem}")]
    Mac { mac: String, problem: String },
    #[error("client id {0:?} is not phone-<mac> with 12 lower-case hex digits")]
    PhoneClientId(String),
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

/// Prefix of a phone's MQTT client id: `phone-<mac>`.
pub const PHONE_CLIENT_ID_PREFIX: &str = "phone-";

/// A phone's MAC address, normalised to 12 lower-case hex digits (PROTOCOL §1). A `Mac` that
/// exists is in that form, so it can go into topics, client ids and store keys as it is.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(String);

impl Mac {
    /// Parses `001a2b3c4d5e` (any case), `00:1A:2B:3C:4D:5E` or `00-1a-2b-3c-4d-5e`.
    pub fn parse(text: &str) -> Result<Mac, IdError> {
        let problem = |problem: String| IdError::Mac {
            mac: shorten(text),
            problem,
        };
        if text.is_empty() {
            return Err(problem("is empty".into()));
        }
        if let Some(found) = text
            .chars()
            .find(|c| !(c.is_ascii_hexdigit() || *c == ':' || *c == '-'))
        {
            return Err(problem(format!(
                "contains {found:?}; only hex digits and : or - separators are allowed"
            )));
        }
        let digits = text.chars().filter(char::is_ascii_hexdigit).count();
        if digits != 12 {
            return Err(problem(format!("has {digits} hex digits; a MAC has 12")));
        }
        if text.len() != 12 {
            // Separated: six pairs joined by one kind of separator.
            let separators: Vec<char> = text.chars().filter(|c| !c.is_ascii_hexdigit()).collect();
            if separators.iter().any(|c| *c != separators[0]) {
                return Err(problem("mixes : and - separators".into()));
            }
            if !text.split(separators[0]).all(|pair| pair.len() == 2) {
                return Err(problem(
                    "is not six pairs of hex digits joined by : or -".into(),
                ));
            }
        }
        Ok(Mac(text
            .chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .collect()))
    }

    /// The MAC of a phone's MQTT client id, `phone-<mac>`; only the normalised form is accepted,
    /// so that one phone has exactly one client id.
    pub fn from_client_id(client_id: &str) -> Result<Mac, IdError> {
        let refused = || IdError::PhoneClientId(shorten(client_id));
        let mac = client_id
            .strip_prefix(PHONE_CLIENT_ID_PREFIX)
            .ok_or_else(refused)?;
        let normalised = mac.len() == 12
            && mac
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !normalised {
            return Err(refused());
        }
        Ok(Mac(mac.to_owned()))
    }

    /// The client id this phone must connect with.
    pub fn client_id(&self) -> String {
        format!("{PHONE_CLIENT_ID_PREFIX}{}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Mac {
    type Err = IdError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Mac::parse(text)
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        // Stored and wire MACs are always normalised; anything else is not one of ours.
        match Mac::parse(&text) {
            Ok(mac) if mac.0 == text => Ok(mac),
            Ok(_) => Err(serde::de::Error::custom(format!(
                "MAC {:?} is not 12 lower-case hex digits",
                shorten(&text)
            ))),
            Err(error) => Err(serde::de::Error::custom(error)),
        }
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
    /// The operator sent more commands than its budget allows (`[limits]
    /// operator_commands_per_second`); the message says when to retry.
    RateLimited,
    /// The request's whole response would exceed `[limits] max_response_bytes`.
    TooLarge,
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
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
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
    fn mac_accepts_the_three_forms_and_normalises() {
        for text in [
            "001a2b3c4d5e",
            "001A2B3C4D5E",
            "00:1A:2B:3C:4D:5E",
            "00:1a:2b:3c:4d:5e",
            "00-1a-2b-3c-4d-5e",
            "00-1A-2B-3C-4D-5E",
        ] {
            let mac = Mac::parse(text).unwrap();
            assert_eq!(mac.as_str(), "001a2b3c4d5e", "{text}");
            assert_eq!(mac.to_string(), "001a2b3c4d5e");
        }
        assert_eq!(
            "AABBCCDDEEFF".parse::<Mac>().unwrap().as_str(),
            "aabbccddeeff"
        );
    }

    #[test]
    fn mac_errors_name_what_is_wrong() {
        let message = |text: &str| Mac::parse(text).unwrap_err().to_string();
        assert!(message("").contains("is empty"));
        assert!(message("001a2b3c4d").contains("has 10 hex digits"));
        assert!(message("001a2b3c4d5e6f").contains("has 14 hex digits"));
        assert!(message("001a2b3c4d5g").contains("'g'"));
        assert!(message("00 1a 2b 3c 4d 5e").contains("' '"));
        assert!(message("00:1a-2b:3c:4d:5e").contains("mixes"));
        assert!(message("001:a2b:3c:4d:5e").contains("six pairs"));
        assert!(message(":001a2b3c4d5e").contains("six pairs"));
        assert!(message("00::1a2b3c4d5e").contains("six pairs"));
        assert!(matches!(Mac::parse("x"), Err(IdError::Mac { .. })));
        let long = "z".repeat(500);
        assert!(message(&long).len() < 200);
    }

    #[test]
    fn mac_client_id_requires_the_normalised_form() {
        let mac = Mac::parse("001a2b3c4d5e").unwrap();
        assert_eq!(mac.client_id(), "phone-001a2b3c4d5e");
        assert_eq!(Mac::from_client_id("phone-001a2b3c4d5e").unwrap(), mac);
        for bad in [
            "phone-001A2B3C4D5E",
            "phone-00:1a:2b:3c:4d:5e",
            "phone-001a2b3c4d",
            "phone-",
            "station-001a2b3c4d5e",
            "001a2b3c4d5e",
            "phone-001a2b3c4d5e ",
        ] {
            assert!(
                matches!(Mac::from_client_id(bad), Err(IdError::PhoneClientId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn mac_serde_is_the_normalised_string_and_validates() {
        let mac = Mac::parse("00:1A:2B:3C:4D:5E").unwrap();
        assert_eq!(serde_json::to_string(&mac).unwrap(), "\"001a2b3c4d5e\"");
        assert_eq!(
            serde_json::from_str::<Mac>("\"001a2b3c4d5e\"").unwrap(),
            mac
        );
        assert!(serde_json::from_str::<Mac>("\"001A2B3C4D5E\"").is_err());
        assert!(serde_json::from_str::<Mac>("\"00:1a:2b:3c:4d:5e\"").is_err());
        assert!(serde_json::from_str::<Mac>("\"nope\"").is_err());
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
