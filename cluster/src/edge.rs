//! An edge's side of the bus: its front door's [`Admission`] asks the controller over NATS,
//! and [`EdgeLink::run`] carries out what the controller says to the sessions this edge holds
//! and publishes the controller's events into this edge's router.
//!
//! What an edge trusts: only an answer of a controller. No answer in time refuses the CONNECT
//! ("server unavailable"), ends the session of an opened CONNECT, leaves a device's message
//! unacknowledged. When the edge may have missed something the controller said (its NATS
//! connection dropped and came back, or another controller serves now, whose map of sessions
//! is empty), it ends every session it holds: each device connects again and is admitted
//! afresh with its state as it is now. That is the re-check, at the price of a reconnect.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fleet_broker::{
    Admission, BoxFuture, Bus, ConnectInfo, Decision, Reason, Refusal, Registry, Rights,
    SessionControl,
};
use futures_util::StreamExt;
use tokio::sync::{watch, Notify};
use tracing::{debug, info, warn};

use crate::wire::{self, EdgeId, ToEdge};
pub use crate::Connection;
use crate::{subject, BEAT, CONTROLLER_SILENCE};

/// An edge's link to the controller.
pub struct EdgeLink {
    client: async_nats::Client,
    id: EdgeId,
    timeout: Duration,
    /// The controller whose beat was heard last, and when.
    controller: Mutex<Option<(u64, Instant)>>,
    /// Publishes [`EdgeLink::tell`] has spawned and not finished, for [`EdgeLink::flush`].
    telling: Arc<(std::sync::atomic::AtomicUsize, Notify)>,
    /// While [`EdgeLink::run`] carries out the controller's orders: without it nothing could
    /// cut a session, so nobody is admitted.
    running: AtomicBool,
}

impl EdgeLink {
    /// The link of edge `node` on `client`; `timeout` bounds every request to the controller.
    pub fn new(client: async_nats::Client, node: &str, timeout: Duration) -> Arc<EdgeLink> {
        Arc::new(EdgeLink {
            client,
            id: EdgeId {
                edge: node.to_owned(),
                incarnation: crate::random_u64(),
            },
            timeout,
            controller: Mutex::new(None),
            telling: Arc::default(),
            running: AtomicBool::new(false),
        })
    }

    /// This edge and its incarnation (random per start).
    pub fn id(&self) -> &EdgeId {
        &self.id
    }

    /// Whether [`EdgeLink::run`] carries out the controller's orders (admissions wait for it).
    pub fn running(&self) -> bool {
        self.running.load(Ordering::SeqCst)
    }

    /// Whether a controller's beat was heard within [`CONTROLLER_SILENCE`].
    pub fn controller_heard(&self) -> bool {
        let heard = *self.controller.lock().unwrap_or_else(|e| e.into_inner());
        heard.is_some_and(|(_, at)| at.elapsed() < CONTROLLER_SILENCE)
    }

    async fn ask(&self, subject: &'static str, body: Vec<u8>) -> Result<bytes::Bytes, String> {
        match tokio::time::timeout(self.timeout, self.client.request(subject, body.into())).await {
            Ok(Ok(reply)) => Ok(reply.payload),
            Ok(Err(e)) => Err(format!("no controller answered: {e}")),
            Err(_) => Err(format!(
                "no controller answered within {} ms",
                self.timeout.as_millis()
            )),
        }
    }

    fn tell(&self, subject: &'static str, body: Vec<u8>) {
        let client = self.client.clone();
        let telling = self.telling.clone();
        let send = async move {
            if let Err(e) = client.publish(subject, body.into()).await {
                warn!("bus: cannot publish on {subject}: {e}");
            }
            if telling.0.fetch_sub(1, Ordering::SeqCst) == 1 {
                telling.1.notify_waiters();
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                self.telling.0.fetch_add(1, Ordering::SeqCst);
                handle.spawn(send);
            }
            Err(_) => warn!("bus: no runtime to publish on {subject}"),
        }
    }

    /// Waits (at most `patience`) until what this edge told the controller (sessions closed,
    /// CONNECTs refused) has left for the NATS server: a graceful stop calls it after its
    /// sessions ended, so that the controller hears of every one of them.
    pub async fn flush(&self, patience: Duration) {
        let drained = async {
            loop {
                let notified = self.telling.1.notified();
                if self.telling.0.load(Ordering::SeqCst) == 0 {
                    break;
                }
                notified.await;
            }
            let _ = self.client.flush().await;
        };
        if tokio::time::timeout(patience, drained).await.is_err() {
            warn!("bus: some sessions' ends may not have reached the controller");
        }
    }

