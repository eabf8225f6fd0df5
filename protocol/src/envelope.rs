//! The envelopes of operator traffic (PROTOCOL §3, §6): a request `{"commands": […]}` on
//! `fleet/control/<operator>/request`, and its response `{"responses": […]}`, one entry per
//! command in the same order, each echoing the entry's `command` and `correlationData`.
//! [`parse_request`] is the one parser of a request: the controller, the `operator_request`
//! fuzz target and its corpus test all run it.

use serde_json::{Map, Value};

use crate::command::unnamed;
use crate::{CommandError, OperatorCommand};

/// The field of a request that holds its entries.
pub const COMMANDS: &str = "commands";
/// The field of a response that holds its entries.
pub const RESPONSES: &str = "responses";
/// The field of an entry that names its command.
pub const COMMAND: &str = "command";
/// The field of an entry that the response echoes unchanged.
pub const CORRELATION_DATA: &str = "correlationData";

/// Longest `serial` an entry's audit record names, in characters.
const MAX_NAMED_SERIAL: usize = 80;

/// One entry of a request's `commands` array, parsed. An entry whose command cannot be
/// parsed is still an entry, so that it gets its own error response in its place.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestEntry {
    /// `command` exactly as sent (`null` if absent), for the response to echo.
    pub echo: Value,
    /// `correlationData`, echoed unchanged; `null` if absent.
    pub correlation: Value,
    pub command: EntryCommand,
}

/// What an entry asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum EntryCommand {
    /// `command` is missing or not a string: the entry asks for nothing, and is refused with
    /// this error.
    Unnamed(CommandError),
    /// `command` is a string, the name of a command or not.
    Named {
        /// The name as sent.
        name: String,
        /// The entry's `serial` as sent, valid or not, at most 80 characters (else its `mac`,
        /// else its `subject` unless that is an IP address: `explain` of an address names no
        /// device): what the audit record of a refused or read command names as its device.
        named_serial: Option<String>,
        /// The command with all its arguments, or why there is none.
        parsed: Result<OperatorCommand, CommandError>,
    },
}

impl RequestEntry {
    /// Parses one entry (any JSON value: a non-object has no command).
    pub fn parse(entry: &Value) -> RequestEntry {
        let parsed = OperatorCommand::from_entry(entry);
        let command = match entry.get(COMMAND) {
            Some(Value::String(name)) => EntryCommand::Named {
                name: name.clone(),
                named_serial: ["serial", "mac", "subject"]
                    .iter()
                    .find_map(|key| entry.get(*key).and_then(Value::as_str))
                    .filter(|named| named.parse::<std::net::IpAddr>().is_err())
                    .map(|s| s.chars().take(MAX_NAMED_SERIAL).collect()),
                parsed,
            },
            // `from_entry` refuses an entry without a string `command` before anything else.
            _ => EntryCommand::Unnamed(parsed.err().unwrap_or_else(unnamed)),
        };
        RequestEntry {
            echo: entry.get(COMMAND).cloned().unwrap_or(Value::Null),
            correlation: entry.get(CORRELATION_DATA).cloned().unwrap_or(Value::Null),
            command,
        }
    }

    /// The entry's `command`, if it is a string (a known command's name or not).
    pub fn name(&self) -> Option<&str> {
        match &self.command {
            EntryCommand::Named { name, .. } => Some(name),
            EntryCommand::Unnamed(_) => None,
        }
    }
}

/// Parses a request payload: `{"commands": [{"command": "<name>", …, "correlationData": …}]}`.
///
/// `Err` is a request that is unusable as a whole (not JSON, no `commands` array, more than
/// `max_commands` entries): PROTOCOL §6 answers it with a single error entry.
pub fn parse_request(
    payload: &[u8],
    max_commands: usize,
) -> Result<Vec<RequestEntry>, CommandError> {
    // serde_json limits nesting to 128 levels, so hostile depth cannot exhaust the stack.
    let mut envelope: Value = serde_json::from_slice(payload)
        .map_err(|e| CommandError::invalid_argument(format!("request is not JSON: {e}")))?;
    let Some(Value::Array(commands)) = envelope.get_mut(COMMANDS).map(Value::take) else {
        return Err(CommandError::invalid_argument(
            "request has no \"commands\" array",
        ));
    };
    if commands.len() > max_commands {
        return Err(CommandError::invalid_argument(format!(
            "request has {} commands, more than {max_commands}",
            commands.len()
        )));
    }
    Ok(commands.iter().map(RequestEntry::parse).collect())
}

