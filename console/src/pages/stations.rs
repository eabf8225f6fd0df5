//! The Station list page: every station with filters by state (waiting for approval first,
//! with counts), search, sort, the "Rejected Stations" section with Clear, and bulk Accept /
//! Reject of the ticked stations, each accepted with the fingerprint the list showed.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse as _, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use fleet_protocol::command::arg;
use fleet_protocol::{Fingerprint, OperatorCommand, Serial, StationState};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{page, respond, Failure, Section, Status};
use super::{value, values, Shared};
use crate::fleetd::{FleetdError, Listing};
use crate::hub::LiveKind;
use crate::progress::{percent_text, Downloads};
use crate::views::{
    fingerprint_groups, mac_display, some_text, station_label, station_matches, text, when,
};
use crate::Console;

pub(crate) fn routes() -> Router<std::sync::Arc<Console>> {
    Router::new()
        .route("/stations", get(list))
        .route("/stations/bulk", post(bulk))
        .route("/stations/{serial}/clear", post(clear))
}

/// The tabs, in the order an operator works through them: waiting for approval first.
const TABS: [StationState; 6] = [
    StationState::Unauthorized,
    StationState::UpdateRequired,
    StationState::Updating,
    StationState::Unsupported,
    StationState::Running,
    StationState::NotRunning,
];

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    state: Option<String>,
    q: Option<String>,
    sort: Option<String>,
    alerts: Option<String>,
    done: Option<String>,
    serial: Option<String>,
}

/// How the list is sorted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sort {
    Serial,
    State,
    LastSeen,
    Model,
}

impl Sort {
    const ALL: [(Sort, &'static str, &'static str); 4] = [
        (Sort::Serial, "serial", "Serial"),
        (Sort::State, "state", "State"),
        (Sort::LastSeen, "last_seen", "Last seen (newest first)"),
        (Sort::Model, "model", "Model"),
    ];

    fn parse(text: Option<&str>) -> Result<Sort, Failure> {
        match text.filter(|t| !t.is_empty()) {
            None => Ok(Sort::Serial),
            Some(t) => Sort::ALL
                .iter()
                .find(|(_, name, _)| *name == t)
                .map(|(sort, _, _)| *sort)
                .ok_or_else(|| Failure::bad_input(format!("unknown sort {t:?}"))),
        }
    }

    fn name(self) -> &'static str {
        Sort::ALL
            .iter()
            .find(|(sort, _, _)| *sort == self)
            .map_or("serial", |(_, name, _)| name)
    }

    fn apply(self, stations: &mut [Value]) {
        let rank = |s: &Value| {
            let state = text(s, "state");
            TABS.iter()
                .position(|t| t.as_str() == state)
                .unwrap_or(TABS.len())
        };
        match self {
            Sort::Serial => stations.sort_by(|a, b| text(a, "serial").cmp(text(b, "serial"))),
            Sort::State => stations.sort_by_key(|s| (rank(s), text(s, "serial").to_owned())),
            // RFC 3339 UTC sorts as text; never seen goes last.
            Sort::LastSeen => {
                stations.sort_by(|a, b| text(b, "last_seen").cmp(text(a, "last_seen")))
            }
            Sort::Model => stations.sort_by(|a, b| {
                (text(a, "model"), text(a, "serial")).cmp(&(text(b, "model"), text(b, "serial")))
            }),
        }
    }
}

/// The notice after an action that came back here.
fn notice(done: Option<&str>, serial: Option<&str>) -> Option<String> {
    let serial = serial.and_then(|s| Serial::parse(s).ok())?;
    let text = match done? {
        "cleared" => format!(
            "{serial} cleared from the rejected stations. Now reboot the station: it asks again \
             and shows as Unauthorized."
        ),
        "removed" => format!(
            "{serial} removed. It must ask again to be authorized (reboot it, or reset its \
             authentication on its local admin page first)."
        ),
        _ => return None,
    };
    Some(text)
}

