//! The tenants' IP whitelists (PROTOCOL §5): permanent addresses and CIDR ranges set by
//! operators, and the temporary list that a correct PAP or a provisioning fills for 8 hours.
//!
//! Pure: the shell passes `now` and the duration, and stores the result.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime, UtcOffset};

/// Why a text is not a whitelist entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("whitelist entry {input:?} is not an IP address or a CIDR range: {reason}")]
pub struct WhitelistError {
    pub input: String,
    pub reason: String,
}

/// One permanent whitelist entry: an IPv4 or IPv6 address (a host network) or a CIDR range,
/// normalised (host bits cleared; IPv4-mapped IPv6 written as IPv4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WhitelistEntry(IpNet);

impl WhitelistEntry {
    /// Parses `203.0.113.7`, `203.0.113.0/24`, `2001:db8::1` or `2001:db8::/32`.
    pub fn parse(text: &str) -> Result<WhitelistEntry, WhitelistError> {
        let error = |reason: String| WhitelistError {
            input: shorten(text),
            reason,
        };
        let net = if text.contains('/') {
            IpNet::from_str(text).map_err(|e| error(e.to_string()))?
        } else {
            IpNet::from(IpAddr::from_str(text).map_err(|e| error(e.to_string()))?)
        };
        Ok(WhitelistEntry::from_net(net))
    }

    /// The entry for a network, normalised.
    pub fn from_net(net: IpNet) -> WhitelistEntry {
        let net = net.trunc();
        // ::ffff:a.b.c.d/96+n is the IPv4 range a.b.c.d/n; clients are compared as IPv4.
        if let IpNet::V6(v6) = net {
            if let (Some(v4), Some(prefix)) =
                (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
            {
                if let Ok(v4) = Ipv4Net::new(v4, prefix) {
                    return WhitelistEntry(IpNet::V4(v4));
                }
            }
        }
        WhitelistEntry(net)
    }

    pub fn net(&self) -> IpNet {
        self.0
    }

    /// Whether the address is in this entry; IPv4-mapped IPv6 addresses count as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip.to_canonical())
    }
}

impl fmt::Display for WhitelistEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.prefix_len() == self.0.max_prefix_len() {
            write!(f, "{}", self.0.addr())
        } else {
            write!(f, "{}", self.0)
        }
    }
}

impl FromStr for WhitelistEntry {
    type Err = WhitelistError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        WhitelistEntry::parse(text)
    }
}

impl Serialize for WhitelistEntry {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for WhitelistEntry {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        WhitelistEntry::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// When a temporary whitelisting ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Temporary {
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
}

/// Every tenant's permanent and temporary whitelist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Whitelists {
    #[serde(default)]
    permanent: BTreeMap<String, BTreeSet<WhitelistEntry>>,
    /// Addresses kept canonical (`to_canonical`), so one client has one key.
    #[serde(default)]
    temporary: BTreeMap<String, BTreeMap<IpAddr, Temporary>>,
}

impl Whitelists {
    /// Adds a permanent entry; false if it was there already.
    pub fn add_permanent(&mut self, tenant: &str, entry: WhitelistEntry) -> bool {
        self.permanent
            .entry(tenant.to_owned())
            .or_default()
            .insert(entry)
    }

    /// Removes a permanent entry; false if it was not there.
    pub fn remove_permanent(&mut self, tenant: &str, entry: &WhitelistEntry) -> bool {
        let Some(entries) = self.permanent.get_mut(tenant) else {
            return false;
        };
        let removed = entries.remove(entry);
        if entries.is_empty() {
            self.permanent.remove(tenant);
        }
        removed
    }

    /// Puts `ip` on the tenant's temporary whitelist until `now + duration`; an address that is
    /// on it already keeps the later of the two ends.
    pub fn grant_temporary(
        &mut self,
        tenant: &str,
        ip: IpAddr,
        now: OffsetDateTime,
        duration: Duration,
    ) {
        let expires_at = utc(now + duration);
        let entry = self
            .temporary
            .entry(tenant.to_owned())
            .or_default()
            .entry(ip.to_canonical())
            .or_insert(Temporary { expires_at });
        entry.expires_at = entry.expires_at.max(expires_at);
    }

