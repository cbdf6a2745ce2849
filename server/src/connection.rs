//! One WebSocket client, from its first byte to its last.
//!
//! * Handshake: bounded by `--handshake-timeout`; refused with a plain HTTP answer when the
//!   server is full or draining (503 + Retry-After), the Origin is not allowed (403) or the path
//!   is neither `/ws` nor `/ws/<channel>` (404).
//! * Then one task runs two futures side by side: the read loop (client frames -> bus, ops,
//!   replies) and the write loop (outbox -> socket, in batches, plus keepalive pings). Only the
//!   write loop writes; everything else pushes into the connection's [`Outbox`].
//! * The read loop drops a peer that stays silent past `ping interval + ping timeout`. A write
//!   that blocks while the outbox overflows is abandoned for a 1013 close.
//! * On the way out, every subscription is removed from the hub; nothing outlives the task.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError as WsProtocolError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tracing::{Instrument, debug};

use crate::auth::Auth;
use crate::bus::{Bus, BusError};
use crate::config::Config;
use crate::envelope::Envelope;
use crate::history::Since;
use crate::hub::{ConnId, Mode};
use crate::metrics::Metrics;
use crate::outbox::{CloseReason, Outbox};
use crate::protocol::{self, ClientOp, ErrorCode, Payload, ProtocolError};

/// How long a closing connection waits for its close frame to go out and the peer's reply.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);
/// `Retry-After` seconds on a 503.
const RETRY_AFTER_SECS: &str = "5";

/// What every connection shares.
pub struct Shared {
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    pub draining: AtomicBool,
    pub connections: Connections,
    ws_config: WebSocketConfig,
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
        let max = config.max_message_size as usize;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(config.read_buffer_size as usize)
            .write_buffer_size(0)
            .max_message_size(Some(max))
            .max_frame_size(Some(max));
        let auth = config.jwt_secret.as_deref().map(|s| Auth::new(s.as_bytes())).transpose()?;
        Ok(Shared {
            bus,
            metrics,
            auth,
            draining: AtomicBool::new(false),
            connections: Connections::default(),
            ws_config,
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

    fn response(self, detail: &str) -> ErrorResponse {
        let (status, body) = match self {
            Refusal::Draining => {
                (StatusCode::SERVICE_UNAVAILABLE, "server is draining; connect to another server\n".to_owned())
            }
            Refusal::Full => {
                (StatusCode::SERVICE_UNAVAILABLE, "server is at --max-connections; retry later\n".to_owned())
            }
            Refusal::ForbiddenOrigin => (StatusCode::FORBIDDEN, format!("origin {detail:?} is not allowed\n")),
            Refusal::NotFound => (StatusCode::NOT_FOUND, format!("{detail}\n")),
            Refusal::Unauthorized => (StatusCode::UNAUTHORIZED, format!("{detail}\n")),
        };
        let mut builder = tokio_tungstenite::tungstenite::http::Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::CONNECTION, "close");
        if status == StatusCode::SERVICE_UNAVAILABLE {
            builder = builder.header(header::RETRY_AFTER, RETRY_AFTER_SECS);
        }
        if status == StatusCode::UNAUTHORIZED {
            builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
        }
        builder.body(Some(body)).unwrap_or_else(|_| ErrorResponse::new(None))
    }
}

/// What admission looks at in an upgrade request.
#[derive(Debug, Default, Clone, Copy)]
pub struct UpgradeRequest<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub authorization: Option<&'a str>,
}

/// Pure routing and admission: what to do with one upgrade request. Checked in this order:
/// draining, full, origin, path, token.
pub fn admit(
    req: &UpgradeRequest<'_>,
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
    if let Some(origin) = req.origin
        && !allowed_origins.is_empty()
        && !allowed_origins.iter().any(|o| o == origin)
    {
        return Err((Refusal::ForbiddenOrigin, origin.to_owned()));
    }
    let route = match req.path {
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
        auth.check(crate::auth::token(req.authorization, req.query)).map_err(|why| (Refusal::Unauthorized, why))?;
    }
    Ok(route)
}

