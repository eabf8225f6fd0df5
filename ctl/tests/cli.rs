//! The real `fleetctl` binary against a real fleet (the integration tests' `TestFleet`): what an
//! operator types and reads, its exit codes, and what it sends.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use fleet_sim::phone::ProvisionOutcome;
use fleet_tests::{new_phone, TestFleet, PATIENCE};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::Command;

/// `fleetctl` as the admin operator of `fleet`, with `args`.
fn fleetctl(fleet: &TestFleet, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fleetctl"));
    command
        .arg("--server")
        .arg(fleet.server())
        .arg("--data-dir")
        .arg(fleet.data_dir())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs `fleetctl args` with `stdin` as its input (a pipe: not a terminal).
async fn run(fleet: &TestFleet, args: &[&str], stdin: &str) -> Output {
    let mut child = fleetctl(fleet, args)
        .stdin(Stdio::piped())
        .spawn()
        .expect("fleetctl starts");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.as_bytes())
        .await
        .expect("stdin written");
    drop(input);
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .expect("fleetctl ends in time")
        .expect("fleetctl ran");
    eprintln!(
        "fleetctl {args:?}: {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_asks_for_the_fingerprint_without_showing_it() {
    let fleet = TestFleet::start().await;
    let mut op = fleet.operator().await;
    let mut station = fleet.station("ST-1", "6.1.0");
    let fingerprint = op.wait_request("ST-1").await;
    let digits: String = fingerprint.chars().filter(|c| *c != ':').collect();

    // A wrong one: refused, nothing changed, and the right one never shown.
    let wrong = format!("{}00\n", &digits[..62]);
    let refused = run(&fleet, &["stations", "accept", "ST-1"], &wrong).await;
    assert!(!refused.status.success());
    let shown = stdout(&refused);
    assert!(
        shown.contains("ST-1") && shown.contains("MAC streaming:"),
        "{shown}"
    );
    for form in [&fingerprint, &digits, &digits.to_lowercase()] {
        assert!(
            !shown.contains(form.as_str()),
            "the fingerprint is shown: {shown}"
        );
        assert!(!stderr(&refused).contains(form.as_str()));
    }
    assert!(
        stderr(&refused).contains("not the one of the key station ST-1 presented"),
        "{}",
        stderr(&refused)
    );
    assert_eq!(op.station("ST-1").await["state"], "unauthorized");

    // The one read on the station, typed in lower case without colons: accepted.
    let typed = format!(
        "{}\n",
        station.local_fingerprint().replace(':', "").to_lowercase()
    );
    let accepted = run(&fleet, &["stations", "accept", "ST-1"], &typed).await;
    assert!(accepted.status.success());
    station.wait_event(fleet_sim::SimEvent::Authorized).await;
    op.wait_state("ST-1", "running").await;

    // The list takes the manual's label in any case, and says which ones there are.
    let running = run(&fleet, &["stations", "list", "--state", "RUNNING"], "").await;
    assert!(running.status.success());
    assert!(stdout(&running).contains("ST-1"));
    let none = run(&fleet, &["stations", "list", "--state", "not running"], "").await;
    assert_eq!(stdout(&none), "no stations\n");
    let wrong = run(&fleet, &["stations", "list", "--state", "offline"], "").await;
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("\"Not Running\""),
        "{}",
        stderr(&wrong)
    );

    // Without a terminal (this pipe) a destructive command acts without asking, as scripts
    // expect; with --yes too.
    let rejected = run(&fleet, &["stations", "reject", "ST-1"], "").await;
    assert!(rejected.status.success());
    assert_eq!(op.station("ST-1").await["state"], "rejected");
    let removed = run(&fleet, &["stations", "remove", "ST-1", "--yes"], "").await;
    assert!(removed.status.success());
    assert!(op
        .call("getStation", json!({"serial": "ST-1"}))
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_counts_refused_lines_and_reads_semicolons() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("csv written");
        path
    };
    let mixed = write(
        "mixed.csv",
        "vendor,type,mac,site\nYealink,T54W,aabbccddee01,Berlin\nYealink,T54W,not-a-mac,Berlin\n",
    );
    let output = run(&fleet, &["phones", "import", path(&mixed)], "").await;
    assert!(!output.status.success(), "a refused line fails the import");
    let said = stdout(&output);
    assert!(
        said.contains("imported 1 phones, refused 1 lines"),
        "{said}"
    );
    assert!(said.contains("line 3:"), "{said}");

    let german = write(
        "german.csv",
        "vendor;type;mac;site\nSnom;D785;aabbccddee02;\"K\u{f6}ln, Dom\"\n",
    );
    let output = run(&fleet, &["phones", "import", path(&german)], "").await;
    assert!(output.status.success());
    assert!(stdout(&output).contains("imported 1 phones, refused 0 lines"));
    assert!(stderr(&output).contains("`;`-delimited"));
    let phone = op
        .call("getPhone", json!({"mac": "aabbccddee02"}))
        .await
        .expect("imported");
    assert_eq!(phone["site"], "K\u{f6}ln, Dom");
    assert_eq!(phone["vendor"], "Snom");

    // Filtered client side: only Snom phones, by any case.
    let output = run(&fleet, &["phones", "list", "--vendor", "snom"], "").await;
    let listed = stdout(&output);
    assert!(
        listed.contains("aabbccddee02") && !listed.contains("aabbccddee01"),
        "{listed}"
    );
    let output = run(
        &fleet,
        &["phones", "list", "--site", "berlin", "--json"],
        "",
    )
    .await;
    let data: Value = serde_json::from_slice(&output.stdout).expect("json");
    assert_eq!(data["phones"].as_array().map(Vec::len), Some(1));
    assert_eq!(data["phones"][0]["mac"], "aabbccddee01");
}

