//! The console's one way to the fleet: the [`Fleetd`] trait, an operator client's commands
//! (PROTOCOL §6). `fleetctl console` implements it over fleetctl's own MQTT client; the unit
//! tests over [`crate::memory::MemoryFleetd`]. A hosted, multi-user console can implement it
//! per user and reuse every page.

use std::future::Future;
use std::pin::Pin;

use fleet_protocol::OperatorCommand;
use serde_json::Value;

/// What a [`Fleetd`] call comes to, boxed so that the trait can be used as `dyn Fleetd`.
pub type Reply<'a, T> = Pin<Box<dyn Future<Output = Result<T, FleetdError>> + Send + 'a>>;

/// The list commands the console reads whole, page after page: fleet-protocol's.
pub use fleet_protocol::Listing;

/// The outcome of checking the tenant's audit hash chain (`fleetctl audit verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainVerdict {
    /// Records checked.
    pub records: u64,
    /// Records from before the log was chained, not covered.
    pub unchained: u64,
    /// Where the chain is broken, and how: `(seq, problem)`.
    pub broken: Option<(u64, String)>,
}

/// What went wrong with a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetdError {
    /// fleetd answered the command with an error (`not_found`, `wrong_state`, …): nothing was
    /// changed.
    #[error("{code}: {error}")]
    Refused {
        /// The machine code of PROTOCOL §6.
        code: String,
        /// fleetd's text.
        error: String,
    },
    /// fleetd could not be reached, or did not answer in time.
    #[error("fleetd is not reachable: {0}")]
    Unreachable(String),
    /// An answer the console cannot read.
    #[error("malformed answer from fleetd: {0}")]
    Malformed(String),
}

impl FleetdError {
    /// The machine code when fleetd refused the command.
    pub fn code(&self) -> Option<&str> {
        match self {
            FleetdError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// An operator's connection to fleetd. Every method is an operator command (or a series of
/// them, for paging), run as that operator, audited by fleetd and limited to its tenant.
pub trait Fleetd: Send + Sync + 'static {
    /// The operator's name (the CN of its certificate).
    fn operator(&self) -> &str;
    /// Runs one command and returns its `data`.
    fn run(&self, command: OperatorCommand) -> Reply<'_, Value>;
    /// Every item of a listing, following `next` page after page.
    fn list_all(&self, listing: Listing) -> Reply<'_, Vec<Value>>;
    /// Pages through the tenant's whole audit log and checks its hash chain.
    fn verify_audit(&self) -> Reply<'_, ChainVerdict>;
}
