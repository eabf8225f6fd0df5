//! The tenants' IP whitelists (PROTOCOL §5): permanent addresses and CIDR ranges set by
//! operators, and the temporary list that a correct PAP or a provisioning fills for 8 hours.
//!
//! Pure: the shell passes `now` and the duration, and stores the result.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use time::{Duration, OffsetDateTime};

use crate::times::utc;

pub use fleet_protocol::whitelist::{WhitelistEntry, WhitelistError, WhitelistErrorKind};

/// Whether an operator may add `entry` as a permanent whitelist entry. A range that covers the
/// whole Internet is always refused: it would switch the PAP off for every phone of the tenant,
/// and no one means that. A range with a shorter prefix than `min_v4` (IPv4) or `min_v6`
/// (IPv6) is refused unless `force`: it is more often a typo (`/4` for `/24`) than a wish.
pub fn check_breadth(
    entry: &WhitelistEntry,
    min_v4: u8,
    min_v6: u8,
    force: bool,
) -> Result<(), WhitelistError> {
    let net = entry.net();
    let refuse = |kind, reason: String| WhitelistError {
        input: entry.to_string(),
        reason,
        kind,
    };
    // `from_net` has turned ::ffff:0.0.0.0/96 into 0.0.0.0/0, so a prefix of 0 is the test.
    if net.prefix_len() == 0 {
        return Err(refuse(
            WhitelistErrorKind::WholeInternet,
            "it covers every address of the Internet".to_owned(),
        ));
    }
    let min = match net {
        IpNet::V4(_) => min_v4,
        IpNet::V6(_) => min_v6,
    };
    if net.prefix_len() < min && !force {
        return Err(refuse(
            WhitelistErrorKind::TooBroad,
            format!(
                "/{} is broader than the minimum /{min}; pass force to add it anyway",
                net.prefix_len()
            ),
        ));
    }
    Ok(())
}

/// What [`Whitelists::remove`] took away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removed {
    /// A permanent entry.
    Permanent,
    /// A temporary whitelisting of the address.
    Temporary,
    /// The address was both a permanent entry and temporarily whitelisted.
    Both,
    /// Nothing: the entry was on neither list.
    NotFound,
}

