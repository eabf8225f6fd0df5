//! The architecture's invariants as tests (rust-analyzer's "tidy" tests): each reads the
//! workspace's sources and fails, naming the file, when a rule of ARCHITECTURE.md is broken.

use std::path::{Path, PathBuf};

use fleet_protocol::{
    Filter, PhoneLeaf, StationLeaf, OPERATOR_CLIENT_ID_PREFIX, PHONE_CLIENT_ID_PREFIX,
    STATION_CLIENT_ID_PREFIX,
};

/// The workspace's member crates, by folder.
const CRATES: [&str; 10] = [
    "protocol",
    "broker",
    "cluster",
    "certs",
    "config",
    "controller",
    "ctl",
    "console",
    "device-sim",
    "tests",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// A file's code without its unit tests (everything from the first `#[cfg(test)]` on) and
/// without comment lines.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source");
    let text = match text.find("#[cfg(test)]") {
        Some(at) => &text[..at],
        None => &text[..],
    };
    without_comments(text)
}

/// `text` without its comment lines.
fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The files of `files` whose code contains one of `needles`, with the needle.
fn offenders(files: &[PathBuf], needles: &[impl AsRef<str>]) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let code = code(file);
        for needle in needles.iter().map(AsRef::as_ref) {
            if code.contains(needle) {
                found.push(format!("{}: {needle}", file.display()));
            }
        }
    }
    found
}

/// How a string literal that spells a fleet name by hand starts: a quote, then a topic root
/// (`stations/`, `phones/`, `fleet/`) or a client-id prefix (`station-`, `phone-`, `op-`), each
/// as fleet-protocol writes it.
fn fleet_name_literals() -> Vec<String> {
    let root = |filter: Filter| {
        let text = filter.to_string();
        let root = text.split('/').next().unwrap_or_default();
        format!("\"{root}/")
    };
    vec![
        root(Filter::EveryStation(StationLeaf::Cmd)),
        root(Filter::EveryPhone(PhoneLeaf::ProvisionRequest)),
        root(Filter::AllEvents),
        format!("\"{STATION_CLIENT_ID_PREFIX}"),
        format!("\"{PHONE_CLIENT_ID_PREFIX}"),
        format!("\"{OPERATOR_CLIENT_ID_PREFIX}"),
    ]
}

/// Architecture Invariant: the broker knows nothing about stations, phones or operators; the
/// fleet's topic names reach it as data (`Rights`) only.
#[test]
fn no_fleet_topic_or_client_id_is_spelled_in_the_broker() {
    let files = rust_files(&workspace().join("broker/src"));
    let found = offenders(&files, &fleet_name_literals());
    assert!(found.is_empty(), "fleet names in the broker: {found:#?}");
}

/// One crate names the protocol: no topic or client id is spelled by hand outside
/// fleet-protocol, in code or in tests, the simulator, the benches and the fuzz targets
/// included. Everyone else asks it (`Topic`, `Filter`, `Serial::client_id`, …).
#[test]
fn fleet_names_are_spelled_only_by_the_protocol() {
    let root = workspace();
    let mut files = Vec::new();
    for krate in CRATES.iter().filter(|krate| **krate != "protocol") {
        files.extend(rust_files(&root.join(krate)));
    }
    files.extend(rust_files(&root.join("bench/src")));
    files.extend(rust_files(&root.join("fuzz/fuzz_targets")));
    let needles = fleet_name_literals();
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("source");
        let code = without_comments(&text);
        for needle in needles.iter().filter(|n| code.contains(n.as_str())) {
            found.push(format!("{}: {needle}", file.display()));
        }
    }
    assert!(
        found.is_empty(),
        "fleet names spelled outside fleet-protocol: {found:#?}"
    );
}

