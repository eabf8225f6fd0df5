//! The web layer against the in-memory fleetd, request by request (`tower::ServiceExt::oneshot`):
//! the guard (401, 403, headers), escaping, and what each page shows and each form sends.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderMap, Request, StatusCode};
use fleet_protocol::StationState;
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::guard::CONTENT_SECURITY_POLICY;
use crate::memory::{station, MemoryFleetd};
use crate::Console;

const HOST: &str = "127.0.0.1:8080";

fn fingerprint(byte: &str) -> String {
    [byte; 32].join(":")
}

struct Rig {
    console: Arc<Console>,
    fleetd: Arc<MemoryFleetd>,
    cookie: String,
}

impl Rig {
    async fn new() -> Rig {
        let fleetd = Arc::new(MemoryFleetd::new("admin"));
        let console = Console::new(fleetd.clone(), "default", HOST.parse().unwrap());
        let mut rig = Rig {
            console,
            fleetd,
            cookie: String::new(),
        };
        let link = rig.console.login_link().unwrap();
        let path = link.strip_prefix(rig.console.base()).unwrap().to_owned();
        let (status, headers, _) = rig.send(get(&path, "")).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let set = headers[header::SET_COOKIE].to_str().unwrap().to_owned();
        rig.cookie = set.split(';').next().unwrap().to_owned();
        rig
    }

    async fn send(&self, request: Request<Body>) -> (StatusCode, HeaderMap, String) {
        let response = self.console.router().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let (status, _, body) = self.send(get(path, &self.cookie)).await;
        (status, body)
    }

    async fn post(&self, path: &str, form: &str) -> (StatusCode, HeaderMap, String) {
        self.send(post(path, &self.cookie, form, "same-origin"))
            .await
    }

    fn sent(&self, command: &str) -> Vec<Value> {
        self.fleetd
            .sent()
            .into_iter()
            .filter(|c| c["command"] == command)
            .collect()
    }
}

fn get(path: &str, cookie: &str) -> Request<Body> {
    Request::get(path)
        .header(header::HOST, HOST)
        .header(header::COOKIE, cookie)
        .body(Body::empty())
        .unwrap()
}

fn post(path: &str, cookie: &str, form: &str, site: &str) -> Request<Body> {
    Request::post(path)
        .header(header::HOST, HOST)
        .header(header::COOKIE, cookie)
        .header("sec-fetch-site", site)
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body(Body::from(form.to_owned()))
        .unwrap()
}

fn assert_secured(headers: &HeaderMap) {
    assert_eq!(headers["content-security-policy"], CONTENT_SECURITY_POLICY);
    assert!(CONTENT_SECURITY_POLICY.contains("frame-ancestors 'none'"));
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-inline"));
    assert!(!CONTENT_SECURITY_POLICY.contains("unsafe-eval"));
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["referrer-policy"], "no-referrer");
    assert_eq!(headers["cache-control"], "no-store");
}

