//! One client session's MQTT rules as a pure state machine, in the style of quinn-proto's
//! `Connection`: the pump (`frontdoor.rs`) hands it what arrived (the client's bytes, the
//! router's notifications, the controller's control messages, the time) and carries out the
//! [`Action`]s it pushes (write to the client, hand to the inbox, send into the router, end).
//! No socket, no clock, no router: every rule here is tested without them.
//!
//! The rules: rights on every PUBLISH and SUBSCRIBE; every QoS 1 and 2 PUBLISH answered once
//! with its packet id (by the router, the inbox's acknowledgement or the refusal); QoS 2
//! bookkeeping; SUBSCRIBE split between the front door (mailboxes, refusals) and the router,
//! with one merged SUBACK; the front door's own mailbox packet ids; the router's deliveries in
//! the order its acknowledgements need ([`RouterFlight`]); keepalive; cuts, which deliver
//! nothing more but the message they wait for; takeovers and the server's DISCONNECTs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    v4::V4, v5::V5, Disconnect, DisconnectProperties, DisconnectReasonCode, Packet, PingResp,
    PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel, PubRelProperties,
    Publish, PublishProperties, QoS, SubAck, Subscribe, SubscribeProperties, SubscribeReasonCode,
    UnsubAck, UnsubAckReason, Unsubscribe, UnsubscribeProperties,
};
use rumqttd::protocol::{Error as CodecError, Protocol};
use rumqttd::Notification;
use tracing::debug;

use crate::admission::MqttVersion;
use crate::flight::{ClientAck, Effect, RouterFlight, ToRouter};
use crate::frame;
use crate::registry::{self, Control, SharedRights};

/// First packet id of the front door's own QoS 1 mailbox messages. They come from
/// 0x8000–0xFFFF; rumqttd's router numbers its own deliveries 1–100, so a PUBACK says whose
/// message it acknowledges.
const MAILBOX_PKIDS_FROM: u16 = 0x8000;
/// Mailbox messages a client may leave unacknowledged before the next ones go at QoS 0.
const MAX_MAILBOX_UNACKED: usize = 64;

/// The codec of the client's protocol version.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Codec(pub(crate) MqttVersion);

impl Codec {
    pub(crate) fn read(&self, buf: &mut BytesMut, max: usize) -> Result<Packet, CodecError> {
        // rumqttd's decoder is not ours: a panic on hostile bytes must end this connection, not
        // the task. Fuzzing found one (a v5 CONNACK or UNSUBACK from a client hits
        // `unreachable!`); `Session::drain` refuses server-only packet types before decoding,
        // and this stays as insurance for what fuzzing has not found.
        let version = self.0;
        std::panic::catch_unwind(AssertUnwindSafe(|| match version {
            MqttVersion::V311 => V4.read_mut(buf, max),
            MqttVersion::V5 => V5.read_mut(buf, max),
        }))
        .unwrap_or(Err(CodecError::IncorrectPacketFormat))
    }

    pub(crate) fn write(&self, packet: Packet, out: &mut BytesMut) -> Result<usize, CodecError> {
        match self.0 {
            MqttVersion::V311 => V4.write(frame::strip_properties(packet), out),
            MqttVersion::V5 => V5.write(packet, out),
        }
    }
}

/// Encodes one packet.
pub(crate) fn encode(codec: Codec, packet: Packet) -> Result<BytesMut, String> {
    let mut out = BytesMut::with_capacity(64);
    codec
        .write(packet, &mut out)
        .map_err(|e| format!("encode: {e}"))?;
    Ok(out)
}

/// An encoded packet within the client's Maximum Packet Size [MQTT-3.1.2-24]: as it is, or
/// without its properties when those are only diagnostics (reason string, user properties:
/// [MQTT-3.2.2-19], [MQTT-3.14.2-3], …), or `None` when it cannot fit.
pub(crate) fn fit(encoded: BytesMut, max_packet_size: Option<usize>) -> Option<BytesMut> {
    match max_packet_size {
        Some(max) if encoded.len() > max => frame::without_properties(&encoded)
            .filter(|smaller| smaller.len() <= max)
            .map(|smaller| BytesMut::from(&smaller[..])),
        _ => Some(encoded),
    }
}

/// What an MQTT 5 client said in its CONNECT about what it accepts and expects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientLimits {
    /// Maximum Packet Size: no packet larger than this is sent to the client [MQTT-3.1.2-24].
    pub(crate) max_packet_size: Option<usize>,
    /// Session Expiry Interval of the CONNECT (0 when absent).
    pub(crate) session_expiry: u32,
    /// Receive Maximum: QoS 1 and 2 PUBLISHes the client takes unacknowledged at once
    /// [MQTT-3.3.4-9] (65,535 when absent; no limit under 3.1.1).
    pub(crate) receive_maximum: usize,
}

