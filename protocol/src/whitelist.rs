//! Whitelist entries as operators write them (PROTOCOL §5, §6): an IPv4 or IPv6 address or a
//! CIDR range, parsed once and normalised, so that `addWhitelistEntry` and the tenants'
//! whitelists hold the same value.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::shorten;

/// Why a text is not a whitelist entry, or why an entry may not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("whitelist entry {input:?} {}: {reason}", .kind.verdict())]
pub struct WhitelistError {
    /// The entry as given (shortened), or as normalised for a refused entry.
    pub input: String,
    /// What is wrong, naming the part at fault (the address, the prefix length).
    pub reason: String,
    /// Whether the text is no entry at all or an entry refused as too broad, so that the shell
    /// can tell an operator whether `force` would help.
    pub kind: WhitelistErrorKind,
}

/// What kind of [`WhitelistError`] it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WhitelistErrorKind {
    /// Not an IP address or a CIDR range.
    Invalid,
    /// A range broader than the configured minimum prefix; `force` adds it anyway.
    TooBroad,
    /// `0.0.0.0/0` or `::/0`: never added, forced or not.
    WholeInternet,
}

impl WhitelistErrorKind {
    fn verdict(self) -> &'static str {
        match self {
            WhitelistErrorKind::Invalid => "is not an IP address or a CIDR range",
            WhitelistErrorKind::TooBroad | WhitelistErrorKind::WholeInternet => "is refused",
        }
    }
}

/// One permanent whitelist entry: an IPv4 or IPv6 address (a host network) or a CIDR range,
/// normalised (host bits cleared; IPv4-mapped IPv6 written as IPv4).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WhitelistEntry(IpNet);

impl WhitelistEntry {
    /// Parses `203.0.113.7`, `203.0.113.0/24`, `2001:db8::1` or `2001:db8::/32`. The error
    /// names the part that is wrong: ipnet's own message ("invalid IP address syntax") says
    /// the same for a bad address and for a prefix length of 33, which leaves an operator
    /// looking at the wrong half.
    pub fn parse(text: &str) -> Result<WhitelistEntry, WhitelistError> {
        let error = |reason: String| WhitelistError {
            input: shorten(text),
            reason,
            kind: WhitelistErrorKind::Invalid,
        };
        if text.is_empty() {
            return Err(error("it is empty".to_owned()));
        }
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = IpAddr::from_str(addr_text)
            .map_err(|_| error(format!("address {:?} is invalid", shorten(addr_text))))?;
        let Some(prefix_text) = prefix_text else {
            return Ok(WhitelistEntry::from_net(IpNet::from(addr)));
        };
        let (max, family) = match addr {
            IpAddr::V4(_) => (32, "IPv4"),
            IpAddr::V6(_) => (128, "IPv6"),
        };
        if prefix_text.is_empty() {
            return Err(error("the prefix length after \"/\" is missing".to_owned()));
        }
        // Only digits: `u8::from_str` would also take "+24".
        if !prefix_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(error(format!(
                "prefix length {:?} is not a number",
                shorten(prefix_text)
            )));
        }
        let too_long = || {
            error(format!(
                "prefix length {} is larger than {max} for an {family} range",
                shorten(prefix_text)
            ))
        };
        // All digits: a failure to parse can only be a number too large for a u8.
        let prefix = u8::from_str(prefix_text).map_err(|_| too_long())?;
        let net = IpNet::new(addr, prefix).map_err(|_| too_long())?;
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