#[tokio::test]
async fn without_the_session_cookie_a_page_is_401_and_explains_the_login_link() {
    let rig = Rig::new().await;
    let (status, headers, body) = rig.send(get("/stations", "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_secured(&headers);
    assert!(body.contains("fleetctl console"), "{body}");
    let (status, _, _) = rig
        .send(get("/stations", "fleet_console_8080=forged"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Changes too, and nothing was sent to fleetd.
    let (status, _, _) = rig
        .send(post("/stations/ST-1/remove", "", "", "same-origin"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(rig.sent("removeStation").is_empty());
    // The assets hold nothing of the fleet: served without a session, with the headers.
    let (status, headers, body) = rig.send(get("/assets/console.js", "")).await;
    assert_eq!(status, StatusCode::OK);
    assert_secured(&headers);
    assert!(body.contains("EventSource"));
}

#[tokio::test]
async fn a_login_token_is_exchanged_once_for_a_strict_httponly_cookie() {
    let rig = Rig::new().await;
    let link = rig.console.login_link().unwrap();
    let path = link.strip_prefix(rig.console.base()).unwrap().to_owned();
    assert!(link.starts_with("http://127.0.0.1:8080/login?token="));
    let (status, headers, _) = rig.send(get(&path, "")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let cookie = headers[header::SET_COOKIE].to_str().unwrap();
    assert!(cookie.starts_with("fleet_console_8080="), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let (status, headers, body) = rig.send(get(&path, "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "a token works once");
    assert!(headers.get(header::SET_COOKIE).is_none());
    assert!(body.contains("used already"));
    let (status, _, _) = rig.send(get("/login?token=", "")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The session works, and logging out ends it.
    assert_eq!(rig.get("/stations").await.0, StatusCode::OK);
    let (status, _, _) = rig.post("/logout", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rig.get("/stations").await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn a_foreign_host_is_refused_even_with_a_session() {
    let rig = Rig::new().await;
    let request = Request::get("/stations")
        .header(header::HOST, "rebound.example:8080")
        .header(header::COOKIE, &rig.cookie)
        .body(Body::empty())
        .unwrap();
    let (status, headers, body) = rig.send(request).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_secured(&headers);
    assert!(body.contains("DNS rebinding"));
    assert!(rig.fleetd.sent().is_empty(), "fleetd was not asked");
}

#[tokio::test]
async fn a_cross_site_post_is_refused_and_changes_nothing() {
    let rig = Rig::new().await;
    let fp = fingerprint("AB");
    rig.fleetd
        .add_station(station("ST-1", "MC", StationState::Unauthorized, Some(&fp)));
    let form = format!("fingerprint={fp}");
    for site in ["cross-site", "same-site", "none"] {
        let (status, headers, _) = rig
            .send(post("/stations/ST-1/accept", &rig.cookie, &form, site))
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{site}");
        assert_secured(&headers);
    }
    // Without Sec-Fetch-Site, Origin decides.
    let request = |origin: &str| {
        Request::post("/stations/ST-1/accept")
            .header(header::HOST, HOST)
            .header(header::COOKIE, &rig.cookie)
            .header(header::ORIGIN, origin)
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(form.clone()))
            .unwrap()
    };
    let (status, _, _) = rig.send(request("http://evil.example")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(rig.sent("acceptStation").is_empty());
    assert_eq!(rig.fleetd.station("ST-1").unwrap()["state"], "unauthorized");
    let (status, _, _) = rig.send(request("http://127.0.0.1:8080")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(rig.fleetd.station("ST-1").unwrap()["state"], "running");
}

#[tokio::test]
async fn device_supplied_strings_are_shown_as_text() {
    let rig = Rig::new().await;
    let mut evil = station(
        "ST-X",
        "<script>alert('model')</script>",
        StationState::Unsupported,
        None,
    );
    evil["firmware"] = json!("\"><img src=x onerror=alert(1)>");
    evil["reason"] = json!("<b>not a version</b>");
    rig.fleetd.add_station(evil);
    for path in ["/stations", "/stations/ST-X"] {
        let (status, body) = rig.get(path).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("&lt;script&gt;alert('model')&lt;/script&gt;"),
            "{path}: {body}"
        );
        assert!(!body.contains("<script>alert"), "{path}");
        assert!(!body.contains("<img src=x"), "{path}");
        assert!(body.contains("&lt;b&gt;not a version&lt;/b&gt;"), "{path}");
        // The only scripts are the console's own file.
        assert_eq!(body.matches("<script").count(), 1, "{path}");
    }
}

#[tokio::test]
async fn the_station_list_filters_counts_searches_and_lists_the_rejected() {
    let rig = Rig::new().await;
    let fp = fingerprint("01");
    for (serial, state) in [
        ("ST-1", StationState::Unauthorized),
        ("ST-2", StationState::Unauthorized),
        ("ST-3", StationState::Running),
        ("ST-4", StationState::Rejected),
    ] {
        rig.fleetd
            .add_station(station(serial, "MC-200", state, Some(&fp)));
    }
    let (status, body) = rig.get("/stations").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("Waiting for approval <span class=\"count\">2</span>"),
        "{body}"
    );
    assert!(
        body.contains("2 waiting for approval"),
        "the header counts them: {body}"
    );
    assert!(body.contains("Rejected Stations"));
    assert!(body.contains("action=\"/stations/ST-4/clear\""));
    let (_, body) = rig.get("/stations?state=running").await;
    assert!(body.contains("data-serial=\"ST-3\"") && !body.contains("data-serial=\"ST-1\""));
    let (_, body) = rig.get("/stations?q=st-2").await;
    assert!(body.contains("data-serial=\"ST-2\"") && !body.contains("data-serial=\"ST-1\""));
    assert_eq!(
        rig.get("/stations?state=martian").await.0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        rig.get("/stations?sort=chaos").await.0,
        StatusCode::BAD_REQUEST
    );

    let (status, headers, _) = rig.post("/stations/ST-4/clear", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers[header::LOCATION]
        .to_str()
        .unwrap()
        .contains("done=cleared"));
    assert!(rig.fleetd.station("ST-4").is_none());
}

#[tokio::test]
async fn bulk_accept_confirms_first_and_sends_the_fingerprints_the_list_showed() {
    let rig = Rig::new().await;
    let (one, two) = (fingerprint("0A"), fingerprint("0B"));
    rig.fleetd.add_station(station(
        "ST-1",
        "MC",
        StationState::Unauthorized,
        Some(&one),
    ));
    rig.fleetd.add_station(station(
        "ST-2",
        "MC",
        StationState::Unauthorized,
        Some(&two),
    ));
    let form = format!(
        "station=ST-1+{one}&station=ST-2+{}&action=accept",
        fingerprint("0C")
    );
    let (status, _, body) = rig.post("/stations/bulk", &form).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Accept 2 stations?"), "{body}");
    assert!(
        rig.sent("acceptStation").is_empty(),
        "nothing before the confirmation"
    );
    let (status, _, body) = rig
        .post("/stations/bulk", &format!("{form}&confirm=yes"))
        .await;
    assert_eq!(status, StatusCode::OK);
    let sent = rig.sent("acceptStation");
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0]["fingerprint"], one.as_str());
    assert_eq!(rig.fleetd.station("ST-1").unwrap()["state"], "running");
    // ST-2's key is not the one the form carried: refused, and said so.
    assert_eq!(rig.fleetd.station("ST-2").unwrap()["state"], "unauthorized");
    assert!(body.contains("fingerprint_mismatch"), "{body}");

    let (status, _, _) = rig.post("/stations/bulk", "action=accept").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "nothing ticked");
    let (status, _, _) = rig
        .post("/stations/bulk", "station=ST-1&action=explode")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = rig
        .post("/stations/bulk", "station=ST-2+nonsense&action=accept")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn the_station_page_shows_the_fingerprint_grouped_and_accept_sends_it() {
    let rig = Rig::new().await;
    let fp = fingerprint("C3");
    rig.fleetd
        .add_station(station("ST-1", "MC", StationState::Unauthorized, Some(&fp)));
    let (status, body) = rig.get("/stations/ST-1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains(&["C3"; 8].join(" ")), "grouped: {body}");
    assert!(body.contains("02:42:AC:11:00:02") && body.contains("02:42:AC:11:00:03"));
    assert!(body.contains("local admin interface"));
    assert!(body.contains(&format!("name=\"fingerprint\" value=\"{fp}\"")));

    let wrong = format!("fingerprint={}", fingerprint("C4"));
    let (status, _, body) = rig.post("/stations/ST-1/accept", &wrong).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(body.contains("fingerprint_mismatch"));
    assert_eq!(rig.fleetd.station("ST-1").unwrap()["state"], "unauthorized");
    let (status, _, _) = rig.post("/stations/ST-1/accept", "fingerprint=xyz").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        rig.sent("acceptStation").len(),
        1,
        "a malformed one is not sent"
    );

    let (status, headers, _) = rig
        .post("/stations/ST-1/accept", &format!("fingerprint={fp}"))
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers[header::LOCATION]
        .to_str()
        .unwrap()
        .ends_with("done=accepted"));
    let (_, body) = rig.get("/stations/ST-1?done=accepted").await;
    assert!(body.contains("Running") && body.contains("Reset Device"));
    assert_eq!(rig.get("/stations/ST-9").await.0, StatusCode::NOT_FOUND);
    assert_eq!(
        rig.get("/stations/bad%20serial").await.0,
        StatusCode::BAD_REQUEST
    );
}

#[tokio::test]
async fn the_station_page_says_why_as_fleetd_explains_it() {
    let rig = Rig::new().await;
    rig.fleetd.add_station(station(
        "ST-1",
        "MC",
        StationState::Rejected,
        Some(&fingerprint("E5")),
    ));
    // No explanation (an older fleetd, or none to give): no box, the page still works.
    let (status, body) = rig.get("/stations/ST-1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains("id=\"why\""), "{body}");
    rig.fleetd.explain_as(
        "ST-1",
        json!({
            "subject": "ST-1", "kind": "station", "state": "rejected", "label": "Rejected",
            "why": "an operator rejected it <at once>",
            "rule": "Rejected stations are ignored until an operator Clears them.",
            "refusals": [{"seq": 9, "time": "2026-01-05T10:00:00Z", "action": "connect",
                "actor": "192.0.2.7:4000", "reason": "station is rejected"}],
            "block": {"address": "192.0.2.7", "until": "2026-01-05T10:15:00Z", "failures": null},
            "scanned": 12,
        }),
    );
    let (status, body) = rig.get("/stations/ST-1").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Why it is Rejected"), "{body}");
    assert!(
        body.contains("an operator rejected it &lt;at once&gt;"),
        "escaped: {body}"
    );
    assert!(body.contains("ignored until an operator Clears them"));
    assert!(
        body.contains("2026-01-05 10:00:00 UTC: station is rejected"),
        "{body}"
    );
    assert!(
        body.contains("192.0.2.7 is blocked until 2026-01-05 10:15:00 UTC"),
        "{body}"
    );
    let asked = rig.sent("explain");
    assert_eq!(
        asked.last().map(|c| c["subject"].clone()),
        Some(json!("ST-1"))
    );
    // Its recent audit records are what happened to it, not the reads of this page.
    rig.fleetd.record("admin", "ST-1", "getStation");
    rig.fleetd.record("admin", "ST-1", "explain");
    rig.fleetd.record("bob", "ST-1", "rejectStation");
    let (_, body) = rig.get("/stations/ST-1").await;
    let history = body
        .split("Recent audit records")
        .nth(1)
        .unwrap_or_default();
    assert!(history.contains("rejectStation"), "{history}");
    assert!(
        !history.contains("getStation") && !history.contains(">explain<"),
        "{history}"
    );
}

#[tokio::test]
async fn destructive_actions_ask_first_and_then_do_what_they_said() {
    let rig = Rig::new().await;
    let fp = fingerprint("D4");
    rig.fleetd
        .add_station(station("ST-1", "MC", StationState::Running, Some(&fp)));
    let (status, body) = rig.get("/stations/ST-1/reset").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Delete Authentication") && body.contains("Cancel"));
    assert!(rig.sent("resetStation").is_empty(), "a GET changes nothing");
    let (status, _, _) = rig.post("/stations/ST-1/reset", "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "neither option ticked");
    let (status, _, _) = rig
        .post("/stations/ST-1/reset", "delete_authentication=on")
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let sent = rig.sent("resetStation");
    assert_eq!(sent[0]["delete_authentication"], true);
    assert_eq!(rig.fleetd.station("ST-1").unwrap()["state"], "unauthorized");

    let (_, body) = rig.get("/stations/ST-1/remove").await;
    assert!(body.contains("deleted from the list"));
    let (status, headers, _) = rig.post("/stations/ST-1/remove", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(headers[header::LOCATION]
        .to_str()
        .unwrap()
        .contains("done=removed"));
    assert!(rig.fleetd.station("ST-1").is_none());

    rig.fleetd
        .add_station(station("ST-2", "MC", StationState::UpdateRequired, None));
    let (_, body) = rig.get("/stations/ST-2").await;
    assert!(body.contains("Start Update"));
    // The confirmation names the image that will be installed, from fleetd's catalog; an
    // image below the minimum is not offered.
    let (_, body) = rig.get("/stations/ST-2/update").await;
    assert!(
        body.contains("Will install firmware <strong>6.1.0</strong>"),
        "{body}"
    );
    assert!(body.contains(&"ab".repeat(32)));
    assert!(!body.contains("6.0.7"), "{body}");
    let (status, _, _) = rig
        .post("/stations/ST-2/update", "version=not.a.version")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = rig.post("/stations/ST-2/update", "version=").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, body) = rig.get("/stations/ST-2").await;
    assert!(
        body.contains("update-progress") && body.contains("6.1.0"),
        "{body}"
    );
    let (status, _, _) = rig.post("/stations/ST-2/reject", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(rig.fleetd.station("ST-2").unwrap()["state"], "rejected");
}

#[tokio::test]
async fn a_changed_key_raises_an_alert_on_the_page_and_a_badge_in_the_list() {
    let rig = Rig::new().await;
    let fp = fingerprint("E5");
    rig.fleetd
        .add_station(station("ST-1", "MC", StationState::NotRunning, Some(&fp)));
    let topic = fleet_protocol::Topic::Event("default".into(), fleet_protocol::EventKind::Security);
    rig.console.handle_event(
        &topic.to_string(),
        json!({"event": "identity_mismatch", "serial": "ST-1", "pinned": fp,
            "presented": fingerprint("E6"), "ip": "127.0.0.9", "advice": "remove it", "time": "t"}),
    );
    let (_, body) = rig.get("/stations").await;
    assert!(body.contains("key changed"), "{body}");
    assert!(body.contains("1 security alert"));
    let (_, body) = rig.get("/stations/ST-1").await;
    assert!(body.contains("Security alert") && body.contains("127.0.0.9"));
    let (status, _, _) = rig.post("/stations/ST-1/dismiss-alert", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, body) = rig.get("/stations/ST-1").await;
    assert!(!body.contains("Security alert"));
}

#[tokio::test]
async fn a_pap_is_shown_once_after_create_and_reset_and_never_in_the_list() {
    let rig = Rig::new().await;
    let (status, _, body) = rig
        .post(
            "/phones",
            "mac=AA%3ABB%3ACC%3ADD%3AEE%3A01&vendor=Yealink&type=T54W&site=Berlin",
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let pap = rig.fleetd.phone("aabbccddee01").unwrap()["pap"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(body.contains(&format!("id=\"pap\">{pap}<")), "{body}");
    let (_, list) = rig.get("/phones").await;
    assert!(list.contains("AA:BB:CC:DD:EE:01") && list.contains("Authentication needed"));
    assert!(!list.contains(&pap), "the list shows no PAP");
    let (_, body) = rig.get("/phones/aabbccddee01/reset-authentication").await;
    assert!(body.contains("void"));
    let (status, _, body) = rig
        .post("/phones/aabbccddee01/reset-authentication", "")
        .await;
    assert_eq!(status, StatusCode::OK);
    let new = rig.fleetd.phone("aabbccddee01").unwrap()["pap"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(new, pap);
    assert!(body.contains(&format!("id=\"pap\">{new}<")));

    let (status, _, _) = rig.post("/phones", "mac=nonsense&vendor=Y&type=T").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = rig
        .post("/phones", "mac=aabbccddee01&vendor=Y&type=T")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "exists already");
    let (status, _, _) = rig.post("/phones/aabbccddee01/suspend", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(rig.fleetd.phone("aabbccddee01").unwrap()["suspended_until"].is_string());
    let (status, _, _) = rig.post("/phones/aabbccddee01/delete", "").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert!(rig.fleetd.phone("aabbccddee01").is_none());
}

#[tokio::test]
async fn the_devices_csv_downloads_and_an_upload_is_imported_line_by_line() {
    let rig = Rig::new().await;
    let (status, _, _) = rig
        .post("/phones", "mac=aabbccddee01&vendor=Yealink&type=T54W")
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, headers, body) = rig.send(get("/devices.csv", &rig.cookie)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers[header::CONTENT_TYPE], "text/csv; charset=utf-8");
    assert!(headers[header::CONTENT_DISPOSITION]
        .to_str()
        .unwrap()
        .contains("devices.csv"));
    assert!(body.starts_with("vendor,type,mac,created_at,site,auth_state,pap\r\n"));
    assert!(body.contains("aabbccddee01"));

    let csv = "vendor,type,mac,site\nSnom,D785,aabbccddee02,Lab\n<i>x</i>,T,not-a-mac,Lab\n";
    let boundary = "XyZ";
    let upload = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.csv\"\r\n\
         Content-Type: text/csv\r\n\r\n{csv}\r\n--{boundary}--\r\n"
    );
    let request = Request::post("/phones/import")
        .header(header::HOST, HOST)
        .header(header::COOKIE, &rig.cookie)
        .header("sec-fetch-site", "same-origin")
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(upload))
        .unwrap();
    let (status, _, body) = rig.send(request).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("1 created, 1 refused"), "{body}");
    assert!(body.contains("<td>3</td>"), "the line of the error: {body}");
    assert!(rig.fleetd.phone("aabbccddee02").is_some());
}

#[tokio::test]
async fn whitelist_entries_are_added_and_removed_and_bad_ones_are_refused_here() {
    let rig = Rig::new().await;
    rig.fleetd
        .add_temporary("127.0.0.2", "2026-01-05T18:00:00Z");
    let (status, _, _) = rig.post("/whitelist/add", "entry=203.0.113.0%2F24").await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (_, body) = rig.get("/whitelist").await;
    assert!(body.contains("data-entry=\"203.0.113.0/24\""));
    assert!(
        body.contains("data-expires=\"2026-01-05T18:00:00Z\""),
        "{body}"
    );
    let (status, _, body) = rig.post("/whitelist/add", "entry=203.0.113.0%2F33").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body.contains("33"), "{body}");
    assert_eq!(rig.sent("addWhitelistEntry").len(), 1);
    let (status, _, _) = rig
        .post("/whitelist/remove", "entry=203.0.113.0%2F24")
        .await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let (status, _, _) = rig
        .post("/whitelist/remove", "entry=203.0.113.0%2F24")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "fleetd's refusal, shown");
}

#[tokio::test]
async fn the_audit_log_filters_and_verifies_its_chain() {
    let rig = Rig::new().await;
    let fp = fingerprint("F7");
    rig.fleetd
        .add_station(station("ST-1", "MC", StationState::Running, Some(&fp)));
    rig.fleetd
        .add_station(station("ST-2", "MC", StationState::Running, Some(&fp)));
    rig.post("/stations/ST-1/reject", "").await;
    rig.post("/stations/ST-2/reject", "").await;
    let (status, body) = rig.get("/audit?device=ST-2").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("<td>ST-2</td>") && !body.contains("<td>ST-1</td>"),
        "{body}"
    );
    let (status, body) = rig.get("/audit/verify").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("Intact: 2 records"), "{body}");
}

#[tokio::test]
async fn when_fleetd_is_down_the_pages_say_so() {
    let rig = Rig::new().await;
    rig.fleetd.set_reachable(false);
    let (status, body) = rig.get("/stations").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("not reachable"));
    rig.fleetd.set_reachable(true);
    let (status, body) = rig.get("/stations").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("fleetd reachable"));
}

#[tokio::test]
async fn the_event_stream_sends_an_escaped_fragment_per_event() {
    let rig = Rig::new().await;
    let response = rig
        .console
        .router()
        .oneshot(get("/events", &rig.cookie))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "text/event-stream"
    );
    let topic = fleet_protocol::Topic::Event("default".into(), fleet_protocol::EventKind::Stations);
    rig.console.handle_event(
        &topic.to_string(),
        json!({"event": "state", "type": "stations", "time": "2026-01-05T10:00:00Z",
            "station": station("ST-<b>", "MC", StationState::Unauthorized, None)}),
    );
    let mut body = response.into_body().into_data_stream();
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use futures_util::StreamExt as _;
        body.next().await
    })
    .await
    .expect("an event in time")
    .expect("a chunk")
    .unwrap();
    let text = String::from_utf8(chunk.to_vec()).unwrap();
    assert!(text.starts_with("event: stations\n"), "{text}");
    assert!(text.contains("ST-&lt;b&gt;: Unauthorized"), "{text}");
    assert!(text.contains("<li data-kind=\"stations\">"), "{text}");
}