impl ClientLimits {
    pub(crate) fn of(
        version: MqttVersion,
        props: Option<&rumqttd::protocol::ConnectProperties>,
    ) -> Self {
        match (version, props) {
            (MqttVersion::V5, props) => ClientLimits {
                max_packet_size: props
                    .and_then(|p| p.max_packet_size)
                    .map(|max| usize::try_from(max).unwrap_or(usize::MAX)),
                session_expiry: props.and_then(|p| p.session_expiry_interval).unwrap_or(0),
                // `check_connect` refused a Receive Maximum of 0.
                receive_maximum: usize::from(
                    props
                        .and_then(|p| p.receive_maximum)
                        .unwrap_or(u16::MAX)
                        .max(1),
                ),
            },
            (MqttVersion::V311, _) => ClientLimits {
                max_packet_size: None,
                session_expiry: 0,
                receive_maximum: usize::MAX,
            },
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The client sent DISCONNECT: no will.
    Clean,
    /// MQTT 5 DISCONNECT 0x04: disconnect with will.
    CleanWithWill,
    /// Network error, timeout, protocol error.
    Unclean,
    /// The controller revoked the session.
    Cut,
    /// A new connection took over the client id: its will would race the new session's state.
    TakenOver,
    /// The router dropped the link.
    LinkGone,
    Shutdown,
}

impl End {
    pub(crate) fn fires_will(self) -> bool {
        matches!(
            self,
            End::CleanWithWill | End::Unclean | End::Cut | End::LinkGone | End::Shutdown
        )
    }
}

/// What the session asks its pump to do, in order.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write these bytes (one encoded packet) to the client.
    Write(Bytes),
    /// Hand a PUBLISH on one of the session's inbox topics to the admission. The session
    /// handles nothing more of the client's input until [`Session::inbox_done`] says how it
    /// went (then [`Session::resume`]).
    Inbox { topic: String, payload: Vec<u8> },
    /// Send a packet into the router. A PUBLISH or SUBSCRIBE needs the session's link, which
    /// the pump builds if there is none ([`Session::router_unavailable`] if it cannot); the
    /// acknowledgements and the rest go only to a link that exists.
    Router(Box<Packet>),
    /// The session is over; nothing after it.
    End(End),
}

/// What a session is set up with.
pub(crate) struct SessionConfig {
    pub(crate) client_id: String,
    pub(crate) version: MqttVersion,
    pub(crate) rights: SharedRights,
    pub(crate) limits: ClientLimits,
    /// The front door's Maximum Packet Size for what the client sends.
    pub(crate) max_packet_size: usize,
    /// Silence after which the session ends (1.5 × its keepalive).
    pub(crate) keepalive: Duration,
    /// Bounded grace for delivering the final message of a cut.
    pub(crate) cut_grace: Duration,
}

/// One client's session: the MQTT rules, without I/O.
pub(crate) struct Session {
    codec: Codec,
    version: MqttVersion,
    client_id: String,
    rights: SharedRights,
    limits: ClientLimits,
    max_packet_size: usize,
    keepalive: Duration,
    cut_grace: Duration,
    /// The end of the keepalive: moved by every read from the client.
    idle_deadline: Instant,
    actions: VecDeque<Action>,
    /// An [`Action::Inbox`] is out: (QoS, packet id) of the PUBLISH it waits to acknowledge.
    inbox_wait: Option<(u8, u16)>,
    ended: bool,
    /// QoS 2 inbox messages already handed over: their PUBREL is answered here.
    inbox_qos2: HashSet<u16>,
    /// QoS 2 PUBLISHes forwarded to the router and not released yet: their PUBREL goes to the
    /// router, which drops a client for a PUBREL it does not know.
    router_qos2: HashSet<u16>,
    /// SUBSCRIBEs forwarded in part: per packet id, the codes of the denied filters by position
    /// (`None`: to be filled from the router's SUBACK).
    pending_subs: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 publishes refused under 3.1.1 (acknowledged, not forwarded): their PUBREL is
    /// answered here.
    denied_qos2: HashSet<u16>,
    /// Set by a cut: close after a message on this topic was written, or at the deadline.
    closing: Option<(Instant, Option<String>)>,
    /// Every filter granted to this session with its QoS: mailbox deliveries
    /// ([`crate::mailbox`]) go to it when one of them matches.
    filters: Vec<(String, u8)>,
    /// Next packet id for a QoS 1 mailbox message.
    mailbox_pkid: u16,
    /// Packet ids of mailbox messages not acknowledged yet; their PUBACKs stay here.
    mailbox_unacked: HashSet<u16>,
    /// Topic of the last mailbox delivery handled: a cut waiting for it needs not wait.
    last_delivered: Option<String>,
    /// The client's topic aliases (MQTT 5).
    aliases: frame::TopicAliases,
    /// The router's QoS 1 and 2 messages in flight to the client: with `mailbox_unacked`, what
    /// the client's Receive Maximum counts.
    flight: RouterFlight,
}

impl Session {
    pub(crate) fn new(config: SessionConfig, now: Instant) -> Session {
        Session {
            codec: Codec(config.version),
            version: config.version,
            client_id: config.client_id,
            rights: config.rights,
            limits: config.limits,
            max_packet_size: config.max_packet_size,
            keepalive: config.keepalive,
            cut_grace: config.cut_grace,
            idle_deadline: now + config.keepalive,
            actions: VecDeque::new(),
            inbox_wait: None,
            ended: false,
            inbox_qos2: HashSet::new(),
            router_qos2: HashSet::new(),
            pending_subs: HashMap::new(),
            denied_qos2: HashSet::new(),
            closing: None,
            filters: Vec::new(),
            mailbox_pkid: MAILBOX_PKIDS_FROM,
            mailbox_unacked: HashSet::new(),
            last_delivered: None,
            aliases: frame::TopicAliases::default(),
            flight: RouterFlight::default(),
        }
    }

