//! fleetgate's operator web console (issue 12): the station Manager and the phone admin portal
//! of the two manuals, in a browser. It is an operator client of fleetd like `fleetctl`: every
//! action is an operator command (PROTOCOL §6) sent as the operator whose certificate
//! `fleetctl console` was started with, audited by fleetd under that name and limited to its
//! tenant. The console keeps nothing of its own but its login sessions, and caches of what
//! fleetd told it: security alerts, reachability and the last download progress per station.
//!
//! The pages talk to fleetd only through the [`Fleetd`] trait; [`Console::router`] is the whole
//! web layer, and [`serve`] runs it on a listener with the operator's event stream.

pub mod fleetd;
pub mod guard;
pub mod memory;
pub mod session;

mod cli;
mod hub;
mod live;
mod pages;
mod progress;
mod views;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use fleet_protocol::{OperatorCommand, PageLimit, StationState};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;

pub use cli::{link_line, run, start, ConsoleArgs, ConsoleError, Started};
pub use fleetd::{ChainVerdict, Fleetd, FleetdError, Listing, Reply};

use crate::guard::Origins;
use crate::hub::Hub;
use crate::session::{RandomError, Sessions};

/// How often fleetd's reachability is probed while a page follows live updates: the probe is
/// a read, audited like every command, so only then.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// How many of the newest audit records are searched at start for identity mismatches.
const RECALLED_RECORDS: u64 = 500;

/// One console: its fleetd connection, its sessions and its event hub.
pub struct Console {
    fleetd: Arc<dyn Fleetd>,
    tenant: String,
    sessions: Sessions,
    origins: Origins,
    /// The session cookie's name: one per port, so that two consoles on one host do not log
    /// each other out.
    cookie_name: String,
    base: String,
    hub: Hub,
}

impl Console {
    /// A console for the operator `fleetd` of `tenant`, answering at `addr`.
    pub fn new(fleetd: Arc<dyn Fleetd>, tenant: &str, addr: SocketAddr) -> Arc<Console> {
        let shown = if addr.ip().is_unspecified() {
            SocketAddr::new([127, 0, 0, 1].into(), addr.port())
        } else {
            addr
        };
        Arc::new(Console {
            fleetd,
            tenant: tenant.to_owned(),
            sessions: Sessions::default(),
            origins: Origins::of(addr),
            cookie_name: format!("fleet_console_{}", addr.port()),
            base: format!("http://{shown}"),
            hub: Hub::default(),
        })
    }

    /// A new single-use login link: `http://127.0.0.1:PORT/login?token=…`.
    pub fn login_link(&self) -> Result<String, RandomError> {
        let token = self.sessions.issue_token(Instant::now())?;
        Ok(format!("{}/login?token={token}", self.base))
    }

    /// The console's address, `http://127.0.0.1:PORT`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The name of the session cookie.
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }

    /// Every page and action, behind the guard.
    pub fn router(self: &Arc<Self>) -> Router {
        pages::routes()
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(self),
                guard::guard,
            ))
            .with_state(Arc::clone(self))
    }

    /// Takes one message of the operator's event subscription (topic, JSON payload).
    pub fn handle_event(&self, topic: &str, event: Value) {
        self.hub.handle(topic, event, self.fleetd.operator());
    }

    async fn run_command(&self, command: OperatorCommand) -> Result<Value, FleetdError> {
        let result = self.fleetd.run(command).await;
        self.hub.observe(&result);
        result
    }

    async fn list_all(&self, listing: Listing) -> Result<Vec<Value>, FleetdError> {
        let result = self.fleetd.list_all(listing).await;
        self.hub.observe(&result);
        result
    }

    /// Raises the alerts of the identity mismatches among the newest audit records, and keeps
    /// those whose station is still authorized with the key the refused one did not present.
    async fn recall_alerts(&self) {
        let command = OperatorCommand::ListAuditLog {
            limit: Some(PageLimit::saturating(RECALLED_RECORDS)),
            after_seq: None,
        };
        let Ok(data) = self.run_command(command).await else {
            return;
        };
        self.hub.recall(&views::items(&data, "records"));
        if let Ok(stations) = self.list_all(Listing::Stations { state: None }).await {
            self.hub.prune(&stations, true);
        }
    }

    /// How many stations wait for an operator; `None` when fleetd cannot say.
    async fn pending(&self) -> Option<usize> {
        let state = Some(StationState::Unauthorized);
        self.list_all(Listing::Stations { state })
            .await
            .ok()
            .map(|s| s.len())
    }
}

/// Runs `console` on `listener` until `shutdown` completes (then at once, open pages or not), hearing the operator's `events`
/// (as `OperatorClient::subscribe_events` delivers them).
pub async fn serve(
    listener: TcpListener,
    console: Arc<Console>,
    mut events: UnboundedReceiver<(String, Value)>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let hearing = Arc::clone(&console);
    let pump = tokio::spawn(async move {
        while let Some((topic, event)) = events.recv().await {
            hearing.handle_event(&topic, event);
        }
    });
    // Before the first page, so that it shows the alerts of before.
    console.recall_alerts().await;
    let probing = Arc::clone(&console);
    let probe = tokio::spawn(async move {
        let mut every = tokio::time::interval(PROBE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if probing.hub.watched() {
                let _ = probing.run_command(OperatorCommand::ListWhitelist).await;
            }
        }
    });
    // Not a graceful shutdown: open live streams never end by themselves.
    let served = tokio::select! {
        served = axum::serve(listener, console.router()) => served,
        () = shutdown => Ok(()),
    };
    pump.abort();
    probe.abort();
    served
}
