//! Replays the `operator_request` fuzz corpus and its regressions through the request parser
//! (the envelope and every command's arguments) on stable: no input may panic.

use std::fs;
use std::path::Path;

use fleet_controller::request::parse_request;

/// As in fuzz/fuzz_targets/operator_request.rs.
const MAX_COMMANDS: usize = 64;

fn replay(dir: &str) -> (usize, usize) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let (mut files, mut commands) = (0, 0);
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if !path.is_file() {
            continue;
        }
        files += 1;
        let payload = fs::read(&path).expect("readable corpus file");
        let Ok(parsed) = parse_request(&payload, MAX_COMMANDS) else {
            continue;
        };
        assert!(parsed.len() <= MAX_COMMANDS, "{}", path.display());
        commands += parsed.len();
    }
    (files, commands)
}

#[test]
fn the_corpus_parses_without_panicking() {
    let (files, commands) = replay("fuzz/corpus/operator_request");
    assert!(files > 0, "the seed corpus is there");
    assert!(commands > 0, "some of the corpus parses");
}

#[test]
fn the_regressions_parse_without_panicking() {
    replay("fuzz/regressions/operator_request");
}