    /// The next thing to do, in order.
    pub(crate) fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Session::handle_timeout`] is due: the keepalive's end, or a cut's grace.
    pub(crate) fn poll_timeout(&self) -> Instant {
        match &self.closing {
            Some((at, _)) => (*at).min(self.idle_deadline),
            None => self.idle_deadline,
        }
    }

    /// Bytes arrived from the client (in `buf`, after what was left there): the keepalive
    /// starts again, and every complete frame is handled.
    pub(crate) fn handle_client(&mut self, buf: &mut BytesMut, now: Instant) {
        self.idle_deadline = now + self.keepalive;
        self.drain(buf);
    }

    /// Handles the frames left in `buf` once an inbox message is answered.
    pub(crate) fn resume(&mut self, buf: &mut BytesMut) {
        self.drain(buf);
    }

    /// A notification of the session's router link (`Unschedule` is the pump's).
    pub(crate) fn handle_router(&mut self, notification: Notification) {
        if self.ended {
            return;
        }
        match notification {
            Notification::Disconnect(d, _) => {
                self.disconnect(d.reason_code, "disconnected by the server");
                self.end(End::LinkGone);
            }
            Notification::Forward(forward) => {
                let last = self.is_final(&forward.publish.topic);
                self.forwarded(forward.publish, forward.properties, last);
            }
            other => {
                let packet: Option<Packet> = other.into();
                match packet {
                    Some(Packet::SubAck(mut ack, props)) => {
                        if let Some(slots) = self.pending_subs.remove(&ack.pkid) {
                            let mut granted = ack.return_codes.into_iter();
                            ack.return_codes = slots
                                .into_iter()
                                .map(|slot| {
                                    slot.or_else(|| granted.next())
                                        .unwrap_or(SubscribeReasonCode::Failure)
                                })
                                .collect();
                        }
                        self.send(Packet::SubAck(ack, props));
                    }
                    // The release of a message the client never got (too large for it): the
                    // front door completed it already.
                    Some(Packet::PubRel(rel, _)) if self.flight.swallows(rel.pkid) => {}
                    // The front door answers PINGREQ and UNSUBSCRIBE itself.
                    Some(Packet::PingResp(_) | Packet::UnsubAck(..)) | None => {}
                    Some(packet) => self.send(packet),
                }
            }
        }
    }

    /// A control message of the registry (the controller's cuts and deliveries, takeovers).
    pub(crate) fn handle_control(&mut self, control: Control, now: Instant) {
        if self.ended {
            return;
        }
        match control {
            Control::TakenOver => {
                self.disconnect(DisconnectReasonCode::SessionTakenOver, "session taken over");
                self.end(End::TakenOver);
            }
            Control::Cut { last_topic: None } => self.cut_now(),
            Control::Cut {
                last_topic: Some(topic),
            } => {
                // The final message came through the mailbox, just before the cut: it is
                // written already.
                if self.last_delivered.take().as_deref() == Some(topic.as_str()) {
                    return self.cut_now();
                }
                self.closing = Some((now + self.cut_grace, Some(topic)));
            }
            Control::Deliver { topic, payload } => self.deliver(topic, payload),
            Control::Overflow => {
                debug!(client_id = %self.client_id, "too many undelivered messages");
                self.disconnect(
                    DisconnectReasonCode::QuotaExceeded,
                    "too many undelivered messages: the client is not reading",
                );
                self.end(End::Cut);
            }
        }
    }

    /// The time is `now`: the keepalive or a cut's grace may be over.
    pub(crate) fn handle_timeout(&mut self, now: Instant) {
        if self.ended {
            return;
        }
        if now >= self.idle_deadline {
            debug!(client_id = %self.client_id, "keepalive expired");
            self.end(End::Unclean);
        } else if self.closing.as_ref().is_some_and(|(at, _)| now >= *at) {
            self.cut_now();
        }
    }

    /// The server shuts down.
    pub(crate) fn shutdown(&mut self) {
        if !self.ended {
            self.disconnect(
                DisconnectReasonCode::ServerShuttingDown,
                "server shutting down",
            );
            self.end(End::Shutdown);
        }
    }

    /// The pump could not give the session a router link for its PUBLISH or SUBSCRIBE.
    pub(crate) fn router_unavailable(&mut self) {
        if !self.ended {
            self.disconnect(DisconnectReasonCode::ServerBusy, "router unavailable");
            self.end(End::Unclean);
        }
    }

    /// The answer to the [`Action::Inbox`] out: `handled`, the admission has the message and
    /// it is acknowledged; else the session ends unacknowledged, so that the client sends it
    /// again on its next connection.
    pub(crate) fn inbox_done(&mut self, handled: bool) {
        let Some((qos, pkid)) = self.inbox_wait.take() else {
            return;
        };
        if self.ended {
            return;
        }
        if !handled {
            self.disconnect(
                DisconnectReasonCode::UnspecifiedError,
                "the message could not be stored; send it again",
            );
            return self.end(End::Unclean);
        }
        self.acknowledge_inbox(qos, pkid);
    }

    fn acknowledge_inbox(&mut self, qos: u8, pkid: u16) {
        match qos {
            1 => {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                self.send(Packet::PubAck(ack, None));
            }
            2 => {
                self.inbox_qos2.insert(pkid);
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                self.send(Packet::PubRec(rec, None));
            }
            _ => {}
        }
    }

    fn end(&mut self, end: End) {
        if !self.ended {
            self.ended = true;
            self.actions.push_back(Action::End(end));
        }
    }

    /// Writes a packet within the client's Maximum Packet Size, if need be without its
    /// properties ([`fit`]); one that cannot fit is not written at all.
    fn send(&mut self, packet: Packet) {
        match encode(self.codec, packet) {
            Ok(bytes) => match fit(bytes, self.limits.max_packet_size) {
                Some(bytes) => self.actions.push_back(Action::Write(bytes.freeze())),
                None => {
                    debug!("a packet larger than the client's maximum packet size was not sent")
                }
            },
            Err(e) => {
                debug!(client_id = %self.client_id, "{e}");
                self.end(End::Unclean);
            }
        }
    }

    /// A server DISCONNECT saying `text` (MQTT 5 only; 3.1.1 has none).
    fn disconnect(&mut self, reason: DisconnectReasonCode, text: &str) {
        if let Some(packet) = frame::server_disconnect(self.version, reason, text) {
            self.send(packet);
        }
    }

    /// Ends a cut session: DISCONNECT "not authorized" (under 5), then close.
    fn cut_now(&mut self) {
        self.disconnect(DisconnectReasonCode::NotAuthorized, "not authorized");
        self.end(End::Cut);
    }

    /// Whether a message on `topic` is the one a pending cut waits for.
    fn is_final(&self, topic: &[u8]) -> bool {
        self.closing
            .as_ref()
            .and_then(|(_, t)| t.as_deref())
            .is_some_and(|t| t.as_bytes() == topic)
    }

    /// Decodes and handles every complete frame in `buf`, until an inbox message waits or the
    /// session ends.
    fn drain(&mut self, buf: &mut BytesMut) {
        while !self.ended && self.inbox_wait.is_none() {
            if buf.first().is_some_and(|b| frame::server_only(*b)) {
                debug!(client_id = %self.client_id, "a packet only a server sends");
                return self.protocol_error("protocol error");
            }
            // What rumqttd's decoder does not look at, on the raw frame once all of it is here.
            if let Some(frame) = frame::complete_frame_len(buf).and_then(|len| buf.get(..len)) {
                if let Err(violation) = frame::check_frame(frame, self.version) {
                    debug!(client_id = %self.client_id, "{violation}");
                    self.disconnect(violation.disconnect_code(), &violation.to_string());
                    return self.end(End::Unclean);
                }
            }
            let peeked = frame::publish_qos_pkid(buf);
            match self.codec.read(buf, self.max_packet_size) {
                Ok(packet) => self.incoming(packet, peeked),
                Err(CodecError::InsufficientBytes(_)) => return,
                Err(CodecError::PayloadSizeLimitExceeded(_)) => {
                    self.disconnect(DisconnectReasonCode::PacketTooLarge, "packet too large");
                    return self.end(End::Unclean);
                }
                Err(e) => {
                    debug!(client_id = %self.client_id, "malformed packet: {e}");
                    self.disconnect(DisconnectReasonCode::MalformedPacket, "malformed packet");
                    return self.end(End::Unclean);
                }
            }
        }
    }

    /// Ends the session with DISCONNECT 0x82 (MQTT 5) saying `reason`.
    fn protocol_error(&mut self, reason: &str) {
        self.disconnect(DisconnectReasonCode::ProtocolError, reason);
        self.end(End::Unclean);
    }

    fn incoming(&mut self, packet: Packet, peeked: Option<(u8, u16)>) {
        match packet {
            Packet::Publish(_, Some(props)) if !props.subscription_identifiers.is_empty() => {
                // MQTT 5 §3.3.4: a client must not send subscription identifiers (and rumqttd's
                // encoder garbles a PUBLISH that carries them).
                self.protocol_error("protocol error")
            }
            Packet::Publish(publish, props) => self.on_publish(publish, props, peeked),
            Packet::PubRel(pubrel, props) => self.on_pubrel(pubrel, props),
            Packet::Subscribe(ref subscribe, _)
                if self.version == MqttVersion::V5
                    && subscribe
                        .filters
                        .iter()
                        .any(|f| f.path.starts_with("$share/")) =>
            {
                // The CONNACK said Shared Subscription Available 0 (MQTT 5 §3.2.2.3.13).
                self.disconnect(
                    DisconnectReasonCode::SharedSubscriptionNotSupported,
                    "shared subscriptions are not supported",
                );
                self.end(End::Unclean);
            }
            Packet::Subscribe(subscribe, props) => self.on_subscribe(subscribe, props),
            Packet::Unsubscribe(unsubscribe, props) => self.on_unsubscribe(unsubscribe, props),
            // The acknowledgement of a mailbox message is the front door's own.
            Packet::PubAck(ref ack, _) if self.mailbox_unacked.remove(&ack.pkid) => {
                let room = self.router_room();
                let effects = self.flight.room_freed(room);
                self.carry_out(effects);
            }
            Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..) => {
                self.acknowledged(packet)
            }
            Packet::PingReq(_) => self.send(Packet::PingResp(PingResp)),
            Packet::Disconnect(disconnect, props) => self.on_disconnect(disconnect, props),
            // A second CONNECT, or a packet only a server sends: protocol error.
            _ => self.protocol_error("protocol error"),
        }
    }

    /// A client's PUBLISH: to the controller's inbox, to the router, or refused.
    fn on_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        peeked: Option<(u8, u16)>,
    ) {
        if self.version == MqttVersion::V5 {
            // The topic an alias stands for is the one rights are checked against and
            // the router sees; the router gets no alias.
            let alias = props.as_mut().and_then(|p| p.topic_alias.take());
            match self.aliases.resolve(&publish.topic, alias) {
                Ok(topic) => publish.topic = topic,
                Err(e) => {
                    debug!(client_id = %self.client_id, "{e}");
                    self.disconnect(e.disconnect_code(), &e.to_string());
                    return self.end(End::Unclean);
                }
            }
        }
        let (allowed, inbox, retain) = match std::str::from_utf8(&publish.topic) {
            Ok(topic) => {
                let rights = registry::read(&self.rights);
                (
                    rights.may_publish(topic),
                    rights.is_inbox(topic),
                    rights.retain,
                )
            }
            Err(_) => (false, false, false),
        };
        let (qos, pkid) = peeked.unwrap_or((0, 0));
        if allowed && inbox {
            // A QoS 2 message is handed over once (MQTT 4.3.3): a resent one before its
            // PUBREL is only acknowledged again.
            if qos == 2 && self.inbox_qos2.contains(&pkid) {
                return self.acknowledge_inbox(qos, pkid);
            }
            let topic = String::from_utf8_lossy(&publish.topic).into_owned();
            self.inbox_wait = Some((qos, pkid));
            let payload = publish.payload.to_vec();
            return self.actions.push_back(Action::Inbox { topic, payload });
        }
        if !allowed {
            return self.deny_publish(&publish.topic, qos, pkid);
        }
        // Without the right to retain, the message reaches today's subscribers only: nothing
        // planted now reaches whoever subscribes later.
        publish.retain &= retain;
        // Handed to the router once [MQTT-4.3.3-10]: a QoS 2 message resent before its PUBREL
        // is only acknowledged again.
        if qos == 2 && !self.router_qos2.insert(pkid) {
            let rec = PubRec {
                pkid,
                reason: PubRecReason::Success,
            };
            return self.send(Packet::PubRec(rec, None));
        }
        self.actions
            .push_back(Action::Router(Box::new(Packet::Publish(publish, props))));
    }

    /// Answers a PUBLISH outside the client's rights (PROTOCOL §4): dropped, acknowledged as
    /// 3.1.1 allows or refused with 0x87 under MQTT 5.
    fn deny_publish(&mut self, topic: &[u8], qos: u8, pkid: u16) {
        debug!(client_id = %self.client_id, topic = %String::from_utf8_lossy(topic).escape_default(), "publish denied");
        let v5 = self.version == MqttVersion::V5;
        match qos {
            1 => {
                // 3.1.1 has no refusal: acknowledge and drop. MQTT 5: 0x87.
                let reason = if v5 {
                    PubAckReason::NotAuthorized
                } else {
                    PubAckReason::Success
                };
                self.send(Packet::PubAck(PubAck { pkid, reason }, None));
            }
            2 => {
                let reason = if v5 {
                    PubRecReason::NotAuthorized
                } else {
                    self.denied_qos2.insert(pkid);
                    PubRecReason::Success
                };
                self.send(Packet::PubRec(PubRec { pkid, reason }, None));
            }
            _ => {}
        }
    }

    /// A client's PUBREL: to the router if the router holds the message, else answered here.
    fn on_pubrel(&mut self, pubrel: PubRel, props: Option<PubRelProperties>) {
        let pkid = pubrel.pkid;
        if self.router_qos2.remove(&pkid) {
            return self
                .actions
                .push_back(Action::Router(Box::new(Packet::PubRel(pubrel, props))));
        }
        let denied = self.denied_qos2.remove(&pkid);
        let inbox = self.inbox_qos2.remove(&pkid);
        // [MQTT-4.3.3-11]: every PUBREL is answered with a PUBCOMP; one for a packet id
        // nobody knows says so under MQTT 5 (0x92), instead of reaching the router,
        // which would drop the client.
        let reason = if denied || inbox || self.version == MqttVersion::V311 {
            PubCompReason::Success
        } else {
            PubCompReason::PacketIdentifierNotFound
        };
        self.send(Packet::PubComp(PubComp { pkid, reason }, None));
    }

    /// A client's SUBSCRIBE: each filter denied, answered here (mailboxes) or sent on to the
    /// router; one SUBACK with the codes in the filters' order either way.
    fn on_subscribe(&mut self, mut subscribe: Subscribe, props: Option<SubscribeProperties>) {
        let denied_code = match self.version {
            MqttVersion::V311 => SubscribeReasonCode::Failure,
            MqttVersion::V5 => SubscribeReasonCode::NotAuthorized,
        };
        // Per filter: `Some(code)` is answered here (denied, or the client's own
        // mailbox, which the router never sees); `None` goes to the router.
        let slots: Vec<Option<SubscribeReasonCode>> = {
            let rights = registry::read(&self.rights);
            subscribe
                .filters
                .iter()
                .map(|f| {
                    if !rights.may_subscribe(&f.path) {
                        Some(denied_code)
                    } else if rights.is_mailbox(&f.path) {
                        Some(match f.qos {
                            QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                            QoS::AtLeastOnce => SubscribeReasonCode::QoS1,
                            QoS::ExactlyOnce => SubscribeReasonCode::QoS2,
                        })
                    } else {
                        None
                    }
                })
                .collect()
        };
        for (filter, slot) in subscribe.filters.iter().zip(&slots) {
            if *slot != Some(denied_code) {
                let qos = match filter.qos {
                    QoS::AtMostOnce => 0,
                    QoS::AtLeastOnce => 1,
                    QoS::ExactlyOnce => 2,
                };
                // A new SUBSCRIBE of a filter replaces the old one (MQTT 3.8.4).
                self.filters.retain(|(f, _)| *f != filter.path);
                self.filters.push((filter.path.clone(), qos));
            }
        }
        if slots.contains(&Some(denied_code)) {
            debug!(client_id = %self.client_id, "subscription denied");
        }
        if slots.iter().all(Option::is_some) {
            let ack = SubAck {
                pkid: subscribe.pkid,
                return_codes: slots.into_iter().flatten().collect(),
            };
            return self.send(Packet::SubAck(ack, None));
        }
        if slots.iter().any(Option::is_some) {
            let mut it = slots.iter();
            subscribe
                .filters
                .retain(|_| it.next().is_some_and(Option::is_none));
            self.pending_subs.insert(subscribe.pkid, slots);
        }
        self.actions
            .push_back(Action::Router(Box::new(Packet::Subscribe(
                subscribe, props,
            ))));
    }

    /// A client's UNSUBSCRIBE, always answered by the front door.
    fn on_unsubscribe(
        &mut self,
        mut unsubscribe: Unsubscribe,
        props: Option<UnsubscribeProperties>,
    ) {
        // The front door answers every UNSUBSCRIBE itself, with one reason per filter
        // in their order [MQTT-3.10.4-4] to [MQTT-3.10.4-6], [MQTT-3.11.3-1]: the router
        // answers nothing for a filter it does not know, one UNSUBACK per filter it
        // removed, and never saw the mailbox filters.
        let asked = std::mem::take(&mut unsubscribe.filters);
        let granted = |f: &String| self.filters.iter().any(|(g, _)| g == f);
        let reasons = asked
            .iter()
            .map(|f| {
                if granted(f) {
                    UnsubAckReason::Success
                } else {
                    UnsubAckReason::NoSubscriptionExisted
                }
            })
            .collect();
        // The router holds the granted filters that are not mailboxes.
        unsubscribe.filters = {
            let rights = registry::read(&self.rights);
            asked
                .iter()
                .filter(|f| granted(f) && !rights.is_mailbox(f))
                .cloned()
                .collect()
        };
        self.filters.retain(|(f, _)| !asked.contains(f));
        let ack = UnsubAck {
            pkid: unsubscribe.pkid,
            reasons,
        };
        if !unsubscribe.filters.is_empty() {
            self.actions
                .push_back(Action::Router(Box::new(Packet::Unsubscribe(
                    unsubscribe,
                    props,
                ))));
        }
        self.send(Packet::UnsubAck(ack, None));
    }

    /// A client's DISCONNECT: whether its will fires.
    fn on_disconnect(&mut self, disconnect: Disconnect, props: Option<DisconnectProperties>) {
        let expiry = props.and_then(|p| p.session_expiry_interval).unwrap_or(0);
        if self.limits.session_expiry == 0 && expiry != 0 {
            // MQTT 5 §3.14.2.2.2: after none in CONNECT, a Session Expiry Interval in
            // DISCONNECT is a Protocol Error and not a valid DISCONNECT (the will fires).
            self.disconnect(
                DisconnectReasonCode::ProtocolError,
                "session expiry interval in DISCONNECT after none in CONNECT",
            );
            return self.end(End::Unclean);
        }
        if disconnect.reason_code == DisconnectReasonCode::DisconnectWithWillMessage {
            self.end(End::CleanWithWill)
        } else {
            self.end(End::Clean)
        }
    }

    /// A mailbox message from the controller: written if a granted filter matches (at QoS 1,
    /// or the subscription's lower QoS), and, once the session is cut, only if it is the
    /// message the cut waits for.
    fn deliver(&mut self, topic: String, payload: Vec<u8>) {
        let last = self.is_final(topic.as_bytes());
        let qos = crate::mailbox::delivery_qos(&topic, self.filters.iter());
        // A cut session gets nothing more but the message its cut waits for.
        let Some(qos) = qos.filter(|_| self.closing.is_none() || last) else {
            self.last_delivered = Some(topic);
            return;
        };
        // The controller speaks at QoS 1 (PROTOCOL §3); a QoS 0 subscription gets QoS 0. A
        // client that leaves too many unacknowledged (64, or its Receive Maximum with what the
        // router has in flight to it) gets the rest at QoS 0.
        if qos >= 1
            && self.mailbox_unacked.len() < MAX_MAILBOX_UNACKED
            && self.flight.in_flight() + self.mailbox_unacked.len() < self.limits.receive_maximum
        {
            let pkid = unused_mailbox_pkid(self.mailbox_pkid, &self.mailbox_unacked);
            let bytes = frame::publish_qos1(self.version, &topic, &payload, pkid);
            if self
                .limits
                .max_packet_size
                .is_some_and(|max| bytes.len() > max)
            {
                // Too large for the client: not sent, and taken as delivered [MQTT-3.1.2-25]
                // (its packet id was never used).
                debug!(client_id = %self.client_id, "a mailbox message exceeds the client's maximum packet size");
            } else {
                self.mailbox_pkid = next_mailbox_pkid(pkid);
                self.mailbox_unacked.insert(pkid);
                self.actions.push_back(Action::Write(Bytes::from(bytes)));
            }
        } else {
            let publish = Publish::new(topic.clone().into_bytes(), payload, false);
            self.send(Packet::Publish(publish, None));
        }
        if last {
            return self.cut_now();
        }
        self.last_delivered = Some(topic);
    }

    /// A PUBLISH from the router (`last`: the one a pending cut waits for).
    ///
    /// One larger than the client's Maximum Packet Size is not sent, and the router is told it
    /// was delivered, as the standard has it: "Where a Packet is too large to send, the Server
    /// MUST discard it without sending it and then behave as if it had completed sending that
    /// Application Message" [MQTT-3.1.2-25]. One at QoS 1 or 2 waits while the client has as
    /// many unacknowledged as its Receive Maximum allows [MQTT-3.3.4-9]; nothing else waits for
    /// it [MQTT-3.3.4-10]. [`RouterFlight`] keeps the order the router needs.
    fn forwarded(&mut self, publish: Publish, properties: Option<PublishProperties>, last: bool) {
        let mut bytes = match encode(self.codec, Packet::Publish(publish, properties)) {
            Ok(bytes) => bytes,
            Err(e) => {
                debug!(client_id = %self.client_id, "{e}");
                return self.end(End::Unclean);
            }
        };
        // The front door never sends a PUBLISH twice: DUP is 0 whatever the publisher's was
        // [MQTT-3.3.1-3] (rumqttd's router keeps it).
        if let Some(first) = bytes.first_mut() {
            *first &= !0x08;
        }
        let within = self
            .limits
            .max_packet_size
            .is_none_or(|max| bytes.len() <= max);
        if !within {
            debug!(client_id = %self.client_id, size = bytes.len(), "a PUBLISH exceeds the client's maximum packet size: discarded");
        }
        // A cut session gets nothing more but the message its cut waits for: the others are
        // discarded as if sent.
        let fits = within && (self.closing.is_none() || last);
        match frame::publish_qos_pkid(&bytes) {
            Some((qos @ 1..=2, pkid)) => {
                let room = self.router_room();
                let effects = self.flight.forwarded(pkid, qos, bytes, fits, last, room);
                self.carry_out(effects);
            }
            _ if fits => {
                self.actions.push_back(Action::Write(bytes.freeze()));
                if last {
                    return self.cut_now();
                }
            }
            _ => {}
        }
        // A discarded message counts as delivered: a cut waiting for it need not wait.
        if last && !fits {
            self.cut_now();
        }
    }

    /// What the client's Receive Maximum leaves to the router's messages.
    fn router_room(&self) -> usize {
        self.limits
            .receive_maximum
            .saturating_sub(self.mailbox_unacked.len())
    }

    /// Carries out what [`RouterFlight`] asks: acknowledgements to the router, and writes to
    /// the client.
    fn carry_out(&mut self, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Router(ack) => {
                    let packet = match ack {
                        ToRouter::Acked(pkid) => Packet::PubAck(
                            PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            },
                            None,
                        ),
                        ToRouter::Received(pkid) => Packet::PubRec(
                            PubRec {
                                pkid,
                                reason: PubRecReason::Success,
                            },
                            None,
                        ),
                        ToRouter::Completed(pkid) => Packet::PubComp(
                            PubComp {
                                pkid,
                                reason: PubCompReason::Success,
                            },
                            None,
                        ),
                    };
                    self.actions.push_back(Action::Router(Box::new(packet)));
                }
                Effect::Write { bytes, last } => {
                    self.actions.push_back(Action::Write(bytes.freeze()));
                    if last {
                        return self.cut_now();
                    }
                }
            }
        }
    }

    /// A client's PUBACK, PUBREC or PUBCOMP of a message from the router: it goes to the
    /// router, then what it frees (the turn of a discarded message, room in the Receive
    /// Maximum) is used.
    fn acknowledged(&mut self, packet: Packet) {
        let ack = match &packet {
            Packet::PubAck(ack, _) => Some(ClientAck::Acked(ack.pkid)),
            Packet::PubComp(comp, _) => Some(ClientAck::Completed(comp.pkid)),
            Packet::PubRec(rec, _) => Some(ClientAck::Received {
                pkid: rec.pkid,
                // MQTT 5 §4.9: a PUBREC of 0x80 or more ends the message's flight.
                failed: !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ),
            }),
            _ => None,
        };
        self.actions.push_back(Action::Router(Box::new(packet)));
        if let Some(ack) = ack {
            let room = self.router_room();
            let effects = self.flight.acknowledged(ack, room);
            self.carry_out(effects);
        }
    }
}

fn next_mailbox_pkid(pkid: u16) -> u16 {
    if pkid == u16::MAX {
        MAILBOX_PKIDS_FROM
    } else {
        pkid + 1
    }
}

/// The first packet id from `from` on (0x8000 to 0xFFFF, then round again) that no
/// unacknowledged mailbox message has [MQTT-2.2.1-4]. At most [`MAX_MAILBOX_UNACKED`] are in use,
/// so one is found within that many steps.
fn unused_mailbox_pkid(from: u16, in_use: &HashSet<u16>) -> u16 {
    let mut pkid = from.max(MAILBOX_PKIDS_FROM);
    for _ in 0..=MAX_MAILBOX_UNACKED {
        if !in_use.contains(&pkid) {
            break;
        }
        pkid = next_mailbox_pkid(pkid);
    }
    pkid
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Rights;
    use proptest::prelude::*;
    use rumqttd::Forward;
    use std::sync::{Arc, RwLock};

    const KEEPALIVE: Duration = Duration::from_secs(90);
    const GRACE: Duration = Duration::from_secs(2);

    /// Inbox `in/c`, router data `data/c/…`, mailboxes `mbox/c` and `final/c`.
    fn rights() -> Rights {
        Rights {
            publish: vec!["in/c".into(), "data/c/#".into()],
            publish_deny: vec![],
            subscribe: vec!["mbox/c".into(), "final/c".into(), "data/#".into()],
            inbox: vec!["in/c".into()],
            mailbox: vec!["mbox/c".into(), "final/c".into()],
            retain: false,
        }
    }

    fn session(version: MqttVersion, t0: Instant) -> Session {
        let config = SessionConfig {
            client_id: "c".into(),
            version,
            rights: Arc::new(RwLock::new(rights())),
            limits: ClientLimits::of(version, None),
            max_packet_size: 64 * 1024,
            keepalive: KEEPALIVE,
            cut_grace: GRACE,
        };
        Session::new(config, t0)
    }

    fn drain(session: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| session.poll_action()).collect()
    }

    /// A client's PUBLISH, by hand (rumqttd makes only QoS 0 ones).
    fn publish(version: MqttVersion, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend(pkid.to_be_bytes());
        }
        if version == MqttVersion::V5 {
            body.push(0);
        }
        body.extend_from_slice(payload);
        let mut out = vec![0x30 | (qos << 1)];
        frame::push_remaining_length(&mut out, body.len());
        out.extend(body);
        out
    }

    fn subscribe(filter: &str, pkid: u16) -> Vec<u8> {
        let mut body = pkid.to_be_bytes().to_vec();
        body.extend((filter.len() as u16).to_be_bytes());
        body.extend_from_slice(filter.as_bytes());
        body.push(1);
        let mut out = vec![0x82];
        frame::push_remaining_length(&mut out, body.len());
        out.extend(body);
        out
    }

    /// (packet type, packet id) of a small packet the session wrote.
    fn kind_and_pkid(bytes: &[u8]) -> (u8, u16) {
        (bytes[0] >> 4, u16::from_be_bytes([bytes[2], bytes[3]]))
    }

    fn contains(bytes: &[u8], needle: &[u8]) -> bool {
        bytes.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn frames_after_an_inbox_message_wait_for_its_answer() {
        let t0 = Instant::now();
        let mut s = session(MqttVersion::V311, t0);
        let mut buf = BytesMut::from(&publish(MqttVersion::V311, "in/c", 1, 9, b"hi")[..]);
        buf.extend_from_slice(&[0xc0, 0x00]); // PINGREQ
        s.handle_client(&mut buf, t0);
        let actions = drain(&mut s);
        assert!(
            matches!(&actions[..], [Action::Inbox { topic, payload }] if topic == "in/c" && payload == b"hi"),
            "{actions:?}"
        );
        s.inbox_done(true);
        s.resume(&mut buf);
        let written: Vec<Vec<u8>> = drain(&mut s)
            .into_iter()
            .map(|a| match a {
                Action::Write(b) => b.to_vec(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(written, [vec![0x40, 0x02, 0x00, 0x09], vec![0xd0, 0x00]]);
    }

    #[test]
    fn an_inbox_message_not_handled_ends_the_session_unacknowledged() {
        let t0 = Instant::now();
        let mut s = session(MqttVersion::V311, t0);
        let mut buf = BytesMut::from(&publish(MqttVersion::V311, "in/c", 1, 3, b"x")[..]);
        s.handle_client(&mut buf, t0);
        drain(&mut s);
        s.inbox_done(false);
        let actions = drain(&mut s);
        assert!(
            matches!(&actions[..], [Action::End(End::Unclean)]),
            "{actions:?}"
        );
    }

    #[test]
    fn keepalive_and_the_grace_of_a_cut_come_from_poll_timeout() {
        let t0 = Instant::now();
        let mut s = session(MqttVersion::V5, t0);
        assert_eq!(s.poll_timeout(), t0 + KEEPALIVE);
        s.handle_client(&mut BytesMut::new(), t0 + Duration::from_secs(10));
        assert_eq!(s.poll_timeout(), t0 + Duration::from_secs(10) + KEEPALIVE);
        s.handle_control(
            Control::Cut {
                last_topic: Some("final/c".into()),
            },
            t0 + Duration::from_secs(20),
        );
        assert_eq!(s.poll_timeout(), t0 + Duration::from_secs(20) + GRACE);
        s.handle_timeout(t0 + Duration::from_secs(21));
        assert!(drain(&mut s).is_empty(), "within the grace");
        s.handle_timeout(t0 + Duration::from_secs(22));
        let actions = drain(&mut s);
        assert!(
            matches!(&actions[..], [Action::Write(d), Action::End(End::Cut)] if d[0] == 0xe0),
            "DISCONNECT, then the end: {actions:?}"
        );

        let mut silent = session(MqttVersion::V311, t0);
        silent.handle_timeout(t0 + KEEPALIVE - Duration::from_millis(1));
        assert!(drain(&mut silent).is_empty());
        silent.handle_timeout(t0 + KEEPALIVE);
        assert!(matches!(
            &drain(&mut silent)[..],
            [Action::End(End::Unclean)]
        ));
    }

    #[test]
    fn a_subscription_the_router_keeps_goes_to_it_and_a_mailbox_is_answered_here() {
        let t0 = Instant::now();
        let mut s = session(MqttVersion::V311, t0);
        let mut buf = BytesMut::from(&subscribe("mbox/c", 1)[..]);
        buf.extend_from_slice(&subscribe("data/#", 2));
        buf.extend_from_slice(&subscribe("data/other/#", 3)); // covered by data/#
        buf.extend_from_slice(&subscribe("elsewhere", 4));
        s.handle_client(&mut buf, t0);
        let actions = drain(&mut s);
        assert!(matches!(&actions[0], Action::Write(b) if b[..] == [0x90, 0x03, 0x00, 0x01, 0x01]));
        let routed = |a: &Action, pkid| matches!(a, Action::Router(p) if matches!(&**p, Packet::Subscribe(sub, _) if sub.pkid == pkid));
        assert!(routed(&actions[1], 2));
        assert!(routed(&actions[2], 3));
        assert!(matches!(&actions[3], Action::Write(b) if b[..] == [0x90, 0x03, 0x00, 0x04, 0x80]));
        assert_eq!(actions.len(), 4);
    }

    #[derive(Debug, Clone, Copy)]
    enum Dest {
        Inbox,
        Router,
        Denied,
    }

    fn dest() -> impl Strategy<Value = Dest> {
        prop_oneof![Just(Dest::Inbox), Just(Dest::Router), Just(Dest::Denied)]
    }

    proptest! {
        /// Every QoS 1 and 2 PUBLISH from the client is acknowledged exactly once with its
        /// packet id, whatever the rights: by the session (inbox, refusal), or by the router,
        /// which it reaches exactly once; a QoS 0 one is never answered. Nothing denied reaches
        /// the inbox or the router.
        #[test]
        fn every_qos_publish_gets_exactly_one_acknowledgement(
            v5 in any::<bool>(),
            publishes in proptest::collection::vec((dest(), 0u8..3), 1..40),
            split in 1usize..64,
        ) {
            let version = if v5 { MqttVersion::V5 } else { MqttVersion::V311 };
            let t0 = Instant::now();
            let mut s = session(version, t0);
            let mut wire = Vec::new();
            for (i, (dest, qos)) in publishes.iter().enumerate() {
                let topic = match dest {
                    Dest::Inbox => "in/c",
                    Dest::Router => "data/c/x",
                    Dest::Denied => "data/other/x",
                };
                wire.extend(publish(version, topic, *qos, i as u16 + 1, b"p"));
            }
            // The bytes arrive in pieces of any size.
            let mut buf = BytesMut::new();
            let mut answers: HashMap<u16, usize> = HashMap::new();
            let mut inbox = 0usize;
            let mut routed: Vec<u16> = Vec::new();
            for piece in wire.chunks(split) {
                buf.extend_from_slice(piece);
                s.handle_client(&mut buf, t0);
                loop {
                    let Some(action) = s.poll_action() else { break };
                    match action {
                        Action::Inbox { topic, .. } => {
                            prop_assert_eq!(topic, "in/c");
                            inbox += 1;
                            s.inbox_done(true);
                            s.resume(&mut buf);
                        }
                        Action::Write(bytes) => {
                            let (kind, pkid) = kind_and_pkid(&bytes);
                            prop_assert!(kind == 4 || kind == 5, "PUBACK or PUBREC, not {kind}");
                            *answers.entry(pkid).or_default() += 1;
                        }
                        Action::Router(packet) => {
                            let Packet::Publish(p, props) = *packet else {
                                return Err(TestCaseError::fail("only PUBLISHes to the router"));
                            };
                            prop_assert_eq!(&p.topic[..], b"data/c/x");
                            let bytes = encode(Codec(version), Packet::Publish(p, props));
                            let peeked = bytes.ok().and_then(|b| frame::publish_qos_pkid(&b));
                            routed.push(peeked.map_or(0, |(_, pkid)| pkid));
                        }
                        other => prop_assert!(false, "unexpected {other:?}"),
                    }
                }
            }
            prop_assert!(buf.is_empty());
            let expected_inbox = publishes.iter().filter(|(d, _)| matches!(d, Dest::Inbox)).count();
            prop_assert_eq!(inbox, expected_inbox);
            for (i, (dest, qos)) in publishes.iter().enumerate() {
                let pkid = i as u16 + 1;
                let by_session = answers.get(&pkid).copied().unwrap_or(0);
                let by_router = routed.iter().filter(|p| **p == pkid).count();
                match (dest, qos) {
                    (_, 0) => prop_assert_eq!(by_session, 0),
                    (Dest::Router, _) => prop_assert_eq!((by_session, by_router), (0, 1)),
                    _ => prop_assert_eq!((by_session, by_router), (1, 0)),
                }
            }
        }

        /// A cut session writes nothing more but the message its cut waits for, whatever comes
        /// from the controller or the router after the cut, and ends once that one is written.
        #[test]
        fn a_cut_session_delivers_nothing_but_its_final_message(
            v5 in any::<bool>(),
            before in proptest::collection::vec(any::<bool>(), 0..8),
            after in proptest::collection::vec(0u8..3, 0..12),
        ) {
            let version = if v5 { MqttVersion::V5 } else { MqttVersion::V311 };
            let t0 = Instant::now();
            let mut s = session(version, t0);
            let mut buf = BytesMut::new();
            for filter in ["mbox/c", "final/c", "data/#"] {
                buf.extend_from_slice(&subscribe(filter, 1));
            }
            s.handle_client(&mut buf, t0);
            drain(&mut s);
            for &mailbox in &before {
                let topic = if mailbox { "mbox/c" } else { "final/c" };
                s.handle_control(Control::Deliver { topic: topic.into(), payload: b"before".to_vec() }, t0);
            }
            drain(&mut s);
            // The final message may have been written just before the cut: it ends at once.
            let mut final_written = before.last() == Some(&false);
            let mut ended = false;
            for kind in std::iter::once(None).chain(after.into_iter().map(Some)) {
                match kind {
                    None => s.handle_control(Control::Cut { last_topic: Some("final/c".into()) }, t0),
                    Some(0) => s.handle_control(Control::Deliver { topic: "mbox/c".into(), payload: b"late".to_vec() }, t0),
                    Some(1) => s.handle_control(Control::Deliver { topic: "final/c".into(), payload: b"bye".to_vec() }, t0),
                    Some(_) => s.handle_router(Notification::Forward(Forward {
                        cursor: None,
                        size: 0,
                        publish: Publish::new(b"data/x".to_vec(), b"late data".to_vec(), false),
                        properties: None,
                    })),
                }
                for action in drain(&mut s) {
                    prop_assert!(!ended, "an action after the end: {action:?}");
                    match action {
                        Action::Write(bytes) if bytes[0] >> 4 == 3 => {
                            prop_assert!(contains(&bytes, b"final/c"), "{bytes:?}");
                            prop_assert!(!final_written);
                            final_written = true;
                        }
                        Action::Write(bytes) => prop_assert_eq!(bytes[0], 0xe0, "only a DISCONNECT"),
                        Action::End(end) => {
                            prop_assert_eq!(end, End::Cut);
                            prop_assert!(final_written);
                            ended = true;
                        }
                        other => prop_assert!(false, "unexpected {other:?}"),
                    }
                }
            }
        }
    }
}