    /// Carries out what the controller says to this edge's sessions, publishes its events into
    /// the router through `bus`, says every [`BEAT`] that this edge is there, and ends every
    /// session when the edge may have missed something (see the module's documentation).
    /// Returns when `stop` turns true or the bus is closed for good.
    pub async fn run<B: Bus>(
        self: Arc<Self>,
        registry: Arc<Registry>,
        bus: B,
        connection: Arc<Connection>,
        stop: watch::Receiver<bool>,
    ) {
        self.running.store(true, Ordering::SeqCst);
        let stopping = stop.clone();
        self.carry_out(&registry, bus, connection, stop).await;
        self.running.store(false, Ordering::SeqCst);
        if !*stopping.borrow() {
            // Nothing carries out a cut any more: no session may stay.
            warn!("the edge's link to the controller ended: every session is ended");
            end_every_session(&registry);
        }
    }

    /// [`EdgeLink::run`]'s loop.
    async fn carry_out<B: Bus>(
        &self,
        registry: &Arc<Registry>,
        mut bus: B,
        connection: Arc<Connection>,
        mut stop: watch::Receiver<bool>,
    ) {
        let client = &self.client;
        let subscribed = async {
            Ok::<_, async_nats::SubscribeError>((
                client.subscribe(subject::edge(&self.id.edge)).await?,
                client.subscribe(subject::EVENTS).await?,
                client.subscribe(subject::CONTROLLER_BEAT).await?,
            ))
        };
        let (mut orders, mut events, mut beats) = match subscribed.await {
            Ok(subscriptions) => subscriptions,
            Err(e) => {
                warn!("bus: cannot subscribe: {e}");
                return;
            }
        };
        let beat_body = serde_json::to_vec(&self.id).unwrap_or_default();
        let mut tick = tokio::time::interval(BEAT);
        let mut silent_told = false;
        // A new edge has heard no beat yet: it says so only once a controller had the time.
        let started = Instant::now();
        loop {
            tokio::select! {
                Some(order) = orders.next() => self.obey(registry, order).await,
                Some(event) = events.next() => {
                    match serde_json::from_slice::<wire::Event>(&event.payload) {
                        Ok(event) => {
                            if bus.publish(&event.topic, event.payload, false).is_err() {
                                warn!("the router is closed: the edge's link ends");
                                return;
                            }
                        }
                        Err(e) => warn!("bus: an event that is not one: {e}"),
                    }
                }
                Some(beat) = beats.next() => {
                    let Ok(beat) = serde_json::from_slice::<wire::ControllerBeat>(&beat.payload)
                    else {
                        continue;
                    };
                    let before = self
                        .controller
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .replace((beat.instance, Instant::now()));
                    if silent_told {
                        info!("a controller is heard again");
                        silent_told = false;
                    }
                    if before.is_some_and(|(instance, _)| instance != beat.instance) {
                        warn!(
                            "another controller serves now (or the same one came back to the \
                             bus): every session of this edge is ended, to be admitted again"
                        );
                        end_every_session(registry);
                    }
                }
                _ = connection.back.notified() => {
                    warn!(
                        "the bus was lost and is back: every session of this edge is ended, \
                         to be admitted again (cuts may have been missed meanwhile)"
                    );
                    end_every_session(registry);
                }
                _ = connection.missed.notified() => {
                    warn!(
                        "orders to this edge may have been dropped: every session of this edge \
                         is ended, to be admitted again"
                    );
                    end_every_session(registry);
                }
                _ = tick.tick() => {
                    if let Err(e) = client.publish(subject::EDGE_BEAT, beat_body.clone().into()).await {
                        debug!("bus: cannot beat: {e}");
                    }
                    let waited = started.elapsed() >= CONTROLLER_SILENCE;
                    if waited && !self.controller_heard() && !silent_told {
                        // Without a controller no cut would reach this edge: it holds no
                        // session it could not cut.
                        warn!(
                            "no controller heard for {} s: every session is ended and new \
                             devices are refused (server unavailable) until one answers",
                            CONTROLLER_SILENCE.as_secs()
                        );
                        end_every_session(registry);
                        silent_told = true;
                    }
                }
                _ = async { let _ = stop.wait_for(|stop| *stop).await; } => return,
                else => return,
            }
        }
    }

