//! PEM and rustls helpers; rustls always runs on the ring provider here.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::error::CertError;

/// The one crypto provider of the fleet: ring.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every `CERTIFICATE` block of a PEM text, in order; at least one.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(CertError::Pem)?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate);
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) of a PEM text.
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(CertError::Pem)?
        .ok_or(CertError::NoPrivateKey)
}

/// A rustls client configuration on ring, TLS 1.3 and 1.2, that trusts only the CA
/// certificates in `ca_pem`, and presents `identity` (certificate PEM, key PEM) if given.
pub fn client_config(
    ca_pem: &str,
    identity: Option<(&str, &str)>,
) -> Result<ClientConfig, CertError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(ca_pem)? {
        roots.add(cert)?;
    }
    let builder = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert_pem, key_pem)) => {
            builder.with_client_auth_cert(certs_from_pem(cert_pem)?, key_from_pem(key_pem)?)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

/// Splits a server address `HOST:PORT` or `[v6]:PORT` for the clients: HOST is also the TLS
/// server name that [`client_config`] verifies the server certificate against.
pub fn split_server(server: &str) -> Option<(String, u16)> {
    let (host, port) = server.rsplit_once(':')?;
    let port = port.parse().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port))
}

#[cfg(test)]
mod tests {

    #[test]
    fn server_addresses_split_into_host_and_port() {
        assert_eq!(
            super::split_server("127.0.0.1:8883"),
            Some(("127.0.0.1".into(), 8883))
        );
        assert_eq!(super::split_server("[::1]:1"), Some(("::1".into(), 1)));
        assert_eq!(
            super::split_server("localhost:99"),
            Some(("localhost".into(), 99))
        );
        assert_eq!(super::split_server("localhost"), None);
        assert_eq!(super::split_server(":80"), None);
        assert_eq!(super::split_server("h:notaport"), None);
    }
    use super::*;
    use crate::FleetCa;
    use rustls::pki_types::ServerName;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConnection, ServerConfig, ServerConnection};

    /// Runs a TLS handshake in memory; returns the protocol version agreed and the client
    /// certificate the server saw.
    fn handshake(
        client: ClientConfig,
        server: ServerConfig,
        name: &str,
    ) -> Result<Option<Vec<u8>>, rustls::Error> {
        let mut client = ClientConnection::new(
            Arc::new(client),
            ServerName::try_from(name.to_owned()).unwrap(),
        )?;
        let mut server = ServerConnection::new(Arc::new(server))?;
        for _ in 0..10 {
            let mut buf = Vec::new();
            client.write_tls(&mut buf).unwrap();
            server.read_tls(&mut buf.as_slice()).unwrap();
            server.process_new_packets()?;
            let mut buf = Vec::new();
            server.write_tls(&mut buf).unwrap();
            client.read_tls(&mut buf.as_slice()).unwrap();
            client.process_new_packets()?;
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(server
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| c.to_vec()));
            }
        }
        panic!("handshake did not finish");
    }

    fn server_config(ca: &FleetCa, optional_client_auth: bool) -> ServerConfig {
        let server = ca
            .issue_server(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots
            .add(certs_from_pem(ca.cert_pem()).unwrap().remove(0))
            .unwrap();
        let builder = ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap();
        let builder = if optional_client_auth {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
                    .allow_unauthenticated()
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        builder
            .with_single_cert(
                certs_from_pem(&server.cert_pem).unwrap(),
                key_from_pem(&server.key_pem).unwrap(),
            )
            .unwrap()
    }

    #[test]
    fn client_config_builds_with_and_without_identity() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let op = ca.issue_operator("admin", "default").unwrap();
        let config = client_config(ca.cert_pem(), Some((&op.cert_pem, &op.key_pem))).unwrap();
        assert!(config.client_auth_cert_resolver.has_certs());
        let anonymous = client_config(ca.cert_pem(), None).unwrap();
        assert!(!anonymous.client_auth_cert_resolver.has_certs());
        assert!(matches!(
            client_config("nothing here", None),
            Err(CertError::NoCertificate)
        ));
        assert!(matches!(
            client_config(ca.cert_pem(), Some((&op.cert_pem, "no key"))),
            Err(CertError::NoPrivateKey)
        ));
    }

    #[test]
    fn operator_connects_to_the_fleet_server_with_its_certificate() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let op = ca.issue_operator("admin", "default").unwrap();
        let client = client_config(ca.cert_pem(), Some((&op.cert_pem, &op.key_pem))).unwrap();
        let seen = handshake(client, server_config(&ca, true), "localhost").unwrap();
        assert_eq!(seen, Some(op.cert_der.clone()));
        let client = client_config(ca.cert_pem(), None).unwrap();
        let seen = handshake(client, server_config(&ca, true), "127.0.0.1").unwrap();
        assert_eq!(seen, None);
    }

    #[test]
    fn a_server_from_another_ca_is_not_trusted() {
        let ca = FleetCa::generate("fleetgate CA").unwrap();
        let other = FleetCa::generate("fleetgate CA").unwrap();
        let client = client_config(other.cert_pem(), None).unwrap();
        assert!(handshake(client, server_config(&ca, false), "localhost").is_err());
    }
}
