//! fleetgate's device simulator: stations that keep their own state directory like a real
//! device (`station.json`, `key.pem`, `cert.pem`, a resumable firmware part file), connect to
//! fleetd over TLS, ask for authorization and obey the controller's commands; and phones
//! ([`phone`]) that provision with a PAP and then connect with the certificate they got.
//!
//! Pure parts ([`state`], [`state_file`], [`command`], [`firmware`]) are tested without a server; [`station`]
//! is the tokio shell that drives them over MQTT ([`link`], the simulator's own MQTT client,
//! which connects from a chosen source address); [`load`] drives thousands of both through
//! onboarding against a running fleetd, or a cluster's edges, and measures it and the
//! processes named to it ([`processes`], [`cluster_file`]) (`fleet-sim load`).

pub mod admin;
pub mod cluster_file;
pub mod command;
pub mod firmware;
pub mod fleet;
pub mod link;
pub mod load;
pub mod open_files;
pub mod phone;
pub mod processes;
pub mod spread;
pub mod state;
pub mod state_file;
pub mod station;

pub use admin::{admin_request, serve_admin, AdminError, AdminReply, AdminRequest, AdminServer};
pub use cluster_file::{ClusterFile, ClusterFileError, ClusterPids};
pub use command::{Command, CommandError};
pub use firmware::{ChunkMessage, ChunkRequest, Download, Step, UpdateOrder};
pub use fleet::{fleet_serial, spawn_fleet, StationStatus, Tally};
pub use link::LinkError;
pub use load::{run_load, Latency, LoadError, LoadOptions, LoadReport, ServerPlan, StormReport};
pub use phone::{
    connect_provisioned, connect_raw, factory_reset, is_provisioned, phone_mac, provision,
    provision_many, set_pap, PhoneError, PhoneProfile, PhoneRecord, PhoneSession, PhoneState,
    PhoneTarget, ProvisionOutcome, SessionEnd,
};
pub use processes::{MeasuredProcess, ProcessFigures};
pub use spread::{SourcePlan, Spread, DEVICES_PER_ADDRESS};
pub use state::{
    fingerprint, local_reset, Identity, PendingUpdate, StateError, StationProfile, StationRecord,
    StationState, DEFAULT_MODEL,
};
pub use state_file::{FileError, StateFile};
pub use station::{spawn_station, SimConfig, SimEvent, StationControl, StationHandle};
