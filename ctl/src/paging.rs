//! Paging through the operator list commands (PROTOCOL §6): each listing is a [`Pager`], a pure
//! state machine that says what to ask next and gathers the answers; [`fetch_pages`] is the
//! shell that sends, waits out `rate_limited` and asks for smaller pages after `too_large`.

use std::future::Future;
use std::time::Duration;

use fleet_protocol::{After, OperatorCommand, PageLimit};
use serde_json::{json, Value};

use crate::audit::{ChainBreak, ChainVerifier, Head};
use crate::filter::PhoneFilter;
use crate::{ClientError, OperatorClient};

/// The largest page fleetctl asks for: the controller's default page size, and the most records
/// one `listAuditLog` returns.
pub const MAX_PAGE: u64 = 500;
/// `rate_limited` answers to one page in a row that fleetctl waits out before it gives up.
pub const RATE_LIMIT_RETRIES: u32 = 10;
/// The wait after a `rate_limited` whose text names no time.
pub const DEFAULT_RETRY_WAIT: Duration = Duration::from_secs(1);
/// The longest wait taken from a `rate_limited` text, so that a garbled time cannot stall fleetctl.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(30);

/// What a [`Pager`] wants after an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send [`Pager::request`] again: it names the next page now.
    More,
    /// Everything is in: take [`Pager::finish`].
    Done,
}

/// A listing fetched a page at a time. It does no I/O and knows no clock: [`fetch_pages`] sends
/// `request()`, hands the answer's data to `handle`, and repeats until `Done`.
pub trait Pager {
    /// What the whole listing comes to.
    type Output;
    /// The operator command that asks for the next page.
    fn request(&self) -> OperatorCommand;
    /// Takes the data of the answer to the last `request()`.
    fn handle(&mut self, data: Value) -> Result<Step, ClientError>;
    /// The last request was answered `too_large`: ask for half as many items from now on.
    /// False when a page is one item already.
    fn shrink(&mut self) -> bool;
    /// The listing, once `handle` said `Done`.
    fn finish(self) -> Self::Output;
}

/// Where pages come from: fleetd, or a script in tests.
pub trait PageSource {
    /// Runs one operator command and returns its data or its error.
    fn fetch(&self, command: &OperatorCommand) -> impl Future<Output = Result<Value, ClientError>>;
    /// Waits before asking again.
    fn pause(&self, wait: Duration) -> impl Future<Output = ()>;
}

impl PageSource for OperatorClient {
    fn fetch(&self, command: &OperatorCommand) -> impl Future<Output = Result<Value, ClientError>> {
        self.run(command)
    }

    async fn pause(&self, wait: Duration) {
        tokio::time::sleep(wait).await;
    }
}

/// Fetches every page `pager` asks for. A page answered `rate_limited` is asked again after the
/// wait its text names (see [`RateLimitRetry`]); a page answered `too_large` is asked again half
/// as big. Any other error ends the listing.
pub async fn fetch_pages<S: PageSource, P: Pager>(
    source: &S,
    mut pager: P,
) -> Result<P::Output, ClientError> {
    let mut retry = RateLimitRetry::default();
    loop {
        let request = pager.request();
        match source.fetch(&request).await {
            Ok(data) => {
                retry.answered();
                if pager.handle(data)? == Step::Done {
                    return Ok(pager.finish());
                }
            }
            Err(error) => {
                if let Some(wait) = retry.wait(&error) {
                    tracing::info!("{}: {error}; asking again in {wait:?}", request.name());
                    source.pause(wait).await;
                } else if !(has_code(&error, "too_large") && pager.shrink()) {
                    return Err(error);
                }
            }
        }
    }
}

fn has_code(error: &ClientError, wanted: &str) -> bool {
    matches!(error, ClientError::CommandFailed { code, .. } if code == wanted)
}

/// How `rate_limited` answers are waited out: at most [`RATE_LIMIT_RETRIES`] in a row for one
/// page, each after the time the text names, else [`DEFAULT_RETRY_WAIT`].
#[derive(Debug, Clone, Default)]
pub struct RateLimitRetry {
    in_a_row: u32,
}

impl RateLimitRetry {
    /// How long to wait before asking again after `error`; `None` when it is not
    /// `rate_limited` or the retries are spent.
    pub fn wait(&mut self, error: &ClientError) -> Option<Duration> {
        let ClientError::CommandFailed { code, error } = error else {
            return None;
        };
        if code != "rate_limited" || self.in_a_row >= RATE_LIMIT_RETRIES {
            return None;
        }
        self.in_a_row += 1;
        Some(retry_delay(error).unwrap_or(DEFAULT_RETRY_WAIT))
    }

    /// A page was answered: the next one starts with all its retries.
    pub fn answered(&mut self) {
        self.in_a_row = 0;
    }
}

