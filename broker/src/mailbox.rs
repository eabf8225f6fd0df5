//! Mailboxes: the topics on which only the controller speaks to one session (the admission
//! names them in [`crate::Rights::mailbox`]). Messages to them are delivered by the front door
//! straight to the session instead of through rumqttd's router: the router matches every new
//! topic against every filter, and every new filter against every topic and retained message, so
//! one filter per device made onboarding quadratic in the fleet's size (BENCHMARKS.md). This
//! module says which QoS a delivery gets. Pure: no I/O.

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
    fn wildcard_subscriptions_reach_mailboxes_too_with_the_highest_qos() {
        let filters = [("devices/S1/#".to_owned(), 0)];
        assert_eq!(delivery_qos("devices/S1/cmd", filters.iter()), Some(0));
        assert_eq!(delivery_qos("devices/S2/cmd", filters.iter()), None);
        let both = [
            ("devices/S1/cmd".to_owned(), 1),
            ("devices/S1/#".to_owned(), 0),
        ];
        assert_eq!(delivery_qos("devices/S1/cmd", both.iter()), Some(1));
        assert_eq!(
            delivery_qos("devices/S1/firmware/chunk", both.iter()),
            Some(0)
        );
        assert_eq!(delivery_qos("devices/S1/cmd", [].iter()), None);
    }
}
