//! The controller's side of the bus: it answers the edges' admission calls with the real
//! [`Admission`] ([`serve`]), changes their sessions through [`ClusterSessions`], and
//! publishes its events to every edge through [`ClusterBus`].
//!
//! Which edge holds which session is soft state, kept here in memory and learnt from the
//! sessions the edges open: a controller that starts (after a failover) knows none, and the
//! edges, seeing a new controller's beat, end theirs so that every device is admitted again by
//! it. PostgreSQL stays the only source of truth for devices; nothing about sessions is
//! trusted from an earlier controller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fleet_broker::{Admission, Bus, BusError, BusMessage, Rights, SessionControl};
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::wire::{self, EdgeId, ToEdge};
use crate::{subject, BEAT, CONTROLLERS, CUT_PATIENCE, EDGE_SILENCE};

/// What the controller sends, in the order it said it.
#[derive(Debug)]
pub enum Outbound {
    ToEdge { edge: String, order: ToEdge },
    Event(wire::Event),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Holder {
    edge: EdgeId,
    session_id: u64,
}

/// The controller's [`SessionControl`] in a cluster: each change goes to the edge that holds
/// the session, through one ordered queue ([`serve`] sends it).
pub struct ClusterSessions {
    holders: Mutex<HashMap<String, Holder>>,
    out: mpsc::UnboundedSender<Outbound>,
}

impl ClusterSessions {
    /// The sessions, and the queue that [`serve`] sends from.
    pub fn new() -> (Arc<ClusterSessions>, mpsc::UnboundedReceiver<Outbound>) {
        let (out, rx) = mpsc::unbounded_channel();
        let sessions = ClusterSessions {
            holders: Mutex::new(HashMap::new()),
            out,
        };
        (Arc::new(sessions), rx)
    }

    fn holders(&self) -> MutexGuard<'_, HashMap<String, Holder>> {
        self.holders.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, edge: &EdgeId, order: ToEdge) {
        let _ = self.out.send(Outbound::ToEdge {
            edge: edge.edge.clone(),
            order,
        });
    }

    /// `edge` opened `session_id` for `client_id`: it holds the client id now. A session that
    /// held it before, on any edge, is told to end (a takeover across edges).
    pub fn opened(&self, edge: &EdgeId, client_id: &str, session_id: u64) {
        let new = Holder {
            edge: edge.clone(),
            session_id,
        };
        let before = self.holders().insert(client_id.to_owned(), new.clone());
        if let Some(before) = before.filter(|before| *before != new) {
            self.send(
                &before.edge,
                ToEdge::TakenOver {
                    client_id: client_id.to_owned(),
                    session_id: before.session_id,
                },
            );
        }
    }

    /// `edge`'s `session_id` ended; the client id is forgotten if that was its session.
    pub fn closed(&self, edge: &EdgeId, client_id: &str, session_id: u64) {
        let mut holders = self.holders();
        if holders
            .get(client_id)
            .is_some_and(|h| h.edge == *edge && h.session_id == session_id)
        {
            holders.remove(client_id);
        }
    }

    /// Forgets every session of edge `name` but those of `incarnation` (none: all of them),
    /// and returns what it forgot (the edge restarted, or is gone).
    pub fn forget_edge(&self, name: &str, incarnation: Option<u64>) -> Vec<(String, u64)> {
        let mut forgotten = Vec::new();
        self.holders().retain(|client_id, h| {
            let gone = h.edge.edge == name && Some(h.edge.incarnation) != incarnation;
            if gone {
                forgotten.push((client_id.clone(), h.session_id));
            }
            !gone
        });
        forgotten
    }

    /// Number of sessions the edges hold, as far as this controller knows.
    pub fn len(&self) -> usize {
        self.holders().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn holder(&self, client_id: &str, session_id: Option<u64>) -> Option<Holder> {
        self.holders()
            .get(client_id)
            .filter(|h| session_id.is_none_or(|id| h.session_id == id))
            .cloned()
    }
}

impl SessionControl for ClusterSessions {
    fn set_rights(&self, client_id: &str, rights: Rights) -> bool {
        let Some(h) = self.holder(client_id, None) else {
            return false;
        };
        self.send(
            &h.edge,
            ToEdge::Rights {
                client_id: client_id.to_owned(),
                session_id: None,
                rights,
            },
        );
        true
    }

