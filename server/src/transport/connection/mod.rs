//! One WebSocket client, from its first byte to its last.
//!
//! | module | job |
//! |---|---|
//! | this one | what connections share, the registry a drain closes, one connection's lifecycle |
//! | [`admission`] | pure: where an upgrade request goes, or why it is refused |
//! | [`handshake`] | reading the request and answering it, within `--handshake-timeout` |
//! | [`rate`] | pure: the token bucket of `--publish-rate` and `--subscribe-rate` |
//! | [`reader`] | client frames in; publishes, subscribes, unsubscribes, replies |
//! | [`writer`] | the outbox out to the socket; keepalive and silence |
//!
//! * Upgrade: refused with a plain HTTP answer when the server is full or draining (503 +
//!   Retry-After), the Origin is not allowed (403), the path is neither `/ws` nor
//!   `/ws/<channel>` (404), the token is missing or bad (401), a raw-mode token does not allow
//!   subscribing to its channel (403) or the request is not a WebSocket upgrade (400, 405, 426,
//!   431).
//! * With `--jwt-secret`, the token's [`Grant`] stays with the connection: every subscribe and
//!   publish is checked against it, a `refresh` replaces it, and the write loop's one timer
//!   closes the connection (4001) when it expires. No task or timer of its own.
//! * Then one task runs two futures side by side on the same socket: the read loop and the write
//!   loop. Only the write loop writes; everything else pushes ready-made frames into the
//!   connection's [`Outbox`].
//! * Memory: what an idle connection holds is its task and its outbox. Everything only a busy
//!   connection needs (handling messages, a publish, a join, a close) is boxed where it starts.
//! * On the way out, every subscription is removed from the hub; nothing outlives the task.

pub mod admission;
pub mod handshake;
pub mod rate;
pub mod reader;
pub mod writer;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tracing::debug;
use wsfleet_contract::sync::lock;

pub use self::admission::{Refusal, Route, admit};
pub use self::handshake::{Handshakes, Outcome};
use crate::auth::{Auth, Grant};
use crate::config::{Config, Rate};
use crate::messaging::bus::Bus;
use crate::messaging::hub::{ConnId, Mode};
use crate::metrics::Metrics;
use crate::transport::outbox::{Budget, CloseReason, Outbox};

/// How long a closing connection waits for its close frame to go out and the peer's reply.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Subscriptions being set up at once (each waits on a Redis round trip), at most.
const MAX_JOINS: usize = 64;

/// What every connection shares.
pub struct Shared {
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    pub draining: Arc<AtomicBool>,
    pub connections: Connections,
    /// Places among the established connections (`--max-connections`): taken once a request
    /// has been read, held until the connection ends. Readiness reads it too.
    pub admission: Arc<Semaphore>,
    /// Handshakes in progress (`--max-handshakes`).
    pub handshakes: Arc<Handshakes>,
    max_message: usize,
    read_buffer: usize,
    joins: tokio::sync::Semaphore,
    allowed_origins: Vec<String>,
    auth: Option<Auth>,
    handshake_timeout: Duration,
    ping_interval: Duration,
    silence_limit: Duration,
    max_subscriptions: usize,
    budget: Budget,
    write_stall: Duration,
    publish_rate: Rate,
    subscribe_rate: Rate,
    subscribe_timeout: Duration,
}

impl Shared {
    /// Fails on a JWT secret that is too short.
    pub fn new(config: &Config, bus: Bus, metrics: Arc<Metrics>) -> Result<Self, String> {
        let auth = config
            .jwt_secret
            .as_ref()
            .map(|s| Auth::new(s.as_bytes(), config.jwt_audience.as_deref(), config.jwt_issuer.as_deref()))
            .transpose()?;
        bus.hub().limit_channels(config.max_channels as usize);
        let handshakes = Arc::new(Handshakes::new(config.max_handshakes as usize, metrics.handshakes.clone()));
        Ok(Shared {
            bus,
            metrics,
            auth,
            draining: Arc::new(AtomicBool::new(false)),
            connections: Connections::default(),
            admission: Arc::new(Semaphore::new(config.max_connections as usize)),
            handshakes,
            max_message: config.max_message_size as usize,
            joins: tokio::sync::Semaphore::new(MAX_JOINS),
            read_buffer: config.read_buffer_size as usize,
            allowed_origins: config.allowed_origins.clone(),
            handshake_timeout: config.handshake_timeout(),
            ping_interval: config.ping_interval(),
            silence_limit: config.ping_interval() + config.ping_timeout(),
            max_subscriptions: config.max_subscriptions as usize,
            budget: config.client_budget(),
            write_stall: config.write_stall_timeout(),
            publish_rate: config.publish_rate(),
            subscribe_rate: config.subscribe_rate(),
            subscribe_timeout: config.subscribe_timeout(),
        })
    }
}

