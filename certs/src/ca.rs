//! The fleet CA and the certificates it issues: the server, operators, and clients from CSRs.

use std::fmt;
use std::net::IpAddr;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    PKCS_ECDSA_P256_SHA256,
};
use ring::rand::{SecureRandom, SystemRandom};
use time::{Duration, OffsetDateTime};

use crate::error::CertError;
use crate::{certs_from_pem, check_name};

/// Validity of the fleet CA certificate.
const CA_VALIDITY: Duration = Duration::days(10 * 365);
/// Validity of the server certificate; [`crate::data_dir::ensure`] renews it before it ends.
pub(crate) const SERVER_VALIDITY: Duration = Duration::days(2 * 365);
/// Validity of operator and client certificates.
const CLIENT_VALIDITY: Duration = Duration::days(2 * 365);
/// Certificates start a little in the past so that a peer whose clock lags accepts them.
const BACKDATE: Duration = Duration::hours(1);
/// Subject CN of the server certificate when it has no DNS name.
const SERVER_FALLBACK_CN: &str = "fleetgate server";

/// A certificate with its private key.
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key in PEM.
    pub key_pem: String,
    /// The certificate in DER.
    pub cert_der: Vec<u8>,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("CertifiedKey")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A certificate issued for a public key the caller holds the private key of (from a CSR).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IssuedCert {
    /// The certificate in PEM.
    pub cert_pem: String,
    /// The certificate in DER.
    pub cert_der: Vec<u8>,
}

/// The fleet CA: its certificate and signing key.
pub struct FleetCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the signing key.
        f.debug_struct("FleetCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl FleetCa {
    /// Makes a new CA: a fresh P-256 key and a self-signed CA certificate with subject
    /// CN = `common_name`, valid for 10 years, that may only sign end-entity certificates.
    pub fn generate(common_name: &str) -> Result<FleetCa, CertError> {
        if common_name.is_empty() {
            return Err(CertError::InvalidName {
                what: "CA common name",
                value: String::new(),
                reason: "is empty",
            });
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        let mut params = base_params(CA_VALIDITY)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).map_err(CertError::Generate)?;
        Ok(FleetCa {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and PKCS#8 key, checking that the certificate is a CA
    /// and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<FleetCa, CertError> {
        let mut certs = certs_from_pem(cert_pem)?;
        if certs.len() != 1 {
            return Err(CertError::InvalidCertificate(format!(
                "expected exactly one CA certificate, found {}",
                certs.len()
            )));
        }
        let der = certs.remove(0);
        let key = KeyPair::from_pem(key_pem).map_err(CertError::InvalidKey)?;
        {
            let (_, x509) = x509_parser::parse_x509_certificate(&der)
                .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
            if !x509.is_ca() {
                return Err(CertError::NotACa);
            }
            if x509.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
                return Err(CertError::CaKeyMismatch);
            }
        }
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
        Ok(FleetCa {
            cert_pem: cert_pem.to_owned(),
            cert_der: der.to_vec(),
            issuer,
        })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key in PKCS#8 PEM. Keep it readable by the owner only.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The CA certificate in DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Issues a TLS server certificate (server auth) for a fresh key, with the given DNS names
    /// and IP addresses as subject alternative names. The subject CN is the first DNS name.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
    ) -> Result<CertifiedKey, CertError> {
        let mut params = base_params(SERVER_VALIDITY)?;
        let cn = dns_names.first().map_or(SERVER_FALLBACK_CN, String::as_str);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        for name in dns_names {
            let ia5 = name.clone().try_into().map_err(CertError::Generate)?;
            params.subject_alt_names.push(SanType::DnsName(ia5));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_with_fresh_key(&params)
    }

    /// Issues an operator certificate (client auth, 2 years) for a fresh key:
    /// CN = `name`, OU = `operator`, O = `tenant`. Both must be 1 to 64 of `A-Za-z0-9-_.`.
    pub fn issue_operator(&self, name: &str, tenant: &str) -> Result<CertifiedKey, CertError> {
        check_name("operator name", name)?;
        check_name("tenant", tenant)?;
        let params = client_params(name, "operator", tenant)?;
        self.issue_with_fresh_key(&params)
    }

    /// Issues a client certificate (client auth, 2 years) for the public key of a PEM CSR,
    /// with subject CN = `cn`, OU = `ou`, O = `o`; used to provision phones.
    ///
    /// The CSR's signature must verify and its CN must be `cn`; everything else it asks for
    /// (other subject fields, extensions) is ignored. `cn`, `ou` and `o` must each be 1 to 64
    /// of `A-Za-z0-9-_.`.
    pub fn issue_client_from_csr(
        &self,
        csr_pem: &str,
        cn: &str,
        ou: &str,
        o: &str,
    ) -> Result<IssuedCert, CertError> {
        check_name("common name", cn)?;
        check_name("organizational unit", ou)?;
        check_name("organization", o)?;
        // rcgen checks the signature; x509-parser reads the subject as the requester wrote it.
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(CertError::InvalidCsr)?;
        let found = csr_common_name(csr_pem)?;
        if found.as_deref() != Some(cn) {
            return Err(CertError::CsrCommonNameMismatch {
                expected: cn.to_owned(),
                found,
            });
        }
        let params = client_params(cn, ou, o)?;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(CertError::Generate)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
        })
    }

    fn issue_with_fresh_key(&self, params: &CertificateParams) -> Result<CertifiedKey, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CertError::Generate)?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(CertError::Generate)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
        })
    }
}

