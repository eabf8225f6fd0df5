//! The states people see (PROTOCOL §5), by their JSON names and their labels: what
//! `listStations` filters by and what `fleetctl` shows.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The state shown to people (PROTOCOL §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StationState {
    UpdateRequired,
    Updating,
    Unsupported,
    Unauthorized,
    Running,
    NotRunning,
    Rejected,
}

impl StationState {
    /// The JSON name.
    pub fn as_str(self) -> &'static str {
        match self {
            StationState::UpdateRequired => "update_required",
            StationState::Updating => "updating",
            StationState::Unsupported => "unsupported",
            StationState::Unauthorized => "unauthorized",
            StationState::Running => "running",
            StationState::NotRunning => "not_running",
            StationState::Rejected => "rejected",
        }
    }

    /// What people see.
    pub fn label(self) -> &'static str {
        match self {
            StationState::UpdateRequired => "Update Required",
            StationState::Updating => "Updating",
            StationState::Unsupported => "Unsupported",
            StationState::Unauthorized => "Unauthorized",
            StationState::Running => "Running",
            StationState::NotRunning => "Not Running",
            StationState::Rejected => "Rejected",
        }
    }

    /// Every state, in the order of PROTOCOL §5's table.
    pub const ALL: [StationState; 7] = [
        StationState::UpdateRequired,
        StationState::Updating,
        StationState::Unsupported,
        StationState::Unauthorized,
        StationState::Running,
        StationState::NotRunning,
        StationState::Rejected,
    ];

    /// Parses a JSON name, e.g. the `state` filter of `listStations`.
    pub fn from_name(name: &str) -> Option<StationState> {
        StationState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
    }
}

impl fmt::Display for StationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}
/// A phone's `auth_state` as people see it (PROTOCOL §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PhoneState {
    Needed,
    Failed,
    Blocked,
    Successful,
}

impl PhoneState {
    /// Every state, in the order of PROTOCOL §5's table.
    pub const ALL: [PhoneState; 4] = [
        PhoneState::Needed,
        PhoneState::Failed,
        PhoneState::Blocked,
        PhoneState::Successful,
    ];

    /// The JSON name, `auth_state` of a phone.
    pub fn as_str(self) -> &'static str {
        match self {
            PhoneState::Needed => "authentication_needed",
            PhoneState::Failed => "authentication_failed",
            PhoneState::Blocked => "authentication_blocked",
            PhoneState::Successful => "authentication_successful",
        }
    }

    /// What people see.
    pub fn label(self) -> &'static str {
        match self {
            PhoneState::Needed => "Authentication needed",
            PhoneState::Failed => "Authentication failed (temporarily blocked)",
            PhoneState::Blocked => "Authentication blocked (permanently)",
            PhoneState::Successful => "Authentication successful",
        }
    }

    /// Parses a JSON name.
    pub fn from_name(name: &str) -> Option<PhoneState> {
        PhoneState::ALL
            .into_iter()
            .find(|state| state.as_str() == name)
    }
}
