//! The manuals' procedures done in a real browser: Debian's chromium, driven headless through
//! `/usr/bin/chromedriver` (WebDriver), against the console served in-process over a real
//! fleetd (fleet-tests' `TestFleet`: real TLS, real MQTT) with simulated stations and phones.
//! One fleetd and one browser for all the procedures, in order, to keep the run short.
//! Skipped, saying why, only where chromedriver is not installed (`.ci/run` installs it).
//! Screenshots of the main pages are written to `$CARGO_TARGET_TMPDIR/console-screenshots/`.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use fleet_console::{ChainVerdict, Console, Fleetd, FleetdError, Listing, Reply};
use fleet_ctl::paging::{fetch_pages, ChainCheck, ListPager};
use fleet_ctl::{ClientError, OperatorClient};
use fleet_protocol::OperatorCommand;
use fleet_sim::phone::ProvisionOutcome;
use fleet_sim::SimEvent;
use fleet_tests::{Station, TestFleet, PATIENCE};
use serde_json::Value;

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

/// The console's link to fleetd in these tests: the operator client with fleetctl's paging, as
/// `fleetctl console` links them (ctl/src/main.rs; a binary's code cannot be shared).
struct Link(OperatorClient);

fn link_error(error: ClientError) -> FleetdError {
    match error {
        ClientError::CommandFailed { code, error } => FleetdError::Refused { code, error },
        ClientError::Connection(_)
        | ClientError::Timeout(_)
        | ClientError::Closed
        | ClientError::Refused(_) => FleetdError::Unreachable(error.to_string()),
        other => FleetdError::Malformed(other.to_string()),
    }
}

impl Fleetd for Link {
    fn operator(&self) -> &str {
        self.0.name()
    }

    fn run(&self, command: OperatorCommand) -> Reply<'_, Value> {
        Box::pin(async move { self.0.run(&command).await.map_err(link_error) })
    }

    fn list_all(&self, listing: Listing) -> Reply<'_, Vec<Value>> {
        let paged = match listing {
            Listing::Stations { state } => fleet_ctl::paging::Listing::Stations { state },
            Listing::RejectedStations => fleet_ctl::paging::Listing::RejectedStations,
            Listing::Phones => fleet_ctl::paging::Listing::Phones,
        };
        Box::pin(async move {
            let data = fetch_pages(&self.0, ListPager::new(paged, None))
                .await
                .map_err(link_error)?;
            Ok(data[listing.field()]
                .as_array()
                .cloned()
                .unwrap_or_default())
        })
    }

    fn verify_audit(&self) -> Reply<'_, ChainVerdict> {
        Box::pin(async move {
            let verdict = fetch_pages(&self.0, ChainCheck::new())
                .await
                .map_err(link_error)?;
            Ok(ChainVerdict {
                records: verdict.records,
                unchained: verdict.unchained,
                broken: verdict.broken.map(|b| (b.seq, b.problem)),
            })
        })
    }
}

/// chromedriver, killed when dropped.
struct Driver {
    child: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    /// Starts chromedriver on a free port and waits for its "started successfully" line.
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let stdout = child.stdout.take().expect("chromedriver's stdout");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains("started successfully") => break,
                Some(Ok(_)) => {}
                _ => panic!("chromedriver ended before it was ready"),
            }
        }
        // Keep reading, so that chromedriver never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Driver { child, port }
    }
}

/// The headless browser, with helpers that wait (never sleep) for what a step expects.
struct Browser {
    client: Client,
    base: String,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(driver: &Driver, base: &str) -> Browser {
        let profile = tempfile::tempdir().expect("profile dir");
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--no-first-run".into(),
            "--disable-quic".into(),
            "--window-size=1400,1000".into(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        let mut capabilities = serde_json::Map::new();
        capabilities.insert("browserName".into(), "chrome".into());
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({"binary": CHROMIUM, "args": args}),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .expect("a browser session");
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
        std::fs::create_dir_all(&shots).expect("screenshot folder");
        Browser {
            client,
            base: base.to_owned(),
            shots,
            _profile: profile,
        }
    }

    async fn open(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("open {path}: {e}"));
    }

