//! The phone admin portal: create a phone and see its PAP once, the list with each phone's
//! authentication state and its wrong PAPs and lockouts so far, Suspend Authentication, Reset Authentication (a new PAP, shown once),
//! delete, and the devices CSV (the manual's Batch Import/Export). A PAP is shown only in the
//! answer to the create or reset that made it, and in the CSV export; it is never logged.

use std::collections::BTreeMap;

use axum::extract::{Multipart, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse as _, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use fleet_protocol::command::arg;
use fleet_protocol::{Mac, OperatorCommand, PhoneState, Text};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{page, respond, Failure, Section, Status};
use super::Shared;
use crate::fleetd::Listing;
use crate::hub::LiveKind;
use crate::views::{
    items, mac_display, pap_counts, phone_label, phone_matches, some_text, text, when,
};
use crate::Console;

pub(crate) fn routes() -> Router<std::sync::Arc<Console>> {
    Router::new()
        .route("/phones", get(list).post(create))
        .route("/phones/import", post(import))
        .route("/devices.csv", get(export))
        .route("/phones/{mac}/suspend", post(suspend))
        .route(
            "/phones/{mac}/reset-authentication",
            get(confirm_reset).post(reset),
        )
        .route("/phones/{mac}/delete", get(confirm_delete).post(delete))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    state: Option<String>,
    q: Option<String>,
    done: Option<String>,
    mac: Option<String>,
}

fn notice(done: Option<&str>, mac: Option<&str>) -> Option<String> {
    let mac = mac.and_then(|m| Mac::parse(m).ok())?;
    let mac = mac_display(mac.as_str());
    Some(match done? {
        "suspended" => format!(
            "Authentication of {mac} suspended for 30 minutes: it may provision without a PAP."
        ),
        "deleted" => format!("{mac} deleted; its certificate no longer counts."),
        _ => return None,
    })
}

async fn list(State(console): Shared, Query(query): Query<ListQuery>) -> Result<Response, Failure> {
    let filter =
        match query.state.as_deref().filter(|s| !s.is_empty()) {
            None => None,
            Some(name) => Some(PhoneState::from_name(name).ok_or_else(|| {
                Failure::bad_input(format!("unknown authentication state {name:?}"))
            })?),
        };
    let search = query.q.clone().unwrap_or_default();
    let phones = console.list_all(Listing::Phones).await?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for phone in &phones {
        *counts.entry(text(phone, "auth_state")).or_default() += 1;
    }
    let shown: Vec<&Value> = phones
        .iter()
        .filter(|p| filter.is_none_or(|f| text(p, "auth_state") == f.as_str()))
        .filter(|p| phone_matches(p, &search))
        .collect();
    let status = Status::of(&console).await;
    let body = html! {
        h1 { "Phones" }
        nav .tabs aria-label="Filter by authentication state" {
            @for state in PhoneState::ALL {
                a href=(format!("/phones?state={}", state.as_str())) .tab .current[filter == Some(state)] {
                    (state.label()) " " span .count { (counts.get(state.as_str()).copied().unwrap_or(0)) }
                }
            }
            a href="/phones" .tab .current[filter.is_none()] { "All " span .count { (phones.len()) } }
        }
        form method="get" action="/phones" .search role="search" {
            @if let Some(state) = filter { input type="hidden" name="state" value=(state.as_str()); }
            label { "Search " input type="search" name="q" value=(search) placeholder="MAC, vendor, type, site"; }
            button type="submit" { "Show" }
        }
        div #live { (table(&shown)) }
        (create_form())
        (csv_forms())
    };
    let notice = notice(query.done.as_deref(), query.mac.as_deref());
    Ok(respond(page(
        "Phones",
        Section::Phones,
        &[LiveKind::Phones],
        &status,
        notice.as_deref(),
        body,
    )))
}

fn table(phones: &[&Value]) -> Markup {
    html! {
        table .phones {
            thead { tr {
                th { "MAC" } th { "Vendor" } th { "Type" } th { "Site" } th { "Created" }
                th { "Authentication" } th { "Suspended until" } th { "Actions" }
            } }
            tbody {
                @for phone in phones { (row(phone)) }
                @if phones.is_empty() { tr { td colspan="8" .quiet { "No phone here." } } }
            }
        }
    }
}

fn row(phone: &Value) -> Markup {
    let mac = Mac::parse(text(phone, "mac")).ok();
    html! {
        tr data-mac=(text(phone, "mac")) data-state=(text(phone, "auth_state")) {
            td .mac { (mac_display(text(phone, "mac"))) }
            td { (text(phone, "vendor")) } td { (text(phone, "type")) } td { (text(phone, "site")) }
            td { (when(text(phone, "created_at"))) }
            td {
                span .state data-state=(text(phone, "auth_state")) { (phone_label(phone)) }
                @if let Some(until) = some_text(phone, "failed_until") {
                    br; small { "until " time datetime=(until) { (when(until)) } " (" span data-expires=(until) {} ")" }
                }
                @if let Some(counts) = pap_counts(phone) { br; small .pap-counts { (counts) } }
            }
            td { @if let Some(until) = some_text(phone, "suspended_until") {
                time datetime=(until) { (when(until)) } br; small data-expires=(until) {}
            } @else { "—" } }
            td .row-actions {
                @if let Some(mac) = &mac {
                    form method="post" action=(format!("/phones/{mac}/suspend")) .inline {
                        button type="submit" { "Suspend Authentication" }
                    }
                    " " a href=(format!("/phones/{mac}/reset-authentication")) .button { "Reset Authentication" }
                    " " a href=(format!("/phones/{mac}/delete")) .button.danger { "Delete" }
                }
            }
        }
    }
}

fn create_form() -> Markup {
    html! {
        section .create {
            h2 { "Create a phone" }
            form method="post" action="/phones" #create-phone {
                label { "MAC " input type="text" name="mac" required placeholder="AA:BB:CC:DD:EE:FF"; }
                label { "Vendor " input type="text" name="vendor" required; }
                label { "Type " input type="text" name="type" required; }
                label { "Site " input type="text" name="site"; }
                button type="submit" .primary { "Create" }
            }
            p .quiet { "The new phone's PAP is shown once, on the next page." }
        }
    }
}