/// The wait a `rate_limited` text names: "retry in 250 ms", "retry in 1.5s" (a Rust
/// `Duration` as `{:?}` prints it), "retry after 2 seconds", a bare number being seconds; at
/// most [`MAX_RETRY_WAIT`]. `None` when the text names no wait fleetctl can read (a clock time
/// such as "retry after 2024-05-01T10:00:00Z" included).
pub fn retry_delay(text: &str) -> Option<Duration> {
    let lower = text.to_lowercase();
    let start = ["retry in", "retry after"]
        .iter()
        .filter_map(|phrase| lower.find(phrase).map(|at| at + phrase.len()))
        .min()?;
    let rest = lower[start..].trim_start();
    let number_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let value: f64 = rest[..number_end].parse().ok()?;
    let rest = rest[number_end..].trim_start();
    let unit_end = rest
        .find(|c: char| !c.is_alphabetic())
        .unwrap_or(rest.len());
    let (unit, after) = rest.split_at(unit_end);
    // "2024-05-01T…" or "10:00" is a time of day, not a wait.
    if after.starts_with(['-', ':', '/']) || after.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let seconds_per_unit = match unit {
        "ns" | "nanosecond" | "nanoseconds" => 1e-9,
        "µs" | "us" | "microsecond" | "microseconds" => 1e-6,
        "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => 1e-3,
        "" | "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
        "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
        _ => return None,
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(
        seconds.min(MAX_RETRY_WAIT.as_secs_f64()),
    ))
}

/// Half of `page`, or `None` when a page is one item already.
fn half(page: u64) -> Option<u64> {
    (page > 1).then_some(page / 2)
}

pub use fleet_protocol::command::Listing;

/// A whole [`Listing`], or its first `limit` items: pages follow `next`, each asked with
/// `after` set to it, until an answer has no `next` or there are `limit` items. The result is
/// the command's data with every item, plus `next` when `limit` left some out.
#[derive(Debug, Clone, PartialEq)]
pub struct ListPager {
    listing: Listing,
    limit: Option<u64>,
    /// The page size after a `too_large`; the server's own until then.
    page: Option<u64>,
    after: Option<After>,
    items: Vec<Value>,
    /// Where a listing cut short by `limit` would go on.
    left_out: Option<String>,
    /// Only the items it lets through are kept (and count towards `limit`): fleetd has no
    /// filter for these.
    filter: Option<PhoneFilter>,
}

impl ListPager {
    /// Pages through `listing`; `limit` items at most (at least one is asked for).
    pub fn new(listing: Listing, limit: Option<u64>) -> ListPager {
        ListPager {
            listing,
            limit,
            page: None,
            after: None,
            items: Vec::new(),
            left_out: None,
            filter: None,
        }
    }

    /// Keeps only the items `filter` lets through, matched client side page by page: the
    /// pages are then asked for at fleetd's own size, `limit` counting only the items kept.
    pub fn filtered(mut self, filter: PhoneFilter) -> ListPager {
        self.filter = (!filter.is_empty()).then_some(filter);
        self
    }

    /// What is listed.
    pub fn listing(&self) -> Listing {
        self.listing
    }

    /// The `limit` of the next request: what `limit` still wants, in pages fleetd allows;
    /// `None` for the server's own page size.
    fn page_limit(&self) -> Option<u64> {
        let wanted = self
            .limit
            .filter(|_| self.filter.is_none())
            .map(|limit| limit.saturating_sub(self.items.len() as u64).min(MAX_PAGE));
        match (wanted, self.page) {
            (Some(wanted), Some(page)) => Some(wanted.min(page)),
            (wanted, page) => wanted.or(page),
        }
    }
}

impl Pager for ListPager {
    type Output = Value;

    fn request(&self) -> OperatorCommand {
        let limit = self.page_limit().map(PageLimit::saturating);
        self.listing.page(limit, self.after.clone())
    }

    fn handle(&mut self, mut data: Value) -> Result<Step, ClientError> {
        let (command, field) = (self.listing.command(), self.listing.field());
        let Some(Value::Array(page)) = data.get_mut(field).map(Value::take) else {
            return Err(ClientError::Malformed(format!(
                "{command} answered without a list of {field}"
            )));
        };
        let next = match data.get("next") {
            None | Some(Value::Null) => None,
            Some(Value::String(next)) => Some(next.clone()),
            Some(other) => {
                return Err(ClientError::Malformed(format!(
                    "{command} answered a \"next\" that is not a string: {other}"
                )))
            }
        };
        match &self.filter {
            Some(filter) => self
                .items
                .extend(page.into_iter().filter(|item| filter.matches(item))),
            None => self.items.extend(page),
        }
        if let Some(limit) = self.limit.and_then(|l| usize::try_from(l).ok()) {
            if self.items.len() >= limit {
                self.left_out = if self.items.len() > limit {
                    // More than asked for (a fleetd that does not page): the rest follows
                    // the last one shown.
                    self.items.truncate(limit);
                    self.items
                        .last()
                        .and_then(|item| item.get(self.listing.key()))
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                } else {
                    next
                };
                return Ok(Step::Done);
            }
        }
        let Some(next) = next else {
            return Ok(Step::Done);
        };
        if self.after.as_ref().map(After::as_str) == Some(next.as_str()) {
            return Err(ClientError::Malformed(format!(
                "{command} answered the page after {next:?} with the same \"next\""
            )));
        }
        self.after = Some(After::new(&next)?);
        Ok(Step::More)
    }

    fn shrink(&mut self) -> bool {
        match half(self.page_limit().unwrap_or(MAX_PAGE)) {
            Some(page) => {
                self.page = Some(page);
                true
            }
            None => false,
        }
    }

