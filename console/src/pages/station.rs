//! A station's page (the manual's authorize page): serial, both MACs, the fingerprint large and
//! grouped for comparing with the station's local admin page, the actions its state allows
//! (Accept, Reject, Start Update, Reset Device, Remove Device), the progress bar of its firmware
//! download (moved in place by `update_progress` events), a security alert when its key
//! changed, why it stands where it stands (fleetd's `explain`: the reason, the manual's rule,
//! its last refusals and an address block), and its recent audit records. Each destructive
//! action first shows a page that says what will happen.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse as _, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use fleet_protocol::command::arg;
use fleet_protocol::{FirmwareVersion, OperatorCommand, PageLimit, Serial, StationState};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{page, respond, Failure, Section, Status};
use super::{value, Shared};
use crate::hub::{Alert, LiveKind};
use crate::progress::{bar, Progress};
use crate::views::{fingerprint_groups, items, mac_display, some_text, station_label, text, when};
use crate::Console;

pub(crate) fn routes() -> Router<std::sync::Arc<Console>> {
    Router::new()
        .route("/stations/{serial}", get(show))
        .route("/stations/{serial}/accept", post(accept))
        .route(
            "/stations/{serial}/reject",
            get(confirm_reject).post(reject),
        )
        .route(
            "/stations/{serial}/update",
            get(confirm_update).post(update),
        )
        .route("/stations/{serial}/reset", get(confirm_reset).post(reset))
        .route(
            "/stations/{serial}/remove",
            get(confirm_remove).post(remove),
        )
        .route("/stations/{serial}/dismiss-alert", post(dismiss))
}

/// How many of the newest audit records are searched for a station's own.
const AUDIT_WINDOW: u64 = 500;
/// How many of them its page shows.
const AUDIT_SHOWN: usize = 10;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ShowQuery {
    done: Option<String>,
}

fn notice(done: Option<&str>) -> Option<&'static str> {
    Some(match done? {
        "accepted" => "Accepted: the station was sent `authorized` and is now part of the fleet.",
        "rejected" => "Rejected: the station was cut off; its requests are ignored until you Clear it in the Rejected Stations section.",
        "update" => "Update started: the station pulls the image, installs it, reboots and then asks again as Unauthorized.",
        "reset" => "Reset sent: the station was cut off and reboots.",
        "dismissed" => "Alert dismissed.",
        _ => return None,
    })
}

fn station_link(serial: &Serial, done: &str) -> String {
    format!("/stations/{serial}?done={done}")
}

async fn show(
    State(console): Shared,
    Path(serial): Path<String>,
    Query(query): Query<ShowQuery>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let station = console
        .run_command(OperatorCommand::GetStation {
            serial: serial.clone(),
        })
        .await?;
    let history = recent_audit(&console, &serial).await;
    // Shown when fleetd can say (an older fleetd without `explain` leaves the box out).
    let why = console
        .run_command(OperatorCommand::Explain {
            subject: fleet_protocol::Subject::parse(serial.as_str())?,
        })
        .await
        .ok();
    console.hub.prune(std::slice::from_ref(&station), false);
    let alert = console.hub.alert(serial.as_str());
    let progress = console
        .hub
        .downloads
        .of(serial.as_str())
        .filter(|p| p.of_update_of(&station));
    let status = Status::of(&console).await;
    let body = html! {
        div #live {
            h1 { "Station " (serial.as_str()) }
            @if let Some(alert) = &alert { (alert_box(&serial, alert)) }
            (facts(&station))
            (fingerprint_box(&station))
            (actions(&serial, &station, progress.as_ref()))
            @if let Some(why) = &why { (why_box(why)) }
            (history_box(&history))
        }
    };
    Ok(respond(page(
        serial.as_str(),
        Section::Stations,
        &[LiveKind::Stations, LiveKind::Security, LiveKind::Audit],
        &status,
        notice(query.done.as_deref()),
        body,
    )))
}

/// The station's newest audit records, newest first; empty when fleetd cannot say.
async fn recent_audit(console: &Console, serial: &Serial) -> Vec<Value> {
    let command = OperatorCommand::ListAuditLog {
        limit: Some(PageLimit::saturating(AUDIT_WINDOW)),
        after_seq: None,
    };
    let Ok(data) = console.run_command(command).await else {
        return Vec::new();
    };
    // Reads (this page's own `getStation` and `explain` among them) are not what happened to
    // the station.
    let mut records: Vec<Value> = items(&data, "records")
        .into_iter()
        .filter(|r| text(r, "device") == serial.as_str())
        .filter(|r| !fleet_protocol::names_a_read(text(r, "action")))
        .collect();
    records.reverse();
    records.truncate(AUDIT_SHOWN);
    records
}

