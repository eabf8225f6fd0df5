//! Where the simulated devices of a load run connect from: a fleet is many sites, each behind
//! its own address, so against a server on loopback the run spreads its devices over many
//! loopback addresses (Linux routes all of 127.0.0.0/8 to `lo`, no setup needed); and how a
//! refusal by one of fleetd's per-address limits looks from a device.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// Devices the default spread gives one loopback address.
///
/// fleetd's default `[limits]` per source address are: 600 new connections a minute (a bucket
/// that starts full, so a burst of 600), 256 unfinished TLS handshakes at once, 5,000 live
/// sessions and 1,000 stations waiting for approval. A load run connects each station about
/// twice (onboarding, then the reconnect storm, all stations at once) and each phone once. So
/// 100 devices to an address spend at most 200 of its 600 connections (three runs back to back
/// still fit), never hold more than 100 handshakes at once, and stay far below the session and
/// waiting-station caps. More addresses (one per device) would fit the limits as well, but
/// fleetd keeps a little state per address it has seen, which a figure of its memory per
/// device would then count.
pub const DEVICES_PER_ADDRESS: usize = 100;

/// The first address of a spread: 127.0.0.1 is left to everything else (the operator's
/// connection among them).
const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The last address of 127.0.0.0/8 a spread may use.
const LAST: Ipv4Addr = Ipv4Addr::new(127, 255, 255, 254);

/// How the devices that are given no source address of their own connect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// When the server is on IPv4 loopback, spread over 127.0.0.2, 127.0.0.3, … with at most
    /// this many devices to an address, in turn; otherwise the system's choice.
    Loopback {
        /// Devices to one address (at least 1).
        devices_per_address: usize,
    },
    /// The system's choice of source address for every device: on loopback, all of them come
    /// from 127.0.0.1.
    Off,
}

impl Default for Spread {
    fn default() -> Self {
        Spread::Loopback {
            devices_per_address: DEVICES_PER_ADDRESS,
        }
    }
}

/// The loopback addresses for `devices` devices, at most `per_address` to each: 127.0.0.2,
/// 127.0.0.3, … (past 127.0.0.255 on to 127.0.1.0, …); empty for no devices.
pub fn spread_addresses(devices: usize, per_address: usize) -> Vec<IpAddr> {
    (0..spread_len(devices, per_address))
        .map(spread_address)
        .collect()
}

/// How many addresses [`spread_addresses`] gives: enough for the share, as far as the block
/// goes.
fn spread_len(devices: usize, per_address: usize) -> u32 {
    let available = u32::from(LAST) - u32::from(FIRST) + 1;
    let wanted = devices.div_ceil(per_address.max(1));
    u32::try_from(wanted).unwrap_or(u32::MAX).min(available)
}

/// Address `k` (0-based) of a spread.
fn spread_address(k: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(FIRST) + k))
}

/// Whether the addresses the server's name resolved to are loopback and one of them is IPv4:
/// only then can a spread over 127.0.0.0/8 reach it (IPv6 has one loopback address).
pub fn spreadable(resolved: &[SocketAddr]) -> bool {
    !resolved.is_empty()
        && resolved.iter().all(|a| a.ip().to_canonical().is_loopback())
        && resolved.iter().any(|a| a.ip().to_canonical().is_ipv4())
}

/// Source addresses used in turn, from `offset` on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rotation {
    addresses: Vec<IpAddr>,
    offset: usize,
}

impl Rotation {
    /// The address of device `index` (0-based); `None` (the system's choice) for an empty
    /// rotation.
    pub fn of(&self, index: usize) -> Option<IpAddr> {
        let n = self.addresses.len();
        (n > 0).then(|| self.addresses[(self.offset % n + index % n) % n])
    }
}

/// Where each device of a run connects from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SourcePlan {
    /// The stations', by station index.
    pub stations: Rotation,
    /// The phones', by phone index.
    pub phones: Rotation,
}