/// Serves one accepted TCP connection. `permit` is `None` when the server is full, in which case
/// the client gets its 503 and nothing else.
pub async fn serve(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>, mut permit: Option<OwnedSemaphorePermit>) {
    let _ = stream.set_nodelay(true);
    let mut decision: Option<Result<Route, Refusal>> = None;
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let header = |name| req.headers().get(name).and_then(|v| v.to_str().ok());
        let upgrade = UpgradeRequest {
            path: req.uri().path(),
            query: req.uri().query(),
            origin: header(header::ORIGIN),
            authorization: header(header::AUTHORIZATION),
        };
        let verdict = admit(
            &upgrade,
            &shared.allowed_origins,
            shared.auth.as_ref(),
            shared.draining.load(Ordering::Acquire),
            permit.is_none(),
        );
        match verdict {
            Ok(route) => {
                decision = Some(Ok(route));
                Ok(resp)
            }
            Err((refusal, detail)) => {
                decision = Some(Err(refusal));
                // Free the slot before the client reads its answer.
                permit = None;
                Err(refusal.response(&detail))
            }
        }
    };
    // Boxed: its state is large and only needed until the upgrade (memory per idle connection).
    let handshake = Box::pin(tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(shared.ws_config)));
    let ws = match tokio::time::timeout(shared.handshake_timeout, handshake).await {
        Err(_) => {
            shared.metrics.upgrade("timeout");
            debug!(%peer, "handshake timed out");
            return;
        }
        Ok(Err(e)) => {
            match decision {
                Some(Err(refusal)) => shared.metrics.upgrade(refusal.metric_label()),
                _ => {
                    shared.metrics.upgrade("failed");
                    debug!(%peer, error = %e, "handshake failed");
                }
            }
            return;
        }
        Ok(Ok(ws)) => ws,
    };
    let Some(Ok(route)) = decision else { return };
    shared.metrics.upgrade("accepted");
    shared.metrics.connections.inc();
    let outbox = Arc::new(Outbox::new(shared.client_queue));
    let id = shared.connections.register(outbox.clone());
    // A drain that started during the handshake has already taken its snapshot.
    if shared.draining.load(Ordering::Acquire) {
        outbox.close(CloseReason::Draining);
    }
    let conn = Connection { id, shared: shared.clone(), outbox, subscriptions: HashSet::new() };
    conn.run(ws, route).instrument(tracing::debug_span!("conn", id, %peer)).await;
    shared.connections.remove(id);
    // Free the slot before the gauge says so, so that anyone who sees the gauge drop can connect.
    drop(permit);
    shared.metrics.connections.dec();
}

struct Connection {
    id: ConnId,
    shared: Arc<Shared>,
    outbox: Arc<Outbox>,
    subscriptions: HashSet<String>,
}

type Sink = SplitSink<WebSocketStream<TcpStream>, Message>;
type Source = SplitStream<WebSocketStream<TcpStream>>;

