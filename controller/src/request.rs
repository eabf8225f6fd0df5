//! The operator request envelope (PROTOCOL §3, §6) and the arguments of its commands, parsed
//! without I/O: the controller's shell and the `operator_request` fuzz target run the same code.

use serde_json::Value;

use fleet_protocol::{CommandError, Fingerprint, Mac, Serial};

/// Longest vendor, type or site accepted from an operator.
pub const MAX_TEXT: usize = 256;

/// `listAuditLog`'s `limit` when absent (PROTOCOL §6).
pub const DEFAULT_AUDIT_LIMIT: usize = 100;

/// Largest `limit` of `listAuditLog` (PROTOCOL §6).
pub const MAX_AUDIT_LIMIT: usize = 10_000;

/// One entry of a request's `commands` array. An entry whose `command` is not a string is still
/// an entry, so that it gets its own error response in its place.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedCommand {
    /// The command's name, or why there is none usable.
    pub name: Result<String, CommandError>,
    /// `correlationData`, echoed unchanged; `null` if absent.
    pub correlation: Value,
    /// The whole entry: the arguments sit beside `command` (a non-string `command` can be
    /// echoed from here).
    pub args: Value,
}

/// Parses a request payload: `{"commands": [{"command": "<name>", …, "correlationData": …}]}`.
///
/// `Err` is a request that is unusable as a whole (not JSON, no `commands` array, more than
/// `max_commands` entries): PROTOCOL §6 answers it with a single error entry.
pub fn parse_request(
    payload: &[u8],
    max_commands: usize,
) -> Result<Vec<RequestedCommand>, CommandError> {
    // serde_json limits nesting to 128 levels, so hostile depth cannot exhaust the stack.
    let mut envelope: Value = serde_json::from_slice(payload)
        .map_err(|e| CommandError::invalid_argument(format!("request is not JSON: {e}")))?;
    let Some(Value::Array(commands)) = envelope.get_mut("commands").map(Value::take) else {
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
    Ok(commands.into_iter().map(requested_command).collect())
}

fn requested_command(entry: Value) -> RequestedCommand {
    let name = match entry.get("command") {
        Some(Value::String(name)) => Ok(name.clone()),
        _ => Err(CommandError::invalid_argument(
            "\"command\" must be a string",
        )),
    };
    let correlation = entry.get("correlationData").cloned().unwrap_or(Value::Null);
    RequestedCommand {
        name,
        correlation,
        args: entry,
    }
}

/// `serial`: required, a valid station serial.
pub fn serial_arg(args: &Value) -> Result<Serial, CommandError> {
    match args.get("serial") {
        Some(Value::String(s)) => {
            Serial::parse(s).map_err(|e| CommandError::invalid_argument(format!("serial: {e}")))
        }
        Some(_) => Err(CommandError::invalid_argument(
            "\"serial\" must be a string",
        )),
        None => Err(CommandError::invalid_argument("missing \"serial\"")),
    }
}

/// `fingerprint`: required, the station key the operator checked.
pub fn fingerprint_arg(args: &Value) -> Result<Fingerprint, CommandError> {
    match args.get("fingerprint") {
        Some(Value::String(s)) => s
            .parse()
            .map_err(|e| CommandError::invalid_argument(format!("fingerprint: {e}"))),
        Some(_) => Err(CommandError::invalid_argument(
            "\"fingerprint\" must be a string",
        )),
        None => Err(CommandError::invalid_argument(
            "missing \"fingerprint\": the operator must confirm the station's key",
        )),
    }
}

/// A flag such as `resetStation`'s `delete_authentication`: `false` when absent or `null`.
pub fn bool_arg(args: &Value, key: &str) -> Result<bool, CommandError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(CommandError::invalid_argument(format!(
            "\"{key}\" must be true or false"
        ))),
    }
}

/// `mac`: required, a phone's MAC address.
pub fn mac_arg(args: &Value) -> Result<Mac, CommandError> {
    match args.get("mac") {
        Some(Value::String(s)) => {
            Mac::parse(s).map_err(|e| CommandError::invalid_argument(format!("mac: {e}")))
        }
        Some(_) => Err(CommandError::invalid_argument("\"mac\" must be a string")),
        None => Err(CommandError::invalid_argument("missing \"mac\"")),
    }
}

