//! Errors of certificate generation, parsing and storage.

use std::path::PathBuf;

/// What went wrong while making, reading or storing a certificate or key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen could not generate a key pair or sign a certificate.
    #[error("cannot generate certificate: {0}")]
    Generate(#[source] rcgen::Error),
    /// A private key in PEM could not be read (it must be PKCS#8 "PRIVATE KEY").
    #[error("invalid private key: {0}")]
    InvalidKey(#[source] rcgen::Error),
    /// A certificate could not be parsed.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    /// A PEM text held no `CERTIFICATE` block.
    #[error("no CERTIFICATE block in PEM")]
    NoCertificate,
    /// A PEM text held no private key block.
    #[error("no private key block in PEM")]
    NoPrivateKey,
    /// A PEM text could not be read.
    #[error("invalid PEM: {0}")]
    Pem(#[source] std::io::Error),
    /// The CA certificate is not a CA (no basic constraints CA:TRUE).
    #[error("certificate is not a CA certificate")]
    NotACa,
    /// The CA key does not belong to the CA certificate.
    #[error("CA key does not match the CA certificate")]
    CaKeyMismatch,
    /// A certificate signing request could not be parsed, or its signature is wrong.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(#[source] rcgen::Error),
    /// The common name in a certificate signing request is not the expected one.
    #[error("CSR common name {found:?} is not the expected {expected:?}")]
    CsrCommonNameMismatch {
        /// The common name the caller expected.
        expected: String,
        /// The common name in the request, if any.
        found: Option<String>,
    },
    /// A name for a certificate subject or file is not acceptable.
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidName {
        /// What the name is for ("operator name", "tenant", …).
        what: &'static str,
        /// The refused value.
        value: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An operator of this name was issued in this tenant before (revoked or not).
    #[error("operator {name:?} of tenant {tenant:?} was issued already; a name is not issued twice (revoke it and choose another name)")]
    OperatorExists {
        /// The tenant.
        tenant: String,
        /// The operator's name.
        name: String,
    },
    /// A file that would be written exists already and is not replaced.
    #[error("{} exists already; it is not overwritten (choose another name or another --out directory)", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The data directory holds one file of a pair but not the other.
    #[error("{} exists but {} is missing; restore it or remove both", present.display(), missing.display())]
    IncompleteDataDir {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
}