async fn list(State(console): Shared, Query(query): Query<ListQuery>) -> Result<Response, Failure> {
    let filter = match query.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(name) => Some(arg::state(name)?),
    };
    let sort = Sort::parse(query.sort.as_deref())?;
    let search = query.q.clone().unwrap_or_default();
    let only_alerts = query.alerts.as_deref() == Some("1");
    let all = console.list_all(Listing::Stations { state: None }).await?;
    let rejected = console.list_all(Listing::RejectedStations).await?;
    console.hub.prune(&all, true);
    let alerted: BTreeSet<String> = console.hub.alerted().into_iter().collect();

    let listed: Vec<&Value> = all
        .iter()
        .filter(|s| text(s, "state") != StationState::Rejected.as_str())
        .collect();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for station in &listed {
        *counts.entry(text(station, "state")).or_default() += 1;
    }
    let mut shown: Vec<Value> = listed
        .iter()
        .filter(|s| filter.is_none_or(|f| text(s, "state") == f.as_str()))
        .filter(|s| station_matches(s, &search))
        .filter(|s| !only_alerts || alerted.contains(text(s, "serial")))
        .map(|s| (*s).clone())
        .collect();
    sort.apply(&mut shown);

    let pending = counts
        .get(StationState::Unauthorized.as_str())
        .copied()
        .unwrap_or(0);
    let status = Status::known(&console, Some(pending));
    let view = ListView {
        filter,
        search: &search,
        sort,
        counts: &counts,
        total: listed.len(),
        alerted: &alerted,
        downloads: &console.hub.downloads,
    };
    let body = html! {
        h1 { "Stations" }
        (view.tabs())
        (view.search_form())
        div #live {
            (view.table(&shown))
            (rejected_section(&rejected))
        }
    };
    let notice = notice(query.done.as_deref(), query.serial.as_deref());
    Ok(respond(page(
        "Stations",
        Section::Stations,
        &[LiveKind::Stations, LiveKind::Security],
        &status,
        notice.as_deref(),
        body,
    )))
}

struct ListView<'a> {
    filter: Option<StationState>,
    search: &'a str,
    sort: Sort,
    counts: &'a BTreeMap<&'a str, usize>,
    total: usize,
    alerted: &'a BTreeSet<String>,
    downloads: &'a Downloads,
}

