//! An operator request payload, through the controller's envelope parser and then every
//! argument parser on every command's arguments (as the command dispatch would call them).

#![no_main]

use fleet_controller::request::{
    bool_arg, fingerprint_arg, limit_arg, mac_arg, parse_request, serial_arg, text_arg,
};
use libfuzzer_sys::fuzz_target;

/// More than any real request carries; the parser's own limit is what is fuzzed.
const MAX_COMMANDS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Ok(commands) = parse_request(data, MAX_COMMANDS) else {
        return;
    };
    assert!(commands.len() <= MAX_COMMANDS);
    for command in &commands {
        let args = &command.args;
        let _ = serial_arg(args);
        let _ = fingerprint_arg(args);
        let _ = mac_arg(args);
        let _ = limit_arg(args);
        for key in ["delete_authentication", "delete_configuration"] {
            let _ = bool_arg(args, key);
        }
        for key in ["vendor", "type", "site", "entry", "csv", "state", "version"] {
            let _ = text_arg(args, key, true);
            let _ = text_arg(args, key, false);
        }
    }
});
