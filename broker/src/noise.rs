//! Log messages of the libraries under the front door (rumqttd, rustls) that are not news to
//! an operator, and how fleetd keeps them out of its log. They are named here because only
//! this crate knows those libraries.

/// Targets whose level fleetd sets unless `RUST_LOG` names them, and why:
/// - `rumqttd`: the router logs every link's connect and disconnect at info;
/// - `rustls::msgs::handshake`: rustls warns "Illegal SNI extension: ignoring IP address
///   presented as hostname" for every client that sends an IP address as SNI (mosquitto does,
///   given `-h 127.0.0.1`). RFC 6066 forbids it, but it does no harm: rustls ignores the name
///   and the handshake goes on (the front door serves one certificate whatever the SNI). A
///   client's odd SNI is not the operator's problem, so only this target's errors are logged;
///   a handshake that fails is logged by the front door at debug, per connection.
pub const QUIET_TARGETS: [(&str, &str); 2] =
    [("rumqttd", "warn"), ("rustls::msgs::handshake", "error")];

/// Whether `event` is rumqttd's `no-connection id N is already gone`, which its router logs at
/// ERROR (`router/routing.rs`, rumqttd 0.20) when a wake-up of a link (`Event::DeviceData`)
/// arrives after that link's DISCONNECT, which an earlier wake-up's read already handled: the
/// front door sends a packet and then the link's DISCONNECT, and each send queues a wake-up
/// (`LinkTx::send`). The router ignores the late wake-up, as it should: nothing is wrong, and
/// the front door cannot know whether an earlier wake-up is still queued. fleetd drops exactly
/// this message; the router's other errors are logged as they are.
pub fn is_router_noise(event: &tracing::Event<'_>) -> bool {
    let meta = event.metadata();
    if !meta.target().starts_with("rumqttd::router") || *meta.level() != tracing::Level::ERROR {
        return false;
    }
    let mut message = Message(None);
    event.record(&mut message);
    message.0.is_some_and(|m| is_gone_link(&m))
}

/// `no-connection id N is already gone`, N a number.
fn is_gone_link(message: &str) -> bool {
    message
        .strip_prefix("no-connection id ")
        .and_then(|rest| rest.strip_suffix(" is already gone"))
        .is_some_and(|id| !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()))
}

/// The `message` field of an event.
struct Message(Option<String>);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_gone_link_message_is_noise() {
        assert!(is_gone_link("no-connection id 17 is already gone"));
        assert!(!is_gone_link("no-connection id  is already gone"));
        assert!(!is_gone_link(
            "no-connection id 17 is already gone, and more"
        ));
        assert!(!is_gone_link("Invalid client_id: x"));
    }
}