    /// Waits until an element matches `css`, live updates included.
    async fn wait(&self, css: &str) -> Element {
        match self
            .client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let source = self.client.source().await.unwrap_or_default();
                panic!("no {css} on {url:?}: {e}\n{source}")
            }
        }
    }

    /// Waits until nothing matches `css` any more.
    async fn wait_gone(&self, css: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let mut every = tokio::time::interval(Duration::from_millis(200));
        loop {
            every.tick().await;
            let found = self.client.find_all(Locator::Css(css)).await.expect("find");
            if found.is_empty() {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "{css} stayed");
        }
    }

    /// Clicks what matches `css`; found again if a live update replaced it meanwhile.
    async fn click(&self, css: &str) {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match self.wait(css).await.click().await {
                Ok(()) => return,
                Err(e) if stale(&e) && tokio::time::Instant::now() < deadline => {}
                Err(e) => panic!("click {css}: {e}"),
            }
        }
    }

    async fn text(&self, css: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match self.wait(css).await.text().await {
                Ok(text) => return text,
                Err(e) if stale(&e) && tokio::time::Instant::now() < deadline => {}
                Err(e) => panic!("text of {css}: {e}"),
            }
        }
    }

    async fn fill(&self, css: &str, text: &str) {
        let field = self.wait(css).await;
        field.clear().await.expect("clear");
        field.send_keys(text).await.expect("type");
    }

    async fn shot(&self, name: &str) {
        let png = self.client.screenshot().await.expect("screenshot");
        let path = self.shots.join(format!("console-{name}.png"));
        std::fs::write(&path, png).expect("screenshot written");
        eprintln!("screenshot: {}", path.display());
    }

    /// `GET path` from inside the page (same origin, with the session cookie): its text.
    async fn fetch(&self, path: &str) -> String {
        let script = "const done = arguments[arguments.length - 1];\
                      fetch(arguments[0]).then(r => r.text()).then(done, e => done('error: ' + e));";
        let value = self
            .client
            .execute_async(script, vec![Value::String(path.to_owned())])
            .await
            .expect("fetch in the page");
        value.as_str().unwrap_or_default().to_owned()
    }
}

/// Whether an element went away under the test (a live update replaced the page's part).
fn stale(error: &fantoccini::error::CmdError) -> bool {
    error.to_string().contains("stale element")
}

/// What the procedures share.
struct Rig {
    fleet: TestFleet,
    browser: Browser,
}

fn row(serial: &str) -> String {
    format!("#live tr[data-serial=\"{serial}\"]")
}

fn row_in(serial: &str, state: &str) -> String {
    format!("#live tr[data-serial=\"{serial}\"][data-state=\"{state}\"]")
}

async fn connected_with_key(station: &mut Station) {
    station
        .wait_event(SimEvent::Connected {
            with_certificate: true,
        })
        .await;
}

/// Authorize a Station: powered on while the list is open, it appears as Unauthorized without
/// a reload; its page shows the fingerprint the station itself shows, Accept makes it
/// authorized and the list says Running.
async fn authorize_a_station(rig: &Rig, serial: &str) -> Station {
    let b = &rig.browser;
    b.open("/stations").await;
    b.wait("body[data-live-ready]").await;
    let mut station = rig.fleet.station(serial, "6.1.0");
    b.wait(&row_in(serial, "unauthorized")).await;
    authorize_from_the_list(rig, &mut station).await;
    station
}

/// From the list with the station Unauthorized in it: its page, compare, Accept.
async fn authorize_from_the_list(rig: &Rig, station: &mut Station) {
    let b = &rig.browser;
    b.click(&format!(
        "{} a[href=\"/stations/{}\"]",
        row(&station.serial),
        station.serial
    ))
    .await;
    let shown = b
        .wait("#fingerprint")
        .await
        .attr("data-fingerprint")
        .await
        .expect("attribute")
        .expect("a fingerprint");
    assert_eq!(shown, station.local_fingerprint());
    let grouped = b.text("#fingerprint").await;
    assert_eq!(grouped.replace([' ', '\n'], ""), shown.replace(':', ""));
    b.click("#accept").await;
    station.wait_event(SimEvent::Authorized).await;
    b.wait("#state[data-state=\"running\"]").await;
    b.open("/stations").await;
    b.wait(&row_in(&station.serial, "running")).await;
}

/// Reset Device with Delete Authentication: the station reboots with a new key and asks again.
async fn reset_device(rig: &Rig, station: &mut Station) {
    let b = &rig.browser;
    let old = station.local_fingerprint();
    b.open(&format!("/stations/{}", station.serial)).await;
    b.click("#reset-device").await;
    let ticked = b.wait("#delete-authentication").await;
    assert!(ticked.is_selected().await.expect("checkbox"));
    b.click("#confirm").await;
    station.wait_event(SimEvent::ResetApplied).await;
    connected_with_key(station).await;
    assert_ne!(station.local_fingerprint(), old);
    b.open("/stations").await;
    b.wait(&row_in(&station.serial, "unauthorized")).await;
    authorize_from_the_list(rig, station).await;
}

