//! The fleet's wire protocol (`../shared/PROTOCOL.md`) in one place: identifiers and client ids
//! (§1), topics and subscription filters (§3), and the errors of operator commands (§6). Every
//! other crate, the simulator and `fleetctl` included, names topics and client ids through this
//! crate; none spells one by hand. Pure: no I/O, no clock.

pub mod error;
pub mod fingerprint;
pub mod ids;
pub mod payload;
pub mod topic;

pub use error::{CommandError, ErrorCode};
pub use fingerprint::{Fingerprint, FingerprintError};
pub use ids::{
    operator_client_id, shorten, ClaimedClient, IdError, Mac, Serial, MAX_SERIAL_LEN,
    OPERATOR_CLIENT_ID_PREFIX, PHONE_CLIENT_ID_PREFIX, STATION_CLIENT_ID_PREFIX,
};
pub use topic::{EventKind, Filter, PhoneLeaf, StationLeaf, Topic};
