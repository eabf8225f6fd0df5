//! The `stations/<serial>/cmd` payloads a station obeys (PROTOCOL §3), parsed once at the edge.

use serde_json::Value;

use crate::firmware::UpdateOrder;

/// A command from the controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// The operator accepted the station.
    Authorized,
    /// The operator rejected the station; the broker will cut it.
    Rejected,
    /// The station was removed from the controller: forget being authorized, reboot.
    Removed,
    /// Reset Device from the controller, then reboot.
    Reset {
        /// Delete the key pair and the authorized flag.
        delete_authentication: bool,
        /// Restore the default configuration.
        delete_configuration: bool,
    },
    /// Download and install a firmware image.
    Update(UpdateOrder),
    /// A command this station does not know; logged and ignored.
    Unknown(String),
}

/// A `cmd` payload that cannot be obeyed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Not a JSON object.
    #[error("command is not a JSON object: {0}")]
    Json(#[from] serde_json::Error),
    /// A required field is missing or of the wrong type.
    #[error("command {command:?}: field {field:?} is missing or malformed")]
    Field {
        /// The command name, if there was one.
        command: String,
        /// The field.
        field: &'static str,
    },
}

impl Command {
    /// Parses a `cmd` payload; returns the command and the whole payload (for logs and events).
    pub fn parse(payload: &[u8]) -> Result<(Command, Value), CommandError> {
        let value: Value = serde_json::from_slice(payload)?;
        let command = Self::from_json(&value)?;
        Ok((command, value))
    }

    fn from_json(value: &Value) -> Result<Command, CommandError> {
        let name = value
            .get("command")
            .and_then(Value::as_str)
            .ok_or(CommandError::Field {
                command: String::new(),
                field: "command",
            })?;
        let missing = |field| CommandError::Field {
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
            "authorized" => Command::Authorized,
            "rejected" => Command::Rejected,
            "removed" => Command::Removed,
            "reset" => Command::Reset {
                delete_authentication: flag("delete_authentication")?,
                delete_configuration: flag("delete_configuration")?,
            },
            "update" => {
                let version = value
                    .get("version")
                    .and_then(Value::as_str)
                    .filter(|v| !v.is_empty())
                    .ok_or(missing("version"))?;
                let sha256 = value
                    .get("sha256")
                    .and_then(Value::as_str)
                    .and_then(|text| {
                        let mut bytes = [0u8; 32];
                        hex::decode_to_slice(text, &mut bytes).ok().map(|()| bytes)
                    })
                    .ok_or(missing("sha256"))?;
                let size = value
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or(missing("size"))?;
                Command::Update(UpdateOrder {
                    version: version.to_owned(),
                    sha256,
                    size,
                })
            }
            other => Command::Unknown(other.to_owned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Command, CommandError> {
        Command::parse(text.as_bytes()).map(|(command, _)| command)
    }

    #[test]
    fn parses_every_command_of_the_contract() {
        assert_eq!(
            parse(r#"{"command":"authorized"}"#).unwrap(),
            Command::Authorized
        );
        assert_eq!(
            parse(r#"{"command":"rejected"}"#).unwrap(),
            Command::Rejected
        );
        assert_eq!(
            parse(r#"{"command":"removed","extra":1}"#).unwrap(),
            Command::Removed
        );
        assert_eq!(
            parse(
                r#"{"command":"reset","delete_authentication":true,"delete_configuration":false}"#
            )
            .unwrap(),
            Command::Reset {
                delete_authentication: true,
                delete_configuration: false
            }
        );
        let sha = "AB".repeat(32);
        let update = parse(&format!(
            r#"{{"command":"update","version":"6.1.0","sha256":"{sha}","size":1234}}"#
        ))
        .unwrap();
        assert_eq!(
            update,
            Command::Update(UpdateOrder {
                version: "6.1.0".into(),
                sha256: [0xab; 32],
                size: 1234
            })
        );
        assert_eq!(
            parse(r#"{"command":"dance"}"#).unwrap(),
            Command::Unknown("dance".into())
        );
    }

    #[test]
    fn malformed_commands_are_errors() {
        for text in [
            "",
            "[]",
            "null",
            r#"{"nocommand":1}"#,
            r#"{"command":5}"#,
            r#"{"command":"reset","delete_authentication":"yes","delete_configuration":false}"#,
            r#"{"command":"reset","delete_authentication":true}"#,
            r#"{"command":"update","version":"6.1.0","sha256":"zz","size":1}"#,
            r#"{"command":"update","version":"6.1.0","sha256":"abcd","size":1}"#,
            r#"{"command":"update","sha256":"00","size":-1}"#,
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
