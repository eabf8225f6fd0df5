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
    #[error("frame {index}: {violation}")]
    Violation { index: usize, violation: Violation },
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
        // The front door's own checks of a complete frame come before rumqttd's decoder.
        if let Some(frame) = complete_frame_len(&buf).and_then(|len| buf.get(..len)) {
            let checked = match index {
                0 if frame.first() == Some(&0x10) => check_connect(frame),
                0 => Ok(()),
                _ => check_frame(frame, version),
            };
            checked.map_err(|violation| DecodeError::Violation { index, violation })?;
        }
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

/// Appends `len` as MQTT's Remaining Length (a variable byte integer, MQTT 5 §1.5.5): seven
/// bits a byte, least significant first, the high bit set on every byte but the last.
pub fn push_remaining_length(out: &mut Vec<u8>, len: usize) {
    let mut len = len;
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
}

/// A server PUBLISH at QoS 1 (no retain, no dup; under 5 with no properties). rumqttd's
/// `Publish` keeps QoS and packet id to itself, so the front door writes its own mailbox
/// messages (`crate::mailbox`) with this.
pub fn publish_qos1(version: MqttVersion, topic: &str, payload: &[u8], pkid: u16) -> Vec<u8> {
    let properties = usize::from(version == MqttVersion::V5);
    let remaining = 2 + topic.len() + 2 + properties + payload.len();
    let mut out = Vec::with_capacity(remaining + 5);
    out.push(0x32);
    push_remaining_length(&mut out, remaining);
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

/// An MQTT 5 CONNACK with any reason code and a reason string, for the refusals no [`Refusal`]
/// names: a CONNECT that breaks the standard ([`Violation::connack_code`]), an authentication
/// method the front door does not support.
pub fn reason_connack(code: ConnectReturnCode, reason: &str) -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        Some(ConnAckProperties {
            reason_string: Some(reason.to_owned()),
            ..Default::default()
        }),
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

// What rumqttd's decoder lets through. It reads the fields it needs and ignores the rest: a
// reserved flag, a property given twice, a Receive Maximum of 0, the reserved bits of a
// subscription's options. The front door checks the raw bytes of each complete frame with the
// functions below before it hands the frame to the decoder.

/// A frame that breaks a rule of MQTT that rumqttd's decoder does not check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// Not in the format the standard gives the packet: reason 0x81 (Malformed Packet).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// In the right format, but against a rule of the standard: reason 0x82 (Protocol Error).
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
}

impl Violation {
    /// The CONNACK reason code of an MQTT 5 CONNECT with this violation.
    pub fn connack_code(self) -> ConnectReturnCode {
        match self {
            Violation::Malformed(_) => ConnectReturnCode::MalformedPacket,
            Violation::ProtocolError(_) => ConnectReturnCode::ProtocolError,
        }
    }

    /// The DISCONNECT reason code of an MQTT 5 packet with this violation.
    pub fn disconnect_code(self) -> DisconnectReasonCode {
        match self {
            Violation::Malformed(_) => DisconnectReasonCode::MalformedPacket,
            Violation::ProtocolError(_) => DisconnectReasonCode::ProtocolError,
        }
    }
}

/// Length of the frame at the start of `buf` (fixed header included), if all of it is there.
pub fn complete_frame_len(buf: &[u8]) -> Option<usize> {
    let (len, len_bytes) = remaining_length(buf.get(1..)?).ok()??;
    let total = len.checked_add(1 + len_bytes)?;
    (buf.len() >= total).then_some(total)
}