impl ListView<'_> {
    fn link(&self, state: Option<StationState>) -> String {
        let mut link = format!("/stations?sort={}", self.sort.name());
        if let Some(state) = state {
            link.push_str("&state=");
            link.push_str(state.as_str());
        }
        link
    }

    fn tabs(&self) -> Markup {
        html! {
            nav .tabs aria-label="Filter by state" {
                @for state in TABS {
                    @let count = self.counts.get(state.as_str()).copied().unwrap_or(0);
                    a href=(self.link(Some(state))) .tab .current[self.filter == Some(state)]
                        data-state=(state.as_str()) {
                        @if state == StationState::Unauthorized { "Waiting for approval" } @else { (state.label()) }
                        " " span .count { (count) }
                    }
                }
                a href=(self.link(None)) .tab .current[self.filter.is_none()] { "All " span .count { (self.total) } }
            }
        }
    }

    fn search_form(&self) -> Markup {
        html! {
            form method="get" action="/stations" .search role="search" {
                @if let Some(state) = self.filter { input type="hidden" name="state" value=(state.as_str()); }
                label { "Search " input type="search" name="q" value=(self.search) placeholder="serial, MAC, model"; }
                label { "Sort by "
                    select name="sort" {
                        @for (sort, name, label) in Sort::ALL {
                            option value=(name) selected[sort == self.sort] { (label) }
                        }
                    }
                }
                button type="submit" { "Show" }
            }
        }
    }

    fn table(&self, shown: &[Value]) -> Markup {
        html! {
            form method="post" action="/stations/bulk" #bulk {
                table .stations {
                    thead { tr {
                        th { span .sr { "Select" } }
                        th { "Serial" } th { "Model" } th { "Firmware" } th { "MACs (streaming / control)" }
                        th { "State" } th { "Connected" } th { "Last seen" } th { "Address" }
                    } }
                    tbody {
                        @for station in shown { (self.row(station)) }
                        @if shown.is_empty() { tr { td colspan="9" .quiet { "No station here." } } }
                    }
                }
                p .bulk {
                    "With the ticked stations: "
                    button type="submit" name="action" value="accept" { "Accept" }
                    " "
                    button type="submit" name="action" value="reject" .danger { "Reject" }
                    " (you confirm on the next page)"
                }
            }
        }
    }

    fn row(&self, station: &Value) -> Markup {
        let serial = text(station, "serial");
        let link = Serial::parse(serial).ok().map(|s| format!("/stations/{s}"));
        let pick = match some_text(station, "fingerprint") {
            Some(fp) => format!("{serial} {fp}"),
            None => serial.to_owned(),
        };
        html! {
            tr data-serial=(serial) data-state=(text(station, "state")) {
                td { input type="checkbox" name="station" value=(pick) aria-label=(format!("select {serial}")); }
                td {
                    @if let Some(link) = &link { a href=(link) { (serial) } } @else { (serial) }
                    @if self.alerted.contains(serial) { " " span .badge.alert title="Its key changed: see its page" { "⚠ key changed" } }
                }
                td .model { (text(station, "model")) }
                td { (text(station, "firmware")) }
                td .mac { (mac_display(text(station, "mac_streaming"))) br; (mac_display(text(station, "mac_control"))) }
                td {
                    span .state data-state=(text(station, "state")) { (station_label(station)) }
                    @if text(station, "state") == StationState::Updating.as_str() {
                        " " (percent_text(serial, self.downloads.of(serial).filter(|p| p.of_update_of(station)).as_ref()))
                    }
                    @if let Some(reason) = some_text(station, "reason") { br; small { (reason) } }
                    @if let Some(version) = some_text(station, "update_version") { br; small { "to " (version) } }
                }
                td { @if station["online"] == Value::Bool(true) { "online" } @else { "offline" } }
                td { (some_text(station, "last_seen").map_or("never".to_owned(), when)) }
                td { (text(station, "ip")) }
            }
        }
    }
}

