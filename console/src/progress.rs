//! Firmware downloads as fleetd tells them: its `update_progress` events (docs/protocol.md
//! §3.2: an Updating station's first chunk request, each tenth of the image, its end). fleetd
//! stores none of them, so the console keeps the last one per station, in memory only, for
//! the progress bars of the pages rendered after it: at most [`KEPT`] stations (the oldest
//! news is dropped first), forgotten when the station is removed, all lost on restart. A
//! station without one shows an indeterminate bar until its next event.

use std::collections::BTreeMap;
use std::sync::Mutex;

use maud::{html, Markup};
use serde_json::Value;

/// How many stations' last progress is kept.
pub(crate) const KEPT: usize = 4096;

/// The longest serial or version taken from an event (the protocol's limit for device strings).
const MAX_TEXT: usize = 256;

/// One `update_progress` event, checked: `received` is at most `size`, and `size` is not 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Progress {
    pub(crate) serial: String,
    pub(crate) version: String,
    pub(crate) received: u64,
    pub(crate) size: u64,
    pub(crate) time: String,
}

fn short_text(event: &Value, key: &str) -> Option<String> {
    event
        .get(key)
        .and_then(Value::as_str)
        .filter(|t| t.len() <= MAX_TEXT)
        .map(str::to_owned)
}

impl Progress {
    /// The progress an event tells, or `None` when it is not a well-formed `update_progress`
    /// (peer input: ignored, never trusted). A `received` beyond `size` counts as the end.
    pub(crate) fn of_event(event: &Value) -> Option<Progress> {
        if event.get("event").and_then(Value::as_str) != Some("update_progress") {
            return None;
        }
        let serial = short_text(event, "serial").filter(|s| !s.is_empty())?;
        let size = event
            .get("size")
            .and_then(Value::as_u64)
            .filter(|s| *s > 0)?;
        let received = event.get("received").and_then(Value::as_u64)?.min(size);
        Some(Progress {
            serial,
            version: short_text(event, "version").unwrap_or_default(),
            received,
            size,
            time: short_text(event, "time").unwrap_or_default(),
        })
    }

    /// Whole percent received, 0 to 100.
    pub(crate) fn percent(&self) -> u64 {
        // `received <= size` and `size > 0`; u128 cannot overflow.
        (u128::from(self.received) * 100 / u128::from(self.size.max(1))) as u64
    }

    /// Whether this is a download of the image `station` (fleetd's object) is being updated to:
    /// one of an earlier update's image is not shown as the current one's.
    pub(crate) fn of_update_of(&self, station: &Value) -> bool {
        station
            .get("update_version")
            .and_then(Value::as_str)
            .is_none_or(|version| version == self.version)
    }

    /// Whether the whole image was asked for.
    pub(crate) fn complete(&self) -> bool {
        self.received >= self.size
    }
}

/// The progress bar of station `serial` (`#update-progress`) and its text: filled from
/// `progress` if there is one, else indeterminate until the first event (`assets/console.js`
/// moves both as events arrive).
pub(crate) fn bar(serial: &str, progress: Option<&Progress>) -> Markup {
    html! {
        @match progress {
            Some(p) => {
                progress #update-progress data-progress=(serial) value=(p.received) max=(p.size)
                    aria-label="Firmware download" { (p.percent()) " %" }
                " " span #update-percent .long data-progress-text=(serial) {
                    (p.percent()) " % (" (p.received) " of " (p.size) " bytes)"
                }
            }
            None => {
                progress #update-progress data-progress=(serial) aria-label="Firmware download" {}
                " " span #update-percent .long data-progress-text=(serial) {
                    "waiting for the station's first chunk request"
                }
            }
        }
    }
}

/// The short form for a list row: "40 %" (empty until the first event).
pub(crate) fn percent_text(serial: &str, progress: Option<&Progress>) -> Markup {
    html! {
        span .percent data-progress-text=(serial) { @if let Some(p) = progress { (p.percent()) " %" } }
    }
}

