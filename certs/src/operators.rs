//! The registry of issued operator certificates: which operator (tenant and name together) was
//! issued which certificate, and whether it is revoked. fleetd admits an operator only when the
//! certificate it presents is the one recorded here, not revoked; a fleet-CA signature alone is
//! not enough (a certificate issued into a copy of the data directory is refused).
//!
//! One JSON file per operator, `DIR/operators/<tenant>/<name>.json`, created with `create_new`
//! so that a name is never issued twice in a tenant (not even after its revocation), and
//! rewritten atomically (temporary file, fsync, rename, fsync of the directory) on revocation.
//! Files rather than the store: `fleetd issue-operator` runs beside a live fleetd, which holds
//! the store's lock, and the data directory is already where the CA key lives.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::CertError;
use crate::{check_name, inspect_pem, Fingerprint};

/// Folder of the registry inside the data directory.
pub const OPERATORS_DIR: &str = "operators";
/// File in the registry folder that says the data directory's earlier operator certificates
/// were registered.
const MIGRATED_MARKER: &str = ".registered";

/// One issued operator certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRecord {
    pub tenant: String,
    pub name: String,
    /// Serial number of its certificate (lower-case hex, as [`crate::CertInfo`] gives it).
    pub serial: String,
    /// Fingerprint of its key.
    pub fingerprint: Fingerprint,
    #[serde(with = "time::serde::rfc3339")]
    pub issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub revoked_at: Option<OffsetDateTime>,
    /// Who revoked it (`<name>@<tenant>` of an operator, or `host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_by: Option<String>,
}

impl OperatorRecord {
    /// Whether a certificate with `serial` is this operator's current, unrevoked certificate.
    pub fn admits(&self, serial: &str) -> Result<(), &'static str> {
        if self.revoked_at.is_some() {
            return Err("this operator's certificate was revoked");
        }
        if self.serial != serial {
            return Err("not the certificate issued to this operator");
        }
        Ok(())
    }
}

/// The registry in one data directory.
#[derive(Debug, Clone)]
pub struct OperatorRegistry {
    root: PathBuf,
}

impl OperatorRegistry {
    /// The registry of the data directory `data_dir` (nothing is read or created yet).
    pub fn new(data_dir: &Path) -> OperatorRegistry {
        OperatorRegistry {
            root: data_dir.join(OPERATORS_DIR),
        }
    }

    /// Whether the operator certificates of the data directory were registered (a data directory
    /// made before the registry has not been yet): a marker file, written once they are.
    pub fn exists(&self) -> bool {
        self.root.join(MIGRATED_MARKER).is_file()
    }

    /// Marks the data directory's earlier operator certificates as registered.
    pub fn mark_migrated(&self) -> Result<(), CertError> {
        create_dirs(&self.root)?;
        crate::data_dir::write_atomic(&self.root.join(MIGRATED_MARKER), b"", 0o600)
    }

    /// Forgets a record whose files could not be written (issuing failed half-way), so that
    /// the name is not lost for good. Only for a record this process has just registered.
    pub(crate) fn unregister(&self, tenant: &str, name: &str) -> Result<(), CertError> {
        let path = self.path(tenant, name)?;
        fs::remove_file(&path).map_err(|source| CertError::Io { path, source })
    }

    fn path(&self, tenant: &str, name: &str) -> Result<PathBuf, CertError> {
        check_name("tenant", tenant)?;
        check_name("operator name", name)?;
        if tenant.starts_with('.') || name.starts_with('.') {
            return Err(CertError::InvalidName {
                what: "operator name",
                value: name.to_owned(),
                reason: "may not start with '.'",
            });
        }
        Ok(self.root.join(tenant).join(format!("{name}.json")))
    }