/// A request as it goes on the wire: `entries` (each a command's JSON object, with its
/// `correlationData`) under `commands`.
pub fn request_json(entries: Vec<Value>) -> Value {
    let mut request = Map::new();
    request.insert(COMMANDS.into(), Value::Array(entries));
    Value::Object(request)
}

/// One entry of a response: the request entry's `command` and `correlationData`, and the
/// command's `data` or its error.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponseEntry {
    pub command: Value,
    pub correlation: Value,
    pub outcome: Result<Value, CommandError>,
}

impl ResponseEntry {
    /// The answer to the request as a whole (PROTOCOL §6: `"command": null`,
    /// `"correlationData": null`).
    pub fn to_request(error: CommandError) -> ResponseEntry {
        ResponseEntry {
            command: Value::Null,
            correlation: Value::Null,
            outcome: Err(error),
        }
    }

    /// `{"command", "correlationData", "data"}` or `{"command", "correlationData", "error",
    /// "code"}`.
    pub fn to_json(&self) -> Value {
        let mut entry = Map::new();
        entry.insert(COMMAND.into(), self.command.clone());
        entry.insert(CORRELATION_DATA.into(), self.correlation.clone());
        match &self.outcome {
            Ok(data) => {
                entry.insert("data".into(), data.clone());
            }
            Err(e) => {
                entry.insert("error".into(), e.message.clone().into());
                entry.insert("code".into(), e.code.as_str().into());
            }
        }
        Value::Object(entry)
    }
}

