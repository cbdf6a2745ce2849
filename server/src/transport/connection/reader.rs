//! The read side of a connection and the client's operations: frames in, then publishes (a run
//! of them to one channel goes to the bus in one call), subscribes (with resume), unsubscribes,
//! token refreshes, pongs and error replies out through the connection's outbox. With
//! `--jwt-secret`, every subscribe and publish is checked against the connection's token first:
//! a refusal is a `forbidden` error frame in protocol mode, a 1008 close in raw mode (which has
//! no error frame).
//!
//! Limits, each a refusal that changes nothing: publishes per second (`--publish-rate`, a token
//! bucket: `rate_limited` and the message is dropped in protocol mode; raw mode closes with
//! 1008, since a message it cannot refuse must not vanish silently), new channels per second
//! (`--subscribe-rate`: `rate_limited`), channels per connection (`--max-subscriptions`:
//! `subscription_limit`) and per server (`--max-channels`: `channel_limit`; raw mode 1013).
//!
//! Subscribe fairness: a connection handles its frames one at a time, so it waits for one
//! subscribe at a time; subscribes wait for a turn among [`MAX_JOINS`](super::MAX_JOINS) in a
//! first-come, first-served queue, so a client with many subscribes rejoins the back of the
//! queue after each and never holds more than one turn. A subscribe that takes longer than
//! `--subscribe-timeout` in all (turn, bus, replay) is answered `timeout` (raw mode: 1013) and
//! leaves nothing in the hub.
//!
//! The socket is read with the worker thread's buffer and bytes are kept only while a frame is
//! incomplete: an idle connection holds no buffer. Time spent handling the peer's requests is
//! not counted as its silence. Nothing here writes to the socket.

use std::cell::RefCell;
use std::io;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::net::TcpStream;
use tracing::debug;

use super::rate::TokenBucket;
use super::{Buckets, Connection, Heard, ReadEnd};
use crate::auth::{Access, Denied};
use crate::messaging::bus::BusError;
use crate::messaging::envelope::{Envelope, Payload};
use crate::messaging::history::{MAX_PUBLISH_BATCH, Outgoing, Since};
use crate::messaging::hub::{Mode, SubscribeError};
use crate::protocol::{self, ClientOp, ErrorCode, ProtocolError};
use crate::transport::frame::{self, Frame, FrameError, Incoming};
use crate::transport::outbox::CloseReason;

/// Reads from one socket before its queued messages are handled.
const MAX_READS: usize = 8;

/// Why a subscribe (a raw-mode connection's included) did not happen.
#[derive(Debug, thiserror::Error)]
pub(super) enum JoinError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("this server holds {0} channels, its limit (--max-channels); retry later")]
    ChannelLimit(usize),
    #[error("the subscribe took longer than --subscribe-timeout ({0:?}); retry")]
    TimedOut(Duration),
}

impl From<SubscribeError> for JoinError {
    fn from(e: SubscribeError) -> Self {
        match e {
            SubscribeError::ChannelLimit(limit) => JoinError::ChannelLimit(limit),
            e => JoinError::Bus(e.into()),
        }
    }
}

impl JoinError {
    /// How a raw-mode connection, which has no error frame, ends on it.
    pub(super) fn close_reason(&self) -> CloseReason {
        match self {
            JoinError::Bus(_) => CloseReason::BusUnavailable,
            JoinError::ChannelLimit(_) => CloseReason::ChannelLimit,
            JoinError::TimedOut(_) => CloseReason::SubscribeTimeout,
        }
    }

    /// The error frame a protocol-mode subscribe gets.
    fn protocol_error(&self, channel: &str) -> ProtocolError {
        match self {
            JoinError::Bus(e) => {
                ProtocolError::new(ErrorCode::BusUnavailable, format!("could not subscribe to {channel:?}: {e}; retry"))
            }
            JoinError::ChannelLimit(_) => {
                ProtocolError::new(ErrorCode::ChannelLimit, format!("not subscribed to {channel:?}: {self}"))
                    .on_channel(channel)
            }
            JoinError::TimedOut(_) => {
                ProtocolError::new(ErrorCode::Timeout, format!("not subscribed to {channel:?}: {self}"))
                    .on_channel(channel)
            }
        }
    }
}