impl SourcePlan {
    /// Given addresses for a kind of device are used in turn; the other devices are spread
    /// (when `spread` says so and the server is `reachable_by_spread`): the stations first,
    /// then the phones go on round the same addresses, so that no address carries more than
    /// its share of both together.
    pub fn new(
        (station_sources, stations): (&[IpAddr], usize),
        (phone_sources, phones): (&[IpAddr], usize),
        spread: Spread,
        reachable_by_spread: bool,
    ) -> SourcePlan {
        let spread_stations = if station_sources.is_empty() {
            stations
        } else {
            0
        };
        let spread_phones = if phone_sources.is_empty() { phones } else { 0 };
        let spread = match spread {
            Spread::Loopback {
                devices_per_address,
            } if reachable_by_spread => {
                spread_addresses(spread_stations + spread_phones, devices_per_address)
            }
            _ => Vec::new(),
        };
        let given_or_spread = |given: &[IpAddr], offset| match given {
            [] => Rotation {
                addresses: spread.clone(),
                offset,
            },
            given => Rotation {
                addresses: given.to_vec(),
                offset: 0,
            },
        };
        SourcePlan {
            stations: given_or_spread(station_sources, 0),
            phones: given_or_spread(phone_sources, spread_stations),
        }
    }

    /// Distinct source addresses the plan chose; 0 when the system chooses for every device.
    pub fn distinct(&self) -> usize {
        let mut all: Vec<IpAddr> = self
            .stations
            .addresses
            .iter()
            .chain(&self.phones.addresses)
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all.len()
    }
}

/// The error example of a connection that fleetd closed before TLS: it does so, before any
/// TLS work, past a per-address limit (its socket cap, far above `server.max_connections`,
/// closes connections the same way).
pub fn closed_before_tls_example(reason: &str) -> String {
    format!(
        "per-address limit: fleetd closes a connection before TLS past \
         limits.connections_per_ip_per_minute or limits.handshakes_per_ip ({reason})"
    )
}

