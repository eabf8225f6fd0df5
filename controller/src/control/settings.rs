//! The controller's settings, already validated: what `fleetd`'s configuration says about
//! firmware, phones, floods, operator requests and waiting stations
//! ([`ControlSettings::from_config`] is the one place that turns the one into the other).

use crate::clock::Clock;
use crate::firmware::{Catalog, FirmwarePolicy};
use crate::flood::{FailurePolicy, PendingLimits};
use crate::phone::PhonePolicy;

/// Settings of the controller, already validated.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    pub policy: FirmwarePolicy,
    pub catalog: Catalog,
    pub chunk_size: usize,
    pub max_payload_bytes: usize,
    pub phones: PhonePolicy,
    pub flood: FloodSettings,
    pub requests: RequestLimits,
    pub pending: PendingSettings,
    /// Shortest prefix of a permanent whitelist range (IPv4, IPv6) without `force`.
    pub whitelist_min_prefix: (u8, u8),
    pub clock: Clock,
    /// Where the controller counts (operator commands, batches). `from_config` gives a
    /// registry of its own; `Fleet::start` hands it the front door's, which it serves.
    pub metrics: std::sync::Arc<fleet_broker::metrics::Metrics>,
}

impl ControlSettings {
    /// The controller's settings from a checked configuration (`fleet_config::Config::validate`),
    /// with the firmware policy and catalog the shell read from disk, on `clock`.
    pub fn from_config(
        config: &fleet_config::Config,
        policy: FirmwarePolicy,
        catalog: Catalog,
        clock: Clock,
    ) -> ControlSettings {
        let phones = &config.phones;
        let limits = &config.limits;
        let minutes = |m: u64| time::Duration::minutes(i64::try_from(m).unwrap_or(i64::MAX));
        ControlSettings {
            policy,
            catalog,
            chunk_size: config.firmware.chunk_size,
            max_payload_bytes: config.limits.max_payload_bytes,
            phones: PhonePolicy {
                pap_attempts: phones.pap_attempts,
                lockout: minutes(phones.lockout_minutes),
                lockouts_before_block: phones.lockouts_before_block,
                temporary_whitelist: minutes(phones.temporary_whitelist_hours.saturating_mul(60)),
                suspend: minutes(phones.suspend_minutes),
            },
            flood: FloodSettings {
                failures: FailurePolicy {
                    max_failures: limits.failed_auth_per_ip,
                    window: minutes(limits.failed_auth_window_minutes),
                    block: minutes(limits.failed_auth_block_minutes),
                },
                failed_auth_delay: std::time::Duration::from_millis(limits.failed_auth_delay_ms),
                refusal_audits_per_minute: limits.refusal_audits_per_ip_per_minute,
            },
            requests: RequestLimits {
                max_commands: limits.max_commands_per_request as usize,
                page_size: limits.max_page_size as usize,
                max_response_bytes: limits.max_response_bytes,
                commands_per_second: limits.operator_commands_per_second,
                burst: limits.operator_command_burst,
            },
            pending: PendingSettings {
                limits: PendingLimits {
                    per_ip: limits.pending_stations_per_ip,
                    total: limits.max_pending_stations,
                },
                expiry: minutes(limits.pending_expiry_hours.saturating_mul(60)),
            },
            whitelist_min_prefix: (
                phones.min_whitelist_prefix_v4,
                phones.min_whitelist_prefix_v6,
            ),
            clock,
            metrics: std::sync::Arc::default(),
        }
    }
}

/// What one operator request, and one operator, may ask of the controller.
#[derive(Debug, Clone)]
pub struct RequestLimits {
    pub max_commands: usize,
    /// Items of a list command's page at most.
    pub page_size: usize,
    /// Bytes of a request's whole response at most (decisions are answered regardless; reads
    /// beyond it get `too_large`).
    pub max_response_bytes: usize,
    pub commands_per_second: u32,
    pub burst: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_commands: 100,
            page_size: 500,
            max_response_bytes: 4 << 20,
            commands_per_second: 20,
            burst: 200,
        }
    }
}

/// Stations waiting for approval: how many, and for how long unseen.
#[derive(Debug, Clone)]
pub struct PendingSettings {
    pub limits: PendingLimits,
    pub expiry: time::Duration,
}

impl Default for PendingSettings {
    fn default() -> Self {
        PendingSettings {
            limits: PendingLimits {
                per_ip: 1000,
                total: 20_000,
            },
            expiry: time::Duration::days(7),
        }
    }
}

/// Limits on failed authentications and on refusal audits per source address.
#[derive(Debug, Clone)]
pub struct FloodSettings {
    pub failures: FailurePolicy,
    pub failed_auth_delay: std::time::Duration,
    pub refusal_audits_per_minute: u32,
}
