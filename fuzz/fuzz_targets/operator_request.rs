//! An operator request payload through the one request parser: the envelope and every entry's
//! command with all its arguments (`fleet_protocol::envelope::parse_request`, which the
//! controller runs on every request).

#![no_main]

use fleet_protocol::envelope::{parse_request, EntryCommand};
use libfuzzer_sys::fuzz_target;

/// More than any real request carries; the parser's own limit is what is fuzzed.
const MAX_COMMANDS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(entries) = parse_request(data, MAX_COMMANDS) else {
        return;
    };
    assert!(entries.len() <= MAX_COMMANDS);
    for entry in &entries {
        // What parses is what the wire form of the command reads back as.
        if let EntryCommand::Named {
            parsed: Ok(command),
            ..
        } = &entry.command
        {
            let again = fleet_protocol::OperatorCommand::from_entry(&command.to_json());
            assert_eq!(again.as_ref(), Ok(command));
        }
    }
});
