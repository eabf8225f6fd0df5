//! Small pure helpers around rumqttd's frame codec: protocol detection from the first CONNECT
//! bytes, the fields of a PUBLISH that rumqttd keeps crate-private, and packets the front door
//! writes itself (CONNACK refusals, server DISCONNECTs) in a form that each version's encoder
//! handles correctly.

use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Packet,
};

use crate::admission::{MqttVersion, Refusal};

/// Why the first bytes of a connection are not a usable CONNECT.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    #[error("malformed CONNECT header")]
    Malformed,
    #[error("unsupported MQTT protocol level {0}")]
    UnsupportedLevel(u8),
}

/// Reads an MQTT variable-length integer. `Ok(None)`: more bytes needed.
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, PreambleError> {
    let mut value = 0usize;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(PreambleError::Malformed)
}

/// Detects the protocol level of a CONNECT from its first bytes, before decoding it with the
/// matching codec. `Ok(None)`: more bytes are needed.
pub fn connect_version(buf: &[u8]) -> Result<Option<MqttVersion>, PreambleError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(PreambleError::NotConnect);
    }
    let Some((_, len_bytes)) = remaining_length(&buf[1..])? else {
        return Ok(None);
    };
    let rest = &buf[1 + len_bytes..];
    // Protocol name "MQTT" (length-prefixed) then the level byte.
    if rest.len() < 7 {
        return Ok(None);
    }
    if rest[..6] != [0x00, 0x04, b'M', b'Q', b'T', b'T'] {
        return Err(PreambleError::Malformed);
    }
    match rest[6] {
        4 => Ok(Some(MqttVersion::V311)),
        5 => Ok(Some(MqttVersion::V5)),
        level => Err(PreambleError::UnsupportedLevel(level)),
    }
}

/// QoS and packet id of the PUBLISH frame at the start of `buf`, read from the raw bytes
/// (rumqttd keeps these fields crate-private). `None` if `buf` does not start with a PUBLISH.
pub fn publish_qos_pkid(buf: &[u8]) -> Option<(u8, u16)> {
    let first = *buf.first()?;
    if first >> 4 != 3 {
        return None;
    }
    let qos = (first >> 1) & 0b11;
    if qos == 0 {
        return Some((0, 0));
    }
    let (_, len_bytes) = remaining_length(buf.get(1..)?).ok()??;
    let at = 1 + len_bytes;
    let topic_len = u16::from_be_bytes([*buf.get(at)?, *buf.get(at + 1)?]) as usize;
    let pk = at + 2 + topic_len;
    let pkid = u16::from_be_bytes([*buf.get(pk)?, *buf.get(pk + 1)?]);
    Some((qos, pkid))
}

/// The CONNACK refusing a client, valid for its protocol version (rumqttd's v4 encoder panics on
/// v5-only codes).
pub fn refusal_connack(version: MqttVersion, refusal: Refusal, reason: &str) -> Packet {
    let code = match (version, refusal) {
        (_, Refusal::NotAuthorized) => ConnectReturnCode::NotAuthorized,
        (_, Refusal::BadUserNameOrPassword) => ConnectReturnCode::BadUserNamePassword,
        (_, Refusal::ClientIdentifierNotValid) => ConnectReturnCode::ClientIdentifierNotValid,
        (MqttVersion::V311, Refusal::ServerUnavailable | Refusal::QuotaExceeded) => {
            ConnectReturnCode::ServiceUnavailable
        }
        (MqttVersion::V5, Refusal::ServerUnavailable) => ConnectReturnCode::ServerUnavailable,
        (MqttVersion::V5, Refusal::QuotaExceeded) => ConnectReturnCode::QuotaExceeded,
    };
    let props = match version {
        MqttVersion::V311 => None,
        MqttVersion::V5 => Some(ConnAckProperties {
            reason_string: Some(reason.to_owned()),
            ..Default::default()
        }),
    };
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        props,
    )
}

/// The CONNACK of an unsupported protocol level (always written with the 3.1.1 encoding, which
/// is what such a client can read).
pub fn unsupported_version_connack() -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code: ConnectReturnCode::RefusedProtocolVersion,
        },
        None,
    )
}

/// A server-initiated DISCONNECT for a v5 client, or `None` for 3.1.1 (which has none: the
/// server just closes). Always carries a reason string: rumqttd's v5 encoder writes a malformed
/// frame for a non-normal reason without properties.
pub fn server_disconnect(
    version: MqttVersion,
    reason: DisconnectReasonCode,
    text: &str,
) -> Option<Packet> {
    match version {
        MqttVersion::V311 => None,
        MqttVersion::V5 => Some(Packet::Disconnect(
            Disconnect {
                reason_code: reason,
            },
            Some(DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(text.to_owned()),
                user_properties: vec![],
                server_reference: None,
            }),
        )),
    }
}