    fn set_rights_of(&self, client_id: &str, session_id: u64, rights: Rights) -> bool {
        let Some(h) = self.holder(client_id, Some(session_id)) else {
            return false;
        };
        self.send(
            &h.edge,
            ToEdge::Rights {
                client_id: client_id.to_owned(),
                session_id: Some(session_id),
                rights,
            },
        );
        true
    }

    fn cut(&self, client_id: &str, last_topic: Option<String>) -> bool {
        let Some(h) = self.holder(client_id, None) else {
            return false;
        };
        self.send(
            &h.edge,
            ToEdge::Cut {
                client_id: client_id.to_owned(),
                last_topic,
            },
        );
        true
    }

    fn is_connected(&self, client_id: &str) -> bool {
        self.holders().contains_key(client_id)
    }

    fn deliver(&self, client_id: &str, topic: String, payload: Vec<u8>) -> bool {
        let Some(h) = self.holder(client_id, None) else {
            return false;
        };
        self.send(
            &h.edge,
            ToEdge::Deliver {
                client_id: client_id.to_owned(),
                session_id: None,
                topic,
                payload,
            },
        );
        true
    }

    fn deliver_to(
        &self,
        client_id: &str,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> bool {
        let Some(h) = self.holder(client_id, Some(session_id)) else {
            return false;
        };
        self.send(
            &h.edge,
            ToEdge::Deliver {
                client_id: client_id.to_owned(),
                session_id: Some(session_id),
                topic,
                payload,
            },
        );
        true
    }
}

/// The controller's [`Bus`] in a cluster: what it publishes goes to every edge's router.
/// It subscribes to nothing (the controller hears devices and operators through its inbox).
pub struct ClusterBus {
    out: mpsc::UnboundedSender<Outbound>,
}

impl ClusterBus {
    /// A bus that publishes through the queue of `sessions` (one order for everything).
    pub fn new(sessions: &ClusterSessions) -> ClusterBus {
        ClusterBus {
            out: sessions.out.clone(),
        }
    }
}

impl Bus for ClusterBus {
    fn subscribe(&mut self, _filter: &str) -> Result<(), BusError> {
        Ok(())
    }

    fn publish(&mut self, topic: &str, payload: Vec<u8>, _retain: bool) -> Result<(), BusError> {
        self.out
            .send(Outbound::Event(wire::Event {
                topic: topic.to_owned(),
                payload,
            }))
            .map_err(|_| BusError::Closed)
    }

    async fn next(&mut self) -> Result<BusMessage, BusError> {
        std::future::pending().await
    }

