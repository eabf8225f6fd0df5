//! The data directory of `fleetd`: the fleet CA, the server certificate and the first operator
//! certificate, created on first start and reused later (PROTOCOL §8).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use time::{Duration, OffsetDateTime};
use x509_parser::extensions::GeneralName;

use crate::ca::{CertifiedKey, FleetCa};
use crate::error::CertError;
use crate::operators::OperatorRegistry;
use crate::{check_name, Fingerprint};

/// File name of the fleet CA certificate.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the fleet CA private key (owner-only).
pub const CA_KEY_FILE: &str = "ca.key";
/// File name of the server certificate.
pub const SERVER_CERT_FILE: &str = "server.pem";
/// File name of the server private key (owner-only).
pub const SERVER_KEY_FILE: &str = "server.key";
/// Name of the operator created on first start.
pub const ADMIN_OPERATOR: &str = "admin";
/// Tenant of the operator created on first start.
pub const DEFAULT_TENANT: &str = "default";
/// Subject CN of the fleet CA made on first start.
pub const CA_COMMON_NAME: &str = "fleetgate CA";

/// A server certificate this close to its end is renewed on start.
const SERVER_RENEW_BEFORE: Duration = Duration::days(30);
/// Mode of files only the owner may read: private keys.
const SECRET_MODE: u32 = 0o600;
/// Mode of certificates, which are public.
const PUBLIC_MODE: u32 = 0o644;
/// Mode of the data directory.
const DIR_MODE: u32 = 0o700;

/// The certificates of a data directory, ready to use.
#[derive(Debug)]
pub struct FleetFiles {
    /// The data directory.
    pub dir: PathBuf,
    /// The fleet CA.
    pub ca: FleetCa,
    /// The server certificate and key.
    pub server: CertifiedKey,
    /// `DIR/ca.pem`.
    pub ca_pem_path: PathBuf,
    /// `DIR/server.pem`.
    pub server_cert_path: PathBuf,
    /// `DIR/server.key`.
    pub server_key_path: PathBuf,
    /// `DIR/admin.pem`.
    pub admin_cert_path: PathBuf,
    /// `DIR/admin.key`.
    pub admin_key_path: PathBuf,
}

/// Makes sure `dir` holds the fleet CA, a server certificate and the `admin` operator
/// certificate, creating what is missing.
///
/// On first start the directory is created (mode 0700) with `ca.pem`, `ca.key`, `server.pem`,
/// `server.key`, `admin.pem` and `admin.key`; keys are mode 0600. Later starts load the CA.
/// The server certificate is issued again when it is missing, unreadable, not from this CA,
/// within 30 days of its end, or does not name `localhost`, `127.0.0.1`, `::1`, the host name
/// and every one of `extra_names` (an extra name that is an IP address goes into the IP SANs).
/// The admin certificate is issued again only when one of its files is missing.
/// Every file is written atomically (temporary file, then rename).
pub fn ensure(dir: &Path, extra_names: &[String]) -> Result<FleetFiles, CertError> {
    create_dir(dir)?;
    let ca_pem_path = dir.join(CA_CERT_FILE);
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca = match (ca_pem_path.exists(), ca_key_path.exists()) {
        (true, true) => load_ca(dir)?,
        (false, false) => {
            let ca = FleetCa::generate(CA_COMMON_NAME)?;
            // Key first: a crash in between leaves a key without a certificate, which
            // `IncompleteDataDir` reports, never a certificate nobody can sign with.
            write_atomic(&ca_key_path, ca.key_pem().as_bytes(), SECRET_MODE)?;
            write_atomic(&ca_pem_path, ca.cert_pem().as_bytes(), PUBLIC_MODE)?;
            ca
        }
        (true, false) => return Err(incomplete(&ca_pem_path, &ca_key_path)),
        (false, true) => return Err(incomplete(&ca_key_path, &ca_pem_path)),
    };

    let (dns_names, ips) = server_names(extra_names);
    let server_cert_path = dir.join(SERVER_CERT_FILE);
    let server_key_path = dir.join(SERVER_KEY_FILE);
    let existing = read_pair(&server_cert_path, &server_key_path)?
        .filter(|server| server_cert_fits(server, &ca, &dns_names, &ips));
    let server = match existing {
        Some(server) => server,
        None => {
            let server = ca.issue_server(&dns_names, &ips)?;
            write_atomic(&server_key_path, server.key_pem.as_bytes(), SECRET_MODE)?;
            write_atomic(&server_cert_path, server.cert_pem.as_bytes(), PUBLIC_MODE)?;
            server
        }
    };

    let registry = OperatorRegistry::new(dir);
    if !registry.exists() {
        // A data directory made before the registry: its operator certificates were issued
        // by this host, so they are the registry's first entries.
        register_existing_operators(dir, &ca, &registry)?;
    }
    let admin_cert_path = dir.join(format!("{ADMIN_OPERATOR}.pem"));
    let admin_key_path = dir.join(format!("{ADMIN_OPERATOR}.key"));
    let admin_record = registry.get(DEFAULT_TENANT, ADMIN_OPERATOR)?;
    let admin_missing = !admin_cert_path.exists() || !admin_key_path.exists();
    match admin_record {
        None => {
            // First start (or an admin never registered): issue it unless its files are
            // there, and register it.
            let cert_pem = if admin_missing {
                let admin = ca.issue_operator(ADMIN_OPERATOR, DEFAULT_TENANT)?;
                write_atomic(&admin_key_path, admin.key_pem.as_bytes(), SECRET_MODE)?;
                write_atomic(&admin_cert_path, admin.cert_pem.as_bytes(), PUBLIC_MODE)?;
                admin.cert_pem
            } else {
                read_text(&admin_cert_path)?
            };
            registry.register_pem(&cert_pem, OffsetDateTime::now_utc())?;
        }
        // Its files were deleted on the host: issue it again, and the old certificate is void.
        Some(record) if admin_missing && record.revoked_at.is_none() => {
            let admin = ca.issue_operator(ADMIN_OPERATOR, DEFAULT_TENANT)?;
            let info = crate::inspect_pem(&admin.cert_pem)?;
            write_atomic(&admin_key_path, admin.key_pem.as_bytes(), SECRET_MODE)?;
            write_atomic(&admin_cert_path, admin.cert_pem.as_bytes(), PUBLIC_MODE)?;
            registry.replace_certificate(
                DEFAULT_TENANT,
                ADMIN_OPERATOR,
                &info.serial_number,
                info.fingerprint,
                OffsetDateTime::now_utc(),
            )?;
        }
        // Present, or revoked: a revoked admin is not brought back by a restart.
        Some(_) => {}
    }

    Ok(FleetFiles {
        dir: dir.to_path_buf(),
        ca,
        server,
        ca_pem_path,
        server_cert_path,
        server_key_path,
        admin_cert_path,
        admin_key_path,
    })
}

