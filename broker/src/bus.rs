//! The controller's MQTT side: a small interface ([`Bus`]) and its in-process implementation on
//! rumqttd's router ([`LocalBus`], added with the front door). Kept small so that the controller
//! can later also run against an external broker with rumqttc.

use std::future::Future;

use bytes::Bytes;

/// One message delivered to the controller.
#[derive(Debug, Clone)]
pub struct BusMessage {
    pub topic: String,
    pub payload: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("the router link is closed")]
    Closed,
}

/// Publish, subscribe and receive, as the controller needs them.
pub trait Bus: Send + 'static {
    /// Subscribe to a filter (the controller's link has every right).
    fn subscribe(&mut self, filter: &str) -> Result<(), BusError>;
    /// Publish a message; `retain` keeps it for later subscribers.
    fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), BusError>;
    /// The next message on a subscribed filter. Cancel-safe: usable in `tokio::select!`.
    fn next(&mut self) -> impl Future<Output = Result<BusMessage, BusError>> + Send;
}