impl Removed {
    /// Whether anything was removed.
    pub fn found(self) -> bool {
        self != Removed::NotFound
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

    /// Takes `ip` off the tenant's temporary whitelist; false if it was not there. An address
    /// whose time is up but that [`Whitelists::expire`] has not dropped yet still counts as
    /// there (no `now` is needed to remove it).
    pub fn remove_temporary(&mut self, tenant: &str, ip: IpAddr) -> bool {
        let Some(entries) = self.temporary.get_mut(tenant) else {
            return false;
        };
        let removed = entries.remove(&ip.to_canonical()).is_some();
        if entries.is_empty() {
            self.temporary.remove(tenant);
        }
        removed
    }

    /// Removes an entry as an operator names it: a single address from the permanent and the
    /// temporary list both (an operator who removes `203.0.113.7` wants it gone, whichever
    /// list put it there), a range from the permanent list (temporary entries are never
    /// ranges).
    pub fn remove(&mut self, tenant: &str, entry: &WhitelistEntry) -> Removed {
        let net = entry.net();
        let permanent = self.remove_permanent(tenant, entry);
        let temporary =
            net.prefix_len() == net.max_prefix_len() && self.remove_temporary(tenant, net.addr());
        match (permanent, temporary) {
            (true, true) => Removed::Both,
            (true, false) => Removed::Permanent,
            (false, true) => Removed::Temporary,
            (false, false) => Removed::NotFound,
        }
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

    /// The temporary whitelist of `tenant` that is still in force at `now`: each address with
    /// when it expires, in address order.
    pub fn temporary(
        &self,
        tenant: &str,
        now: OffsetDateTime,
    ) -> impl Iterator<Item = (IpAddr, OffsetDateTime)> + '_ {
        self.temporary
            .get(tenant)
            .into_iter()
            .flatten()
            .filter(move |(_, entry)| entry.expires_at > now)
            .map(|(ip, entry)| (*ip, entry.expires_at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
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

    fn reason(text: &str) -> String {
        let error = WhitelistEntry::parse(text).unwrap_err();
        assert_eq!(error.kind, WhitelistErrorKind::Invalid, "{text}");
        error.reason
    }

    #[test]
    fn parse_errors_name_the_part_that_is_wrong() {
        assert_eq!(
            reason("10.0.0.1/33"),
            "prefix length 33 is larger than 32 for an IPv4 range"
        );
        assert_eq!(
            reason("2001:db8::/129"),
            "prefix length 129 is larger than 128 for an IPv6 range"
        );
        // Larger than a u8 can hold: still too large, not "not a number".
        assert_eq!(
            reason("10.0.0.0/99999999999"),
            "prefix length 99999999999 is larger than 32 for an IPv4 range"
        );
        // ::ffff:a.b.c.d is IPv6 as written, so its prefix may go to 128.
        assert_eq!(
            reason("::ffff:10.0.0.0/129"),
            "prefix length 129 is larger than 128 for an IPv6 range"
        );
        assert_eq!(
            reason("10.0.0.0/abc"),
            "prefix length \"abc\" is not a number"
        );
        assert_eq!(
            reason("10.0.0.0/+8"),
            "prefix length \"+8\" is not a number"
        );
        assert_eq!(
            reason("10.0.0.0/-1"),
            "prefix length \"-1\" is not a number"
        );
        assert_eq!(
            reason("10.0.0.0/8/9"),
            "prefix length \"8/9\" is not a number"
        );
        assert_eq!(
            reason("10.0.0.0/ 8"),
            "prefix length \" 8\" is not a number"
        );
        assert_eq!(
            reason("10.0.0.0/"),
            "the prefix length after \"/\" is missing"
        );
        assert_eq!(reason("10.0.0.300/8"), "address \"10.0.0.300\" is invalid");
        assert_eq!(reason("10.0.0.300"), "address \"10.0.0.300\" is invalid");
        assert_eq!(reason("/24"), "address \"\" is invalid");
        assert_eq!(reason("example.com"), "address \"example.com\" is invalid");
        assert_eq!(reason(""), "it is empty");
        assert_eq!(
            WhitelistEntry::parse("10.0.0.1/33")
                .unwrap_err()
                .to_string(),
            "whitelist entry \"10.0.0.1/33\" is not an IP address or a CIDR range: \
             prefix length 33 is larger than 32 for an IPv4 range"
        );
        // Untrusted text stays short in the message.
        let long = format!("10.0.0.0/{}", "x".repeat(200));
        assert!(WhitelistEntry::parse(&long).unwrap_err().to_string().len() < 300);
        // The bounds themselves are fine.
        assert_eq!(entry("0.0.0.0/0").net().prefix_len(), 0);
        assert_eq!(entry("10.0.0.1/32").to_string(), "10.0.0.1");
        assert_eq!(entry("2001:db8::1/128").to_string(), "2001:db8::1");
        assert_eq!(entry("10.0.0.0/08").to_string(), "10.0.0.0/8");
    }

    #[test]
    fn the_whole_internet_is_refused_even_forced() {
        for text in ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96", "10.1.2.3/0"] {
            for force in [false, true] {
                let error = check_breadth(&entry(text), 8, 32, force).unwrap_err();
                assert_eq!(error.kind, WhitelistErrorKind::WholeInternet, "{text}");
                assert!(
                    error
                        .to_string()
                        .contains("covers every address of the Internet"),
                    "{error}"
                );
            }
        }
        // Even with no minimum at all.
        assert!(check_breadth(&entry("::/0"), 0, 0, true).is_err());
        assert_eq!(
            check_breadth(&entry("::ffff:0.0.0.0/96"), 8, 32, true)
                .unwrap_err()
                .to_string(),
            "whitelist entry \"0.0.0.0/0\" is refused: it covers every address of the Internet"
        );
    }

    #[test]
    fn ranges_broader_than_the_minimum_need_force() {
        let error = check_breadth(&entry("10.0.0.0/7"), 8, 32, false).unwrap_err();
        assert_eq!(error.kind, WhitelistErrorKind::TooBroad);
        assert_eq!(error.input, "10.0.0.0/7");
        assert_eq!(
            error.reason,
            "/7 is broader than the minimum /8; pass force to add it anyway"
        );
        assert_eq!(
            check_breadth(&entry("16.0.0.0/4"), 8, 32, false)
                .unwrap_err()
                .to_string(),
            "whitelist entry \"16.0.0.0/4\" is refused: \
             /4 is broader than the minimum /8; pass force to add it anyway"
        );
        assert_eq!(check_breadth(&entry("10.0.0.0/7"), 8, 32, true), Ok(()));
        assert_eq!(check_breadth(&entry("10.0.0.0/8"), 8, 32, false), Ok(()));
        assert_eq!(check_breadth(&entry("10.0.0.1"), 32, 128, false), Ok(()));
        // Each family has its own minimum.
        assert!(check_breadth(&entry("2001:db8::/31"), 8, 32, false).is_err());
        assert_eq!(check_breadth(&entry("2001:db8::/32"), 8, 32, false), Ok(()));
        assert_eq!(check_breadth(&entry("2001::/16"), 8, 32, true), Ok(()));
        assert_eq!(check_breadth(&entry("2001:db8::1"), 32, 128, false), Ok(()));
        // A mapped range is an IPv4 range and meets the IPv4 minimum.
        assert_eq!(
            check_breadth(&entry("::ffff:10.0.0.0/104"), 8, 128, false),
            Ok(())
        );
        assert!(check_breadth(&entry("::ffff:10.0.0.0/103"), 8, 0, false).is_err());
    }

    #[test]
    fn remove_takes_a_host_off_both_lists_and_a_range_off_the_permanent_one() {
        let eight = Duration::hours(8);
        let mut lists = Whitelists::default();
        let host = entry("203.0.113.7");
        lists.add_permanent("a", host.clone());
        lists.grant_temporary("a", ip("203.0.113.7"), T0, eight);
        assert_eq!(lists.remove("a", &host), Removed::Both);
        assert!(!lists.is_whitelisted("a", ip("203.0.113.7"), T0));
        assert_eq!(lists.remove("a", &host), Removed::NotFound);
        assert!(!lists.remove("a", &host).found());

        lists.add_permanent("a", host.clone());
        assert_eq!(lists.remove("a", &host), Removed::Permanent);
        lists.grant_temporary("a", ip("::ffff:203.0.113.7"), T0, eight);
        assert_eq!(lists.remove("b", &host), Removed::NotFound, "per tenant");
        assert_eq!(
            lists.remove("a", &entry("::ffff:203.0.113.7")),
            Removed::Temporary
        );
        assert!(lists.remove("a", &host) == Removed::NotFound);

        // A range is never temporary, even when its network address is.
        lists.grant_temporary("a", ip("203.0.113.0"), T0, eight);
        lists.add_permanent("a", entry("203.0.113.0/24"));
        assert_eq!(
            lists.remove("a", &entry("203.0.113.0/24")),
            Removed::Permanent
        );
        assert!(lists.is_whitelisted("a", ip("203.0.113.0"), T0));
        assert_eq!(
            lists.remove("a", &entry("203.0.113.0/24")),
            Removed::NotFound
        );

        lists.grant_temporary("a", ip("2001:db8::7"), T0, eight);
        assert_eq!(lists.remove("a", &entry("2001:db8::7")), Removed::Temporary);
        assert_eq!(lists.remove("a", &entry("203.0.113.0")), Removed::Temporary);
        assert_eq!(lists, Whitelists::default(), "empty tenants are dropped");
    }

    #[test]
    fn a_temporary_entry_can_be_removed() {
        let mut lists = Whitelists::default();
        lists.grant_temporary("a", ip("192.0.2.1"), T0, Duration::hours(8));
        lists.grant_temporary("a", ip("192.0.2.2"), T0, Duration::hours(8));
        assert!(!lists.remove_temporary("b", ip("192.0.2.1")));
        assert!(!lists.remove_temporary("a", ip("192.0.2.3")));
        assert!(lists.remove_temporary("a", ip("::ffff:192.0.2.1")));
        assert!(!lists.remove_temporary("a", ip("192.0.2.1")));
        assert!(!lists.is_whitelisted("a", ip("192.0.2.1"), T0));
        assert!(lists.is_whitelisted("a", ip("192.0.2.2"), T0));
        assert!(lists.remove_temporary("a", ip("192.0.2.2")));
        assert_eq!(lists.next_expiry(), None);
        // Past its end but not yet dropped by `expire`: still there to remove.
        lists.grant_temporary("a", ip("192.0.2.4"), T0, Duration::ZERO);
        assert!(!lists.is_whitelisted("a", ip("192.0.2.4"), T0));
        assert!(lists.remove_temporary("a", ip("192.0.2.4")));
        assert_eq!(lists, Whitelists::default());
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
