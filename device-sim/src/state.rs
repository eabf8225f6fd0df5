//! The station's state directory, kept like a real device keeps its flash: `station.json`,
//! `key.pem` + `cert.pem`, and the part file of a resumable firmware download.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use fleet_certs::{CertError, Fingerprint};
use fleet_protocol::{IdError, Mac, Serial};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::state_file::{
    io_error, read_optional, remove_optional, write_private, FileError, Record, StateFile,
};

/// Model name a station gets when none is given.
pub const DEFAULT_MODEL: &str = "MC-Station";
/// File name of the station's state inside its directory.
pub const STATION_FILE: &str = "station.json";
/// File name of the station's private key (PKCS#8 PEM).
pub const KEY_FILE: &str = "key.pem";
/// File name of the station's self-signed certificate.
pub const CERT_FILE: &str = "cert.pem";

/// First firmware that makes a key pair and connects with a client certificate.
const KEY_PAIR_FIRMWARE: semver::Version = semver::Version::new(6, 1, 0);

/// What went wrong with a station's state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file of the directory could not be read or written, `station.json` is not valid, or
    /// the directory already holds a station.
    #[error(transparent)]
    File(#[from] FileError),
    /// The serial or a MAC is not of the form PROTOCOL §1 gives it.
    #[error(transparent)]
    Id(#[from] IdError),
    /// The key pair could not be made or read.
    #[error("station key pair: {0}")]
    Certificate(#[from] CertError),
}

/// What a new station is made from (`fleet-sim station init`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StationProfile {
    /// Serial number; validated by [`StationState::init`].
    pub serial: String,
    /// Firmware version, e.g. "6.1.0"; anything that is not semver counts as legacy.
    pub firmware: String,
    /// Model name ([`DEFAULT_MODEL`] in [`StationProfile::new`]).
    pub model: String,
    /// MAC of the streaming interface; derived from the serial when `None`.
    pub mac_streaming: Option<String>,
    /// MAC of the control interface; derived from the serial when `None`.
    pub mac_control: Option<String>,
}

impl StationProfile {
    /// A profile with the default model and MACs derived from the serial.
    pub fn new(serial: impl Into<String>, firmware: impl Into<String>) -> Self {
        StationProfile {
            serial: serial.into(),
            firmware: firmware.into(),
            model: DEFAULT_MODEL.to_owned(),
            mac_streaming: None,
            mac_control: None,
        }
    }
}

/// A firmware download in progress, kept so that it resumes after a reboot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingUpdate {
    /// Version being downloaded.
    pub version: String,
    /// Expected SHA-256 of the whole image, lower-case hex.
    pub sha256: String,
    /// Expected size in bytes.
    pub size: u64,
    /// How often the download was restarted from 0 after a checksum mismatch.
    #[serde(default)]
    pub restarts: u32,
}

/// The contents of `station.json`, bound to its directory.
pub type StationState = StateFile<StationRecord>;

/// The fields of `station.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StationRecord {
    /// Serial number.
    pub serial: Serial,
    /// Model name.
    pub model: String,
    /// Installed firmware version.
    pub firmware: String,
    /// MAC of the streaming interface.
    pub mac_streaming: Mac,
    /// MAC of the control interface.
    pub mac_control: Mac,
    /// The station's configuration (what "Delete Configuration" resets).
    #[serde(default = "default_configuration")]
    pub configuration: Value,
    /// The controller said `authorized`, and nothing has reset that since.
    #[serde(default)]
    pub authorized: bool,
    /// A firmware download to resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_update: Option<PendingUpdate>,
}

impl Record for StationRecord {
    const FILE: &'static str = STATION_FILE;
    const DEVICE: &'static str = "station";
    type Error = StateError;
}

/// The configuration of a new or reset station.
pub fn default_configuration() -> Value {
    serde_json::json!({ "network": "dhcp" })
}

/// Whether `firmware` is 6.1.0 or later and so has a key pair; a firmware that is not a
/// semantic version counts as legacy.
pub fn firmware_has_key_pair(firmware: &str) -> bool {
    semver::Version::parse(firmware.trim()).is_ok_and(|v| v >= KEY_PAIR_FIRMWARE)
}

/// A MAC derived from the serial, so that re-creating a station gives the same MACs.
/// The first byte is unicast and locally administered.
fn derived_mac(serial: &Serial, interface: &str) -> Result<Mac, IdError> {
    let digest = Sha256::digest(format!("{interface}:{serial}").as_bytes());
    let mut bytes = [0u8; 6];
    bytes.copy_from_slice(&digest[..6]);
    bytes[0] = (bytes[0] & 0xfc) | 0x02;
    Mac::parse(&hex::encode(bytes))
}

