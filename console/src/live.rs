//! Live updates: `/events` streams server-sent events, one per fleet event, each an escaped HTML
//! fragment for the page's activity list, named by its kind so that a page reloads its live part
//! when an event it follows arrives (`assets/console.js`); a `progress` event only moves the
//! page's progress bars, in place. Also the header's status fragment and
//! the console's own static files, served by itself: it works offline.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures_util::Stream;
use maud::html;
use serde_json::Value;
use tokio::sync::broadcast::error::RecvError;

use crate::hub::{Live, LiveKind};
use crate::pages::layout::{status_bar, Status};
use crate::progress::Progress;
use crate::views::{mac_display, station_label, text, when};
use crate::Console;

const STYLESHEET: &str = include_str!("../assets/console.css");
const SCRIPT: &str = include_str!("../assets/console.js");

pub(crate) async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        STYLESHEET,
    )
        .into_response()
}

pub(crate) async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

/// The header's status line alone, for pages to refresh it.
pub(crate) async fn status(State(console): State<Arc<Console>>) -> Html<String> {
    Html(status_bar(&Status::of(&console).await).into_string())
}

/// Counts an open stream for as long as it lives.
struct Watching(Arc<Console>);

impl Drop for Watching {
    fn drop(&mut self) {
        self.0.hub.watching(false);
    }
}

/// The stream of live notices.
pub(crate) async fn events(
    State(console): State<Arc<Console>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let feed = console.hub.subscribe();
    console.hub.watching(true);
    let watching = Watching(console);
    let stream =
        futures_util::stream::unfold((feed, watching), |(mut feed, watching)| async move {
            let event = match feed.recv().await {
                Ok(live) => Event::default()
                    .event(live.kind.as_str())
                    .data(fragment(&live)),
                // Some notices were missed: the page reloads its live part to catch up.
                Err(RecvError::Lagged(_)) => Event::default()
                    .event(LiveKind::Health.as_str())
                    .data(html! { li { "Many changes at once: reloaded." } }.into_string()),
                Err(RecvError::Closed) => return None,
            };
            Some((Ok(event), (feed, watching)))
        });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// The notice of an `update_progress` event: its figures in data attributes, which
/// `assets/console.js` copies into the progress bars of the station (`data-progress`) and
/// their texts (`data-progress-text`). Empty for a malformed event (the hub drops those).
fn progress_fragment(event: &Value) -> String {
    let Some(p) = Progress::of_event(event) else {
        return String::new();
    };
    html! {
        li data-kind=(LiveKind::Progress.as_str()) data-serial=(p.serial) data-received=(p.received)
            data-size=(p.size) data-percent=(p.percent()) {
            @if !p.time.is_empty() { time datetime=(p.time) { (when(&p.time)) } " " }
            (p.serial) ": firmware " (p.version) " " (p.percent()) " % (" (p.received) " of " (p.size) " bytes)"
        }
    }
    .into_string()
}

/// The activity-list item of a notice. Every string in it came from fleetd (and many from
/// devices); maud escapes them all.
pub(crate) fn fragment(live: &Live) -> String {
    let event = &live.event;
    let time = text(event, "time");
    let what = match live.kind {
        LiveKind::Stations => {
            let station = &event["station"];
            let serial = match text(station, "serial") {
                "" => text(event, "serial"),
                serial => serial,
            };
            match text(event, "event") {
                "state" if station["removed"] == Value::Bool(true) => format!("{serial}: removed"),
                "state" => format!("{serial}: {}", station_label(station)),
                "offline" => format!("{serial}: offline"),
                "bad_request" => format!("{serial}: bad request ({})", text(event, "error")),
                "station_unauthorized" => format!("{serial}: waits for approval"),
                other => format!("{serial}: {other}"),
            }
        }
        LiveKind::Phones => {
            let phone = &event["phone"];
            let mac = match text(phone, "mac") {
                "" => text(event, "mac"),
                mac => mac,
            };
            match text(event, "event") {
                "deleted" => format!("phone {}: deleted", mac_display(mac)),
                _ => format!(
                    "phone {}: {}",
                    mac_display(mac),
                    crate::views::phone_label(phone)
                ),
            }
        }
        LiveKind::Audit => format!(
            "{} {} {} {}",
            text(event, "actor"),
            text(event, "action"),
            text(event, "device"),
            text(event, "outcome")
        ),
        LiveKind::Security => format!(
            "⚠ {}: {}",
            text(event, "serial"),
            match text(event, "event") {
                "identity_mismatch" => "its key changed (identity mismatch)",
                other => other,
            }
        ),
        LiveKind::Progress => return progress_fragment(event),
        LiveKind::Health => match event["reachable"].as_bool() {
            Some(true) => "fleetd is reachable again".to_owned(),
            _ => "fleetd is NOT reachable".to_owned(),
        },
    };
    html! {
        li data-kind=(live.kind.as_str()) {
            @if !time.is_empty() { time datetime=(time) { (when(time)) } " " }
            (what)
        }
    }
    .into_string()
}