fn path(path: &Path) -> &str {
    path.to_str().expect("a UTF-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_says_what_it_changed_and_when_it_changes_nothing() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let pap = op.create_phone("aabbccddee01").await;
    op.create_phone("aabbccddee02").await;

    let output = run(&fleet, &["phones", "suspend", "aabbccddee02"], "").await;
    assert!(output.status.success());
    let said = stdout(&output);
    assert!(
        said.starts_with("authentication of aabbccddee02 suspended until "),
        "{said}"
    );
    assert!(said.contains("(in 30 min)"), "{said}");
    let again = run(&fleet, &["phones", "suspend", "aabbccddee02"], "").await;
    assert!(stdout(&again).contains("the period started again"));

    let phone = fleet.phone("aabbccddee01", Some(&pap), "127.0.0.2");
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    let output = run(&fleet, &["phones", "suspend", "AA:BB:CC:DD:EE:01"], "").await;
    assert!(output.status.success());
    assert!(
        stdout(&output).starts_with(
            "aabbccddee01 is Authentication successful: a suspension has no effect on it"
        ),
        "{}",
        stdout(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_hides_reads_unless_all_and_checks_a_remembered_head() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    op.create_phone("aabbccddee01").await;
    op.call("listPhones", json!({})).await.expect("listPhones");

    let shown = stdout(&run(&fleet, &["audit", "--limit", "500"], "").await);
    assert!(shown.contains("createPhone"), "{shown}");
    assert!(!shown.contains("listPhones") && !shown.contains("admitted with operator"));
    let all = stdout(&run(&fleet, &["audit", "--all"], "").await);
    assert!(
        all.contains("listPhones") && all.contains("admitted with operator"),
        "{all}"
    );
    let by_device = stdout(&run(&fleet, &["audit", "--device", "AA-BB-CC-DD-EE-01"], "").await);
    assert!(by_device.contains("createPhone"), "{by_device}");
    let refused = stdout(&run(&fleet, &["audit", "--outcome", "refused"], "").await);
    assert_eq!(refused, "no audit records\n");

    let head = run(&fleet, &["audit", "head"], "").await;
    assert!(head.status.success());
    let head = stdout(&head).trim().to_owned();
    let (seq, hash) = head.split_once(':').expect("SEQ:HASH");
    assert!(seq.parse::<u64>().is_ok() && hash.len() == 64, "{head}");
    // Later records do not matter: the head is still in the chain.
    op.create_phone("aabbccddee02").await;
    let verified = run(&fleet, &["audit", "verify", "--head", &head], "").await;
    assert!(verified.status.success());
    assert!(stdout(&verified).contains(&format!("the remembered head, seq {seq}, is in it")));
    // A head the log does not hold (as after its newest records were deleted), and one whose
    // record has another hash: both fail.
    let beyond = format!("{}:{hash}", seq.parse::<u64>().unwrap_or(0) + 1_000_000);
    let missing = run(&fleet, &["audit", "verify", "--head", &beyond], "").await;
    assert!(!missing.status.success());
    assert!(stdout(&missing).contains("newest records were deleted"));
    let other = format!("{seq}:{}", "0".repeat(64));
    let rewritten = run(&fleet, &["audit", "verify", "--head", &other], "").await;
    assert!(!rewritten.status.success());
    assert!(stdout(&rewritten).contains("rewritten"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_one_line_per_event() {
    let fleet = TestFleet::start().await;
    let op = fleet.operator().await;
    let mut child = fleetctl(&fleet, &["watch"]).spawn().expect("watch starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    // It says when it listens.
    let ready = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("watch starts in time")
        .expect("stderr read");
    assert!(ready.is_some_and(|l| l.starts_with("watching the events of tenant default")));
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    op.call("createPhone", new_phone("aabbccddee01"))
        .await
        .expect("createPhone");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !(seen
        .iter()
        .any(|l: &String| l.contains("phones    aabbccddee01 is Authentication needed"))
        && seen
            .iter()
            .any(|l| l.contains("audit     #") && l.contains("admin createPhone aabbccddee01 ok")))
    {
        match tokio::time::timeout_at(deadline, out.next_line()).await {
            Ok(Ok(Some(line))) => seen.push(line),
            other => panic!("watch printed {seen:#?}, then {other:?}"),
        }
    }
    // No read-only noise without --all.
    op.call("listPhones", json!({})).await.expect("listPhones");
    op.call("deletePhone", json!({"mac": "aabbccddee01"}))
        .await
        .expect("deletePhone");
    loop {
        match tokio::time::timeout_at(deadline, out.next_line()).await {
            Ok(Ok(Some(line))) if line.contains("deletePhone") => break,
            Ok(Ok(Some(line))) => assert!(!line.contains("listPhones"), "{line}"),
            other => panic!("watch printed {seen:#?}, then {other:?}"),
        }
    }
    child.start_kill().expect("watch stopped");
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
}