/// Loads the fleet CA from `DIR/ca.pem` and `DIR/ca.key`.
pub fn load_ca(dir: &Path) -> Result<FleetCa, CertError> {
    let cert = read_text(&dir.join(CA_CERT_FILE))?;
    let key = read_text(&dir.join(CA_KEY_FILE))?;
    FleetCa::from_pem(&cert, &key)
}

/// Issues a further operator certificate with the CA in `dir`, registers it in the operator
/// registry ([`OperatorRegistry`]) and writes `OUT/NAME.pem` and `OUT/NAME.key` (0600), `OUT`
/// being `dir` unless given. Returns the paths of the certificate and the key.
///
/// Nothing is ever overwritten: if either file exists, or the name was issued in this tenant
/// before (even if revoked since), nothing is issued and the error says so. Two tenants may
/// each have an operator of the same name; their files then need different `out` folders.
///
/// `name` and `tenant` must be 1 to 64 of `A-Za-z0-9-_.`; `name` may not start with `.` nor
/// be `ca` or `server` in any case (their files belong to the CA and the server).
pub fn issue_operator_files(
    dir: &Path,
    name: &str,
    tenant: &str,
) -> Result<(PathBuf, PathBuf), CertError> {
    issue_operator_files_into(dir, name, tenant, dir)
}

/// [`issue_operator_files`] with the files written into `out`.
pub fn issue_operator_files_into(
    dir: &Path,
    name: &str,
    tenant: &str,
    out: &Path,
) -> Result<(PathBuf, PathBuf), CertError> {
    check_name("operator name", name)?;
    check_name("tenant", tenant)?;
    let reserved = ["ca", "server"]
        .iter()
        .any(|r| name.eq_ignore_ascii_case(r));
    if reserved || name.starts_with('.') || tenant.starts_with('.') {
        return Err(CertError::InvalidName {
            what: "operator name",
            value: name.to_owned(),
            reason: "is reserved for the files of the CA or the server",
        });
    }
    let ca = load_ca(dir)?;
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            return Err(CertError::Exists { path: path.clone() });
        }
    }
    let registry = OperatorRegistry::new(dir);
    if registry.get(tenant, name)?.is_some() {
        return Err(CertError::OperatorExists {
            tenant: tenant.to_owned(),
            name: name.to_owned(),
        });
    }
    let operator = ca.issue_operator(name, tenant)?;
    // The registry claims the name first (create_new): of two concurrent issues, one fails.
    registry.register_pem(&operator.cert_pem, OffsetDateTime::now_utc())?;
    let written = create_dir(out)
        .and_then(|()| write_new(&key_path, operator.key_pem.as_bytes(), SECRET_MODE))
        .and_then(|()| write_new(&cert_path, operator.cert_pem.as_bytes(), PUBLIC_MODE));
    if let Err(e) = written {
        // Nobody has this key: the name is free again, and no half-written file stays.
        let _ = fs::remove_file(&key_path);
        let _ = registry.unregister(tenant, name);
        return Err(e);
    }
    Ok((cert_path, key_path))
}

