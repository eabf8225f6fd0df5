//! Per-topic rights: the pure decision whether a client may publish to a topic or subscribe to a
//! filter. No I/O; the front door asks on every PUBLISH and SUBSCRIBE.

/// What a client may do, as MQTT topic filters (`+` and `#` allowed in patterns).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rights {
    /// Topics the client may publish to (patterns).
    pub publish: Vec<String>,
    /// Exceptions to `publish` (patterns): a topic matching one of these is denied.
    pub publish_deny: Vec<String>,
    /// Filters the client may subscribe to: a requested filter must be covered whole by one.
    pub subscribe: Vec<String>,
    /// Topics (patterns) whose PUBLISHes go straight to the [`crate::Admission`]'s
    /// `message`, tagged with the session that sent them, instead of through the router:
    /// whoever else subscribes to them hears nothing. A topic must also be allowed by
    /// `publish` to be accepted at all.
    pub inbox: Vec<String>,
    /// Exact filters the front door grants itself when the client subscribes to them (its
    /// mailboxes): the router never hears of them, and messages for them arrive through
    /// [`crate::SessionControl::deliver`]. Each must also be allowed by `subscribe`.
    pub mailbox: Vec<String>,
    /// Whether the client's PUBLISHes (and its will) may be retained. Without it the retain
    /// flag is cleared before the router sees the message, so nothing it publishes outlives
    /// its session for a later subscriber.
    pub retain: bool,
}

impl Rights {
    /// No rights at all: a revoked session.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every topic. Only for in-process service links, never for a network client.
    pub fn danger_everything() -> Self {
        Rights {
            publish: vec!["#".into()],
            publish_deny: vec![],
            subscribe: vec!["#".into()],
            inbox: vec![],
            mailbox: vec![],
            retain: true,
        }
    }

    /// Whether a PUBLISH to `topic` (already allowed) goes to the admission's inbox.
    pub fn is_inbox(&self, topic: &str) -> bool {
        self.inbox.iter().any(|p| topic_matches(p, topic))
    }

    /// Whether `filter` is exactly one of the client's mailboxes.
    pub fn is_mailbox(&self, filter: &str) -> bool {
        self.mailbox.iter().any(|m| m == filter)
    }

    /// Whether the client may publish to `topic` (a concrete topic name, no wildcards).
    pub fn may_publish(&self, topic: &str) -> bool {
        if !valid_topic_name(topic) {
            return false;
        }
        self.publish.iter().any(|p| topic_matches(p, topic))
            && !self.publish_deny.iter().any(|p| topic_matches(p, topic))
    }

    /// Whether the client may subscribe to `filter`: every topic the filter can match must be
    /// inside one allowed pattern. A wildcard that reaches past the rights is denied whole.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        valid_filter(filter) && self.subscribe.iter().any(|p| filter_covers(p, filter))
    }
}

/// A topic name a client may publish to: non-empty, no wildcards, no NUL, not a `$` topic.
pub fn valid_topic_name(topic: &str) -> bool {
    !topic.is_empty()
        && !topic.starts_with('$')
        && !topic.contains(['+', '#', '\0'])
        && topic.len() <= 65_535
}

/// A well-formed subscription filter: `#` only as the whole last level, `+` only as a whole
/// level, no NUL, not a `$` topic (they misbehave in rumqttd and the contract uses none), no
/// shared subscriptions.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.starts_with('$') || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['+', '#']),
    })
}

