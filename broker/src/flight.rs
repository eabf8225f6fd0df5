//! What rumqttd's router has in flight to one client, and what the front door does about it.
//! Pure: the pump hands it events and carries out the effects it returns.
//!
//! Two rules meet here. The router takes acknowledgements only in the order it sent the
//! messages ("We don't support out of order acks", rumqttd iobufs.rs: PUBACKs and PUBRECs in
//! the order of the PUBLISHes, PUBCOMPs in the order of the PUBRECs) and drops the client
//! otherwise. And the front door answers some messages for the client: one too large for the
//! client's Maximum Packet Size is discarded and completed as if sent [MQTT-3.1.2-25]; one that
//! finds no room in the client's Receive Maximum waits [MQTT-3.3.4-9]. So a discarded message's
//! acknowledgement goes to the router only when every message before it is acknowledged, and a
//! waiting message keeps its place.

use std::collections::{HashSet, VecDeque};

use bytes::BytesMut;

/// An acknowledgement the front door sends to the router for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ToRouter {
    /// PUBACK.
    Acked(u16),
    /// PUBREC.
    Received(u16),
    /// PUBCOMP.
    Completed(u16),
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    Router(ToRouter),
    /// Write this PUBLISH to the client (`last`: the one a pending cut waits for).
    Write {
        bytes: BytesMut,
        last: bool,
    },
}

/// A client's acknowledgement of a message from the router.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientAck {
    /// PUBACK.
    Acked(u16),
    /// PUBREC; `failed`: a reason code of 0x80 or more, which ends the message's flight.
    Received { pkid: u16, failed: bool },
    /// PUBCOMP.
    Completed(u16),
}

#[derive(Debug)]
enum Fate {
    /// Written to the client; its acknowledgement is the client's.
    Written,
    /// Too large for the client: never written, acknowledged here in its turn.
    Discarded,
    /// Waiting for room in the client's Receive Maximum.
    Waiting { bytes: BytesMut, last: bool },
}

#[derive(Debug)]
struct Unacked {
    pkid: u16,
    qos: u8,
    fate: Fate,
}

#[derive(Debug, Default)]
pub(crate) struct RouterFlight {
    /// QoS 1 and 2 messages not acknowledged (PUBACK, PUBREC) yet, in the router's order.
    unacked: VecDeque<Unacked>,
    /// QoS 2 messages received (PUBREC) and not completed (PUBCOMP) yet, in PUBREC order;
    /// `true`: discarded, completed here.
    unreleased: VecDeque<(u16, bool)>,
    /// Discarded QoS 2 messages whose PUBREL from the router the client must not see.
    swallow: HashSet<u16>,
}

impl RouterFlight {
    /// Messages written to the client and not acknowledged yet (what its Receive Maximum
    /// counts: MQTT 5 §4.9).
    pub(crate) fn in_flight(&self) -> usize {
        let unacked = self
            .unacked
            .iter()
            .filter(|m| matches!(m.fate, Fate::Written))
            .count();
        let unreleased = self.unreleased.iter().filter(|(_, d)| !d).count();
        unacked + unreleased
    }

    /// A QoS 1 or 2 PUBLISH from the router, encoded in `bytes`. `fits`: within the
    /// client's Maximum Packet Size; `room`: how many messages the client's Receive Maximum
    /// leaves to the router (besides the front door's own).
    pub(crate) fn forwarded(
        &mut self,
        pkid: u16,
        qos: u8,
        bytes: BytesMut,
        fits: bool,
        last: bool,
        room: usize,
    ) -> Vec<Effect> {
        let fate = if fits {
            Fate::Waiting { bytes, last }
        } else {
            Fate::Discarded
        };
        self.unacked.push_back(Unacked { pkid, qos, fate });
        self.settle(room)
    }

    /// The client acknowledged a message; its acknowledgement goes to the router (by the
    /// caller, first), then the effects.
    pub(crate) fn acknowledged(&mut self, ack: ClientAck, room: usize) -> Vec<Effect> {
        match ack {
            ClientAck::Acked(pkid) | ClientAck::Received { pkid, failed: true } => {
                self.remove_unacked(pkid);
            }
            ClientAck::Received {
                pkid,
                failed: false,
            } => {
                if self.remove_unacked(pkid) {
                    self.unreleased.push_back((pkid, false));
                }
            }
            ClientAck::Completed(pkid) => {
                if let Some(at) = self.unreleased.iter().position(|(p, _)| *p == pkid) {
                    self.unreleased.remove(at);
                }
            }
        }
        self.settle(room)
    }