/// Registers the operator certificates found in a data directory made before the registry.
fn register_existing_operators(
    dir: &Path,
    ca: &FleetCa,
    registry: &OperatorRegistry,
) -> Result<(), CertError> {
    let Ok((_, ca_cert)) = x509_parser::parse_x509_certificate(ca.cert_der()) else {
        return Ok(());
    };
    let entries = fs::read_dir(dir).map_err(|source| io_error(dir, source))?;
    let now = OffsetDateTime::now_utc();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "pem") {
            continue;
        }
        let Ok(Some(pem)) = read_optional(&path) else {
            continue;
        };
        let Some(der) = crate::certs_from_pem(&pem)
            .ok()
            .and_then(|c| c.into_iter().next())
        else {
            continue;
        };
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        let is_operator = crate::inspect(&der)
            .is_ok_and(|i| i.organizational_unit.as_deref() == Some("operator"));
        if is_operator && cert.verify_signature(Some(ca_cert.public_key())).is_ok() {
            match registry.register_pem(&pem, now) {
                Ok(_) | Err(CertError::OperatorExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    registry.mark_migrated()
}

/// Opens a file that must not exist yet, with `mode` (owner-only for keys).
pub(crate) fn open_new(path: &Path, mode: u32) -> io::Result<fs::File> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    options.open(path)
}

/// Writes a file that must not exist yet.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let mut file = open_new(path, mode).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => CertError::Exists {
            path: path.to_path_buf(),
        },
        _ => io_error(path, source),
    })?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(|source| io_error(path, source))
}

fn incomplete(present: &Path, missing: &Path) -> CertError {
    CertError::IncompleteDataDir {
        present: present.to_path_buf(),
        missing: missing.to_path_buf(),
    }
}

/// The names the server certificate must carry: the loopback names, the host name and the
/// configured extra names, without duplicates, DNS names in order of first appearance.
fn server_names(extra_names: &[String]) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns_names = vec!["localhost".to_owned()];
    let mut ips: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([0u16, 0, 0, 0, 0, 0, 0, 1]),
    ];
    let candidates = host_name().into_iter().chain(extra_names.iter().cloned());
    for name in candidates {
        let name = name.trim().to_owned();
        if name.is_empty() {
            continue;
        }
        match name.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !dns_names.iter().any(|n| n.eq_ignore_ascii_case(&name)) => {
                dns_names.push(name)
            }
            Err(_) => {}
        }
    }
    (dns_names, ips)
}

/// The kernel's host name, when it is readable and a plausible DNS name.
fn host_name() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    let plausible = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    plausible.then(|| name.to_owned())
}

/// Whether an existing server certificate can be kept: issued by `ca`, matching its key,
/// not about to end, and naming everything wanted.
fn server_cert_fits(
    server: &CertifiedKey,
    ca: &FleetCa,
    dns_names: &[String],
    ips: &[IpAddr],
) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&server.cert_der) else {
        return false;
    };
    let Ok((_, ca_cert)) = x509_parser::parse_x509_certificate(ca.cert_der()) else {
        return false;
    };
    if cert.verify_signature(Some(ca_cert.public_key())).is_err() {
        return false;
    }
    let key_matches = rcgen::KeyPair::from_pem(&server.key_pem)
        .map(|key| {
            Fingerprint::of_spki_der(&rcgen::PublicKeyData::subject_public_key_info(&key))
                == Fingerprint::of_spki_der(cert.public_key().raw)
        })
        .unwrap_or(false);
    if !key_matches {
        return false;
    }
    let now = OffsetDateTime::now_utc();
    let validity = cert.validity();
    if validity.not_before.to_datetime() > now
        || validity.not_after.to_datetime() < now + SERVER_RENEW_BEFORE
    {
        return false;
    }
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return false;
    };
    let mut have_dns = BTreeSet::new();
    let mut have_ips = BTreeSet::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(dns) => {
                have_dns.insert(dns.to_ascii_lowercase());
            }
            GeneralName::IPAddress(bytes) => {
                let ip = match bytes.len() {
                    4 => <[u8; 4]>::try_from(*bytes).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(*bytes).ok().map(IpAddr::from),
                    _ => None,
                };
                have_ips.extend(ip);
            }
            _ => {}
        }
    }
    dns_names
        .iter()
        .all(|n| have_dns.contains(&n.to_ascii_lowercase()))
        && ips.iter().all(|ip| have_ips.contains(ip))
}