    fn finish(self) -> Value {
        let mut data = json!({ self.listing.field(): self.items });
        if let Some(next) = self.left_out {
            data["next"] = json!(next);
        }
        data
    }
}

/// The `seq` of an audit record.
fn seq(record: &Value) -> Result<u64, ClientError> {
    record
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| ClientError::Malformed(format!("an audit record without a seq: {record}")))
}

/// The records of a `listAuditLog` answer.
fn records(mut data: Value) -> Result<Vec<Value>, ClientError> {
    match data.get_mut("records").map(Value::take) {
        Some(Value::Array(records)) => Ok(records),
        _ => Err(ClientError::Malformed(
            "listAuditLog answered without a list of records".into(),
        )),
    }
}

/// The newest `limit` audit records, oldest first, for a `limit` above what one `listAuditLog`
/// returns. `listAuditLog` pages only forward (`after_seq`, oldest first), and `seq` counts the
/// records of every tenant, so this asks for the newest page first, then for windows of `seq`
/// before it (each paged forward from its start), each window twice as wide as the last, until
/// it has `limit` records or the window starts at the beginning of the log.
#[derive(Debug, Clone, PartialEq)]
pub struct NewestRecords {
    limit: usize,
    page: u64,
    /// The newest records gathered so far, oldest first.
    records: Vec<Value>,
    window: Option<Window>,
}

/// Records with `lower < seq < upper`, paged forward from `after`.
#[derive(Debug, Clone, PartialEq)]
struct Window {
    lower: u64,
    upper: u64,
    after: u64,
    /// The newest of them, oldest first, no more than are still wanted.
    found: Vec<Value>,
}

impl NewestRecords {
    /// The newest `limit` records.
    pub fn new(limit: u64) -> NewestRecords {
        NewestRecords {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            page: MAX_PAGE,
            records: Vec::new(),
            window: None,
        }
    }

    /// The first page: the newest records, as many as one page holds.
    fn first_page(&self) -> u64 {
        self.page.min(self.limit as u64)
    }

    fn wanted(&self) -> usize {
        self.limit.saturating_sub(self.records.len())
    }

    /// Takes the newest page and says where the first window before it starts.
    fn handle_newest(&mut self, page: Vec<Value>) -> Result<Step, ClientError> {
        let full = page.len() as u64 >= self.first_page();
        let (Some(first), Some(last)) = (page.first(), page.last()) else {
            return Ok(Step::Done);
        };
        let (first, last) = (seq(first)?, seq(last)?);
        let covered = u128::from(last.saturating_sub(first)) + 1;
        let count = (page.len() as u128).max(1);
        self.records = page;
        if !full || self.wanted() == 0 || first <= 1 {
            return Ok(Step::Done);
        }
        // As many seqs as the wanted records took in the newest page, and a quarter more.
        let span = covered
            .saturating_mul(self.wanted() as u128)
            .saturating_mul(5)
            / (count * 4)
            + 1;
        let lower = first.saturating_sub(u64::try_from(span).unwrap_or(u64::MAX));
        self.window = Some(Window {
            lower,
            upper: first,
            after: lower,
            found: Vec::new(),
        });
        Ok(Step::More)
    }
}

impl Pager for NewestRecords {
    type Output = Value;

    fn request(&self) -> OperatorCommand {
        let (limit, after_seq) = match &self.window {
            None => (self.first_page(), None),
            Some(window) => (self.page, Some(window.after)),
        };
        OperatorCommand::ListAuditLog {
            limit: Some(PageLimit::saturating(limit)),
            after_seq,
        }
    }

    fn handle(&mut self, data: Value) -> Result<Step, ClientError> {
        let page = records(data)?;
        let wanted = self.wanted();
        let Some(window) = &mut self.window else {
            return self.handle_newest(page);
        };
        let full = page.len() as u64 >= self.page;
        let mut passed_upper = false;
        for record in page {
            let at = seq(&record)?;
            if at <= window.after {
                return Err(ClientError::Malformed(format!(
                    "fleetd answered for records after seq {} with seq {at}: it does not page \
                     the audit log (older than this fleetctl?)",
                    window.after
                )));
            }
            window.after = at;
            if at >= window.upper {
                passed_upper = true;
                break;
            }
            window.found.push(record);
        }
        if window.found.len() > wanted {
            window.found.drain(..window.found.len() - wanted);
        }
        if full && !passed_upper {
            return Ok(Step::More);
        }
        let (lower, upper) = (window.lower, window.upper);
        let mut records = std::mem::take(&mut window.found);
        records.append(&mut self.records);
        self.records = records;
        if self.wanted() == 0 || lower == 0 {
            self.window = None;
            return Ok(Step::Done);
        }
        let span = (upper - lower).saturating_mul(2);
        let next_lower = lower.saturating_sub(span);
        self.window = Some(Window {
            lower: next_lower,
            upper: lower + 1,
            after: next_lower,
            found: Vec::new(),
        });
        Ok(Step::More)
    }

    fn shrink(&mut self) -> bool {
        let current = match self.window {
            None => self.first_page(),
            Some(_) => self.page,
        };
        match half(current) {
            Some(page) => {
                self.page = page;
                true
            }
            None => false,
        }
    }