    /// The client's Receive Maximum has room again (it acknowledged one of the front
    /// door's own messages).
    pub(crate) fn room_freed(&mut self, room: usize) -> Vec<Effect> {
        self.settle(room)
    }

    /// Whether a PUBREL from the router is for a discarded message (not for the client).
    pub(crate) fn swallows(&mut self, pkid: u16) -> bool {
        self.swallow.remove(&pkid)
    }

    fn remove_unacked(&mut self, pkid: u16) -> bool {
        match self.unacked.iter().position(|m| m.pkid == pkid) {
            Some(at) => self.unacked.remove(at).is_some(),
            None => false,
        }
    }

    /// Acknowledges the discarded messages whose turn it is, then writes waiting ones while
    /// there is room, in order.
    fn settle(&mut self, room: usize) -> Vec<Effect> {
        let mut effects = Vec::new();
        while let Some(Unacked {
            fate: Fate::Discarded,
            ..
        }) = self.unacked.front()
        {
            let Some(m) = self.unacked.pop_front() else {
                break;
            };
            if m.qos == 1 {
                effects.push(Effect::Router(ToRouter::Acked(m.pkid)));
            } else {
                effects.push(Effect::Router(ToRouter::Received(m.pkid)));
                self.swallow.insert(m.pkid);
                self.unreleased.push_back((m.pkid, true));
            }
        }
        while let Some(&(pkid, true)) = self.unreleased.front() {
            self.unreleased.pop_front();
            effects.push(Effect::Router(ToRouter::Completed(pkid)));
        }
        let mut in_flight = self.in_flight();
        for m in self.unacked.iter_mut() {
            if !matches!(m.fate, Fate::Waiting { .. }) {
                continue;
            }
            if in_flight >= room {
                break;
            }
            if let Fate::Waiting { bytes, last } = std::mem::replace(&mut m.fate, Fate::Written) {
                effects.push(Effect::Write { bytes, last });
                in_flight += 1;
            }
        }
        effects
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn bytes(n: u8) -> BytesMut {
        BytesMut::from(&[n][..])
    }

    fn router_acks(effects: &[Effect]) -> Vec<ToRouter> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Router(a) => Some(*a),
                Effect::Write { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_discarded_message_is_acknowledged_in_its_turn() {
        let mut flight = RouterFlight::default();
        let e = flight.forwarded(1, 1, bytes(1), true, false, 10);
        assert!(matches!(&e[..], [Effect::Write { .. }]));
        // Discarded behind an unacknowledged one: its PUBACK waits.
        assert_eq!(flight.forwarded(2, 1, bytes(2), false, false, 10), vec![]);
        assert_eq!(
            router_acks(&flight.acknowledged(ClientAck::Acked(1), 10)),
            [ToRouter::Acked(2)]
        );
        // At the head, at once; a QoS 2 one is received and completed, and its PUBREL
        // swallowed.
        assert_eq!(
            router_acks(&flight.forwarded(3, 2, bytes(3), false, false, 10)),
            [ToRouter::Received(3), ToRouter::Completed(3)]
        );
        assert!(flight.swallows(3));
        assert!(!flight.swallows(3));
        assert_eq!(flight.in_flight(), 0);
    }

    #[test]
    fn completions_keep_the_order_of_receipts() {
        let mut flight = RouterFlight::default();
        flight.forwarded(1, 2, bytes(1), true, false, 10);
        let received = ClientAck::Received {
            pkid: 1,
            failed: false,
        };
        assert_eq!(flight.acknowledged(received, 10), vec![]);
        // Discarded after 1 was received: received at once, completed after 1 is.
        assert_eq!(
            router_acks(&flight.forwarded(2, 2, bytes(2), false, false, 10)),
            [ToRouter::Received(2)]
        );
        assert_eq!(flight.in_flight(), 1, "1 awaits its PUBCOMP");
        assert_eq!(
            router_acks(&flight.acknowledged(ClientAck::Completed(1), 10)),
            [ToRouter::Completed(2)]
        );
    }

    #[test]
    fn messages_wait_for_room_in_the_receive_maximum_and_keep_their_order() {
        let mut flight = RouterFlight::default();
        let mut written = Vec::new();
        for pkid in 1..=4u16 {
            for e in flight.forwarded(pkid, 1, bytes(pkid as u8), true, pkid == 4, 2) {
                if let Effect::Write { bytes, .. } = e {
                    written.push(bytes[0]);
                }
            }
        }
        assert_eq!(written, [1, 2]);
        assert_eq!(flight.in_flight(), 2);
        let e = flight.acknowledged(ClientAck::Acked(1), 2);
        assert!(matches!(&e[..], [Effect::Write { bytes, last: false }] if bytes[0] == 3));
        // Room freed elsewhere (a mailbox message acknowledged): nothing, still full.
        assert_eq!(flight.room_freed(2), vec![]);
        let e = flight.acknowledged(ClientAck::Acked(2), 2);
        assert!(matches!(&e[..], [Effect::Write { bytes, last: true }] if bytes[0] == 4));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Forward { qos: u8, fits: bool },
        AckNext,
        CompleteNext,
        ShrinkRoom,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (1u8..3, any::<bool>()).prop_map(|(qos, fits)| Op::Forward { qos, fits }),
            Just(Op::AckNext),
            Just(Op::CompleteNext),
            Just(Op::ShrinkRoom),
        ]
    }

    proptest! {
        /// Whatever the router sends and the client acknowledges (in order, as clients do),
        /// the router gets its PUBACKs and PUBRECs in the order of its PUBLISHes and its
        /// PUBCOMPs in the order of the PUBRECs; the client never has more written and
        /// unacknowledged than the room; and the client gets the messages that fit in the
        /// router's order.
        #[test]
        fn the_router_sees_its_order_and_the_client_its_room(
            ops in proptest::collection::vec(op(), 0..80),
            start_room in 1usize..4,
        ) {
            let mut flight = RouterFlight::default();
            let mut room = start_room;
            let mut next_pkid = 1u16;
            let mut sent = Vec::new(); // (pkid, qos, fits) in router order
            let mut to_router: Vec<ToRouter> = Vec::new();
            let mut client_unacked: VecDeque<(u16, u8)> = VecDeque::new();
            let mut client_received: VecDeque<u16> = VecDeque::new();
            let mut written = Vec::new();
            for op in ops {
                let effects = match op {
                    Op::Forward { qos, fits } => {
                        let pkid = next_pkid;
                        next_pkid += 1;
                        sent.push((pkid, qos, fits));
                        let b = BytesMut::from(&pkid.to_be_bytes()[..]);
                        flight.forwarded(pkid, qos, b, fits, false, room)
                    }
                    Op::AckNext => match client_unacked.pop_front() {
                        Some((pkid, 1)) => {
                            to_router.push(ToRouter::Acked(pkid));
                            flight.acknowledged(ClientAck::Acked(pkid), room)
                        }
                        Some((pkid, _)) => {
                            to_router.push(ToRouter::Received(pkid));
                            client_received.push_back(pkid);
                            flight.acknowledged(ClientAck::Received { pkid, failed: false }, room)
                        }
                        None => vec![],
                    },
                    Op::CompleteNext => match client_received.pop_front() {
                        Some(pkid) => {
                            to_router.push(ToRouter::Completed(pkid));
                            flight.acknowledged(ClientAck::Completed(pkid), room)
                        }
                        None => vec![],
                    },
                    Op::ShrinkRoom => {
                        room = room.saturating_sub(1).max(1);
                        flight.room_freed(room)
                    }
                };
                let mut wrote = false;
                for effect in effects {
                    match effect {
                        Effect::Router(ack) => to_router.push(ack),
                        Effect::Write { bytes, .. } => {
                            wrote = true;
                            let pkid = u16::from_be_bytes([bytes[0], bytes[1]]);
                            let qos = sent.iter().find(|(p, ..)| *p == pkid).map(|s| s.1).unwrap_or(0);
                            client_unacked.push_back((pkid, qos));
                            written.push(pkid);
                        }
                    }
                }
                if wrote {
                    prop_assert!(flight.in_flight() <= room, "written beyond the room");
                }
            }
            let acks: Vec<u16> = to_router.iter().filter_map(|a| match a {
                ToRouter::Acked(p) | ToRouter::Received(p) => Some(*p),
                ToRouter::Completed(_) => None,
            }).collect();
            let order: Vec<u16> = sent.iter().map(|s| s.0).collect();
            prop_assert_eq!(&acks[..], &order[..acks.len()]);
            let recs: Vec<u16> = to_router.iter().filter_map(|a| match a {
                ToRouter::Received(p) => Some(*p),
                _ => None,
            }).collect();
            let comps: Vec<u16> = to_router.iter().filter_map(|a| match a {
                ToRouter::Completed(p) => Some(*p),
                _ => None,
            }).collect();
            prop_assert_eq!(&comps[..], &recs[..comps.len()]);
            let fitting: Vec<u16> = sent.iter().filter(|s| s.2).map(|s| s.0).collect();
            prop_assert_eq!(&written[..], &fitting[..written.len()]);
        }
    }
}