    /// Extends the temporary whitelisting of `ip` to `now + duration`, only if it is on the
    /// tenant's temporary whitelist now (a provisioning from that IP); true if so.
    pub fn extend_if_temporary(
        &mut self,
        tenant: &str,
        ip: IpAddr,
        now: OffsetDateTime,
        duration: Duration,
    ) -> bool {
        let entry = self
            .temporary
            .get_mut(tenant)
            .and_then(|entries| entries.get_mut(&ip.to_canonical()));
        match entry {
            Some(entry) if entry.expires_at > now => {
                entry.expires_at = entry.expires_at.max(utc(now + duration));
                true
            }
            _ => false,
        }
    }

    /// Whether `ip` needs no PAP for this tenant at `now`: in a permanent entry, or on the
    /// temporary whitelist and not expired.
    pub fn is_whitelisted(&self, tenant: &str, ip: IpAddr, now: OffsetDateTime) -> bool {
        let ip = ip.to_canonical();
        let permanent = self
            .permanent
            .get(tenant)
            .is_some_and(|entries| entries.iter().any(|entry| entry.contains(ip)));
        permanent
            || self
                .temporary
                .get(tenant)
                .and_then(|entries| entries.get(&ip))
                .is_some_and(|entry| entry.expires_at > now)
    }

    /// Drops the temporary whitelistings that ended at or before `now`; how many.
    pub fn expire(&mut self, now: OffsetDateTime) -> usize {
        let mut dropped = 0;
        for entries in self.temporary.values_mut() {
            let before = entries.len();
            entries.retain(|_, entry| entry.expires_at > now);
            dropped += before - entries.len();
        }
        self.temporary.retain(|_, entries| !entries.is_empty());
        dropped
    }

    /// When the next temporary whitelisting ends, for the shell's timer.
    pub fn next_expiry(&self) -> Option<OffsetDateTime> {
        self.temporary
            .values()
            .flat_map(|entries| entries.values())
            .map(|entry| entry.expires_at)
            .min()
    }

