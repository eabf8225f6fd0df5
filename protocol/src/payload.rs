//! The payloads of the device topics (PROTOCOL §3) that both sides read or write: a command
//! to a station (`stations/<serial>/cmd`), a station's auth request, and the firmware transfer
//! (`…/firmware/request` and `…/firmware/chunk`, docs/protocol.md).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{CommandError, IdError, Serial};

/// Longest text accepted for a field of an auth request; a station has no reason to send more.
pub const MAX_FIELD_LEN: usize = 256;

/// A command to a station (PROTOCOL §3, `stations/<serial>/cmd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StationCommand {
    Authorized,
    Rejected,
    Update {
        version: String,
        sha256: String,
        size: u64,
    },
    Reset {
        delete_authentication: bool,
        delete_configuration: bool,
    },
    Removed,
}

impl StationCommand {
    /// The value of the `command` field.
    pub fn name(&self) -> &'static str {
        match self {
            StationCommand::Authorized => "authorized",
            StationCommand::Rejected => "rejected",
            StationCommand::Update { .. } => "update",
            StationCommand::Reset { .. } => "reset",
            StationCommand::Removed => "removed",
        }
    }

    /// The JSON payload, exactly as PROTOCOL §3 writes it.
    pub fn payload(&self) -> Value {
        match self {
            StationCommand::Authorized | StationCommand::Rejected | StationCommand::Removed => {
                json!({ "command": self.name() })
            }
            StationCommand::Update {
                version,
                sha256,
                size,
            } => json!({
                "command": self.name(),
                "version": version,
                "sha256": sha256,
                "size": size,
            }),
            StationCommand::Reset {
                delete_authentication,
                delete_configuration,
            } => json!({
                "command": self.name(),
                "delete_authentication": delete_authentication,
                "delete_configuration": delete_configuration,
            }),
        }
    }

    /// Reads a `cmd` payload as a station does; unknown fields are ignored (PROTOCOL §3). An
    /// `update`'s `sha256` must be 64 hex digits and its `version` not empty.
    pub fn from_json(value: &Value) -> Result<StationCommand, StationCommandError> {
        let name =
            value
                .get("command")
                .and_then(Value::as_str)
                .ok_or(StationCommandError::Field {
                    command: String::new(),
                    field: "command",
                })?;
        let missing = |field| StationCommandError::Field {
            command: name.to_owned(),
            field,
        };
        let flag = |field| {
            value
                .get(field)
                .and_then(Value::as_bool)
                .ok_or(missing(field))
        };
        Ok(match name {
            "authorized" => StationCommand::Authorized,
            "rejected" => StationCommand::Rejected,
            "removed" => StationCommand::Removed,
            "reset" => StationCommand::Reset {
                delete_authentication: flag("delete_authentication")?,
                delete_configuration: flag("delete_configuration")?,
            },
            "update" => StationCommand::Update {
                version: value
                    .get("version")
                    .and_then(Value::as_str)
                    .filter(|v| !v.is_empty())
                    .ok_or(missing("version"))?
                    .to_owned(),
                sha256: value
                    .get("sha256")
                    .and_then(Value::as_str)
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or(missing("sha256"))?
                    .to_owned(),
                size: value
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or(missing("size"))?,
            },
            other => return Err(StationCommandError::Unknown(other.to_owned())),
        })
    }
}

/// Why a `cmd` payload is no command a station can obey.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StationCommandError {
    /// A required field is missing or of the wrong type.
    #[error("command {command:?}: field {field:?} is missing or malformed")]
    Field {
        /// The command name, if there was one.
        command: String,
        /// The field.
        field: &'static str,
    },
    /// A command this version of the protocol does not know.
    #[error("unknown command {0:?}")]
    Unknown(String),
}

/// A station's `stations/<serial>/auth/request`, checked against the topic's serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthRequest {
    pub model: String,
    pub firmware: String,
    pub mac_streaming: String,
    pub mac_control: String,
}

