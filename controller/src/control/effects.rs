//! What the controller says and does, held back until the change behind it is durable: ONE
//! outbox for batches and admissions alike. A decision fills an [`Outbox`]; once its commit
//! returned, [`Controller::carry_out`] publishes the commit's audit records and then every
//! output in order (publications, mailbox messages, operator responses, cuts, rights
//! re-checks). A commit that failed tells nothing ([`Controller::abandon`]).

use std::net::IpAddr;

use serde_json::{json, Value};
use time::OffsetDateTime;
use tracing::{debug, warn};

use super::durable::{Queued, Written};
use super::{rfc3339, Controller, Requester};
use crate::audit::AuditRecord;
use crate::identity::{self, StationRights};
use crate::station::{self, Admit, Presented};
use fleet_protocol::envelope::{response_json, ResponseEntry};
use fleet_protocol::{CommandError, EventKind, Serial, Topic};

/// A message for the bus task to publish, in order.
#[derive(Debug, Clone)]
pub struct Publication {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// What the controller publishes, in order, for the one task that hands it to the bus
/// (`fleet::run_bus`). A queue that wakes that task once a tick in a connect storm, not once an
/// admission's audit event ([`fleet_broker::handover`]): an event waits a tick (1 ms) at most.
/// Once the controller is gone nothing more comes.
pub struct Published {
    pub(super) queue: std::sync::Arc<fleet_broker::handover::Handover<Publication>>,
    /// Taken from the queue, not yet handed out by `try_recv`.
    pub(super) ready: std::collections::VecDeque<Publication>,
}

impl Published {
    /// Waits for what is published next, and takes all of it, in order (cancel-safe).
    pub async fn recv_all(&mut self) -> Vec<Publication> {
        if !self.ready.is_empty() {
            return self.ready.drain(..).collect();
        }
        self.queue.take().await
    }

    /// The next publication if there is one now.
    pub fn try_recv(&mut self) -> Option<Publication> {
        if self.ready.is_empty() {
            self.ready.extend(self.queue.try_take());
        }
        self.ready.pop_front()
    }

    /// Ends the queue (the controller publishes nothing more) and returns what it still held.
    pub fn close(&mut self) -> Vec<Publication> {
        let mut rest: Vec<Publication> = self.ready.drain(..).collect();
        rest.extend(self.queue.close());
        rest
    }
}

/// Something the controller says or does once its change is durable.
pub(super) enum Output {
    /// A message to the router.
    Publish(Publication),
    /// A message to one device's mailbox (`fleet_broker::mailbox`): straight to its session.
    Mailbox {
        client_id: String,
        publication: Publication,
    },
    /// An operator's response; if the commit fails, every command of it is answered with the
    /// store's error instead.
    Respond {
        to: Requester,
        /// (`command`, `correlationData`) of every entry.
        commands: Vec<(Value, Value)>,
        responses: Vec<Value>,
    },
    /// End a session (after a message to `after`, if any).
    Cut {
        client_id: String,
        after: Option<String>,
    },
    /// Re-check the rights of the station's live session `session_id`, which presented
    /// `presented`: they grow in place, or it is cut.
    Recheck {
        serial: Serial,
        session_id: u64,
        presented: Presented,
    },
    /// End an address's block for failed authentications.
    LiftBlock(IpAddr),
    /// A chunk of a firmware image for a station's mailbox, read from its file after the
    /// batch, on a blocking thread, off the controller's lock.
    FirmwareChunk {
        serial: Serial,
        read: super::stations::ChunkRead,
    },
    /// The judgement of a phone's PAP attempt, for the admission waiting for it.
    Judged {
        reply: tokio::sync::oneshot::Sender<super::admission::Judgement>,
        judgement: Box<super::admission::Judgement>,
    },
    /// A mailbox message to one session only.
    DeliverTo {
        client_id: String,
        session_id: u64,
        topic: String,
        payload: Vec<u8>,
    },
}

/// What a decision says and does, in order, once it is durable.
#[derive(Default)]
pub(super) struct Outbox(Vec<Output>);

impl Outbox {
    pub(super) fn push(&mut self, output: Output) {
        self.0.push(output);
    }

    /// A message on `topic`: to its device's mailbox if it is one (`Topic::mailbox_owner`),
    /// else to the router.
    pub(super) fn publish(&mut self, topic: &Topic, payload: &Value) {
        let publication = Publication {
            topic: topic.to_string(),
            payload: payload.to_string().into_bytes(),
        };
        self.push(match topic.mailbox_owner() {
            Some(client_id) => Output::Mailbox {
                client_id,
                publication,
            },
            None => Output::Publish(publication),
        });
    }

    /// An event on `fleet/events/<tenant>/<kind>`: `body` with its `type` and `time`.
    pub(super) fn event(&mut self, tenant: &str, kind: EventKind, body: Value, at: OffsetDateTime) {
        let mut body = body;
        if let Some(obj) = body.as_object_mut() {
            obj.insert("type".into(), json!(kind.as_str()));
            obj.insert("time".into(), json!(rfc3339(at)));
        }
        self.publish(&Topic::Event(tenant.to_owned(), kind), &body);
    }