/// The last progress of each station, bounded.
#[derive(Default)]
pub(crate) struct Downloads {
    last: Mutex<Last>,
}

#[derive(Default)]
struct Last {
    /// serial → (news number, progress); the smallest number is the oldest news.
    by_serial: BTreeMap<String, (u64, Progress)>,
    news: u64,
}

impl Downloads {
    fn last(&self) -> std::sync::MutexGuard<'_, Last> {
        // Each entry stands alone: a panic elsewhere cannot leave the map inconsistent.
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps `progress` as its station's last, dropping the oldest news beyond [`KEPT`].
    pub(crate) fn note(&self, progress: Progress) {
        let mut last = self.last();
        last.news = last.news.saturating_add(1);
        let number = last.news;
        let map = &mut last.by_serial;
        if map.len() >= KEPT && !map.contains_key(&progress.serial) {
            let oldest = map
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(serial, _)| serial.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(progress.serial.clone(), (number, progress));
    }

    /// The last progress of `serial`, if the console heard one since it started.
    pub(crate) fn of(&self, serial: &str) -> Option<Progress> {
        self.last().by_serial.get(serial).map(|(_, p)| p.clone())
    }

    /// Forgets `serial` (removed from the fleet).
    pub(crate) fn forget(&self, serial: &str) {
        self.last().by_serial.remove(serial);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.last().by_serial.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(serial: &str, received: u64) -> Value {
        json!({"event": "update_progress", "serial": serial, "version": "6.1.0",
            "received": received, "size": 1000, "type": "stations", "time": "t"})
    }

    #[test]
    fn a_well_formed_event_is_read_and_clamped() {
        let p = Progress::of_event(&event("ST-1", 400)).unwrap();
        assert_eq!((p.received, p.size, p.percent()), (400, 1000, 40));
        assert!(!p.complete());
        let p = Progress::of_event(&event("ST-1", 5000)).unwrap();
        assert_eq!((p.received, p.percent()), (1000, 100));
        assert!(p.complete());
        let huge = json!({"event": "update_progress", "serial": "S", "received": u64::MAX,
            "size": u64::MAX});
        assert_eq!(Progress::of_event(&huge).unwrap().percent(), 100);
    }

    #[test]
    fn a_malformed_event_is_ignored() {
        let bad = [
            json!({"event": "update_progress", "serial": "S", "received": 1, "size": 0}),
            json!({"event": "update_progress", "serial": "S", "received": -1, "size": 10}),
            json!({"event": "update_progress", "serial": "S", "received": "1", "size": 10}),
            json!({"event": "update_progress", "serial": "", "received": 1, "size": 10}),
            json!({"event": "update_progress", "serial": 7, "received": 1, "size": 10}),
            json!({"event": "update_progress", "received": 1, "size": 10}),
            json!({"event": "update_progress", "serial": "S", "received": 1, "size": 1.5}),
            json!({"event": "update_progress", "serial": "x".repeat(300), "received": 1, "size": 10}),
            json!({"event": "state", "serial": "S", "received": 1, "size": 10}),
            json!("update_progress"),
        ];
        for event in bad {
            assert_eq!(Progress::of_event(&event), None, "{event}");
        }
    }

    #[test]
    fn the_cache_keeps_the_last_per_station_and_drops_the_oldest_beyond_its_bound() {
        let downloads = Downloads::default();
        for i in 0..KEPT {
            downloads.note(Progress::of_event(&event(&format!("ST-{i}"), 1)).unwrap());
        }
        downloads.note(Progress::of_event(&event("ST-0", 500)).unwrap());
        downloads.note(Progress::of_event(&event("ST-new", 2)).unwrap());
        assert_eq!(downloads.len(), KEPT);
        assert_eq!(downloads.of("ST-0").unwrap().received, 500);
        assert_eq!(downloads.of("ST-1"), None, "the oldest news went");
        assert_eq!(downloads.of("ST-new").unwrap().received, 2);
        downloads.forget("ST-0");
        assert_eq!(downloads.of("ST-0"), None);
    }
}