/// Why an auth request payload is refused; it changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRequestError {
    #[error("auth request is not JSON: {0}")]
    NotJson(String),
    #[error("auth request is not a JSON object")]
    NotAnObject,
    #[error("auth request has no {0:?}")]
    Missing(&'static str),
    #[error("auth request field {0:?} is not a string")]
    NotAString(&'static str),
    #[error("auth request field {0:?} is longer than {MAX_FIELD_LEN} bytes")]
    TooLong(&'static str),
    /// A control character (a line break, an escape sequence) in a field that operators read
    /// in their terminal and console.
    #[error("auth request field {0:?} contains control characters")]
    ControlCharacters(&'static str),
    #[error("auth request serial: {0}")]
    Serial(IdError),
    #[error("auth request for serial {payload} came on the topic of {topic}")]
    SerialMismatch { topic: Serial, payload: Serial },
}

impl From<AuthRequestError> for CommandError {
    fn from(error: AuthRequestError) -> CommandError {
        CommandError::invalid_argument(error.to_string())
    }
}

impl AuthRequest {
    /// Parses the payload received on `stations/<topic_serial>/auth/request`.
    pub fn parse(topic_serial: &Serial, payload: &[u8]) -> Result<AuthRequest, AuthRequestError> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|error| AuthRequestError::NotJson(error.to_string()))?;
        AuthRequest::from_json(topic_serial, &value)
    }

    /// Reads the request from JSON; unknown fields are ignored (PROTOCOL §3).
    pub fn from_json(
        topic_serial: &Serial,
        value: &Value,
    ) -> Result<AuthRequest, AuthRequestError> {
        let object = value.as_object().ok_or(AuthRequestError::NotAnObject)?;
        let field = |name: &'static str| -> Result<String, AuthRequestError> {
            match object.get(name) {
                None | Some(Value::Null) => Err(AuthRequestError::Missing(name)),
                Some(Value::String(text)) if text.len() > MAX_FIELD_LEN => {
                    Err(AuthRequestError::TooLong(name))
                }
                Some(Value::String(text)) if text.chars().any(char::is_control) => {
                    Err(AuthRequestError::ControlCharacters(name))
                }
                Some(Value::String(text)) => Ok(text.clone()),
                Some(_) => Err(AuthRequestError::NotAString(name)),
            }
        };
        let serial = Serial::parse(&field("serial")?).map_err(AuthRequestError::Serial)?;
        if &serial != topic_serial {
            return Err(AuthRequestError::SerialMismatch {
                topic: topic_serial.clone(),
                payload: serial,
            });
        }
        Ok(AuthRequest {
            model: field("model")?,
            firmware: field("firmware")?,
            mac_streaming: field("mac_streaming")?,
            mac_control: field("mac_control")?,
        })
    }
}

/// Payload of `stations/<serial>/firmware/request`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirmwareRequest {
    /// Version being downloaded.
    pub version: String,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted.
    pub length: u64,
}

/// Payload of `stations/<serial>/firmware/chunk`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirmwareChunk {
    /// Bytes of the image.
    Data {
        /// Version they belong to.
        version: String,
        /// Position of the first byte.
        offset: u64,
        /// Size of the whole image.
        total: u64,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The controller cannot serve the request.
    Error {
        /// Version asked for.
        version: String,
        /// Human-readable reason.
        error: String,
        /// Machine code: `not_found`, `invalid_argument`, ….
        code: String,
    },
}

/// A chunk payload that cannot be understood.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// Not the JSON described in the contract.
    #[error("malformed chunk: {0}")]
    Json(#[from] serde_json::Error),
    /// `data` is not standard base64.
    #[error("chunk data is not base64: {0}")]
    Base64(#[from] base64::DecodeError),
    /// Neither `data` nor `error`.
    #[error("chunk has neither data nor error")]
    Incomplete,
}

#[derive(Deserialize)]
struct RawChunk {
    version: String,
    offset: Option<u64>,
    total: Option<u64>,
    data: Option<String>,
    error: Option<String>,
    code: Option<String>,
}

impl FirmwareChunk {
    /// Parses a `firmware/chunk` payload.
    pub fn parse(payload: &[u8]) -> Result<Self, ChunkError> {
        let raw: RawChunk = serde_json::from_slice(payload)?;
        if let Some(error) = raw.error {
            return Ok(FirmwareChunk::Error {
                version: raw.version,
                error,
                code: raw.code.unwrap_or_default(),
            });
        }
        match (raw.offset, raw.total, raw.data) {
            (Some(offset), Some(total), Some(data)) => Ok(FirmwareChunk::Data {
                version: raw.version,
                offset,
                total,
                data: base64::engine::general_purpose::STANDARD.decode(data)?,
            }),
            _ => Err(ChunkError::Incomplete),
        }
    }

    /// The payload as the controller sends it.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            FirmwareChunk::Data {
                version,
                offset,
                total,
                data,
            } => json!({
                "version": version,
                "offset": offset,
                "total": total,
                "data": base64::engine::general_purpose::STANDARD.encode(data),
            }),
            FirmwareChunk::Error {
                version,
                error,
                code,
            } => json!({ "version": version, "error": error, "code": code }),
        }
    }
}