fn alert_box(serial: &Serial, alert: &Alert) -> Markup {
    html! {
        section .alert-box #security-alert role="alert" {
            h2 { "⚠ Security alert: this station's key changed" }
            p { "At " (when(&alert.time)) " a station calling itself " strong { (serial.as_str()) } " connected"
                @if let Some(ip) = &alert.ip { " from " (ip) }
                " with "
                @match &alert.presented { Some(fp) => { "another key (" code { (fp) } ")" }, None => { "no key at all" } }
                ", not the one you accepted"
                @if let Some(pinned) = &alert.pinned { " (" code { (pinned) } ")" }
                ". It was refused." }
            p { "This may be a clone, or the station's authentication was deleted on its local admin page alone." }
            @if !alert.advice.is_empty() { p { "fleetd's advice: " (alert.advice) "." } }
            p { "The manual's answer: Remove Device below, then reboot the station and authorize it again, comparing its fingerprint." }
            form method="post" action=(format!("/stations/{serial}/dismiss-alert")) { button type="submit" { "Dismiss this alert" } }
        }
    }
}

fn facts(station: &Value) -> Markup {
    html! {
        dl .facts {
            dt { "Serial number" } dd #serial { (text(station, "serial")) }
            dt { "MAC of the streaming interface" } dd #mac-streaming { (mac_display(text(station, "mac_streaming"))) }
            dt { "MAC of the control interface" } dd #mac-control { (mac_display(text(station, "mac_control"))) }
            dt { "Model" } dd #model { (text(station, "model")) }
            dt { "Firmware" } dd #firmware { (text(station, "firmware")) }
            dt { "State" } dd {
                span #state .state data-state=(text(station, "state")) { (station_label(station)) }
                @if let Some(reason) = some_text(station, "reason") { " — " span #reason { (reason) } }
            }
            dt { "Connected" } dd { @if station["online"] == Value::Bool(true) { "online" } @else { "offline" } }
            dt { "Last seen" } dd { (some_text(station, "last_seen").map_or("never".to_owned(), when)) }
            dt { "Address" } dd { (text(station, "ip")) }
        }
    }
}

fn fingerprint_box(station: &Value) -> Markup {
    html! {
        section .fingerprint-box {
            h2 { "Fingerprint" }
            @match some_text(station, "fingerprint") {
                Some(fp) => {
                    p .fingerprint #fingerprint data-fingerprint=(fp) {
                        @for group in fingerprint_groups(fp) { span { (group) } br; }
                    }
                    p .advice { "The fingerprint is the station's digital signature. We strongly recommend that you compare it, group by group, with the fingerprint on the station's local admin interface: accept only the station you intend to connect." }
                }
                None => p .quiet { "This station presented no key (legacy firmware, or its authentication was deleted): it has no fingerprint to compare." },
            }
        }
    }
}

/// The last download fleetd told this console about, of a station no longer Updating (it
/// installed the image and asked again, or gave up): the cache's entry, until it is dropped.
fn last_download(serial: &Serial, p: &Progress) -> Markup {
    html! {
        div .update #last-download {
            p { "Last firmware download this console heard of (since it started): image "
                strong { (p.version) } ", at " (when(&p.time)) "."
                @if p.complete() { " The station asked for the whole image." }
                @else { " The station stopped asking before the end." } }
            (bar(serial.as_str(), Some(p)))
        }
    }
}

