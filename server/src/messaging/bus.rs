//! The message bus that joins the servers of a fleet, and the seam between its backends.
//!
//! [`Bus`] is what the rest of the server sees: publish a run of envelopes to a channel, read a
//! channel's position and what a resuming subscriber missed, the [`Hub`] of local subscribers,
//! and [`BusHealth`] (readiness reports it). Behind it sits one [`Backend`], chosen once at start
//! by [`Bus::start`] (in [`crate::messaging`], above the backends): the in-process bus or Redis
//! pub/sub. Another topology (Redis Cluster with sharded pub/sub) is one more module
//! implementing [`Backend`] and one more arm in [`Bus::start`]; nothing else changes. This
//! module knows no backend: they depend on it, never the reverse.
//!
//! Every backend keeps the same promises: a channel's messages reach every subscribing server
//! in one order, each with its offset and epoch ([`crate::messaging::history`]), and a local
//! publish goes through the same order as a remote one (short-cutting it would let local
//! subscribers see a different order than remote ones).
//!
//! Cost: a backend call is one boxed future per publish run (up to
//! [`MAX_PUBLISH_BATCH`](crate::messaging::history::MAX_PUBLISH_BATCH) messages) or per
//! subscribe — the connection boxed those calls before there was a seam — and nothing per
//! message or per recipient.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wsfleet_contract::sync::lock;

use crate::messaging::envelope::Envelope;
use crate::messaging::history::{HistoryConfig, Replay, Since};
use crate::messaging::hub::{Hub, SubscribeError};
use crate::metrics::Metrics;

/// Any error a backend reports, kept whole as the source of a [`BusError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid --redis-url: {0}")]
    InvalidUrl(#[source] BoxError),
    #[error("the Redis {0} is given twice, in --redis-url and as --redis-{0}; give it once")]
    CredentialTwice(&'static str),
    #[error("the message bus is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    #[error("the message bus is unavailable: {0}")]
    NotConfirmed(#[from] SubscribeError),
    #[error("the message bus is unavailable: the server is shutting down")]
    ShuttingDown,
}

/// Whether the bus can deliver right now, and if not, whether the backend refused this server.
#[derive(Debug)]
pub struct BusHealth {
    up: AtomicBool,
    /// The backend's reply code while it refuses this server's credentials.
    refused: Mutex<Option<&'static str>>,
}

impl BusHealth {
    pub fn new(up: bool) -> Self {
        BusHealth { up: AtomicBool::new(up), refused: Mutex::new(None) }
    }
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
    /// Records whether the bus delivers, here and in the `bus_up` gauge.
    pub fn set(&self, up: bool, metrics: &Metrics) {
        self.up.store(up, Ordering::Release);
        metrics.bus_up.set(up as i64);
        if up {
            self.set_refused(None);
        }
    }
    /// While the backend refuses this server's credentials: its reply code (`NOAUTH`, ...).
    pub fn refused(&self) -> Option<&'static str> {
        *lock(&self.refused)
    }
    pub fn set_refused(&self, code: Option<&'static str>) {
        *lock(&self.refused) = code;
    }
}

/// One way of joining the servers of a fleet. Implementations order, record and deliver with the
/// semantics of [`crate::messaging::history`].
pub trait Backend: Send + Sync {
    /// Publishes `envelopes` (1 to [`MAX_PUBLISH_BATCH`](crate::messaging::history::MAX_PUBLISH_BATCH)),
    /// all or none, to every subscriber of `channel` in the fleet, in the channel's order.
    /// `hub` is this server's: a backend that delivers locally hands the messages to it.
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
        envelopes: Vec<Envelope>,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// The channel's position now, and the messages missed since `since`.
    fn read<'a>(&'a self, channel: &'a str, since: Option<&'a Since>) -> BoxFuture<'a, Result<Replay, BusError>>;

    /// Where this server heartbeats its connection count ([`crate::messaging::presence`]);
    /// `None` when there is no fleet to report to (the in-process bus).
    fn presence(&self) -> Option<Arc<dyn PresenceStore>>;

    /// A word for logs: `in-process`, `redis`.
    fn name(&self) -> &'static str;
}

/// What every backend is started with, besides its own address.
pub struct Start<'a> {
    pub history: HistoryConfig,
    /// Most messages the hub holds for one resuming subscriber.
    pub hold_limit: usize,
    pub metrics: Arc<Metrics>,
    /// Where the backend's tasks run...
    pub tracker: &'a TaskTracker,
    /// ...until this fires.
    pub shutdown: CancellationToken,
}

/// Where a backend keeps presence entries.
pub trait PresenceStore: Send + Sync {
    /// Sets this server's entry to `connections`, to expire after `ttl` unless refreshed.
    fn refresh<'a>(&'a self, pod: &'a str, connections: u64, ttl: Duration) -> BoxFuture<'a, Result<(), BusError>>;
    /// Removes this server's entry.
    fn remove<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), BusError>>;
}

/// The bus as the server uses it: one backend, the hub of local subscribers, the bus's health.
pub struct Bus {
    backend: Box<dyn Backend>,
    hub: Arc<Hub>,
    pub health: Arc<BusHealth>,
}

impl Bus {
    /// Puts a started backend together with its hub and health.
    pub fn new(backend: Box<dyn Backend>, hub: Arc<Hub>, health: Arc<BusHealth>) -> Bus {
        Bus { backend, hub, health }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// See [`Backend::publish`].
    pub fn publish<'a>(&'a self, channel: &'a str, envelopes: Vec<Envelope>) -> BoxFuture<'a, Result<(), BusError>> {
        self.backend.publish(&self.hub, channel, envelopes)
    }

    /// See [`Backend::read`].
    pub fn read<'a>(&'a self, channel: &'a str, since: Option<&'a Since>) -> BoxFuture<'a, Result<Replay, BusError>> {
        self.backend.read(channel, since)
    }

    /// See [`Backend::presence`].
    pub fn presence(&self) -> Option<Arc<dyn PresenceStore>> {
        self.backend.presence()
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
}
