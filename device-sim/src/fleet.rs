//! Many stations in one process (`fleet-sim stations`): their directories, and a tally of
//! where each one stands, for the periodic summary line.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::state::{StateError, StationProfile, StationState};
use crate::station::{spawn_station, SimConfig, SimEvent, StationHandle};

/// Where a simulated station stands, as far as its own events tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StationStatus {
    /// Booted, not connected yet.
    Connecting,
    /// Connected, not authorized: waiting for an operator.
    Waiting,
    /// The controller said `authorized`.
    Authorized,
    /// The controller said `rejected`.
    Rejected,
    /// The broker refused the CONNECT.
    Refused,
    /// Downloading firmware.
    Updating,
    /// Not connected, will retry.
    Offline,
    /// Powered off.
    Off,
    /// A local failure.
    Failed,
}

impl StationStatus {
    /// The status after `event`.
    pub fn after(self, event: &SimEvent) -> StationStatus {
        match event {
            SimEvent::Booted { .. } | SimEvent::Rebooting => StationStatus::Connecting,
            SimEvent::Connected { .. } => StationStatus::Waiting,
            SimEvent::Refused { .. } => StationStatus::Refused,
            SimEvent::Disconnected { .. } => StationStatus::Offline,
            SimEvent::PoweredOff => StationStatus::Off,
            SimEvent::Authorized => StationStatus::Authorized,
            SimEvent::Rejected => StationStatus::Rejected,
            SimEvent::Removed | SimEvent::ResetApplied => StationStatus::Connecting,
            SimEvent::UpdateProgress { .. } | SimEvent::UpdateRestarted { .. } => {
                StationStatus::Updating
            }
            SimEvent::UpdateInstalled { .. } => StationStatus::Connecting,
            SimEvent::UpdateFailed { .. } => StationStatus::Waiting,
            SimEvent::Error { .. } => StationStatus::Failed,
            SimEvent::Command { .. } => self,
        }
    }

    fn label(self) -> &'static str {
        match self {
            StationStatus::Connecting => "connecting",
            StationStatus::Waiting => "waiting",
            StationStatus::Authorized => "authorized",
            StationStatus::Rejected => "rejected",
            StationStatus::Refused => "refused",
            StationStatus::Updating => "updating",
            StationStatus::Offline => "offline",
            StationStatus::Off => "off",
            StationStatus::Failed => "failed",
        }
    }
}

/// The status of every station of a fleet.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    statuses: BTreeMap<String, StationStatus>,
}

impl Tally {
    /// Takes one station's event.
    pub fn observe(&mut self, serial: &str, event: &SimEvent) {
        let status = self
            .statuses
            .entry(serial.to_owned())
            .or_insert(StationStatus::Connecting);
        *status = status.after(event);
    }

    /// Stations per status.
    pub fn counts(&self) -> BTreeMap<StationStatus, usize> {
        let mut counts = BTreeMap::new();
        for status in self.statuses.values() {
            *counts.entry(*status).or_insert(0) += 1;
        }
        counts
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} stations", self.statuses.len())?;
        for (status, count) in self.counts() {
            write!(f, ", {} {count}", status.label())?;
        }
        Ok(())
    }
}

/// The serial of the `index`-th station (from 1): `SIM-00001`.
pub fn fleet_serial(prefix: &str, index: usize) -> String {
    format!("{prefix}-{index:05}")
}

/// Makes (or reuses) `count` station directories under `base` and starts every station.
pub fn spawn_fleet(
    base: &Path,
    count: usize,
    prefix: &str,
    firmware: &str,
    config: &SimConfig,
) -> Result<Vec<(String, StationHandle)>, StateError> {
    let mut stations = Vec::with_capacity(count);
    for index in 1..=count {
        let serial = fleet_serial(prefix, index);
        let dir = base.join(&serial);
        if !StationState::exists(&dir) {
            StationState::init(&dir, &StationProfile::new(serial.clone(), firmware))?;
        }
        stations.push((serial, spawn_station(dir, config.clone())));
    }
    Ok(stations)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tally_follows_each_station() {
        let mut tally = Tally::default();
        tally.observe(
            "A",
            &SimEvent::Connected {
                with_certificate: true,
            },
        );
        tally.observe(
            "B",
            &SimEvent::Connected {
                with_certificate: true,
            },
        );
        tally.observe("B", &SimEvent::Authorized);
        tally.observe(
            "B",
            &SimEvent::Command {
                command: "x".into(),
                payload: serde_json::Value::Null,
            },
        );
        tally.observe(
            "C",
            &SimEvent::Refused {
                code: "NotAuthorized".into(),
                reason: None,
            },
        );
        let counts = tally.counts();
        assert_eq!(counts[&StationStatus::Waiting], 1);
        assert_eq!(counts[&StationStatus::Authorized], 1);
        assert_eq!(counts[&StationStatus::Refused], 1);
        assert_eq!(
            tally.to_string(),
            "3 stations, waiting 1, authorized 1, refused 1"
        );
    }

    #[test]
    fn serials_are_numbered() {
        assert_eq!(fleet_serial("SIM", 1), "SIM-00001");
        assert_eq!(fleet_serial("X", 123_456), "X-123456");
    }
}
