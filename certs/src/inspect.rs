//! Reading what a certificate says: subject, fingerprint, serial number, validity, self-signature.

use time::OffsetDateTime;
use x509_parser::certificate::X509CertificateParser;
use x509_parser::nom::Parser;

use crate::error::CertError;
use crate::Fingerprint;

/// What the fleet needs to know about a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject CN.
    pub common_name: Option<String>,
    /// Subject OU.
    pub organizational_unit: Option<String>,
    /// Subject O.
    pub organization: Option<String>,
    /// SHA-256 of the SubjectPublicKeyInfo.
    pub fingerprint: Fingerprint,
    /// Serial number, lower-case hex, two digits a byte, without leading zero bytes.
    pub serial_number: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Issuer equals subject and the signature verifies under the certificate's own key.
    pub self_signed: bool,
}

/// Reads a DER certificate.
pub fn inspect(der: &[u8]) -> Result<CertInfo, CertError> {
    // Only the subject, serial, key, validity and signature are read: the extensions are split
    // but not parsed (about half of x509-parser's work on a station's certificate, which every
    // CONNECT of a station with a certificate inspects).
    let (_, cert) = X509CertificateParser::new()
        .with_deep_parse_extensions(false)
        .parse(der)
        .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
    let subject = cert.subject();
    let raw_serial = cert.raw_serial();
    let significant = raw_serial
        .iter()
        .position(|&b| b != 0)
        .map_or(&raw_serial[raw_serial.len().saturating_sub(1)..], |i| {
            &raw_serial[i..]
        });
    let serial_number = significant.iter().map(|b| format!("{b:02x}")).collect();
    let self_signed = cert.issuer() == cert.subject() && cert.verify_signature(None).is_ok();
    let common_name = attribute_text(subject.iter_common_name().next())?;
    let organizational_unit = attribute_text(subject.iter_organizational_unit().next())?;
    let organization = attribute_text(subject.iter_organization().next())?;
    Ok(CertInfo {
        common_name,
        organizational_unit,
        organization,
        fingerprint: Fingerprint::of_spki_der(cert.public_key().raw),
        serial_number,
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        self_signed,
    })
}

fn attribute_text(
    attr: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>,
) -> Result<Option<String>, CertError> {
    attr.map(|a| {
        a.as_str()
            .map(str::to_owned)
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))
    })
    .transpose()
}

/// Reads the first certificate of a PEM text.
pub fn inspect_pem(pem: &str) -> Result<CertInfo, CertError> {
    let certs = crate::certs_from_pem(pem)?;
    let first = certs.first().ok_or(CertError::NoCertificate)?;
    inspect(first)
}
