//! The fleet's MQTT topics (PROTOCOL §3): one enum with one parser and one `Display`, the
//! subscription filters made of them, and which topics are a device's mailbox.

use std::fmt;

use crate::ids::{Mac, Serial};

/// Root level of station topics.
const STATIONS: &str = "stations";
/// Root level of phone topics.
const PHONES: &str = "phones";
/// Root level of operator topics.
const FLEET: &str = "fleet";

/// A leaf under `stations/<serial>/` that has one meaning (data topics aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StationLeaf {
    /// `auth/request`: station → controller, the station announces itself.
    AuthRequest,
    /// `cmd`: controller → station.
    Cmd,
    /// `status`: the station's retained status, and its will.
    Status,
    /// `firmware/request`: the station asks for a piece of an image.
    FirmwareRequest,
    /// `firmware/chunk`: controller → station, a piece of an image.
    FirmwareChunk,
}

impl StationLeaf {
    /// Every leaf, in PROTOCOL §3's order.
    pub const ALL: [StationLeaf; 5] = [
        StationLeaf::AuthRequest,
        StationLeaf::Cmd,
        StationLeaf::Status,
        StationLeaf::FirmwareRequest,
        StationLeaf::FirmwareChunk,
    ];

    /// The leaf's levels, as in the topic.
    pub fn as_str(self) -> &'static str {
        match self {
            StationLeaf::AuthRequest => "auth/request",
            StationLeaf::Cmd => "cmd",
            StationLeaf::Status => "status",
            StationLeaf::FirmwareRequest => "firmware/request",
            StationLeaf::FirmwareChunk => "firmware/chunk",
        }
    }

    fn parse(text: &str) -> Option<StationLeaf> {
        StationLeaf::ALL.into_iter().find(|l| l.as_str() == text)
    }
}

/// A leaf under `phones/<mac>/` that has one meaning (data topics aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhoneLeaf {
    /// `provision/request`: phone → controller, with its CSR.
    ProvisionRequest,
    /// `provision/response`: controller → phone, its certificate or an error.
    ProvisionResponse,
    /// `provision/complete`: phone → controller, it stored what it was given.
    ProvisionComplete,
}

impl PhoneLeaf {
    /// Every leaf, in PROTOCOL §3's order.
    pub const ALL: [PhoneLeaf; 3] = [
        PhoneLeaf::ProvisionRequest,
        PhoneLeaf::ProvisionResponse,
        PhoneLeaf::ProvisionComplete,
    ];

    /// The leaf's levels, as in the topic.
    pub fn as_str(self) -> &'static str {
        match self {
            PhoneLeaf::ProvisionRequest => "provision/request",
            PhoneLeaf::ProvisionResponse => "provision/response",
            PhoneLeaf::ProvisionComplete => "provision/complete",
        }
    }

    fn parse(text: &str) -> Option<PhoneLeaf> {
        PhoneLeaf::ALL.into_iter().find(|l| l.as_str() == text)
    }
}

/// What a `fleet/events/<tenant>/<kind>` message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventKind {
    /// A station's state changed, or a station sent something wrong.
    Stations,
    /// A phone's state changed.
    Phones,
    /// An audit record (PROTOCOL §7).
    Audit,
    /// A security event, such as `identity_mismatch`.
    Security,
}

impl EventKind {
    /// Every kind.
    pub const ALL: [EventKind; 4] = [
        EventKind::Stations,
        EventKind::Phones,
        EventKind::Audit,
        EventKind::Security,
    ];

    /// The kind's topic level.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Stations => "stations",
            EventKind::Phones => "phones",
            EventKind::Audit => "audit",
            EventKind::Security => "security",
        }
    }

    fn parse(text: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == text)
    }
}

/// One topic of the fleet (PROTOCOL §3). `Display` writes it; [`Topic::parse`] reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    /// `stations/<serial>/auth/request`
    StationAuthRequest(Serial),
    /// `stations/<serial>/cmd`
    StationCmd(Serial),
    /// `stations/<serial>/status`
    StationStatus(Serial),
    /// `stations/<serial>/firmware/request`
    StationFirmwareRequest(Serial),
    /// `stations/<serial>/firmware/chunk`
    StationFirmwareChunk(Serial),
    /// `stations/<serial>/data` followed by `/<rest>` unless `rest` is empty: application data.
    StationData(Serial, String),
    /// `phones/<mac>/provision/request`
    PhoneProvisionRequest(Mac),
    /// `phones/<mac>/provision/response`
    PhoneProvisionResponse(Mac),
    /// `phones/<mac>/provision/complete`
    PhoneProvisionComplete(Mac),
    /// `phones/<mac>/data` followed by `/<rest>` unless `rest` is empty: application data.
    PhoneData(Mac, String),
    /// `fleet/control/<operator>/request`
    OperatorRequest(String),
    /// `fleet/control/<operator>/response`
    OperatorResponse(String),
    /// `fleet/events/<tenant>/<kind>`
    Event(String, EventKind),
}