/// A free-text field of a phone: optional (empty), a string, not too long, no control characters.
pub fn text_arg(args: &Value, key: &str, required: bool) -> Result<String, CommandError> {
    match args.get(key) {
        None | Some(Value::Null) if !required => Ok(String::new()),
        None | Some(Value::Null) => {
            Err(CommandError::invalid_argument(format!("missing \"{key}\"")))
        }
        Some(Value::String(s)) if s.len() > MAX_TEXT => Err(CommandError::invalid_argument(
            format!("\"{key}\" is longer than {MAX_TEXT} bytes"),
        )),
        Some(Value::String(s)) if s.chars().any(char::is_control) => Err(
            CommandError::invalid_argument(format!("\"{key}\" contains control characters")),
        ),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(CommandError::invalid_argument(format!(
            "\"{key}\" must be a string"
        ))),
    }
}

/// `after_seq`: optional; when present, `listAuditLog` pages oldest first through records with a
/// greater sequence number (how `fleetctl audit verify` walks the whole chain).
pub fn after_seq_arg(args: &Value) -> Result<Option<u64>, CommandError> {
    match args.get("after_seq") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            CommandError::invalid_argument("\"after_seq\" must be a non-negative integer")
        }),
    }
}

/// `after` of a paged list: the serial or MAC after which the page starts (the `next` of the
/// previous page); absent or `null` for the first page.
pub fn after_arg(args: &Value) -> Result<Option<String>, CommandError> {
    match args.get("after") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_TEXT => Ok(Some(s.clone())),
        Some(_) => Err(CommandError::invalid_argument(format!(
            "\"after\" must be a string of at most {MAX_TEXT} characters"
        ))),
    }
}

/// `limit` of a paged list other than the audit log: 1 to 10000, the page size when absent.
/// The shell caps it at the configured page size.
pub fn page_limit_arg(args: &Value, page_size: usize) -> Result<usize, CommandError> {
    match args.get("limit") {
        None | Some(Value::Null) => Ok(page_size),
        Some(_) => limit_arg(args),
    }
}