    /// End `client_id`'s session, after its message on `after` if any.
    pub(super) fn cut(&mut self, client_id: String, after: Option<&Topic>) {
        self.push(Output::Cut {
            client_id,
            after: after.map(Topic::to_string),
        });
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

/// A commit queued for the writer thread, and what to carry out once it is durable.
pub(super) struct Pending {
    pub(super) committed: Queued,
    pub(super) out: Outbox,
}

impl Controller {
    /// Carries out what a durable change says and does: its audit records first (on
    /// `fleet/events/<tenant>/audit`), then `out` in order. `written`: the station records the
    /// change wrote (a batch's), for rights re-checks.
    pub(super) fn carry_out(&self, records: &[AuditRecord], out: Outbox, written: &Written) {
        let mut audit = Outbox::default();
        for r in records {
            if let Ok(v) = serde_json::to_value(r) {
                audit.publish(&Topic::Event(r.tenant.clone(), EventKind::Audit), &v);
            }
        }
        for output in audit.0.into_iter().chain(out.0) {
            self.perform(output, written);
        }
    }

    /// Tells at once what rests on nothing stored (a station went offline).
    pub(super) fn tell(&self, out: Outbox) {
        self.carry_out(&[], out, &Written::new());
    }

    /// Waits until a queued commit is durable, then carries out what it says; false, and
    /// nothing told, if it was not stored.
    pub(super) async fn settle(&self, pending: Pending) -> bool {
        match pending.committed.await {
            Ok(records) => {
                self.carry_out(&records, pending.out, &Written::new());
                true
            }
            Err(e) => {
                warn!("audit record not stored: {e}");
                false
            }
        }
    }

    /// A batch whose commit failed: nothing of it is told. Its cuts still run (a cut only takes
    /// rights away), and every command of every operator request is answered `error`.
    pub(super) fn abandon(&self, out: Outbox, error: &CommandError) {
        for output in out.0 {
            match output {
                Output::Cut { client_id, after } => {
                    self.sessions.cut(&client_id, after);
                }
                Output::Respond { to, commands, .. } => {
                    let responses = commands
                        .into_iter()
                        .map(|(command, correlation)| {
                            let outcome = Err(error.clone());
                            ResponseEntry {
                                command,
                                correlation,
                                outcome,
                            }
                            .to_json()
                        })
                        .collect();
                    self.respond(&to, responses);
                }
                Output::Judged { reply, .. } => {
                    let reason = format!("the PAP attempt was not stored: {}", error.message);
                    let _ = reply.send(super::admission::Judgement::Unavailable(reason));
                }
                _ => {}
            }
        }
    }

    /// Reads a firmware chunk on a blocking thread and delivers it to the station's session.
    /// A station asks for one chunk at a time and each chunk says its offset, so chunks need no
    /// order with the station's other messages; one that comes after a cut is not written.
    fn send_chunk(&self, serial: Serial, read: super::stations::ChunkRead) {
        let sessions = std::sync::Arc::clone(&self.sessions);
        let send = move || {
            let topic = Topic::StationFirmwareChunk(serial);
            let payload = read.answer().to_json().to_string().into_bytes();
            if let Some(client_id) = topic.mailbox_owner() {
                sessions.deliver(&client_id, topic.to_string(), payload);
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(send)),
            Err(_) => send(),
        }
    }

    fn perform(&self, output: Output, written: &Written) {
        match output {
            Output::Publish(p) => {
                // Refused only once the bus task has ended (a shutdown): nobody to tell.
                let _ = self.out.push(p);
            }
            Output::Mailbox {
                client_id,
                publication,
            } => {
                self.sessions
                    .deliver(&client_id, publication.topic, publication.payload);
            }
            Output::Respond { to, responses, .. } => self.respond(&to, responses),
            Output::FirmwareChunk { serial, read } => self.send_chunk(serial, read),
            Output::Cut { client_id, after } => {
                self.sessions.cut(&client_id, after);
            }
            Output::LiftBlock(ip) => {
                let now = self.now();
                self.failures
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .lift(ip, now);
            }
            Output::DeliverTo {
                client_id,
                session_id,
                topic,
                payload,
            } => {
                self.sessions
                    .deliver_to(&client_id, session_id, topic, payload);
            }
            Output::Recheck {
                serial,
                session_id,
                presented,
            } => self.recheck(&serial, session_id, &presented, written),
            Output::Judged { reply, judgement } => {
                // An admission that gave up waiting has nobody to tell.
                let _ = reply.send(*judgement);
            }
        }
    }

    /// Rights only grow in place (an accepted station gains them at once); any other change
    /// cuts the session, so that no subscription made under the old rights outlives them.
    fn recheck(&self, serial: &Serial, session_id: u64, presented: &Presented, written: &Written) {
        let client_id = serial.client_id();
        // The batch's own record is the committed one; no need to read it back.
        let decision = match written.get(serial) {
            Some(record) => Ok(station::admit(record.as_ref(), presented)),
            None => self.station_decision(serial, presented),
        };
        match decision {
            Ok(Admit::Authorized) => {
                let rights = identity::station_rights(serial, StationRights::Authorized);
                // Only the session whose key was checked; one that took the client id over
                // since is re-checked by its own admission.
                self.sessions.set_rights_of(&client_id, session_id, rights);
            }
            _ => {
                self.sessions.cut(&client_id, None);
            }
        }
    }

    /// Answers the session that sent the request, and no other: responses bypass the router,
    /// where another operator of the same name (in another tenant) could subscribe.
    fn respond(&self, to: &Requester, responses: Vec<Value>) {
        let payload = response_json(responses).to_string().into_bytes();
        let topic = Topic::OperatorResponse(to.operator.name.clone()).to_string();
        if !self
            .sessions
            .deliver_to(&to.client_id, to.session_id, topic, payload)
        {
            debug!(client_id = %to.client_id, "response not delivered: the session is gone or was ended");
        }
    }
}
