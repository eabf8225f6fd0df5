//! Phone key pairs: a fresh P-256 key and a PKCS#10 request for the fleet CA to sign when the
//! phone provisions (PROTOCOL §3, `phones/<mac>/provision/request`).

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};

use crate::check_name;
use crate::error::CertError;

/// A fresh ECDSA P-256 key and a PEM certificate signing request for it with subject
/// CN = `mac`: returns (PKCS#8 key PEM, CSR PEM). `mac` must be 1 to 64 of `A-Za-z0-9-_.`
/// (a phone's is 12 lower-case hex digits).
pub fn phone_key_and_csr(mac: &str) -> Result<(String, String), CertError> {
    check_name("phone MAC", mac)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
    let mut params = CertificateParams::default();
    // The default subject names rcgen itself; the CA reads only the CN, which must be the MAC.
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, mac);
    let csr = params
        .serialize_request(&key)
        .map_err(CertError::Generate)?
        .pem()
        .map_err(CertError::Generate)?;
    Ok((key.serialize_pem(), csr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inspect_pem, Fingerprint, FleetCa};

    #[test]
    fn fleet_ca_issues_a_phone_certificate_for_the_key_of_the_csr() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let (key_pem, csr_pem) = phone_key_and_csr("0011aabbccdd").unwrap();
        assert!(key_pem.contains("BEGIN PRIVATE KEY"));
        assert!(csr_pem.contains("BEGIN CERTIFICATE REQUEST"));
        let issued = ca
            .issue_client_from_csr(&csr_pem, "0011aabbccdd", "phone", "default")
            .unwrap();
        let info = inspect_pem(&issued.cert_pem).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("0011aabbccdd"));
        assert_eq!(info.organizational_unit.as_deref(), Some("phone"));
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let key_fingerprint =
            Fingerprint::of_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&key));
        assert_eq!(
            crate::certificate_pem_fingerprint(&issued.cert_pem).unwrap(),
            key_fingerprint
        );
        // A CSR for one MAC is no good for another.
        assert!(ca
            .issue_client_from_csr(&csr_pem, "ffffffffffff", "phone", "default")
            .is_err());
    }

    #[test]
    fn every_call_makes_a_new_key() {
        let (first, _) = phone_key_and_csr("0011aabbccdd").unwrap();
        let (second, _) = phone_key_and_csr("0011aabbccdd").unwrap();
        assert_ne!(first, second);
        assert!(phone_key_and_csr("").is_err());
        assert!(phone_key_and_csr("a/b").is_err());
    }
}
