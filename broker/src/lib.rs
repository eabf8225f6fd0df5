//! fleetgate's front door: a mutual-TLS MQTT listener that feeds rumqttd's router through one
//! in-process link per client, and enforces per-topic rights on every PUBLISH and SUBSCRIBE.
//!
//! Architecture invariant: this is the only crate that knows MQTT frames and terminates TLS. It
//! knows nothing about stations or phones: admission is asked of an [`Admission`].

pub mod acl;
pub mod admission;
pub mod bus;
mod flight;
pub mod flood;
pub mod frame;
pub mod frontdoor;
pub mod handover;
pub mod mailbox;
pub mod metrics;
pub mod noise;
pub mod registry;
mod session;
pub mod tls;
mod tls_stream;

pub use acl::Rights;
pub use admission::{
    Admission, BoxFuture, ConnectInfo, Decision, MqttVersion, PresentedCertificate, Reason,
    Refusal, SessionControl, Trust,
};
pub use bus::{Bus, BusError, BusMessage, LocalBus};
pub use frontdoor::{Broker, BrokerError, Settings, RESERVED_CLIENT_ID_PREFIX};
pub use registry::Registry;
