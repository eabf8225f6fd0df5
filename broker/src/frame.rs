//! Small pure helpers around rumqttd's frame codec: protocol detection from the first CONNECT
//! bytes, the fields of a PUBLISH that rumqttd keeps crate-private, and packets the front door
//! writes itself (CONNACK refusals, server DISCONNECTs) in a form that each version's encoder
//! handles correctly. Also the front door's reading of a client's byte stream as one pure
//! function ([`decode_stream`]), which the fuzz targets and the corpus tests drive.

use std::panic::AssertUnwindSafe;

use bytes::BytesMut;
use rumqttd::protocol::{
    v4::V4, v5::V5, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect,
    DisconnectProperties, DisconnectReasonCode, Error as CodecError, Packet, Protocol,
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

/// Whether a fixed-header first byte is a packet type only a server sends (CONNACK, SUBACK,
/// UNSUBACK, PINGRESP): a client sending one commits a protocol error, and rumqttd's v5 decoder
/// panics on some of them, so they are refused before decoding.
pub fn server_only(first_byte: u8) -> bool {
    matches!(first_byte >> 4, 2 | 9 | 11 | 13)
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

/// Why a client's byte stream is not a sequence of MQTT frames the front door would accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("no usable CONNECT: {0}")]
    Preamble(#[from] PreambleError),
    #[error("frame {index} claims {claimed} bytes, more than the limit of {max}")]
    TooLarge {
        index: usize,
        claimed: usize,
        max: usize,
    },
    #[error("frame {index} is malformed: {source}")]
    Malformed {
        index: usize,
        #[source]
        source: CodecError,
    },
    #[error("rumqttd's decoder panicked on frame {index}")]
    DecoderPanicked { index: usize },
    #[error(
        "frame {index} decoded as a PUBLISH whose QoS and packet id cannot be read from its bytes"
    )]
    UnreadablePublishHeader { index: usize },
}

/// Decodes a client's byte stream the way the front door does: the protocol version from the
/// CONNECT preamble, then frame after frame with that version's codec, up to the first
/// incomplete frame (the front door would wait for more bytes there). A panic inside rumqttd's
/// decoder becomes [`DecodeError::DecoderPanicked`], as in the front door.
///
/// Memory: besides one copy of `bytes` and the decoded packets, nothing is allocated for a frame
/// until its header has been checked against `max_packet_size` (rumqttd's `check`), so a header
/// claiming 256 MiB is refused after its 5 bytes, without waiting for or reserving the rest.
pub fn decode_stream(bytes: &[u8], max_packet_size: usize) -> Result<Vec<Packet>, DecodeError> {
    decode_frames(bytes, max_packet_size, PanicGuard::Catch)
}

/// [`decode_stream`] without the `catch_unwind`: a panic in rumqttd's decoder propagates. Only
/// for the fuzz target, which must see such panics to report them.
pub fn decode_stream_unguarded(
    bytes: &[u8],
    max_packet_size: usize,
) -> Result<Vec<Packet>, DecodeError> {
    decode_frames(bytes, max_packet_size, PanicGuard::LetThrough)
}

#[derive(Clone, Copy)]
enum PanicGuard {
    Catch,
    LetThrough,
}

fn decode_frames(
    bytes: &[u8],
    max_packet_size: usize,
    guard: PanicGuard,
) -> Result<Vec<Packet>, DecodeError> {
    let Some(version) = connect_version(bytes)? else {
        return Ok(Vec::new());
    };
    let read = |buf: &mut BytesMut| match version {
        MqttVersion::V311 => V4.read_mut(buf, max_packet_size),
        MqttVersion::V5 => V5.read_mut(buf, max_packet_size),
    };
    let mut buf = BytesMut::from(bytes);
    let mut packets = Vec::new();
    while !buf.is_empty() {
        let index = packets.len();
        let peeked = publish_qos_pkid(&buf);
        let result = match guard {
            PanicGuard::Catch => std::panic::catch_unwind(AssertUnwindSafe(|| read(&mut buf)))
                .map_err(|_| DecodeError::DecoderPanicked { index })?,
            PanicGuard::LetThrough => read(&mut buf),
        };
        let packet = match result {
            Ok(packet) => packet,
            Err(CodecError::InsufficientBytes(_)) => break,
            Err(CodecError::PayloadSizeLimitExceeded(claimed)) => {
                return Err(DecodeError::TooLarge {
                    index,
                    claimed,
                    max: max_packet_size,
                })
            }
            Err(source) => return Err(DecodeError::Malformed { index, source }),
        };
        if index == 0 && !matches!(packet, Packet::Connect(..)) {
            return Err(PreambleError::NotConnect.into());
        }
        // The front door answers a refused PUBLISH from these raw fields: a PUBLISH that rumqttd
        // accepts but they cannot be read from would be our bug, which the fuzzer must see.
        if matches!(packet, Packet::Publish(..)) && peeked.is_none() {
            return Err(DecodeError::UnreadablePublishHeader { index });
        }
        packets.push(packet);
    }
    Ok(packets)
}