    fn finish(mut self) -> Value {
        if self.records.len() > self.limit {
            self.records.drain(..self.records.len() - self.limit);
        }
        json!({ "records": self.records })
    }
}

/// What checking the audit chain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Records fetched and checked, up to and including a break.
    pub records: u64,
    /// Leading records from before the chain, not covered by it.
    pub unchained: u64,
    /// Where the chain does not hold, if anywhere.
    pub broken: Option<ChainBreak>,
}

/// The operator's whole audit log, oldest first (`after_seq` from 0 on), checked against the
/// hash chain as it comes (`fleetctl audit verify`).
#[derive(Debug, Clone)]
pub struct ChainCheck {
    verifier: ChainVerifier,
    after_seq: u64,
    page: u64,
    verdict: Option<Verdict>,
    /// A head remembered from `fleetctl audit head`, and whether its record was found.
    head: Option<(Head, bool)>,
}

impl Default for ChainCheck {
    fn default() -> Self {
        ChainCheck::new()
    }
}

impl ChainCheck {
    /// A check from the tenant's first record on.
    pub fn new() -> ChainCheck {
        ChainCheck {
            verifier: ChainVerifier::new(None),
            after_seq: 0,
            page: MAX_PAGE,
            verdict: None,
            head: None,
        }
    }

    /// A check that also finds `head` (an earlier `fleetctl audit head`) in the chain: its
    /// record must be there with that hash, so that deleting the newest records, which leaves
    /// the rest of the chain whole, is noticed too.
    pub fn with_head(head: Head) -> ChainCheck {
        ChainCheck {
            head: Some((head, false)),
            ..ChainCheck::new()
        }
    }

    /// Whether `record`, intact in the chain, contradicts the remembered head.
    fn against_head(&mut self, record: &Value) -> Option<ChainBreak> {
        let (head, seen) = self.head.as_mut()?;
        let at = record.get("seq").and_then(Value::as_u64)?;
        if *seen || at < head.seq {
            return None;
        }
        if at > head.seq {
            return Some(ChainBreak {
                seq: head.seq,
                problem: format!(
                    "the remembered head (seq {}) is missing: the chain goes on at seq {at} \
                     without it",
                    head.seq
                ),
            });
        }
        *seen = true;
        let hash = record.get("hash").and_then(Value::as_str).unwrap_or("");
        (!hash.eq_ignore_ascii_case(&head.hash)).then(|| ChainBreak {
            seq: at,
            problem: format!(
                "the record's hash is {hash}, not the remembered head's {}: the log was \
                 rewritten from here on",
                head.hash
            ),
        })
    }
}

impl Pager for ChainCheck {
    type Output = Verdict;

    fn request(&self) -> OperatorCommand {
        OperatorCommand::ListAuditLog {
            limit: Some(PageLimit::saturating(self.page)),
            after_seq: Some(self.after_seq),
        }
    }

    fn handle(&mut self, data: Value) -> Result<Step, ClientError> {
        let page = records(data)?;
        let last_page = (page.len() as u64) < self.page;
        for record in &page {
            // A fleetd that ignores `after_seq` answers every page with the newest records.
            if let Some(at) = record.get("seq").and_then(Value::as_u64) {
                if at <= self.after_seq {
                    return Err(ClientError::Malformed(format!(
                        "fleetd answered for records after seq {} with seq {at}: it does not \
                         page the audit log (older than this fleetctl?)",
                        self.after_seq
                    )));
                }
            }
            let checked = self
                .verifier
                .push(record)
                .and_then(|()| self.against_head(record).map_or(Ok(()), Err));
            if let Err(broken) = checked {
                self.verdict = Some(Verdict {
                    records: self.verifier.records() + 1,
                    unchained: self.verifier.unchained(),
                    broken: Some(broken),
                });
                return Ok(Step::Done);
            }
        }
        // Every listAuditLog is itself audited, so a page is never empty for long: the log ends,
        // for this check, at the first page that is not full.
        match self.verifier.last_seq() {
            Some(at) if !last_page => {
                self.after_seq = at;
                Ok(Step::More)
            }
            _ => Ok(Step::Done),
        }
    }

    fn shrink(&mut self) -> bool {
        match half(self.page) {
            Some(page) => {
                self.page = page;
                true
            }
            None => false,
        }
    }