fn actions(serial: &Serial, station: &Value, progress: Option<&Progress>) -> Markup {
    let state = StationState::from_name(text(station, "state"));
    let fingerprint = some_text(station, "fingerprint");
    let path = |action: &str| format!("/stations/{serial}/{action}");
    html! {
        section .actions {
            h2 { "Actions" }
            @if state == Some(StationState::Unauthorized) {
                @if let Some(fp) = fingerprint {
                    form method="post" action=(path("accept")) .inline {
                        input type="hidden" name="fingerprint" value=(fp);
                        button type="submit" #accept .primary { "Accept" }
                    }
                    " Accept authorizes the station with the fingerprint shown above, and only if its key is still that one."
                }
            }
            @if state == Some(StationState::Updating) {
                div .update {
                    p { "Updating to " strong #update-version { (some_text(station, "update_version").unwrap_or("the latest image")) } ". The station pulls the image in chunks, checks its SHA-256 and installs it; then it reboots into the new firmware and asks again (Unauthorized)." }
                    (bar(serial.as_str(), progress))
                }
            } @else if let Some(p) = progress {
                (last_download(serial, p))
            }
            @if state == Some(StationState::NotRunning) {
                p .quiet #not-running-hint { "The station is not connected: a reset reaches it only when it connects again. The manual's way for a station that is Not Running: Remove Device here, then Reset Device with Delete Authentication on its local admin page." }
            }
            ul .action-list {
                @if matches!(state, Some(StationState::UpdateRequired | StationState::Updating)) {
                    li { a href=(path("update")) .button #start-update { "Start Update" } }
                }
                @if matches!(state, Some(StationState::Running | StationState::NotRunning)) {
                    li { a href=(path("reset")) .button #reset-device { "Reset Device" } }
                }
                @if state != Some(StationState::Rejected) {
                    li { a href=(path("reject")) .button.danger #reject { "Reject" } }
                } @else {
                    li { form method="post" action=(path("clear")) .inline { button type="submit" #clear { "Clear" } } " then reboot the station." }
                }
                li { a href=(path("remove")) .button.danger #remove-device { "Remove Device" } }
            }
        }
    }
}

/// Why the station is in its state, as fleetd's `explain` says (docs/protocol.md §6).
fn why_box(why: &Value) -> Markup {
    let refusals = items(why, "refusals");
    let block = why.get("block").filter(|b| b.is_object());
    html! {
        section .why #why {
            h2 { "Why it is " (text(why, "label")) }
            p #why-reason { (text(why, "why")) }
            p .rule #why-rule { "The manual: " (text(why, "rule")) }
            @if let Some(block) = block {
                p #why-block { "Its address " (text(block, "address")) " is blocked until "
                    (when(text(block, "until"))) " for too many failed authentications." }
            }
            @if !refusals.is_empty() {
                h3 { "Last refusals" }
                ul #why-refusals { @for r in &refusals {
                    li { (when(text(r, "time"))) ": " (text(r, "reason")) }
                } }
            }
        }
    }
}

fn history_box(history: &[Value]) -> Markup {
    let refusal = history.iter().find(|r| text(r, "outcome") == "refused");
    html! {
        section .history {
            h2 { "Recent audit records" }
            @if let Some(refusal) = refusal {
                p #last-refusal { "Last refused at " (when(text(refusal, "time"))) " (" (text(refusal, "action")) "): " (text(refusal, "reason")) }
            }
            @if history.is_empty() { p .quiet { "None among the newest audit records." } } @else {
                table {
                    thead { tr { th { "Time" } th { "Actor" } th { "Action" } th { "Outcome" } th { "Reason" } } }
                    tbody { @for r in history { tr {
                        td { (when(text(r, "time"))) } td { (text(r, "actor")) } td { (text(r, "action")) }
                        td { (text(r, "outcome")) } td { (text(r, "reason")) }
                    } } }
                }
            }
        }
    }
}

async fn accept(
    State(console): Shared,
    Path(serial): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let fingerprint = value(&form, "fingerprint")
        .ok_or_else(|| Failure::bad_input("the fingerprint you checked is missing"))?;
    let fingerprint = arg::fingerprint(fingerprint.trim())?;
    let command = OperatorCommand::AcceptStation {
        serial: serial.clone(),
        fingerprint,
    };
    console.run_command(command).await?;
    Ok(Redirect::to(&station_link(&serial, "accepted")).into_response())
}

/// What a confirmation page asks: its title, what will happen, the form's fields, the button.
struct Question<'a> {
    title: &'a str,
    explain: Markup,
    fields: Markup,
    button: &'a str,
}

/// A confirmation page: what the action at `/stations/<serial>/<path>` will do, and its form.
async fn confirm(
    console: &Console,
    serial: &Serial,
    path: &str,
    question: Question<'_>,
) -> Response {
    let status = Status::of(console).await;
    let Question {
        title,
        explain,
        fields,
        button,
    } = question;
    let body = html! {
        h1 { (title) ": " (serial.as_str()) "?" }
        (explain)
        form method="post" action=(format!("/stations/{serial}/{path}")) .confirm {
            (fields)
            button type="submit" #confirm .danger { (button) }
            " " a href=(format!("/stations/{serial}")) { "Cancel" }
        }
    };
    respond(page(title, Section::Stations, &[], &status, None, body))
}

async fn confirm_reject(
    State(console): Shared,
    Path(serial): Path<String>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let explain = html! {
        p { "The station is sent `rejected` and cut off at once. All its further authorization requests are ignored until you Clear it in the Rejected Stations section (then reboot it)." }
    };
    let question = Question {
        title: "Reject",
        explain,
        fields: html! {},
        button: "Reject",
    };
    Ok(confirm(&console, &serial, "reject", question).await)
}

async fn reject(State(console): Shared, Path(serial): Path<String>) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let command = OperatorCommand::RejectStation {
        serial: serial.clone(),
    };
    console.run_command(command).await?;
    Ok(Redirect::to(&station_link(&serial, "rejected")).into_response())
}

async fn confirm_update(
    State(console): Shared,
    Path(serial): Path<String>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let explain = html! {
        p { "The station is sent the firmware image's version, size and SHA-256; it pulls the image in chunks, checks it, installs it and reboots into it. Then it asks to be authorized again, as Unauthorized." }
    };
    // The catalog, latest first (listFirmware): the image that will be installed, named
    // before it is; without it the operator may still type a version.
    let catalog = console
        .run_command(OperatorCommand::ListFirmware)
        .await
        .ok();
    let images: Vec<Value> = catalog
        .as_ref()
        .and_then(|c| c["images"].as_array())
        .map(|images| {
            let installable = |i: &&Value| i["installable"] == true;
            images.iter().filter(installable).cloned().collect()
        })
        .unwrap_or_default();
    let fields = match images.first() {
        Some(latest) => firmware_choice(latest, &images),
        None => html! {
            label { "Version to install "
                input type="text" name="version" placeholder="the newest in fleetd's catalog" #version;
            }
            p .quiet { "fleetd's firmware catalog could not be read (or offers no image): leave it empty for its newest image, or type a version." }
        },
    };
    let question = Question {
        title: "Start Update",
        explain,
        fields,
        button: "Start Update",
    };
    Ok(confirm(&console, &serial, "update", question).await)
}

/// The image that will be installed (the latest, unless another is chosen) and the others.
fn firmware_choice(latest: &Value, images: &[Value]) -> Markup {
    let field = |image: &Value, name: &str| image[name].as_str().unwrap_or("?").to_owned();
    html! {
        p #update-image {
            "Will install firmware " strong { (field(latest, "version")) }
            " (" (latest["size"].as_u64().unwrap_or(0)) " bytes, SHA-256 "
            code { (field(latest, "sha256")) } ")."
        }
        @if images.len() > 1 {
            label { "Or another image of the catalog "
                select name="version" #version {
                    @for image in images {
                        option value=(field(image, "version")) { (field(image, "version")) }
                    }
                }
            }
        } @else {
            input type="hidden" name="version" value=(field(latest, "version"));
        }
    }
}

