//! Operator commands (PROTOCOL §6, with the additions of docs/protocol.md) as one typed enum:
//! [`OperatorCommand::from_entry`] parses an entry of a request's `commands` array once, every
//! argument into a type that is valid by construction, and [`OperatorCommand::to_json`] writes
//! it back in the wire form. The controller dispatches on the enum; `fleetctl` builds its
//! requests from it. Errors name the argument as the operator wrote it.

use std::fmt;
use std::net::IpAddr;

use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::{CommandError, Fingerprint, Mac, Serial, StationState, WhitelistEntry};

/// Longest vendor, type, site, operator name, or paging `after` accepted from an operator, in
/// bytes.
pub const MAX_TEXT: usize = 256;

/// `listAuditLog`'s `limit` when absent (PROTOCOL §6).
pub const DEFAULT_AUDIT_LIMIT: usize = 100;

/// Largest `limit` of any list command (PROTOCOL §6); the controller caps it further at its
/// page size.
pub const MAX_LIMIT: usize = 10_000;

/// Longest unknown command name quoted back in an error, in characters.
const MAX_QUOTED_NAME: usize = 64;

/// The refusal of an entry whose `command` is missing or not a string.
pub(crate) fn unnamed() -> CommandError {
    CommandError::invalid_argument("\"command\" must be a string")
}

/// The name of every operator command: the `command` field of a request entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CommandName {
    ListStations,
    GetStation,
    AcceptStation,
    RejectStation,
    ListRejectedStations,
    ClearRejectedStation,
    StartStationUpdate,
    ListFirmware,
    ResetStation,
    RemoveStation,
    CreatePhone,
    ListPhones,
    GetPhone,
    SuspendPhoneAuthentication,
    ResetPhoneAuthentication,
    DeletePhone,
    AddWhitelistEntry,
    RemoveWhitelistEntry,
    ListWhitelist,
    ExportDevicesCsv,
    ImportPhonesCsv,
    ListAuditLog,
    ListOperators,
    RevokeOperator,
    ListAddressBlocks,
    LiftAddressBlock,
    Explain,
}

impl CommandName {
    /// Every command, in the order of docs/protocol.md's tables.
    pub const ALL: [CommandName; 27] = [
        CommandName::ListStations,
        CommandName::GetStation,
        CommandName::AcceptStation,
        CommandName::RejectStation,
        CommandName::ListRejectedStations,
        CommandName::ClearRejectedStation,
        CommandName::StartStationUpdate,
        CommandName::ListFirmware,
        CommandName::ResetStation,
        CommandName::RemoveStation,
        CommandName::CreatePhone,
        CommandName::ListPhones,
        CommandName::GetPhone,
        CommandName::SuspendPhoneAuthentication,
        CommandName::ResetPhoneAuthentication,
        CommandName::DeletePhone,
        CommandName::AddWhitelistEntry,
        CommandName::RemoveWhitelistEntry,
        CommandName::ListWhitelist,
        CommandName::ExportDevicesCsv,
        CommandName::ImportPhonesCsv,
        CommandName::ListAuditLog,
        CommandName::ListOperators,
        CommandName::RevokeOperator,
        CommandName::ListAddressBlocks,
        CommandName::LiftAddressBlock,
        CommandName::Explain,
    ];

    /// The wire name, e.g. `acceptStation`.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandName::ListStations => "listStations",
            CommandName::GetStation => "getStation",
            CommandName::AcceptStation => "acceptStation",
            CommandName::RejectStation => "rejectStation",
            CommandName::ListRejectedStations => "listRejectedStations",
            CommandName::ClearRejectedStation => "clearRejectedStation",
            CommandName::StartStationUpdate => "startStationUpdate",
            CommandName::ListFirmware => "listFirmware",
            CommandName::ResetStation => "resetStation",
            CommandName::RemoveStation => "removeStation",
            CommandName::CreatePhone => "createPhone",
            CommandName::ListPhones => "listPhones",
            CommandName::GetPhone => "getPhone",
            CommandName::SuspendPhoneAuthentication => "suspendPhoneAuthentication",
            CommandName::ResetPhoneAuthentication => "resetPhoneAuthentication",
            CommandName::DeletePhone => "deletePhone",
            CommandName::AddWhitelistEntry => "addWhitelistEntry",
            CommandName::RemoveWhitelistEntry => "removeWhitelistEntry",
            CommandName::ListWhitelist => "listWhitelist",
            CommandName::ExportDevicesCsv => "exportDevicesCsv",
            CommandName::ImportPhonesCsv => "importPhonesCsv",
            CommandName::ListAuditLog => "listAuditLog",
            CommandName::ListOperators => "listOperators",
            CommandName::RevokeOperator => "revokeOperator",
            CommandName::ListAddressBlocks => "listAddressBlocks",
            CommandName::LiftAddressBlock => "liftAddressBlock",
            CommandName::Explain => "explain",
        }
    }

    /// The command of a wire name; `None` for a name no command has.
    pub fn parse(name: &str) -> Option<CommandName> {
        CommandName::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Whether the command only reads: it changes nothing, and is audited after it ran rather
    /// than in the transaction of a change.
    pub fn is_read(self) -> bool {
        names_a_read(self.as_str())
    }

    /// Whether the command concerns the whole fleet rather than one tenant (address blocks):
    /// only operators of tenant `default` may run it, whatever its arguments.
    pub fn is_fleet_wide(self) -> bool {
        matches!(
            self,
            CommandName::ListAddressBlocks | CommandName::LiftAddressBlock
        )
    }
}