    fn finish(self) -> Verdict {
        if let Some(verdict) = self.verdict {
            return verdict;
        }
        let missing = match self.head {
            Some((head, false)) => Some(ChainBreak {
                seq: head.seq,
                problem: format!(
                    "the remembered head (seq {}) is missing: the log ends {}, so its newest \
                     records were deleted",
                    head.seq,
                    match self.verifier.last_seq() {
                        Some(last) => format!("at seq {last}"),
                        None => "before any record".to_owned(),
                    }
                ),
            }),
            _ => None,
        };
        Verdict {
            records: self.verifier.records(),
            unchained: self.verifier.unchained(),
            broken: missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::VecDeque;

    use super::*;

    /// Answers from a script, in order; remembers what was asked and every pause.
    #[derive(Default)]
    struct Script {
        answers: RefCell<VecDeque<Result<Value, ClientError>>>,
        asked: RefCell<Vec<(String, Value)>>,
        pauses: RefCell<Vec<Duration>>,
    }

    impl Script {
        fn new(answers: Vec<Result<Value, ClientError>>) -> Script {
            Script {
                answers: RefCell::new(answers.into()),
                ..Script::default()
            }
        }

        fn asked(&self) -> Vec<Value> {
            self.asked.borrow().iter().map(|(_, a)| a.clone()).collect()
        }
    }

    /// The name and the arguments of `command`, as they go on the wire.
    fn asked_for(command: &OperatorCommand) -> (String, Value) {
        (
            command.name().to_string(),
            Value::Object(command.arguments()),
        )
    }

    impl PageSource for Script {
        async fn fetch(&self, command: &OperatorCommand) -> Result<Value, ClientError> {
            self.asked.borrow_mut().push(asked_for(command));
            self.answers
                .borrow_mut()
                .pop_front()
                .unwrap_or_else(|| Err(ClientError::Malformed("script ran out".into())))
        }

        async fn pause(&self, wait: Duration) {
            self.pauses.borrow_mut().push(wait);
        }
    }

    fn failed(code: &str, error: &str) -> Result<Value, ClientError> {
        Err(ClientError::CommandFailed {
            code: code.into(),
            error: error.into(),
        })
    }

    fn stations(serials: &[&str], next: Option<&str>) -> Result<Value, ClientError> {
        let mut data =
            json!({"stations": serials.iter().map(|s| json!({"serial": s})).collect::<Vec<_>>()});
        if let Some(next) = next {
            data["next"] = json!(next);
        }
        Ok(data)
    }

    fn serials(data: &Value) -> Vec<&str> {
        data["stations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["serial"].as_str().unwrap())
            .collect()
    }

    fn running() -> Listing {
        Listing::Stations {
            state: Some(fleet_protocol::StationState::Running),
        }
    }

    const STATIONS: Listing = Listing::Stations { state: None };

    /// Every station the script has, page after page.
    async fn every_station(script: &Script) -> Value {
        fetch_pages(script, ListPager::new(STATIONS, None))
            .await
            .expect("listed")
    }

    #[tokio::test]
    async fn a_list_follows_next_until_there_is_none() {
        let script = Script::new(vec![
            stations(&["A", "B"], Some("B")),
            stations(&["C", "D"], Some("D")),
            stations(&["E"], None),
        ]);
        let pager = ListPager::new(running(), None);
        let data = fetch_pages(&script, pager).await.unwrap();
        assert_eq!(serials(&data), ["A", "B", "C", "D", "E"]);
        assert_eq!(data.get("next"), None);
        assert_eq!(
            script.asked(),
            [
                json!({"state": "running"}),
                json!({"state": "running", "after": "B"}),
                json!({"state": "running", "after": "D"}),
            ]
        );
        assert!(script
            .asked
            .borrow()
            .iter()
            .all(|(c, _)| c == "listStations"));
    }

    #[tokio::test]
    async fn a_limit_within_one_page_is_one_request() {
        let script = Script::new(vec![stations(&["A", "B"], Some("B"))]);
        let pager = ListPager::new(Listing::RejectedStations, Some(2));
        let data = fetch_pages(&script, pager).await.unwrap();
        assert_eq!(serials(&data), ["A", "B"]);
        assert_eq!(data["next"], "B", "the rest is there");
        assert_eq!(script.asked(), [json!({"limit": 2})]);
        assert_eq!(script.asked.borrow()[0].0, "listRejectedStations");
    }

    #[tokio::test]
    async fn a_limit_beyond_a_page_asks_for_the_rest() {
        // A fleetd configured with pages of 2 answers at most 2, whatever is asked.
        let script = Script::new(vec![
            stations(&["A", "B"], Some("B")),
            stations(&["C", "D"], Some("D")),
        ]);
        let pager = ListPager::new(STATIONS, Some(3));
        let data = fetch_pages(&script, pager).await.unwrap();
        assert_eq!(serials(&data), ["A", "B", "C"]);
        assert_eq!(data["next"], "C");
        assert_eq!(
            script.asked(),
            [json!({"limit": 3}), json!({"limit": 1, "after": "B"})]
        );

        let pager = ListPager::new(STATIONS, Some(1200));
        assert_eq!(asked_for(&pager.request()).1, json!({"limit": MAX_PAGE}));
    }

    #[tokio::test]
    async fn a_limit_that_covers_everything_leaves_no_next() {
        let script = Script::new(vec![stations(&["A"], None)]);
        let pager = ListPager::new(STATIONS, Some(5));
        let data = fetch_pages(&script, pager).await.unwrap();
        assert_eq!(serials(&data), ["A"]);
        assert_eq!(data.get("next"), None);
    }

    #[tokio::test]
    async fn phones_page_by_mac() {
        let script = Script::new(vec![
            Ok(json!({"phones": [{"mac": "m1"}], "next": "m1"})),
            Ok(json!({"phones": [{"mac": "m2"}]})),
        ]);
        let pager = ListPager::new(Listing::Phones, None);
        let data = fetch_pages(&script, pager).await.unwrap();
        assert_eq!(data, json!({"phones": [{"mac": "m1"}, {"mac": "m2"}]}));
        assert_eq!(script.asked(), [json!({}), json!({"after": "m1"})]);
        assert!(script.asked.borrow().iter().all(|(c, _)| c == "listPhones"));
    }

    #[tokio::test]
    async fn an_old_fleetd_without_paging_is_listed_in_one_request() {
        let script = Script::new(vec![stations(&["A", "B", "C"], None)]);
        let data = every_station(&script).await;
        assert_eq!(serials(&data), ["A", "B", "C"]);
        // One that ignores `limit` is cut short here, and says where the rest would follow.
        let script = Script::new(vec![stations(&["A", "B", "C"], None)]);
        let data = fetch_pages(&script, ListPager::new(STATIONS, Some(2)))
            .await
            .unwrap();
        assert_eq!(serials(&data), ["A", "B"]);
        assert_eq!(data["next"], "B");
    }

    #[tokio::test]
    async fn malformed_pages_end_the_listing() {
        for answer in [
            Ok(json!({"phones": []})),
            Ok(json!({"stations": [], "next": 7})),
        ] {
            let script = Script::new(vec![answer]);
            let result = fetch_pages(&script, ListPager::new(STATIONS, None)).await;
            assert!(
                matches!(result, Err(ClientError::Malformed(_))),
                "{result:?}"
            );
        }
        // The same `next` twice would loop for ever.
        let script = Script::new(vec![
            stations(&["A"], Some("A")),
            stations(&["A"], Some("A")),
        ]);
        let result = fetch_pages(&script, ListPager::new(STATIONS, None)).await;
        assert!(
            matches!(result, Err(ClientError::Malformed(_))),
            "{result:?}"
        );
        assert_eq!(script.asked().len(), 2);
    }

    #[tokio::test]
    async fn rate_limited_pages_are_asked_again_after_the_named_wait() {
        let script = Script::new(vec![
            stations(&["A"], Some("A")),
            failed(
                "rate_limited",
                "operator command budget spent; retry in 250 ms",
            ),
            failed("rate_limited", "too many commands"),
            stations(&["B"], None),
        ]);
        let data = every_station(&script).await;
        assert_eq!(serials(&data), ["A", "B"]);
        assert_eq!(
            *script.pauses.borrow(),
            [Duration::from_millis(250), DEFAULT_RETRY_WAIT]
        );
        assert_eq!(
            script.asked(),
            [
                json!({}),
                json!({"after": "A"}),
                json!({"after": "A"}),
                json!({"after": "A"})
            ]
        );
    }

    #[tokio::test]
    async fn rate_limited_retries_are_bounded_per_page() {
        let limited = || failed("rate_limited", "retry in 5ms");
        let mut answers = vec![stations(&["A"], Some("A"))];
        answers.extend((0..RATE_LIMIT_RETRIES).map(|_| limited()));
        // A page answered resets the count.
        answers.push(stations(&["B"], Some("B")));
        answers.extend((0..=RATE_LIMIT_RETRIES).map(|_| limited()));
        let script = Script::new(answers);
        let result = fetch_pages(&script, ListPager::new(STATIONS, None)).await;
        match result {
            Err(ClientError::CommandFailed { code, .. }) => assert_eq!(code, "rate_limited"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(
            script.pauses.borrow().len(),
            2 * RATE_LIMIT_RETRIES as usize
        );
        assert!(script.answers.borrow().is_empty());
    }

    #[tokio::test]
    async fn other_errors_are_not_retried() {
        let script = Script::new(vec![failed("forbidden", "no")]);
        let result = fetch_pages(&script, ListPager::new(STATIONS, None)).await;
        assert!(
            matches!(&result, Err(ClientError::CommandFailed { code, .. }) if code == "forbidden")
        );
        assert!(script.pauses.borrow().is_empty());
    }

    #[tokio::test]
    async fn too_large_pages_are_asked_again_half_as_big() {
        let script = Script::new(vec![
            failed("too_large", "the response would exceed 65536 bytes"),
            stations(&["A"], Some("A")),
            failed("too_large", "again"),
            stations(&["B"], None),
        ]);
        let data = every_station(&script).await;
        assert_eq!(serials(&data), ["A", "B"]);
        assert_eq!(
            script.asked(),
            [
                json!({}),
                json!({"limit": 250}),
                json!({"limit": 250, "after": "A"}),
                json!({"limit": 125, "after": "A"}),
            ]
        );
        assert!(script.pauses.borrow().is_empty());
        // Not below one item.
        let mut pager = ListPager::new(STATIONS, Some(1));
        assert!(!pager.shrink());
        let script = Script::new(vec![failed("too_large", "one is too many")]);
        let result = fetch_pages(&script, pager).await;
        assert!(
            matches!(&result, Err(ClientError::CommandFailed { code, .. }) if code == "too_large")
        );
    }

    #[test]
    fn retry_delays_are_read_from_the_text() {
        let ms = Duration::from_millis;
        for (text, wait) in [
            ("retry in 250 ms", Some(ms(250))),
            ("budget spent; retry in 1.5s", Some(ms(1500))),
            ("Retry after 2 seconds.", Some(ms(2000))),
            ("retry after 3", Some(ms(3000))),
            ("retry in 120µs", Some(Duration::from_micros(120))),
            ("retry in 999 minutes", Some(MAX_RETRY_WAIT)),
            ("retry after 2024-05-01T10:00:00Z", None),
            ("retry after 10:00", None),
            ("retry in a while", None),
            ("retry in 5 fortnights", None),
            ("slow down", None),
            ("", None),
        ] {
            assert_eq!(retry_delay(text), wait, "{text:?}");
        }
    }

    /// A log of `tenant` records (with `other` records of another tenant between each two)
    /// that answers `listAuditLog` as fleetd does, with pages of at most `max_page`.
    struct AuditLog {
        seqs: Vec<u64>,
        max_page: usize,
        asked: RefCell<Vec<Value>>,
    }

    impl AuditLog {
        fn new(records: u64, gap: u64, max_page: usize) -> AuditLog {
            AuditLog {
                seqs: (0..records).map(|i| 1 + i * (gap + 1)).collect(),
                max_page,
                asked: RefCell::new(Vec::new()),
            }
        }
    }

    impl PageSource for AuditLog {
        async fn fetch(&self, command: &OperatorCommand) -> Result<Value, ClientError> {
            let (command, args) = asked_for(command);
            assert_eq!(command, "listAuditLog");
            self.asked.borrow_mut().push(args.clone());
            let limit = args["limit"].as_u64().unwrap_or(100) as usize;
            let limit = limit.min(self.max_page);
            let seqs: Vec<u64> = match args.get("after_seq").and_then(Value::as_u64) {
                Some(after) => self
                    .seqs
                    .iter()
                    .copied()
                    .filter(|&s| s > after)
                    .take(limit)
                    .collect(),
                None => {
                    let start = self.seqs.len().saturating_sub(limit);
                    self.seqs[start..].to_vec()
                }
            };
            Ok(json!({"records": seqs.iter().map(|s| json!({"seq": s})).collect::<Vec<_>>()}))
        }

        async fn pause(&self, _: Duration) {}
    }

    fn seqs(data: &Value) -> Vec<u64> {
        data["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn the_newest_records_beyond_one_page_are_paged_back_to() {
        for (records, gap, want) in [
            (5000, 0, 1200),
            (5000, 3, 1200),
            (5000, 0, 501),
            (1100, 2, 5000),
            (500, 0, 1000),
            (0, 0, 1000),
            (3000, 7, 3000),
        ] {
            let log = AuditLog::new(records, gap, MAX_PAGE as usize);
            let data = fetch_pages(&log, NewestRecords::new(want)).await.unwrap();
            let expected: Vec<u64> =
                log.seqs[log.seqs.len().saturating_sub(want as usize)..].to_vec();
            assert_eq!(
                seqs(&data),
                expected,
                "{records} records, gap {gap}, want {want}"
            );
            let asked = log.asked.borrow();
            assert_eq!(asked[0], json!({"limit": MAX_PAGE}));
            assert!(asked.iter().all(|a| a["limit"].as_u64() <= Some(MAX_PAGE)));
            // Not much more than the pages the records take.
            assert!(
                asked.len() as u64 <= want.div_ceil(MAX_PAGE) + 4,
                "{} requests for {want}",
                asked.len()
            );
        }
    }

    #[tokio::test]
    async fn the_newest_records_follow_sparse_and_dense_stretches() {
        // Dense at first, sparse at the end: the first estimate is far too wide.
        let mut log = AuditLog::new(0, 0, MAX_PAGE as usize);
        log.seqs = (1..=3000).chain((1..=600).map(|i| 3000 + i * 50)).collect();
        let data = fetch_pages(&log, NewestRecords::new(1500)).await.unwrap();
        assert_eq!(seqs(&data), log.seqs[log.seqs.len() - 1500..]);
        // Sparse at first, dense at the end: the estimate is far too narrow.
        let mut log = AuditLog::new(0, 0, MAX_PAGE as usize);
        log.seqs = (1..=1000)
            .map(|i| i * 1000)
            .chain(1_000_001..=1_000_600)
            .collect();
        let data = fetch_pages(&log, NewestRecords::new(1500)).await.unwrap();
        assert_eq!(seqs(&data), log.seqs[log.seqs.len() - 1500..]);
    }

    #[tokio::test]
    async fn the_newest_records_come_in_smaller_pages_after_too_large() {
        let log = AuditLog::new(2000, 1, MAX_PAGE as usize);
        let mut pager = NewestRecords::new(700);
        assert!(pager.shrink());
        assert_eq!(asked_for(&pager.request()).1, json!({"limit": 250}));
        let data = fetch_pages(&log, pager).await.unwrap();
        assert_eq!(seqs(&data), log.seqs[log.seqs.len() - 700..]);
        assert!(log.asked.borrow().iter().all(|a| a["limit"] == 250));
    }

    fn chained(n: u64) -> Vec<Value> {
        let mut records: Vec<Value> = Vec::new();
        for i in 0..n {
            let prev = records.last().map_or(crate::audit::GENESIS_PREV_HASH, |r| {
                r["hash"].as_str().unwrap()
            });
            let mut record = json!({
                "seq": 1 + i, "time": "2024-05-01T10:00:00Z", "tenant": "default",
                "actor": "admin", "device": null, "action": "listAuditLog", "outcome": "ok",
                "reason": null, "prev_hash": prev,
            });
            record["hash"] = json!(crate::audit::record_hash(&record).unwrap());
            records.push(record);
        }
        records
    }

    #[tokio::test]
    async fn the_chain_is_checked_page_by_page() {
        let records = chained(700);
        let script = Script::new(vec![
            Ok(json!({"records": records[..500]})),
            failed("rate_limited", "retry in 10 ms"),
            Ok(json!({"records": records[500..]})),
        ]);
        let verdict = fetch_pages(&script, ChainCheck::new()).await.unwrap();
        assert_eq!(
            verdict,
            Verdict {
                records: 700,
                unchained: 0,
                broken: None
            }
        );
        assert_eq!(
            script.asked(),
            [
                json!({"after_seq": 0, "limit": 500}),
                json!({"after_seq": 500, "limit": 500}),
                json!({"after_seq": 500, "limit": 500}),
            ]
        );

        let mut edited = chained(3);
        edited[1]["actor"] = json!("mallory");
        let script = Script::new(vec![Ok(json!({"records": edited}))]);
        let verdict = fetch_pages(&script, ChainCheck::new()).await.unwrap();
        assert_eq!(verdict.records, 2);
        assert_eq!(verdict.broken.map(|b| b.seq), Some(2));

        // A fleetd that ignores after_seq.
        let script = Script::new(vec![
            Ok(json!({"records": records[..500]})),
            Ok(json!({"records": records[..500]})),
        ]);
        let result = fetch_pages(&script, ChainCheck::new()).await;
        assert!(
            matches!(result, Err(ClientError::Malformed(_))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_remembered_head_catches_deleted_newest_records() {
        let records = chained(10);
        let head = |at: usize| Head::of(&records[at]).unwrap();
        let verdict_with = |log: &[Value], head: Head| {
            let script = Script::new(vec![Ok(json!({ "records": log }))]);
            async move {
                fetch_pages(&script, ChainCheck::with_head(head))
                    .await
                    .unwrap()
            }
        };
        // The head still there, and records after it: intact.
        assert_eq!(verdict_with(&records, head(6)).await.broken, None);
        assert_eq!(verdict_with(&records, head(9)).await.broken, None);
        // The newest four deleted: the chain alone is whole, the head is not there.
        assert_eq!(
            fetch_pages(
                &Script::new(vec![Ok(json!({"records": records[..6]}))]),
                ChainCheck::new()
            )
            .await
            .unwrap()
            .broken,
            None
        );
        let verdict = verdict_with(&records[..6], head(8)).await;
        let broken = verdict.broken.expect("the deletion is noticed");
        assert_eq!(broken.seq, 9);
        assert!(
            broken.problem.contains("ends at seq 6"),
            "{}",
            broken.problem
        );
        // A head with another hash: the log was rewritten.
        let mut other = head(4);
        other.hash = "0".repeat(64);
        let broken = verdict_with(&records, other)
            .await
            .broken
            .expect("rewritten");
        assert_eq!(broken.seq, 5);
        assert!(broken.problem.contains("rewritten"), "{}", broken.problem);
        // The head's record gone but later ones still there (the chain breaks first anyway).
        let mut gapped = records.clone();
        gapped.remove(5);
        assert!(verdict_with(&gapped, head(5)).await.broken.is_some());
    }

    #[test]
    fn heads_print_and_parse_as_seq_colon_hash() {
        let head: Head = format!("42:{}", "AB".repeat(32)).parse().unwrap();
        assert_eq!(head.seq, 42);
        assert_eq!(head.to_string(), format!("42:{}", "ab".repeat(32)));
        for wrong in ["42", "x:ab", &format!("42:{}", "ab".repeat(31)), "", ":"] {
            assert!(wrong.parse::<Head>().is_err(), "{wrong:?}");
        }
    }

    #[tokio::test]
    async fn a_filtered_listing_keeps_matches_and_counts_only_them() {
        let phone = |i: u32, site: &str| json!({"mac": format!("aabbccddee{i:02}"), "site": site});
        let script = Script::new(vec![
            Ok(
                json!({"phones": [phone(1, "Berlin"), phone(2, "Paris"), phone(3, "Berlin")],
                "next": "aabbccddee03"}),
            ),
            Ok(
                json!({"phones": [phone(4, "Paris"), phone(5, "berlin"), phone(6, "Berlin")],
                "next": "aabbccddee06"}),
            ),
        ]);
        let filter = PhoneFilter {
            site: Some("Berlin".into()),
            ..PhoneFilter::default()
        };
        let pager = ListPager::new(Listing::Phones, Some(3)).filtered(filter);
        // fleetd's own page size: a filtered page holds fewer than it is asked for.
        assert_eq!(asked_for(&pager.request()).1, json!({}));
        let data = fetch_pages(&script, pager).await.unwrap();
        let macs: Vec<&str> = data["phones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["mac"].as_str().unwrap())
            .collect();
        assert_eq!(macs, ["aabbccddee01", "aabbccddee03", "aabbccddee05"]);
        assert_eq!(data["next"], "aabbccddee05");
        assert_eq!(script.asked().len(), 2);
    }
}