/// A cursor over bytes a peer sent: every read is bounds-checked, `None` past the end.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1)?.first().copied()
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }

    /// A Variable Byte Integer.
    fn vbi(&mut self) -> Option<usize> {
        let (value, len) = remaining_length(self.0).ok()??;
        self.take(len)?;
        Some(value)
    }

    /// Binary Data, or the bytes of a UTF-8 Encoded String: a two-byte length, then the bytes.
    fn binary(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.u16()?);
        self.take(len)
    }

    /// A UTF-8 Encoded String: well-formed UTF-8 without U+0000 [MQTT-1.5.4-1], [MQTT-1.5.4-2].
    fn utf8(&mut self, what: &'static str) -> Result<&'a str, Violation> {
        let bytes = self.binary().ok_or(Violation::Malformed(what))?;
        std::str::from_utf8(bytes)
            .ok()
            .filter(|s| !s.contains('\0'))
            .ok_or(Violation::Malformed(what))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The body of the frame in `frame` (after its fixed header), and its first byte.
fn frame_body(frame: &[u8]) -> Result<(u8, Cursor<'_>), Violation> {
    let truncated = Violation::Malformed("truncated packet");
    let mut c = Cursor(frame);
    let first = c.u8().ok_or(truncated)?;
    let len = c.vbi().ok_or(truncated)?;
    Ok((first, Cursor(c.take(len).ok_or(truncated)?)))
}

/// The packets whose properties are checked here, each with the properties it may carry.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PropertiesOf {
    Connect,
    Will,
}

/// How a property's value is encoded (MQTT 5 §2.2.2.2).
#[derive(Clone, Copy)]
enum PropertyValue {
    Byte,
    TwoBytes,
    FourBytes,
    VariableByteInteger,
    Utf8,
    Binary,
    Utf8Pair,
}

const USER_PROPERTY: u8 = 0x26;
const AUTHENTICATION_METHOD: u8 = 0x15;
const AUTHENTICATION_DATA: u8 = 0x16;

fn property_value(id: u8) -> Option<PropertyValue> {
    use PropertyValue::*;
    Some(match id {
        0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2a => Byte,
        0x13 | 0x21 | 0x22 | 0x23 => TwoBytes,
        0x02 | 0x11 | 0x18 | 0x27 => FourBytes,
        0x0b => VariableByteInteger,
        0x03 | 0x08 | 0x12 | 0x15 | 0x1a | 0x1c | 0x1f => Utf8,
        0x09 | 0x16 => Binary,
        USER_PROPERTY => Utf8Pair,
        _ => return None,
    })
}

fn property_allowed(of: PropertiesOf, id: u8) -> bool {
    match of {
        // Session Expiry, Receive Maximum, Maximum Packet Size, Topic Alias Maximum, Request
        // Response Information, Request Problem Information, User Property, Authentication
        // Method and Data (MQTT 5 §3.1.2.11).
        PropertiesOf::Connect => matches!(
            id,
            0x11 | 0x21 | 0x27 | 0x22 | 0x19 | 0x17 | USER_PROPERTY | 0x15 | 0x16
        ),
        // Will Delay, Payload Format Indicator, Message Expiry, Content Type, Response Topic,
        // Correlation Data, User Property (MQTT 5 §3.1.3.2).
        PropertiesOf::Will => matches!(id, 0x18 | 0x01 | 0x02 | 0x03 | 0x08 | 0x09 | USER_PROPERTY),
    }
}

/// Reads a property list (its length, then the properties) and checks it: only properties the
/// packet may carry (any other is malformed, MQTT 5 §2.2.2.2), none but User Property twice,
/// and the values the standard gives each.
fn check_properties(c: &mut Cursor<'_>, of: PropertiesOf) -> Result<(), Violation> {
    let len = c
        .vbi()
        .ok_or(Violation::Malformed("unreadable property length"))?;
    let mut props = Cursor(
        c.take(len)
            .ok_or(Violation::Malformed("properties run past the packet"))?,
    );
    let truncated = Violation::Malformed("truncated property");
    // One bit per property identifier; every identifier defined is below 64.
    let mut seen = 0u64;
    while !props.is_empty() {
        let id = props.u8().ok_or(truncated)?;
        let value = property_value(id)
            .filter(|_| property_allowed(of, id))
            .ok_or(Violation::Malformed("a property this packet may not carry"))?;
        if id != USER_PROPERTY {
            let bit = 1u64 << id;
            if seen & bit != 0 {
                return Err(Violation::ProtocolError("a property appears twice"));
            }
            seen |= bit;
        }
        match value {
            PropertyValue::Byte => {
                let byte = props.u8().ok_or(truncated)?;
                // Payload Format Indicator, Request Problem and Response Information: 0 or 1.
                if byte > 1 {
                    return Err(Violation::ProtocolError("a property that must be 0 or 1"));
                }
            }
            PropertyValue::TwoBytes => {
                let value = props.u16().ok_or(truncated)?;
                // Receive Maximum (MQTT 5 §3.1.2.11.3).
                if id == 0x21 && value == 0 {
                    return Err(Violation::ProtocolError("Receive Maximum 0"));
                }
            }
            PropertyValue::FourBytes => {
                let value = props.u32().ok_or(truncated)?;
                // Maximum Packet Size (MQTT 5 §3.1.2.11.4).
                if id == 0x27 && value == 0 {
                    return Err(Violation::ProtocolError("Maximum Packet Size 0"));
                }
            }
            PropertyValue::VariableByteInteger => {
                props.vbi().ok_or(truncated)?;
            }
            PropertyValue::Utf8 => {
                props.utf8("a property string that is not UTF-8")?;
            }
            PropertyValue::Binary => {
                props.binary().ok_or(truncated)?;
            }
            PropertyValue::Utf8Pair => {
                props.utf8("a user property that is not UTF-8")?;
                props.utf8("a user property that is not UTF-8")?;
            }
        }
    }
    let has = |id: u8| seen & (1u64 << id) != 0;
    if has(AUTHENTICATION_DATA) && !has(AUTHENTICATION_METHOD) {
        return Err(Violation::ProtocolError(
            "Authentication Data without an Authentication Method",
        ));
    }
    Ok(())
}

/// Checks a complete CONNECT frame (fixed header included) for what rumqttd's decoder lets
/// through: the reserved connect flag [MQTT-3.1.2-3], will QoS and retain without a will
/// [MQTT-3.1.2-11], [MQTT-3.1.2-13], will QoS 3, strings that are not UTF-8 [MQTT-3.1.3-4],
/// [MQTT-3.1.3-11], [MQTT-3.1.3-12], a property that appears twice where the standard forbids
/// it, Receive Maximum or Maximum Packet Size 0, and bytes after the last field.
pub fn check_connect(frame: &[u8]) -> Result<(), Violation> {
    let truncated = Violation::Malformed("truncated CONNECT");
    let (first, mut c) = frame_body(frame)?;
    if first != 0x10 {
        return Err(Violation::Malformed(
            "reserved bits of the CONNECT fixed header",
        ));
    }
    if c.binary() != Some(b"MQTT") {
        return Err(Violation::Malformed("protocol name"));
    }
    let v5 = match c.u8() {
        Some(4) => false,
        Some(5) => true,
        _ => return Err(Violation::Malformed("protocol level")),
    };
    let flags = c.u8().ok_or(truncated)?;
    if flags & 0x01 != 0 {
        return Err(Violation::Malformed("the reserved connect flag is set"));
    }
    let (will, will_qos, will_retain) = (flags & 0x04 != 0, (flags >> 3) & 0b11, flags & 0x20 != 0);
    let (username, password) = (flags & 0x80 != 0, flags & 0x40 != 0);
    if !will && (will_qos != 0 || will_retain) {
        return Err(Violation::Malformed("will QoS or retain without a will"));
    }
    if will_qos == 3 {
        return Err(Violation::Malformed("will QoS 3"));
    }
    // MQTT 3.1.1 [MQTT-3.1.2-22]; MQTT 5 allows a password alone.
    if !v5 && password && !username {
        return Err(Violation::Malformed("a password without a user name"));
    }
    c.u16().ok_or(truncated)?; // keep alive
    if v5 {
        check_properties(&mut c, PropertiesOf::Connect)?;
    }
    c.utf8("a client identifier that is not UTF-8")?;
    if will {
        if v5 {
            check_properties(&mut c, PropertiesOf::Will)?;
        }
        c.utf8("a will topic that is not UTF-8")?;
        c.binary().ok_or(truncated)?;
    }
    if username {
        c.utf8("a user name that is not UTF-8")?;
    }
    if password {
        c.binary().ok_or(truncated)?;
    }
    if !c.is_empty() {
        return Err(Violation::Malformed("bytes after the CONNECT payload"));
    }
    Ok(())
}

/// Checks a complete frame after CONNECT for what rumqttd's decoder lets through: the reserved
/// bits of the fixed header ([MQTT-2.1.3-1]: PUBREL, SUBSCRIBE and UNSUBSCRIBE must carry 0010
/// [MQTT-3.6.1-1], [MQTT-3.8.1-1], [MQTT-3.10.1-1], DISCONNECT 0000 [MQTT-3.14.1-1]), PUBLISH
/// with QoS 3 [MQTT-3.3.1-4], the reserved bits of a subscription's options [MQTT-3.8.3-5] and
/// its QoS or Retain Handling 3, an empty SUBSCRIBE or UNSUBSCRIBE [MQTT-3.8.3-2],
/// [MQTT-3.10.3-2], and an AUTH packet (the front door supports no authentication method, so
/// no client may send one). Packets only a server sends are left to [`server_only`].
pub fn check_frame(frame: &[u8], version: MqttVersion) -> Result<(), Violation> {
    let Some(&first) = frame.first() else {
        return Ok(());
    };
    let v5 = version == MqttVersion::V5;
    let reserved = Violation::Malformed("reserved bits of the fixed header");
    let (kind, flags) = (first >> 4, first & 0x0f);
    match kind {
        3 if (flags >> 1) & 0b11 == 3 => Err(Violation::Malformed("PUBLISH with QoS 3")),
        3 => Ok(()),
        15 if v5 => Err(Violation::ProtocolError(
            "AUTH without an Authentication Method in CONNECT",
        )),
        0 | 15 => Err(Violation::Malformed("a reserved packet type")),
        2 | 9 | 11 | 13 => Ok(()),
        6 | 8 | 10 if flags != 0b0010 => Err(reserved),
        8 => check_subscribe(frame, v5),
        10 => check_unsubscribe(frame, v5),
        _ if kind != 6 && flags != 0 => Err(reserved),
        _ => Ok(()),
    }
}

/// The texts a SUBSCRIBE's or UNSUBSCRIBE's violations are named with.
struct FilterPacket {
    truncated: &'static str,
    no_filter: &'static str,
}

/// Skips the packet id and (MQTT 5) the properties of a SUBSCRIBE or UNSUBSCRIBE, and checks
/// that at least one topic filter follows: the cursor is at the first filter.
fn filters_of<'a>(frame: &'a [u8], v5: bool, names: FilterPacket) -> Result<Cursor<'a>, Violation> {
    let truncated = Violation::Malformed(names.truncated);
    let (_, mut c) = frame_body(frame)?;
    c.u16().ok_or(truncated)?;
    if v5 {
        let len = c.vbi().ok_or(truncated)?;
        c.take(len).ok_or(truncated)?;
    }
    if c.is_empty() {
        return Err(if v5 {
            Violation::ProtocolError(names.no_filter)
        } else {
            Violation::Malformed(names.no_filter)
        });
    }
    Ok(c)
}