/// Reject, the Rejected Stations section, Clear, reboot: Unauthorized again.
async fn reject_and_clear(rig: &Rig, station: &mut Station) {
    let b = &rig.browser;
    b.open(&format!("/stations/{}", station.serial)).await;
    b.click("#reject").await;
    b.click("#confirm").await;
    station.wait_event(SimEvent::Rejected).await;
    b.wait("#state[data-state=\"rejected\"]").await;
    // Why it is rejected, as fleetd explains it, with the manual's way back.
    b.open(&format!("/stations/{}", station.serial)).await;
    assert!(b.text("#why h2").await.contains("Rejected"));
    let rule = b.text("#why-rule").await;
    assert!(rule.contains("Clear it under Rejected Stations"), "{rule}");
    b.open("/stations").await;
    let clear = format!("#rejected tr[data-serial=\"{}\"] button", station.serial);
    b.click(&clear).await;
    b.wait(".notice").await;
    b.wait_gone(&clear).await;
    station.handle.reboot();
    connected_with_key(station).await;
    b.wait(&row_in(&station.serial, "unauthorized")).await;
    authorize_from_the_list(rig, station).await;
}

/// The station's key changes (authentication deleted on the station alone): the list shows a
/// badge and its page a security alert; Remove Device, and it asks again as Unauthorized.
async fn changed_key_then_remove(rig: &Rig, station: &mut Station) {
    let b = &rig.browser;
    b.open("/stations").await;
    b.wait("body[data-live-ready]").await;
    station.handle.power_off();
    b.wait(&row_in(&station.serial, "not_running")).await;
    fleet_sim::local_reset(&station.dir, false, true).expect("local reset");
    station.handle.power_on();
    b.wait(&format!("{} .badge.alert", row(&station.serial)))
        .await;
    b.wait("#alert-count").await;
    b.open(&format!("/stations/{}", station.serial)).await;
    b.wait("#security-alert").await;
    b.shot("security-alert").await;
    // A console started after the event knows it too, from fleetd's audit log.
    let (other, login) = start_console(&rig.fleet).await;
    b.client
        .goto(&login)
        .await
        .expect("the other console's login");
    b.wait(&format!("{} .badge.alert", row(&station.serial)))
        .await;
    assert!(b
        .client
        .current_url()
        .await
        .expect("url")
        .as_str()
        .starts_with(&other));
    b.open(&format!("/stations/{}", station.serial)).await;
    b.wait("#security-alert").await;
    b.click("#remove-device").await;
    b.click("#confirm").await;
    b.wait(".notice").await;
    // The station keeps trying; with its record gone it asks again.
    b.wait(&row_in(&station.serial, "unauthorized")).await;
    authorize_from_the_list(rig, station).await;
}

/// Update and Authorize a Station: Update Required, Start Update, the progress bar, Unauthorized.
async fn update_and_authorize(rig: &Rig, station: &mut Station) {
    let b = &rig.browser;
    b.open("/stations").await;
    b.wait(&row_in(&station.serial, "update_required")).await;
    b.shot("stations").await;
    b.click(&format!("{} a", row(&station.serial))).await;
    b.click("#start-update").await;
    // The confirmation names the image from fleetd's catalog before anything is sent.
    b.wait("#update-image").await;
    let image = b.text("#update-image").await;
    assert!(image.contains("Will install firmware 6.1.0"), "{image}");
    b.click("#confirm").await;
    b.wait("#update-progress").await;
    assert_eq!(b.text("#update-version").await, "6.1.0");
    station
        .wait_for("update installed", |e| {
            matches!(e, SimEvent::UpdateInstalled { .. }).then_some(())
        })
        .await;
    connected_with_key(station).await;
    // fleetd told the console each tenth of the download, the end included (before the
    // station could install it): the bar on its page is full, from the console's cache or
    // moved in place by the last event if that one is still on its way.
    b.open(&format!("/stations/{}", station.serial)).await;
    let size = fleet_tests::FIRMWARE_SIZE;
    b.wait(&format!(
        "#update-progress[value=\"{size}\"][max=\"{size}\"]"
    ))
    .await;
    b.open("/stations").await;
    b.wait(&row_in(&station.serial, "unauthorized")).await;
    authorize_from_the_list(rig, station).await;
}