async fn update(
    State(console): Shared,
    Path(serial): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let version = value(&form, "version")
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(FirmwareVersion::parse)
        .transpose()?;
    let command = OperatorCommand::StartStationUpdate {
        serial: serial.clone(),
        version,
    };
    console.run_command(command).await?;
    Ok(Redirect::to(&station_link(&serial, "update")).into_response())
}

async fn confirm_reset(
    State(console): Shared,
    Path(serial): Path<String>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let explain = html! {
        p { "The station is sent `reset`, cut off, and reboots." }
        ul {
            li { strong { "Delete Authentication" } ": its key is forgotten; after the reboot it asks again and shows as Unauthorized, and you authorize it again." }
            li { strong { "Delete Configuration" } ": its network configuration is reset; keep Delete Authentication unticked to stay authorized." }
        }
    };
    let fields = html! {
        label { input type="checkbox" name="delete_authentication" value="on" #delete-authentication checked; " Delete Authentication" }
        br;
        label { input type="checkbox" name="delete_configuration" value="on" #delete-configuration; " Delete Configuration" }
        br;
    };
    let question = Question {
        title: "Reset Device",
        explain,
        fields,
        button: "Reset Device",
    };
    Ok(confirm(&console, &serial, "reset", question).await)
}

async fn reset(
    State(console): Shared,
    Path(serial): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let delete_authentication = value(&form, "delete_authentication") == Some("on");
    let delete_configuration = value(&form, "delete_configuration") == Some("on");
    if !delete_authentication && !delete_configuration {
        return Err(Failure::bad_input(
            "Tick Delete Authentication, Delete Configuration or both: a reset with neither does nothing.",
        ));
    }
    let command = OperatorCommand::ResetStation {
        serial: serial.clone(),
        delete_authentication,
        delete_configuration,
    };
    console.run_command(command).await?;
    Ok(Redirect::to(&station_link(&serial, "reset")).into_response())
}

async fn confirm_remove(
    State(console): Shared,
    Path(serial): Path<String>,
) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let explain = html! {
        p { "The station is sent `removed`, cut off, and deleted from the list. To join again it must ask again and be authorized: reboot it (after deleting its authentication on its local admin page, if that is why you remove it)." }
    };
    let question = Question {
        title: "Remove Device",
        explain,
        fields: html! {},
        button: "Remove",
    };
    Ok(confirm(&console, &serial, "remove", question).await)
}

async fn remove(State(console): Shared, Path(serial): Path<String>) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    let command = OperatorCommand::RemoveStation {
        serial: serial.clone(),
    };
    console.run_command(command).await?;
    console.hub.dismiss(serial.as_str());
    Ok(Redirect::to(&format!("/stations?done=removed&serial={serial}")).into_response())
}

async fn dismiss(State(console): Shared, Path(serial): Path<String>) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    console.hub.dismiss(serial.as_str());
    Ok(Redirect::to(&station_link(&serial, "dismissed")).into_response())
}
