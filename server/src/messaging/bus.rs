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

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wsfleet_contract::sync::lock;

use crate::messaging::history::{HistoryConfig, Outgoing, Published, Replay, Since};
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
    /// The publish was sent but its answer never came (a timeout, a connection lost after
    /// sending): it may have been published or not. A retry with the same ids is safe.
    #[error("the publish's outcome is unknown: {0}")]
    OutcomeUnknown(#[source] BoxError),
}

/// Whether the bus can deliver right now, and when it cannot, whose problem that is.
///
/// Readiness ([`crate::http`]) takes a server out of its Service only for what is wrong with
/// that server. A bus that is down for the whole fleet (the shared Redis stopped, paused or
/// restarting) is not: marking every server unready at once would empty the Service and turn a
/// blip into an outage. So a backend says which it is when it loses the bus ([`Outage`]), from
/// evidence it can get without its own link: whether Redis answers a fresh connection.
#[derive(Debug)]
pub struct BusHealth {
    state: AtomicU8,
    /// The backend's reply code while it refuses this server's credentials.
    refused: Mutex<Option<&'static str>>,
    /// Messages the backend received and has not handed to the hub yet.
    pub lag: BusLag,
}

/// How far behind the bus is on this server: what waits between the backend's connection and the
/// hub. The backend updates it as messages come and go; readiness and `/metrics` read it.
#[derive(Debug, Default)]
pub struct BusLag {
    messages: AtomicU64,
    bytes: AtomicU64,
    /// Wall-clock microseconds at which the oldest waiting message was received; 0: none waits.
    oldest_micros: AtomicU64,
    /// Set when the backend fell so far behind that it dropped its subscriptions to catch up
    /// from history; cleared once it is delivering live again.
    resyncing: AtomicBool,
}

/// A snapshot of [`BusLag`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lag {
    pub messages: u64,
    pub bytes: u64,
    /// How long the oldest waiting message has waited.
    pub oldest: Duration,
    pub resyncing: bool,
}

impl Lag {
    /// Past this, a bus that delivers at all is called behind ([`Lag::is_behind`]).
    pub const BEHIND: Duration = Duration::from_secs(1);

    /// Whether readiness should say the bus lags: the oldest waiting message waited past
    /// [`Lag::BEHIND`], or the backend is catching up from history.
    pub fn is_behind(&self) -> bool {
        self.resyncing || self.oldest >= Lag::BEHIND
    }
}

impl BusLag {
    /// Records what waits now: `messages` of `bytes` in all, the oldest received at
    /// `oldest_micros` (wall clock; 0 when none waits).
    pub fn set(&self, messages: u64, bytes: u64, oldest_micros: u64) {
        self.messages.store(messages, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
        self.oldest_micros.store(oldest_micros, Ordering::Relaxed);
    }

    pub fn set_resyncing(&self, resyncing: bool) {
        self.resyncing.store(resyncing, Ordering::Relaxed);
    }

    pub fn get(&self, now_micros: u64) -> Lag {
        let oldest = match self.oldest_micros.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            at => Duration::from_micros(now_micros.saturating_sub(at)),
        };
        Lag {
            messages: self.messages.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            oldest,
            resyncing: self.resyncing.load(Ordering::Relaxed),
        }
    }
}

/// The bus as this server sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusState {
    /// Not yet connected since the server started: nothing proves its configuration works.
    Connecting,
    Up,
    Down(Outage),
}

/// Why the bus is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The bus answers nobody this server can tell of: Redis refuses, times out or is paused.
    /// Every server of the fleet is in the same state.
    Fleet,
    /// This server's own link is broken while Redis answers a fresh connection, or Redis
    /// refuses this server's credentials.
    Link,
}

impl BusState {
    fn encode(self) -> u8 {
        match self {
            BusState::Connecting => 0,
            BusState::Up => 1,
            BusState::Down(Outage::Fleet) => 2,
            BusState::Down(Outage::Link) => 3,
        }
    }
    fn decode(v: u8) -> Self {
        match v {
            1 => BusState::Up,
            2 => BusState::Down(Outage::Fleet),
            3 => BusState::Down(Outage::Link),
            _ => BusState::Connecting,
        }
    }
}

impl BusHealth {
    pub fn new(state: BusState) -> Self {
        BusHealth { state: AtomicU8::new(state.encode()), refused: Mutex::new(None), lag: BusLag::default() }
    }
    pub fn state(&self) -> BusState {
        BusState::decode(self.state.load(Ordering::Acquire))
    }
    pub fn is_up(&self) -> bool {
        self.state() == BusState::Up
    }
    /// Records the bus's state, here and in the `bus_up` and `bus_link_broken` gauges.
    pub fn set(&self, state: BusState, metrics: &Metrics) {
        self.state.store(state.encode(), Ordering::Release);
        metrics.bus_up.set((state == BusState::Up) as i64);
        metrics.bus_link_broken.set((state == BusState::Down(Outage::Link)) as i64);
        if state == BusState::Up {
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
    /// Publishes `messages` (1 to [`MAX_PUBLISH_BATCH`](crate::messaging::history::MAX_PUBLISH_BATCH)),
    /// all or none, to every subscriber of `channel` in the fleet, in the channel's order; a
    /// message whose id the channel remembers ([`HistoryConfig::id_window`]) is not published
    /// again and is placed where the first one went. `hub` is this server's: a backend that
    /// delivers locally hands the messages to it. [`BusError::OutcomeUnknown`] when the run may
    /// or may not have been published.
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
        messages: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Published, BusError>>;

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
    /// Most the hub holds for one resuming subscriber.
    pub hold_limit: crate::transport::outbox::Budget,
    /// Most bytes of messages received from the bus and not yet handed to the hub
    /// (`--bus-buffer`); past it the backend drops its subscriptions and catches up from history.
    pub bus_buffer: usize,
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
    pub fn publish<'a>(
        &'a self,
        channel: &'a str,
        messages: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Published, BusError>> {
        self.backend.publish(&self.hub, channel, messages)
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