/// Architecture Invariant: only the store knows its backends: redb in `store/redb.rs` (and
/// the interface's error type in `store/mod.rs`, the suite that runs on both in
/// `store/suite.rs`), PostgreSQL in the store's PostgreSQL files
/// (and the tests' private server, `tests/src/postgres.rs`).
#[test]
fn only_the_store_knows_redb_and_postgresql() {
    let root = workspace();
    let mut files = Vec::new();
    for krate in CRATES {
        files.extend(rust_files(&root.join(krate).join("src")));
    }
    let store = |name: &str| format!("controller/src/store/{name}");
    let outside = |allowed: &[String]| -> Vec<PathBuf> {
        files
            .iter()
            .filter(|f| !allowed.iter().any(|a| f.ends_with(a)))
            .cloned()
            .collect()
    };
    let redb = outside(&[store("redb.rs"), store("mod.rs"), store("suite.rs")]);
    let found = offenders(&redb, &["redb::", "use redb"]);
    assert!(found.is_empty(), "redb outside the store: {found:#?}");
    let postgres = outside(&[
        store("postgres.rs"),
        store("lease.rs"),
        "tests/src/postgres.rs".to_owned(),
    ]);
    let found = offenders(&postgres, &["tokio_postgres", "deadpool_postgres"]);
    assert!(found.is_empty(), "PostgreSQL outside the store: {found:#?}");
}

/// Architecture Invariant: the pure modules know no I/O and no clock; `now` is passed in.
#[test]
fn the_pure_modules_do_no_io_and_read_no_clock() {
    let root = workspace().join("controller/src");
    let pure = [
        "station.rs",
        "phone.rs",
        "whitelist.rs",
        "devices_csv.rs",
        "identity.rs",
        "firmware.rs",
        "flood.rs",
        "request.rs",
        "times.rs",
    ]
    .map(|f| root.join(f));
    let mut files = pure.to_vec();
    files.extend(rust_files(&workspace().join("protocol/src")));
    files.push(workspace().join("broker/src/acl.rs"));
    files.push(workspace().join("broker/src/mailbox.rs"));
    files.push(workspace().join("broker/src/flood.rs"));
    files.push(workspace().join("broker/src/flight.rs"));
    files.push(workspace().join("broker/src/session.rs"));
    let found = offenders(
        &files,
        &[
            "std::fs",
            "tokio",
            "TcpStream",
            "TcpListener",
            "UdpSocket",
            "SystemTime",
            "Instant::now",
            "now_utc",
            "Clock",
        ],
    );
    assert!(
        found.is_empty(),
        "I/O or a clock in a pure module: {found:#?}"
    );
}

/// Every dependency a workspace crate declares is used by its code (an unused one, like
/// `rumqttd` in the controller, hides who knows what).
#[test]
fn every_declared_dependency_is_used() {
    let root = workspace();
    let mut unused = Vec::new();
    for krate in CRATES {
        let dir = root.join(krate);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        // All of the crate's code: `src`, and its tests wherever its manifest puts them.
        let mut sources = String::new();
        for file in rust_files(&dir) {
            sources.push_str(&std::fs::read_to_string(file).expect("source"));
        }
        let mut section = "";
        for line in manifest.lines() {
            let line = line.trim();
            if line.starts_with('[') {
                section = line;
                continue;
            }
            if !(section == "[dependencies]" || section == "[dev-dependencies]") {
                continue;
            }
            let Some((name, _)) = line.split_once(['=', '.']) else {
                continue;
            };
            let name = name.trim();
            if name.is_empty() || name.starts_with('#') {
                continue;
            }
            let ident = name.replace('-', "_");
            if !sources.contains(&format!("{ident}::"))
                && !sources.contains(&format!("use {ident}"))
            {
                unused.push(format!("{krate}: {name}"));
            }
        }
    }
    assert!(unused.is_empty(), "declared but unused: {unused:#?}");
}

/// Architecture Invariant: the state machines speak no wire format: the operator's JSON views,
/// and the error codes their refusals are answered with, are the shell's (`views.rs`).
#[test]
fn the_state_machines_speak_no_json() {
    let root = workspace().join("controller/src");
    let files = [
        "station.rs",
        "phone.rs",
        "whitelist.rs",
        "firmware.rs",
        "identity.rs",
    ]
    .map(|f| root.join(f));
    let found = offenders(&files, &["serde_json", "json!", "CommandError"]);
    assert!(
        found.is_empty(),
        "wire format in a state machine: {found:#?}"
    );
}

/// Longest function allowed outside tests, in lines, unless its doc comment says why it must
/// be one piece (the words "one piece").
const MAX_FUNCTION_LINES: usize = 100;