fn csv_forms() -> Markup {
    html! {
        section .csv {
            h2 { "Batch Import/Export" }
            p { a href="/devices.csv" download="devices.csv" .button #export { "Export CSV" }
                " vendor, type, MAC, creation date, site, authentication state, and the PAP of every phone not yet authenticated." }
            form method="post" action="/phones/import" enctype="multipart/form-data" #import {
                label { "CSV file " input type="file" name="file" accept=".csv,text/csv" required; }
                button type="submit" { "Import" }
            }
            p .quiet { "Columns by name: vendor, type, mac, and optionally site; every good row becomes a phone with a new PAP, all or none." }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct NewPhone {
    mac: String,
    vendor: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    site: String,
}

async fn create(State(console): Shared, Form(new): Form<NewPhone>) -> Result<Response, Failure> {
    if new.vendor.trim().is_empty() || new.kind.trim().is_empty() {
        return Err(Failure::bad_input("vendor and type are required"));
    }
    let command = OperatorCommand::CreatePhone {
        mac: arg::mac(new.mac.trim())?,
        vendor: Text::parse("vendor", new.vendor.trim())?,
        kind: Text::parse("type", new.kind.trim())?,
        site: Text::parse("site", new.site.trim())?,
    };
    let phone = console.run_command(command).await?;
    Ok(pap_page(&console, "Phone created", &phone).await)
}

/// The page that shows a phone's new PAP, once.
async fn pap_page(console: &Console, title: &str, phone: &Value) -> Response {
    let status = Status::of(console).await;
    let body = html! {
        h1 { (title) ": " (mac_display(text(phone, "mac"))) }
        p { (text(phone, "vendor")) " " (text(phone, "type")) @if let Some(site) = some_text(phone, "site") { ", " (site) } }
        section .pap-box {
            h2 { "Phone Authentication PIN (PAP)" }
            p .pap #pap { (text(phone, "pap")) }
            p { "Give this PAP to the person who sets up the phone. It is shown only now (and in the CSV export while the phone is not yet authenticated). It stays valid until the phone is fully provisioned." }
        }
        p { "State: " span .state #phone-state { (phone_label(phone)) } }
        p { a href="/phones" { "Back to the phones" } }
    };
    respond(page(title, Section::Phones, &[], &status, None, body))
}

async fn suspend(State(console): Shared, Path(mac): Path<String>) -> Result<Response, Failure> {
    let mac = arg::mac(&mac)?;
    let command = OperatorCommand::SuspendPhoneAuthentication { mac: mac.clone() };
    console.run_command(command).await?;
    Ok(Redirect::to(&format!("/phones?done=suspended&mac={mac}")).into_response())
}

async fn confirm_page(
    console: &Console,
    mac: &Mac,
    path: &str,
    explain: Markup,
    button: &str,
) -> Response {
    let status = Status::of(console).await;
    let body = html! {
        h1 { (button) ": " (mac_display(mac.as_str())) "?" }
        (explain)
        form method="post" action=(format!("/phones/{mac}/{path}")) .confirm {
            button type="submit" #confirm .danger { (button) }
            " " a href="/phones" { "Cancel" }
        }
    };
    respond(page(button, Section::Phones, &[], &status, None, body))
}

async fn confirm_reset(
    State(console): Shared,
    Path(mac): Path<String>,
) -> Result<Response, Failure> {
    let mac = arg::mac(&mac)?;
    let explain = html! {
        p { "The phone gets a new PAP, shown on the next page. Its old PAP and its certificate are void at once, its live session is cut, and it is Authentication needed: it must provision again with the new PAP (or from a whitelisted address)." }
    };
    Ok(confirm_page(
        &console,
        &mac,
        "reset-authentication",
        explain,
        "Reset Authentication",
    )
    .await)
}

async fn reset(State(console): Shared, Path(mac): Path<String>) -> Result<Response, Failure> {
    let mac = arg::mac(&mac)?;
    let phone = console
        .run_command(OperatorCommand::ResetPhoneAuthentication { mac })
        .await?;
    Ok(pap_page(&console, "Authentication reset", &phone).await)
}

async fn confirm_delete(
    State(console): Shared,
    Path(mac): Path<String>,
) -> Result<Response, Failure> {
    let mac = arg::mac(&mac)?;
    let explain = html! {
        p { "The phone is deleted: its certificate no longer counts and its live session is cut. To use it again, create it again." }
    };
    Ok(confirm_page(&console, &mac, "delete", explain, "Delete").await)
}

async fn delete(State(console): Shared, Path(mac): Path<String>) -> Result<Response, Failure> {
    let mac = arg::mac(&mac)?;
    let command = OperatorCommand::DeletePhone { mac: mac.clone() };
    console.run_command(command).await?;
    Ok(Redirect::to(&format!("/phones?done=deleted&mac={mac}")).into_response())
}

/// The devices CSV, as fleetd writes it, as a download.
async fn export(State(console): Shared) -> Result<Response, Failure> {
    let data = console
        .run_command(OperatorCommand::ExportDevicesCsv)
        .await?;
    let csv = text(&data, "csv").to_owned();
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"devices.csv\"",
            ),
        ],
        csv,
    )
        .into_response())
}

