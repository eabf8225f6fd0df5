//! The TLS side of the front door: one rustls `ServerConfig` built at start (ring provider),
//! and the client-certificate policy: a certificate that chains to the fleet CA or a configured
//! manufacturer CA, or a valid self-signed one (a station's own key pair).
//!
//! rustls does not run the verifier on resumed sessions, so the same policy is applied again by
//! [`ClientPolicy::classify`] on the peer certificate after every handshake.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::ring::Ticketer;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerSessionMemoryCache, WebPkiClientVerifier};
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use x509_parser::certificate::X509CertificateParser;
use x509_parser::nom::Parser;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::admission::Trust;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("a CA certificate is not usable as a trust anchor: {0}")]
    BadAnchor(String),
    #[error("the client verifier could not be built: {0}")]
    Verifier(String),
    #[error("the server certificate or key is not usable: {0}")]
    ServerCertificate(#[from] rustls::Error),
}

/// Who may present which client certificate.
pub struct ClientPolicy {
    fleet: Arc<dyn ClientCertVerifier>,
    manufacturer: Option<Arc<dyn ClientCertVerifier>>,
    allow_self_signed: bool,
    algorithms: WebPkiSupportedAlgorithms,
    hints: Vec<DistinguishedName>,
    /// Verdicts of this policy's verifier, by SHA-256 of the chain, with the period in which
    /// every certificate of the chain is valid. See [`ClientPolicy::classify_after_handshake`].
    verdicts: std::sync::Mutex<std::collections::HashMap<[u8; 32], Verdict>>,
}

/// A chain this policy accepted, and when it may be relied on.
#[derive(Debug, Clone, Copy)]
struct Verdict {
    trust: Trust,
    /// Latest `notBefore` and earliest `notAfter` of the chain's certificates (Unix seconds).
    valid_from: i64,
    valid_until: i64,
}

/// Verdicts kept at most (about 80 bytes each); when full, they are all dropped and chains are
/// verified again as they come.
const MAX_VERDICTS: usize = 50_000;

/// The key of a chain in `verdicts`: SHA-256 over every certificate with its length.
fn chain_key(chain: &[CertificateDer<'_>]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for cert in chain {
        hasher.update(u32::try_from(cert.len()).unwrap_or(u32::MAX).to_be_bytes());
        hasher.update(cert);
    }
    hasher.finalize().into()
}

/// The period in which every certificate of the chain is valid; `None` if one does not parse.
fn validity(chain: &[CertificateDer<'_>]) -> Option<(i64, i64)> {
    let mut from = i64::MIN;
    let mut until = i64::MAX;
    // The chain has just been verified; only the validity is read, so the extensions are not
    // parsed (about half of x509-parser's work on a station's certificate).
    let mut parser = X509CertificateParser::new().with_deep_parse_extensions(false);
    for cert in chain {
        let (_, parsed) = parser.parse(cert).ok()?;
        from = from.max(parsed.validity().not_before.timestamp());
        until = until.min(parsed.validity().not_after.timestamp());
    }
    Some((from, until))
}

impl fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientPolicy")
            .field("manufacturer", &self.manufacturer.is_some())
            .field("allow_self_signed", &self.allow_self_signed)
            .finish()
    }
}