impl Connection {
    async fn run(mut self, ws: WebSocketStream<TcpStream>, route: Route) {
        let (sink, source) = ws.split();
        let mode = match &route {
            Route::Protocol => Mode::Protocol,
            Route::Raw(channel) => {
                // Recorded before the join, so the cleanup below covers a join cut short.
                self.subscriptions.insert(channel.clone());
                if Box::pin(self.join(channel, Mode::Raw, None)).await.is_err() {
                    self.subscriptions.remove(channel);
                    self.outbox.close(CloseReason::BusUnavailable);
                }
                Mode::Raw
            }
        };
        let channel = match route {
            Route::Raw(c) => Some(c),
            Route::Protocol => None,
        };
        let outbox = self.outbox.clone();
        let shared = self.shared.clone();
        {
            let writer = write_loop(sink, &outbox, &shared);
            let reader = self.read_loop(source, mode, channel.as_deref());
            tokio::pin!(writer, reader);
            tokio::select! {
                _ = &mut writer => {
                    // The close frame is out (or the socket is gone): wait briefly for the peer's reply.
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut reader).await;
                }
                end = &mut reader => {
                    if let Some(reason) = end {
                        outbox.close(reason);
                        let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await;
                    }
                }
            }
        }
        let hub = shared.bus.hub();
        for channel in &self.subscriptions {
            hub.unsubscribe(channel, self.id);
        }
    }

    /// Returns how the write side should finish: `None` when the peer is gone and nothing more
    /// can be written.
    async fn read_loop(&mut self, mut source: Source, mode: Mode, raw_channel: Option<&str>) -> Option<CloseReason> {
        let metrics = self.shared.metrics.clone();
        loop {
            let msg = match tokio::time::timeout(self.shared.silence_limit, source.next()).await {
                Err(_) => {
                    debug!("peer silent past the ping timeout; dropping it");
                    return None;
                }
                Ok(None) => return None,
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => return self.read_error(e),
            };
            match msg {
                Message::Text(text) => {
                    metrics.messages_in.inc();
                    metrics.bytes_in.inc_by(text.len() as u64);
                    match (mode, raw_channel) {
                        (Mode::Raw, Some(channel)) => {
                            // Raw mode has no error frame: a publish the bus refused ends the
                            // connection (1013) rather than vanishing silently.
                            if self.publish(channel, Payload::Text(text.into())).await.is_err() {
                                return Some(CloseReason::BusUnavailable);
                            }
                        }
                        _ => self.on_protocol_frame(&text).await,
                    }
                }
                Message::Binary(bytes) => {
                    metrics.messages_in.inc();
                    metrics.bytes_in.inc_by(bytes.len() as u64);
                    match (mode, raw_channel) {
                        (Mode::Raw, Some(channel)) => {
                            // Raw mode has no error frame: a publish the bus refused ends the
                            // connection (1013) rather than vanishing silently.
                            if self.publish(channel, Payload::Binary(bytes)).await.is_err() {
                                return Some(CloseReason::BusUnavailable);
                            }
                        }
                        _ => self.reply_error(&ProtocolError::new(
                            ErrorCode::BinaryNotSupported,
                            "protocol mode takes JSON text frames; use /ws/<channel> for binary payloads",
                        )),
                    }
                }
                Message::Close(_) => return Some(CloseReason::PeerClosed),
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    fn read_error(&self, e: WsError) -> Option<CloseReason> {
        let (reason, code) = match &e {
            WsError::Capacity(CapacityError::MessageTooLong { .. }) => (CloseReason::TooLarge, "message_too_large"),
            WsError::Utf8(_) => (CloseReason::InvalidUtf8, "invalid_utf8"),
            WsError::Protocol(WsProtocolError::ResetWithoutClosingHandshake) => return None,
            WsError::Protocol(_) | WsError::Capacity(_) => (CloseReason::ProtocolViolation, "protocol_violation"),
            _ => {
                debug!(error = %e, "read failed");
                return None;
            }
        };
        debug!(error = %e, "closing on a bad frame");
        self.shared.metrics.protocol_error(code);
        Some(reason)
    }

    async fn on_protocol_frame(&mut self, text: &str) {
        let op = match protocol::parse_client_frame(text) {
            Ok(op) => op,
            Err(e) => return self.reply_error(&e),
        };
        match op {
            ClientOp::Subscribe { channel, since } => {
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
                // Recorded before the join, so the connection's cleanup covers a join cut short
                // (the connection closing while the bus is slow to confirm).
                self.subscriptions.insert(channel.to_owned());
                if let Err(e) = Box::pin(self.join(channel, Mode::Protocol, since.as_ref())).await {
                    self.subscriptions.remove(channel);
                    self.reply_error(&ProtocolError::new(
                        ErrorCode::BusUnavailable,
                        format!("could not subscribe to {channel:?}: {e}; retry"),
                    ));
                }
            }
            ClientOp::Unsubscribe { channel } => {
                if self.subscriptions.remove(channel) {
                    self.shared.bus.hub().unsubscribe(channel, self.id);
                    self.reply(protocol::unsubscribed_frame(channel));
                } else {
                    self.reply_error(&ProtocolError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {channel:?}"),
                    ));
                }
            }
            ClientOp::Publish { channel, data } => {
                let payload = Payload::Json(Bytes::copy_from_slice(data.as_bytes()));
                if let Err(e) = self.publish(channel, payload).await {
                    self.reply_error(&ProtocolError::new(ErrorCode::BusUnavailable, format!("not published: {e}")));
                }
            }
        }
    }

    /// Subscribes to `channel` with no gap and no duplicate at the seam: the hub holds live
    /// messages while the channel's position (and, with `since`, what was missed) is read, then
    /// queues the `subscribed` reply (protocol mode), the replay and the held messages in order.
    async fn join(&self, channel: &str, mode: Mode, since: Option<&Since>) -> Result<(), BusError> {
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
        let first = (mode == Mode::Protocol).then(|| Message::text(protocol::subscribed_frame(channel, &replay)));
        hub.open_gate(channel, self.id, first, &replay.entries, (replay.epoch.clone(), replay.head));
        Ok(())
    }

    async fn publish(&self, channel: &str, payload: Payload) -> Result<(), BusError> {
        // Boxed: a publish's state (a Redis script call) would otherwise be part of every idle
        // connection's task.
        let r = Box::pin(self.shared.bus.publish(channel, Envelope::new(payload))).await;
        if let Err(e) = &r {
            self.shared.metrics.publish_failures.inc();
            debug!(%channel, error = %e, "publish failed");
        }
        r
    }

    fn reply(&self, frame: String) {
        if self.outbox.push(Message::Text(Utf8Bytes::from(frame))) == crate::outbox::Push::Overflow {
            self.shared.metrics.slow_client_closes.inc();
        }
    }

    fn reply_error(&self, e: &ProtocolError) {
        self.shared.metrics.protocol_error(e.code.as_str());
        self.reply(e.to_frame());
    }
}

/// Writes queued frames in batches (one flush per batch) and pings on a timer. Returns once the
/// connection's close frame is out, or the socket failed.
async fn write_loop(mut sink: Sink, outbox: &Outbox, shared: &Shared) {
    let mut batch = VecDeque::new();
    let period = shared.ping_interval;
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let close = tokio::select! {
            close = outbox.next_batch(&mut batch) => close,
            _ = ping.tick() => {
                // A peer that stopped reading must not hold the write loop here: give up on the
                // ping when the client is marked slow or the ping cannot go out in time.
                let ping = tokio::time::timeout(shared.silence_limit, sink.send(Message::Ping(Bytes::new())));
                tokio::select! {
                    r = ping => if !matches!(r, Ok(Ok(()))) { return },
                    _ = outbox.slow() => return finish(&mut sink, CloseReason::Slow).await,
                }
                continue;
            }
        };
        if let Some(reason) = close {
            return finish(&mut sink, reason).await;
        }
        let (frames, bytes) = (batch.len() as u64, batch.iter().map(|m| m.len() as u64).sum::<u64>());
        let write = async {
            while let Some(msg) = batch.pop_front() {
                sink.feed(msg).await?;
            }
            sink.flush().await
        };
        tokio::select! {
            r = write => if r.is_err() { return },
            _ = outbox.slow() => {
                batch.clear();
                return finish(&mut sink, CloseReason::Slow).await;
            }
        }
        shared.metrics.messages_out.inc_by(frames);
        shared.metrics.bytes_out.inc_by(bytes);
        // The batch's buffer goes back to the outbox on the next swap; after a burst, let an idle
        // connection shrink back to nothing rather than keep its peak.
        if batch.capacity() > 64 {
            batch = VecDeque::new();
        }
    }
}