/// The uploaded file's text.
async fn uploaded(mut multipart: Multipart) -> Result<String, Failure> {
    let unreadable = |e: axum::extract::multipart::MultipartError| {
        Failure::bad_input(format!("the upload could not be read: {e}"))
    };
    while let Some(field) = multipart.next_field().await.map_err(unreadable)? {
        if field.name() == Some("file") {
            let bytes = field.bytes().await.map_err(unreadable)?;
            return String::from_utf8(bytes.to_vec()).map_err(|_| {
                Failure::bad_input("the file is not UTF-8 text: nothing was imported")
            });
        }
    }
    Err(Failure::bad_input(
        "no file was uploaded: nothing was imported",
    ))
}

async fn import(State(console): Shared, multipart: Multipart) -> Result<Response, Failure> {
    let csv = uploaded(multipart).await?;
    let data = console
        .run_command(OperatorCommand::ImportPhonesCsv { csv })
        .await?;
    let created = items(&data, "created");
    let errors = items(&data, "errors");
    let status = Status::of(&console).await;
    let body = html! {
        h1 { "Import: " (created.len()) " created, " (errors.len()) " refused" }
        @if !errors.is_empty() {
            h2 { "Refused lines" }
            p { "fleetd imports all good rows or none: "
                @if created.is_empty() { "nothing was imported." } @else { "these lines were left out." } }
            table #import-errors {
                thead { tr { th { "Line" } th { "Error" } } }
                tbody { @for e in &errors { tr {
                    td { (e.get("line").map(Value::to_string).unwrap_or_default()) } td { (text(e, "error")) }
                } } }
            }
        }
        @if !created.is_empty() {
            h2 { "Created phones and their PAPs" }
            p { "Shown only now (and in the CSV export until each phone is authenticated)." }
            table #import-created {
                thead { tr { th { "MAC" } th { "Vendor" } th { "Type" } th { "Site" } th { "PAP" } } }
                tbody { @for p in &created { tr {
                    td { (mac_display(text(p, "mac"))) } td { (text(p, "vendor")) } td { (text(p, "type")) }
                    td { (text(p, "site")) } td .pap.small { (text(p, "pap")) }
                } } }
            }
        }
        p { a href="/phones" { "Back to the phones" } }
    };
    Ok(respond(page(
        "Import",
        Section::Phones,
        &[],
        &status,
        None,
        body,
    )))
}