/// The error example of a CONNACK refusal `refusal`, `server_unavailable` when it is MQTT
/// 3.1.1's 3: fleetd answers its per-address caps and its fleet-wide ones alike with it, and a
/// 3.1.1 CONNACK carries no reason to tell them apart.
pub fn refusal_example(refusal: &str, server_unavailable: bool) -> String {
    if server_unavailable {
        format!(
            "{refusal}: a per-address limit (limits.sessions_per_ip, \
             limits.pending_stations_per_ip) or a fleet-wide cap (server.max_connections, \
             limits.max_pending_stations); MQTT 3.1.1 does not say which"
        )
    } else {
        refusal.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_spread_gives_each_address_at_most_its_share() {
        assert!(spread_addresses(0, 100).is_empty());
        assert_eq!(spread_addresses(1, 100), [v4("127.0.0.2")]);
        assert_eq!(spread_addresses(100, 100), [v4("127.0.0.2")]);
        assert_eq!(
            spread_addresses(101, 100),
            [v4("127.0.0.2"), v4("127.0.0.3")]
        );
        let many = spread_addresses(300 * 100, 100);
        assert_eq!(many.len(), 300);
        assert_eq!(many[253], v4("127.0.0.255"));
        assert_eq!(many[254], v4("127.0.1.0"));
        // A share of 0 is read as 1; the block ends at 127.255.255.254.
        assert_eq!(spread_addresses(3, 0).len(), 3);
        let all = spread_len(usize::MAX, 1);
        assert_eq!(all, (1 << 24) - 3);
        assert_eq!(spread_address(all - 1), v4("127.255.255.254"));
    }

    #[test]
    fn stations_then_phones_go_round_the_same_addresses() {
        let plan = SourcePlan::new((&[], 250), (&[], 50), Spread::default(), true);
        assert_eq!(plan.distinct(), 3);
        let mut load = std::collections::HashMap::<IpAddr, usize>::new();
        for i in 0..250 {
            *load.entry(plan.stations.of(i).unwrap()).or_default() += 1;
        }
        for j in 0..50 {
            *load.entry(plan.phones.of(j).unwrap()).or_default() += 1;
        }
        assert_eq!(load.len(), 3);
        assert!(load.values().all(|&n| n == 100), "{load:?}");
        // Consecutive devices land on different addresses: what connects at once is spread.
        assert_ne!(plan.stations.of(0), plan.stations.of(1));
    }

    #[test]
    fn given_addresses_win_and_the_rest_is_spread_or_left_to_the_system() {
        let given = [v4("127.0.0.9")];
        let plan = SourcePlan::new((&[], 150), (&given, 10), Spread::default(), true);
        assert_eq!(plan.phones.of(7), Some(v4("127.0.0.9")));
        assert_eq!(plan.stations.of(0), Some(v4("127.0.0.2")));
        assert_eq!(plan.stations.of(1), Some(v4("127.0.0.3")));
        assert_eq!(plan.stations.of(2), Some(v4("127.0.0.2")));
        assert_eq!(plan.distinct(), 3);

        let remote = SourcePlan::new((&[], 150), (&[], 10), Spread::default(), false);
        assert_eq!(remote.stations.of(0), None);
        assert_eq!(remote.distinct(), 0);
        let off = SourcePlan::new((&[], 150), (&given, 10), Spread::Off, true);
        assert_eq!(off.stations.of(3), None);
        assert_eq!(off.phones.of(3), Some(v4("127.0.0.9")));
        assert_eq!(off.distinct(), 1);
    }

    #[test]
    fn only_a_server_on_ipv4_loopback_is_reached_by_a_spread() {
        let at = |text: &str| -> SocketAddr { text.parse().unwrap() };
        assert!(spreadable(&[at("127.0.0.1:8883")]));
        assert!(spreadable(&[at("127.0.0.1:8883"), at("[::1]:8883")]));
        assert!(spreadable(&[at("[::ffff:127.0.0.1]:8883")]));
        assert!(!spreadable(&[at("[::1]:8883")]));
        assert!(!spreadable(&[at("192.0.2.7:8883")]));
        assert!(!spreadable(&[at("127.0.0.1:8883"), at("192.0.2.7:8883")]));
        assert!(!spreadable(&[]));
    }

    /// The default share fits fleetd's default per-address limits: if those are lowered, the
    /// spread must be thought over again.
    #[test]
    fn the_default_share_fits_fleetds_default_limits() {
        let limits = fleet_config::LimitsConfig::default();
        // Two connections a station in a run (onboarding, reconnect storm), three runs in a row.
        let connections = 2 * DEVICES_PER_ADDRESS * 3;
        assert!(connections <= limits.connections_per_ip_per_minute as usize);
        // The whole share may be in its TLS handshake at once (the reconnect storm).
        assert!(DEVICES_PER_ADDRESS <= limits.handshakes_per_ip as usize);
        assert!(DEVICES_PER_ADDRESS <= limits.sessions_per_ip as usize);
        assert!(DEVICES_PER_ADDRESS <= limits.pending_stations_per_ip as usize);
    }

    #[test]
    fn per_address_refusals_say_so_where_they_can_be_told_apart() {
        let closed = closed_before_tls_example("tls handshake eof");
        assert!(closed.starts_with("per-address limit: "), "{closed}");
        assert!(closed.contains("connections_per_ip_per_minute"));
        assert!(closed.ends_with("(tls handshake eof)"));
        let unavailable = refusal_example("ServiceUnavailable", true);
        assert!(unavailable.starts_with("ServiceUnavailable: "));
        assert!(unavailable.contains("limits.sessions_per_ip"));
        assert!(unavailable.contains("does not say which"));
        assert_eq!(refusal_example("NotAuthorized", false), "NotAuthorized");
    }
}