/// Packets sent to a 3.1.1 client must carry no properties: rumqttd's v4 encoder hits
/// `unreachable!` for any packet with properties except CONNACK.
pub fn strip_properties(packet: Packet) -> Packet {
    match packet {
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(p, _) => Packet::PubAck(p, None),
        Packet::SubAck(p, _) => Packet::SubAck(p, None),
        Packet::PubRec(p, _) => Packet::PubRec(p, None),
        Packet::PubRel(p, _) => Packet::PubRel(p, None),
        Packet::PubComp(p, _) => Packet::PubComp(p, None),
        Packet::UnsubAck(p, _) => Packet::UnsubAck(p, None),
        Packet::Disconnect(p, _) => Packet::Disconnect(p, None),
        Packet::Subscribe(p, _) => Packet::Subscribe(p, None),
        Packet::Unsubscribe(p, _) => Packet::Unsubscribe(p, None),
        Packet::ConnAck(p, _) => Packet::ConnAck(p, None),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttd::protocol::{v4::V4, v5::V5, Protocol, Publish};

    #[test]
    fn detects_both_versions_and_asks_for_more_bytes() {
        let v4 = [0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
        assert_eq!(connect_version(&v4), Ok(Some(MqttVersion::V311)));
        let mut v5 = v4;
        v5[8] = 5;
        assert_eq!(connect_version(&v5), Ok(Some(MqttVersion::V5)));
        assert_eq!(connect_version(&v4[..5]), Ok(None));
        assert_eq!(connect_version(&[]), Ok(None));
        assert_eq!(connect_version(&[0x30, 0]), Err(PreambleError::NotConnect));
        let mut v3 = v4;
        v3[8] = 3;
        assert_eq!(
            connect_version(&v3),
            Err(PreambleError::UnsupportedLevel(3))
        );
        assert_eq!(
            connect_version(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(PreambleError::Malformed)
        );
    }

    #[test]
    fn reads_qos_and_packet_id_of_a_publish() {
        // QoS 1, topic "a/b", pkid 0x1234, payload "x"
        let frame = [0x32, 8, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'x'];
        assert_eq!(publish_qos_pkid(&frame), Some((1, 0x1234)));
        assert_eq!(publish_qos_pkid(&[0x30, 4, 0, 1, b'a', b'x']), Some((0, 0)));
        assert_eq!(publish_qos_pkid(&frame[..6]), None);
        assert_eq!(publish_qos_pkid(&[0x82, 0]), None);
    }

    #[test]
    fn refusals_encode_for_each_version() {
        for refusal in [
            Refusal::NotAuthorized,
            Refusal::BadUserNameOrPassword,
            Refusal::ClientIdentifierNotValid,
            Refusal::ServerUnavailable,
            Refusal::QuotaExceeded,
        ] {
            let mut buf = BytesMut::new();
            V4.write(refusal_connack(MqttVersion::V311, refusal, "r"), &mut buf)
                .expect("v4 connack encodes");
            assert_eq!(buf[0], 0x20);
            let mut buf = BytesMut::new();
            V5.write(refusal_connack(MqttVersion::V5, refusal, "r"), &mut buf)
                .expect("v5 connack encodes");
            assert_eq!(buf[0], 0x20);
        }
        let mut buf = BytesMut::new();
        V4.write(
            refusal_connack(MqttVersion::V311, Refusal::NotAuthorized, "r"),
            &mut buf,
        )
        .expect("encodes");
        assert_eq!(&buf[..], &[0x20, 2, 0, 5]);
    }

    #[test]
    fn server_disconnect_for_v5_is_well_formed() {
        let packet = server_disconnect(MqttVersion::V5, DisconnectReasonCode::NotAuthorized, "cut")
            .expect("v5 has a disconnect");
        let mut buf = BytesMut::new();
        V5.write(packet, &mut buf).expect("encodes");
        let decoded = V5.read_mut(&mut buf, 1024).expect("decodes");
        match decoded {
            Packet::Disconnect(d, _) => {
                assert_eq!(d.reason_code, DisconnectReasonCode::NotAuthorized)
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            server_disconnect(MqttVersion::V311, DisconnectReasonCode::NotAuthorized, "x")
                .is_none()
        );
    }

    #[test]
    fn v4_encoder_survives_a_publish_that_carried_properties() {
        let props = rumqttd::protocol::PublishProperties {
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let packet = strip_properties(Packet::Publish(Publish::new("a", "b", false), Some(props)));
        let mut buf = BytesMut::new();
        V4.write(packet, &mut buf)
            .expect("encodes without properties");
    }
}