fn check_subscribe(frame: &[u8], v5: bool) -> Result<(), Violation> {
    let names = FilterPacket {
        truncated: "truncated SUBSCRIBE",
        no_filter: "a SUBSCRIBE without a topic filter",
    };
    let truncated = Violation::Malformed(names.truncated);
    let mut c = filters_of(frame, v5, names)?;
    while !c.is_empty() {
        c.utf8("a topic filter that is not UTF-8")?;
        let options = c.u8().ok_or(truncated)?;
        if v5 {
            if options & 0b1100_0000 != 0 {
                return Err(Violation::Malformed(
                    "reserved bits of the subscription options",
                ));
            }
            if options & 0b11 == 3 || (options >> 4) & 0b11 == 3 {
                return Err(Violation::ProtocolError("QoS or Retain Handling 3"));
            }
        } else if options & 0b1111_1100 != 0 || options & 0b11 == 3 {
            return Err(Violation::Malformed("reserved bits of the requested QoS"));
        }
    }
    Ok(())
}

fn check_unsubscribe(frame: &[u8], v5: bool) -> Result<(), Violation> {
    let names = FilterPacket {
        truncated: "truncated UNSUBSCRIBE",
        no_filter: "an UNSUBSCRIBE without a topic filter",
    };
    let mut c = filters_of(frame, v5, names)?;
    while !c.is_empty() {
        c.utf8("a topic filter that is not UTF-8")?;
    }
    Ok(())
}