    fn try_next(&mut self) -> Option<BusMessage> {
        None
    }
}

/// How long a graceful stop waits for the outbound queue to be sent.
const DRAIN_PATIENCE: Duration = Duration::from_secs(3);

/// Serves the edges until `stop` turns true: answers their admission calls with `admission`,
/// sends what `outbound` queues (in order; a cut waits for the edge's confirmation, at most
/// [`CUT_PATIENCE`], before anything after it leaves), beats, and forgets the sessions of
/// edges that restarted or fell silent.
pub async fn serve(
    client: async_nats::Client,
    admission: Arc<dyn Admission>,
    sessions: Arc<ClusterSessions>,
    outbound: mpsc::UnboundedReceiver<Outbound>,
    reconnects: Arc<crate::Connection>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), crate::ClusterError> {
    let mut me = Instances::new();
    let nats = |e: async_nats::SubscribeError| crate::ClusterError::Nats(e.to_string());
    let queue = |s: &'static str| client.queue_subscribe(s, CONTROLLERS.to_owned());
    let mut admits = queue(subject::ADMIT).await.map_err(nats)?;
    let mut opened = queue(subject::OPENED).await.map_err(nats)?;
    let mut closed = queue(subject::CLOSED).await.map_err(nats)?;
    let mut refused = queue(subject::REFUSED).await.map_err(nats)?;
    let mut messages = queue(subject::MESSAGE).await.map_err(nats)?;
    let mut edge_beats = client.subscribe(subject::EDGE_BEAT).await.map_err(nats)?;
    // Another controller's beat means two serve: with a redb store each, nothing stops that.
    let mut controller_beats = client
        .subscribe(subject::CONTROLLER_BEAT)
        .await
        .map_err(nats)?;
    let sender = tokio::spawn(send_outbound(client.clone(), outbound, stop.clone()));
    let mut tick = tokio::time::interval(BEAT);
    let mut edges: HashMap<String, (u64, Instant)> = HashMap::new();
    info!(
        instance = me.now,
        "the controller serves the edges on the bus"
    );
    loop {
        tokio::select! {
            Some(m) = admits.next() => {
                tokio::spawn(admit(client.clone(), admission.clone(), me.now, m));
            }
            Some(m) = opened.next() => {
                let (client, admission, sessions) =
                    (client.clone(), admission.clone(), sessions.clone());
                tokio::spawn(opened_session(client, admission, sessions, m));
            }
            Some(m) = closed.next() => session_closed(&admission, &sessions, &m),
            Some(m) = refused.next() => {
                let admission = admission.clone();
                if let Some(r) = parse::<wire::Refused>(&m) {
                    tokio::task::spawn_blocking(move || {
                        admission.refused(&r.client_id, r.peer_addr, &r.reason)
                    });
                }
            }
            Some(m) = messages.next() => {
                let (client, admission) = (client.clone(), admission.clone());
                tokio::spawn(async move {
                    let Some(msg) = parse::<wire::Message>(&m) else { return };
                    let handled = admission
                        .message(&msg.client_id, msg.session_id, msg.topic, msg.payload)
                        .await;
                    answer(&client, m, &handled).await;
                });
            }
            Some(m) = edge_beats.next() => {
                let Some(edge) = parse::<EdgeId>(&m) else { continue };
                let before = edges.insert(edge.edge.clone(), (edge.incarnation, Instant::now()));
                if before.is_some_and(|(incarnation, _)| incarnation != edge.incarnation) {
                    info!(edge = %edge.edge, "an edge restarted: its earlier sessions are gone");
                    forget(&admission, sessions.forget_edge(&edge.edge, Some(edge.incarnation)));
                }
            }
            _ = tick.tick() => {
                if let Err(e) = client.publish(subject::CONTROLLER_BEAT, me.beat()).await {
                    debug!("bus: cannot beat: {e}");
                }
                edges.retain(|name, (_, at)| {
                    let silent = at.elapsed() > EDGE_SILENCE;
                    if silent {
                        warn!(edge = %name, "an edge fell silent: its sessions are forgotten");
                        forget(&admission, sessions.forget_edge(name, None));
                    }
                    !silent
                });
            }
            Some(m) = controller_beats.next() => {
                if let Some(heard) = parse::<wire::ControllerBeat>(&m) {
                    me.heard(heard.instance);
                }
            }
            _ = reconnects.back.notified() => me.renew(),
            _ = async { let _ = stop.wait_for(|stop| *stop).await; } => break,
            else => break,
        }
    }
    drain(sender).await;
    Ok(())
}

/// The sender sends what is queued, then ends (bounded: a cut may wait for its edge).
async fn drain(sender: tokio::task::JoinHandle<()>) {
    let abort = sender.abort_handle();
    if tokio::time::timeout(DRAIN_PATIENCE, sender).await.is_err() {
        warn!("the controller's last messages to the edges did not all leave in time");
        abort.abort();
    }
}

/// An edge's session ended: forgotten here, told to the controller off the async workers.
fn session_closed(
    admission: &Arc<dyn Admission>,
    sessions: &Arc<ClusterSessions>,
    m: &async_nats::Message,
) {
    if let Some(c) = parse::<wire::Closed>(m) {
        sessions.closed(&c.from, &c.client_id, c.session_id);
        let admission = admission.clone();
        tokio::task::spawn_blocking(move || admission.session_closed(&c.client_id, c.session_id));
    }
}

/// This controller's instance on the bus, and the ones it had before.
struct Instances {
    /// The one it beats as now.
    now: u64,
    /// Every one it has been (it takes a new one when its bus comes back).
    mine: Vec<u64>,
    /// Whether another controller's beat was reported already.
    other_told: bool,
}

impl Instances {
    fn new() -> Instances {
        let now = crate::random_u64();
        Instances {
            now,
            mine: vec![now],
            other_told: false,
        }
    }

    /// The beat's body.
    fn beat(&self) -> bytes::Bytes {
        serde_json::to_vec(&wire::ControllerBeat { instance: self.now })
            .unwrap_or_default()
            .into()
    }

    /// What was sent on the lost connection may not have arrived: beating as a new instance
    /// makes every edge end its sessions, to be admitted again.
    fn renew(&mut self) {
        self.now = crate::random_u64();
        self.mine.push(self.now);
        warn!(
            instance = self.now,
            "the controller's bus is back: it beats as a new instance"
        );
    }

