//! Device mailboxes: the topics on which only the controller speaks to one device
//! (`stations/<serial>/cmd`, `stations/<serial>/firmware/chunk`,
//! `phones/<mac>/provision/response`). Messages to them are delivered by the front door straight
//! to the device's own session instead of through rumqttd's router: the router matches every
//! new topic against every filter, and every new filter against every topic and retained
//! message, so one filter per device made onboarding quadratic in the fleet's size
//! (BENCHMARKS.md). Pure: no I/O.

/// Client id prefixes, as in the controller's identities (PROTOCOL §1).
const STATION_PREFIX: &str = "station-";
const PHONE_PREFIX: &str = "phone-";

/// A topic level that names one device: not empty, no wildcard.
fn is_name(level: &str) -> bool {
    !level.is_empty() && !level.contains(['+', '#'])
}

/// The client id whose mailbox `topic` is, if it is a mailbox topic.
pub fn owner(topic: &str) -> Option<String> {
    let levels: Vec<&str> = topic.split('/').collect();
    match levels.as_slice() {
        ["stations", serial, "cmd"] | ["stations", serial, "firmware", "chunk"]
            if is_name(serial) =>
        {
            Some(format!("{STATION_PREFIX}{serial}"))
        }
        ["phones", mac, "provision", "response"] if is_name(mac) => {
            Some(format!("{PHONE_PREFIX}{mac}"))
        }
        _ => None,
    }
}

/// Whether a SUBSCRIBE filter of `client_id` is exactly one of its own mailboxes: the front door
/// grants it itself and the router never hears of it.
pub fn is_own(client_id: &str, filter: &str) -> bool {
    owner(filter).is_some_and(|owner| owner == client_id)
}

/// The QoS (0, 1 or 2) a message on `topic` is delivered with to a session with these granted
/// filters and their QoS: the highest of the filters that match; `None` if none does.
pub fn delivery_qos<'a>(
    topic: &str,
    filters: impl Iterator<Item = &'a (String, u8)>,
) -> Option<u8> {
    filters
        .filter(|(f, _)| rumqttd::protocol::matches(topic, f))
        .map(|(_, qos)| *qos)
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailbox_topics_and_their_owners() {
        assert_eq!(owner("stations/S1/cmd").as_deref(), Some("station-S1"));
        assert_eq!(
            owner("stations/S1/firmware/chunk").as_deref(),
            Some("station-S1")
        );
        assert_eq!(
            owner("phones/aabbccddeeff/provision/response").as_deref(),
            Some("phone-aabbccddeeff")
        );
        for not_one in [
            "stations/S1/status",
            "stations/S1/auth/request",
            "stations/S1/firmware/request",
            "stations/S1/cmd/x",
            "stations/+/cmd",
            "stations/#",
            "stations//cmd",
            "phones/m/provision/request",
            "fleet/events/default/stations",
            "",
        ] {
            assert_eq!(owner(not_one), None, "{not_one}");
        }
    }

    #[test]
    fn only_the_owner_subscribes_its_mailbox_locally() {
        assert!(is_own("station-S1", "stations/S1/cmd"));
        assert!(!is_own("station-S2", "stations/S1/cmd"));
        assert!(!is_own("station-S1", "stations/S1/#"));
        assert!(!is_own("station-S1", "stations/+/cmd"));
        assert!(is_own("phone-ab", "phones/ab/provision/response"));
        assert!(!is_own("station-ab", "phones/ab/provision/response"));
    }

    #[test]
    fn wildcard_subscriptions_reach_mailboxes_too_with_the_highest_qos() {
        let filters = [("stations/S1/#".to_owned(), 0)];
        assert_eq!(delivery_qos("stations/S1/cmd", filters.iter()), Some(0));
        assert_eq!(delivery_qos("stations/S2/cmd", filters.iter()), None);
        let both = [
            ("stations/S1/cmd".to_owned(), 1),
            ("stations/S1/#".to_owned(), 0),
        ];
        assert_eq!(delivery_qos("stations/S1/cmd", both.iter()), Some(1));
        assert_eq!(
            delivery_qos("stations/S1/firmware/chunk", both.iter()),
            Some(0)
        );
        assert_eq!(delivery_qos("stations/S1/cmd", [].iter()), None);
    }
}
