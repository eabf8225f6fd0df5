//! The operator's event stream as the pages use it: each event of `fleet/events/<tenant>/…`
//! becomes a [`Live`] notice for the open browsers (server-sent events), identity-mismatch
//! events become security alerts, and every answer (or silence) of fleetd says whether it is
//! reachable. The alerts are a cache of events, not a record: fleetd's audit log keeps them.
//! `update_progress` events become [`LiveKind::Progress`] notices and the last progress of
//! their station ([`crate::progress`]).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use fleet_protocol::{names_a_read, EventKind, StationState, Topic};
use serde_json::Value;
use tokio::sync::broadcast;

use crate::fleetd::FleetdError;
use crate::progress::{Downloads, Progress};
use crate::views::text;

/// What an open page is told about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum LiveKind {
    Stations,
    Phones,
    Audit,
    Security,
    /// A station's firmware download moved (`update_progress`): pages update their progress
    /// bars in place, without reading fleetd again.
    Progress,
    /// fleetd became reachable or unreachable.
    Health,
}

impl LiveKind {
    /// The SSE event name; pages list the ones they follow in `data-live`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LiveKind::Stations => "stations",
            LiveKind::Phones => "phones",
            LiveKind::Audit => "audit",
            LiveKind::Security => "security",
            LiveKind::Progress => "progress",
            LiveKind::Health => "health",
        }
    }
}

/// One notice for the open pages: its kind and the event it came from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Live {
    pub(crate) kind: LiveKind,
    pub(crate) event: Value,
}

/// A station whose key changed: an `identity_mismatch` security event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Alert {
    pub(crate) time: String,
    pub(crate) pinned: Option<String>,
    pub(crate) presented: Option<String>,
    pub(crate) ip: Option<String>,
    pub(crate) advice: String,
}

/// The hub: alerts, downloads, reachability, and the channel to the open pages.
pub(crate) struct Hub {
    live: broadcast::Sender<Live>,
    /// The last `update_progress` of each station (bounded, lost on restart).
    pub(crate) downloads: Downloads,
    alerts: Mutex<BTreeMap<String, Alert>>,
    reachable: AtomicBool,
    /// Open live streams: while there are any, fleetd's reachability is probed.
    watchers: AtomicUsize,
}

impl Default for Hub {
    fn default() -> Self {
        Hub {
            live: broadcast::channel(256).0,
            alerts: Mutex::new(BTreeMap::new()),
            downloads: Downloads::default(),
            reachable: AtomicBool::new(true),
            watchers: AtomicUsize::new(0),
        }
    }
}

fn optional(event: &Value, key: &str) -> Option<String> {
    event.get(key).and_then(Value::as_str).map(str::to_owned)
}

