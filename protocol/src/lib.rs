//! The fleet's wire protocol (`../shared/PROTOCOL.md`) in one place: identifiers and client ids
//! (§1), topics, subscription filters and device payloads (§3), the states people see (§5), and the operator
//! commands with their request and response envelopes and errors (§6). Every other crate, the
//! simulator and `fleetctl` included, names topics, client ids and commands through this crate;
//! none spells one by hand. Pure: no I/O, no clock.

pub mod command;
pub mod envelope;
pub mod error;
pub mod fingerprint;
pub mod ids;
pub mod payload;
pub mod state;
pub mod topic;
pub mod whitelist;

pub use command::{
    names_a_read, After, CommandName, FirmwareVersion, IpAddress, Listing, OperatorCommand,
    PageLimit, Subject, Text, DEFAULT_AUDIT_LIMIT, MAX_LIMIT, MAX_TEXT,
};
pub use envelope::{parse_request, EntryCommand, RequestEntry, ResponseEntry};
pub use error::{CommandError, ErrorCode};
pub use fingerprint::{Fingerprint, FingerprintError};
pub use ids::{
    operator_client_id, shorten, ClaimedClient, IdError, Mac, Serial, MAX_SERIAL_LEN,
    OPERATOR_CLIENT_ID_PREFIX, PHONE_CLIENT_ID_PREFIX, STATION_CLIENT_ID_PREFIX,
};
pub use state::{PhoneState, StationState};
pub use topic::{EventKind, Filter, PhoneLeaf, StationLeaf, Topic};
pub use whitelist::{WhitelistEntry, WhitelistError, WhitelistErrorKind};
