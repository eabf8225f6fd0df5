//! The tenant's IP whitelists: permanent entries (IPv4, IPv6, CIDR) with add and remove, and the
//! temporary entries a correct PAP made, with their expiry counting down.

use axum::extract::{Query, State};
use axum::response::{IntoResponse as _, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use fleet_protocol::command::arg;
use fleet_protocol::OperatorCommand;
use maud::html;
use serde::Deserialize;

use super::layout::{page, respond, Failure, Section, Status};
use super::{value, Shared};
use crate::hub::LiveKind;
use crate::views::{items, text, when};
use crate::Console;

pub(crate) fn routes() -> Router<std::sync::Arc<Console>> {
    Router::new()
        .route("/whitelist", get(show))
        .route("/whitelist/add", post(add))
        .route("/whitelist/remove", post(remove))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ShowQuery {
    done: Option<String>,
}

async fn show(State(console): Shared, Query(query): Query<ShowQuery>) -> Result<Response, Failure> {
    let data = console.run_command(OperatorCommand::ListWhitelist).await?;
    let permanent: Vec<String> = items(&data, "permanent")
        .iter()
        .filter_map(|e| e.as_str().map(str::to_owned))
        .collect();
    let temporary = items(&data, "temporary");
    let status = Status::of(&console).await;
    let notice = match query.done.as_deref() {
        Some("added") => Some("Entry added to the permanent whitelist."),
        Some("removed") => Some("Entry removed."),
        _ => None,
    };
    let body = html! {
        h1 { "Whitelist" }
        p { "Phones that provision from a whitelisted address need no PAP (unless they are locked out or blocked)." }
        div #live {
            section {
                h2 { "Permanent" }
                table #permanent {
                    thead { tr { th { "Entry" } th {} } }
                    tbody {
                        @for entry in &permanent {
                            tr data-entry=(entry) {
                                td { (entry) }
                                td { form method="post" action="/whitelist/remove" .inline {
                                    input type="hidden" name="entry" value=(entry);
                                    button type="submit" .danger { "Remove" }
                                } }
                            }
                        }
                        @if permanent.is_empty() { tr { td colspan="2" .quiet { "No permanent entry." } } }
                    }
                }
            }
            section {
                h2 { "Temporary" }
                p .quiet { "A correct PAP puts the phone's public address here for 8 hours; each provisioning from it extends that." }
                table #temporary {
                    thead { tr { th { "Address" } th { "Expires" } th { "Left" } th {} } }
                    tbody {
                        @for entry in &temporary {
                            @let ip = text(entry, "ip");
                            @let expires = text(entry, "expires_at");
                            tr data-entry=(ip) {
                                td { (ip) } td { time datetime=(expires) { (when(expires)) } }
                                td data-expires=(expires) { "—" }
                                td { form method="post" action="/whitelist/remove" .inline {
                                    input type="hidden" name="entry" value=(ip);
                                    button type="submit" .danger { "Remove" }
                                } }
                            }
                        }
                        @if temporary.is_empty() { tr { td colspan="4" .quiet { "No temporary entry." } } }
                    }
                }
            }
        }
        section {
            h2 { "Add a permanent entry" }
            form method="post" action="/whitelist/add" #add-entry {
                label { "Address or range " input type="text" name="entry" required placeholder="203.0.113.7, 203.0.113.0/24, 2001:db8::/32"; }
                label { input type="checkbox" name="force" value="on"; " allow a range broader than fleetd's minimum prefix" }
                button type="submit" .primary { "Add" }
            }
        }
    };
    Ok(respond(page(
        "Whitelist",
        Section::Whitelist,
        &[LiveKind::Audit],
        &status,
        notice,
        body,
    )))
}

fn entry_of(form: &[(String, String)]) -> Result<fleet_protocol::WhitelistEntry, Failure> {
    let entry = value(form, "entry").map(str::trim).unwrap_or("");
    Ok(arg::entry(entry)?)
}

async fn add(
    State(console): Shared,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, Failure> {
    let entry = entry_of(&form)?;
    let force = value(&form, "force") == Some("on");
    console
        .run_command(OperatorCommand::AddWhitelistEntry { entry, force })
        .await?;
    Ok(Redirect::to("/whitelist?done=added").into_response())
}

async fn remove(
    State(console): Shared,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, Failure> {
    let entry = entry_of(&form)?;
    console
        .run_command(OperatorCommand::RemoveWhitelistEntry { entry })
        .await?;
    Ok(Redirect::to("/whitelist?done=removed").into_response())
}