fn stations_topic() -> String {
    fleet_protocol::Topic::Event("default".into(), fleet_protocol::EventKind::Stations).to_string()
}

fn progress_event(serial: &str, received: Value, size: Value) -> Value {
    json!({"event": "update_progress", "serial": serial, "version": "6.1.0",
        "received": received, "size": size, "type": "stations", "time": "2026-01-05T10:00:00Z"})
}

#[tokio::test]
async fn an_updating_station_shows_its_download_as_a_progress_bar() {
    let rig = Rig::new().await;
    let mut updating = station("ST-3", "MC", StationState::Updating, None);
    updating["update_version"] = json!("6.1.0");
    rig.fleetd.add_station(updating);
    let (_, body) = rig.get("/stations/ST-3").await;
    assert!(
        body.contains(r#"<progress id="update-progress" data-progress="ST-3" aria-label"#),
        "indeterminate before the first event: {body}"
    );
    assert!(body.contains("waiting for the station's first chunk request"));

    rig.console.handle_event(
        &stations_topic(),
        progress_event("ST-3", json!(400), json!(1000)),
    );
    let (_, body) = rig.get("/stations/ST-3").await;
    assert!(
        body.contains(r#"data-progress="ST-3" value="400" max="1000""#),
        "{body}"
    );
    assert!(body.contains("40 % (400 of 1000 bytes)"), "{body}");
    let (_, list) = rig.get("/stations").await;
    assert!(
        list.contains(r#"<span class="percent" data-progress-text="ST-3">40 %</span>"#),
        "{list}"
    );

    // Malformed ones are ignored; one beyond the end is the end.
    for (received, size) in [
        (json!(1), json!(0)),
        (json!(-1), json!(1000)),
        (json!("500"), json!(1000)),
    ] {
        rig.console
            .handle_event(&stations_topic(), progress_event("ST-3", received, size));
    }
    rig.console
        .handle_event(&stations_topic(), json!({"event": "update_progress"}));
    let (_, body) = rig.get("/stations/ST-3").await;
    assert!(body.contains(r#"value="400" max="1000""#), "{body}");
    rig.console.handle_event(
        &stations_topic(),
        progress_event("ST-3", json!(5000), json!(1000)),
    );
    let (_, body) = rig.get("/stations/ST-3").await;
    assert!(body.contains(r#"value="1000" max="1000""#), "{body}");

    // A download of another image is not this update's.
    let mut other = station("ST-3", "MC", StationState::Updating, None);
    other["update_version"] = json!("6.2.0");
    rig.fleetd.add_station(other);
    let (_, body) = rig.get("/stations/ST-3").await;
    assert!(body.contains("waiting for the station's first chunk request"));

    // Installed and asking again: the last download stays on its page.
    rig.fleetd
        .add_station(station("ST-3", "MC", StationState::Unauthorized, None));
    let (_, body) = rig.get("/stations/ST-3").await;
    assert!(body.contains("last-download") && body.contains("the whole image"));
    assert!(body.contains(r#"value="1000" max="1000""#), "{body}");
    let (_, list) = rig.get("/stations").await;
    assert!(!list.contains("data-progress-text"), "only Updating rows");
}

#[tokio::test]
async fn a_progress_event_is_streamed_as_its_figures_and_a_malformed_one_not_at_all() {
    let rig = Rig::new().await;
    let response = rig
        .console
        .router()
        .oneshot(get("/events", &rig.cookie))
        .await
        .unwrap();
    rig.console.handle_event(
        &stations_topic(),
        progress_event("ST-<b>", json!(1), json!(0)),
    );
    rig.console.handle_event(
        &stations_topic(),
        progress_event("ST-<b>", json!(7000), json!(70000)),
    );
    let mut body = response.into_body().into_data_stream();
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use futures_util::StreamExt as _;
        body.next().await
    })
    .await
    .expect("an event in time")
    .expect("a chunk")
    .unwrap();
    let text = String::from_utf8(chunk.to_vec()).unwrap();
    assert!(text.starts_with("event: progress\n"), "{text}");
    assert!(
        text.contains(
            r#"<li data-kind="progress" data-serial="ST-&lt;b&gt;" data-received="7000" data-size="70000" data-percent="10">"#
        ),
        "{text}"
    );
    assert!(text.contains("10 % (7000 of 70000 bytes)"), "{text}");
}

#[tokio::test]
async fn the_phones_list_shows_wrong_paps_and_lockouts() {
    let rig = Rig::new().await;
    let (status, _, _) = rig
        .post(
            "/phones",
            "mac=aabbccddee07&vendor=Snom&type=D785&site=Berlin",
        )
        .await;
    assert!(status.is_success() || status.is_redirection(), "{status}");
    let (_, list) = rig.get("/phones").await;
    assert!(!list.contains("pap-counts"), "nothing while both are 0");
    rig.fleetd.set_pap_counts("aabbccddee07", 2, 1);
    let (_, list) = rig.get("/phones").await;
    assert!(
        list.contains(r#"<small class="pap-counts">2 wrong PAPs, 1 lockout</small>"#),
        "{list}"
    );
}