impl fmt::Display for CommandName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a command name reads by the naming rule of PROTOCOL §6 (`list…`, `get…`,
/// `export…`), or is `explain` (docs/protocol.md's read that names no prefix), whether or not a
/// command has that name: once a request's response is full, an entry with such a name is
/// answered `too_large` without being looked at further.
pub fn names_a_read(name: &str) -> bool {
    name == CommandName::Explain.as_str()
        || ["list", "get", "export"]
            .iter()
            .any(|prefix| name.starts_with(prefix))
}

/// A free-text argument (a phone's vendor, type or site, an operator's name): a string of at
/// most [`MAX_TEXT`] bytes without control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Text(String);

impl Text {
    /// `text` as the argument `key`, which the error names.
    pub fn parse(key: &str, text: &str) -> Result<Text, CommandError> {
        if text.len() > MAX_TEXT {
            return Err(CommandError::invalid_argument(format!(
                "\"{key}\" is longer than {MAX_TEXT} bytes"
            )));
        }
        if text.chars().any(char::is_control) {
            return Err(CommandError::invalid_argument(format!(
                "\"{key}\" contains control characters"
            )));
        }
        Ok(Text(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `limit` of a list command: 1 to [`MAX_LIMIT`] items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageLimit(usize);

impl PageLimit {
    /// The limit `n`, if it is one.
    pub fn new(n: u64) -> Result<PageLimit, CommandError> {
        usize::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .map(PageLimit)
            .ok_or_else(limit_error)
    }

    /// The limit nearest to `n` (a client that wants `n` items, or none).
    pub fn saturating(n: u64) -> PageLimit {
        PageLimit(usize::try_from(n).map_or(MAX_LIMIT, |n| n.clamp(1, MAX_LIMIT)))
    }

    pub fn get(self) -> usize {
        self.0
    }
}

fn limit_error() -> CommandError {
    CommandError::invalid_argument(format!(
        "\"limit\" must be an integer from 1 to {MAX_LIMIT}"
    ))
}

/// The `after` of a paged list: the `next` of the previous page (a serial or a MAC), at most
/// [`MAX_TEXT`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct After(String);

impl After {
    pub fn new(text: &str) -> Result<After, CommandError> {
        if text.len() > MAX_TEXT {
            return Err(after_error());
        }
        Ok(After(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn after_error() -> CommandError {
    CommandError::invalid_argument(format!(
        "\"after\" must be a string of at most {MAX_TEXT} characters"
    ))
}

/// A firmware version as an operator names it (`startStationUpdate`'s `version`): strict
/// semver, a leading `v` or `V` tolerated. Keeps the text as written, for messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FirmwareVersion {
    text: String,
    version: semver::Version,
}

impl FirmwareVersion {
    pub fn parse(text: &str) -> Result<FirmwareVersion, CommandError> {
        let bare = text.strip_prefix(['v', 'V']).unwrap_or(text);
        match semver::Version::parse(bare) {
            Ok(version) => Ok(FirmwareVersion {
                text: text.to_owned(),
                version,
            }),
            Err(_) => Err(CommandError::invalid_argument(format!(
                "version {text:?} is not a version"
            ))),
        }
    }

    /// The version as the operator wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn version(&self) -> &semver::Version {
        &self.version
    }
}

/// An IP address in its canonical form (an IPv4-mapped IPv6 address is IPv4), as the failure
/// limiter keys its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpAddress(IpAddr);

impl IpAddress {
    pub fn new(ip: IpAddr) -> IpAddress {
        IpAddress(ip.to_canonical())
    }

    pub fn get(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for IpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The `subject` of `explain`: an IP address, or a device's serial or MAC address as the
/// operator wrote it. Text that is an IP address is one; text that is both a MAC and a serial
/// (`aabbccddeeff`) names either, and the controller looks for both.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Address(IpAddress),
    /// A station's serial, a phone's MAC, or both readings of the same text.
    Device {
        text: String,
        serial: Option<Serial>,
        mac: Option<Mac>,
    },
}

impl Subject {
    /// `text` as a subject: an IP address first, else a MAC and/or a serial.
    pub fn parse(text: &str) -> Result<Subject, CommandError> {
        if let Ok(ip) = text.parse::<IpAddr>() {
            return Ok(Subject::Address(IpAddress::new(ip)));
        }
        let serial = Serial::parse(text).ok();
        let mac = Mac::parse(text).ok();
        if serial.is_none() && mac.is_none() {
            return Err(CommandError::invalid_argument(format!(
                "subject {:?} is neither a serial, a MAC nor an IP address",
                crate::shorten(text)
            )));
        }
        Ok(Subject::Device {
            text: text.to_owned(),
            serial,
            mac,
        })
    }

    /// The subject as written (an address in its canonical form).
    pub fn as_str(&self) -> String {
        match self {
            Subject::Address(ip) => ip.to_string(),
            Subject::Device { text, .. } => text.clone(),
        }
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

/// One operator command with its arguments, each already valid. The variants and fields are
/// docs/protocol.md §6's; absent optional arguments are `None`, and the controller supplies
/// their defaults (the latest firmware, its page size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OperatorCommand {
    ListStations {
        state: Option<StationState>,
        limit: Option<PageLimit>,
        after: Option<After>,
    },
    GetStation {
        serial: Serial,
    },
    /// `fingerprint` is the key the operator checked on the station's own page.
    AcceptStation {
        serial: Serial,
        fingerprint: Fingerprint,
    },
    RejectStation {
        serial: Serial,
    },
    ListRejectedStations {
        limit: Option<PageLimit>,
        after: Option<After>,
    },
    ClearRejectedStation {
        serial: Serial,
    },
    /// `version`: the latest of the catalog when `None`.
    StartStationUpdate {
        serial: Serial,
        version: Option<FirmwareVersion>,
    },
    ResetStation {
        serial: Serial,
        delete_authentication: bool,
        delete_configuration: bool,
    },
    RemoveStation {
        serial: Serial,
    },
    /// `kind` is the wire's `type`; `site` is empty when absent.
    CreatePhone {
        mac: Mac,
        vendor: Text,
        kind: Text,
        site: Text,
    },
    ListPhones {
        limit: Option<PageLimit>,
        after: Option<After>,
    },
    GetPhone {
        mac: Mac,
    },
    SuspendPhoneAuthentication {
        mac: Mac,
    },
    ResetPhoneAuthentication {
        mac: Mac,
    },
    DeletePhone {
        mac: Mac,
    },
    /// `force`: add a range broader than the configured minimum prefix.
    AddWhitelistEntry {
        entry: WhitelistEntry,
        force: bool,
    },
    RemoveWhitelistEntry {
        entry: WhitelistEntry,
    },
    ListWhitelist,
    /// The firmware catalog: what `startStationUpdate` can install, latest first.
    ListFirmware,
    ExportDevicesCsv,
    /// `csv`: the file, parsed by the controller row by row (its errors are per line).
    ImportPhonesCsv {
        csv: String,
    },
    /// `after_seq`: page the whole chain oldest first; else the newest `limit` records.
    ListAuditLog {
        limit: Option<PageLimit>,
        after_seq: Option<u64>,
    },
    ListOperators,
    RevokeOperator {
        name: Text,
    },
    ListAddressBlocks,
    LiftAddressBlock {
        address: IpAddress,
    },
    /// Why a device or an address stands where it stands (docs/protocol.md §6).
    Explain {
        subject: Subject,
    },
}

impl OperatorCommand {
    /// Parses one entry of a request's `commands` array: `{"command": "<name>", …arguments}`.
    /// Arguments are read in the order the commands have always checked them, so that an entry
    /// with several faults is refused for the same one; unknown fields are ignored.
    pub fn from_entry(entry: &Value) -> Result<OperatorCommand, CommandError> {
        let Some(Value::String(name)) = entry.get("command") else {
            return Err(unnamed());
        };
        let name = CommandName::parse(name).ok_or_else(|| {
            CommandError::invalid_argument(format!(
                "unknown command {:?}",
                name.chars().take(MAX_QUOTED_NAME).collect::<String>()
            ))
        })?;
        OperatorCommand::parse(name, &Args(entry))
    }

    fn parse(name: CommandName, args: &Args<'_>) -> Result<OperatorCommand, CommandError> {
        use OperatorCommand as C;
        Ok(match name {
            CommandName::ListStations => C::ListStations {
                state: args.state()?,
                limit: args.limit()?,
                after: args.after()?,
            },
            CommandName::GetStation => C::GetStation {
                serial: args.serial()?,
            },
            CommandName::AcceptStation => C::AcceptStation {
                serial: args.serial()?,
                fingerprint: args.fingerprint()?,
            },
            CommandName::RejectStation => C::RejectStation {
                serial: args.serial()?,
            },
            CommandName::ListRejectedStations => C::ListRejectedStations {
                limit: args.limit()?,
                after: args.after()?,
            },
            CommandName::ClearRejectedStation => C::ClearRejectedStation {
                serial: args.serial()?,
            },
            CommandName::StartStationUpdate => C::StartStationUpdate {
                serial: args.serial()?,
                version: args.version()?,
            },
            CommandName::ResetStation => C::ResetStation {
                serial: args.serial()?,
                delete_authentication: args.flag("delete_authentication")?,
                delete_configuration: args.flag("delete_configuration")?,
            },
            CommandName::RemoveStation => C::RemoveStation {
                serial: args.serial()?,
            },
            CommandName::CreatePhone => C::CreatePhone {
                mac: args.mac()?,
                vendor: args.text("vendor", true)?,
                kind: args.text("type", true)?,
                site: args.text("site", false)?,
            },
            CommandName::ListPhones => C::ListPhones {
                limit: args.limit()?,
                after: args.after()?,
            },
            CommandName::GetPhone => C::GetPhone { mac: args.mac()? },
            CommandName::SuspendPhoneAuthentication => {
                C::SuspendPhoneAuthentication { mac: args.mac()? }
            }
            CommandName::ResetPhoneAuthentication => {
                C::ResetPhoneAuthentication { mac: args.mac()? }
            }
            CommandName::DeletePhone => C::DeletePhone { mac: args.mac()? },
            CommandName::AddWhitelistEntry => C::AddWhitelistEntry {
                entry: args.entry()?,
                force: args.flag("force")?,
            },
            CommandName::RemoveWhitelistEntry => C::RemoveWhitelistEntry {
                entry: args.entry()?,
            },
            CommandName::ListWhitelist => C::ListWhitelist,
            CommandName::ListFirmware => C::ListFirmware,
            CommandName::ExportDevicesCsv => C::ExportDevicesCsv,
            CommandName::ImportPhonesCsv => C::ImportPhonesCsv { csv: args.csv()? },
            CommandName::ListAuditLog => C::ListAuditLog {
                limit: args.limit()?,
                after_seq: args.after_seq()?,
            },
            CommandName::ListOperators => C::ListOperators,
            CommandName::RevokeOperator => C::RevokeOperator {
                name: args.text("name", true)?,
            },
            CommandName::ListAddressBlocks => C::ListAddressBlocks,
            CommandName::LiftAddressBlock => C::LiftAddressBlock {
                address: args.address()?,
            },
            CommandName::Explain => C::Explain {
                subject: args.subject()?,
            },
        })
    }

    /// The command's name.
    pub fn name(&self) -> CommandName {
        use OperatorCommand as C;
        match self {
            C::ListStations { .. } => CommandName::ListStations,
            C::GetStation { .. } => CommandName::GetStation,
            C::AcceptStation { .. } => CommandName::AcceptStation,
            C::RejectStation { .. } => CommandName::RejectStation,
            C::ListRejectedStations { .. } => CommandName::ListRejectedStations,
            C::ClearRejectedStation { .. } => CommandName::ClearRejectedStation,
            C::StartStationUpdate { .. } => CommandName::StartStationUpdate,
            C::ResetStation { .. } => CommandName::ResetStation,
            C::RemoveStation { .. } => CommandName::RemoveStation,
            C::CreatePhone { .. } => CommandName::CreatePhone,
            C::ListPhones { .. } => CommandName::ListPhones,
            C::GetPhone { .. } => CommandName::GetPhone,
            C::SuspendPhoneAuthentication { .. } => CommandName::SuspendPhoneAuthentication,
            C::ResetPhoneAuthentication { .. } => CommandName::ResetPhoneAuthentication,
            C::DeletePhone { .. } => CommandName::DeletePhone,
            C::AddWhitelistEntry { .. } => CommandName::AddWhitelistEntry,
            C::RemoveWhitelistEntry { .. } => CommandName::RemoveWhitelistEntry,
            C::ListWhitelist => CommandName::ListWhitelist,
            C::ListFirmware => CommandName::ListFirmware,
            C::ExportDevicesCsv => CommandName::ExportDevicesCsv,
            C::ImportPhonesCsv { .. } => CommandName::ImportPhonesCsv,
            C::ListAuditLog { .. } => CommandName::ListAuditLog,
            C::ListOperators => CommandName::ListOperators,
            C::RevokeOperator { .. } => CommandName::RevokeOperator,
            C::ListAddressBlocks => CommandName::ListAddressBlocks,
            C::LiftAddressBlock { .. } => CommandName::LiftAddressBlock,
            C::Explain { .. } => CommandName::Explain,
        }
    }

    /// The wire form: `{"command": "<name>", …arguments}`, without `correlationData`.
    /// [`OperatorCommand::from_entry`] reads it back as the same command.
    pub fn to_json(&self) -> Value {
        let mut fields = self.arguments();
        fields.insert("command".into(), self.name().as_str().into());
        Value::Object(fields)
    }

    /// The arguments alone, as [`OperatorCommand::to_json`] writes them; absent optional
    /// arguments are left out.
    pub fn arguments(&self) -> Map<String, Value> {
        use OperatorCommand as C;
        let mut args = Fields::default();
        match self {
            C::ListStations {
                state,
                limit,
                after,
            } => {
                args.optional("state", state.map(StationState::as_str));
                args.page(*limit, after.as_ref());
            }
            C::ListRejectedStations { limit, after } | C::ListPhones { limit, after } => {
                args.page(*limit, after.as_ref());
            }
            C::GetStation { serial }
            | C::RejectStation { serial }
            | C::ClearRejectedStation { serial }
            | C::RemoveStation { serial } => args.put("serial", serial.as_str()),
            C::AcceptStation {
                serial,
                fingerprint,
            } => {
                args.put("serial", serial.as_str());
                args.put("fingerprint", fingerprint.to_string());
            }
            C::StartStationUpdate { serial, version } => {
                args.put("serial", serial.as_str());
                args.optional("version", version.as_ref().map(FirmwareVersion::as_str));
            }
            C::ResetStation {
                serial,
                delete_authentication,
                delete_configuration,
            } => {
                args.put("serial", serial.as_str());
                args.put("delete_authentication", *delete_authentication);
                args.put("delete_configuration", *delete_configuration);
            }
            C::CreatePhone {
                mac,
                vendor,
                kind,
                site,
            } => {
                args.put("mac", mac.as_str());
                args.put("vendor", vendor.as_str());
                args.put("type", kind.as_str());
                args.put("site", site.as_str());
            }
            C::GetPhone { mac }
            | C::SuspendPhoneAuthentication { mac }
            | C::ResetPhoneAuthentication { mac }
            | C::DeletePhone { mac } => args.put("mac", mac.as_str()),
            C::AddWhitelistEntry { entry, force } => {
                args.put("entry", entry.to_string());
                // Only when asked: the flag is an exception, not a default.
                if *force {
                    args.put("force", true);
                }
            }
            C::RemoveWhitelistEntry { entry } => args.put("entry", entry.to_string()),
            C::ImportPhonesCsv { csv } => args.put("csv", csv.as_str()),
            C::ListAuditLog { limit, after_seq } => {
                args.optional("limit", limit.map(PageLimit::get));
                args.optional("after_seq", *after_seq);
            }
            C::RevokeOperator { name } => args.put("name", name.as_str()),
            C::LiftAddressBlock { address } => args.put("address", address.to_string()),
            C::Explain { subject } => args.put("subject", subject.as_str()),
            C::ListWhitelist
            | C::ListFirmware
            | C::ExportDevicesCsv
            | C::ListOperators
            | C::ListAddressBlocks => {}
        }
        args.0
    }
}

impl Serialize for OperatorCommand {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(serializer)
    }
}

/// The arguments of a command as [`OperatorCommand::arguments`] writes them.
#[derive(Default)]
struct Fields(Map<String, Value>);

impl Fields {
    fn put(&mut self, key: &str, value: impl Into<Value>) {
        self.0.insert(key.to_owned(), value.into());
    }

    fn optional(&mut self, key: &str, value: Option<impl Into<Value>>) {
        if let Some(value) = value {
            self.put(key, value);
        }
    }

    fn page(&mut self, limit: Option<PageLimit>, after: Option<&After>) {
        self.optional("limit", limit.map(PageLimit::get));
        self.optional("after", after.map(After::as_str));
    }
}

/// The list commands that page with `limit` and `after` and answer `next` when there is more
/// (docs/protocol.md §6): what a client reads whole, page after page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listing {
    /// `listStations`, of the stations in `state` only if given.
    Stations { state: Option<StationState> },
    /// `listRejectedStations`.
    RejectedStations,
    /// `listPhones`.
    Phones,
}

impl Listing {
    /// The operator command.
    pub fn command(self) -> CommandName {
        match self {
            Listing::Stations { .. } => CommandName::ListStations,
            Listing::RejectedStations => CommandName::ListRejectedStations,
            Listing::Phones => CommandName::ListPhones,
        }
    }

    /// The command that asks for a page of `limit` items (the server's page size when
    /// `None`) after `after`.
    pub fn page(self, limit: Option<PageLimit>, after: Option<After>) -> OperatorCommand {
        match self {
            Listing::Stations { state } => OperatorCommand::ListStations {
                state,
                limit,
                after,
            },
            Listing::RejectedStations => OperatorCommand::ListRejectedStations { limit, after },
            Listing::Phones => OperatorCommand::ListPhones { limit, after },
        }
    }

    /// The field of the answer that holds the items.
    pub fn field(self) -> &'static str {
        match self {
            Listing::Stations { .. } | Listing::RejectedStations => "stations",
            Listing::Phones => "phones",
        }
    }

    /// The field of an item that `next` and `after` name.
    pub fn key(self) -> &'static str {
        match self {
            Listing::Stations { .. } | Listing::RejectedStations => "serial",
            Listing::Phones => "mac",
        }
    }
}

/// Arguments from text, with the errors a request entry gets for them: what a client that
/// builds an [`OperatorCommand`] from its own input (`fleetctl`) reports, word for word, as the
/// controller would.
pub mod arg {
    use super::{CommandError, Fingerprint, Mac, Serial, StationState, WhitelistEntry};

    /// A station serial (`serial`).
    pub fn serial(text: &str) -> Result<Serial, CommandError> {
        Serial::parse(text).map_err(|e| CommandError::invalid_argument(format!("serial: {e}")))
    }

    /// A station key as the operator checked it (`fingerprint`).
    pub fn fingerprint(text: &str) -> Result<Fingerprint, CommandError> {
        text.parse()
            .map_err(|e| CommandError::invalid_argument(format!("fingerprint: {e}")))
    }

    /// A phone's MAC address in any of its written forms (`mac`).
    pub fn mac(text: &str) -> Result<Mac, CommandError> {
        Mac::parse(text).map_err(|e| CommandError::invalid_argument(format!("mac: {e}")))
    }

    /// A whitelist entry (`entry`).
    pub fn entry(text: &str) -> Result<WhitelistEntry, CommandError> {
        WhitelistEntry::parse(text)
            .map_err(|e| CommandError::invalid_argument(format!("entry: {e}")))
    }

    /// What `explain` is asked about (`subject`).
    pub fn subject(text: &str) -> Result<super::Subject, CommandError> {
        super::Subject::parse(text)
    }

    /// A station state by its JSON name (`state`).
    pub fn state(text: &str) -> Result<StationState, CommandError> {
        StationState::from_name(text)
            .ok_or_else(|| CommandError::invalid_argument(format!("unknown state {text:?}")))
    }
}

/// The arguments of one request entry, read one by one (mini-redis's `Parse`, for JSON).
struct Args<'a>(&'a Value);

impl Args<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key)
    }

    /// A required string argument; `missing` is the error when it is absent.
    fn string(&self, key: &str, missing: &str) -> Result<&str, CommandError> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(CommandError::invalid_argument(format!(
                "\"{key}\" must be a string"
            ))),
            None => Err(CommandError::invalid_argument(missing)),
        }
    }

    /// `serial`: required, a valid station serial.
    fn serial(&self) -> Result<Serial, CommandError> {
        arg::serial(self.string("serial", "missing \"serial\"")?)
    }

    /// `fingerprint`: required, the station key the operator checked.
    fn fingerprint(&self) -> Result<Fingerprint, CommandError> {
        let missing = "missing \"fingerprint\": the operator must confirm the station's key";
        arg::fingerprint(self.string("fingerprint", missing)?)
    }

    /// `mac`: required, a phone's MAC address in any of its written forms.
    fn mac(&self) -> Result<Mac, CommandError> {
        arg::mac(self.string("mac", "missing \"mac\"")?)
    }

    /// `entry`: required, a whitelist entry.
    fn entry(&self) -> Result<WhitelistEntry, CommandError> {
        arg::entry(self.string("entry", "missing \"entry\"")?)
    }

    /// A flag such as `resetStation`'s `delete_authentication`: `false` when absent or `null`.
    fn flag(&self, key: &str) -> Result<bool, CommandError> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(CommandError::invalid_argument(format!(
                "\"{key}\" must be true or false"
            ))),
        }
    }

    /// A free-text argument; an optional one is empty when absent or `null`.
    fn text(&self, key: &str, required: bool) -> Result<Text, CommandError> {
        match self.get(key) {
            None | Some(Value::Null) if !required => Ok(Text::default()),
            None | Some(Value::Null) => {
                Err(CommandError::invalid_argument(format!("missing \"{key}\"")))
            }
            Some(Value::String(s)) => Text::parse(key, s),
            Some(_) => Err(CommandError::invalid_argument(format!(
                "\"{key}\" must be a string"
            ))),
        }
    }

    /// `limit` of a list: 1 to [`MAX_LIMIT`]; `None` when absent or `null`.
    fn limit(&self) -> Result<Option<PageLimit>, CommandError> {
        match self.get("limit") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => PageLimit::new(v.as_u64().ok_or_else(limit_error)?).map(Some),
        }
    }

    /// `after` of a paged list: absent or `null` for the first page.
    fn after(&self) -> Result<Option<After>, CommandError> {
        match self.get("after") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => After::new(s).map(Some),
            Some(_) => Err(after_error()),
        }
    }

    /// `after_seq` of `listAuditLog`: a sequence number, or absent.
    fn after_seq(&self) -> Result<Option<u64>, CommandError> {
        match self.get("after_seq") {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                CommandError::invalid_argument("\"after_seq\" must be a non-negative integer")
            }),
        }
    }

    /// `state` of `listStations`: a JSON name of PROTOCOL §5, or absent.
    fn state(&self) -> Result<Option<StationState>, CommandError> {
        match self.get("state") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => arg::state(s).map(Some),
            Some(_) => Err(CommandError::invalid_argument("\"state\" must be a string")),
        }
    }

    /// `version` of `startStationUpdate`: absent for the latest.
    fn version(&self) -> Result<Option<FirmwareVersion>, CommandError> {
        match self.get("version") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(v)) => FirmwareVersion::parse(v).map(Some),
            Some(_) => Err(CommandError::invalid_argument(
                "\"version\" must be a string",
            )),
        }
    }

    /// `csv` of `importPhonesCsv`: the file's text.
    fn csv(&self) -> Result<String, CommandError> {
        match self.get("csv") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(CommandError::invalid_argument("\"csv\" must be a string")),
        }
    }

    /// `subject` of `explain`: a serial, a MAC or an IP address.
    fn subject(&self) -> Result<Subject, CommandError> {
        let text = self.string("subject", "missing \"subject\"")?;
        Subject::parse(text)
    }

    /// `address` of `liftAddressBlock`: an IPv4 or IPv6 address.
    fn address(&self) -> Result<IpAddress, CommandError> {
        let text = self.text("address", true)?;
        let ip: IpAddr = text.as_str().parse().map_err(|_| {
            CommandError::invalid_argument(format!("{:?} is not an IP address", text.as_str()))
        })?;
        Ok(IpAddress::new(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use proptest::prelude::*;
    use serde_json::json;

    /// `command` with the arguments of `args` (an object).
    fn entry(command: &str, args: Value) -> Value {
        let mut entry = args;
        entry["command"] = json!(command);
        entry
    }

    fn parsed(command: &str, args: Value) -> Result<OperatorCommand, CommandError> {
        OperatorCommand::from_entry(&entry(command, args))
    }

    fn invalid(result: Result<OperatorCommand, CommandError>) -> String {
        let e = result.expect_err("should be refused");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        e.message
    }

    #[test]
    fn every_name_is_its_own() {
        for name in CommandName::ALL {
            assert_eq!(CommandName::parse(name.as_str()), Some(name));
            assert_eq!(name.to_string(), name.as_str());
        }
        assert_eq!(CommandName::parse("noSuchCommand"), None);
        assert!(CommandName::ListAuditLog.is_read());
        assert!(CommandName::GetPhone.is_read());
        assert!(CommandName::ExportDevicesCsv.is_read());
        assert!(!CommandName::AcceptStation.is_read());
        assert!(!CommandName::ImportPhonesCsv.is_read());
        assert!(names_a_read("listFoo"));
        assert!(CommandName::Explain.is_read());
        assert!(!names_a_read("explainFoo"));
        let fleet_wide: Vec<_> = CommandName::ALL
            .into_iter()
            .filter(|c| c.is_fleet_wide())
            .collect();
        assert_eq!(
            fleet_wide,
            [
                CommandName::ListAddressBlocks,
                CommandName::LiftAddressBlock
            ]
        );
    }

    #[test]
    fn the_name_is_checked_first() {
        assert_eq!(
            invalid(OperatorCommand::from_entry(&json!({"command": 5}))),
            "\"command\" must be a string"
        );
        assert_eq!(
            invalid(OperatorCommand::from_entry(&json!({"serial": "S1"}))),
            "\"command\" must be a string"
        );
        assert_eq!(
            invalid(parsed("noSuchCommand", json!({}))),
            "unknown command \"noSuchCommand\""
        );
        let long = "x".repeat(100);
        assert_eq!(
            invalid(parsed(&long, json!({}))),
            format!("unknown command {:?}", "x".repeat(64))
        );
        assert_eq!(
            parsed("listWhitelist", json!({"serial": 5})),
            Ok(OperatorCommand::ListWhitelist)
        );
    }

    #[test]
    fn station_arguments() {
        let get = |args| parsed("getStation", args);
        assert_eq!(
            get(json!({"serial": "S1"})),
            Ok(OperatorCommand::GetStation {
                serial: Serial::parse("S1").unwrap()
            })
        );
        assert_eq!(invalid(get(json!({}))), "missing \"serial\"");
        assert_eq!(
            invalid(get(json!({"serial": 1}))),
            "\"serial\" must be a string"
        );
        assert_eq!(
            invalid(get(json!({"serial": null}))),
            "\"serial\" must be a string"
        );
        assert!(invalid(get(json!({"serial": ""}))).starts_with("serial: "));

        let accept = |args| parsed("acceptStation", args);
        let hex = "ab".repeat(32);
        assert!(accept(json!({"serial": "S1", "fingerprint": hex})).is_ok());
        assert!(accept(json!({"serial": "S1", "fingerprint": hex.to_uppercase()})).is_ok());
        assert!(invalid(accept(json!({"serial": "S1"}))).starts_with("missing \"fingerprint\""));
        assert!(
            invalid(accept(json!({"serial": "S1", "fingerprint": "ab"})))
                .starts_with("fingerprint: ")
        );
        // The serial is read before the fingerprint.
        assert!(invalid(accept(
            json!({"serial": "bad serial!", "fingerprint": "00"})
        ))
        .starts_with("serial: "));

        let reset = |flags: Value| parsed("resetStation", entry("x", flags));
        let flags = |c: OperatorCommand| match c {
            OperatorCommand::ResetStation {
                delete_authentication,
                delete_configuration,
                ..
            } => (delete_authentication, delete_configuration),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reset(json!({"serial": "S1"})).map(flags),
            Ok((false, false))
        );
        assert_eq!(
            reset(
                json!({"serial": "S1", "delete_authentication": null, "delete_configuration": true})
            )
            .map(flags),
            Ok((false, true))
        );
        assert_eq!(
            invalid(reset(
                json!({"serial": "S1", "delete_authentication": "true"})
            )),
            "\"delete_authentication\" must be true or false"
        );

        let update = |args| parsed("startStationUpdate", args);
        assert!(matches!(
            update(json!({"serial": "S1", "version": "v6.1.0"})),
            Ok(OperatorCommand::StartStationUpdate { version: Some(v), .. })
                if v.as_str() == "v6.1.0" && v.version() == &semver::Version::new(6, 1, 0)
        ));
        assert_eq!(
            invalid(update(json!({"serial": "S1", "version": "six"}))),
            "version \"six\" is not a version"
        );
        assert_eq!(
            invalid(update(json!({"serial": "S1", "version": 6}))),
            "\"version\" must be a string"
        );

        let list = |args| parsed("listStations", args);
        assert!(matches!(
            list(json!({"state": "running"})),
            Ok(OperatorCommand::ListStations {
                state: Some(StationState::Running),
                ..
            })
        ));
        assert_eq!(
            invalid(list(json!({"state": "sleeping"}))),
            "unknown state \"sleeping\""
        );
        assert_eq!(
            invalid(list(json!({"state": 1}))),
            "\"state\" must be a string"
        );
        assert_eq!(
            invalid(list(json!({"after": 1}))),
            "\"after\" must be a string of at most 256 characters"
        );
        assert!(invalid(list(json!({"after": "x".repeat(257)}))).contains("at most 256"));
    }

    #[test]
    fn limits() {
        let limit = |value: Value| match parsed("listAuditLog", json!({ "limit": value })) {
            Ok(OperatorCommand::ListAuditLog { limit, .. }) => Ok(limit.map(PageLimit::get)),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(limit(Value::Null), Ok(None));
        assert_eq!(limit(json!(1)), Ok(Some(1)));
        assert_eq!(limit(json!(10_000)), Ok(Some(10_000)));
        for bad in [
            json!(0),
            json!(10_001),
            json!(-1),
            json!(1.5),
            json!("5"),
            json!(u64::MAX),
        ] {
            let e = limit(bad).expect_err("refused");
            assert!(e.message.contains("1 to 10000"), "{e}");
        }
        assert_eq!(
            invalid(parsed("listAuditLog", json!({"after_seq": -1}))),
            "\"after_seq\" must be a non-negative integer"
        );
        assert_eq!(PageLimit::saturating(0).get(), 1);
        assert_eq!(PageLimit::saturating(u64::MAX).get(), MAX_LIMIT);
    }

    #[test]
    fn phone_arguments() {
        let get = |args| parsed("getPhone", args);
        assert!(get(json!({"mac": "00:11:22:33:44:55"})).is_ok());
        assert_eq!(invalid(get(json!({}))), "missing \"mac\"");
        assert_eq!(invalid(get(json!({"mac": []}))), "\"mac\" must be a string");
        assert!(invalid(get(json!({"mac": "zz"}))).starts_with("mac: "));

        let create = |args| parsed("createPhone", args);
        let site = |c: OperatorCommand| match c {
            OperatorCommand::CreatePhone { site, .. } => site.into_string(),
            other => panic!("{other:?}"),
        };
        let phone = json!({"mac": "aabbccddeeff", "vendor": "v", "type": "t"});
        assert_eq!(create(phone.clone()).map(site), Ok(String::new()));
        assert_eq!(
            invalid(create(json!({"mac": "aabbccddeeff", "vendor": "v"}))),
            "missing \"type\""
        );
        let with_site = |s: Value| {
            let mut p = phone.clone();
            p["site"] = s;
            create(p)
        };
        assert_eq!(
            with_site(json!("Hall 2")).map(site),
            Ok("Hall 2".to_owned())
        );
        assert!(invalid(with_site(json!("a\nb"))).contains("control"));
        let long = "é".repeat(MAX_TEXT / 2 + 1);
        assert!(invalid(with_site(json!(long))).contains("longer"));
        assert!(invalid(with_site(json!(3))).contains("must be a string"));

        let add = |args| parsed("addWhitelistEntry", args);
        assert_eq!(invalid(add(json!({}))), "missing \"entry\"");
        assert_eq!(
            invalid(add(json!({"entry": null}))),
            "\"entry\" must be a string"
        );
        assert!(invalid(add(json!({"entry": "10.0.0.1/33"}))).starts_with("entry: "));
        assert_eq!(
            invalid(add(json!({"entry": "10.0.0.0/8", "force": 1}))),
            "\"force\" must be true or false"
        );
        assert_eq!(
            invalid(parsed("importPhonesCsv", json!({}))),
            "\"csv\" must be a string"
        );
    }

    #[test]
    fn operator_and_block_arguments() {
        assert_eq!(
            invalid(parsed("revokeOperator", json!({}))),
            "missing \"name\""
        );
        let lift = |args| parsed("liftAddressBlock", args);
        assert_eq!(
            invalid(lift(json!({"address": "nowhere"}))),
            "\"nowhere\" is not an IP address"
        );
        assert_eq!(
            lift(json!({"address": "::ffff:203.0.113.7"})),
            Ok(OperatorCommand::LiftAddressBlock {
                address: IpAddress::new("203.0.113.7".parse().unwrap())
            })
        );
    }

    #[test]
    fn explain_arguments() {
        let explain = |args| parsed("explain", args);
        assert_eq!(invalid(explain(json!({}))), "missing \"subject\"");
        assert_eq!(
            invalid(explain(json!({"subject": 7}))),
            "\"subject\" must be a string"
        );
        assert!(invalid(explain(json!({"subject": "bad serial!"})))
            .starts_with("subject \"bad serial!\" is neither"));
        assert_eq!(
            explain(json!({"subject": "::ffff:203.0.113.7"})),
            Ok(OperatorCommand::Explain {
                subject: Subject::Address(IpAddress::new("203.0.113.7".parse().unwrap()))
            })
        );
        match Subject::parse("ST-0001") {
            Ok(Subject::Device { serial, mac, .. }) => {
                assert_eq!(serial.map(|s| s.to_string()), Some("ST-0001".to_owned()));
                assert_eq!(mac, None);
            }
            other => panic!("{other:?}"),
        }
        match Subject::parse("AA:BB:CC:DD:EE:FF") {
            Ok(Subject::Device { serial, mac, .. }) => {
                assert_eq!(serial, None);
                assert_eq!(mac.map(|m| m.to_string()), Some("aabbccddeeff".to_owned()));
            }
            other => panic!("{other:?}"),
        }
        // Twelve hex digits are a MAC and a serial both.
        assert!(matches!(
            Subject::parse("aabbccddeeff"),
            Ok(Subject::Device {
                serial: Some(_),
                mac: Some(_),
                ..
            })
        ));
    }

    fn serial() -> impl Strategy<Value = Serial> {
        "[A-Za-z0-9-]{1,64}".prop_map(|s| Serial::parse(&s).expect("a serial"))
    }

    fn mac() -> impl Strategy<Value = Mac> {
        "[0-9a-f]{12}".prop_map(|s| Mac::parse(&s).expect("a MAC"))
    }

    fn text() -> impl Strategy<Value = Text> {
        "[^\\p{Cc}]{0,64}".prop_map(|s| Text::parse("t", &s).expect("a text"))
    }

    fn limit() -> impl Strategy<Value = Option<PageLimit>> {
        proptest::option::of((1..=MAX_LIMIT as u64).prop_map(PageLimit::saturating))
    }

    fn after() -> impl Strategy<Value = Option<After>> {
        proptest::option::of(".{0,40}".prop_map(|s| After::new(&s).expect("an after")))
    }

    fn fingerprint() -> impl Strategy<Value = Fingerprint> {
        any::<[u8; 32]>()
            .prop_map(|bytes| hex(&bytes).parse::<Fingerprint>().expect("a fingerprint"))
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(IpAddr::from),
            any::<[u8; 16]>().prop_map(IpAddr::from),
        ]
    }

    fn whitelist_entry() -> impl Strategy<Value = WhitelistEntry> {
        (ip(), any::<u8>()).prop_map(|(ip, prefix)| {
            let max = if ip.is_ipv4() { 33 } else { 129 };
            let net = ipnet::IpNet::new(ip, prefix % max).expect("a prefix in range");
            WhitelistEntry::from_net(net)
        })
    }

    fn version() -> impl Strategy<Value = Option<FirmwareVersion>> {
        proptest::option::of(
            ("[vV]?", 0..100u64, 0..100u64, 0..100u64).prop_map(|(v, a, b, c)| {
                FirmwareVersion::parse(&format!("{v}{a}.{b}.{c}")).expect("a version")
            }),
        )
    }

    fn station_command() -> impl Strategy<Value = OperatorCommand> {
        use OperatorCommand as C;
        prop_oneof![
            (
                proptest::option::of(proptest::sample::select(StationState::ALL.to_vec())),
                limit(),
                after()
            )
                .prop_map(|(state, limit, after)| C::ListStations {
                    state,
                    limit,
                    after
                }),
            serial().prop_map(|serial| C::GetStation { serial }),
            (serial(), fingerprint()).prop_map(|(serial, fingerprint)| C::AcceptStation {
                serial,
                fingerprint
            }),
            serial().prop_map(|serial| C::RejectStation { serial }),
            (limit(), after()).prop_map(|(limit, after)| C::ListRejectedStations { limit, after }),
            serial().prop_map(|serial| C::ClearRejectedStation { serial }),
            (serial(), version())
                .prop_map(|(serial, version)| C::StartStationUpdate { serial, version }),
            (serial(), any::<bool>(), any::<bool>()).prop_map(|(serial, a, c)| C::ResetStation {
                serial,
                delete_authentication: a,
                delete_configuration: c
            }),
            serial().prop_map(|serial| C::RemoveStation { serial }),
        ]
    }

    fn phone_command() -> impl Strategy<Value = OperatorCommand> {
        use OperatorCommand as C;
        prop_oneof![
            (mac(), text(), text(), text()).prop_map(|(mac, vendor, kind, site)| {
                C::CreatePhone {
                    mac,
                    vendor,
                    kind,
                    site,
                }
            }),
            (limit(), after()).prop_map(|(limit, after)| C::ListPhones { limit, after }),
            mac().prop_map(|mac| C::GetPhone { mac }),
            mac().prop_map(|mac| C::SuspendPhoneAuthentication { mac }),
            mac().prop_map(|mac| C::ResetPhoneAuthentication { mac }),
            mac().prop_map(|mac| C::DeletePhone { mac }),
            (whitelist_entry(), any::<bool>())
                .prop_map(|(entry, force)| C::AddWhitelistEntry { entry, force }),
            whitelist_entry().prop_map(|entry| C::RemoveWhitelistEntry { entry }),
            Just(C::ListWhitelist),
            Just(C::ListFirmware),
            Just(C::ExportDevicesCsv),
            ".{0,200}".prop_map(|csv| C::ImportPhonesCsv { csv }),
        ]
    }

    fn fleet_command() -> impl Strategy<Value = OperatorCommand> {
        use OperatorCommand as C;
        prop_oneof![
            (limit(), proptest::option::of(any::<u64>()))
                .prop_map(|(limit, after_seq)| C::ListAuditLog { limit, after_seq }),
            Just(C::ListOperators),
            text().prop_map(|name| C::RevokeOperator { name }),
            Just(C::ListAddressBlocks),
            ip().prop_map(|ip| C::LiftAddressBlock {
                address: IpAddress::new(ip)
            }),
            ip().prop_map(|ip| C::Explain {
                subject: Subject::Address(IpAddress::new(ip))
            }),
            "[A-Za-z0-9:-]{1,40}".prop_filter_map("a subject", |text| Subject::parse(&text)
                .ok()
                .map(|subject| C::Explain { subject })),
        ]
    }

    fn command() -> impl Strategy<Value = OperatorCommand> {
        prop_oneof![station_command(), phone_command(), fleet_command()]
    }

    proptest! {
        #[test]
        fn every_command_round_trips_through_its_wire_json(command in command()) {
            let wire = command.to_json();
            prop_assert_eq!(wire["command"].as_str(), Some(command.name().as_str()));
            prop_assert_eq!(OperatorCommand::from_entry(&wire), Ok(command.clone()));
            // Serialize writes the same, and a wire payload survives a trip through bytes.
            let text = serde_json::to_string(&command).expect("serializes");
            let back: Value = serde_json::from_str(&text).expect("JSON");
            prop_assert_eq!(&back, &wire);
            prop_assert_eq!(OperatorCommand::from_entry(&back), Ok(command));
        }
    }
}