impl Hub {
    fn alerts(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Alert>> {
        // Each alert stands alone: a panic elsewhere cannot leave the map inconsistent.
        self.alerts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one event of the operator's subscription. `operator` is the console's own
    /// operator: its reads (each one audited) are not news, and telling the pages about them
    /// would make them read again, forever.
    pub(crate) fn handle(&self, topic: &str, event: Value, operator: &str) {
        let Some(Topic::Event(_, kind)) = Topic::parse(topic) else {
            return;
        };
        let kind = match kind {
            EventKind::Stations if text(&event, "event") == "update_progress" => {
                // Peer input: a malformed one is dropped here, before any page sees it.
                let Some(progress) = Progress::of_event(&event) else {
                    return;
                };
                self.downloads.note(progress);
                LiveKind::Progress
            }
            EventKind::Stations => {
                let station = &event["station"];
                if station["removed"] == Value::Bool(true) {
                    self.alerts().remove(text(station, "serial"));
                    self.downloads.forget(text(station, "serial"));
                }
                LiveKind::Stations
            }
            EventKind::Phones => LiveKind::Phones,
            EventKind::Audit => {
                if text(&event, "actor") == operator && names_a_read(text(&event, "action")) {
                    return;
                }
                LiveKind::Audit
            }
            EventKind::Security => {
                if text(&event, "event") == "identity_mismatch" {
                    let alert = Alert {
                        time: text(&event, "time").to_owned(),
                        pinned: optional(&event, "pinned"),
                        presented: optional(&event, "presented"),
                        ip: optional(&event, "ip"),
                        advice: optional(&event, "advice")
                            .or_else(|| optional(&event, "detail"))
                            .unwrap_or_default(),
                    };
                    self.alerts()
                        .insert(text(&event, "serial").to_owned(), alert);
                }
                LiveKind::Security
            }
        };
        // No open page is no error.
        let _ = self.live.send(Live { kind, event });
    }

    /// The open pages' feed.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<Live> {
        self.live.subscribe()
    }

    /// The alert of station `serial`, if its key changed.
    pub(crate) fn alert(&self, serial: &str) -> Option<Alert> {
        self.alerts().get(serial).cloned()
    }

    /// The serials with alerts.
    pub(crate) fn alerted(&self) -> Vec<String> {
        self.alerts().keys().cloned().collect()
    }

    /// Raises the alerts of identity mismatches that fleetd audited (refused connections of
    /// authorized stations with another key) among `records`, oldest first: the events of
    /// before the console started. A newer alert of the same station wins.
    pub(crate) fn recall(&self, records: &[Value]) {
        for record in records {
            let reason = text(record, "reason");
            let serial = text(record, "device");
            if text(record, "outcome") != "refused"
                || !reason.starts_with("identity mismatch")
                || serial.is_empty()
            {
                continue;
            }
            let between = |from: &str, to: char| {
                let start = reason.find(from)? + from.len();
                let rest = &reason[start..];
                Some(rest[..rest.find(to).unwrap_or(rest.len())].to_owned())
            };
            // The actor of a `connect` record is the peer's `ip:port`.
            let actor = text(record, "actor");
            let ip = actor
                .rsplit_once(':')
                .map(|(ip, _)| ip.trim_matches(['[', ']']).to_owned());
            let alert = Alert {
                time: text(record, "time").to_owned(),
                pinned: between("authorized with key ", ' '),
                presented: between("presented key ", ';'),
                ip,
                advice: String::new(),
            };
            self.alerts().insert(serial.to_owned(), alert);
        }
    }

    /// Forgets the alerts that `stations` (fleetd's current objects, all of them or some)
    /// show to be over: the station is gone, no longer authorized, or authorized with another
    /// key than the one the refused connection did not present (removed and accepted again).
    pub(crate) fn prune(&self, stations: &[Value], complete: bool) {
        let authorized = [
            StationState::Running.as_str(),
            StationState::NotRunning.as_str(),
        ];
        self.alerts().retain(|serial, alert| {
            match stations.iter().find(|s| text(s, "serial") == serial) {
                Some(station) => {
                    authorized.contains(&text(station, "state"))
                        && alert
                            .pinned
                            .as_deref()
                            .is_none_or(|p| p == text(station, "fingerprint"))
                }
                None => !complete,
            }
        });
    }

    /// The operator dismissed the alert of `serial`.
    pub(crate) fn dismiss(&self, serial: &str) -> bool {
        self.alerts().remove(serial).is_some()
    }

    /// Whether fleetd answered the last call.
    pub(crate) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::SeqCst)
    }

    /// Notes what a call to fleetd came to; tells the pages when reachability changed.
    pub(crate) fn observe<T>(&self, result: &Result<T, FleetdError>) {
        let reachable = !matches!(result, Err(FleetdError::Unreachable(_)));
        if self.reachable.swap(reachable, Ordering::SeqCst) != reachable {
            let event = serde_json::json!({"reachable": reachable});
            let _ = self.live.send(Live {
                kind: LiveKind::Health,
                event,
            });
        }
    }

    /// A live stream opened (`true`) or closed.
    pub(crate) fn watching(&self, open: bool) {
        if open {
            self.watchers.fetch_add(1, Ordering::SeqCst);
        } else {
            self.watchers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Whether a page is open and following.
    pub(crate) fn watched(&self) -> bool {
        self.watchers.load(Ordering::SeqCst) > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topic(kind: EventKind) -> String {
        Topic::Event("default".into(), kind).to_string()
    }

    #[test]
    fn the_consoles_own_reads_are_not_news() {
        let hub = Hub::default();
        let mut rx = hub.subscribe();
        let read = json!({"actor": "admin", "action": "listStations", "outcome": "ok"});
        hub.handle(&topic(EventKind::Audit), read, "admin");
        assert!(rx.try_recv().is_err());
        let change = json!({"actor": "admin", "action": "acceptStation", "outcome": "ok"});
        hub.handle(&topic(EventKind::Audit), change, "admin");
        assert_eq!(rx.try_recv().unwrap().kind, LiveKind::Audit);
        let other = json!({"actor": "bob", "action": "listStations", "outcome": "ok"});
        hub.handle(&topic(EventKind::Audit), other, "admin");
        assert_eq!(rx.try_recv().unwrap().kind, LiveKind::Audit);
        let status = fleet_protocol::Serial::parse("ST-1").unwrap();
        let status = Topic::station(status, fleet_protocol::StationLeaf::Status).to_string();
        hub.handle(&status, json!({}), "admin");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn an_identity_mismatch_raises_an_alert_until_the_station_is_removed() {
        let hub = Hub::default();
        let event = json!({"event": "identity_mismatch", "serial": "ST-1", "pinned": "AA",
            "presented": null, "ip": "127.0.0.1", "advice": "remove it", "time": "t"});
        hub.handle(&topic(EventKind::Security), event, "admin");
        let alert = hub.alert("ST-1").unwrap();
        assert_eq!(alert.presented, None);
        assert_eq!(alert.advice, "remove it");
        assert_eq!(hub.alerted(), vec!["ST-1".to_owned()]);
        let removed = json!({"event": "state", "station": {"serial": "ST-1", "state": null, "removed": true}});
        hub.handle(&topic(EventKind::Stations), removed, "admin");
        assert_eq!(hub.alert("ST-1"), None);
    }

    #[test]
    fn the_audit_log_recalls_the_mismatches_of_before() {
        let hub = Hub::default();
        let reason = "identity mismatch: station is authorized with key AA but presented key \
                      BB; refused until an operator removes it";
        let records = [
            json!({"action": "connect", "outcome": "refused", "device": "ST-1",
                "actor": "127.0.0.9:5000", "time": "t", "reason": reason}),
            json!({"action": "connect", "outcome": "refused", "device": "ST-2",
                "actor": "127.0.0.9:5001", "time": "t", "reason": "rejected"}),
            json!({"action": "connect", "outcome": "ok", "device": "ST-3",
                "actor": "127.0.0.9:5002", "time": "t", "reason": reason}),
        ];
        hub.recall(&records);
        assert_eq!(hub.alerted(), vec!["ST-1"]);
        let alert = hub.alert("ST-1").unwrap();
        assert_eq!(alert.pinned.as_deref(), Some("AA"));
        assert_eq!(alert.presented.as_deref(), Some("BB"));
        assert_eq!(alert.ip.as_deref(), Some("127.0.0.9"));
    }

    #[test]
    fn an_alert_ends_when_the_station_is_no_longer_authorized_with_that_key() {
        let hub = Hub::default();
        let mismatch = |serial: &str| {
            json!({"event": "identity_mismatch", "serial": serial,
            "pinned": "AA", "presented": "BB", "time": "t"})
        };
        for serial in ["ST-1", "ST-2", "ST-3", "ST-4"] {
            hub.handle(&topic(EventKind::Security), mismatch(serial), "admin");
        }
        let stations = [
            json!({"serial": "ST-1", "state": "running", "fingerprint": "AA"}),
            json!({"serial": "ST-2", "state": "running", "fingerprint": "CC"}),
            json!({"serial": "ST-3", "state": "unauthorized", "fingerprint": "BB"}),
        ];
        hub.prune(&stations[1..2], false);
        assert_eq!(hub.alerted(), vec!["ST-1", "ST-3", "ST-4"]);
        hub.prune(&stations, true);
        assert_eq!(hub.alerted(), vec!["ST-1"]);
    }

    #[test]
    fn progress_is_kept_per_station_and_a_malformed_one_is_dropped() {
        let hub = Hub::default();
        let mut rx = hub.subscribe();
        let bad = json!({"event": "update_progress", "serial": "ST-1", "received": 5, "size": 0});
        hub.handle(&topic(EventKind::Stations), bad, "admin");
        assert!(rx.try_recv().is_err());
        assert_eq!(hub.downloads.of("ST-1"), None);
        let good = json!({"event": "update_progress", "serial": "ST-1", "version": "6.1.0",
            "received": 5, "size": 10, "time": "t"});
        hub.handle(&topic(EventKind::Stations), good, "admin");
        assert_eq!(rx.try_recv().unwrap().kind, LiveKind::Progress);
        assert_eq!(hub.downloads.of("ST-1").unwrap().percent(), 50);
        let removed = json!({"event": "state", "station": {"serial": "ST-1", "removed": true}});
        hub.handle(&topic(EventKind::Stations), removed, "admin");
        assert_eq!(hub.downloads.of("ST-1"), None);
    }

    #[test]
    fn reachability_changes_are_told_once() {
        let hub = Hub::default();
        let mut rx = hub.subscribe();
        hub.observe::<()>(&Ok(()));
        assert!(rx.try_recv().is_err());
        hub.observe::<()>(&Err(FleetdError::Unreachable("down".into())));
        hub.observe::<()>(&Err(FleetdError::Unreachable("down".into())));
        assert!(!hub.reachable());
        assert_eq!(rx.try_recv().unwrap().kind, LiveKind::Health);
        assert!(rx.try_recv().is_err());
        let refused = FleetdError::Refused {
            code: "not_found".into(),
            error: "no".into(),
        };
        hub.observe::<()>(&Err(refused));
        assert!(hub.reachable());
    }
}