/// A response as it goes on the wire: `entries` (each [`ResponseEntry::to_json`]) under
/// `responses`.
pub fn response_json(entries: Vec<Value>) -> Value {
    let mut response = Map::new();
    response.insert(RESPONSES.into(), Value::Array(entries));
    Value::Object(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ErrorCode, Serial};
    use proptest::prelude::*;
    use serde_json::json;

    fn invalid(result: Result<impl std::fmt::Debug, CommandError>) -> String {
        let e = result.expect_err("should be refused");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        e.message
    }

    #[test]
    fn parses_every_entry_in_order() {
        let payload = br#"{"commands": [
            {"command": "getStation", "serial": "S1", "correlationData": {"n": 1}},
            {"command": 5, "correlationData": "x"},
            {"command": "listStations"},
            {"command": "getStation", "serial": "not a serial"}
        ], "extra": true}"#;
        let entries = parse_request(payload, 10).expect("usable");
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[0].name(), Some("getStation"));
        assert_eq!(entries[0].correlation, json!({"n": 1}));
        assert_eq!(
            entries[0].command,
            EntryCommand::Named {
                name: "getStation".into(),
                named_serial: Some("S1".into()),
                parsed: Ok(OperatorCommand::GetStation {
                    serial: Serial::parse("S1").unwrap()
                }),
            }
        );
        assert_eq!(
            entries[1].command,
            EntryCommand::Unnamed(CommandError::invalid_argument(
                "\"command\" must be a string"
            ))
        );
        assert_eq!(entries[1].name(), None);
        assert_eq!(entries[1].echo, 5);
        assert_eq!(entries[1].correlation, "x");
        assert_eq!(entries[2].name(), Some("listStations"));
        assert_eq!(entries[2].correlation, Value::Null);
        assert!(matches!(
            &entries[3].command,
            EntryCommand::Named { named_serial: Some(s), parsed: Err(_), .. } if s == "not a serial"
        ));
        // A phone's MAC, or the device `explain` explains, names the device of the audit record
        // too; an address is not a device.
        let payload = br#"{"commands": [
            {"command": "getPhone", "mac": "AA:BB:CC:DD:EE:01"},
            {"command": "explain", "subject": "192.0.2.7"},
            {"command": "explain", "subject": "ST-0001"}
        ]}"#;
        let named: Vec<Option<String>> = parse_request(payload, 10)
            .expect("usable")
            .into_iter()
            .map(|e| match e.command {
                EntryCommand::Named { named_serial, .. } => named_serial,
                EntryCommand::Unnamed(_) => None,
            })
            .collect();
        assert_eq!(
            named,
            [
                Some("AA:BB:CC:DD:EE:01".to_owned()),
                None,
                Some("ST-0001".to_owned())
            ]
        );
    }

    #[test]
    fn refuses_an_unusable_request_as_a_whole() {
        assert!(invalid(parse_request(b"{", 10)).starts_with("request is not JSON"));
        assert!(invalid(parse_request(b"[]", 10)).contains("no \"commands\" array"));
        assert!(invalid(parse_request(br#"{"commands": {}}"#, 10)).contains("\"commands\""));
        assert!(invalid(parse_request(b"\xff", 10)).starts_with("request is not JSON"));
        let three = br#"{"commands": [{}, {}, {}]}"#;
        assert!(invalid(parse_request(three, 2)).contains("more than 2"));
        assert_eq!(parse_request(three, 3).map(|c| c.len()), Ok(3));
        assert_eq!(parse_request(br#"{"commands": []}"#, 0), Ok(vec![]));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let mut payload = b"{\"commands\": [".to_vec();
        payload.extend(std::iter::repeat_n(b'[', 100_000));
        assert!(invalid(parse_request(&payload, 10)).starts_with("request is not JSON"));
    }

    #[test]
    fn responses_echo_their_entry() {
        let ok = ResponseEntry {
            command: json!("getStation"),
            correlation: json!({"n": 1}),
            outcome: Ok(json!({"serial": "S1"})),
        };
        assert_eq!(
            ok.to_json(),
            json!({"command": "getStation", "correlationData": {"n": 1}, "data": {"serial": "S1"}})
        );
        let whole = ResponseEntry::to_request(CommandError::invalid_argument("no"));
        assert_eq!(
            response_json(vec![whole.to_json()]),
            json!({"responses": [{"command": null, "correlationData": null,
                "error": "no", "code": "invalid_argument"}]})
        );
        assert_eq!(
            request_json(vec![json!({"command": "listOperators"})]),
            json!({"commands": [{"command": "listOperators"}]})
        );
    }

    /// Arbitrary JSON with the fields the commands read, and their names as strings.
    fn json_value() -> impl Strategy<Value = Value> {
        let names = || {
            prop_oneof![
                Just("serial"),
                Just("fingerprint"),
                Just("mac"),
                Just("limit"),
                Just("after"),
                Just("after_seq"),
                Just("site"),
                Just("vendor"),
                Just("type"),
                Just("entry"),
                Just("force"),
                Just("state"),
                Just("version"),
                Just("address"),
                Just("name"),
                Just("csv"),
                Just("delete_authentication"),
                Just("command"),
                Just("commands"),
                Just("correlationData"),
            ]
        };
        let command_name =
            proptest::sample::select(crate::CommandName::ALL.to_vec()).prop_map(|c| c.as_str());
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,80}".prop_map(Value::String),
            names().prop_map(|s| Value::String(s.to_owned())),
            command_name.prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(4, 64, 8, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![names().prop_map(str::to_owned), ".{0,12}"],
                        inner
                    ),
                    0..8
                )
                .prop_map(|fields| Value::Object(fields.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(payload in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(entries) = parse_request(&payload, 16) {
                prop_assert!(entries.len() <= 16);
            }
        }

        #[test]
        fn arbitrary_json_never_panics(value in json_value(), max in 0usize..10) {
            let _ = RequestEntry::parse(&value);
            let envelope = json!({ "commands": [value.clone()] });
            for payload in [value.to_string(), envelope.to_string()] {
                match parse_request(payload.as_bytes(), max) {
                    Ok(entries) => prop_assert!(entries.len() <= max),
                    Err(e) => prop_assert_eq!(e.code, ErrorCode::InvalidArgument),
                }
            }
        }

        #[test]
        fn every_entry_is_kept_in_order(names in prop::collection::vec(any::<Option<String>>(), 0..8)) {
            let entries: Vec<Value> = names
                .iter()
                .enumerate()
                .map(|(i, n)| json!({"command": n, "correlationData": i}))
                .collect();
            let payload = request_json(entries).to_string();
            let parsed = parse_request(payload.as_bytes(), 8).expect("usable");
            prop_assert_eq!(parsed.len(), names.len());
            for (i, (entry, name)) in parsed.iter().zip(&names).enumerate() {
                prop_assert_eq!(entry.name(), name.as_deref());
                prop_assert_eq!(&entry.correlation, &json!(i));
            }
        }
    }
}
