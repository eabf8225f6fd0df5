//! Station fingerprints: SHA-256 over the DER SubjectPublicKeyInfo of a certificate (PROTOCOL §1).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// SHA-256 over the DER SubjectPublicKeyInfo of a certificate (PROTOCOL §1).
///
/// It identifies the key, not the certificate: re-issuing a certificate for the same key keeps
/// it. Written as 32 upper-case hex byte pairs joined by `:`; parsed from that form in either
/// case, or from 64 plain hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps a SHA-256 digest.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Fingerprint(bytes)
    }

    /// The digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Fingerprint of a DER SubjectPublicKeyInfo.
    pub fn of_spki_der(spki_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(spki_der).into())
    }
}

/// Why a text is not a [`crate::Fingerprint`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    /// Neither 32 `:`-separated hex byte pairs (95 characters) nor 64 hex digits.
    #[error(
        "fingerprint has {found} characters; expected 32 hex byte pairs joined by ':' (95 characters) or 64 hex digits"
    )]
    Length {
        /// The number of characters found.
        found: usize,
    },
    /// A character that should be a hex digit is not.
    #[error("fingerprint character {position} ({found:?}) is not a hex digit")]
    NotHex {
        /// 1-based position of the character.
        position: usize,
        /// The character found.
        found: char,
    },
    /// A character that should be `:` is not.
    #[error("fingerprint character {position} ({found:?}) should be ':'")]
    Separator {
        /// 1-based position of the character.
        position: usize,
        /// The character found.
        found: char,
    },
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written into one buffer and handed over at once: a fingerprint is written several
        // times per accept (its view, its audit record, the stored record), and 64 formatted
        // writes of a byte each were a tenth of the controller's time per accept.
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut text = [b':'; 95];
        for (i, byte) in self.0.iter().enumerate() {
            text[3 * i] = HEX[usize::from(byte >> 4)];
            text[3 * i + 1] = HEX[usize::from(byte & 0x0F)];
        }
        // Only ASCII hex digits and ':' were written.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl FromStr for Fingerprint {
    type Err = FingerprintError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let chars: Vec<char> = s.chars().collect();
        // Separated form: "AB:CD:…", 32 pairs and 31 colons; plain form: 64 digits.
        let separated = match chars.len() {
            95 => true,
            64 => false,
            found => return Err(FingerprintError::Length { found }),
        };
        let stride = if separated { 3 } else { 2 };
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let at = i * stride;
            if separated && i > 0 && chars[at - 1] != ':' {
                return Err(FingerprintError::Separator {
                    position: at,
                    found: chars[at - 1],
                });
            }
            let hi = hex_digit(chars[at], at)?;
            let lo = hex_digit(chars[at + 1], at + 1)?;
            *byte = (hi << 4) | lo;
        }
        Ok(Fingerprint(bytes))
    }
}

/// Value of hex digit `c` found at 0-based index `index`.
fn hex_digit(c: char, index: usize) -> Result<u8, FingerprintError> {
    c.to_digit(16)
        // A hex digit is below 16, so it fits a u8.
        .map(|d| d as u8)
        .ok_or(FingerprintError::NotHex {
            position: index + 1,
            found: c,
        })
}

impl serde::Serialize for Fingerprint {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Fingerprint {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Fingerprint {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0xA0);
        }
        Fingerprint(bytes)
    }

    #[test]
    fn display_is_upper_case_pairs_joined_by_colons() {
        let text = sample().to_string();
        assert_eq!(text.len(), 95);
        assert!(text.starts_with("A0:C5:EA:"));
        assert!(!text.chars().any(|c| c.is_ascii_lowercase()));
        assert_eq!(text.split(':').count(), 32);
    }

    #[test]
    fn display_writes_every_byte_value_as_two_upper_case_digits() {
        for value in 0..=255u8 {
            let mut bytes = [0u8; 32];
            bytes[0] = value;
            bytes[31] = value.wrapping_add(1);
            let expected: Vec<String> = bytes.iter().map(|b| format!("{b:02X}")).collect();
            assert_eq!(Fingerprint(bytes).to_string(), expected.join(":"));
        }
    }

    #[test]
    fn display_and_from_str_round_trip_in_every_accepted_form() {
        let fp = sample();
        let upper = fp.to_string();
        assert_eq!(upper.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(upper.to_lowercase().parse::<Fingerprint>(), Ok(fp));
        assert_eq!(upper.replace(':', "").parse::<Fingerprint>(), Ok(fp));
        assert_eq!(
            upper.replace(':', "").to_lowercase().parse::<Fingerprint>(),
            Ok(fp)
        );
    }

    #[test]
    fn from_str_names_what_is_wrong() {
        let good = sample().to_string();
        assert_eq!(
            "".parse::<Fingerprint>(),
            Err(FingerprintError::Length { found: 0 })
        );
        assert_eq!(
            good[..94].parse::<Fingerprint>(),
            Err(FingerprintError::Length { found: 94 })
        );
        let dashes = good.replace(':', "-");
        assert_eq!(
            dashes.parse::<Fingerprint>(),
            Err(FingerprintError::Separator {
                position: 3,
                found: '-'
            })
        );
        let mut not_hex = good.clone();
        not_hex.replace_range(4..5, "G");
        let err = not_hex.parse::<Fingerprint>().unwrap_err();
        assert_eq!(
            err,
            FingerprintError::NotHex {
                position: 5,
                found: 'G'
            }
        );
        assert!(err.to_string().contains("not a hex digit"));
        // Multi-byte characters count as characters, not bytes, and are refused.
        let mut unicode = good.replace(':', "");
        unicode.replace_range(0..1, "é");
        assert!(matches!(
            unicode.parse::<Fingerprint>(),
            Err(FingerprintError::NotHex { position: 1, .. })
        ));
    }

    #[test]
    fn serde_uses_the_display_form() {
        let fp = sample();
        let json = serde_json::to_string(&fp).unwrap();
        assert_eq!(json, format!("\"{fp}\""));
        let back: Fingerprint = serde_json::from_str(&json.to_lowercase()).unwrap();
        assert_eq!(back, fp);
        assert!(serde_json::from_str::<Fingerprint>("\"AB\"").is_err());
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
}
