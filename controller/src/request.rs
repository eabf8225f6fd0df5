//! An operator request as the controller answers it, without I/O: the entries come from the one
//! parser, [`fleet_protocol::envelope::parse_request`] (the `operator_request` fuzz target runs
//! it too), and [`Responses`] keeps the whole response within `[limits] max_response_bytes`.

use serde_json::Value;

use fleet_protocol::envelope::ResponseEntry;
use fleet_protocol::{CommandError, ErrorCode};

pub use fleet_protocol::envelope::{parse_request, EntryCommand, RequestEntry};

/// The responses of one request, in the order of its entries, within a byte bound: a read that
/// would pass it is answered `too_large` instead; a decision is answered whatever its size (it
/// is small, and it happened).
#[derive(Debug)]
pub struct Responses {
    max_bytes: usize,
    /// Bytes of the answers counted so far.
    bytes: usize,
    entries: Vec<Value>,
    /// (`command`, `correlationData`) of every entry, to answer each with an error instead if
    /// the batch is not committed.
    answered: Vec<(Value, Value)>,
}

impl Responses {
    pub fn new(max_bytes: usize, capacity: usize) -> Responses {
        Responses {
            max_bytes,
            bytes: 0,
            entries: Vec::with_capacity(capacity),
            answered: Vec::with_capacity(capacity),
        }
    }

    /// Whether the response has reached its bound: a read is then not even run, since its
    /// answer could only be `too_large` (reading and encoding a page for nothing is the work a
    /// flood wants).
    pub fn is_full(&self) -> bool {
        self.bytes >= self.max_bytes
    }

    /// An entry refused before it ran (rate limited, or a read once the response is full); its
    /// small error does not count against the bound.
    pub fn refuse(&mut self, command: Value, correlation: Value, error: CommandError) {
        self.push(ResponseEntry {
            command,
            correlation,
            outcome: Err(error),
        });
    }

    /// A read refused because the response is full ([`Responses::is_full`]).
    pub fn refuse_full(&mut self, command: Value, correlation: Value) {
        let error = self.too_large("reached");
        self.refuse(command, correlation, error);
    }

    /// An entry that ran; `decided`: a decision, answered whatever its size.
    pub fn answer(
        &mut self,
        command: Value,
        correlation: Value,
        outcome: Result<Value, CommandError>,
        decided: bool,
    ) {
        let entry = ResponseEntry {
            command,
            correlation,
            outcome,
        };
        let size = serde_json::to_vec(&entry.to_json()).map_or(0, |v| v.len());
        if !decided && self.bytes + size > self.max_bytes {
            let error = self.too_large("would exceed");
            return self.refuse(entry.command, entry.correlation, error);
        }
        self.bytes += size;
        self.push(entry);
    }

    fn too_large(&self, verb: &str) -> CommandError {
        CommandError::new(
            ErrorCode::TooLarge,
            format!(
                "the response {verb} {} bytes: ask for a smaller page (limit, after) or fewer \
                 commands in one request",
                self.max_bytes
            ),
        )
    }

    fn push(&mut self, entry: ResponseEntry) {
        self.entries.push(entry.to_json());
        self.answered.push((entry.command, entry.correlation));
    }

    /// The (`command`, `correlationData`) of every entry, and the response entries.
    pub fn finish(self) -> (Vec<(Value, Value)>, Vec<Value>) {
        (self.answered, self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn codes(responses: Responses) -> Vec<Option<String>> {
        let (_, entries) = responses.finish();
        entries
            .iter()
            .map(|e| e.get("code").and_then(Value::as_str).map(str::to_owned))
            .collect()
    }

    #[test]
    fn reads_stay_within_the_bound_and_decisions_are_always_answered() {
        let data = json!({"stations": ["x".repeat(60)]});
        let one = serde_json::to_vec(
            &ResponseEntry {
                command: json!("listStations"),
                correlation: json!(1),
                outcome: Ok(data.clone()),
            }
            .to_json(),
        )
        .unwrap()
        .len();
        let mut responses = Responses::new(one + 10, 4);
        assert!(!responses.is_full());
        responses.answer(json!("listStations"), json!(1), Ok(data.clone()), false);
        responses.answer(json!("listStations"), json!(1), Ok(data.clone()), false);
        responses.answer(json!("rejectStation"), json!(1), Ok(data.clone()), true);
        assert!(responses.is_full());
        responses.refuse_full(json!("listStations"), json!(2));
        let (answered, entries) = responses.finish();
        assert_eq!(answered.len(), 4);
        assert_eq!(answered[3], (json!("listStations"), json!(2)));
        assert!(entries[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("the response would exceed"));
        assert!(entries[3]["error"]
            .as_str()
            .unwrap()
            .starts_with("the response reached"));
        assert_eq!(entries[0]["data"], data);
        assert_eq!(entries[2]["data"], data);
    }

    #[test]
    fn refusals_do_not_count_against_the_bound() {
        let mut responses = Responses::new(10, 2);
        responses.refuse(
            Value::Null,
            Value::Null,
            CommandError::new(ErrorCode::RateLimited, "x".repeat(100)),
        );
        assert!(!responses.is_full());
        responses.answer(json!("getStation"), Value::Null, Ok(json!({})), false);
        assert_eq!(
            codes(responses),
            [
                Some("rate_limited".to_owned()),
                Some("too_large".to_owned())
            ]
        );
    }
}