/// The functions of `text` (rustfmt's layout: a body ends at the first line that is its
/// indentation and `}`) longer than `max` lines, by name and length, tests left out.
fn long_functions(text: &str, max: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .iter()
        .position(|l| l.trim() == "#[cfg(test)]")
        .unwrap_or(lines.len());
    let mut long = Vec::new();
    for (i, line) in lines[..end].iter().enumerate() {
        let code = line.trim_start();
        let indent = line.len() - code.len();
        let signature = [
            "fn ",
            "pub fn ",
            "async fn ",
            "pub async fn ",
            "pub(crate) fn ",
        ]
        .iter()
        .chain(&[
            "pub(super) fn ",
            "pub(crate) async fn ",
            "const fn ",
            "pub const fn ",
        ])
        .find_map(|start| code.strip_prefix(start));
        let Some(signature) = signature else { continue };
        let name: String = signature
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{}}}", " ".repeat(indent));
        let Some(length) = lines[i..end].iter().position(|l| *l == close) else {
            continue;
        };
        let docs = lines[..i]
            .iter()
            .rev()
            .take_while(|l| {
                let t = l.trim_start();
                t.starts_with("///") || t.starts_with("#[") || t.starts_with("//")
            })
            .any(|l| l.contains("one piece"));
        if length + 1 > max && !docs {
            long.push((name, length + 1));
        }
    }
    long
}

/// Architecture Invariant: no function outside tests is longer than about 100 lines, unless its
/// doc comment says why it must be one piece.
#[test]
fn no_function_is_longer_than_a_hundred_lines() {
    let root = workspace();
    let mut files = Vec::new();
    for dir in CRATES.iter().chain(&["bench"]) {
        files.extend(rust_files(&root.join(dir).join("src")));
    }
    let mut found = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("source");
        for (name, length) in long_functions(&text, MAX_FUNCTION_LINES) {
            found.push(format!("{}: {name} ({length} lines)", file.display()));
        }
    }
    assert!(
        found.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines: {found:#?}"
    );
}

#[test]
fn long_functions_are_found_and_a_reason_lets_one_be() {
    let body = |name: &str, doc: &str| {
        let lines = vec!["    let x = 1;"; 120].join("\n");
        format!("{doc}\nfn {name}() {{\n{lines}\n}}\n")
    };
    let text = [
        body("long", "/// Does much."),
        body(
            "kept",
            "/// Must be one piece: the order of the steps is the protocol.",
        ),
        "fn short() {\n    let y = 2;\n}\n".to_owned(),
    ]
    .concat();
    assert_eq!(long_functions(&text, 100), vec![("long".to_owned(), 122)]);
}

/// The crates of the service other than the front door: they must not speak MQTT on the wire or
/// terminate TLS themselves.
const NOT_THE_BROKER: [&str; 4] = ["protocol", "controller", "config", "certs"];

/// Architecture Invariant: only `fleet-broker` knows MQTT frames and terminates TLS.
#[test]
fn only_the_broker_knows_mqtt_frames_and_terminates_tls() {
    let root = workspace();
    let mut files = Vec::new();
    for krate in NOT_THE_BROKER {
        files.extend(rust_files(&root.join(krate).join("src")));
    }
    let needles = [
        "rumqttd::",
        "use rumqttd",
        "rumqttc::",
        "use rumqttc",
        "tokio_rustls",
        "ServerConnection",
    ];
    let found = offenders(&files, &needles);
    assert!(
        found.is_empty(),
        "MQTT or TLS outside the broker: {found:#?}"
    );
}

/// Architecture Invariant: there is no internal port; the front door's listener is the only
/// socket the service opens (`Broker::bind`).
#[test]
fn the_front_door_is_the_only_listener() {
    let root = workspace();
    let mut files = Vec::new();
    for krate in NOT_THE_BROKER.iter().chain(&["broker"]) {
        files.extend(rust_files(&root.join(krate).join("src")));
    }
    // The metrics endpoint is the one other listener: off unless configured, loopback unless
    // the configuration says otherwise, and it serves only reads (`/metrics`, `/healthz`).
    files.retain(|f| {
        !f.ends_with("broker/src/frontdoor.rs") && !f.ends_with("broker/src/metrics.rs")
    });
    let found = offenders(&files, &["TcpListener", "UdpSocket", "UnixListener"]);
    assert!(
        found.is_empty(),
        "a listener besides the front door: {found:#?}"
    );
}