/// The outboxes of open connections, so a drain can close them.
#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: std::sync::Mutex<HashMap<ConnId, Arc<Outbox>>>,
}

impl Connections {
    fn register(&self, outbox: Arc<Outbox>) -> ConnId {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, outbox);
        id
    }
    fn remove(&self, id: ConnId) {
        self.lock().remove(&id);
    }
    /// A snapshot of the open connections' outboxes.
    pub fn snapshot(&self) -> Vec<Arc<Outbox>> {
        self.lock().values().cloned().collect()
    }
    pub fn len(&self) -> usize {
        self.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnId, Arc<Outbox>>> {
        lock(&self.open)
    }
}

/// Serves one accepted TCP connection.
pub async fn serve(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    // Boxed: the request buffer and parse state are only needed until the upgrade (memory per
    // idle connection).
    let handshake = Box::pin(handshake::handshake(&mut stream, &shared));
    // Matched as a temporary: a named result would keep its storage in the task (memory per
    // connection) after the upgrade.
    let (route, grant, leftover, permit) = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Ok(Ok(upgraded)) => upgraded,
        Ok(Err(outcome)) => return not_upgraded(&shared, peer, outcome),
        Err(_) => return not_upgraded(&shared, peer, Outcome::TimedOut),
    };
    shared.metrics.upgrade(Outcome::Accepted.metric_label());
    shared.metrics.connections.inc();
    let outbox = Arc::new(Outbox::new(shared.budget, shared.metrics.slow_client_closes.clone()));
    let id = shared.connections.register(outbox.clone());
    // A drain that started during the handshake has already taken its snapshot.
    if shared.draining.load(Ordering::Acquire) {
        outbox.close(crate::drain::late_close());
    }
    let conn = Connection { id, shared: shared.clone(), outbox, subscriptions: HashSet::new(), grant, buckets: None };
    // No tracing span around the connection: even disabled, it would double the size of every
    // connection's task. Its log lines carry `conn` instead.
    debug!(conn = id, %peer, "upgraded");
    conn.run(&stream, leftover, route).await;
    shared.connections.remove(id);
    // Free the slot before the gauge says so, so that anyone who sees the gauge drop can connect.
    drop(permit);
    shared.metrics.connections.dec();
}

/// Counts and logs a handshake that did not end in an upgrade.
fn not_upgraded(shared: &Shared, peer: SocketAddr, outcome: Outcome) {
    shared.metrics.upgrade(outcome.metric_label());
    debug!(%peer, ?outcome, "not upgraded");
}

/// One upgraded connection: its identity, its outbox, its subscriptions, and with
/// `--jwt-secret` what its token allows.
struct Connection {
    id: ConnId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    subscriptions: HashSet<String>,
    /// `None`: the server checks no tokens and every channel is open.
    grant: Option<Box<Grant>>,
    /// The rate limits' buckets, made at the first publish or subscribe (an idle connection
    /// holds none).
    buckets: Option<Box<Buckets>>,
}

/// A connection's token buckets (see [`rate`]).
struct Buckets {
    publish: rate::TokenBucket,
    subscribe: rate::TokenBucket,
}

/// How the read loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The peer is gone: nothing more can be written.
    Gone,
    /// The write side should send this close.
    Close(CloseReason),
}