/// Topic Alias Maximum the front door advertises in its CONNACK (MQTT 5 §3.2.2.3.8): the
/// aliases a client may use for the topics it publishes to. A session holds at most this many
/// topics (each at most 65,535 bytes), copied out of their packets.
pub const TOPIC_ALIAS_MAXIMUM: u16 = 16;

/// A client's topic aliases on one network connection (MQTT 5 §3.3.2.3.4): which topic each
/// alias from 1 to [`TOPIC_ALIAS_MAXIMUM`] stands for. Never carried over to another
/// connection [MQTT-3.3.2-7].
#[derive(Debug, Default)]
pub struct TopicAliases {
    topics: Vec<Option<bytes::Bytes>>,
}

/// Why a PUBLISH's topic cannot be resolved (MQTT 5 §3.3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AliasError {
    /// Reason 0x94 (Topic Alias invalid).
    #[error("topic alias {0} is 0 or above the maximum of {max}", max = TOPIC_ALIAS_MAXIMUM)]
    OutOfRange(u16),
    /// Reason 0x82 (Protocol Error).
    #[error("topic alias {0} has no topic yet and the PUBLISH names none")]
    Unknown(u16),
    /// Reason 0x82 (Protocol Error).
    #[error("a PUBLISH with neither a topic name nor a topic alias")]
    NoTopic,
}

impl AliasError {
    pub fn disconnect_code(self) -> DisconnectReasonCode {
        match self {
            AliasError::OutOfRange(_) => DisconnectReasonCode::TopicAliasInvalid,
            AliasError::Unknown(_) | AliasError::NoTopic => DisconnectReasonCode::ProtocolError,
        }
    }
}

impl TopicAliases {
    /// The topic a PUBLISH with topic name `topic` and topic alias `alias` is for: its own name
    /// (and, with an alias, that alias is set to it), or the one its alias stands for.
    pub fn resolve(
        &mut self,
        topic: &bytes::Bytes,
        alias: Option<u16>,
    ) -> Result<bytes::Bytes, AliasError> {
        let Some(alias) = alias else {
            return if topic.is_empty() {
                Err(AliasError::NoTopic)
            } else {
                Ok(topic.clone())
            };
        };
        if alias == 0 || alias > TOPIC_ALIAS_MAXIMUM {
            return Err(AliasError::OutOfRange(alias));
        }
        let slot = usize::from(alias - 1);
        if topic.is_empty() {
            return self
                .topics
                .get(slot)
                .cloned()
                .flatten()
                .ok_or(AliasError::Unknown(alias));
        }
        if self.topics.len() <= slot {
            self.topics.resize(slot + 1, None);
        }
        // A copy: the topic is a slice of its packet, which would stay in memory with it.
        let owned = bytes::Bytes::copy_from_slice(topic);
        if let Some(entry) = self.topics.get_mut(slot) {
            *entry = Some(owned.clone());
        }
        Ok(owned)
    }
}

