//! Certificates of the fleet: the fleet CA, the server and operator certificates it issues,
//! station key pairs with their self-signed certificates, fingerprints, and rustls helpers.
//!
//! All keys are ECDSA P-256; the only crypto provider is ring.

mod ca;
mod csr;
pub mod data_dir;
mod error;
mod fingerprint;
mod inspect;
pub mod operators;
mod station;
mod tls;

pub use ca::{CertifiedKey, FleetCa, IssuedCert};
pub use csr::phone_key_and_csr;
pub use error::CertError;
pub use fingerprint::{
    certificate_fingerprint, certificate_pem_fingerprint, Fingerprint, FingerprintError,
};
pub use inspect::{inspect, inspect_pem, CertInfo};
pub use operators::{OperatorRecord, OperatorRegistry};
pub use station::{self_signed_station, self_signed_station_with_key};
pub use tls::{certs_from_pem, client_config, crypto_provider, key_from_pem, split_server};

/// Longest name accepted for an operator, a tenant or a certificate subject field.
pub const MAX_NAME_LEN: usize = 64;

/// Checks that `value` is 1 to 64 of `A-Z a-z 0-9 - _ .`, the names that may appear in
/// certificate subjects, file names and MQTT topics of the fleet.
pub fn check_name(what: &'static str, value: &str) -> Result<(), CertError> {
    let reason = if value.is_empty() {
        Some("is empty")
    } else if value.len() > MAX_NAME_LEN {
        Some("is longer than 64 characters")
    } else if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("may only contain A-Z a-z 0-9 - _ .")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(CertError::InvalidName {
            what,
            value: value.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}