/// A phone created in the portal is provisioned with the PAP read from the page; suspend and
/// reset authentication.
async fn phone_procedures(rig: &Rig) {
    let b = &rig.browser;
    b.open("/phones").await;
    b.fill("#create-phone input[name=mac]", "AA:BB:CC:DD:EE:01")
        .await;
    b.fill("#create-phone input[name=vendor]", "Yealink").await;
    b.fill("#create-phone input[name=type]", "T54W").await;
    b.fill("#create-phone input[name=site]", "Berlin").await;
    b.click("#create-phone button").await;
    let pap = b.text("#pap").await;
    assert_eq!(pap.len(), 6, "{pap:?}");
    b.shot("pap").await;
    b.open("/phones").await;
    b.wait("body[data-live-ready]").await;
    let phone = rig.fleet.phone("aabbccddee01", Some(&pap), "127.0.0.2");
    assert_eq!(phone.provision().await, ProvisionOutcome::Provisioned);
    let done = "tr[data-mac=\"aabbccddee01\"][data-state=\"authentication_successful\"]";
    b.wait(done).await;
    let page = b.client.source().await.expect("source");
    assert!(!page.contains(&pap), "no PAP in the list");

    b.click("tr[data-mac=\"aabbccddee01\"] form button").await;
    b.wait(".notice").await;
    b.wait("tr[data-mac=\"aabbccddee01\"] time").await;

    b.click("tr[data-mac=\"aabbccddee01\"] a[href$=\"reset-authentication\"]")
        .await;
    b.click("#confirm").await;
    let new = b.text("#pap").await;
    assert_ne!(new, pap);
    assert_eq!(b.text("#phone-state").await, "Authentication needed");
    locked_out(rig).await;
    b.open("/phones").await;
    b.shot("phones").await;
}

/// Three wrong PAPs: the list shows Authentication failed, until when, and the lockout, without
/// a reload.
async fn locked_out(rig: &Rig) {
    let b = &rig.browser;
    b.open("/phones").await;
    b.fill("#create-phone input[name=mac]", "aabbccddee03")
        .await;
    b.fill("#create-phone input[name=vendor]", "Snom").await;
    b.fill("#create-phone input[name=type]", "D785").await;
    b.click("#create-phone button").await;
    let pap = b.text("#pap").await;
    b.open("/phones").await;
    b.wait("body[data-live-ready]").await;
    // From an address that no correct PAP put on the temporary whitelist.
    let phone = rig.fleet.phone("aabbccddee03", None, "127.0.0.4");
    for _ in 0..3 {
        assert_eq!(
            phone.connect_raw(Some(&fleet_tests::wrong_pap(&pap))).await,
            4
        );
    }
    let failed = "tr[data-mac=\"aabbccddee03\"][data-state=\"authentication_failed\"]";
    let until = b.text(&format!("{failed} small")).await;
    assert!(until.starts_with("until "), "{until}");
    // The lockout set the wrong PAPs in a row back to 0 and counts as the first of three.
    assert_eq!(b.text(&format!("{failed} .pap-counts")).await, "1 lockout");
}

/// Two stations wait; both ticked, Accept, confirm: each is accepted with the fingerprint the
/// list showed.
async fn bulk_accept(rig: &Rig) {
    let b = &rig.browser;
    b.open("/stations?state=unauthorized").await;
    b.wait("body[data-live-ready]").await;
    let mut stations = vec![
        rig.fleet.station("ST-0004", "6.1.0"),
        rig.fleet.station("ST-0005", "6.1.0"),
    ];
    for station in &stations {
        let tick = format!(
            "{} input[type=checkbox]",
            row_in(&station.serial, "unauthorized")
        );
        b.click(&tick).await;
    }
    b.click("#bulk button[value=accept]").await;
    // The confirmation page, once it has replaced the list (its h1 is read after that).
    b.wait("#confirm").await;
    assert_eq!(b.text("h1").await, "Accept 2 stations?");
    b.click("#confirm").await;
    for station in &mut stations {
        b.wait(&format!(
            "#outcomes tr[data-serial=\"{}\"] td.ok",
            station.serial
        ))
        .await;
        station.wait_event(SimEvent::Authorized).await;
    }
}

/// The whitelist: add and remove a permanent entry; the temporary one the correct PAP made.
async fn whitelist(rig: &Rig) {
    let b = &rig.browser;
    b.open("/whitelist").await;
    // The correct PAP's address, with the time it has left counting down.
    let left = b
        .text("#temporary tr[data-entry=\"127.0.0.2\"] td[data-expires]")
        .await;
    assert!(
        left.starts_with("7 h 59 min") || left.starts_with("8 h"),
        "{left}"
    );
    b.fill("#add-entry input[name=entry]", "203.0.113.0/24")
        .await;
    b.click("#add-entry button").await;
    b.wait("#permanent tr[data-entry=\"203.0.113.0/24\"]").await;
    b.fill("#add-entry input[name=entry]", "203.0.113.0/33")
        .await;
    b.click("#add-entry button").await;
    assert!(b.text("#error").await.contains("33"));
    b.open("/whitelist").await;
    b.shot("whitelist").await;
    b.click("#permanent tr[data-entry=\"203.0.113.0/24\"] button")
        .await;
    b.wait(".notice").await;
    b.wait_gone("#permanent tr[data-entry=\"203.0.113.0/24\"]")
        .await;
}