    async fn obey(&self, registry: &Registry, order: async_nats::Message) {
        let parsed = match serde_json::from_slice::<ToEdge>(&order.payload) {
            Ok(parsed) => parsed,
            Err(e) => {
                warn!("bus: an order that is not one: {e}");
                return;
            }
        };
        let done = match parsed {
            ToEdge::Rights {
                client_id,
                session_id: Some(session_id),
                rights,
            } => registry.set_rights_of(&client_id, session_id, rights),
            ToEdge::Rights {
                client_id,
                session_id: None,
                rights,
            } => registry.set_rights(&client_id, rights),
            ToEdge::Cut {
                client_id,
                last_topic,
            } => registry.cut(&client_id, last_topic),
            ToEdge::Deliver {
                client_id,
                session_id: Some(session_id),
                topic,
                payload,
            } => registry.deliver_to(&client_id, session_id, topic, payload),
            ToEdge::Deliver {
                client_id,
                session_id: None,
                topic,
                payload,
            } => registry.deliver(&client_id, topic, payload),
            ToEdge::TakenOver {
                client_id,
                session_id,
            } => registry.cut_session(&client_id, session_id),
        };
        if let Some(reply) = order.reply {
            let answer = if done { "true" } else { "false" };
            if let Err(e) = self.client.publish(reply, answer.into()).await {
                debug!("bus: cannot answer the controller: {e}");
            }
        }
    }
}

fn end_every_session(registry: &Registry) {
    for (client_id, session_id) in registry.live_sessions() {
        registry.cut_session(&client_id, session_id);
    }
}

fn unavailable(why: String) -> Decision {
    warn!("admission refused: {why}");
    Decision::Deny {
        refusal: Refusal::ServerUnavailable,
        reason: Reason::new(why, "server unavailable"),
    }
}

impl Admission for EdgeLink {
    fn admit(&self, info: ConnectInfo) -> BoxFuture<'_, Decision> {
        Box::pin(async move {
            if !self.running.load(Ordering::SeqCst) {
                return unavailable("the edge's link to the controller is not running".into());
            }
            if !self.controller_heard() {
                return unavailable(format!(
                    "no controller heard for {} s",
                    CONTROLLER_SILENCE.as_secs()
                ));
            }
            let body = match serde_json::to_vec(&wire::Admit {
                from: self.id.clone(),
                info,
            }) {
                Ok(body) => body,
                Err(e) => return unavailable(format!("the CONNECT cannot be sent: {e}")),
            };
            match self.ask(subject::ADMIT, body).await {
                Ok(reply) => match serde_json::from_slice::<wire::Admitted>(&reply) {
                    Ok(admitted) => admitted.decision,
                    Err(e) => unavailable(format!("the controller's answer is not one: {e}")),
                },
                Err(why) => unavailable(why),
            }
        })
    }

    fn session_opened(&self, client_id: &str, session_id: u64) -> Result<Rights, Refusal> {
        let body = serde_json::to_vec(&wire::Opened {
            from: self.id.clone(),
            client_id: client_id.to_owned(),
            session_id,
        })
        .map_err(|_| Refusal::ServerUnavailable)?;
        // On tokio's blocking pool (the front door's contract): waiting here holds no worker.
        let handle =
            tokio::runtime::Handle::try_current().map_err(|_| Refusal::ServerUnavailable)?;
        match handle.block_on(self.ask(subject::OPENED, body)) {
            // `null`: the controller took the device's rights away meanwhile.
            Ok(reply) => match serde_json::from_slice::<Option<Rights>>(&reply) {
                Ok(rights) => rights.ok_or(Refusal::NotAuthorized),
                Err(e) => {
                    warn!("the controller's rights are not rights: {e}");
                    Err(Refusal::ServerUnavailable)
                }
            },
            // No answer: as for an admission, the door stays shut as "server unavailable".
            Err(why) => {
                warn!(client_id, "an admitted session is ended: {why}");
                Err(Refusal::ServerUnavailable)
            }
        }
    }

    fn refused(&self, client_id: &str, peer_addr: SocketAddr, reason: &str) {
        if let Ok(body) = serde_json::to_vec(&wire::Refused {
            client_id: client_id.to_owned(),
            peer_addr,
            reason: reason.to_owned(),
        }) {
            self.tell(subject::REFUSED, body);
        }
    }

    fn session_closed(&self, client_id: &str, session_id: u64) {
        if let Ok(body) = serde_json::to_vec(&wire::Closed {
            from: self.id.clone(),
            client_id: client_id.to_owned(),
            session_id,
        }) {
            self.tell(subject::CLOSED, body);
        }
    }

    fn message(
        &self,
        client_id: &str,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    ) -> BoxFuture<'_, bool> {
        let body = serde_json::to_vec(&wire::Message {
            from: self.id.clone(),
            client_id: client_id.to_owned(),
            session_id,
            topic,
            payload,
        });
        Box::pin(async move {
            let Ok(body) = body else { return false };
            match self.ask(subject::MESSAGE, body).await {
                Ok(reply) => reply.as_ref() == b"true",
                Err(why) => {
                    warn!("a device's message is not acknowledged: {why}");
                    false
                }
            }
        })
    }
}
