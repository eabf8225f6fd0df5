//! The `stations/<serial>/cmd` payloads a station obeys (PROTOCOL §3), parsed once at the edge.

use fleet_protocol::payload::{StationCommand, StationCommandError};
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
    /// The fields are read by the protocol's own parser ([`StationCommand::from_json`]).
    pub fn parse(payload: &[u8]) -> Result<(Command, Value), CommandError> {
        let value: Value = serde_json::from_slice(payload)?;
        let command = match StationCommand::from_json(&value) {
            Ok(command) => Command::from_protocol(command)?,
            Err(StationCommandError::Unknown(name)) => Command::Unknown(name),
            Err(StationCommandError::Field { command, field }) => {
                return Err(CommandError::Field { command, field })
            }
        };
        Ok((command, value))
    }

    fn from_protocol(command: StationCommand) -> Result<Command, CommandError> {
        Ok(match command {
            StationCommand::Authorized => Command::Authorized,
            StationCommand::Rejected => Command::Rejected,
            StationCommand::Removed => Command::Removed,
            StationCommand::Reset {
                delete_authentication,
                delete_configuration,
            } => Command::Reset {
                delete_authentication,
                delete_configuration,
            },
            StationCommand::Update {
                version,
                sha256,
                size,
            } => {
                let mut bytes = [0u8; 32];
                hex::decode_to_slice(&sha256, &mut bytes).map_err(|_| CommandError::Field {
                    command: "update".into(),
                    field: "sha256",
                })?;
                Command::Update(UpdateOrder {
                    version,
                    sha256: bytes,
                    size,
                })
            }
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