    /// Records a newly issued certificate. Fails with [`CertError::OperatorExists`] when the
    /// name was issued in this tenant before, revoked or not.
    pub fn register(&self, record: &OperatorRecord) -> Result<(), CertError> {
        let path = self.path(&record.tenant, &record.name)?;
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        create_dirs(&dir)?;
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
        let mut file = match crate::data_dir::open_new(&path, 0o600) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(CertError::OperatorExists {
                    tenant: record.tenant.clone(),
                    name: record.name.clone(),
                })
            }
            Err(source) => return Err(CertError::Io { path, source }),
        };
        let written = file.write_all(&json).and_then(|()| file.sync_all());
        if let Err(source) = written {
            drop(file);
            let _ = fs::remove_file(&path);
            return Err(CertError::Io { path, source });
        }
        sync_dir(&dir);
        Ok(())
    }

    /// The record of operator `name` of `tenant`, if it was ever issued.
    pub fn get(&self, tenant: &str, name: &str) -> Result<Option<OperatorRecord>, CertError> {
        let path = self.path(tenant, name)?;
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CertError::Io {
                    path,
                    source: io::Error::new(io::ErrorKind::InvalidData, e),
                }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CertError::Io { path, source }),
        }
    }

    /// Every operator of `tenant`, by name.
    pub fn list(&self, tenant: &str) -> Result<Vec<OperatorRecord>, CertError> {
        let dir = self.root.join(tenant);
        check_name("tenant", tenant)?;
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(CertError::Io { path: dir, source }),
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if let Ok(Some(record)) = self.get(tenant, name) {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// Revokes operator `name` of `tenant`; the new record is durable when this returns.
    /// Revoking a revoked operator changes nothing and returns its record.
    pub fn revoke(
        &self,
        tenant: &str,
        name: &str,
        by: &str,
        at: OffsetDateTime,
    ) -> Result<Option<OperatorRecord>, CertError> {
        let Some(mut record) = self.get(tenant, name)? else {
            return Ok(None);
        };
        if record.revoked_at.is_some() {
            return Ok(Some(record));
        }
        record.revoked_at = Some(at);
        record.revoked_by = Some(by.to_owned());
        self.rewrite(&record)?;
        Ok(Some(record))
    }

    /// Replaces the certificate of an existing, unrevoked operator (the data directory's
    /// `admin` when its files were deleted and issued again on start).
    pub fn replace_certificate(
        &self,
        tenant: &str,
        name: &str,
        serial: &str,
        fingerprint: Fingerprint,
        at: OffsetDateTime,
    ) -> Result<(), CertError> {
        let Some(mut record) = self.get(tenant, name)? else {
            return Err(CertError::InvalidCertificate(format!(
                "operator {name}@{tenant} is not registered"
            )));
        };
        record.serial = serial.to_owned();
        record.fingerprint = fingerprint;
        record.issued_at = at;
        self.rewrite(&record)
    }

    fn rewrite(&self, record: &OperatorRecord) -> Result<(), CertError> {
        let path = self.path(&record.tenant, &record.name)?;
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| CertError::InvalidCertificate(e.to_string()))?;
        crate::data_dir::write_atomic(&path, &json, 0o600)
    }

    /// Registers an issued operator certificate given as PEM.
    pub fn register_pem(
        &self,
        cert_pem: &str,
        at: OffsetDateTime,
    ) -> Result<OperatorRecord, CertError> {
        let info = inspect_pem(cert_pem)?;
        let record = OperatorRecord {
            tenant: info
                .organization
                .unwrap_or_else(|| crate::data_dir::DEFAULT_TENANT.to_owned()),
            name: info.common_name.ok_or(CertError::InvalidCertificate(
                "operator certificate without CN".into(),
            ))?,
            serial: info.serial_number,
            fingerprint: info.fingerprint,
            issued_at: at,
            revoked_at: None,
            revoked_by: None,
        };
        self.register(&record)?;
        Ok(record)
    }
}

fn create_dirs(dir: &Path) -> Result<(), CertError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tenant: &str, name: &str, serial: &str) -> OperatorRecord {
        OperatorRecord {
            tenant: tenant.into(),
            name: name.into(),
            serial: serial.into(),
            fingerprint: Fingerprint::of_spki_der(b"k"),
            issued_at: OffsetDateTime::UNIX_EPOCH,
            revoked_at: None,
            revoked_by: None,
        }
    }

    #[test]
    fn a_name_is_issued_once_per_tenant_and_tenants_are_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = OperatorRegistry::new(tmp.path());
        reg.register(&record("default", "admin", "01")).unwrap();
        reg.register(&record("acme", "admin", "02")).unwrap();
        assert!(matches!(
            reg.register(&record("default", "admin", "03")),
            Err(CertError::OperatorExists { .. })
        ));
        assert_eq!(reg.get("default", "admin").unwrap().unwrap().serial, "01");
        assert_eq!(reg.get("acme", "admin").unwrap().unwrap().serial, "02");
        assert_eq!(reg.get("acme", "bob").unwrap(), None);
        assert!(reg.get("../x", "admin").is_err());
        assert!(reg.get("default", "..").is_err());
    }

    #[test]
    fn a_revoked_operator_stays_revoked_and_its_name_is_not_issued_again() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = OperatorRegistry::new(tmp.path());
        reg.register(&record("default", "bob", "0a")).unwrap();
        assert_eq!(
            reg.get("default", "bob").unwrap().unwrap().admits("0a"),
            Ok(())
        );
        assert!(reg
            .get("default", "bob")
            .unwrap()
            .unwrap()
            .admits("0b")
            .is_err());
        let at = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1);
        let revoked = reg
            .revoke("default", "bob", "admin@default", at)
            .unwrap()
            .unwrap();
        assert_eq!(revoked.revoked_at, Some(at));
        assert!(reg
            .get("default", "bob")
            .unwrap()
            .unwrap()
            .admits("0a")
            .is_err());
        assert!(reg.register(&record("default", "bob", "0c")).is_err());
        assert_eq!(reg.list("default").unwrap().len(), 1);
        assert_eq!(reg.revoke("default", "nobody", "x", at).unwrap(), None);
    }
}
