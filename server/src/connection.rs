//! One WebSocket client, from its first byte to its last.
//!
//! * Upgrade: the request head is read and answered within `--handshake-timeout`; refused with
//!   a plain HTTP answer when the server is full or draining (503 + Retry-After), the Origin is
//!   not allowed (403), the path is neither `/ws` nor `/ws/<channel>` (404), the token is missing
//!   or bad (401) or the request is not a WebSocket upgrade (400, 405, 426, 431).
//! * Then one task runs two futures side by side on the same socket: the read loop (client
//!   frames -> bus, ops, replies) and the write loop (outbox -> socket). Only the write loop
//!   writes; everything else pushes ready-made frames into the connection's [`Outbox`].
//! * The write loop hands every queued frame to one vectored write: frames are encoded once per
//!   message (see [`frame`]) and shared by every recipient, so a burst costs one syscall per
//!   client, not one per message, and nothing is copied per client.
//! * The read loop reads with the worker thread's buffer and keeps bytes only while a frame is
//!   incomplete: an idle connection holds no buffer. It drops a peer that stays silent past
//!   `ping interval + ping timeout`. A write that blocks while the outbox overflows is abandoned
//!   for a 1013 close.
//! * On the way out, every subscription is removed from the hub; nothing outlives the task.

use std::cell::RefCell;
use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tracing::debug;

use crate::auth::Auth;
use crate::bus::{Bus, BusError};
use crate::config::Config;
use crate::envelope::Envelope;
use crate::frame::{self, Frame, FrameError, Incoming};
use crate::history::{MAX_PUBLISH_BATCH, Since};
use crate::hub::{ConnId, Mode};
use crate::metrics::Metrics;
use crate::outbox::{CloseReason, Outbox};
use crate::protocol::{self, ClientOp, ErrorCode, Payload, ProtocolError};
use crate::upgrade::{self, Head, HeadError};

/// How long a closing connection waits for its close frame to go out and the peer's reply.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// `Retry-After` seconds on a 503.
const RETRY_AFTER_SECS: &str = "5";
/// Subscriptions being set up at once (each waits on a Redis round trip), at most.
const MAX_JOINS: usize = 64;
/// Frames handed to one vectored write, at most.
const MAX_IOV: usize = 64;
/// Reads from one socket before its queued messages are handled.
const MAX_READS: usize = 8;

/// What every connection shares.
pub struct Shared {
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    pub connections: Connections,
    max_message: usize,
    read_buffer: usize,
    joins: tokio::sync::Semaphore,
    allowed_origins: Vec<String>,
    auth: Option<Auth>,
    handshake_timeout: Duration,
    ping_interval: Duration,
    silence_limit: Duration,
    max_subscriptions: usize,
    client_queue: usize,
}

impl Shared {
    /// Fails on a JWT secret that is too short.
    pub fn new(config: &Config, bus: Bus, metrics: Arc<Metrics>) -> Result<Self, String> {
        let auth = config.jwt_secret.as_deref().map(|s| Auth::new(s.as_bytes())).transpose()?;
        Ok(Shared {
            bus,
            metrics,
            auth,
            draining: AtomicBool::new(false),
            connections: Connections::default(),
            max_message: config.max_message_size as usize,
            joins: tokio::sync::Semaphore::new(MAX_JOINS),
            read_buffer: config.read_buffer_size as usize,
            allowed_origins: config.allowed_origins.clone(),
            handshake_timeout: config.handshake_timeout(),
            ping_interval: config.ping_interval(),
            silence_limit: config.ping_interval() + config.ping_timeout(),
            max_subscriptions: config.max_subscriptions as usize,
            client_queue: config.client_queue as usize,
        })
    }
}

/// The outboxes of open connections, so a drain can close them.
#[derive(Default)]
pub struct Connections {
    next_id: AtomicU64,
    open: std::sync::Mutex<std::collections::HashMap<ConnId, Arc<Outbox>>>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<ConnId, Arc<Outbox>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where an accepted upgrade goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Protocol,
    Raw(String),
}

