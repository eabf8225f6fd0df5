//! fleetgate's integration tests as one binary (ripgrep's `tests/tests.rs`): one module per
//! subject, all on the harness in `tests/src` (crate `fleet_tests`), so that the suite links
//! once and its tests share the machine's cores. The tests that must run the `fleetd` binary
//! itself live in `controller/tests/process` (see there why).

mod audit;
mod caps;
mod cluster;
mod floods;
mod front_door;
mod hostile;
mod load_smoke;
mod metrics;
mod mqtt5;
mod phones;
mod request_corpus;
mod resumption;
mod revocation_order;
mod rights;
mod security;
mod sessions;
mod shutdown;
mod smoke;
mod stations;
mod tidy;
mod why;
