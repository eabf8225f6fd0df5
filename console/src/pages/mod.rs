//! The console's pages and actions, one module per part of the manuals: every GET only reads,
//! every change is a POST that runs one operator command (or one per selected device) and then
//! shows its outcome.

pub(crate) mod audit;
pub(crate) mod layout;
pub(crate) mod phones;
pub(crate) mod station;
pub(crate) mod stations;
pub(crate) mod whitelist;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use crate::session::{LoginError, LoginSessionError};
use crate::{guard, live, Console};

pub(crate) type Shared = State<Arc<Console>>;

/// Every route of the console.
pub(crate) fn routes() -> Router<Arc<Console>> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/stations") }))
        .route("/login", get(login))
        .route("/logout", post(logout))
        .route("/assets/console.css", get(live::stylesheet))
        .route("/assets/console.js", get(live::script))
        .route("/events", get(live::events))
        .route("/status", get(live::status))
        .merge(stations::routes())
        .merge(station::routes())
        .merge(phones::routes())
        .merge(whitelist::routes())
        .merge(audit::routes())
}

#[derive(Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// The login link: spends its token, sets the session cookie, goes to the stations.
async fn login(State(console): Shared, Query(query): Query<LoginQuery>) -> Response {
    let token = query.token.unwrap_or_default();
    match console.sessions.login(&token, Instant::now()) {
        Ok(session) => {
            let cookie = format!(
                "{}={session}; HttpOnly; SameSite=Strict; Path=/",
                console.cookie_name
            );
            let mut response = Redirect::to("/stations").into_response();
            if let Ok(value) = cookie.parse() {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Err(LoginSessionError::Login(error)) => {
            let text = match error {
                LoginError::Unknown => {
                    "This login link is not valid, or it was used already: each link works once."
                }
                LoginError::Expired => "This login link has expired: a link works for 15 minutes.",
            };
            let text = format!(
                "{text} Press Enter in the terminal where `fleetctl console` runs to print a new one."
            );
            (
                StatusCode::UNAUTHORIZED,
                layout::bare("Login link not accepted", &text),
            )
                .into_response()
        }
        Err(LoginSessionError::Random(_)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            layout::bare(
                "Cannot log in",
                "The system's random number generator failed.",
            ),
        )
            .into_response(),
    }
}

async fn logout(State(console): Shared, headers: HeaderMap) -> Response {
    if let Some(session) = guard::cookie(&headers, &console.cookie_name) {
        console.sessions.logout(session);
    }
    let mut response = (
        StatusCode::OK,
        layout::bare(
            "Logged out",
            "Press Enter in the terminal where `fleetctl console` runs for a new login link.",
        ),
    )
        .into_response();
    let expired = format!(
        "{}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0",
        console.cookie_name
    );
    if let Ok(value) = expired.parse() {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// The values of `key` in a submitted form, in order.
pub(crate) fn values<'a>(form: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    form.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The first value of `key` in a submitted form.
pub(crate) fn value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    values(form, key).into_iter().next()
}

#[cfg(test)]
mod tests;