async fn finish(sink: &mut Sink, reason: CloseReason) {
    let close = async {
        match reason.frame() {
            Some(frame) => sink.send(Message::Close(Some(frame))).await,
            None => sink.close().await,
        }
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(path: &str) -> UpgradeRequest<'_> {
        UpgradeRequest { path, ..Default::default() }
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
        let refusal = |r: &UpgradeRequest<'_>, auth: Option<&Auth>, draining, full| {
            admit(r, &allowed, auth, draining, full).unwrap_err().0
        };
        let evil = UpgradeRequest { origin: Some("https://evil.example"), ..req("/nowhere") };
        assert_eq!(refusal(&evil, Some(&auth), true, true), Refusal::Draining);
        assert_eq!(refusal(&evil, Some(&auth), false, true), Refusal::Full);
        assert_eq!(refusal(&evil, Some(&auth), false, false), Refusal::ForbiddenOrigin);
        assert_eq!(refusal(&req("/nowhere"), Some(&auth), false, false), Refusal::NotFound);
        assert_eq!(refusal(&req("/ws"), Some(&auth), false, false), Refusal::Unauthorized);
        let ok = UpgradeRequest { origin: Some("https://ok.example"), ..req("/ws") };
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

    #[test]
    fn refusal_responses_carry_retry_after_on_503() {
        let r = Refusal::Full.response("");
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], RETRY_AFTER_SECS);
        let r = Refusal::ForbiddenOrigin.response("https://evil.example");
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.body().as_deref().unwrap_or_default().contains("evil.example"));
    }
}
