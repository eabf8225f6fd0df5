//! What travels on the bus: the admission contract's calls and the controller's changes to
//! sessions, as JSON. Payloads (device messages, deliveries) are base64 inside the JSON.

use std::net::SocketAddr;

use fleet_broker::{ConnectInfo, Decision, Rights};
use serde::{Deserialize, Serialize};

/// Bytes as base64 in JSON.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Which node, in which of its lives, sent a call: the controller addresses its answers and
/// changes to the edge by `edge`, and forgets the sessions of an earlier `incarnation`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EdgeId {
    pub edge: String,
    pub incarnation: u64,
}

/// [`fleet_broker::Admission::admit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admit {
    pub from: EdgeId,
    pub info: ConnectInfo,
}

/// The answer to [`Admit`], with the controller that decided.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Admitted {
    pub controller: u64,
    pub decision: Decision,
}

/// [`fleet_broker::Admission::session_opened`]; answered with `Option<Rights>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Opened {
    pub from: EdgeId,
    pub client_id: String,
    pub session_id: u64,
}

/// [`fleet_broker::Admission::session_closed`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Closed {
    pub from: EdgeId,
    pub client_id: String,
    pub session_id: u64,
}

/// [`fleet_broker::Admission::refused`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    pub client_id: String,
    pub peer_addr: SocketAddr,
    pub reason: String,
}

/// [`fleet_broker::Admission::message`]; answered with `bool`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    pub from: EdgeId,
    pub client_id: String,
    pub session_id: u64,
    pub topic: String,
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
}

/// The controller's beat: which controller serves now.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ControllerBeat {
    pub instance: u64,
}

/// A publication for every edge's router.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub topic: String,
    #[serde(with = "b64")]
    pub payload: Vec<u8>,
}

/// The controller's changes to sessions an edge holds ([`fleet_broker::SessionControl`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToEdge {
    /// `set_rights` (`session_id` none) or `set_rights_of`.
    Rights {
        client_id: String,
        session_id: Option<u64>,
        rights: Rights,
    },
    /// `cut`: a request, answered once the session's rights are withdrawn.
    Cut {
        client_id: String,
        last_topic: Option<String>,
    },
    /// `deliver` (`session_id` none) or `deliver_to`.
    Deliver {
        client_id: String,
        session_id: Option<u64>,
        topic: String,
        #[serde(with = "b64")]
        payload: Vec<u8>,
    },
    /// The client id was taken over by a session on another edge (or a later one on this
    /// edge): this one ends, if it is still the client id's live session here.
    TakenOver { client_id: String, session_id: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_survive_the_trip_whatever_their_bytes() {
        let sent = ToEdge::Deliver {
            client_id: "s1".into(),
            session_id: Some(7),
            topic: "t".into(),
            payload: (0..=255).collect(),
        };
        let text = serde_json::to_vec(&sent).unwrap();
        match serde_json::from_slice::<ToEdge>(&text).unwrap() {
            ToEdge::Deliver { payload, .. } => assert_eq!(payload, (0..=255).collect::<Vec<u8>>()),
            other => panic!("{other:?}"),
        }
        assert!(serde_json::from_slice::<Message>(br#"{"payload":"not base64!"}"#).is_err());
    }
}
