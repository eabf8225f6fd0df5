//! fleetgate's controller: every device's authorization state, the operator commands, the store.
//!
//! Architecture invariant: the state machines (`station`, `identity`, `firmware`) know no I/O
//! and no clock; only `store` knows redb; MQTT is reached through `fleet_broker::Bus` and
//! sessions through `fleet_broker::SessionControl`.

pub mod audit;
pub mod clock;
pub mod control;
pub mod devices_csv;
pub mod firmware;
pub mod fleet;
pub mod flood;
pub mod identity;
pub mod node;
pub mod phone;
pub mod reasons;
pub mod request;
pub mod station;
pub mod store;
pub mod times;
pub mod views;
pub mod whitelist;

pub use fleet::{Fleet, StartError};
pub use node::Node;