/// `listAuditLog`'s `limit`: 1 to 10000, 100 when absent or `null`.
pub fn limit_arg(args: &Value) -> Result<usize, CommandError> {
    let invalid = || {
        CommandError::invalid_argument(format!(
            "\"limit\" must be an integer from 1 to {MAX_AUDIT_LIMIT}"
        ))
    };
    match args.get("limit") {
        None | Some(Value::Null) => Ok(DEFAULT_AUDIT_LIMIT),
        Some(v) => {
            let limit = v.as_u64().ok_or_else(invalid)?;
            usize::try_from(limit)
                .ok()
                .filter(|l| (1..=MAX_AUDIT_LIMIT).contains(l))
                .ok_or_else(invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_protocol::ErrorCode;
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
            {"command": "listStations"}
        ], "extra": true}"#;
        let commands = parse_request(payload, 10).expect("usable");
        assert_eq!(commands.len(), 3);
        assert_eq!(commands[0].name.as_deref(), Ok("getStation"));
        assert_eq!(commands[0].correlation, json!({"n": 1}));
        assert_eq!(commands[0].args["serial"], "S1");
        assert!(commands[1].name.is_err());
        assert_eq!(commands[1].correlation, "x");
        assert_eq!(commands[1].args["command"], 5);
        assert_eq!(commands[2].name.as_deref(), Ok("listStations"));
        assert_eq!(commands[2].correlation, Value::Null);
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
    fn station_arguments() {
        assert_eq!(
            serial_arg(&json!({"serial": "S1"})).map(|s| s.to_string()),
            Ok("S1".to_owned())
        );
        assert_eq!(invalid(serial_arg(&json!({}))), "missing \"serial\"");
        assert_eq!(
            invalid(serial_arg(&json!({"serial": 1}))),
            "\"serial\" must be a string"
        );
        assert!(invalid(serial_arg(&json!({"serial": ""}))).starts_with("serial: "));

        let hex = "ab".repeat(32);
        assert!(fingerprint_arg(&json!({"fingerprint": hex})).is_ok());
        assert!(fingerprint_arg(&json!({"fingerprint": hex.to_uppercase()})).is_ok());
        assert!(invalid(fingerprint_arg(&json!({}))).starts_with("missing \"fingerprint\""));
        assert!(
            invalid(fingerprint_arg(&json!({"fingerprint": "ab"}))).starts_with("fingerprint: ")
        );

        assert_eq!(bool_arg(&json!({}), "f"), Ok(false));
        assert_eq!(bool_arg(&json!({"f": null}), "f"), Ok(false));
        assert_eq!(bool_arg(&json!({"f": true}), "f"), Ok(true));
        assert_eq!(
            invalid(bool_arg(&json!({"f": "true"}), "f")),
            "\"f\" must be true or false"
        );

        assert_eq!(limit_arg(&json!({})), Ok(DEFAULT_AUDIT_LIMIT));
        assert_eq!(limit_arg(&json!({"limit": null})), Ok(DEFAULT_AUDIT_LIMIT));
        assert_eq!(limit_arg(&json!({"limit": 1})), Ok(1));
        assert_eq!(limit_arg(&json!({"limit": 10_000})), Ok(10_000));
        for bad in [
            json!(0),
            json!(10_001),
            json!(-1),
            json!(1.5),
            json!("5"),
            json!(u64::MAX),
        ] {
            assert!(invalid(limit_arg(&json!({ "limit": bad }))).contains("1 to 10000"));
        }
    }

    #[test]
    fn phone_arguments() {
        assert!(mac_arg(&json!({"mac": "00:11:22:33:44:55"})).is_ok());
        assert_eq!(invalid(mac_arg(&json!({}))), "missing \"mac\"");
        assert_eq!(
            invalid(mac_arg(&json!({"mac": []}))),
            "\"mac\" must be a string"
        );
        assert!(invalid(mac_arg(&json!({"mac": "zz"}))).starts_with("mac: "));

        assert_eq!(text_arg(&json!({}), "site", false), Ok(String::new()));
        assert_eq!(
            invalid(text_arg(&json!({}), "site", true)),
            "missing \"site\""
        );
        assert_eq!(
            text_arg(&json!({"site": "Hall 2"}), "site", true),
            Ok("Hall 2".to_owned())
        );
        assert!(invalid(text_arg(&json!({"site": "a\nb"}), "site", true)).contains("control"));
        let long = "é".repeat(MAX_TEXT / 2 + 1);
        assert!(invalid(text_arg(&json!({ "site": long }), "site", true)).contains("longer"));
        assert!(invalid(text_arg(&json!({"site": 3}), "site", false)).contains("must be a string"));
    }

    /// Every argument parser on `args`; their results do not matter, only that they return.
    fn every_arg_parser(args: &Value) {
        let _ = serial_arg(args);
        let _ = fingerprint_arg(args);
        let _ = mac_arg(args);
        let _ = limit_arg(args);
        for key in [
            "delete_authentication",
            "delete_configuration",
            "vendor",
            "type",
            "site",
        ] {
            let _ = bool_arg(args, key);
            let _ = text_arg(args, key, true);
            let _ = text_arg(args, key, false);
        }
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            ".{0,80}".prop_map(Value::String),
            prop_oneof![
                Just("serial"),
                Just("fingerprint"),
                Just("mac"),
                Just("limit"),
                Just("site"),
                Just("command"),
                Just("commands"),
                Just("correlationData"),
            ]
            .prop_map(|s| Value::String(s.to_owned())),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::vec(
                    (
                        prop_oneof![
                            Just("serial".to_owned()),
                            Just("fingerprint".to_owned()),
                            Just("mac".to_owned()),
                            Just("limit".to_owned()),
                            Just("site".to_owned()),
                            Just("vendor".to_owned()),
                            Just("delete_authentication".to_owned()),
                            Just("command".to_owned()),
                            Just("commands".to_owned()),
                            Just("correlationData".to_owned()),
                            ".{0,12}",
                        ],
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
            if let Ok(commands) = parse_request(&payload, 16) {
                for command in &commands {
                    every_arg_parser(&command.args);
                }
            }
        }

        #[test]
        fn arbitrary_json_never_panics(value in json_value(), max in 0usize..10) {
            every_arg_parser(&value);
            let envelope = serde_json::json!({ "commands": [value.clone()] });
            for payload in [value.to_string(), envelope.to_string()] {
                match parse_request(payload.as_bytes(), max) {
                    Ok(commands) => {
                        prop_assert!(commands.len() <= max);
                        for command in &commands {
                            every_arg_parser(&command.args);
                        }
                    }
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
            let payload = json!({ "commands": entries }).to_string();
            let commands = parse_request(payload.as_bytes(), 8).expect("usable");
            prop_assert_eq!(commands.len(), names.len());
            for (i, (command, name)) in commands.iter().zip(&names).enumerate() {
                prop_assert_eq!(command.name.as_ref().ok(), name.as_ref());
                prop_assert_eq!(&command.correlation, &json!(i));
            }
        }
    }
}
