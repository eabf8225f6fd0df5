//! The tenant's audit log, newest first, filterable by device, operator (actor), action and
//! outcome, paged back with `after_seq`; and Verify chain, which checks the whole hash chain.

use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use fleet_protocol::{OperatorCommand, PageLimit};
use maud::{html, Markup};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{page, respond, Failure, Section, Status};
use super::Shared;
use crate::hub::LiveKind;
use crate::views::{items, text, when};
use crate::Console;

pub(crate) fn routes() -> Router<std::sync::Arc<Console>> {
    Router::new()
        .route("/audit", get(show))
        .route("/audit/verify", get(verify))
}

/// Records a page covers: `seq` values, without filters.
const PAGE: u64 = 100;
/// With filters, a wider window, so that a page has something to show: fleetd's page size.
const FILTERED_PAGE: u64 = 500;

#[derive(Debug, Default, Deserialize)]
pub(crate) struct AuditQuery {
    device: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    outcome: Option<String>,
    /// Show records before this `seq` (the older page).
    before: Option<u64>,
}

impl AuditQuery {
    fn filters(&self) -> [(&'static str, &str); 4] {
        fn get(f: &Option<String>) -> &str {
            f.as_deref().map(str::trim).unwrap_or("")
        }
        [
            ("device", get(&self.device)),
            ("actor", get(&self.actor)),
            ("action", get(&self.action)),
            ("outcome", get(&self.outcome)),
        ]
    }

    fn keeps(&self, record: &Value) -> bool {
        self.filters()
            .iter()
            .all(|(field, wanted)| wanted.is_empty() || text(record, field) == *wanted)
    }

    fn filtered(&self) -> bool {
        self.filters().iter().any(|(_, wanted)| !wanted.is_empty())
    }

    /// The link to the page before `seq`, with the same filters.
    fn older(&self, seq: u64) -> String {
        let mut link = format!("/audit?before={seq}");
        for (field, wanted) in self.filters() {
            if !wanted.is_empty() {
                let encoded: String = wanted
                    .bytes()
                    .map(|b| match b {
                        b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                            (b as char).to_string()
                        }
                        _ => format!("%{b:02X}"),
                    })
                    .collect();
                link.push_str(&format!("&{field}={encoded}"));
            }
        }
        link
    }
}

async fn show(
    State(console): Shared,
    Query(query): Query<AuditQuery>,
) -> Result<Response, Failure> {
    let window = if query.filtered() {
        FILTERED_PAGE
    } else {
        PAGE
    };
    let command = match query.before {
        None => OperatorCommand::ListAuditLog {
            limit: Some(PageLimit::saturating(window)),
            after_seq: None,
        },
        Some(before) => OperatorCommand::ListAuditLog {
            limit: Some(PageLimit::saturating(window)),
            after_seq: Some(before.saturating_sub(window + 1)),
        },
    };
    let data = console.run_command(command).await?;
    let records = items(&data, "records");
    let oldest = records.iter().filter_map(|r| r["seq"].as_u64()).min();
    let mut shown: Vec<&Value> = records
        .iter()
        .filter(|r| {
            query
                .before
                .is_none_or(|b| r["seq"].as_u64().is_some_and(|s| s < b))
        })
        .filter(|r| query.keeps(r))
        .collect();
    shown.reverse();
    let status = Status::of(&console).await;
    let body = html! {
        h1 { "Audit log" }
        (filter_form(&query))
        form method="get" action="/audit/verify" .inline { button type="submit" #verify { "Verify chain" } }
        div #live {
            (table(&shown))
            p .paging {
                @if query.before.is_some() { a href="/audit" { "Newest" } " " }
                @if let Some(oldest) = oldest.filter(|s| *s > 1) { a href=(query.older(oldest)) #older { "Older records" } }
            }
        }
    };
    // The newest page follows new records; an older page stays put.
    let live: &[LiveKind] = if query.before.is_none() {
        &[LiveKind::Audit]
    } else {
        &[]
    };
    Ok(respond(page(
        "Audit",
        Section::Audit,
        live,
        &status,
        None,
        body,
    )))
}

fn filter_form(query: &AuditQuery) -> Markup {
    html! {
        form method="get" action="/audit" .search {
            @for (field, wanted) in query.filters() {
                label { (field) " " input type="text" name=(field) value=(wanted); }
            }
            button type="submit" { "Filter" }
            " " a href="/audit" { "All" }
        }
    }
}

fn table(records: &[&Value]) -> Markup {
    html! {
        table .audit #audit {
            thead { tr { th { "Seq" } th { "Time" } th { "Actor" } th { "Device" } th { "Action" } th { "Outcome" } th { "Reason" } } }
            tbody {
                @for r in records {
                    tr data-outcome=(text(r, "outcome")) {
                        td { (r["seq"].as_u64().map(|s| s.to_string()).unwrap_or_default()) }
                        td { (when(text(r, "time"))) } td { (text(r, "actor")) } td { (text(r, "device")) }
                        td { (text(r, "action")) } td { (text(r, "outcome")) } td { (text(r, "reason")) }
                    }
                }
                @if records.is_empty() { tr { td colspan="7" .quiet { "No record here." } } }
            }
        }
    }
}

async fn verify(State(console): Shared) -> Result<Response, Failure> {
    let verdict = console.fleetd.verify_audit().await;
    console.hub.observe(&verdict);
    let verdict = verdict?;
    let status = Status::of(&console).await;
    let body = html! {
        h1 { "Audit chain" }
        @match &verdict.broken {
            None => {
                p .ok #verdict { "Intact: " (verdict.records) " records checked." }
                @if verdict.unchained > 0 {
                    p { "The first " (verdict.unchained) " were stored before audit records were chained and are not covered." }
                }
                p .quiet { "Deleting the newest records, or rewriting the whole log, can only be noticed against a head hash kept elsewhere." }
            }
            Some((seq, problem)) => {
                p .error #verdict { "BROKEN at seq " (seq) ": " (problem) }
            }
        }
        p { a href="/audit" { "Back to the audit log" } }
    };
    Ok(respond(page(
        "Audit chain",
        Section::Audit,
        &[],
        &status,
        None,
        body,
    )))
}