/// Consecutive publishes to one channel, gathered from one read to go to the bus together.
#[derive(Default)]
struct PublishRun {
    /// The run's channel (the last run's while empty: its buffer is reused).
    channel: String,
    messages: Vec<Outgoing>,
}

impl PublishRun {
    fn add(&mut self, channel: &str, payload: Payload, id: Option<&str>) {
        if self.messages.is_empty() {
            channel.clone_into(&mut self.channel);
        }
        self.messages.push(Outgoing { envelope: Envelope::new(payload), id: id.map(Box::from) });
    }

    fn is_full(&self) -> bool {
        self.messages.len() >= MAX_PUBLISH_BATCH
    }
}

impl Connection {
    /// Reads and handles the client's messages until the connection ends; says how it ended.
    pub(super) async fn read_loop(
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
                let stop = Box::pin(self.on_messages(batch, raw_channel, heard)).await;
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
                return ReadEnd::Gone;
            }
            end = match read_available(stream, self.shared.read_buffer, &mut reader, &mut incoming) {
                Ok(true) => {
                    heard.now();
                    None
                }
                Ok(false) => Some(ReadEnd::Gone),
                Err(e) => Some(self.frame_error(e)),
            };
        }
    }

    /// Handles a batch of client messages (what one read brought) in order; `Some` ends the
    /// read loop. A run of publishes to one channel goes to the bus in one call (one Redis round
    /// trip), so back-to-back messages do not each wait for the previous one's answer: under
    /// load that answer can wait behind a whole fan-out round.
    async fn on_messages(&mut self, batch: Vec<Incoming>, raw_channel: Option<&str>, heard: &Heard) -> Option<ReadEnd> {
        let mut run = PublishRun::default();
        for msg in batch {
            if matches!(msg, Incoming::Text(_) | Incoming::Binary(_))
                && let Some(channel) = raw_channel
                && let Err(denied) = self.authorize(Access::Publish, channel)
            {
                // What came before this frame was allowed (the token expired in between): it goes
                // out first.
                debug!(conn = self.id, %channel, %denied, "raw-mode publish refused; closing");
                let end = self.publish_run(&mut run, raw_channel).await;
                return Some(ReadEnd::Close(end.unwrap_or(match denied {
                    Denied::Expired => CloseReason::TokenExpired,
                    Denied::NotGranted { .. } => CloseReason::PublishForbidden,
                })));
            }
            if matches!(msg, Incoming::Text(_) | Incoming::Binary(_))
                && let Some(channel) = raw_channel
                && !self.may_publish()
            {
                // Raw mode has no error frame, and a message must not vanish silently: what came
                // before goes out, then the connection ends with 1008.
                debug!(conn = self.id, %channel, "raw-mode publish over --publish-rate; closing");
                self.shared.metrics.protocol_error(ErrorCode::RateLimited.as_str());
                let end = self.publish_run(&mut run, raw_channel).await;
                return Some(ReadEnd::Close(end.unwrap_or(CloseReason::RateLimited)));
            }
            match msg {
                Incoming::Ping(data) => self.push(frame::pong(&data)),
                Incoming::Pong => {}
                Incoming::Close(code) => {
                    let end = self.publish_run(&mut run, raw_channel).await;
                    return Some(ReadEnd::Close(end.unwrap_or(CloseReason::PeerClosed(code))));
                }
                Incoming::Text(text) => {
                    self.count_in(text.len());
                    match raw_channel {
                        Some(channel) => run.add(channel, Payload::Text(text.into()), None),
                        None => self.on_protocol_text(text.as_str(), &mut run, heard).await,
                    }
                }
                Incoming::Binary(bytes) => {
                    self.count_in(bytes.len());
                    match raw_channel {
                        Some(channel) => run.add(channel, Payload::Binary(bytes), None),
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
                return Some(ReadEnd::Close(end));
            }
        }
        self.publish_run(&mut run, raw_channel).await.map(ReadEnd::Close)
    }

    fn count_in(&self, len: usize) {
        self.shared.metrics.messages_in.inc();
        self.shared.metrics.bytes_in.inc_by(len as u64);
    }

    /// A protocol-mode text frame. A publish to the run's channel joins the run; anything else
    /// (a publish elsewhere included, or a refused one) first waits for the run to go out, so
    /// replies and effects keep the client's order.
    async fn on_protocol_text(&mut self, text: &str, run: &mut PublishRun, heard: &Heard) {
        let op = protocol::parse_client_frame(text).and_then(|op| {
            let (access, channel) = match &op {
                ClientOp::Subscribe { channel, .. } => (Access::Subscribe, *channel),
                ClientOp::Publish { channel, .. } => (Access::Publish, *channel),
                ClientOp::Unsubscribe { .. } | ClientOp::Refresh { .. } => return Ok(op),
            };
            self.authorize(access, channel)
                .map_err(|denied| ProtocolError::new(ErrorCode::Forbidden, denied.to_string()).on_channel(channel))?;
            Ok(op)
        });
        let op = op.and_then(|op| match op {
            ClientOp::Publish { channel, id, .. } if !self.may_publish() => {
                let rate = self.shared.publish_rate;
                Err(ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "not published to {channel:?}: this connection publishes faster than --publish-rate ({}/s, \
                         bursts of {}); slow down",
                        rate.per_second, rate.burst
                    ),
                )
                .on_channel(channel)
                .for_id(id))
            }
            op => Ok(op),
        });
        if !matches!(&op, Ok(ClientOp::Publish { channel, .. }) if run.channel == *channel) {
            self.publish_run(run, None).await;
        }
        match op {
            Ok(ClientOp::Publish { channel, data, id }) => {
                run.add(channel, Payload::Json(Bytes::copy_from_slice(data.as_bytes())), id);
            }
            Ok(ClientOp::Subscribe { channel, since }) => self.subscribe(channel, since).await,
            Ok(ClientOp::Unsubscribe { channel }) => self.unsubscribe(channel),
            Ok(ClientOp::Refresh { token }) => self.refresh(token, heard),
            Err(e) => self.reply_error(&e),
        }
    }

    /// Takes a token from the publish bucket; false (counted) when it is empty.
    fn may_publish(&mut self) -> bool {
        self.take_token(Limited::Publish)
    }

    /// Takes a token from the new-channel bucket; false (counted) when it is empty.
    fn may_subscribe(&mut self) -> bool {
        self.take_token(Limited::Subscribe)
    }

    fn take_token(&mut self, what: Limited) -> bool {
        let (rate, label) = match what {
            Limited::Publish => (self.shared.publish_rate, "publish_rate"),
            Limited::Subscribe => (self.shared.subscribe_rate, "subscribe_rate"),
        };
        let taken = rate.per_second == 0 || {
            let buckets = self.buckets();
            let bucket = match what {
                Limited::Publish => &mut buckets.publish,
                Limited::Subscribe => &mut buckets.subscribe,
            };
            bucket.take(rate, Instant::now())
        };
        if !taken {
            self.shared.metrics.limit_refused(label);
        }
        taken
    }

    /// The connection's buckets, full when first needed.
    fn buckets(&mut self) -> &mut Buckets {
        let (publish, subscribe) = (self.shared.publish_rate, self.shared.subscribe_rate);
        self.buckets.get_or_insert_with(|| {
            let now = Instant::now();
            Box::new(Buckets { publish: TokenBucket::full(publish, now), subscribe: TokenBucket::full(subscribe, now) })
        })
    }

    /// Whether the connection's token allows `access` to `channel` now (always, without
    /// `--jwt-secret`).
    fn authorize(&self, access: Access, channel: &str) -> Result<(), Denied> {
        match &self.grant {
            Some(grant) => grant.check(access, channel, SystemTime::now()),
            None => Ok(()),
        }
    }

    /// Replaces the connection's token with a fresh one checked by the same rules as at the
    /// upgrade, for the same subject (`sub`). Taken: the `refreshed` reply, the new expiry, and
    /// the end of every subscription the new token no longer allows (`unsubscribed` with
    /// `"reason":"forbidden"`). Refused: an `invalid_token` error, and the old token stays.
    fn refresh(&mut self, token: &str, heard: &Heard) {
        let refused = |why: String| ProtocolError::new(ErrorCode::InvalidToken, why);
        let (Some(auth), Some(old)) = (self.shared.auth.as_ref(), self.grant.as_ref()) else {
            return self.reply_error(&refused("this server checks no tokens (it runs without --jwt-secret)".into()));
        };
        let grant = match auth.verify(token, SystemTime::now()) {
            Ok(grant) if grant.subject() == old.subject() => grant,
            Ok(_) => return self.reply_error(&refused("not refreshed: the token is for another `sub`".into())),
            Err(why) => return self.reply_error(&refused(format!("not refreshed: {why}"))),
        };
        debug!(conn = self.id, exp = grant.expires(), "token refreshed");
        heard.move_token_exp(grant.expires());
        self.reply(protocol::refreshed_frame(grant.expires()));
        let revoked: Vec<String> =
            self.subscriptions.iter().filter(|c| !grant.allows(Access::Subscribe, c)).cloned().collect();
        for channel in revoked {
            self.leave(&channel, protocol::revoked_frame(&channel));
        }
        self.grant = Some(Box::new(grant));
    }

    /// Publishes the run gathered so far and empties it. In protocol mode, each message that
    /// carried an `id` is acknowledged (`published`). A failed run: in raw mode, which has no
    /// error frame, the connection ends with 1013 (the returned close) rather than losing
    /// messages silently; in protocol mode each of its messages gets an error frame (with its
    /// `id`): `bus_unavailable` when it was certainly not published, `outcome_unknown` when it
    /// may have been.
    async fn publish_run(&self, run: &mut PublishRun, raw_channel: Option<&str>) -> Option<CloseReason> {
        if run.messages.is_empty() {
            return None;
        }
        let messages = std::mem::take(&mut run.messages);
        let count = messages.len();
        let ids: Vec<Option<Box<str>>> = messages.iter().map(|m| m.id.clone()).collect();
        // Boxed by the bus: a publish's state (a Redis script call) is no part of every idle
        // connection's task.
        let e = match self.shared.bus.publish(&run.channel, messages).await {
            Ok(published) => {
                for (id, placed) in ids.iter().zip(&published.placed) {
                    if placed.duplicate {
                        self.shared.metrics.publish_retries_deduplicated.inc();
                    }
                    if let Some(id) = id {
                        self.reply(protocol::published_frame(&run.channel, id, &published.epoch, *placed));
                    }
                }
                return None;
            }
            Err(e) => e,
        };
        self.shared.metrics.publish_failures.inc_by(count as u64);
        debug!(conn = self.id, channel = %run.channel, messages = count, error = %e, "publish failed");
        if raw_channel.is_some() {
            return Some(CloseReason::BusUnavailable);
        }
        let error = match &e {
            BusError::OutcomeUnknown(_) => {
                self.shared.metrics.publish_outcomes_unknown.inc_by(count as u64);
                ProtocolError::new(
                    ErrorCode::OutcomeUnknown,
                    format!("{e}; it may have been published: retry with the same id"),
                )
            }
            _ => ProtocolError::new(ErrorCode::BusUnavailable, format!("not published: {e}")),
        }
        .on_channel(&run.channel);
        for id in &ids {
            self.reply_error(&error.clone().for_id(id.as_deref()));
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
        ReadEnd::Close(reason)
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
        if !self.may_subscribe() {
            let rate = self.shared.subscribe_rate;
            return self.reply_error(
                &ProtocolError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "not subscribed to {channel:?}: this connection subscribes to new channels faster than \
                         --subscribe-rate ({}/s, bursts of {}); slow down",
                        rate.per_second, rate.burst
                    ),
                )
                .on_channel(channel),
            );
        }
        // Recorded before the join, so the connection's cleanup covers a join cut short (the
        // connection closing while the bus is slow to confirm).
        self.subscriptions.insert(channel.to_owned());
        if let Err(e) = Box::pin(self.join(channel, Mode::Protocol, since.as_ref())).await {
            self.subscriptions.remove(channel);
            self.reply_error(&e.protocol_error(channel));
        }
    }

    fn unsubscribe(&mut self, channel: &str) {
        if self.subscriptions.contains(channel) {
            self.leave(channel, protocol::unsubscribed_frame(channel));
        } else {
            self.reply_error(&ProtocolError::new(ErrorCode::NotSubscribed, format!("not subscribed to {channel:?}")));
        }
    }

    /// Ends this connection's subscription to `channel` and tells the client with `frame`.
    fn leave(&mut self, channel: &str, frame: String) {
        self.subscriptions.remove(channel);
        self.shared.bus.hub().unsubscribe(channel, self.id);
        self.reply(frame);
    }

    /// Subscribes to `channel` with no gap and no duplicate at the seam: the hub holds live
    /// messages while the channel's position (and, with `since`, what was missed) is read, then
    /// queues the `subscribed` reply (protocol mode), the replay and the held messages in order.
    /// All of it within `--subscribe-timeout`; cut short, it leaves nothing in the hub.
    pub(super) async fn join(&self, channel: &str, mode: Mode, since: Option<&Since>) -> Result<(), JoinError> {
        let limit = self.shared.subscribe_timeout;
        let r = match tokio::time::timeout(limit, self.join_in_turn(channel, mode, since)).await {
            Ok(r) => r,
            Err(_) => {
                self.shared.bus.hub().unsubscribe(channel, self.id);
                Err(JoinError::TimedOut(limit))
            }
        };
        match &r {
            Ok(()) => {}
            Err(JoinError::ChannelLimit(_)) => self.shared.metrics.limit_refused("max_channels"),
            Err(e) => {
                if matches!(e, JoinError::TimedOut(_)) {
                    self.shared.metrics.limit_refused("subscribe_timeout");
                }
                self.shared.metrics.subscribe_failures.inc();
            }
        }
        if let Err(e) = &r {
            debug!(conn = self.id, %channel, error = %e, "subscribe failed");
        }
        r
    }

    async fn join_in_turn(&self, channel: &str, mode: Mode, since: Option<&Since>) -> Result<(), JoinError> {
        // A bounded number of joins run at once: under a connection storm the rest wait their
        // turn here, before their Redis deadline starts, rather than all time out together.
        let _turn = self.shared.joins.acquire().await.map_err(|_| BusError::ShuttingDown)?;
        self.join_now(channel, mode, since).await
    }

    async fn join_now(&self, channel: &str, mode: Mode, since: Option<&Since>) -> Result<(), JoinError> {
        let hub = self.shared.bus.hub();
        hub.subscribe(channel, self.id, self.outbox.clone(), mode, true).await?;
        let mut replay = match self.shared.bus.read(channel, since).await {
            Ok(replay) => replay,
            Err(e) => {
                hub.unsubscribe(channel, self.id);
                return Err(e.into());
            }
        };
        // Rendered here, outside the channel's lock; a replay too large for the client's budget
        // turns into `history_gap` before the reply is written.
        let frames = hub.render_replay(channel, mode, &mut replay);
        let first =
            (mode == Mode::Protocol).then(|| frame::text(protocol::subscribed_frame(channel, &replay).as_bytes()));
        hub.open_gate(channel, self.id, first, frames, (replay.epoch.clone(), replay.head));
        Ok(())
    }

    fn reply(&self, text: String) {
        self.push(frame::text(text.as_bytes()));
    }

    /// Queues a reply; a full outbox closes the client (and counts it).
    fn push(&self, frame: Frame) {
        self.outbox.push(frame);
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

/// The two per-connection rates ([`TokenBucket`]s).
#[derive(Clone, Copy)]
enum Limited {
    Publish,
    Subscribe,
}