/// Reads a certificate and key pair of files; `None` if either is missing or unreadable as
/// PEM, so that the caller issues a new pair.
fn read_pair(cert_path: &Path, key_path: &Path) -> Result<Option<CertifiedKey>, CertError> {
    let (Some(cert_pem), Some(key_pem)) = (read_optional(cert_path)?, read_optional(key_path)?)
    else {
        return Ok(None);
    };
    let Some(cert_der) = crate::certs_from_pem(&cert_pem)
        .ok()
        .and_then(|certs| certs.into_iter().next())
    else {
        return Ok(None);
    };
    Ok(Some(CertifiedKey {
        cert_pem,
        key_pem,
        cert_der: cert_der.to_vec(),
    }))
}

fn read_optional(path: &Path) -> Result<Option<String>, CertError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io_error(path, source)),
    }
}

fn read_text(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: io::Error) -> CertError {
    CertError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, DIR_MODE);
    builder.create(dir).map_err(|source| io_error(dir, source))
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename,
/// so that readers see the old file or the whole new one, never a part.
pub(crate) fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let parent = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = parent.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        // A leftover from a crashed run of this process id would make create_new fail.
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut file = open_new(&tmp, mode)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)?;
        // Make the rename itself durable; not every platform can sync a directory.
        if let Ok(dir) = fs::File::open(parent) {
            let _ = dir.sync_all();
        }
        Ok(())
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        io_error(path, source)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect_pem;

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn first_start_creates_everything_and_later_starts_reuse_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fleet-data");
        let first = ensure(&dir, &["fleet.example".into(), "192.0.2.7".into()]).unwrap();
        for file in [
            "ca.pem",
            "ca.key",
            "server.pem",
            "server.key",
            "admin.pem",
            "admin.key",
        ] {
            assert!(dir.join(file).is_file(), "{file} missing");
        }
        assert_eq!(first.ca_pem_path, dir.join("ca.pem"));
        let admin = inspect_pem(&fs::read_to_string(&first.admin_cert_path).unwrap()).unwrap();
        assert_eq!(admin.common_name.as_deref(), Some("admin"));
        assert_eq!(admin.organizational_unit.as_deref(), Some("operator"));
        assert_eq!(admin.organization.as_deref(), Some("default"));
        // No temporary files are left behind.
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        // The six files, and the operator registry with admin in it.
        assert_eq!(names.len(), 7, "{names:?}");
        let admin_record = OperatorRegistry::new(&dir)
            .get("default", "admin")
            .unwrap()
            .unwrap();
        assert_eq!(admin_record.serial, admin.serial_number);

        let second = ensure(&dir, &["fleet.example".into(), "192.0.2.7".into()]).unwrap();
        assert_eq!(second.ca.cert_der(), first.ca.cert_der());
        assert_eq!(second.server.cert_der, first.server.cert_der);
        assert_eq!(
            fs::read_to_string(&second.admin_cert_path).unwrap(),
            fs::read_to_string(&first.admin_cert_path).unwrap()
        );
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_readable_by_the_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("fleet-data");
        let files = ensure(&dir, &[]).unwrap();
        assert_eq!(mode(&dir), 0o700);
        for key in ["ca.key", "server.key", "admin.key"] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        assert_eq!(mode(&files.server_key_path), 0o600);
        let (cert, key) = issue_operator_files(&dir, "bob", "acme").unwrap();
        assert_eq!(mode(&key), 0o600);
        assert_eq!(cert, dir.join("bob.pem"));
        // A second start keeps the modes.
        ensure(&dir, &[]).unwrap();
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
    }

    #[test]
    fn missing_server_certificate_is_issued_again_by_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ensure(tmp.path(), &[]).unwrap();
        fs::remove_file(&first.server_cert_path).unwrap();
        let second = ensure(tmp.path(), &[]).unwrap();
        assert_eq!(second.ca.cert_der(), first.ca.cert_der());
        assert_ne!(second.server.cert_der, first.server.cert_der);
        assert!(second.server_cert_path.is_file());
        let (_, cert) = x509_parser::parse_x509_certificate(&second.server.cert_der).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(second.ca.cert_der()).unwrap();
        assert!(cert.verify_signature(Some(ca.public_key())).is_ok());
    }

    #[test]
    fn a_new_server_name_gets_a_new_server_certificate() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ensure(tmp.path(), &[]).unwrap();
        let second = ensure(tmp.path(), &["10.1.2.3".into()]).unwrap();
        assert_ne!(second.server.cert_der, first.server.cert_der);
        let (_, cert) = x509_parser::parse_x509_certificate(&second.server.cert_der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        assert!(san
            .general_names
            .iter()
            .any(|n| matches!(n, GeneralName::IPAddress(ip) if *ip == [10, 1, 2, 3])));
        let third = ensure(tmp.path(), &["10.1.2.3".into()]).unwrap();
        assert_eq!(third.server.cert_der, second.server.cert_der);
    }

    #[test]
    fn a_lone_ca_key_is_reported_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        ensure(tmp.path(), &[]).unwrap();
        fs::remove_file(tmp.path().join("ca.pem")).unwrap();
        assert!(matches!(
            ensure(tmp.path(), &[]),
            Err(CertError::IncompleteDataDir { .. })
        ));
    }

    #[test]
    fn operator_files_refuse_bad_and_reserved_names() {
        let tmp = tempfile::tempdir().unwrap();
        ensure(tmp.path(), &[]).unwrap();
        for name in [
            "",
            "ca",
            "CA",
            "server",
            "../x",
            "a/b",
            ".hidden",
            &"x".repeat(65),
        ] {
            assert!(
                issue_operator_files(tmp.path(), name, "default").is_err(),
                "{name:?} accepted"
            );
        }
        let (cert, key) = issue_operator_files(tmp.path(), "ops.team-1_a", "default").unwrap();
        assert!(cert.is_file() && key.is_file());
        let info = inspect_pem(&fs::read_to_string(cert).unwrap()).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("ops.team-1_a"));
        // Without a CA there is nothing to sign with.
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(
            issue_operator_files(empty.path(), "bob", "default"),
            Err(CertError::Io { .. })
        ));
    }

    #[test]
    fn server_names_include_loopback_and_extras_without_duplicates() {
        let (dns, ips) = server_names(&[
            "localhost".into(),
            "fleet.example".into(),
            "::1".into(),
            "2001:db8::1".into(),
        ]);
        assert_eq!(dns[0], "localhost");
        assert_eq!(dns.iter().filter(|n| *n == "localhost").count(), 1);
        assert!(dns.contains(&"fleet.example".to_owned()));
        assert_eq!(ips.len(), 3);
    }

    #[test]
    fn issuing_never_overwrites_and_a_name_is_not_issued_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        ensure(&dir, &[]).unwrap();
        let admin_before = fs::read_to_string(dir.join("admin.pem")).unwrap();
        // acme's admin would overwrite default's admin.pem: refused, nothing issued.
        let err = issue_operator_files(&dir, "admin", "acme").unwrap_err();
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(dir.join("admin.pem")).unwrap(),
            admin_before
        );
        assert_eq!(
            OperatorRegistry::new(&dir).get("acme", "admin").unwrap(),
            None
        );
        // Into a folder of its own it is issued, and registered under acme.
        let out = tmp.path().join("acme");
        let (cert, _) = issue_operator_files_into(&dir, "admin", "acme", &out).unwrap();
        let info = inspect_pem(&fs::read_to_string(cert).unwrap()).unwrap();
        let record = OperatorRegistry::new(&dir)
            .get("acme", "admin")
            .unwrap()
            .unwrap();
        assert_eq!(record.serial, info.serial_number);
        // The same name in the same tenant again: refused, even into another folder.
        let again = issue_operator_files_into(&dir, "admin", "acme", &tmp.path().join("x"));
        assert!(matches!(again, Err(CertError::OperatorExists { .. })));
    }

    #[test]
    fn a_data_directory_from_before_the_registry_registers_its_operators() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        ensure(&dir, &[]).unwrap();
        issue_operator_files(&dir, "bob", "acme").unwrap();
        let bob = inspect_pem(&fs::read_to_string(dir.join("bob.pem")).unwrap()).unwrap();
        fs::remove_dir_all(dir.join("operators")).unwrap();
        ensure(&dir, &[]).unwrap();
        let registry = OperatorRegistry::new(&dir);
        assert_eq!(
            registry.get("acme", "bob").unwrap().unwrap().serial,
            bob.serial_number
        );
        assert!(registry.get("default", "admin").unwrap().is_some());
    }
}
