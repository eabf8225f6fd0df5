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
    /// A message that has already arrived, without waiting (to handle a batch at once).
    fn try_next(&mut self) -> Option<BusMessage>;
}

/// The controller's in-process link into rumqttd's router: no TLS, no socket.
pub struct LocalBus {
    tx: rumqttd::local::LinkTx,
    rx: tokio::sync::mpsc::UnboundedReceiver<BusMessage>,
    reader: tokio::task::JoinHandle<()>,
}

impl LocalBus {
    pub(crate) fn new(tx: rumqttd::local::LinkTx, mut link_rx: rumqttd::local::LinkRx) -> Self {
        let (msg_tx, rx) = tokio::sync::mpsc::unbounded_channel();
        // One task owns the link's receiving side: `wake()` after an `Unschedule` must never be
        // cancelled half-way, so `next()` reads a channel instead (cancel-safe).
        let reader = tokio::spawn(async move {
            loop {
                match link_rx.next().await {
                    Ok(Some(rumqttd::Notification::Forward(forward))) => {
                        let topic = String::from_utf8_lossy(&forward.publish.topic).into_owned();
                        let message = BusMessage {
                            topic,
                            payload: forward.publish.payload,
                        };
                        if msg_tx.send(message).is_err() {
                            break;
                        }
                    }
                    Ok(Some(rumqttd::Notification::Unschedule)) => {
                        if link_rx.wake().await.is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
        });
        LocalBus { tx, rx, reader }
    }
}

impl Drop for LocalBus {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Bus for LocalBus {
    fn subscribe(&mut self, filter: &str) -> Result<(), BusError> {
        self.tx
            .subscribe(filter)
            .map(|_| ())
            .map_err(|_| BusError::Closed)
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>, retain: bool) -> Result<(), BusError> {
        if !retain {
            return self
                .tx
                .publish(topic.to_owned(), payload)
                .map(|_| ())
                .map_err(|_| BusError::Closed);
        }
        let packet = rumqttd::protocol::Packet::Publish(
            rumqttd::protocol::Publish::new(topic.to_owned().into_bytes(), payload, true),
            None,
        );
        // `LinkTx::send` is an `async fn` that completes without suspending.
        match crate::frontdoor::poll_once(self.tx.send(packet)) {
            Some(Ok(_)) => Ok(()),
            _ => Err(BusError::Closed),
        }
    }

    async fn next(&mut self) -> Result<BusMessage, BusError> {
        self.rx.recv().await.ok_or(BusError::Closed)
    }

    fn try_next(&mut self) -> Option<BusMessage> {
        self.rx.try_recv().ok()
    }
}