impl FirmwareRequest {
    /// Reads a request as the controller does: `version` and `length` may be missing (`length`
    /// is then `default_length`), `offset` may not. Nothing in it is trusted further.
    pub fn read(payload: &[u8], default_length: u64) -> Result<FirmwareRequest, RequestError> {
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| RequestError::NotJson(e.to_string()))?;
        let version = value
            .get("version")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let Some(offset) = value.get("offset").and_then(Value::as_u64) else {
            return Err(RequestError::Offset { version });
        };
        let length = value
            .get("length")
            .and_then(Value::as_u64)
            .unwrap_or(default_length);
        Ok(FirmwareRequest {
            version,
            offset,
            length,
        })
    }
}

/// Why a firmware request cannot be served as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not JSON: there is no version to answer for ([`RequestError::reply`] has none).
    #[error("not JSON: {0}")]
    NotJson(String),
    /// No usable `offset`.
    #[error("offset must be a non-negative integer")]
    Offset {
        /// The version the request named, "" if none.
        version: String,
    },
}

impl RequestError {
    /// The `firmware/chunk` answer: an `invalid_argument` error, for the request's version if
    /// it named one.
    pub fn reply(&self) -> Value {
        match self {
            RequestError::NotJson(_) => {
                json!({"error": self.to_string(), "code": "invalid_argument"})
            }
            RequestError::Offset { version } => FirmwareChunk::Error {
                version: version.clone(),
                error: self.to_string(),
                code: "invalid_argument".into(),
            }
            .to_json(),
        }
    }
}

/// A phone's `phones/<mac>/provision/request` (PROTOCOL §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProvisionRequest {
    /// The phone's CSR, PEM.
    pub csr: String,
    pub vendor: String,
    /// The phone's `type`.
    pub kind: String,
}

impl ProvisionRequest {
    /// The payload as a phone sends it.
    pub fn to_json(&self) -> Value {
        json!({"csr": self.csr, "vendor": self.vendor, "type": self.kind})
    }

    /// The CSR of a request, as the controller reads it: `vendor` and `type` are the phone's
    /// own say and change nothing, so only `csr` must be there.
    pub fn csr_of(payload: &[u8]) -> Result<String, CommandError> {
        let value: Value = serde_json::from_slice(payload)
            .map_err(|e| CommandError::invalid_argument(format!("not JSON: {e}")))?;
        match value.get("csr").and_then(Value::as_str) {
            Some(csr) => Ok(csr.to_owned()),
            None => Err(CommandError::invalid_argument(
                "missing \"csr\" (a PEM string)",
            )),
        }
    }
}

/// The controller's `phones/<mac>/provision/response` (PROTOCOL §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProvisionResponse {
    /// The phone's certificate, the fleet CA and its configuration.
    Issued {
        certificate: String,
        ca: String,
        config: Option<Value>,
    },
    /// Why no certificate was issued.
    Refused { error: String, code: String },
}

impl ProvisionResponse {
    /// The payload as the controller sends it.
    pub fn to_json(&self) -> Value {
        match self {
            ProvisionResponse::Issued {
                certificate,
                ca,
                config,
            } => {
                let mut value = json!({"certificate": certificate, "ca": ca});
                if let Some(config) = config {
                    value["config"] = config.clone();
                }
                value
            }
            ProvisionResponse::Refused { error, code } => json!({"error": error, "code": code}),
        }
    }