    /// The tenant's permanent entries, sorted.
    pub fn permanent(&self, tenant: &str) -> Vec<WhitelistEntry> {
        self.permanent
            .get(tenant)
            .map(|entries| entries.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `listWhitelist` data (PROTOCOL §6): `{"permanent": [entry], "temporary": [{"ip",
    /// "expires_at"}]}`, without what has expired at `now`.
    pub fn list(&self, tenant: &str, now: OffsetDateTime) -> Value {
        let permanent: Vec<String> = self
            .permanent(tenant)
            .iter()
            .map(WhitelistEntry::to_string)
            .collect();
        let temporary: Vec<Value> = self
            .temporary
            .get(tenant)
            .into_iter()
            .flatten()
            .filter(|(_, entry)| entry.expires_at > now)
            .map(|(ip, entry)| {
                json!({
                    "ip": ip.to_string(),
                    "expires_at": rfc3339(entry.expires_at),
                })
            })
            .collect();
        json!({ "permanent": permanent, "temporary": temporary })
    }
}

/// RFC 3339 in UTC; `None` only for a time RFC 3339 cannot write (beyond year 9999).
fn rfc3339(time: OffsetDateTime) -> Option<String> {
    time.to_offset(UtcOffset::UTC).format(&Rfc3339).ok()
}

fn utc(time: OffsetDateTime) -> OffsetDateTime {
    time.to_offset(UtcOffset::UTC)
}

/// Keeps untrusted text quoted in an error message short.
fn shorten(text: &str) -> String {
    const MAX: usize = 80;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2024-03-01 10:00:00 UTC);

    fn entry(text: &str) -> WhitelistEntry {
        WhitelistEntry::parse(text).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn entries_parse_and_normalise() {
        let cases = [
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.7/32", "203.0.113.7"),
            ("203.0.113.0/24", "203.0.113.0/24"),
            ("203.0.113.77/24", "203.0.113.0/24"),
            ("2001:db8::1", "2001:db8::1"),
            ("2001:db8::1/128", "2001:db8::1"),
            ("2001:db8:0:0:1::/32", "2001:db8::/32"),
            ("::ffff:203.0.113.7", "203.0.113.7"),
            ("::ffff:203.0.113.0/120", "203.0.113.0/24"),
        ];
        for (text, shown) in cases {
            let entry = entry(text);
            assert_eq!(entry.to_string(), shown, "{text}");
            assert_eq!(WhitelistEntry::parse(shown).unwrap(), entry);
            let json = serde_json::to_string(&entry).unwrap();
            assert_eq!(json, format!("\"{shown}\""));
            assert_eq!(
                serde_json::from_str::<WhitelistEntry>(&json).unwrap(),
                entry
            );
        }
        assert_eq!(entry("203.0.113.7").net().prefix_len(), 32);
        assert_eq!(entry("2001:db8::1").net().prefix_len(), 128);
    }

    #[test]
    fn bad_entries_are_named_in_the_error() {
        for bad in [
            "",
            "203.0.113",
            "203.0.113.256",
            "203.0.113.0/33",
            "2001:db8::/129",
            "example.com",
            "203.0.113.0/",
            "/24",
            " 203.0.113.7",
        ] {
            let error = WhitelistEntry::parse(bad).unwrap_err();
            assert_eq!(error.input, bad);
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
        assert!(serde_json::from_str::<WhitelistEntry>("\"nope\"").is_err());
    }

    #[test]
    fn permanent_entries_whitelist_addresses_and_ranges() {
        let mut lists = Whitelists::default();
        assert!(lists.add_permanent("a", entry("203.0.113.0/24")));
        assert!(!lists.add_permanent("a", entry("203.0.113.9/24")));
        assert!(lists.add_permanent("a", entry("198.51.100.7")));
        assert!(lists.add_permanent("a", entry("2001:db8:1::/48")));
        assert!(lists.add_permanent("a", entry("2001:db8:2::5")));
        for yes in [
            "203.0.113.0",
            "203.0.113.255",
            "198.51.100.7",
            "2001:db8:1::1",
            "2001:db8:1:ffff::1",
            "2001:db8:2::5",
            // IPv4-mapped IPv6, as a dual-stack listener reports IPv4 clients.
            "::ffff:203.0.113.4",
            "::ffff:198.51.100.7",
        ] {
            assert!(lists.is_whitelisted("a", ip(yes), T0), "{yes}");
        }
        for no in [
            "203.0.114.0",
            "198.51.100.8",
            "2001:db8:2::6",
            "2001:db9::1",
            "::ffff:198.51.100.8",
            "::203.0.113.4",
        ] {
            assert!(!lists.is_whitelisted("a", ip(no), T0), "{no}");
        }
        assert!(lists.remove_permanent("a", &entry("198.51.100.7")));
        assert!(!lists.remove_permanent("a", &entry("198.51.100.7")));
        assert!(!lists.remove_permanent("b", &entry("198.51.100.7")));
        assert!(!lists.is_whitelisted("a", ip("198.51.100.7"), T0));
    }

    #[test]
    fn a_tenant_s_entries_never_whitelist_for_another_tenant() {
        let mut lists = Whitelists::default();
        lists.add_permanent("a", entry("0.0.0.0/0"));
        lists.add_permanent("a", entry("::/0"));
        lists.grant_temporary("a", ip("192.0.2.1"), T0, Duration::hours(8));
        assert!(lists.is_whitelisted("a", ip("192.0.2.1"), T0));
        assert!(lists.is_whitelisted("a", ip("2001:db8::1"), T0));
        for addr in ["192.0.2.1", "203.0.113.7", "2001:db8::1"] {
            assert!(!lists.is_whitelisted("b", ip(addr), T0), "{addr}");
        }
        assert_eq!(
            lists.list("b", T0),
            json!({"permanent": [], "temporary": []})
        );
    }

    #[test]
    fn temporary_whitelisting_lasts_8_hours_and_extends() {
        let eight = Duration::hours(8);
        let mut lists = Whitelists::default();
        let client = ip("192.0.2.1");
        assert!(!lists.extend_if_temporary("a", client, T0, eight));
        lists.grant_temporary("a", client, T0, eight);
        assert!(lists.is_whitelisted("a", client, T0 + Duration::hours(7)));
        assert!(lists.is_whitelisted("a", client, T0 + eight - Duration::seconds(1)));
        assert!(!lists.is_whitelisted("a", client, T0 + eight + Duration::seconds(1)));
        // A provisioning after 6 hours extends by 8 hours from then.
        let later = T0 + Duration::hours(6);
        assert!(lists.extend_if_temporary("a", client, later, eight));
        assert!(lists.is_whitelisted("a", client, T0 + eight + Duration::seconds(1)));
        assert!(lists.is_whitelisted("a", client, later + eight - Duration::seconds(1)));
        assert!(!lists.is_whitelisted("a", client, later + eight + Duration::seconds(1)));
        assert_eq!(lists.next_expiry(), Some(later + eight));
        // Once expired, a provisioning does not bring it back.
        let gone = later + eight + Duration::seconds(1);
        assert!(!lists.extend_if_temporary("a", client, gone, eight));
        // A shorter grant does not cut an existing one short.
        lists.grant_temporary("a", client, later, Duration::minutes(1));
        assert!(lists.is_whitelisted("a", client, later + Duration::hours(7)));
        // Other addresses and tenants are not extended.
        assert!(!lists.extend_if_temporary("a", ip("192.0.2.2"), later, eight));
        assert!(!lists.extend_if_temporary("b", client, later, eight));
    }

    #[test]
    fn temporary_addresses_are_kept_canonical() {
        let mut lists = Whitelists::default();
        lists.grant_temporary("a", ip("::ffff:192.0.2.1"), T0, Duration::hours(8));
        assert!(lists.is_whitelisted("a", ip("192.0.2.1"), T0));
        assert!(lists.is_whitelisted("a", ip("::ffff:192.0.2.1"), T0));
        assert!(lists.extend_if_temporary("a", ip("192.0.2.1"), T0, Duration::hours(9)));
        assert_eq!(
            lists.list("a", T0)["temporary"],
            json!([{"ip": "192.0.2.1", "expires_at": "2024-03-01T19:00:00Z"}])
        );
        lists.grant_temporary("a", ip("2001:db8::7"), T0, Duration::hours(8));
        assert!(lists.is_whitelisted("a", ip("2001:db8::7"), T0));
        assert!(!lists.is_whitelisted("a", ip("2001:db8::8"), T0));
    }

    #[test]
    fn expire_drops_ended_entries_and_list_leaves_them_out() {
        let eight = Duration::hours(8);
        let mut lists = Whitelists::default();
        lists.add_permanent("a", entry("203.0.113.0/24"));
        lists.add_permanent("a", entry("2001:db8::1"));
        lists.grant_temporary("a", ip("192.0.2.1"), T0, eight);
        lists.grant_temporary("a", ip("192.0.2.2"), T0 + Duration::hours(1), eight);
        lists.grant_temporary("b", ip("192.0.2.3"), T0, eight);
        assert_eq!(
            lists.list("a", T0 + Duration::hours(2)),
            json!({
                "permanent": ["203.0.113.0/24", "2001:db8::1"],
                "temporary": [
                    {"ip": "192.0.2.1", "expires_at": "2024-03-01T18:00:00Z"},
                    {"ip": "192.0.2.2", "expires_at": "2024-03-01T19:00:00Z"},
                ],
            })
        );
        let later = T0 + eight + Duration::seconds(1);
        assert_eq!(
            lists.list("a", later)["temporary"],
            json!([{"ip": "192.0.2.2", "expires_at": "2024-03-01T19:00:00Z"}])
        );
        assert_eq!(lists.expire(T0 + Duration::hours(7)), 0);
        assert_eq!(lists.expire(later), 2);
        assert_eq!(lists.next_expiry(), Some(T0 + Duration::hours(9)));
        assert_eq!(lists.expire(later + Duration::hours(1)), 1);
        assert_eq!(lists.next_expiry(), None);
        assert!(!lists.is_whitelisted("a", ip("192.0.2.2"), T0));
        assert!(lists.is_whitelisted("a", ip("203.0.113.200"), later));
    }

    #[test]
    fn whitelists_round_trip_through_json() {
        let mut lists = Whitelists::default();
        lists.add_permanent("a", entry("203.0.113.0/24"));
        lists.add_permanent("b", entry("2001:db8::/32"));
        lists.grant_temporary("a", ip("192.0.2.1"), T0, Duration::hours(8));
        lists.grant_temporary("a", ip("2001:db8::1"), T0, Duration::hours(8));
        let json = serde_json::to_string(&lists).unwrap();
        assert_eq!(serde_json::from_str::<Whitelists>(&json).unwrap(), lists);
        assert_eq!(
            serde_json::from_str::<Whitelists>("{}").unwrap(),
            Whitelists::default()
        );
    }
}