/// The station's key pair and certificate as PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// Self-signed certificate, CN = serial.
    pub cert_pem: String,
    /// PKCS#8 private key.
    pub key_pem: String,
    /// Fingerprint of the key (what the local admin page shows).
    pub fingerprint: Fingerprint,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private key.
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint.to_string())
            .finish_non_exhaustive()
    }
}

impl StateFile<StationRecord> {
    /// Creates `dir` (if needed) and a new `station.json` in it; fails if one exists.
    /// The key pair is made at first boot (or by [`fingerprint`]), like a real station.
    pub fn init(dir: impl AsRef<Path>, profile: &StationProfile) -> Result<Self, StateError> {
        StateFile::create(dir.as_ref(), || {
            let serial: Serial = profile.serial.parse()?;
            let mac = |given: &Option<String>, interface| match given {
                Some(mac) => Mac::parse(mac),
                None => derived_mac(&serial, interface),
            };
            Ok(StationRecord {
                mac_streaming: mac(&profile.mac_streaming, "streaming")?,
                mac_control: mac(&profile.mac_control, "control")?,
                serial,
                model: profile.model.clone(),
                firmware: profile.firmware.clone(),
                configuration: default_configuration(),
                authorized: false,
                pending_update: None,
            })
        })
    }

    /// The serial.
    pub fn serial(&self) -> &Serial {
        &self.record.serial
    }

    /// Whether the installed firmware has a key pair (6.1.0 or later).
    pub fn has_key_pair_firmware(&self) -> bool {
        firmware_has_key_pair(&self.record.firmware)
    }

    /// Path of the part file of a download of `version`.
    pub fn part_file(&self, version: &str) -> PathBuf {
        part_file(self.dir(), version)
    }

    /// The station's key pair, made now if the firmware has key pairs and none exists (what a
    /// boot does); `None` for legacy firmware. A missing certificate is re-issued for the
    /// existing key, which keeps the fingerprint.
    pub fn ensure_identity(&self) -> Result<Option<Identity>, StateError> {
        if !self.has_key_pair_firmware() {
            return Ok(None);
        }
        let key_path = self.dir().join(KEY_FILE);
        let cert_path = self.dir().join(CERT_FILE);
        let serial = self.record.serial.as_str();
        let (cert_pem, key_pem) = match read_optional(&key_path)? {
            Some(key_pem) => match read_optional(&cert_path)? {
                Some(cert_pem) => (cert_pem, key_pem),
                None => {
                    let certified = fleet_certs::self_signed_station_with_key(serial, &key_pem)?;
                    fs::write(&cert_path, &certified.cert_pem).map_err(io_error(&cert_path))?;
                    (certified.cert_pem, key_pem)
                }
            },
            None => {
                let certified = fleet_certs::self_signed_station(serial)?;
                write_private(&key_path, &certified.key_pem)?;
                fs::write(&cert_path, &certified.cert_pem).map_err(io_error(&cert_path))?;
                (certified.cert_pem, certified.key_pem)
            }
        };
        let fingerprint = fleet_certs::certificate_pem_fingerprint(&cert_pem)?;
        Ok(Some(Identity {
            cert_pem,
            key_pem,
            fingerprint,
        }))
    }
}

/// Path of the part file of a download of `version` in station directory `dir`.
pub fn part_file(dir: &Path, version: &str) -> PathBuf {
    // The version comes from the controller: keep only characters safe in a file name.
    let safe: String = version
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("firmware-{safe}.part"))
}

/// The local admin page's fingerprint. For firmware 6.1.0 or later whose key does not exist
/// yet, the key pair is made first, exactly as the next boot would; `None` for legacy firmware,
/// which has no key pair.
pub fn fingerprint(dir: impl AsRef<Path>) -> Result<Option<Fingerprint>, StateError> {
    let state = StationState::open(dir)?;
    Ok(state
        .ensure_identity()?
        .map(|identity| identity.fingerprint))
}

/// The local admin "Reset Device": Delete Authentication removes the key pair and the
/// authorized flag (a new key pair is made at the next boot); Delete Configuration restores the
/// default configuration. The reboot that follows is the caller's (a running station's
/// `reboot()`, or the next `station run`).
pub fn local_reset(
    dir: impl AsRef<Path>,
    delete_configuration: bool,
    delete_authentication: bool,
) -> Result<(), StateError> {
    let dir = dir.as_ref();
    if delete_authentication {
        remove_optional(&dir.join(KEY_FILE))?;
        remove_optional(&dir.join(CERT_FILE))?;
    }
    StationState::update(dir, |record| {
        if delete_authentication {
            record.authorized = false;
        }
        if delete_configuration {
            record.configuration = default_configuration();
        }
    })?;
    Ok(())
}