/// The same MQTT 5 packet without its properties, for a client whose Maximum Packet Size the
/// full packet exceeds: a CONNACK, DISCONNECT, PUBACK, PUBREC, PUBREL or PUBCOMP keeps its
/// reason code and drops its reason string and user properties ([MQTT-3.2.2-19],
/// [MQTT-3.14.2-3], [MQTT-3.4.2-2] …). `None` for other packets and for bytes that are not
/// such a packet.
pub fn without_properties(encoded: &[u8]) -> Option<Vec<u8>> {
    let first = *encoded.first()?;
    let (len, len_bytes) = remaining_length(encoded.get(1..)?).ok()??;
    let body = encoded.get(1 + len_bytes..(1 + len_bytes).checked_add(len)?)?;
    match first {
        // Acknowledge flags and reason code, then a property length of 0.
        0x20 => Some([&[0x20, 3][..], body.get(..2)?, &[0]].concat()),
        // The reason code alone: a DISCONNECT shorter than 2 has no properties.
        0xe0 => Some(vec![0xe0, 1, *body.first()?]),
        // Packet identifier and reason code: shorter than 4 has no properties.
        0x40 | 0x50 | 0x62 | 0x70 => Some([&[first, 3][..], body.get(..3)?].concat()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_lengths_read_back_as_written_at_every_width() {
        for len in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut out = Vec::new();
            push_remaining_length(&mut out, len);
            assert_eq!(remaining_length(&out), Ok(Some((len, out.len()))), "{len}");
        }
    }

    #[test]
    fn a_qos1_publish_decodes_with_its_topic_packet_id_and_payload() {
        for version in [MqttVersion::V311, MqttVersion::V5] {
            for size in [0usize, 10, 200, 20_000] {
                let payload = vec![b'x'; size];
                let bytes = publish_qos1(version, "devices/S1/cmd", &payload, 0x8123);
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
                assert_eq!(&publish.topic[..], b"devices/S1/cmd");
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
            Err(DecodeError::Violation {
                index: 1,
                violation: Violation::Malformed(_)
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
    fn a_v5_refusal_carries_its_reason_string_and_a_311_one_only_its_code() {
        let reason = "station rejected by an operator";
        let mut buf = BytesMut::new();
        V5.write(
            refusal_connack(MqttVersion::V5, Refusal::NotAuthorized, reason),
            &mut buf,
        )
        .expect("v5 connack encodes");
        // Fixed header, flags, reason code 0x87, properties: one Reason String (0x1F), a
        // two-byte length, the UTF-8 text.
        let mut wanted = vec![0x20, 0, 0, 0x87, 0, 0x1f, 0, reason.len() as u8];
        wanted.extend_from_slice(reason.as_bytes());
        wanted[4] = (3 + reason.len()) as u8;
        wanted[1] = (wanted.len() - 2) as u8;
        assert_eq!(&buf[..], &wanted[..]);
        let mut buf = BytesMut::new();
        V4.write(
            refusal_connack(MqttVersion::V311, Refusal::BadUserNameOrPassword, reason),
            &mut buf,
        )
        .expect("v4 connack encodes");
        assert_eq!(&buf[..], &[0x20, 2, 0, 4]);
    }

    #[test]
    fn a_reason_string_of_128_bytes_or_more_has_multi_byte_lengths() {
        let reason = "r".repeat(200);
        let mut buf = BytesMut::new();
        V5.write(
            refusal_connack(MqttVersion::V5, Refusal::NotAuthorized, &reason),
            &mut buf,
        )
        .expect("v5 connack encodes");
        // Remaining length 207 = 1 + 1 + 2 (property length 203) + 1 + 2 + 200, each a
        // two-byte variable byte integer.
        let mut wanted = vec![0x20, 0xcf, 0x01, 0, 0x87, 0xcb, 0x01, 0x1f, 0, 200];
        wanted.extend_from_slice(reason.as_bytes());
        assert_eq!(&buf[..], &wanted[..]);
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

    mod checks {
        use super::super::*;
        use bytes::Bytes;
        use proptest::prelude::*;
        use rumqttd::protocol::{
            Connect, ConnectProperties, LastWill, LastWillProperties, Login, QoS,
        };

        fn encode(version: MqttVersion, packet: Packet) -> Vec<u8> {
            let mut buf = BytesMut::new();
            match version {
                MqttVersion::V311 => V4.write(packet, &mut buf),
                MqttVersion::V5 => V5.write(packet, &mut buf),
            }
            .expect("encodes");
            buf.to_vec()
        }

        fn connect_packet(
            props: Option<ConnectProperties>,
            will: Option<(LastWill, Option<LastWillProperties>)>,
            login: Option<Login>,
        ) -> Packet {
            let (will, will_props) = match will {
                Some((w, p)) => (Some(w), p),
                None => (None, None),
            };
            Packet::Connect(
                Connect {
                    keep_alive: 30,
                    client_id: "c".into(),
                    clean_session: true,
                },
                props,
                will,
                will_props,
                login,
            )
        }

        /// A v5 CONNECT of client "c" with these properties, given as raw bytes.
        fn v5_connect_with_properties(props: &[u8]) -> Vec<u8> {
            let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30];
            body.push(props.len() as u8);
            body.extend_from_slice(props);
            body.extend_from_slice(&[0, 1, b'c']);
            let mut frame = vec![0x10, body.len() as u8];
            frame.extend(body);
            frame
        }

        fn will() -> (LastWill, Option<LastWillProperties>) {
            (
                LastWill {
                    topic: Bytes::from_static(b"w/t"),
                    message: Bytes::from_static(b"gone"),
                    qos: QoS::AtLeastOnce,
                    retain: true,
                },
                Some(LastWillProperties {
                    delay_interval: Some(5),
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    content_type: Some("text/plain".into()),
                    response_topic: Some("r/t".into()),
                    correlation_data: Some(Bytes::from_static(b"id")),
                    user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                }),
            )
        }

        #[test]
        fn connects_as_clients_write_them_pass() {
            let props = ConnectProperties {
                session_expiry_interval: Some(0),
                receive_maximum: Some(10),
                max_packet_size: Some(1024),
                topic_alias_max: Some(4),
                request_response_info: Some(1),
                request_problem_info: Some(0),
                user_properties: vec![("a".into(), "b".into()), ("a".into(), "c".into())],
                authentication_method: Some("SCRAM".into()),
                authentication_data: Some(Bytes::from_static(b"x")),
            };
            let login = Login {
                username: "u".into(),
                password: "p".into(),
            };
            let frame = encode(
                MqttVersion::V5,
                connect_packet(Some(props), Some(will()), Some(login.clone())),
            );
            assert_eq!(check_connect(&frame), Ok(()));
            let frame = encode(MqttVersion::V5, connect_packet(None, None, None));
            assert_eq!(check_connect(&frame), Ok(()));
            let v4_will = (will().0, None);
            let frame = encode(
                MqttVersion::V311,
                connect_packet(None, Some(v4_will), Some(login)),
            );
            assert_eq!(check_connect(&frame), Ok(()));
        }

        /// [MQTT-3.1.2-1]: "The protocol name MUST be the UTF-8 String "MQTT"".
        #[test]
        fn the_protocol_name_must_be_mqtt() {
            let mut frame = encode(MqttVersion::V5, connect_packet(None, None, None));
            assert_eq!(&frame[4..8], b"MQTT");
            frame[7] = b'X';
            assert_eq!(
                check_connect(&frame),
                Err(Violation::Malformed("protocol name"))
            );
            assert_eq!(connect_version(&frame), Err(PreambleError::Malformed));
        }

        /// [MQTT-3.1.2-3]: "The Server MUST validate that the reserved flag in the CONNECT
        /// packet is set to 0". If it is not 0 it is a Malformed Packet.
        #[test]
        fn the_reserved_connect_flag_is_malformed_in_both_versions() {
            for version in [MqttVersion::V311, MqttVersion::V5] {
                let mut frame = encode(version, connect_packet(None, None, None));
                assert_eq!(frame[9], 0x02, "connect flags");
                frame[9] |= 0x01;
                assert!(matches!(
                    check_connect(&frame),
                    Err(Violation::Malformed(_))
                ));
            }
        }

        /// MQTT 5 §3.1.2.11.3: "It is a Protocol Error to include the Receive Maximum value
        /// more than once or for it to have the value 0"; §3.1.2.11.4 likewise for a Maximum
        /// Packet Size of zero.
        #[test]
        fn receive_maximum_or_maximum_packet_size_0_is_a_protocol_error() {
            let zero_receive = ConnectProperties {
                session_expiry_interval: None,
                receive_maximum: Some(0),
                max_packet_size: None,
                topic_alias_max: None,
                request_response_info: None,
                request_problem_info: None,
                user_properties: vec![],
                authentication_method: None,
                authentication_data: None,
            };
            let frame = encode(
                MqttVersion::V5,
                connect_packet(Some(zero_receive), None, None),
            );
            assert_eq!(
                check_connect(&frame),
                Err(Violation::ProtocolError("Receive Maximum 0"))
            );
            assert_eq!(
                check_connect(&v5_connect_with_properties(&[0x27, 0, 0, 0, 0])),
                Err(Violation::ProtocolError("Maximum Packet Size 0"))
            );
        }

        /// MQTT 5 §3.1.2.11: each CONNECT property but User Property may appear once ("It is
        /// a Protocol Error to include the Session Expiry Interval more than once", …), and
        /// Authentication Data needs an Authentication Method.
        #[test]
        fn a_property_twice_is_a_protocol_error_but_user_properties_repeat() {
            let twice = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
            assert_eq!(
                check_connect(&v5_connect_with_properties(&twice)),
                Err(Violation::ProtocolError("a property appears twice"))
            );
            let users = [
                0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 1, b'k', 0, 1, b'v', 0x21, 0, 5,
            ];
            assert_eq!(check_connect(&v5_connect_with_properties(&users)), Ok(()));
            let data_alone = [0x16, 0, 1, b'x'];
            assert!(matches!(
                check_connect(&v5_connect_with_properties(&data_alone)),
                Err(Violation::ProtocolError(_))
            ));
            // A property a CONNECT may not carry (Topic Alias) is malformed (§2.2.2.2).
            assert!(matches!(
                check_connect(&v5_connect_with_properties(&[0x23, 0, 1])),
                Err(Violation::Malformed(_))
            ));
            // Request Problem Information must be 0 or 1.
            assert!(matches!(
                check_connect(&v5_connect_with_properties(&[0x17, 2])),
                Err(Violation::ProtocolError(_))
            ));
        }

        #[test]
        fn will_flags_and_strings_are_checked() {
            for version in [MqttVersion::V311, MqttVersion::V5] {
                let mut frame = encode(version, connect_packet(None, None, None));
                frame[9] |= 0x20; // will retain without a will
                assert!(check_connect(&frame).is_err());
                let will = (will().0, will().1.filter(|_| version == MqttVersion::V5));
                let mut frame = encode(version, connect_packet(None, Some(will), None));
                frame[9] |= 0x18; // will QoS 3
                assert!(check_connect(&frame).is_err());
                let mut frame = encode(version, connect_packet(None, None, None));
                frame.push(0);
                frame[1] += 1; // a byte after the payload
                assert!(check_connect(&frame).is_err());
            }
            // A will topic that is not UTF-8.
            let (mut bad, props) = will();
            bad.topic = Bytes::from_static(&[0xff]);
            let frame = encode(
                MqttVersion::V5,
                connect_packet(None, Some((bad, props)), None),
            );
            assert!(matches!(
                check_connect(&frame),
                Err(Violation::Malformed(_))
            ));
        }

        #[test]
        fn reserved_fixed_header_bits_and_subscription_options_are_checked() {
            use MqttVersion::{V311, V5};
            // PUBREL must carry 0010.
            assert_eq!(check_frame(&[0x62, 2, 0, 1], V5), Ok(()));
            assert!(matches!(
                check_frame(&[0x60, 2, 0, 1], V5),
                Err(Violation::Malformed(_))
            ));
            // DISCONNECT 0000.
            assert!(check_frame(&[0xe1, 0], V5).is_err());
            assert_eq!(check_frame(&[0xe0, 0], V5), Ok(()));
            // PUBLISH QoS 3.
            assert!(check_frame(&[0x36, 5, 0, 1, b'a', 0, 1], V311).is_err());
            // SUBSCRIBE "a" with options 0x01, then with a reserved bit, then Retain Handling 3.
            assert_eq!(
                check_frame(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x01], V5),
                Ok(())
            );
            assert!(matches!(
                check_frame(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x41], V5),
                Err(Violation::Malformed(_))
            ));
            assert!(matches!(
                check_frame(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30], V5),
                Err(Violation::ProtocolError(_))
            ));
            assert_eq!(
                check_frame(&[0x82, 6, 0, 1, 0, 1, b'a', 0x01], V311),
                Ok(())
            );
            assert!(check_frame(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04], V311).is_err());
            // Without a filter.
            assert!(matches!(
                check_frame(&[0x82, 3, 0, 1, 0], V5),
                Err(Violation::ProtocolError(_))
            ));
            assert!(matches!(
                check_frame(&[0xa2, 3, 0, 1, 0], V5),
                Err(Violation::ProtocolError(_))
            ));
            assert_eq!(check_frame(&[0xa2, 6, 0, 1, 0, 0, 1, b'a'], V5), Ok(()));
            // [MQTT-3.10.3-1]: UNSUBSCRIBE filters are UTF-8.
            assert!(matches!(
                check_frame(&[0xa2, 6, 0, 1, 0, 0, 1, 0xff], V5),
                Err(Violation::Malformed(_))
            ));
            // AUTH.
            assert!(matches!(
                check_frame(&[0xf0, 0], V5),
                Err(Violation::ProtocolError(_))
            ));
            // Left to `server_only`.
            assert_eq!(check_frame(&[0x20, 2, 0, 0], V5), Ok(()));
        }

        /// MQTT 5 §3.3.4: "A Topic Alias value of 0 or greater than the Maximum Topic Alias is
        /// a Protocol Error, the receiver uses DISCONNECT with Reason Code of 0x94"; an alias
        /// without a mapping and a zero length Topic Name is a Protocol Error (0x82).
        #[test]
        fn topic_aliases_resolve_within_the_maximum() {
            let mut aliases = TopicAliases::default();
            let a = Bytes::from_static(b"t/a");
            let none = Bytes::new();
            assert_eq!(aliases.resolve(&a, None), Ok(a.clone()));
            assert_eq!(aliases.resolve(&none, None), Err(AliasError::NoTopic));
            assert_eq!(aliases.resolve(&none, Some(1)), Err(AliasError::Unknown(1)));
            assert_eq!(aliases.resolve(&a, Some(1)), Ok(a.clone()));
            assert_eq!(aliases.resolve(&none, Some(1)), Ok(a.clone()));
            let b = Bytes::from_static(b"t/b");
            assert_eq!(aliases.resolve(&b, Some(1)), Ok(b.clone()));
            assert_eq!(aliases.resolve(&none, Some(1)), Ok(b));
            assert_eq!(aliases.resolve(&a, Some(0)), Err(AliasError::OutOfRange(0)));
            let over = TOPIC_ALIAS_MAXIMUM + 1;
            assert_eq!(
                aliases.resolve(&a, Some(over)),
                Err(AliasError::OutOfRange(over))
            );
            assert_eq!(
                aliases.resolve(&a, Some(TOPIC_ALIAS_MAXIMUM)),
                Ok(a.clone())
            );
            assert_eq!(
                AliasError::OutOfRange(0).disconnect_code(),
                DisconnectReasonCode::TopicAliasInvalid
            );
        }

        #[test]
        fn properties_are_dropped_keeping_the_reason_code() {
            let connack = encode(
                MqttVersion::V5,
                refusal_connack(MqttVersion::V5, Refusal::QuotaExceeded, "a long reason"),
            );
            let small = without_properties(&connack).expect("a CONNACK");
            // Acknowledge flags, Quota Exceeded, no properties (rumqttd cannot decode a CONNACK).
            assert_eq!(small, [0x20, 3, 0, 0x97, 0]);
            let disconnect = encode(
                MqttVersion::V5,
                server_disconnect(MqttVersion::V5, DisconnectReasonCode::NotAuthorized, "cut")
                    .expect("v5"),
            );
            assert_eq!(without_properties(&disconnect), Some(vec![0xe0, 1, 0x87]));
            assert_eq!(without_properties(&[0x30, 0]), None);
        }

        fn arbitrary_connect() -> impl Strategy<Value = (MqttVersion, Packet)> {
            let props = (
                proptest::option::of(any::<u32>()),
                proptest::option::of(1u16..),
                proptest::option::of(1u32..),
                proptest::option::of(any::<u16>()),
                proptest::option::of(0u8..2),
                proptest::option::of(0u8..2),
                proptest::collection::vec(("[a-z]{0,3}", "[a-z]{0,3}"), 0..3),
                proptest::option::of("[A-Z]{1,5}"),
            )
                .prop_map(|(se, rm, mps, tam, rri, rpi, user, method)| {
                    ConnectProperties {
                        session_expiry_interval: se,
                        receive_maximum: rm,
                        max_packet_size: mps,
                        topic_alias_max: tam,
                        request_response_info: rri,
                        request_problem_info: rpi,
                        user_properties: user,
                        authentication_data: method.as_ref().map(|_| Bytes::from_static(b"d")),
                        authentication_method: method,
                    }
                });
            (
                any::<bool>(),
                proptest::option::of(props),
                any::<bool>(),
                proptest::option::of(("[a-z]{1,8}", "[a-z]{0,8}")),
                "[a-zA-Z0-9]{1,23}",
            )
                .prop_map(|(v5, props, with_will, login, client_id)| {
                    let version = if v5 {
                        MqttVersion::V5
                    } else {
                        MqttVersion::V311
                    };
                    let props = props.filter(|_| v5);
                    let (will, will_props) = if with_will {
                        let (w, p) = will();
                        (Some(w), p.filter(|_| v5))
                    } else {
                        (None, None)
                    };
                    let packet = Packet::Connect(
                        Connect {
                            keep_alive: 10,
                            client_id,
                            clean_session: true,
                        },
                        props,
                        will,
                        will_props,
                        login.map(|(username, password)| Login { username, password }),
                    );
                    (version, packet)
                })
        }

        proptest! {
            #[test]
            fn every_connect_rumqttd_writes_passes((version, packet) in arbitrary_connect()) {
                let frame = encode(version, packet);
                prop_assert_eq!(check_connect(&frame), Ok(()));
                prop_assert_eq!(complete_frame_len(&frame), Some(frame.len()));
            }

            #[test]
            fn no_bytes_make_the_checks_panic(
                bytes in proptest::collection::vec(any::<u8>(), 0..96),
                v5 in any::<bool>(),
            ) {
                let version = if v5 { MqttVersion::V5 } else { MqttVersion::V311 };
                let _ = check_connect(&bytes);
                let _ = check_frame(&bytes, version);
                let _ = without_properties(&bytes);
                let _ = complete_frame_len(&bytes);
                // The same behind a valid CONNECT header, so that the deeper fields are reached.
                let mut connect = vec![0x10, 0, 0, 4, b'M', b'Q', b'T', b'T', if v5 { 5 } else { 4 }];
                connect.extend_from_slice(&bytes);
                connect[1] = (connect.len() - 2).min(127) as u8;
                let _ = check_connect(&connect);
                for first in [0x82u8, 0xa2, 0x62] {
                    let mut frame = vec![first, bytes.len().min(127) as u8];
                    frame.extend_from_slice(&bytes);
                    let _ = check_frame(&frame, version);
                }
            }

            #[test]
            fn topic_aliases_behave_like_a_map(
                steps in proptest::collection::vec(
                    (proptest::option::of(0u16..20), proptest::option::of("[ab]{0,2}")),
                    0..40,
                ),
            ) {
                let mut aliases = TopicAliases::default();
                let mut model = std::collections::HashMap::new();
                for (alias, topic) in steps {
                    let topic = Bytes::from(topic.unwrap_or_default().into_bytes());
                    let expected = match alias {
                        None if topic.is_empty() => Err(AliasError::NoTopic),
                        None => Ok(topic.clone()),
                        Some(a) if a == 0 || a > TOPIC_ALIAS_MAXIMUM => Err(AliasError::OutOfRange(a)),
                        Some(a) if topic.is_empty() => model.get(&a).cloned().ok_or(AliasError::Unknown(a)),
                        Some(a) => {
                            model.insert(a, topic.clone());
                            Ok(topic.clone())
                        }
                    };
                    prop_assert_eq!(aliases.resolve(&topic, alias), expected);
                }
            }
        }
    }
}