fn rejected_section(rejected: &[Value]) -> Markup {
    html! {
        section .rejected #rejected {
            h2 { "Rejected Stations" }
            @if rejected.is_empty() {
                p .quiet { "No station is rejected." }
            } @else {
                p { "These stations are refused until cleared. After Clear, reboot the station: it asks again and shows as Unauthorized." }
                table {
                    thead { tr { th { "Serial" } th { "Model" } th { "Last seen" } th { "Address" } th {} } }
                    tbody {
                        @for station in rejected {
                            @let serial = text(station, "serial");
                            tr data-serial=(serial) {
                                td { (serial) } td { (text(station, "model")) }
                                td { (some_text(station, "last_seen").map_or("never".to_owned(), when)) } td { (text(station, "ip")) }
                                td {
                                    @if let Ok(serial) = Serial::parse(serial) {
                                        form method="post" action=(format!("/stations/{serial}/clear")) {
                                            button type="submit" { "Clear" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

async fn clear(State(console): Shared, Path(serial): Path<String>) -> Result<Response, Failure> {
    let serial = arg::serial(&serial)?;
    console
        .run_command(OperatorCommand::ClearRejectedStation {
            serial: serial.clone(),
        })
        .await?;
    Ok(Redirect::to(&format!("/stations?done=cleared&serial={serial}")).into_response())
}

/// A ticked station: its serial and the fingerprint the list showed (none for legacy ones).
type Pick = (Serial, Option<Fingerprint>);

fn picks(form: &[(String, String)]) -> Result<Vec<Pick>, Failure> {
    let mut picks = Vec::new();
    for value in values(form, "station") {
        let (serial, fingerprint) = match value.split_once(' ') {
            Some((serial, fp)) => (serial, Some(arg::fingerprint(fp)?)),
            None => (value, None),
        };
        picks.push((arg::serial(serial)?, fingerprint));
    }
    if picks.is_empty() {
        return Err(Failure::bad_input(
            "Tick at least one station first: nothing was changed.",
        ));
    }
    Ok(picks)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Accept,
    Reject,
}

/// Bulk Accept / Reject: first a confirmation page that lists what will happen, then (with
/// `confirm=yes`) one command per station, and a page with each outcome.
async fn bulk(
    State(console): Shared,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, Failure> {
    let action = match value(&form, "action") {
        Some("accept") => Bulk::Accept,
        Some("reject") => Bulk::Reject,
        other => return Err(Failure::bad_input(format!("unknown action {other:?}"))),
    };
    let picks = picks(&form)?;
    let status = Status::of(&console).await;
    if value(&form, "confirm") != Some("yes") {
        return Ok(respond(page(
            "Confirm",
            Section::Stations,
            &[],
            &status,
            None,
            confirm_bulk(action, &picks),
        )));
    }
    let mut outcomes = Vec::new();
    for (serial, fingerprint) in picks {
        let command = match (action, fingerprint) {
            (Bulk::Accept, Some(fingerprint)) => OperatorCommand::AcceptStation {
                serial: serial.clone(),
                fingerprint,
            },
            (Bulk::Accept, None) => {
                let error = FleetdError::Refused {
                    code: "fingerprint_mismatch".into(),
                    error: "the station presented no key (legacy firmware): update it first".into(),
                };
                outcomes.push((serial, Err(error)));
                continue;
            }
            (Bulk::Reject, _) => OperatorCommand::RejectStation {
                serial: serial.clone(),
            },
        };
        outcomes.push((serial, console.run_command(command).await));
    }
    let body = html! {
        h1 { @if action == Bulk::Accept { "Accepted" } @else { "Rejected" } }
        table #outcomes {
            thead { tr { th { "Serial" } th { "Outcome" } } }
            tbody {
                @for (serial, outcome) in &outcomes {
                    tr data-serial=(serial.as_str()) {
                        td { a href=(format!("/stations/{serial}")) { (serial.as_str()) } }
                        @match outcome {
                            Ok(station) => td .ok { "done: " (station_label(station)) },
                            Err(e) => td .error { (e.to_string()) },
                        }
                    }
                }
            }
        }
        p { a href="/stations" { "Back to the stations" } }
    };
    Ok(respond(page(
        "Bulk outcome",
        Section::Stations,
        &[],
        &status,
        None,
        body,
    )))
}

fn confirm_bulk(action: Bulk, picks: &[Pick]) -> Markup {
    let verb = if action == Bulk::Accept {
        "Accept"
    } else {
        "Reject"
    };
    html! {
        h1 { (verb) " " (picks.len()) " station" @if picks.len() != 1 { "s" } "?" }
        @if action == Bulk::Accept {
            p { "Each station is accepted only if its key is still the one shown here, the one the list showed you. Compare each fingerprint with the station's local admin page first." }
        } @else {
            p { "Rejected stations are refused and cut off at once, and their further authorization requests are ignored until you Clear them." }
        }
        form method="post" action="/stations/bulk" {
            input type="hidden" name="action" value=(if action == Bulk::Accept { "accept" } else { "reject" });
            input type="hidden" name="confirm" value="yes";
            table {
                thead { tr { th { "Serial" } th { "Fingerprint" } } }
                tbody {
                    @for (serial, fingerprint) in picks {
                        tr {
                            td { (serial.as_str()) }
                            td .fingerprint.small {
                                @match fingerprint {
                                    Some(fp) => {
                                        @for group in fingerprint_groups(&fp.to_string()) { span { (group) } br; }
                                        input type="hidden" name="station" value=(format!("{serial} {fp}"));
                                    }
                                    None => {
                                        "no key (legacy firmware)"
                                        input type="hidden" name="station" value=(serial.as_str());
                                    }
                                }
                            }
                        }
                    }
                }
            }
            button type="submit" #confirm .danger[action == Bulk::Reject] { (verb) " " (picks.len()) }
            " " a href="/stations" { "Cancel" }
        }
    }
}
