//! fleetgate's front door: a mutual-TLS MQTT listener that feeds rumqttd's router through one
//! in-process link per client, and enforces per-topic rights on every PUBLISH and SUBSCRIBE.

pub mod acl;
pub mod admission;
pub mod bus;

pub use acl::Rights;
pub use admission::{
    Admission, ConnectInfo, Decision, MqttVersion, PresentedCertificate, Refusal, SessionControl,
    Trust,
};