impl Topic {
    /// The station topic `stations/<serial>/<leaf>`.
    pub fn station(serial: Serial, leaf: StationLeaf) -> Topic {
        match leaf {
            StationLeaf::AuthRequest => Topic::StationAuthRequest(serial),
            StationLeaf::Cmd => Topic::StationCmd(serial),
            StationLeaf::Status => Topic::StationStatus(serial),
            StationLeaf::FirmwareRequest => Topic::StationFirmwareRequest(serial),
            StationLeaf::FirmwareChunk => Topic::StationFirmwareChunk(serial),
        }
    }

    /// The phone topic `phones/<mac>/<leaf>`.
    pub fn phone(mac: Mac, leaf: PhoneLeaf) -> Topic {
        match leaf {
            PhoneLeaf::ProvisionRequest => Topic::PhoneProvisionRequest(mac),
            PhoneLeaf::ProvisionResponse => Topic::PhoneProvisionResponse(mac),
            PhoneLeaf::ProvisionComplete => Topic::PhoneProvisionComplete(mac),
        }
    }

    /// Reads a topic name; `None` if it is no topic of the fleet, or names a serial, MAC,
    /// operator or tenant of the wrong form (a MAC must be in its normalised form here).
    pub fn parse(text: &str) -> Option<Topic> {
        let mut levels = text.splitn(3, '/');
        let (root, id, rest) = (levels.next()?, levels.next()?, levels.next()?);
        match root {
            STATIONS => {
                let serial = Serial::parse(id).ok()?;
                if let Some(leaf) = StationLeaf::parse(rest) {
                    return Some(Topic::station(serial, leaf));
                }
                data_rest(rest).map(|rest| Topic::StationData(serial, rest.to_owned()))
            }
            PHONES => {
                let mac = Mac::parse_normalised(id).ok()?;
                if let Some(leaf) = PhoneLeaf::parse(rest) {
                    return Some(Topic::phone(mac, leaf));
                }
                data_rest(rest).map(|rest| Topic::PhoneData(mac, rest.to_owned()))
            }
            FLEET => {
                let (name, leaf) = rest.split_once('/')?;
                if !is_name_level(name) {
                    return None;
                }
                match (id, leaf) {
                    ("control", "request") => Some(Topic::OperatorRequest(name.to_owned())),
                    ("control", "response") => Some(Topic::OperatorResponse(name.to_owned())),
                    ("events", kind) => {
                        EventKind::parse(kind).map(|k| Topic::Event(name.into(), k))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// The client id of the one device whose mailbox this topic is: the topics on which only
    /// the controller speaks to one device (`stations/<serial>/cmd`, `…/firmware/chunk`,
    /// `phones/<mac>/provision/response`). Messages to them bypass the router.
    pub fn mailbox_owner(&self) -> Option<String> {
        match self {
            Topic::StationCmd(serial) | Topic::StationFirmwareChunk(serial) => {
                Some(serial.client_id())
            }
            Topic::PhoneProvisionResponse(mac) => Some(mac.client_id()),
            _ => None,
        }
    }
}

/// `data` or `data/<rest>`: the rest, empty for the bare `data`.
fn data_rest(levels: &str) -> Option<&str> {
    match levels.strip_prefix("data") {
        Some("") => Some(""),
        Some(rest) => rest.strip_prefix('/').filter(|rest| !rest.is_empty()),
        None => None,
    }
}

/// A topic level that names someone: not empty, no wildcard.
fn is_name_level(level: &str) -> bool {
    !level.is_empty() && !level.contains(['+', '#', '/'])
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let data = |f: &mut fmt::Formatter<'_>, root: &str, id: &str, rest: &str| {
            if rest.is_empty() {
                write!(f, "{root}/{id}/data")
            } else {
                write!(f, "{root}/{id}/data/{rest}")
            }
        };
        match self {
            Topic::StationAuthRequest(s) => station(f, s, StationLeaf::AuthRequest),
            Topic::StationCmd(s) => station(f, s, StationLeaf::Cmd),
            Topic::StationStatus(s) => station(f, s, StationLeaf::Status),
            Topic::StationFirmwareRequest(s) => station(f, s, StationLeaf::FirmwareRequest),
            Topic::StationFirmwareChunk(s) => station(f, s, StationLeaf::FirmwareChunk),
            Topic::StationData(s, rest) => data(f, STATIONS, s.as_str(), rest),
            Topic::PhoneProvisionRequest(m) => phone(f, m, PhoneLeaf::ProvisionRequest),
            Topic::PhoneProvisionResponse(m) => phone(f, m, PhoneLeaf::ProvisionResponse),
            Topic::PhoneProvisionComplete(m) => phone(f, m, PhoneLeaf::ProvisionComplete),
            Topic::PhoneData(m, rest) => data(f, PHONES, m.as_str(), rest),
            Topic::OperatorRequest(name) => write!(f, "{FLEET}/control/{name}/request"),
            Topic::OperatorResponse(name) => write!(f, "{FLEET}/control/{name}/response"),
            Topic::Event(tenant, kind) => write!(f, "{FLEET}/events/{tenant}/{}", kind.as_str()),
        }
    }
}

fn station(f: &mut fmt::Formatter<'_>, serial: &Serial, leaf: StationLeaf) -> fmt::Result {
    write!(f, "{STATIONS}/{serial}/{}", leaf.as_str())
}

fn phone(f: &mut fmt::Formatter<'_>, mac: &Mac, leaf: PhoneLeaf) -> fmt::Result {
    write!(f, "{PHONES}/{mac}/{}", leaf.as_str())
}

/// A subscription filter of the fleet: the wildcard filters that rights and subscriptions use.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Filter {
    /// `stations/<serial>/#`: everything of one station.
    StationTree(Serial),
    /// `stations/<serial>/firmware/#`: one station's firmware transfer.
    StationFirmware(Serial),
    /// `phones/<mac>/data/#`: one phone's application data.
    PhoneData(Mac),
    /// `fleet/events/<tenant>/#`: every event of one tenant.
    Events(String),
    /// `stations/+/<leaf>`: one leaf of every station (for tests and tools: no client may
    /// subscribe to it).
    EveryStation(StationLeaf),
    /// `phones/+/<leaf>`: one leaf of every phone (likewise).
    EveryPhone(PhoneLeaf),
    /// `fleet/events/#`: every event of every tenant. No operator may subscribe to it; the
    /// name exists for tests and tools that check exactly that.
    AllEvents,
}

impl Filter {
    /// The prefix every topic of `fleet/events/<tenant>/` starts with, slash included.
    pub fn events_prefix(tenant: &str) -> String {
        format!("{FLEET}/events/{tenant}/")
    }
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Filter::StationTree(s) => write!(f, "{STATIONS}/{s}/#"),
            Filter::StationFirmware(s) => write!(f, "{STATIONS}/{s}/firmware/#"),
            Filter::PhoneData(m) => write!(f, "{PHONES}/{m}/data/#"),
            Filter::Events(tenant) => write!(f, "{}#", Filter::events_prefix(tenant)),
            Filter::EveryStation(leaf) => write!(f, "{STATIONS}/+/{}", leaf.as_str()),
            Filter::EveryPhone(leaf) => write!(f, "{PHONES}/+/{}", leaf.as_str()),
            Filter::AllEvents => write!(f, "{FLEET}/events/#"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn serial(s: &str) -> Serial {
        Serial::parse(s).unwrap()
    }

    fn mac(m: &str) -> Mac {
        Mac::parse(m).unwrap()
    }

    #[test]
    fn topics_are_written_as_protocol_section_3_names_them() {
        let s = || serial("S1");
        let m = || mac("0011aabbccdd");
        let cases = [
            (Topic::StationAuthRequest(s()), "stations/S1/auth/request"),
            (Topic::StationCmd(s()), "stations/S1/cmd"),
            (Topic::StationStatus(s()), "stations/S1/status"),
            (
                Topic::StationFirmwareRequest(s()),
                "stations/S1/firmware/request",
            ),
            (
                Topic::StationFirmwareChunk(s()),
                "stations/S1/firmware/chunk",
            ),
            (
                Topic::StationData(s(), "a/b".into()),
                "stations/S1/data/a/b",
            ),
            (Topic::StationData(s(), String::new()), "stations/S1/data"),
            (
                Topic::PhoneProvisionRequest(m()),
                "phones/0011aabbccdd/provision/request",
            ),
            (
                Topic::PhoneProvisionResponse(m()),
                "phones/0011aabbccdd/provision/response",
            ),
            (
                Topic::PhoneProvisionComplete(m()),
                "phones/0011aabbccdd/provision/complete",
            ),
            (
                Topic::PhoneData(m(), "x".into()),
                "phones/0011aabbccdd/data/x",
            ),
            (
                Topic::OperatorRequest("admin".into()),
                "fleet/control/admin/request",
            ),
            (
                Topic::OperatorResponse("admin".into()),
                "fleet/control/admin/response",
            ),
            (
                Topic::Event("acme".into(), EventKind::Security),
                "fleet/events/acme/security",
            ),
        ];
        for (topic, text) in cases {
            assert_eq!(topic.to_string(), text);
            assert_eq!(Topic::parse(text), Some(topic), "{text}");
        }
    }

    #[test]
    fn what_is_no_topic_of_the_fleet_does_not_parse() {
        for text in [
            "",
            "stations",
            "stations/S1",
            "stations/S1/",
            "stations/S_1/cmd",
            "stations/+/cmd",
            "stations/S1/cmdx",
            "stations/S1/datax",
            "stations/S1/firmware",
            "phones/0011AABBCCDD/provision/request",
            "phones/00:11:aa:bb:cc:dd/provision/request",
            "fleet/control/+/request",
            "fleet/control//request",
            "fleet/control/admin/other",
            "fleet/events/acme/other",
            "fleet/events/acme",
            "other/S1/cmd",
        ] {
            assert_eq!(Topic::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn only_the_controllers_one_to_one_topics_are_mailboxes() {
        let owner = |t: &str| Topic::parse(t).and_then(|t| t.mailbox_owner());
        assert_eq!(owner("stations/S1/cmd").as_deref(), Some("station-S1"));
        assert_eq!(
            owner("stations/S1/firmware/chunk").as_deref(),
            Some("station-S1")
        );
        assert_eq!(
            owner("phones/0011aabbccdd/provision/response").as_deref(),
            Some("phone-0011aabbccdd")
        );
        for not_one in [
            "stations/S1/status",
            "stations/S1/firmware/request",
            "stations/S1/data/cmd",
            "stations/S1/cmd/x",
            "stations/+/cmd",
            "stations/S1/#",
            "",
            "phones/0011aabbccdd/provision/request",
            "fleet/control/admin/response",
        ] {
            assert_eq!(owner(not_one), None, "{not_one}");
        }
    }

    #[test]
    fn filters_are_written_as_rights_name_them() {
        assert_eq!(
            Filter::StationTree(serial("S1")).to_string(),
            "stations/S1/#"
        );
        assert_eq!(
            Filter::StationFirmware(serial("S1")).to_string(),
            "stations/S1/firmware/#"
        );
        assert_eq!(
            Filter::PhoneData(mac("0011aabbccdd")).to_string(),
            "phones/0011aabbccdd/data/#"
        );
        assert_eq!(
            Filter::Events("acme".into()).to_string(),
            "fleet/events/acme/#"
        );
        assert_eq!(Filter::AllEvents.to_string(), "fleet/events/#");
        assert_eq!(
            Filter::EveryStation(StationLeaf::AuthRequest).to_string(),
            "stations/+/auth/request"
        );
        assert_eq!(
            Filter::EveryPhone(PhoneLeaf::ProvisionComplete).to_string(),
            "phones/+/provision/complete"
        );
    }

    proptest! {
        #[test]
        fn every_station_and_phone_topic_round_trips(
            s in "[A-Za-z0-9-]{1,64}",
            m in "[0-9a-f]{12}",
            rest in "[a-z]{1,5}(/[a-z]{1,5}){0,2}",
            leaf in 0usize..5,
            phone_leaf in 0usize..3,
        ) {
            let topics = [
                Topic::station(serial(&s), StationLeaf::ALL[leaf]),
                Topic::StationData(serial(&s), rest.clone()),
                Topic::phone(mac(&m), PhoneLeaf::ALL[phone_leaf]),
                Topic::PhoneData(mac(&m), rest),
            ];
            for topic in topics {
                prop_assert_eq!(Topic::parse(&topic.to_string()), Some(topic));
            }
        }

        #[test]
        fn parsing_any_text_never_panics(text in "\\PC{0,80}") {
            if let Some(topic) = Topic::parse(&text) {
                prop_assert_eq!(topic.to_string(), text);
            }
        }
    }
}
