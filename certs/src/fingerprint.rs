//! The fingerprint of a certificate's key (PROTOCOL §1); the `Fingerprint` type itself is the
//! wire protocol's (`fleet_protocol`), this module reads it out of certificates.

use crate::error::CertError;
pub use fleet_protocol::{Fingerprint, FingerprintError};

/// Fingerprint of the public key in a DER certificate.
pub fn certificate_fingerprint(der: &[u8]) -> Result<Fingerprint, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    Ok(Fingerprint::of_spki_der(cert.public_key().raw))
}

/// Fingerprint of the public key in the first certificate of a PEM text.
pub fn certificate_pem_fingerprint(pem: &str) -> Result<Fingerprint, CertError> {
    let certs = crate::certs_from_pem(pem)?;
    let first = certs.first().ok_or(CertError::NoCertificate)?;
    certificate_fingerprint(first)
}