/// The CONNACK refusing a client, valid for its protocol version (rumqttd's v4 encoder panics on
/// v5-only codes).
/// A server PUBLISH at QoS 1 (no retain, no dup; under 5 with no properties). rumqttd's
/// `Publish` keeps QoS and packet id to itself, so the front door writes its own mailbox
/// messages (`crate::mailbox`) with this.
pub fn publish_qos1(version: MqttVersion, topic: &str, payload: &[u8], pkid: u16) -> Vec<u8> {
    let properties = usize::from(version == MqttVersion::V5);
    let remaining = 2 + topic.len() + 2 + properties + payload.len();
    let mut out = Vec::with_capacity(remaining + 5);
    out.push(0x32);
    let mut len = remaining;
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
    // Topics are the controller's own (at most a few dozen bytes), never over 65,535.
    out.extend_from_slice(&u16::try_from(topic.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(&pkid.to_be_bytes());
    if version == MqttVersion::V5 {
        out.push(0);
    }
    out.extend_from_slice(payload);
    out
}

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

    #[test]
    fn a_qos1_publish_decodes_with_its_topic_packet_id_and_payload() {
        for version in [MqttVersion::V311, MqttVersion::V5] {
            for size in [0usize, 10, 200, 20_000] {
                let payload = vec![b'x'; size];
                let bytes = publish_qos1(version, "stations/S1/cmd", &payload, 0x8123);
                assert_eq!(publish_qos_pkid(&bytes), Some((1, 0x8123)));
                let mut buf = bytes::BytesMut::from(&bytes[..]);
                let packet = match version {
                    MqttVersion::V311 => rumqttd::protocol::Protocol::read_mut(
                        &mut rumqttd::protocol::v4::V4,
                        &mut buf,
                        1 << 20,
                    ),
                    MqttVersion::V5 => rumqttd::protocol::Protocol::read_mut(
                        &mut rumqttd::protocol::v5::V5,
                        &mut buf,
                        1 << 20,
                    ),
                }
                .expect("decodes");
                let rumqttd::protocol::Packet::Publish(publish, _) = packet else {
                    panic!("not a PUBLISH: {packet:?}");
                };
                assert_eq!(&publish.topic[..], b"stations/S1/cmd");
                assert_eq!(publish.payload.len(), size);
                assert!(buf.is_empty());
            }
        }
    }
    use rumqttd::protocol::Publish;

    const MAX: usize = 64 * 1024;

    /// CONNECT of client "c", clean session, keep-alive 60, at `level` (4 or 5).
    fn connect(level: u8) -> Vec<u8> {
        let mut frame = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 60];
        if level == 5 {
            frame.push(0); // no properties
        }
        frame.extend_from_slice(&[0, 1, b'c']);
        frame[1] = (frame.len() - 2) as u8;
        frame
    }

    #[test]
    fn decodes_a_stream_of_frames_for_both_versions() {
        for level in [4, 5] {
            let mut stream = connect(level);
            // PUBLISH QoS 1 "a/b" pkid 7 (v5: empty properties), then PINGREQ.
            if level == 4 {
                stream.extend_from_slice(&[0x32, 8, 0, 3, b'a', b'/', b'b', 0, 7, b'x']);
            } else {
                stream.extend_from_slice(&[0x32, 9, 0, 3, b'a', b'/', b'b', 0, 7, 0, b'x']);
            }
            stream.extend_from_slice(&[0xc0, 0]);
            let packets = decode_stream(&stream, MAX).expect("decodes");
            assert_eq!(packets.len(), 3, "level {level}: {packets:?}");
            assert!(matches!(packets[0], Packet::Connect(..)));
            assert!(matches!(&packets[1], Packet::Publish(p, _) if &p.topic[..] == b"a/b"));
            assert!(matches!(packets[2], Packet::PingReq(_)));
        }
    }

    #[test]
    fn stops_at_the_first_incomplete_frame() {
        let mut stream = connect(4);
        stream.extend_from_slice(&[0x30, 10, 0, 1]);
        assert_eq!(decode_stream(&stream, MAX).map(|p| p.len()), Ok(1));
        assert_eq!(decode_stream(&stream[..7], MAX), Ok(vec![]));
        assert_eq!(decode_stream(&[], MAX), Ok(vec![]));
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(
            decode_stream(&[0x30, 0], MAX),
            Err(DecodeError::Preamble(PreambleError::NotConnect))
        );
        let mut stream = connect(4);
        stream.extend_from_slice(&[0x32, 3, 0, 1, b'a']); // QoS 1 without a packet id
        assert!(matches!(
            decode_stream(&stream, MAX),
            Err(DecodeError::Malformed { index: 1, .. })
        ));
        // rumqttd keeps a PUBLISH topic as bytes (the front door's rights check refuses one that
        // is not UTF-8), but a SUBSCRIBE filter must be UTF-8.
        let mut stream = connect(4);
        stream.extend_from_slice(&[0x30, 4, 0, 2, 0xff, 0xfe]);
        assert!(matches!(
            decode_stream(&stream, MAX).as_deref(),
            Ok([_, Packet::Publish(p, _)]) if p.topic[..] == [0xff, 0xfe]
        ));
        let mut stream = connect(4);
        stream.extend_from_slice(&[0x82, 6, 0, 1, 0, 1, 0xff, 0]);
        assert!(matches!(
            decode_stream(&stream, MAX),
            Err(DecodeError::Malformed {
                index: 1,
                source: CodecError::PayloadNotUtf8(_)
            })
        ));
    }

    #[test]
    fn a_huge_claimed_length_is_refused_from_its_header_alone() {
        // Remaining length 0xFFFFFF7F = 268_435_455: refused after these 5 bytes, with no
        // request for more and nothing reserved, in both codecs.
        let header = [0x30, 0xff, 0xff, 0xff, 0x7f];
        for level in [4, 5] {
            let mut stream = connect(level);
            stream.extend_from_slice(&header);
            assert_eq!(
                decode_stream(&stream, MAX),
                Err(DecodeError::TooLarge {
                    index: 1,
                    claimed: 268_435_455,
                    max: MAX
                })
            );
        }
        let mut buf = BytesMut::from(&header[..]);
        let capacity = buf.capacity();
        assert_eq!(
            V4.read_mut(&mut buf, MAX),
            Err(CodecError::PayloadSizeLimitExceeded(268_435_455))
        );
        assert_eq!(
            V5.read_mut(&mut buf, MAX),
            Err(CodecError::PayloadSizeLimitExceeded(268_435_455))
        );
        assert_eq!((buf.len(), buf.capacity()), (5, capacity));
        // Even the CONNECT itself.
        let mut connect_header = vec![0x10, 0xff, 0xff, 0xff, 0x7f];
        connect_header.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4]);
        assert!(matches!(
            decode_stream(&connect_header, MAX),
            Err(DecodeError::TooLarge { index: 0, .. })
        ));
    }

    #[test]
    fn a_panic_in_the_decoder_is_an_error_when_guarded() {
        // rumqttd's v5 decoder reaches `unreachable!` on a CONNACK sent by a client.
        let mut stream = connect(5);
        stream.extend_from_slice(&[0x20, 2, 0, 0]);
        assert_eq!(
            decode_stream(&stream, MAX),
            Err(DecodeError::DecoderPanicked { index: 1 })
        );
        let unguarded = std::panic::catch_unwind(|| decode_stream_unguarded(&stream, MAX));
        assert!(
            unguarded.is_err(),
            "the unguarded path lets the panic through"
        );
    }

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
