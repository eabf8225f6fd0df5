//! The frame of every page: the header that always shows the stations waiting for approval, the
//! security alerts and whether fleetd is reachable; the navigation; notices and errors.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use crate::fleetd::FleetdError;
use crate::hub::LiveKind;
use crate::Console;

/// The header's facts, gathered once per page.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub(crate) pending: Option<usize>,
    pub(crate) alerts: usize,
    pub(crate) reachable: bool,
    pub(crate) operator: String,
    pub(crate) tenant: String,
}

impl Status {
    pub(crate) async fn of(console: &Console) -> Status {
        let pending = console.pending().await;
        Status::known(console, pending)
    }

    /// The header when the page has counted the waiting stations itself.
    pub(crate) fn known(console: &Console, pending: Option<usize>) -> Status {
        Status {
            pending,
            alerts: console.hub.alerted().len(),
            reachable: console.hub.reachable(),
            operator: console.fleetd.operator().to_owned(),
            tenant: console.tenant.clone(),
        }
    }
}

/// Which part of the console a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Stations,
    Phones,
    Whitelist,
    Audit,
}

/// The header's status line (`id="status"`, which live updates replace).
pub(crate) fn status_bar(status: &Status) -> Markup {
    html! {
        div #status .status {
            @match status.pending {
                Some(0) => { a href="/stations?state=unauthorized" .pill { "No station waits for approval" } }
                Some(n) => { a href="/stations?state=unauthorized" .pill.waiting #pending-count { (n) " waiting for approval" } }
                None => { span .pill { "Waiting stations unknown" } }
            }
            @if status.alerts > 0 {
                a href="/stations?alerts=1" .pill.alert #alert-count { "⚠ " (status.alerts) " security alert" @if status.alerts != 1 { "s" } }
            }
            @if status.reachable {
                span .pill.ok #fleetd-status { "fleetd reachable" }
            } @else {
                span .pill.alert #fleetd-status { "fleetd NOT reachable: showing what it last said; actions fail until it is back" }
            }
            span .who { "operator " strong { (status.operator) } " · tenant " strong { (status.tenant) } }
        }
    }
}

fn nav(section: Option<Section>) -> Markup {
    let item = |href: &str, label: &str, this: Section| {
        html! { a href=(href) aria-current=[(section == Some(this)).then_some("page")] { (label) } }
    };
    html! {
        nav {
            (item("/stations", "Stations", Section::Stations))
            (item("/phones", "Phones", Section::Phones))
            (item("/whitelist", "Whitelist", Section::Whitelist))
            (item("/audit", "Audit", Section::Audit))
            form method="post" action="/logout" .logout { button type="submit" { "Log out" } }
        }
    }
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · fleetgate console" }
            link rel="stylesheet" href="/assets/console.css";
            script src="/assets/console.js" defer {}
        }
    }
}

/// A whole page: `live` lists the event kinds whose arrival makes the page's `#live` part
/// reload itself.
pub(crate) fn page(
    title: &str,
    section: Section,
    live: &[LiveKind],
    status: &Status,
    notice: Option<&str>,
    body: Markup,
) -> Markup {
    let kinds: Vec<&str> = live.iter().map(|k| k.as_str()).collect();
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body data-live=(kinds.join(" ")) {
                header {
                    a href="/stations" .brand { "fleetgate" }
                    (nav(Some(section)))
                    (status_bar(status))
                }
                main {
                    @if let Some(notice) = notice { p .notice role="status" { (notice) } }
                    (body)
                    section .activity {
                        h2 { "Live activity" }
                        ul #activity { li .quiet { "Changes appear here as they happen." } }
                    }
                }
            }
        }
    }
}

/// A page without the fleet's facts: refusals and the login's answers.
pub(crate) fn bare(title: &str, text: &str) -> Html<String> {
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                (head(title))
                body data-live="" {
                    header { span .brand { "fleetgate" } }
                    main .bare { h1 { (title) } p { (text) } }
                }
            }
        }
        .into_string(),
    )
}

/// A page's failure: what the operator sees instead of the page, with the status code.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: StatusCode,
    pub(crate) title: String,
    pub(crate) text: String,
}

impl Failure {
    pub(crate) fn bad_input(text: impl Into<String>) -> Failure {
        Failure {
            status: StatusCode::BAD_REQUEST,
            title: "Not changed: bad input".into(),
            text: text.into(),
        }
    }
}

impl From<FleetdError> for Failure {
    fn from(error: FleetdError) -> Failure {
        let (status, title) = match &error {
            FleetdError::Unreachable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "fleetd is not reachable")
            }
            FleetdError::Malformed(_) => {
                (StatusCode::BAD_GATEWAY, "fleetd's answer was unreadable")
            }
            FleetdError::Refused { code, .. } => (
                match code.as_str() {
                    "not_found" => StatusCode::NOT_FOUND,
                    "invalid_argument" => StatusCode::BAD_REQUEST,
                    "wrong_state" | "fingerprint_mismatch" => StatusCode::CONFLICT,
                    "forbidden" => StatusCode::FORBIDDEN,
                    "rate_limited" => StatusCode::TOO_MANY_REQUESTS,
                    _ => StatusCode::BAD_GATEWAY,
                },
                "fleetd refused: nothing was changed",
            ),
        };
        Failure {
            status,
            title: title.into(),
            text: error.to_string(),
        }
    }
}

impl From<fleet_protocol::CommandError> for Failure {
    /// An argument the console checked with fleetd's own parser, refused in fleetd's words.
    fn from(error: fleet_protocol::CommandError) -> Failure {
        Failure::bad_input(format!("{}: {}", error.code.as_str(), error.message))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html lang="en" {
                (head(&self.title))
                body data-live="" {
                    header { a href="/stations" .brand { "fleetgate" } (nav(None)) }
                    main {
                        h1 { (self.title) }
                        p .error #error { (self.text) }
                        p { a href="/stations" { "Back to the stations" } }
                    }
                }
            }
        };
        (self.status, Html(body.into_string())).into_response()
    }
}

/// A page as a response.
pub(crate) fn respond(markup: Markup) -> Response {
    Html(markup.into_string()).into_response()
}
