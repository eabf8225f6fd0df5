//! The fleet's identifiers (PROTOCOL §1): station serials, phone MACs, and the client ids made
//! of them. Parsed once at the edge; a value that exists is valid.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest serial a station may have (PROTOCOL §1).
pub const MAX_SERIAL_LEN: usize = 64;

/// Prefix of a station's MQTT client id: `station-<serial>`.
pub const STATION_CLIENT_ID_PREFIX: &str = "station-";

/// What every identifier that wraps a valid text has: `Display` and `Serialize` as the text,
/// `FromStr` as the type's `parse`.
macro_rules! text_id {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                $name::parse(text)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}

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

text_id!(Serial);

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
        Mac::parse_normalised(mac).map_err(|_| refused())
    }

    /// Parses a MAC that must already be in its normalised form (12 lower-case hex digits), as
    /// in client ids and topics: one phone has exactly one of each.
    pub fn parse_normalised(text: &str) -> Result<Mac, IdError> {
        let normalised = text.len() == 12
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !normalised {
            return Err(IdError::Mac {
                mac: shorten(text),
                problem: "is not 12 lower-case hex digits".into(),
            });
        }
        Ok(Mac(text.to_owned()))
    }

    /// The client id this phone must connect with.
    pub fn client_id(&self) -> String {
        format!("{PHONE_CLIENT_ID_PREFIX}{}", self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

text_id!(Mac);

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        // Stored and wire MACs are always normalised; anything else is not one of ours.
        Mac::parse_normalised(&text).map_err(serde::de::Error::custom)
    }
}

/// Prefix of the client ids `fleetctl` connects with: `op-<operator>-<random tag>`. Operators
/// may use any client id (PROTOCOL §1); this one only keeps fleetctl's sessions recognisable.
pub const OPERATOR_CLIENT_ID_PREFIX: &str = "op-";

/// The client id `fleetctl` connects operator `name` with; `tag` tells its sessions apart.
pub fn operator_client_id(name: &str, tag: &str) -> String {
    format!("{OPERATOR_CLIENT_ID_PREFIX}{name}-{tag}")
}

/// What a client id claims to be (PROTOCOL §1), before any certificate is looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimedClient {
    /// `station-…`: the serial, or why it is none.
    Station(Result<Serial, IdError>),
    /// `phone-…`: the MAC, or why it is none.
    Phone(Result<Mac, IdError>),
    /// Anything else: only an operator certificate can identify such a client.
    Other,
}

impl ClaimedClient {
    /// Reads what `client_id` claims.
    pub fn of(client_id: &str) -> ClaimedClient {
        if let Some(serial) = client_id.strip_prefix(STATION_CLIENT_ID_PREFIX) {
            ClaimedClient::Station(Serial::parse(serial))
        } else if client_id.starts_with(PHONE_CLIENT_ID_PREFIX) {
            ClaimedClient::Phone(Mac::from_client_id(client_id))
        } else {
            ClaimedClient::Other
        }
    }
}

/// Keeps untrusted text quoted in an error message short: at most 80 characters, then `…`.
pub fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
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
    fn a_client_id_claims_a_station_a_phone_or_nothing() {
        assert_eq!(
            ClaimedClient::of("station-S1"),
            ClaimedClient::Station(Ok(Serial::parse("S1").unwrap()))
        );
        assert!(matches!(
            ClaimedClient::of("station-S_1"),
            ClaimedClient::Station(Err(_))
        ));
        assert_eq!(
            ClaimedClient::of("phone-0011aabbccdd"),
            ClaimedClient::Phone(Ok(Mac::parse("0011aabbccdd").unwrap()))
        );
        assert!(matches!(
            ClaimedClient::of("phone-0011AABBCCDD"),
            ClaimedClient::Phone(Err(_))
        ));
        assert_eq!(ClaimedClient::of("op-admin-1"), ClaimedClient::Other);
        assert_eq!(operator_client_id("admin", "x1"), "op-admin-x1");
    }
}