/// Removes a file that may not exist.
pub(crate) fn remove_file_if_present(path: &Path) -> Result<(), StateError> {
    Ok(remove_optional(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_follow_the_protocol() {
        assert!("SIM-00001".parse::<Serial>().is_ok());
        assert!("a".repeat(64).parse::<Serial>().is_ok());
        assert!("a".repeat(65).parse::<Serial>().is_err());
        assert!("".parse::<Serial>().is_err());
        assert!("has space".parse::<Serial>().is_err());
        assert!("slash/".parse::<Serial>().is_err());
    }

    #[test]
    fn firmware_key_pair_threshold_is_6_1_0() {
        assert!(!firmware_has_key_pair("6.0.7"));
        assert!(!firmware_has_key_pair("5.9.0"));
        assert!(!firmware_has_key_pair("garbage"));
        assert!(firmware_has_key_pair("6.1.0"));
        assert!(firmware_has_key_pair("6.2.3"));
        assert!(firmware_has_key_pair("7.0.0"));
    }

    #[test]
    fn init_writes_station_json_with_derived_macs() {
        let dir = tempfile::tempdir().unwrap();
        let state = StationState::init(dir.path(), &StationProfile::new("ST-1", "6.1.0")).unwrap();
        assert_eq!(state.record.model, DEFAULT_MODEL);
        assert_eq!(state.record.mac_streaming.as_str().len(), 12);
        assert_ne!(state.record.mac_streaming, state.record.mac_control);
        let again = StationState::open(dir.path()).unwrap();
        assert_eq!(again, state);
        assert!(matches!(
            StationState::init(dir.path(), &StationProfile::new("ST-1", "6.1.0")),
            Err(StateError::File(FileError::AlreadyInitialized { .. }))
        ));
        // The MACs are a function of the serial.
        let other = tempfile::tempdir().unwrap();
        let twin = StationState::init(other.path(), &StationProfile::new("ST-1", "6.0.5")).unwrap();
        assert_eq!(twin.record.mac_control, state.record.mac_control);
    }

    #[test]
    fn init_refuses_bad_serials_and_normalises_macs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            StationState::init(dir.path(), &StationProfile::new("bad serial", "6.1.0")),
            Err(StateError::Id(IdError::SerialCharacter { .. }))
        ));
        let mut profile = StationProfile::new("ST-2", "6.1.0");
        profile.mac_streaming = Some("AA:BB:CC:DD:EE:FF".into());
        profile.mac_control = Some("00-11-22-33-44-55".into());
        let state = StationState::init(dir.path(), &profile).unwrap();
        assert_eq!(state.record.mac_streaming.as_str(), "aabbccddeeff");
        assert_eq!(state.record.mac_control.as_str(), "001122334455");
    }

    #[test]
    fn fingerprint_makes_the_key_once_and_legacy_has_none() {
        let dir = tempfile::tempdir().unwrap();
        StationState::init(dir.path(), &StationProfile::new("ST-3", "6.1.0")).unwrap();
        assert!(!dir.path().join(KEY_FILE).exists());
        let first = fingerprint(dir.path()).unwrap().unwrap();
        assert!(dir.path().join(KEY_FILE).exists());
        assert_eq!(fingerprint(dir.path()).unwrap(), Some(first));
        // A lost certificate is re-issued for the same key.
        fs::remove_file(dir.path().join(CERT_FILE)).unwrap();
        assert_eq!(fingerprint(dir.path()).unwrap(), Some(first));

        let legacy = tempfile::tempdir().unwrap();
        StationState::init(legacy.path(), &StationProfile::new("ST-4", "6.0.5")).unwrap();
        assert_eq!(fingerprint(legacy.path()).unwrap(), None);
        assert!(!legacy.path().join(KEY_FILE).exists());
    }

    #[test]
    fn delete_authentication_leads_to_a_new_key_pair() {
        let dir = tempfile::tempdir().unwrap();
        StationState::init(dir.path(), &StationProfile::new("ST-5", "6.1.0")).unwrap();
        let before = fingerprint(dir.path()).unwrap();
        StationState::update(dir.path(), |r| {
            r.authorized = true;
            r.configuration = serde_json::json!({"network": "static"});
        })
        .unwrap();

        local_reset(dir.path(), false, true).unwrap();
        let state = StationState::open(dir.path()).unwrap();
        assert!(!state.record.authorized);
        assert_eq!(state.record.configuration["network"], "static");
        assert!(!dir.path().join(KEY_FILE).exists());
        assert_ne!(fingerprint(dir.path()).unwrap(), before);

        local_reset(dir.path(), true, false).unwrap();
        let state = StationState::open(dir.path()).unwrap();
        assert_eq!(state.record.configuration, default_configuration());
        assert!(dir.path().join(KEY_FILE).exists());
    }

    #[test]
    fn part_file_names_are_safe() {
        let path = part_file(Path::new("/d"), "../../etc/passwd");
        assert_eq!(path, Path::new("/d/firmware-.._.._etc_passwd.part"));
    }
}
