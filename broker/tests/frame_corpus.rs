//! Replays the `frame_decode` fuzz corpus and its regressions through the guarded
//! `decode_stream` on stable: no input may panic, errors are fine, and every input that once
//! panicked rumqttd's decoder must come out as an error.

use std::fs;
use std::path::{Path, PathBuf};

use fleet_broker::frame::{decode_stream, DecodeError};

/// As in fuzz/fuzz_targets/frame_decode.rs.
const MAX_PACKET_SIZE: usize = 64 * 1024;
const CONNECT_V4: &[u8] = &[
    0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 4, b'f', b'u', b'z', b'z',
];
const CONNECT_V5: &[u8] = &[
    0x10, 17, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 4, b'f', b'u', b'z', b'z',
];

/// The byte stream a fuzz input stands for: its first byte chooses the whole rest, or the rest
/// after a valid 3.1.1 or 5 CONNECT (as the fuzz target does).
fn stream_of(input: &[u8]) -> Option<Vec<u8>> {
    let (&choice, rest) = input.split_first()?;
    Some(match choice % 3 {
        0 => rest.to_vec(),
        1 => [CONNECT_V4, rest].concat(),
        _ => [CONNECT_V5, rest].concat(),
    })
}

fn inputs(dir: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(dir);
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.is_file())
        .map(|path| {
            let bytes = fs::read(&path).expect("readable corpus file");
            (path, bytes)
        })
        .collect();
    inputs.sort();
    inputs
}

#[test]
fn the_corpus_decodes_without_panicking() {
    let corpus = inputs("fuzz/corpus/frame_decode");
    assert!(!corpus.is_empty(), "the seed corpus is there");
    let mut decoded = 0;
    for (path, input) in &corpus {
        let Some(stream) = stream_of(input) else {
            continue;
        };
        match decode_stream(&stream, MAX_PACKET_SIZE) {
            Ok(packets) => decoded += packets.len(),
            Err(DecodeError::UnreadablePublishHeader { index }) => {
                panic!("{}: frame {index}", path.display())
            }
            Err(_) => {}
        }
    }
    assert!(decoded > 0, "some of the corpus decodes");
}

#[test]
fn every_regression_is_an_error_not_a_panic() {
    let regressions = inputs("fuzz/regressions/frame_decode");
    assert!(!regressions.is_empty());
    for (path, input) in &regressions {
        let stream = stream_of(input).expect("a regression is not empty");
        let result = decode_stream(&stream, MAX_PACKET_SIZE);
        assert!(result.is_err(), "{}: {result:?}", path.display());
    }
}