/// Parameters shared by every certificate the fleet makes: a random serial number and a
/// validity from a little before now for `validity`.
pub(crate) fn base_params(validity: Duration) -> Result<CertificateParams, CertError> {
    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// A client-auth end-entity certificate for subject CN/OU/O.
fn client_params(cn: &str, ou: &str, o: &str) -> Result<CertificateParams, CertError> {
    let mut params = base_params(CLIENT_VALIDITY)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params
        .distinguished_name
        .push(DnType::OrganizationalUnitName, ou);
    params.distinguished_name.push(DnType::OrganizationName, o);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// 16 random bytes from the system CSPRNG, positive and with a non-zero first byte so the
/// DER integer always has exactly 16 bytes (RFC 5280 allows up to 20).
fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

/// The subject CN of a PEM CSR, if it has one.
fn csr_common_name(csr_pem: &str) -> Result<Option<String>, CertError> {
    use x509_parser::prelude::FromDer;
    let invalid = || CertError::InvalidCsr(rcgen::Error::CouldNotParseCertificationRequest);
    let (_, pem) = x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|_| invalid())?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|_| invalid())?;
    let cn = csr
        .certification_request_info
        .subject
        .iter_common_name()
        .next()
        .map(|attr| attr.as_str().map(str::to_owned))
        .transpose()
        .map_err(|_| invalid())?;
    Ok(cn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inspect, inspect_pem, Fingerprint};

    fn csr_for(cn: &str) -> (String, KeyPair) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (csr, key)
    }

    #[test]
    fn ca_is_a_ten_year_ca() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(cert.is_ca());
        let usage = cert.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        let info = inspect(ca.cert_der()).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("fleetgate CA"));
        assert!(info.self_signed);
        assert!(info.not_after - info.not_before > Duration::days(3650));
    }

    #[test]
    fn ca_round_trips_through_pem_and_refuses_a_foreign_key() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let loaded = FleetCa::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_der(), ca.cert_der());
        let op = loaded.issue_operator("alice", "acme").unwrap();
        let (_, op_cert) = x509_parser::parse_x509_certificate(&op.cert_der).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
        assert!(op_cert.verify_signature(Some(ca_cert.public_key())).is_ok());
        assert_eq!(op_cert.issuer(), ca_cert.subject());

        let other = FleetCa::generate("other CA").unwrap();
        assert!(matches!(
            FleetCa::from_pem(ca.cert_pem(), &other.key_pem()),
            Err(CertError::CaKeyMismatch)
        ));
        let station = crate::self_signed_station("SN-1").unwrap();
        assert!(matches!(
            FleetCa::from_pem(&station.cert_pem, &station.key_pem),
            Err(CertError::NotACa)
        ));
    }

    #[test]
    fn operator_certificate_carries_name_unit_and_tenant() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let op = ca.issue_operator("alice", "acme").unwrap();
        let info = inspect(&op.cert_der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("alice"));
        assert_eq!(info.organizational_unit.as_deref(), Some("operator"));
        assert_eq!(info.organization.as_deref(), Some("acme"));
        assert!(!info.self_signed);
        assert!(info.not_after - info.not_before > Duration::days(2 * 365 - 1));
        let (_, cert) = x509_parser::parse_x509_certificate(&op.cert_der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(ca.issue_operator("a/b", "acme").is_err());
        assert!(ca.issue_operator("alice", "").is_err());
    }

    #[test]
    fn serial_numbers_are_random_and_readable() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let a = inspect(&ca.issue_operator("a", "t").unwrap().cert_der).unwrap();
        let b = inspect(&ca.issue_operator("a", "t").unwrap().cert_der).unwrap();
        assert_ne!(a.serial_number, b.serial_number);
        for serial in [&a.serial_number, &b.serial_number] {
            assert_eq!(serial.len(), 32);
            assert!(serial
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
        }
    }

    #[test]
    fn server_certificate_names_its_hosts() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let ips = ["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()];
        let server = ca
            .issue_server(&["localhost".into(), "fleet.example".into()], &ips)
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&server.cert_der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san.general_names.iter().map(|n| format!("{n:?}")).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert!(
            cert.extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .server_auth
        );
    }

    #[test]
    fn csr_is_issued_for_its_own_key_with_the_given_subject() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let (csr, key) = csr_for("0011aabbccdd");
        let issued = ca
            .issue_client_from_csr(&csr, "0011aabbccdd", "phone", "acme")
            .unwrap();
        let info = inspect(&issued.cert_der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("0011aabbccdd"));
        assert_eq!(info.organizational_unit.as_deref(), Some("phone"));
        assert_eq!(info.organization.as_deref(), Some("acme"));
        assert_eq!(
            info.fingerprint,
            Fingerprint::of_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&key))
        );
        assert_eq!(inspect_pem(&issued.cert_pem).unwrap(), info);
    }

    #[test]
    fn csr_with_another_common_name_is_refused() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let (csr, _) = csr_for("0011aabbccdd");
        let err = ca
            .issue_client_from_csr(&csr, "ffffffffffff", "phone", "acme")
            .unwrap_err();
        match err {
            CertError::CsrCommonNameMismatch { expected, found } => {
                assert_eq!(expected, "ffffffffffff");
                assert_eq!(found.as_deref(), Some("0011aabbccdd"));
            }
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn csr_with_a_broken_signature_is_refused() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let (csr, _) = csr_for("0011aabbccdd");
        // The last base64 line encodes the end of the signature; change one character of it.
        let mut lines: Vec<String> = csr.lines().map(str::to_owned).collect();
        let last_body = lines.len() - 2;
        let replacement = if lines[last_body].starts_with('A') {
            "B"
        } else {
            "A"
        };
        lines[last_body].replace_range(0..1, replacement);
        let tampered = lines.join("\n");
        assert!(matches!(
            ca.issue_client_from_csr(&tampered, "0011aabbccdd", "phone", "acme"),
            Err(CertError::InvalidCsr(_))
        ));
        assert!(matches!(
            ca.issue_client_from_csr("not a csr", "0011aabbccdd", "phone", "acme"),
            Err(CertError::InvalidCsr(_))
        ));
    }
}