/// Whether the concrete `topic` matches the filter `pattern`.
pub fn topic_matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('/');
    let mut t = topic.split('/');
    loop {
        match (p.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(tl)) if pl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic matched by `filter` is also matched by `pattern`.
pub fn filter_covers(pattern: &str, filter: &str) -> bool {
    let mut p = pattern.split('/');
    let mut f = filter.split('/');
    loop {
        match (p.next(), f.next()) {
            (Some("#"), _) => return true,
            // `a/#` also matches `a` itself: only a `#` in the pattern covers that.
            (_, Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(pl), Some(fl)) if pl == fl && fl != "+" => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn station(serial: &str) -> Rights {
        Rights {
            publish: vec![format!("devices/{serial}/#")],
            publish_deny: vec![format!("devices/{serial}/cmd")],
            subscribe: vec![format!("devices/{serial}/#")],
            ..Rights::default()
        }
    }

    #[test]
    fn authorized_station_may_use_its_own_tree_but_not_publish_cmd() {
        let r = station("S1");
        assert!(r.may_publish("devices/S1/status"));
        assert!(r.may_publish("devices/S1/data/x/y"));
        assert!(!r.may_publish("devices/S1/cmd"));
        assert!(!r.may_publish("devices/S2/status"));
        assert!(r.may_subscribe("devices/S1/cmd"));
        assert!(r.may_subscribe("devices/S1/#"));
        assert!(r.may_subscribe("devices/S1/+/x"));
        assert!(!r.may_subscribe("devices/+/cmd"));
        assert!(!r.may_subscribe("#"));
        assert!(!r.may_subscribe("devices/#"));
    }

    #[test]
    fn wildcards_in_published_topics_are_refused() {
        let r = Rights::danger_everything();
        assert!(!r.may_publish("a/+"));
        assert!(!r.may_publish("a/#"));
        assert!(!r.may_publish(""));
        assert!(!r.may_publish("$SYS/x"));
        assert!(r.may_publish("a/b"));
    }

    #[test]
    fn malformed_filters_are_refused() {
        let r = Rights::danger_everything();
        for f in ["", "a/#/b", "a#", "a/b+", "$SYS/#", "$share/g/a"] {
            assert!(!r.may_subscribe(f), "{f}");
        }
        for f in ["#", "+", "a/+/b", "a/#", "+/+/#"] {
            assert!(r.may_subscribe(f), "{f}");
        }
    }

    #[test]
    fn a_filter_on_the_parent_level_is_not_covered_by_a_deeper_pattern() {
        assert!(!filter_covers("a/b/+", "a/b/#"));
        assert!(filter_covers("a/b/#", "a/b/#"));
        assert!(!filter_covers("a/b", "a/+"));
        assert!(filter_covers("a/+", "a/b"));
        assert!(filter_covers("a/+", "a/+"));
    }

    #[test]
    fn pending_station_rights_are_exact() {
        let r = Rights {
            publish: vec!["devices/S1/auth/request".into(), "devices/S1/status".into()],
            publish_deny: vec![],
            subscribe: vec!["devices/S1/cmd".into()],
            ..Rights::default()
        };
        assert!(r.may_publish("devices/S1/auth/request"));
        assert!(!r.may_publish("devices/S1/data/x"));
        assert!(r.may_subscribe("devices/S1/cmd"));
        assert!(!r.may_subscribe("devices/S1/#"));
        assert!(!r.may_subscribe("devices/S1/+"));
    }

    fn level() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("+".to_string()),
            Just("#".to_string())
        ]
    }

    fn filter() -> impl Strategy<Value = String> {
        proptest::collection::vec(level(), 1..5)
            .prop_map(|l| l.join("/"))
            .prop_filter("valid", |f| valid_filter(f))
    }

    fn topic() -> impl Strategy<Value = String> {
        proptest::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..6)
            .prop_map(|l| l.join("/"))
    }

    proptest! {
        /// If a pattern covers a filter, every topic the filter matches is matched by the pattern.
        #[test]
        fn covering_is_sound(p in filter(), f in filter(), t in topic()) {
            if filter_covers(&p, &f) && topic_matches(&f, &t) {
                prop_assert!(topic_matches(&p, &t), "{p} covers {f} but not {t}");
            }
        }

        #[test]
        fn every_filter_covers_itself(f in filter()) {
            prop_assert!(filter_covers(&f, &f));
        }
    }
}