fn verifier(
    anchors: &[CertificateDer<'static>],
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsSetupError> {
    let mut roots = RootCertStore::empty();
    for anchor in anchors {
        roots
            .add(anchor.clone())
            .map_err(|e| TlsSetupError::BadAnchor(e.to_string()))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsSetupError::Verifier(e.to_string()))
}

impl ClientPolicy {
    pub fn new(
        fleet_ca: &[CertificateDer<'static>],
        manufacturer_cas: &[CertificateDer<'static>],
        allow_self_signed: bool,
        provider: &Arc<CryptoProvider>,
    ) -> Result<Self, TlsSetupError> {
        let fleet = verifier(fleet_ca, provider)?;
        let manufacturer = if manufacturer_cas.is_empty() {
            None
        } else {
            Some(verifier(manufacturer_cas, provider)?)
        };
        let mut hints = fleet.root_hint_subjects().to_vec();
        if let Some(m) = &manufacturer {
            hints.extend_from_slice(m.root_hint_subjects());
        }
        Ok(ClientPolicy {
            fleet,
            manufacturer,
            allow_self_signed,
            algorithms: provider.signature_verification_algorithms,
            hints,
            verdicts: Default::default(),
        })
    }

    /// The policy applied to the peer's chain once its handshake is done, resumed handshakes
    /// included (they skip the verifier).
    ///
    /// Every chain this policy's verifier accepted is remembered (by SHA-256) with the period
    /// in which all its certificates are valid. A chain found there, checked against `now`, is
    /// not verified again: the policy is fixed for the life of the process, and a resumed
    /// session's chain comes from a ticket that only this process can have issued (stateless
    /// tickets under a key of this process), after this verifier accepted that very chain. So a
    /// full handshake costs one chain verification instead of two, and a resumed one none. A
    /// chain not found there is classified in full.
    pub fn classify_after_handshake(
        &self,
        chain: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<Trust, String> {
        let kept = self
            .verdicts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&chain_key(chain))
            .copied();
        let secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        match kept {
            Some(v) if v.valid_from <= secs && secs <= v.valid_until => Ok(v.trust),
            Some(_) => Err("the certificate is outside its validity period".into()),
            None => self.classify(chain, now),
        }
    }

    fn remember(&self, chain: &[CertificateDer<'_>], trust: Trust) {
        let Some((valid_from, valid_until)) = validity(chain) else {
            return;
        };
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|e| e.into_inner());
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(
            chain_key(chain),
            Verdict {
                trust,
                valid_from,
                valid_until,
            },
        );
    }

    /// Applies the policy to a presented chain (leaf first). Run after every handshake, resumed
    /// ones included.
    pub fn classify(&self, chain: &[CertificateDer<'_>], now: UnixTime) -> Result<Trust, String> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err("no certificate".into());
        };
        if self
            .fleet
            .verify_client_cert(leaf, intermediates, now)
            .is_ok()
        {
            return Ok(Trust::FleetCa);
        }
        if let Some(m) = &self.manufacturer {
            if m.verify_client_cert(leaf, intermediates, now).is_ok() {
                return Ok(Trust::ManufacturerCa);
            }
        }
        if self.allow_self_signed {
            check_self_signed(leaf, now)?;
            return Ok(Trust::SelfSigned);
        }
        Err("the certificate chains to no trusted CA".into())
    }
}

/// A self-signed certificate is acceptable when its issuer is its subject, its signature
/// verifies under its own key, and it is within its validity period.
fn check_self_signed(der: &CertificateDer<'_>, now: UnixTime) -> Result<(), String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("unparseable certificate: {e}"))?;
    if cert.subject() != cert.issuer() {
        return Err("the certificate chains to no trusted CA and is not self-signed".into());
    }
    cert.verify_signature(None)
        .map_err(|_| "the self-signed certificate's signature is invalid".to_string())?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = cert.validity();
    if now < validity.not_before.timestamp() || now > validity.not_after.timestamp() {
        return Err("the certificate is outside its validity period".into());
    }
    Ok(())
}

impl ClientCertVerifier for ClientPolicy {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.hints
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let mut chain = Vec::with_capacity(1 + intermediates.len());
        chain.push(end_entity.clone());
        chain.extend(intermediates.iter().cloned());
        match self.classify(&chain, now) {
            Ok(trust) => {
                self.remember(&chain, trust);
                Ok(ClientCertVerified::assertion())
            }
            Err(reason) => Err(rustls::Error::General(reason)),
        }
    }

    fn client_auth_mandatory(&self) -> bool {
        // Legacy stations and unprovisioned phones present no certificate.
        false
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Tickets sent after each full or resumed TLS 1.3 handshake (rustls sends 2 by default).
///
/// A station holds one connection at a time and gets a fresh ticket on every connection, so
/// one is all it ever uses; each ticket is sealed over the client's whole certificate chain,
/// so a second one costs a seal and a record per connection for nothing.
pub const TLS13_TICKETS: usize = 1;

/// Builds the listener's `ServerConfig` once: TLS 1.3 and 1.2, ring, session resumption on.
///
/// Resumption is stateless: TLS 1.3 clients, and TLS 1.2 clients that offer the session-ticket
/// extension, get tickets sealed under the process's own rotating key (ring's [`Ticketer`]:
/// ChaCha20-Poly1305, a new random key every 6 hours, the previous one kept, so a ticket
/// resumes for 6 to 12 hours). The server keeps nothing per device, so every station of a site
/// can resume after a power cut, however many there are; a restart of fleetd invalidates all
/// tickets (full handshakes, as with an in-memory cache). A ticket carries the client's
/// certificate chain, which is what [`ClientPolicy::classify`] checks again after a resumed
/// handshake. Stateless tickets can be presented more than once; that is harmless because early
/// data stays off (rustls refuses it with a ticketer) and every resumption still does a fresh
/// (EC)DHE exchange. Only TLS 1.2 clients without ticket support use the session-ID cache of
/// `session_cache` entries.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    policy: Arc<ClientPolicy>,
    provider: Arc<CryptoProvider>,
    session_cache: usize,
) -> Result<ServerConfig, TlsSetupError> {
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(policy)
        .with_single_cert(chain, key)?;
    config.ticketer = Ticketer::new()?;
    config.send_tls13_tickets = TLS13_TICKETS;
    config.session_storage = ServerSessionMemoryCache::new(session_cache);
    Ok(config)
}

/// The crypto provider used everywhere in fleetd.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority of the tests' own, issuing leaf certificates.
#[cfg(test)]
pub(crate) mod test_pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

    pub(crate) struct Pki {
        pub(crate) ca: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    }

    impl Pki {
        pub(crate) fn new() -> Pki {
            let key = KeyPair::generate().expect("CA key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let ca = params.self_signed(&key).expect("CA certificate");
            Pki {
                ca: ca.der().clone(),
                issuer: Issuer::new(params, key),
            }
        }

        pub(crate) fn issue(
            &self,
            name: &str,
        ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
            let key = KeyPair::generate().expect("key");
            let cert = CertificateParams::new(vec![name.to_owned()])
                .expect("params")
                .signed_by(&key, &self.issuer)
                .expect("certificate");
            let key = PrivatePkcs8KeyDer::from(key.serialize_der());
            (vec![cert.der().clone()], key.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_pki::Pki;
    use super::*;
    use rustls::{ClientConfig, ClientConnection, HandshakeKind, ServerConnection};

    /// Moves TLS records both ways until neither side has anything to send (the server's
    /// tickets come after the handshake).
    fn exchange(client: &mut ClientConnection, server: &mut ServerConnection) {
        loop {
            let mut moved = false;
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client writes");
            }
            if !wire.is_empty() {
                moved = true;
                server.read_tls(&mut wire.as_slice()).expect("server reads");
                server.process_new_packets().expect("server handshake");
            }
            wire.clear();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("server writes");
            }
            if !wire.is_empty() {
                moved = true;
                client.read_tls(&mut wire.as_slice()).expect("client reads");
                client.process_new_packets().expect("client handshake");
            }
            if !moved {
                return;
            }
        }
    }

    #[test]
    fn verdicts_are_reused_only_for_the_same_chain_and_within_its_validity() {
        let pki = Pki::new();
        let other = Pki::new();
        let provider = provider();
        let policy = ClientPolicy::new(std::slice::from_ref(&pki.ca), &[], false, &provider)
            .expect("policy");
        let (chain, _) = pki.issue("c1");
        let now = UnixTime::now();
        policy
            .verify_client_cert(&chain[0], &chain[1..], now)
            .expect("verified");
        assert_eq!(policy.verdicts.lock().unwrap().len(), 1);
        // The same chain, again and again (a full handshake's check, then resumptions).
        for _ in 0..3 {
            assert_eq!(
                policy.classify_after_handshake(&chain, now),
                Ok(Trust::FleetCa)
            );
        }
        // An unknown chain is classified in full: an untrusted one is refused.
        let (stranger, _) = other.issue("c2");
        assert!(policy.classify_after_handshake(&stranger, now).is_err());
        // A remembered chain past its validity is refused (rcgen certificates end in 4096).
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(4_200_000_000 * 30));
        assert!(policy.classify_after_handshake(&chain, later).is_err());
        let before = UnixTime::since_unix_epoch(std::time::Duration::from_secs(0));
        assert!(policy.classify_after_handshake(&chain, before).is_err());
    }

    #[test]
    fn more_clients_resume_than_the_session_cache_holds_round_after_round() {
        let provider = provider();
        let pki = Pki::new();
        let policy = Arc::new(
            ClientPolicy::new(std::slice::from_ref(&pki.ca), &[], false, &provider)
                .expect("policy"),
        );
        let (chain, key) = pki.issue("localhost");
        // One cache entry: a stateful cache could resume one of the clients below at most.
        let server = Arc::new(
            server_config(chain, key, policy, provider.clone(), 1).expect("server config"),
        );
        assert!(server.ticketer.enabled());

        let mut roots = RootCertStore::empty();
        roots.add(pki.ca.clone()).expect("root");
        let clients: Vec<Arc<ClientConfig>> = (0..4)
            .map(|i| {
                let (chain, key) = pki.issue(&format!("client-{i}"));
                let config = ClientConfig::builder_with_provider(provider.clone())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .expect("TLS 1.3")
                    .with_root_certificates(roots.clone())
                    .with_client_auth_cert(chain, key)
                    .expect("client config");
                Arc::new(config)
            })
            .collect();
        let handshake = |config: &Arc<ClientConfig>| {
            let name = "localhost".try_into().expect("server name");
            let mut client = ClientConnection::new(config.clone(), name).expect("client");
            let mut server_side = ServerConnection::new(server.clone()).expect("server");
            exchange(&mut client, &mut server_side);
            assert!(!server_side.is_handshaking());
            let presented = server_side
                .peer_certificates()
                .map(|chain| chain.to_vec())
                .unwrap_or_default();
            (server_side.handshake_kind(), presented)
        };

        let mut first = Vec::new();
        for config in &clients {
            let (kind, presented) = handshake(config);
            assert_eq!(kind, Some(HandshakeKind::Full));
            first.push(presented);
        }
        // Round after round: with one ticket a handshake (`TLS13_TICKETS`), each resumption
        // must hand the client the ticket for its next one.
        for _round in 0..3 {
            for (config, presented) in clients.iter().zip(&first) {
                let (kind, resumed_chain) = handshake(config);
                assert_eq!(kind, Some(HandshakeKind::Resumed));
                // The chain the policy checks again after a resumption is the client's own.
                assert_eq!(&resumed_chain, presented);
                assert!(!resumed_chain.is_empty());
            }
        }
    }
}