/// Why an upgrade was refused, decided purely from the request and the server's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Draining,
    Full,
    ForbiddenOrigin,
    NotFound,
    Unauthorized,
}

impl Refusal {
    pub fn metric_label(self) -> &'static str {
        match self {
            Refusal::Draining => "draining",
            Refusal::Full => "full",
            Refusal::ForbiddenOrigin => "forbidden_origin",
            Refusal::NotFound => "not_found",
            Refusal::Unauthorized => "unauthorized",
        }
    }

    fn response(self, detail: &str) -> Vec<u8> {
        let retry = [("Retry-After", RETRY_AFTER_SECS)];
        match self {
            Refusal::Draining => {
                upgrade::response(503, "Service Unavailable", &retry, "server is draining; connect to another server\n")
            }
            Refusal::Full => {
                upgrade::response(503, "Service Unavailable", &retry, "server is at --max-connections; retry later\n")
            }
            Refusal::ForbiddenOrigin => {
                upgrade::response(403, "Forbidden", &[], &format!("origin {detail:?} is not allowed\n"))
            }
            Refusal::NotFound => upgrade::response(404, "Not Found", &[], &format!("{detail}\n")),
            Refusal::Unauthorized => {
                upgrade::response(401, "Unauthorized", &[("WWW-Authenticate", "Bearer")], &format!("{detail}\n"))
            }
        }
    }
}

/// Pure routing and admission: what to do with one upgrade request. Checked in this order:
/// draining, full, origin, path, token.
pub fn admit(
    req: &Head,
    allowed_origins: &[String],
    auth: Option<&Auth>,
    draining: bool,
    full: bool,
) -> Result<Route, (Refusal, String)> {
    if draining {
        return Err((Refusal::Draining, String::new()));
    }
    if full {
        return Err((Refusal::Full, String::new()));
    }
    if let Some(origin) = req.origin.as_deref()
        && !allowed_origins.is_empty()
        && !allowed_origins.iter().any(|o| o == origin)
    {
        return Err((Refusal::ForbiddenOrigin, origin.to_owned()));
    }
    let route = match req.path.as_str() {
        "/ws" => Route::Protocol,
        path => match path.strip_prefix("/ws/") {
            Some(channel) => match protocol::validate_channel(channel) {
                Ok(()) => Route::Raw(channel.to_owned()),
                Err(why) => return Err((Refusal::NotFound, format!("invalid channel in path: {why}"))),
            },
            None => {
                return Err((Refusal::NotFound, format!("no WebSocket endpoint at {path}; use /ws or /ws/<channel>")));
            }
        },
    };
    if let Some(auth) = auth {
        auth.check(crate::auth::token(req.authorization.as_deref(), req.query.as_deref()))
            .map_err(|why| (Refusal::Unauthorized, why))?;
    }
    Ok(route)
}

/// Serves one accepted TCP connection. `permit` is `None` when the server is full, in which case
/// the client gets its 503 and nothing else.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut permit: Option<OwnedSemaphorePermit>,
) {
    let _ = stream.set_nodelay(true);
    // Boxed: the request buffer and parse state are only needed until the upgrade (memory per
    // idle connection).
    let handshake = Box::pin(handshake(&mut stream, &shared, &mut permit));
    let (route, leftover) = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Err(_) => {
            shared.metrics.upgrade("timeout");
            debug!(%peer, "handshake timed out");
            return;
        }
        Ok(Err(result)) => {
            shared.metrics.upgrade(result);
            debug!(%peer, result, "upgrade refused");
            return;
        }
        Ok(Ok(upgraded)) => upgraded,
    };
    shared.metrics.upgrade("accepted");
    shared.metrics.connections.inc();
    let outbox = Arc::new(Outbox::new(shared.client_queue));
    let id = shared.connections.register(outbox.clone());
    // A drain that started during the handshake has already taken its snapshot.
    if shared.draining.load(Ordering::Acquire) {
        outbox.close(CloseReason::Draining);
    }
    let conn = Connection { id, shared: shared.clone(), outbox, subscriptions: HashSet::new() };
    // No tracing span around the connection: even disabled, it would double the size of every
    // connection's task. Its log lines carry `conn` instead.
    debug!(conn = id, %peer, "upgraded");
    conn.run(&stream, leftover, route).await;
    shared.connections.remove(id);
    // Free the slot before the gauge says so, so that anyone who sees the gauge drop can connect.
    drop(permit);
    shared.metrics.connections.dec();
}