/// CSV export (the manual's file) and import (one result per line).
async fn csv(rig: &Rig, dir: &Path) {
    let b = &rig.browser;
    b.open("/phones").await;
    let csv = b.fetch("/devices.csv").await;
    assert!(
        csv.starts_with("vendor,type,mac,created_at,site,auth_state,pap\r\n"),
        "{csv}"
    );
    assert!(csv.contains("Yealink,T54W,aabbccddee01,"), "{csv}");
    let file = dir.join("new-phones.csv");
    std::fs::write(
        &file,
        "vendor,type,mac,site\nSnom,D785,aabbccddee02,Lab\nSnom,D785,aabbccddee01,Lab\n",
    )
    .expect("csv file");
    let upload = b.wait("#import input[type=file]").await;
    upload
        .send_keys(&file.display().to_string())
        .await
        .expect("choose the file");
    b.click("#import button").await;
    b.wait("#import-created").await;
    assert!(b.text("#import-errors").await.contains('3'));
    assert!(b
        .text("#import-created")
        .await
        .contains("AA:BB:CC:DD:EE:02"));
}

/// The audit log shows the console's commands under the operator; Verify chain.
async fn audit(rig: &Rig) {
    let b = &rig.browser;
    b.open("/audit?action=acceptStation").await;
    b.wait("#audit tr[data-outcome=\"ok\"]").await;
    b.shot("audit").await;
    b.click("#verify").await;
    assert!(b.text("#verdict").await.starts_with("Intact"));
}

/// A console over `fleet` as its `admin`, served in this process: its address and login link.
async fn start_console(fleet: &TestFleet) -> (String, String) {
    let cert = std::fs::read_to_string(&fleet.fleet.files.admin_cert_path).expect("admin.pem");
    let key = std::fs::read_to_string(&fleet.fleet.files.admin_key_path).expect("admin.key");
    let client = OperatorClient::connect(&fleet.server(), &fleet.ca_pem(), &cert, &key, "admin")
        .await
        .expect("the console's operator connects");
    let events = client.subscribe_events("default").await.expect("events");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("console port");
    let addr = listener.local_addr().expect("console address");
    let console = Console::new(Arc::new(Link(client)), "default", addr);
    let login = console.login_link().expect("a login link");
    let base = console.base().to_owned();
    tokio::spawn(fleet_console::serve(
        listener,
        console,
        events,
        std::future::pending(),
    ));
    (base, login)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manuals_procedures_in_a_browser() {
    if !Path::new(CHROMEDRIVER).exists() || !Path::new(CHROMIUM).exists() {
        eprintln!(
            "skipped: {CHROMEDRIVER} or {CHROMIUM} is not installed \
             (Debian: apt-get install chromium chromium-driver; .ci/run does)"
        );
        return;
    }
    let fleet = TestFleet::start().await;
    let (base, login) = start_console(&fleet).await;
    let driver = Driver::start();
    let browser = Browser::start(&driver, &base).await;
    // Without the cookie: the page that explains how to log in.
    browser.open("/stations").await;
    assert!(browser.text("h1").await.contains("Log in"));
    browser.client.goto(&login).await.expect("the login link");
    browser.wait("#live").await;
    let rig = Rig { fleet, browser };

    let mut st1 = authorize_a_station(&rig, "ST-0001").await;
    rig.browser.open(&format!("/stations/{}", st1.serial)).await;
    rig.browser.shot("station").await;
    reset_device(&rig, &mut st1).await;
    reject_and_clear(&rig, &mut st1).await;
    changed_key_then_remove(&rig, &mut st1).await;
    let mut st3 = rig.fleet.station("ST-0003", "6.0.5");
    update_and_authorize(&rig, &mut st3).await;
    bulk_accept(&rig).await;
    phone_procedures(&rig).await;
    whitelist(&rig).await;
    let dir = tempfile::tempdir().expect("tempdir");
    csv(&rig, dir.path()).await;
    audit(&rig).await;
    rig.browser.client.close().await.expect("browser closed");
}