impl Connection {
    /// Runs the connection to its end: the raw-mode join, then the read and write loops side by
    /// side, then the cleanup of every subscription.
    async fn run(mut self, stream: &TcpStream, leftover: Vec<u8>, route: Route) {
        // A raw-mode connection is subscribed to its channel before anything else.
        let channel = match route {
            Route::Protocol => None,
            Route::Raw(channel) => {
                // Recorded before the join, so the cleanup below covers a join cut short.
                self.subscriptions.insert(channel.clone());
                if let Err(e) = Box::pin(self.join(&channel, Mode::Raw, None)).await {
                    self.subscriptions.remove(&channel);
                    self.outbox.close(e.close_reason());
                }
                Some(channel)
            }
        };
        let outbox = self.outbox.clone();
        let shared = self.shared.clone();
        let heard = Heard::new(self.grant.as_ref().map(|g| g.expires()));
        {
            let writer = writer::write_loop(stream, &outbox, &shared, &heard);
            let reader = self.read_loop(stream, leftover, channel.as_deref(), &heard);
            tokio::pin!(writer, reader);
            tokio::select! {
                close_sent = &mut writer => if close_sent {
                    // Wait briefly for the peer's reply (boxed: only closing connections need it).
                    let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, &mut reader)).await;
                },
                end = &mut reader => {
                    if let ReadEnd::Close(reason) = end {
                        outbox.close(reason);
                        let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, &mut writer)).await;
                    }
                }
            }
        }
        let hub = shared.bus.hub();
        for channel in &self.subscriptions {
            hub.unsubscribe(channel, self.id);
        }
    }
}

/// When the peer was last heard from, for the write loop's silence check, and when its token
/// expires, for the same loop's expiry close. Only reads count as heard: a kernel that still
/// accepts our bytes says nothing about the process behind it.
struct Heard {
    since: tokio::time::Instant,
    millis: AtomicU64,
    /// The read loop is handling the peer's messages and not listening: no silence counts.
    busy: AtomicBool,
    /// The token's `exp` (seconds since the Unix epoch, capped at [`NO_EXPIRY`] - 1: the year
    /// 2106), or [`NO_EXPIRY`]. 32 bits: it fits in the struct's padding.
    token_exp: AtomicU32,
    /// A `refresh` moved `token_exp` since the write loop last aimed its timer.
    token_moved: AtomicBool,
}

/// `Heard::token_exp` of a connection without a token.
const NO_EXPIRY: u32 = u32::MAX;

/// `exp` in 32 bits: a later one ends the connection in 2106.
fn capped_exp(exp: u64) -> u32 {
    exp.min(u64::from(NO_EXPIRY - 1)) as u32
}

impl Heard {
    fn new(token_exp: Option<u64>) -> Self {
        Heard {
            since: tokio::time::Instant::now(),
            millis: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            token_exp: AtomicU32::new(token_exp.map_or(NO_EXPIRY, capped_exp)),
            token_moved: AtomicBool::new(false),
        }
    }
    /// A refreshed token's `exp`.
    fn move_token_exp(&self, exp: u64) {
        self.token_exp.store(capped_exp(exp), Ordering::Relaxed);
        self.token_moved.store(true, Ordering::Relaxed);
    }
    /// Whether the expiry moved since the last call.
    fn take_token_moved(&self) -> bool {
        self.token_moved.swap(false, Ordering::Relaxed)
    }
    /// The token's `exp`, or `None` when the connection has no token.
    fn token_exp(&self) -> Option<u64> {
        Some(self.token_exp.load(Ordering::Relaxed)).filter(|&exp| exp != NO_EXPIRY).map(u64::from)
    }
    fn now(&self) {
        self.millis.store(self.since.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn busy(&self, busy: bool) {
        self.now();
        self.busy.store(busy, Ordering::Relaxed);
    }
    /// When the peer counts as gone if nothing more is heard.
    fn deadline(&self, limit: Duration) -> tokio::time::Instant {
        if self.busy.load(Ordering::Relaxed) {
            return tokio::time::Instant::now() + limit;
        }
        self.since + Duration::from_millis(self.millis.load(Ordering::Relaxed)) + limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every idle connection costs is mostly its task: keep the future small (a tracing
    /// span around it, or a large state left unboxed, shows up here first).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        use clap::Parser;
        let config = crate::config::Cli::parse_from(["wsfleet-server"]).serve;
        let metrics = Arc::new(Metrics::new());
        let tracker = tokio_util::task::TaskTracker::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let bus = Bus::start(
            None,
            "t",
            config.history(),
            config.client_budget(),
            1 << 20,
            metrics.clone(),
            &tracker,
            stop.clone(),
        )
        .unwrap();
        let shared = Arc::new(Shared::new(&config, bus, metrics).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let task = serve(stream, peer, shared);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1152, "a connection's task future takes {size} bytes");
        stop.cancel();
    }
}
