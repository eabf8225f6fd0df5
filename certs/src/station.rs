//! Station identities: a P-256 key pair with a self-signed certificate whose CN is the serial.

use rcgen::PKCS_ECDSA_P256_SHA256;
use rcgen::{DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
use time::Duration;

use crate::ca::{base_params, CertifiedKey};
use crate::error::CertError;

/// Validity of a station's self-signed certificate.
const STATION_VALIDITY: Duration = Duration::days(20 * 365);

/// A fresh P-256 key pair and a self-signed client certificate with CN = `serial`, valid for
/// 20 years: what a station with firmware 6.1.0 or later makes for itself.
pub fn self_signed_station(serial: &str) -> Result<CertifiedKey, CertError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
    certify_station(serial, key)
}

/// A new self-signed station certificate for an existing PKCS#8 P-256 key: the fingerprint
/// stays the same.
pub fn self_signed_station_with_key(
    serial: &str,
    key_pem: &str,
) -> Result<CertifiedKey, CertError> {
    let key = KeyPair::from_pem_and_sign_algo(key_pem, &PKCS_ECDSA_P256_SHA256)
        .map_err(CertError::InvalidKey)?;
    certify_station(serial, key)
}

fn certify_station(serial: &str, key: KeyPair) -> Result<CertifiedKey, CertError> {
    if serial.is_empty() {
        return Err(CertError::InvalidName {
            what: "station serial",
            value: String::new(),
            reason: "is empty",
        });
    }
    let mut params = base_params(STATION_VALIDITY)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, serial);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    // A self-signed certificate names itself as issuer; an authority key identifier would
    // only repeat the subject key identifier.
    params.use_authority_key_identifier_extension = false;
    let cert = params.self_signed(&key).map_err(CertError::Generate)?;
    Ok(CertifiedKey {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect;

    #[test]
    fn station_certificate_is_self_signed_with_the_serial_as_cn() {
        let station = self_signed_station("ST-0042").unwrap();
        let info = inspect(&station.cert_der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("ST-0042"));
        assert!(info.self_signed);
        assert!(info.not_after - info.not_before > Duration::days(20 * 365 - 1));
        let (_, cert) = x509_parser::parse_x509_certificate(&station.cert_der).unwrap();
        assert!(
            cert.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .client_auth
        );
        assert!(!cert.is_ca());
    }

    #[test]
    fn fingerprint_survives_reissue_for_the_same_key() {
        let first = self_signed_station("ST-0042").unwrap();
        let again = self_signed_station_with_key("ST-0042", &first.key_pem).unwrap();
        assert_ne!(first.cert_der, again.cert_der);
        assert_eq!(again.key_pem, first.key_pem);
        assert_eq!(
            crate::certificate_fingerprint(&first.cert_der).unwrap(),
            crate::certificate_pem_fingerprint(&again.cert_pem).unwrap()
        );
        let other = self_signed_station("ST-0042").unwrap();
        assert_ne!(
            crate::certificate_fingerprint(&first.cert_der).unwrap(),
            crate::certificate_fingerprint(&other.cert_der).unwrap()
        );
    }

    #[test]
    fn fingerprint_matches_the_openssl_recipe() {
        let station = self_signed_station("ST-0042").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("station.pem");
        std::fs::write(&file, &station.cert_pem).unwrap();
        let recipe = format!(
            "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der | openssl dgst -sha256 -c",
            file.display()
        );
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(&recipe)
            .output()
            .expect("run sh with openssl");
        assert!(output.status.success(), "{output:?}");
        let stdout = String::from_utf8(output.stdout).unwrap();
        let (_, hex) = stdout.trim().split_once("= ").expect("openssl dgst output");
        let fingerprint = crate::certificate_pem_fingerprint(&station.cert_pem).unwrap();
        assert_eq!(hex.to_uppercase(), fingerprint.to_string());
    }

    #[test]
    fn a_key_that_is_not_p256_pkcs8_is_refused() {
        assert!(matches!(
            self_signed_station_with_key("ST-1", "garbage"),
            Err(CertError::InvalidKey(_))
        ));
        assert!(self_signed_station("").is_err());
    }
}
