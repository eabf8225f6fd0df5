//! Tests that run the `fleetd` binary as a process and SIGKILL it or read its memory, on the
//! harness of `fleet_tests` (`tests/src/process.rs`, `tests/src/churn.rs`).
//!
//! They are the one test binary outside `tests/it`, for one reason: they need the real
//! `fleetd` executable, and cargo gives its path (`CARGO_BIN_EXE_fleetd`), having built it
//! first, only to the integration tests of the package that defines it. Anywhere else the
//! binary might not have been built (`cargo test -p fleet-tests` on a clean clone).

mod churn;
mod cluster;
mod crash_cycles;
mod failover;
mod kill_restart;
mod running;

/// The `fleetd` under test.
const FLEETD: &str = env!("CARGO_BIN_EXE_fleetd");