    /// Reads a response as a phone does: a certificate with its CA, or an error (its `code` ""
    /// if none); anything else is refused with why.
    pub fn parse(payload: &[u8]) -> Result<ProvisionResponse, String> {
        let value: Value = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        let text = |field: &str| value.get(field).and_then(Value::as_str).map(str::to_owned);
        match (text("certificate"), text("ca"), text("error")) {
            (Some(certificate), Some(ca), _) => Ok(ProvisionResponse::Issued {
                certificate,
                ca,
                config: value.get("config").filter(|c| !c.is_null()).cloned(),
            }),
            (_, _, Some(error)) => Ok(ProvisionResponse::Refused {
                error,
                code: text("code").unwrap_or_default(),
            }),
            _ => Err("neither \"certificate\" and \"ca\" nor \"error\"".into()),
        }
    }
}

/// The columns of the devices CSV (`exportDevicesCsv`, `importPhonesCsv`; PROTOCOL §6), in
/// their order: the header is these names joined by `,`.
pub const DEVICES_CSV_COLUMNS: [&str; 7] = [
    "vendor",
    "type",
    "mac",
    "created_at",
    "site",
    "auth_state",
    "pap",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;
    use serde_json::json;

    #[test]
    fn command_payloads_match_the_protocol() {
        assert_eq!(
            StationCommand::Authorized.payload(),
            json!({"command": "authorized"})
        );
        assert_eq!(
            StationCommand::Rejected.payload(),
            json!({"command": "rejected"})
        );
        assert_eq!(
            StationCommand::Removed.payload(),
            json!({"command": "removed"})
        );
        assert_eq!(
            StationCommand::Update {
                version: "6.1.2".into(),
                sha256: "ab".into(),
                size: 7
            }
            .payload(),
            json!({"command": "update", "version": "6.1.2", "sha256": "ab", "size": 7})
        );
        assert_eq!(
            StationCommand::Reset {
                delete_authentication: true,
                delete_configuration: false
            }
            .payload(),
            json!({"command": "reset", "delete_authentication": true, "delete_configuration": false})
        );
    }

    #[test]
    fn auth_request_parsing_names_the_field() {
        let s = Serial::parse("MC-1").unwrap();
        let good = br#"{"serial":"MC-1","model":"M","firmware":"6.1.0","mac_streaming":"a","mac_control":"b","extra":1}"#;
        let req = AuthRequest::parse(&s, good).unwrap();
        assert_eq!(req.firmware, "6.1.0");
        assert!(matches!(
            AuthRequest::parse(&s, b"nope"),
            Err(AuthRequestError::NotJson(_))
        ));
        assert_eq!(
            AuthRequest::parse(&s, b"[1]"),
            Err(AuthRequestError::NotAnObject)
        );
        assert_eq!(
            AuthRequest::parse(&s, br#"{"serial":"MC-1","model":"M"}"#),
            Err(AuthRequestError::Missing("firmware"))
        );
        assert_eq!(
            AuthRequest::parse(
                &s,
                br#"{"serial":"MC-1","model":"M","firmware":610,"mac_streaming":"a","mac_control":"b"}"#
            ),
            Err(AuthRequestError::NotAString("firmware"))
        );
        let other = AuthRequest::parse(
            &s,
            br#"{"serial":"MC-2","model":"M","firmware":"6.1.0","mac_streaming":"a","mac_control":"b"}"#,
        );
        assert!(matches!(
            other,
            Err(AuthRequestError::SerialMismatch { .. })
        ));
        assert!(matches!(
            AuthRequest::parse(&s, br#"{"serial":"MC 1"}"#),
            Err(AuthRequestError::Serial(_))
        ));
        let long = format!(
            r#"{{"serial":"MC-1","model":"{}","firmware":"6.1.0","mac_streaming":"a","mac_control":"b"}}"#,
            "m".repeat(300)
        );
        assert_eq!(
            AuthRequest::parse(&s, long.as_bytes()),
            Err(AuthRequestError::TooLong("model"))
        );
        // An escape sequence or a line break would reach an operator's terminal.
        for (field, text) in [
            ("model", "MC\u{1b}[2J"),
            ("firmware", "6.1.0\nfake line"),
            ("mac_control", "\u{9b}31m"),
        ] {
            let mut request = json!({"serial": "MC-1", "model": "m", "firmware": "6.1.0",
                "mac_streaming": "a", "mac_control": "b"});
            request[field] = Value::String(text.into());
            assert_eq!(
                AuthRequest::parse(&s, request.to_string().as_bytes()),
                Err(AuthRequestError::ControlCharacters(field)),
                "{field}"
            );
        }
        let error: CommandError = AuthRequestError::Missing("model").into();
        assert_eq!(error.code, ErrorCode::InvalidArgument);
        assert!(error.message.contains("model"));
    }

    proptest::proptest! {
        #[test]
        fn every_station_command_reads_back_as_written(
            which in 0usize..5,
            version in "[0-9]{1,2}\\.[0-9]{1,2}\\.[0-9]{1,2}",
            sha256 in "[0-9a-fA-F]{64}",
            size: u64,
            flags: (bool, bool),
        ) {
            let command = match which {
                0 => StationCommand::Authorized,
                1 => StationCommand::Rejected,
                2 => StationCommand::Removed,
                3 => StationCommand::Update { version, sha256, size },
                _ => StationCommand::Reset {
                    delete_authentication: flags.0,
                    delete_configuration: flags.1,
                },
            };
            proptest::prop_assert_eq!(StationCommand::from_json(&command.payload()), Ok(command));
        }
    }

    #[test]
    fn a_cmd_that_is_not_one_says_which_field() {
        let field =
            |text: &str| match StationCommand::from_json(&serde_json::from_str(text).unwrap()) {
                Err(StationCommandError::Field { field, .. }) => field,
                other => panic!("{text}: {other:?}"),
            };
        assert_eq!(field(r#"{"nocommand":1}"#), "command");
        assert_eq!(
            field(r#"{"command":"reset","delete_authentication":true}"#),
            "delete_configuration"
        );
        assert_eq!(
            field(r#"{"command":"update","version":"6.1.0","sha256":"abcd","size":1}"#),
            "sha256"
        );
        assert_eq!(
            field(r#"{"command":"update","sha256":"00","size":-1}"#),
            "version"
        );
        assert_eq!(
            StationCommand::from_json(&json!({"command": "dance"})),
            Err(StationCommandError::Unknown("dance".into()))
        );
    }

    #[test]
    fn a_firmware_request_is_read_as_the_controller_reads_it() {
        let read = |text: &str| FirmwareRequest::read(text.as_bytes(), 16);
        assert_eq!(
            read(r#"{"version":"6.1.2","offset":32}"#),
            Ok(FirmwareRequest {
                version: "6.1.2".into(),
                offset: 32,
                length: 16
            })
        );
        let no_offset = read(r#"{"version":"6.1.2","offset":-1}"#).unwrap_err();
        assert_eq!(
            no_offset.reply(),
            json!({"version": "6.1.2", "error": "offset must be a non-negative integer", "code": "invalid_argument"})
        );
        let not_json = read("nope").unwrap_err();
        assert!(not_json.reply().get("version").is_none());
        assert_eq!(not_json.reply()["code"], "invalid_argument");
        let chunk = FirmwareChunk::Data {
            version: "6.1.2".into(),
            offset: 0,
            total: 3,
            data: b"abc".to_vec(),
        };
        let bytes = chunk.to_json().to_string();
        assert_eq!(FirmwareChunk::parse(bytes.as_bytes()).unwrap(), chunk);
    }

    #[test]
    fn provisioning_payloads_read_back_as_written() {
        let request = ProvisionRequest {
            csr: "PEM".into(),
            vendor: "Yealink".into(),
            kind: "T54W".into(),
        };
        let bytes = request.to_json().to_string();
        assert_eq!(ProvisionRequest::csr_of(bytes.as_bytes()), Ok("PEM".into()));
        let missing = ProvisionRequest::csr_of(b"{}").unwrap_err();
        assert_eq!(missing.message, "missing \"csr\" (a PEM string)");
        assert!(ProvisionRequest::csr_of(b"nope")
            .unwrap_err()
            .message
            .starts_with("not JSON"));
        for response in [
            ProvisionResponse::Issued {
                certificate: "C".into(),
                ca: "A".into(),
                config: Some(json!({"site": "Berlin"})),
            },
            ProvisionResponse::Refused {
                error: "no phone".into(),
                code: "not_found".into(),
            },
        ] {
            let bytes = response.to_json().to_string();
            assert_eq!(ProvisionResponse::parse(bytes.as_bytes()), Ok(response));
        }
        assert!(ProvisionResponse::parse(br#"{"certificate":"C"}"#).is_err());
    }
}