    /// A controller's beat was heard: another one than this means two serve, which only
    /// separate redb stores allow.
    fn heard(&mut self, instance: u64) {
        if !self.mine.contains(&instance) && !self.other_told {
            error!(
                other = instance,
                "another controller serves on this bus: every controller must name the same \
                 [store] url (PostgreSQL), so that only one serves at a time"
            );
            self.other_told = true;
        }
    }
}

/// Answers an edge's admission call.
async fn admit(
    client: async_nats::Client,
    admission: Arc<dyn Admission>,
    instance: u64,
    m: async_nats::Message,
) {
    let Some(asked) = parse::<wire::Admit>(&m) else {
        return;
    };
    let decision = admission.admit(asked.info).await;
    let admitted = wire::Admitted {
        controller: instance,
        decision,
    };
    answer(&client, m, &admitted).await;
}

/// An edge opened a session: recorded, then answered with the session's rights.
async fn opened_session(
    client: async_nats::Client,
    admission: Arc<dyn Admission>,
    sessions: Arc<ClusterSessions>,
    m: async_nats::Message,
) {
    let Some(o) = parse::<wire::Opened>(&m) else {
        return;
    };
    // Recorded first: a cut decided while the controller looks the rights up reaches this
    // session.
    sessions.opened(&o.from, &o.client_id, o.session_id);
    let looked_up =
        tokio::task::spawn_blocking(move || admission.session_opened(&o.client_id, o.session_id))
            .await;
    // `null` on the wire: not authorized any more. A look-up that failed gets no answer, which
    // the edge refuses as "server unavailable".
    let Ok(rights) = looked_up else { return };
    answer(&client, m, &rights.ok()).await;
}

/// Tells the controller that the sessions of a gone edge ended.
fn forget(admission: &Arc<dyn Admission>, forgotten: Vec<(String, u64)>) {
    if forgotten.is_empty() {
        return;
    }
    let admission = admission.clone();
    tokio::task::spawn_blocking(move || {
        for (client_id, session_id) in forgotten {
            admission.session_closed(&client_id, session_id);
        }
    });
}

async fn send_outbound(
    client: async_nats::Client,
    mut outbound: mpsc::UnboundedReceiver<Outbound>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            biased;
            out = outbound.recv() => match out {
                Some(out) => send_one(&client, out).await,
                None => break,
            },
            _ = async { let _ = stop.wait_for(|stop| *stop).await; } => {
                // A graceful stop: what is queued (the last answers, events, cuts) still goes.
                while let Ok(out) = outbound.try_recv() {
                    send_one(&client, out).await;
                }
                break;
            }
        }
    }
    if let Err(e) = client.flush().await {
        warn!("bus: the last messages may not have left: {e}");
    }
}

/// Sends one message of the outbound queue; a cut waits for its edge's confirmation.
async fn send_one(client: &async_nats::Client, out: Outbound) {
    let (subject, body, confirm) = match out {
        Outbound::ToEdge { edge, order } => {
            let confirm = matches!(order, ToEdge::Cut { .. });
            (subject::edge(&edge), serde_json::to_vec(&order), confirm)
        }
        Outbound::Event(event) => (
            subject::EVENTS.to_owned(),
            serde_json::to_vec(&event),
            false,
        ),
    };
    let Ok(body) = body else { return };
    if confirm {
        // Nothing after a cut leaves before the edge says the session's rights are gone:
        // an operator's acknowledgement of a reject follows the cut.
        match tokio::time::timeout(CUT_PATIENCE, client.request(subject, body.into())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!("a cut was not confirmed by its edge: {e}"),
            Err(_) => warn!(
                "a cut was not confirmed by its edge within {} ms",
                CUT_PATIENCE.as_millis()
            ),
        }
    } else if let Err(e) = client.publish(subject, body.into()).await {
        warn!("bus: cannot send: {e}");
    }
}

fn parse<T: serde::de::DeserializeOwned>(m: &async_nats::Message) -> Option<T> {
    match serde_json::from_slice(&m.payload) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            warn!(subject = %m.subject, "bus: a message that is not one: {e}");
            None
        }
    }
}

async fn answer<T: serde::Serialize>(
    client: &async_nats::Client,
    m: async_nats::Message,
    body: &T,
) {
    let Some(reply) = m.reply else { return };
    let Ok(body) = serde_json::to_vec(body) else {
        return;
    };
    if let Err(e) = client.publish(reply, body.into()).await {
        debug!("bus: cannot answer: {e}");
    }
}