/// Reads the upgrade request, decides, answers. Returns the route and the bytes the client sent
/// after its request, or the `upgrades_total` result of a refusal.
async fn handshake(
    stream: &mut TcpStream,
    shared: &Shared,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> Result<(Route, Vec<u8>), &'static str> {
    let (head, leftover) = match upgrade::read_head(stream).await {
        Ok(read) => read,
        Err(HeadError::Closed) => return Err("failed"),
        Err(e) => {
            refuse(stream, e.response().unwrap_or_default()).await;
            return Err("bad_request");
        }
    };
    let draining = shared.draining.load(Ordering::Acquire);
    match admit(&head, &shared.allowed_origins, shared.auth.as_ref(), draining, permit.is_none()) {
        Ok(route) => {
            stream.write_all(&upgrade::switching_protocols(&head.key)).await.map_err(|_| "failed")?;
            Ok((route, leftover))
        }
        Err((refusal, detail)) => {
            // Free the slot before the client reads its answer.
            *permit = None;
            refuse(stream, refusal.response(&detail)).await;
            Err(refusal.metric_label())
        }
    }
}

/// Sends a refusal and ends the connection, letting the client read the whole answer.
async fn refuse(stream: &mut TcpStream, answer: Vec<u8>) {
    if stream.write_all(&answer).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

struct Connection {
    id: ConnId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    subscriptions: HashSet<String>,
}

/// How the read loop ended: `None` when the peer is gone and nothing more can be written,
/// else the close the write side should send.
type ReadEnd = Option<CloseReason>;

/// Consecutive publishes to one channel, gathered from one read to go to the bus together.
#[derive(Default)]
struct PublishRun {
    /// The run's channel (the last run's while empty: its buffer is reused).
    channel: String,
    envelopes: Vec<Envelope>,
}

impl PublishRun {
    fn add(&mut self, channel: &str, payload: Payload) {
        if self.envelopes.is_empty() {
            channel.clone_into(&mut self.channel);
        }
        self.envelopes.push(Envelope::new(payload));
    }

    fn is_full(&self) -> bool {
        self.envelopes.len() >= MAX_PUBLISH_BATCH
    }
}

impl Connection {
    async fn run(mut self, stream: &TcpStream, leftover: Vec<u8>, route: Route) {
        // A raw-mode connection is subscribed to its channel before anything else.
        let channel = match route {
            Route::Protocol => None,
            Route::Raw(channel) => {
                // Recorded before the join, so the cleanup below covers a join cut short.
                self.subscriptions.insert(channel.clone());
                if Box::pin(self.join(&channel, Mode::Raw, None)).await.is_err() {
                    self.subscriptions.remove(&channel);
                    self.outbox.close(CloseReason::BusUnavailable);
                }
                Some(channel)
            }
        };
        let outbox = self.outbox.clone();
        let shared = self.shared.clone();
        let heard = Heard::new();
        {
            let writer = write_loop(stream, &outbox, &shared, &heard);
            let reader = self.read_loop(stream, leftover, channel.as_deref(), &heard);
            tokio::pin!(writer, reader);
            tokio::select! {
                close_sent = &mut writer => if close_sent {
                    // Wait briefly for the peer's reply (boxed: only closing connections need it).
                    let _ = Box::pin(tokio::time::timeout(CLOSE_TIMEOUT, &mut reader)).await;
                },
                end = &mut reader => {
                    if let Some(reason) = end {
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

    async fn read_loop(
        &mut self,
        stream: &TcpStream,
        leftover: Vec<u8>,
        raw_channel: Option<&str>,
        heard: &Heard,
    ) -> ReadEnd {
        let mut reader = frame::Reader::new(self.shared.max_message);
        let mut incoming = Vec::new();
        // Set once the socket has nothing more to give; what was read before still counts.
        let mut end: Option<ReadEnd> = reader.feed(&leftover, &mut incoming).err().map(|e| self.frame_error(e));
        drop(leftover);
        loop {
            if !incoming.is_empty() {
                // Boxed: handling messages (publishes, subscribes) needs far more state than
                // waiting does, and an idle connection should only pay for waiting.
                let batch = std::mem::take(&mut incoming);
                // Time spent on the peer's own requests (a slow bus, a queue for joins) is not
                // silence: the read loop cannot listen meanwhile.
                heard.busy(true);
                let stop = Box::pin(self.on_messages(batch, raw_channel)).await;
                heard.busy(false);
                if let Some(stop) = stop {
                    return stop;
                }
            }
            if let Some(end) = end {
                return end;
            }
            // Silence is the write loop's job (it owns the connection's one timer). `poll_fn`
            // rather than `readable()`: one task reads this socket, so its waker slot is enough
            // and the wait stores nothing.
            if std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await.is_err() {
                return None;
            }
            end = match read_available(stream, self.shared.read_buffer, &mut reader, &mut incoming) {
                Ok(true) => {
                    heard.now();
                    None
                }
                Ok(false) => Some(None),
                Err(e) => Some(self.frame_error(e)),
            };
        }
    }

    /// Handles a batch of client messages (what one read brought) in order; `Some` ends the
    /// read loop. A run of publishes to one channel goes to the bus in one call (one Redis round
    /// trip), so back-to-back messages do not each wait for the previous one's answer: under
    /// load that answer can wait behind a whole fan-out round.
    async fn on_messages(&mut self, batch: Vec<Incoming>, raw_channel: Option<&str>) -> Option<ReadEnd> {
        let mut run = PublishRun::default();
        for msg in batch {
            match msg {
                Incoming::Ping(data) => self.push(frame::pong(&data)),
                Incoming::Pong => {}
                Incoming::Close(code) => {
                    let end = self.publish_run(&mut run, raw_channel).await;
                    return Some(end.or(Some(CloseReason::PeerClosed(code))));
                }
                Incoming::Text(text) => {
                    self.count_in(text.len());
                    match raw_channel {
                        Some(channel) => run.add(channel, Payload::Text(text.into())),
                        None => self.on_protocol_text(text.as_str(), &mut run).await,
                    }
                }
                Incoming::Binary(bytes) => {
                    self.count_in(bytes.len());
                    match raw_channel {
                        Some(channel) => run.add(channel, Payload::Binary(bytes)),
                        None => {
                            self.publish_run(&mut run, None).await;
                            self.reply_error(&ProtocolError::new(
                                ErrorCode::BinaryNotSupported,
                                "protocol mode takes JSON text frames; use /ws/<channel> for binary payloads",
                            ));
                        }
                    }
                }
            }
            if run.is_full()
                && let Some(end) = self.publish_run(&mut run, raw_channel).await
            {
                return Some(Some(end));
            }
        }
        self.publish_run(&mut run, raw_channel).await.map(Some)
    }

    fn count_in(&self, len: usize) {
        self.shared.metrics.messages_in.inc();
        self.shared.metrics.bytes_in.inc_by(len as u64);
    }

    /// A protocol-mode text frame. A publish to the run's channel joins the run; anything else
    /// (a publish elsewhere included) first waits for the run to go out, so replies and effects
    /// keep the client's order.
    async fn on_protocol_text(&mut self, text: &str, run: &mut PublishRun) {
        let op = protocol::parse_client_frame(text);
        if !matches!(&op, Ok(ClientOp::Publish { channel, .. }) if run.channel == *channel) {
            self.publish_run(run, None).await;
        }
        match op {
            Ok(ClientOp::Publish { channel, data }) => {
                run.add(channel, Payload::Json(Bytes::copy_from_slice(data.as_bytes())));
            }
            Ok(ClientOp::Subscribe { channel, since }) => self.subscribe(channel, since).await,
            Ok(ClientOp::Unsubscribe { channel }) => self.unsubscribe(channel),
            Err(e) => self.reply_error(&e),
        }
    }

    /// Publishes the run gathered so far and empties it. A refused run: in raw mode, which has
    /// no error frame, the connection ends with 1013 (the returned close) rather than losing
    /// messages silently; in protocol mode each of its messages gets an error frame.
    async fn publish_run(&self, run: &mut PublishRun, raw_channel: Option<&str>) -> Option<CloseReason> {
        if run.envelopes.is_empty() {
            return None;
        }
        let envelopes = std::mem::take(&mut run.envelopes);
        let count = envelopes.len();
        // Boxed: a publish's state (a Redis script call) would otherwise be part of every idle
        // connection's task.
        let Err(e) = Box::pin(self.shared.bus.publish(&run.channel, envelopes)).await else { return None };
        self.shared.metrics.publish_failures.inc_by(count as u64);
        debug!(conn = self.id, channel = %run.channel, messages = count, error = %e, "publish failed");
        if raw_channel.is_some() {
            return Some(CloseReason::BusUnavailable);
        }
        let error = ProtocolError::new(ErrorCode::BusUnavailable, format!("not published: {e}"));
        for _ in 0..count {
            self.reply_error(&error);
        }
        None
    }

    fn frame_error(&self, e: FrameError) -> ReadEnd {
        let (reason, code) = match &e {
            FrameError::TooLarge { .. } => (CloseReason::TooLarge, "message_too_large"),
            FrameError::InvalidUtf8 => (CloseReason::InvalidUtf8, "invalid_utf8"),
            FrameError::Protocol(_) => (CloseReason::ProtocolViolation, "protocol_violation"),
        };
        debug!(conn = self.id, error = %e, "closing on a bad frame");
        self.shared.metrics.protocol_error(code);
        Some(reason)
    }

    async fn subscribe(&mut self, channel: &str, since: Option<Since>) {
        if self.subscriptions.contains(channel) {
            return self.reply_error(&ProtocolError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel:?}; unsubscribe first to resume from another offset"),
            ));
        }
        if self.subscriptions.len() >= self.shared.max_subscriptions {
            return self.reply_error(&ProtocolError::new(
                ErrorCode::SubscriptionLimit,
                format!("this connection already has {} subscriptions (the limit)", self.subscriptions.len()),
            ));
        }
        // Recorded before the join, so the connection's cleanup covers a join cut short (the
        // connection closing while the bus is slow to confirm).
        self.subscriptions.insert(channel.to_owned());
        if let Err(e) = Box::pin(self.join(channel, Mode::Protocol, since.as_ref())).await {
            self.subscriptions.remove(channel);
            self.reply_error(&ProtocolError::new(
                ErrorCode::BusUnavailable,
                format!("could not subscribe to {channel:?}: {e}; retry"),
            ));
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        if self.subscriptions.remove(channel) {
            self.shared.bus.hub().unsubscribe(channel, self.id);
            self.reply(protocol::unsubscribed_frame(channel));
        } else {
            self.reply_error(&ProtocolError::new(ErrorCode::NotSubscribed, format!("not subscribed to {channel:?}")));
        }
    }

    /// Subscribes to `channel` with no gap and no duplicate at the seam: the hub holds live
    /// messages while the channel's position (and, with `since`, what was missed) is read, then
    /// queues the `subscribed` reply (protocol mode), the replay and the held messages in order.
    async fn join(&self, channel: &str, mode: Mode, since: Option<&Since>) -> Result<(), BusError> {
        // A bounded number of joins run at once: under a connection storm the rest wait their
        // turn here, before their Redis deadline starts, rather than all time out together.
        let _turn = self.shared.joins.acquire().await.map_err(|_| BusError::Unavailable("shutting down".into()))?;
        let r = self.join_now(channel, mode, since).await;
        if let Err(e) = &r {
            self.shared.metrics.subscribe_failures.inc();
            debug!(conn = self.id, %channel, error = %e, "subscribe failed");
        }
        r
    }

    async fn join_now(&self, channel: &str, mode: Mode, since: Option<&Since>) -> Result<(), BusError> {
        let hub = self.shared.bus.hub();
        hub.subscribe(channel, self.id, self.outbox.clone(), mode, true)
            .await
            .map_err(|e| BusError::Unavailable(e.to_string()))?;
        let replay = match self.shared.bus.read(channel, since).await {
            Ok(replay) => replay,
            Err(e) => {
                hub.unsubscribe(channel, self.id);
                return Err(e);
            }
        };
        let first =
            (mode == Mode::Protocol).then(|| frame::text(protocol::subscribed_frame(channel, &replay).as_bytes()));
        hub.open_gate(channel, self.id, first, &replay.entries, (replay.epoch.clone(), replay.head));
        Ok(())
    }

    fn reply(&self, text: String) {
        self.push(frame::text(text.as_bytes()));
    }

    fn push(&self, frame: Frame) {
        if self.outbox.push(frame) == crate::outbox::Push::Overflow {
            self.shared.metrics.slow_client_closes.inc();
        }
    }

    fn reply_error(&self, e: &ProtocolError) {
        self.shared.metrics.protocol_error(e.code.as_str());
        self.reply(e.to_frame());
    }
}

/// Reads what the socket has (a bounded number of reads, with the worker thread's buffer) and
/// feeds it to `reader`. `Ok(false)`: the peer closed or reset the connection.
fn read_available(
    stream: &TcpStream,
    size: usize,
    reader: &mut frame::Reader,
    out: &mut Vec<Incoming>,
) -> Result<bool, FrameError> {
    thread_local! {
        static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    }
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        buffer.resize(size, 0);
        for _ in 0..MAX_READS {
            match stream.try_read(&mut buffer) {
                Ok(0) => return Ok(false),
                Ok(n) => reader.feed(&buffer[..n], out)?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Ok(false),
            }
        }
        Ok(true)
    })
}

/// When the peer was last heard from, for the write loop's silence check. Only reads count:
/// a kernel that still accepts our bytes says nothing about the process behind it.
struct Heard {
    since: tokio::time::Instant,
    millis: AtomicU64,
    /// The read loop is handling the peer's messages and not listening: no silence counts.
    busy: AtomicBool,
}

impl Heard {
    fn new() -> Self {
        Heard { since: tokio::time::Instant::now(), millis: AtomicU64::new(0), busy: AtomicBool::new(false) }
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

/// Writes queued frames (one vectored write per batch), queues a keepalive ping every
/// `--ping-interval`, and drops a peer silent past `ping interval + ping timeout`, all on one
/// timer. Returns whether a close frame went out (then the peer's answer is worth waiting for).
async fn write_loop(stream: &TcpStream, outbox: &Outbox, shared: &Shared, heard: &Heard) -> bool {
    let mut batch = VecDeque::new();
    let mut next_ping = tokio::time::Instant::now() + shared.ping_interval;
    let timer = tokio::time::sleep_until(next_ping);
    tokio::pin!(timer);
    loop {
        let close = tokio::select! {
            close = outbox.next_batch(&mut batch) => close,
            _ = &mut timer => {
                let now = tokio::time::Instant::now();
                let silent_at = heard.deadline(shared.silence_limit);
                if now >= silent_at {
                    debug!("peer silent past the ping timeout; dropping it");
                    return false;
                }
                if now >= next_ping {
                    // Queued like any frame: a peer that stopped reading overflows its queue and
                    // is closed as slow, or falls silent and is dropped here.
                    if outbox.push(frame::ping()) == crate::outbox::Push::Overflow {
                        shared.metrics.slow_client_closes.inc();
                    }
                    next_ping = now + shared.ping_interval;
                }
                timer.as_mut().reset(next_ping.min(silent_at));
                continue;
            }
        };
        if let Some(reason) = close {
            Box::pin(finish(stream, VecDeque::new(), reason)).await;
            return true;
        }
        // Everything queued by the time the writer runs goes in one write. (Yielding to the
        // scheduler first, to let more arrive, measured no better in the burst benchmark.)
        let (frames, bytes) = (batch.len() as u64, batch.iter().map(|f| f.len() as u64).sum::<u64>());
        // Boxed, like everything a connection only needs while it writes.
        match Box::pin(write_batch(stream, &mut batch, outbox, heard, shared.silence_limit)).await {
            Some(writes) => {
                shared.metrics.socket_writes.inc_by(writes);
                shared.metrics.messages_out.inc_by(frames);
                shared.metrics.bytes_out.inc_by(bytes);
            }
            None => return false,
        }
        // Give the buffer back: the outbox gets an unallocated queue on the next swap, so a
        // connection between bursts holds no queue memory (one allocation per batch instead).
        batch = VecDeque::new();
    }
}

/// Writes one batch; returns the number of write syscalls. `None`: the connection is over (the
/// socket failed, the peer fell silent while the write was blocked, or the client turned out
/// too slow and got its 1013).
async fn write_batch(
    stream: &TcpStream,
    batch: &mut VecDeque<Frame>,
    outbox: &Outbox,
    heard: &Heard,
    silence_limit: Duration,
) -> Option<u64> {
    let mut mid_frame = false;
    {
        let write = write_frames(stream, batch, &mut mid_frame);
        let silence = tokio::time::sleep_until(heard.deadline(silence_limit));
        tokio::pin!(write, silence);
        loop {
            tokio::select! {
                r = &mut write => return r.ok(),
                _ = outbox.slow() => break,
                _ = &mut silence => {
                    let silent_at = heard.deadline(silence_limit);
                    if tokio::time::Instant::now() >= silent_at {
                        debug!("peer silent past the ping timeout while a write waited; dropping it");
                        return None;
                    }
                    silence.as_mut().reset(silent_at);
                }
            }
        }
    }
    // Too slow: finish the frame under way (a close frame cannot follow half a frame), drop
    // the rest, then close.
    batch.truncate(usize::from(mid_frame));
    finish(stream, std::mem::take(batch), CloseReason::Slow).await;
    None
}

/// Writes every frame of `frames`, as many per syscall as the kernel takes; returns the number
/// of syscalls that wrote. `mid_frame` tells whether the socket has seen only part of the front
/// frame.
async fn write_frames(stream: &TcpStream, frames: &mut VecDeque<Frame>, mid_frame: &mut bool) -> io::Result<u64> {
    let mut writes = 0;
    while !frames.is_empty() {
        std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await?;
        let result = {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = frames.len().min(MAX_IOV);
            for (slice, frame) in slices.iter_mut().zip(frames.iter()) {
                *slice = IoSlice::new(frame);
            }
            stream.try_write_vectored(&slices[..n])
        };
        let mut written = match result {
            Ok(n) => {
                writes += 1;
                n
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(e),
        };
        while written > 0 {
            let Some(front) = frames.front_mut() else { break };
            if written >= front.len() {
                written -= front.len();
                frames.pop_front();
                *mid_frame = false;
            } else {
                front.advance(written);
                written = 0;
                *mid_frame = true;
            }
        }
    }
    Ok(writes)
}

/// Sends `rest` (what must still go out before it) and the close frame of `reason`, bounded by
/// [`CLOSE_TIMEOUT`].
async fn finish(stream: &TcpStream, mut rest: VecDeque<Frame>, reason: CloseReason) {
    rest.push_back(reason.frame());
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, write_frames(stream, &mut rest, &mut false)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str) -> Head {
        Head { path: path.into(), ..Default::default() }
    }

    #[test]
    fn routes_both_modes() {
        assert_eq!(admit(&req("/ws"), &[], None, false, false), Ok(Route::Protocol));
        assert_eq!(admit(&req("/ws/news"), &[], None, false, false), Ok(Route::Raw("news".into())));
    }

    #[test]
    fn refusals_in_order_of_precedence() {
        let allowed = vec!["https://ok.example".to_owned()];
        let auth = Auth::new(b"0123456789abcdef0123456789abcdef").unwrap();
        let refusal =
            |r: &Head, auth: Option<&Auth>, draining, full| admit(r, &allowed, auth, draining, full).unwrap_err().0;
        let evil = Head { origin: Some("https://evil.example".into()), ..req("/nowhere") };
        assert_eq!(refusal(&evil, Some(&auth), true, true), Refusal::Draining);
        assert_eq!(refusal(&evil, Some(&auth), false, true), Refusal::Full);
        assert_eq!(refusal(&evil, Some(&auth), false, false), Refusal::ForbiddenOrigin);
        assert_eq!(refusal(&req("/nowhere"), Some(&auth), false, false), Refusal::NotFound);
        assert_eq!(refusal(&req("/ws"), Some(&auth), false, false), Refusal::Unauthorized);
        let ok = Head { origin: Some("https://ok.example".into()), ..req("/ws") };
        assert_eq!(admit(&ok, &allowed, None, false, false), Ok(Route::Protocol));
        assert_eq!(
            admit(&req("/ws"), &allowed, None, false, false),
            Ok(Route::Protocol),
            "no Origin header: not a browser"
        );
        let (r, why) = admit(&req("/ws/a%20b"), &[], None, false, false).unwrap_err();
        assert_eq!(r, Refusal::NotFound);
        assert!(why.contains("channel"), "{why}");
        assert_eq!(refusal(&req("/ws/"), None, false, false), Refusal::NotFound);
    }

    /// What every idle connection costs is mostly its task: keep the future small (a tracing
    /// span around it, or a large state left unboxed, shows up here first).
    #[tokio::test]
    async fn a_connection_task_stays_small() {
        use clap::Parser;
        let config = crate::config::Cli::parse_from(["wsfleet-server"]).serve;
        let metrics = Arc::new(Metrics::new());
        let tracker = tokio_util::task::TaskTracker::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let bus = Bus::start(None, "t", config.history(), 16, metrics.clone(), &tracker, stop.clone()).unwrap();
        let shared = Arc::new(Shared::new(&config, bus, metrics).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let task = serve(stream, peer, shared, None);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1152, "a connection's task future takes {size} bytes");
        stop.cancel();
    }

    #[test]
    fn refusal_responses_carry_retry_after_on_503() {
        let r = String::from_utf8(Refusal::Full.response("")).unwrap();
        assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
        assert!(r.contains("\r\nRetry-After: 5\r\n"), "{r}");
        let r = String::from_utf8(Refusal::ForbiddenOrigin.response("https://evil.example")).unwrap();
        assert!(r.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{r}");
        assert!(r.ends_with("origin \"https://evil.example\" is not allowed\n"), "{r}");
    }
}
