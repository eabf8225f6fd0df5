//! Station firmware: which versions may be authorized, updated or neither, and the image catalog.

use std::path::PathBuf;

use semver::Version;

/// The versions the station manual names: 6.1.0 and later can be authorized; 6.0.2 to 6.0.7
/// must be updated first; anything older cannot even be updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwarePolicy {
    /// Lowest firmware that presents its own certificate and may be authorized.
    pub min_firmware: Version,
    /// Lowest firmware that can be updated to `min_firmware` or later.
    pub update_from: Version,
}

impl Default for FirmwarePolicy {
    fn default() -> Self {
        FirmwarePolicy {
            min_firmware: Version::new(6, 1, 0),
            update_from: Version::new(6, 0, 2),
        }
    }
}

/// What a reported firmware version means for a station.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirmwareClass {
    /// At least `min_firmware`: can be authorized.
    Current,
    /// From `update_from` up to `min_firmware`: must be updated first.
    UpdateRequired,
    /// Below `update_from`, or not a version at all.
    Unsupported { reason: String },
}

impl FirmwarePolicy {
    /// Classifies the firmware a station reports. Versions are strict semver ("6.1.0"; a leading
    /// "v" is tolerated); pre-releases order below their release, as semver says.
    pub fn classify(&self, firmware: &str) -> FirmwareClass {
        let Some(version) = parse_version(firmware) else {
            return FirmwareClass::Unsupported {
                reason: format!("firmware {:?} is not a version", shorten(firmware)),
            };
        };
        if version >= self.min_firmware {
            FirmwareClass::Current
        } else if version >= self.update_from {
            FirmwareClass::UpdateRequired
        } else {
            FirmwareClass::Unsupported {
                reason: format!(
                    "firmware {version} is below {} and cannot be updated",
                    self.update_from
                ),
            }
        }
    }
}

/// Parses a firmware version as strict semver, tolerating a leading `v` or `V`.
pub fn parse_version(text: &str) -> Option<Version> {
    fleet_protocol::FirmwareVersion::parse(text)
        .ok()
        .map(|v| v.version().clone())
}

/// Keeps an untrusted string quoted in a reason short.
fn shorten(text: &str) -> String {
    const MAX: usize = 40;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// A firmware image the controller can offer. The shell reads and hashes the file; this is only
/// the description that goes into an `update` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareImage {
    pub version: Version,
    /// SHA-256 of the whole image, 64 lower-case hex digits.
    pub sha256: String,
    /// Size of the image in bytes.
    pub size: u64,
    pub path: PathBuf,
}

/// The firmware images on offer, in ascending version order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub images: Vec<FirmwareImage>,
}

impl Catalog {
    /// Sorts the images by version; of two images with the same version the first one is kept.
    pub fn new(mut images: Vec<FirmwareImage>) -> Catalog {
        images.sort_by(|a, b| a.version.cmp(&b.version));
        images.dedup_by(|later, earlier| later.version == earlier.version);
        Catalog { images }
    }

    /// The highest version on offer.
    pub fn latest(&self) -> Option<&FirmwareImage> {
        self.images.last()
    }

    /// The image of exactly this version.
    pub fn find(&self, version: &Version) -> Option<&FirmwareImage> {
        self.images.iter().find(|image| &image.version == version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(firmware: &str) -> FirmwareClass {
        FirmwarePolicy::default().classify(firmware)
    }

    #[test]
    fn current_from_6_1_0() {
        for fw in [
            "6.1.0",
            "6.1.1",
            "6.2.0",
            "7.0.0",
            "v6.1.0",
            "V7.0.0",
            "6.1.0+build5",
        ] {
            assert_eq!(class(fw), FirmwareClass::Current, "{fw}");
        }
    }

    #[test]
    fn update_required_from_6_0_2_below_6_1_0() {
        for fw in [
            "6.0.2",
            "6.0.3",
            "6.0.4",
            "6.0.5",
            "6.0.6",
            "6.0.7",
            "6.0.9",
            "6.1.0-rc.1",
        ] {
            assert_eq!(class(fw), FirmwareClass::UpdateRequired, "{fw}");
        }
    }

    #[test]
    fn unsupported_below_6_0_2_with_reason() {
        assert_eq!(
            class("6.0.1"),
            FirmwareClass::Unsupported {
                reason: "firmware 6.0.1 is below 6.0.2 and cannot be updated".into()
            }
        );
        assert!(matches!(class("5.9.9"), FirmwareClass::Unsupported { .. }));
        assert!(matches!(
            class("6.0.2-beta"),
            FirmwareClass::Unsupported { .. }
        ));
    }

    #[test]
    fn not_a_version_is_unsupported_and_named() {
        for fw in ["garbage", "6.1", "", " 6.1.0", "6.1.0.0", "vv6.1.0"] {
            match class(fw) {
                FirmwareClass::Unsupported { reason } => {
                    assert!(reason.contains(&format!("{fw:?}")), "{reason}");
                    assert!(reason.contains("not a version"), "{reason}");
                }
                other => panic!("{fw}: {other:?}"),
            }
        }
        let FirmwareClass::Unsupported { reason } = class(&"9".repeat(1000)) else {
            panic!("a huge number is not a version");
        };
        assert!(reason.len() < 100);
    }

    fn image(version: &str) -> FirmwareImage {
        FirmwareImage {
            version: Version::parse(version).unwrap(),
            sha256: "0".repeat(64),
            size: 1,
            path: PathBuf::from(format!("{version}.bin")),
        }
    }

    #[test]
    fn catalog_sorts_and_finds() {
        let catalog = Catalog::new(vec![image("6.2.0"), image("6.1.0"), image("6.10.0")]);
        let versions: Vec<String> = catalog
            .images
            .iter()
            .map(|i| i.version.to_string())
            .collect();
        assert_eq!(versions, ["6.1.0", "6.2.0", "6.10.0"]);
        assert_eq!(catalog.latest().unwrap().version.to_string(), "6.10.0");
        assert!(catalog.find(&Version::new(6, 2, 0)).is_some());
        assert!(catalog.find(&Version::new(6, 3, 0)).is_none());
        assert!(Catalog::new(vec![]).latest().is_none());
    }
}
