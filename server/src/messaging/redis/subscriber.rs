//! The subscribing side of the Redis bus: one pub/sub connection per server, subscribed to a
//! channel while the hub has local subscribers for it (the hub asks through a bounded command
//! queue). Every server receives a channel's messages in the order Redis executed the PUBLISH
//! commands, so all subscribers fleet-wide see one order.
//!
//! The task reconnects with capped exponential backoff, resubscribes every channel the hub still
//! has, and pings to find half-open connections. It keeps [`BusHealth`] up only while it is
//! connected; when it loses the bus it says whose outage that is (readiness takes the server out
//! of its Service only for its own): a connect that fails tells by its error, and a session lost
//! after connecting is followed by one PING on a fresh connection — answered means Redis is fine
//! and this server's link broke. A PING counts only the time this process could run, so a server
//! starved of CPU (or stopped) does not take a late answer for a dead bus. After a reconnect it
//! refills, from history, every message its channels missed while it was away, before it reads
//! any live one (the hub drops what it already delivered), so a Redis blip within the history
//! window loses nothing. Refills run `REFILL_CONCURRENCY` channels at a time; a channel whose
//! refill Redis refuses is announced as a gap and the others go on. What history no longer
//! holds is announced to the channel's subscribers as a `gap` frame ([`Hub::announce_gap`]),
//! after the rest of it is delivered from what history still has.
//!
//! Live messages reach the session through a [`Backlog`] bounded in bytes (`--bus-buffer`), not
//! the redis crate's own unbounded queue: a pump task empties that queue as messages arrive.
//! When delivery falls further behind than the budget, the session ends (`SessionEnd::Behind`),
//! counted and logged, and the next one refills from history; the bus is not marked down for
//! it, and readiness says the bus lags.
//!
//! Every message is admitted by the hub ([`crate::messaging::admission`] has the rule) before it
//! counts: one that does not parse, or whose position cannot be right, is dropped, counted in
//! `wsfleet_bus_envelopes_refused_total{reason}` and logged at most once per
//! [`REFUSAL_LOG_EVERY`] (with the count since the last line); the one read that may vouch for a
//! message ahead of what is known is made here, in line, so order is kept.
//!
//! A Redis that refuses this server's credentials ends the session like any failure, but is
//! logged as an error with Redis's reply code (again every [`AUTH_LOG_EVERY`] while it lasts),
//! marked in [`BusHealth`] (readiness shows it) and counted in `wsfleet_bus_auth_failures_total`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::PubSubSink;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::backlog::{Backlog, End, Reported, pump};
use super::scripts::{CommandError, RedisHistory};
use super::{BACKOFF_MAX, COMMAND_TIMEOUT, CONNECT_TIMEOUT, refused_credentials};
use crate::messaging::admission::{CheckBudget, Refusal};
use crate::messaging::bus::{BusHealth, BusState, Outage};
use crate::messaging::envelope::Sequenced;
use crate::messaging::history::{Lost, Replay, Since};
use crate::messaging::hub::{Admission, BusCommand, Hub};
use crate::metrics::Metrics;

const PING_EVERY: Duration = Duration::from_secs(5);
/// A subscription connection whose PING is unanswered this long is taken as dead. Generous: a
/// busy server (or machine) must not drop a healthy bus — a reconnect costs a resubscribe and a
/// refill, the last thing an overloaded fleet needs (5 s was too short for a million
/// connections on two cores).
const PING_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// How long the fresh connection that tells a broken link from a bus outage may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels per SUBSCRIBE command when resubscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 256;
/// Channels refilled from history at once after a reconnect.
const REFILL_CONCURRENCY: usize = 16;
/// While Redis keeps refusing this server's credentials, the error is repeated this often.
pub const AUTH_LOG_EVERY: Duration = Duration::from_secs(60);
/// Refused bus messages are logged at most this often (a flood must not flood the log).
pub const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) struct Subscriber {
    pub(super) client: redis::Client,
    pub(super) history: RedisHistory,
    pub(super) hub: Arc<Hub>,
    pub(super) commands: mpsc::Receiver<BusCommand>,
    pub(super) health: Arc<BusHealth>,
    pub(super) metrics: Arc<Metrics>,
    /// Refusals not yet logged, and when the last log line about them was written.
    pub(super) refusals: RefusalLog,
    /// Reads left this second to check messages that are not believable as they stand.
    pub(super) checks: CheckBudget,
    /// Most bytes received and not yet delivered ([`Backlog`]).
    pub(super) bus_buffer: usize,
}

#[derive(Default)]
pub(super) struct RefusalLog {
    unlogged: u64,
    logged_at: Option<Instant>,
}

/// Why a subscription session ended.
enum SessionEnd {
    Shutdown,
    Lost(Down),
    /// Delivery fell more than `--bus-buffer` behind: the session was dropped to catch up from
    /// history. The bus itself is fine.
    Behind,
}

/// A lost session: what failed, Redis's reply code when it refused the credentials, and whose
/// outage it is when that is already known (else a fresh connection will tell).
struct Down {
    why: String,
    refused: Option<&'static str>,
    outage: Option<Outage>,
}

impl Down {
    fn new(what: &str, e: &redis::RedisError) -> Down {
        let refused = refused_credentials(e);
        Down { why: format!("{what}: {e}"), refused, outage: refused.map(|_| Outage::Link) }
    }
    /// A connect that failed: its error says whose outage it is.
    fn connect(e: &redis::RedisError) -> Down {
        Down { outage: Some(outage_of(e)), ..Down::new("connect failed", e) }
    }
    fn command(what: &str, e: &CommandError) -> Down {
        match e {
            CommandError::Redis(e) => Down::new(what, e),
            e => Down::from(format!("{what}: {e}")),
        }
    }
}

impl From<String> for Down {
    fn from(why: String) -> Down {
        Down { why, refused: None, outage: None }
    }
}

impl Subscriber {
    pub(super) async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut sessions = 0u64;
        // The refusal last logged as an error, and when: repeats go to debug for a while.
        let mut refusal_logged: Option<(&'static str, Instant)> = None;
        loop {
            let connect = tokio::time::timeout(CONNECT_TIMEOUT, self.client.get_async_pubsub());
            let end = tokio::select! {
                _ = shutdown.cancelled() => SessionEnd::Shutdown,
                conn = connect => match conn {
                    Ok(Ok(pubsub)) => {
                        sessions += 1;
                        if sessions > 1 {
                            self.metrics.bus_reconnects.inc();
                        }
                        self.session(pubsub, &shutdown, &mut backoff).await
                    }
                    Ok(Err(e)) => SessionEnd::Lost(Down::connect(&e)),
                    Err(_) => SessionEnd::Lost(Down {
                        outage: Some(Outage::Fleet),
                        ..Down::from("connect timed out".to_owned())
                    }),
                },
            };
            let down = match end {
                SessionEnd::Shutdown => {
                    if sessions > 0 {
                        self.set(BusState::Down(Outage::Fleet));
                    }
                    return;
                }
                SessionEnd::Behind => {
                    // Nothing is wrong with the bus: reconnect at once (after the shortest pause,
                    // so a flood that outruns this server cannot spin it) and refill.
                    self.metrics.bus_overflows.inc();
                    self.health.lag.set_resyncing(true);
                    warn!(
                        budget = self.bus_buffer,
                        "delivery fell behind the bus by more than --bus-buffer bytes; resubscribing to catch up from history"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(BACKOFF_MIN) => {}
                    }
                    continue;
                }
                SessionEnd::Lost(down) => down,
            };
            if self.health.is_up() {
                // A refusal after a working session is news again.
                refusal_logged = None;
                // Down at once (nothing is delivered meanwhile); whose outage it is comes next.
                self.set(BusState::Down(Outage::Fleet));
            }
            let outage = match down.outage {
                Some(outage) => outage,
                None => self.probe().await,
            };
            // A server whose bus never connected stays `Connecting`: nothing proves it works.
            if sessions > 0 {
                self.set(BusState::Down(outage));
            }
            let Down { why, refused, .. } = down;
            match refused {
                Some(code) => {
                    self.health.set_refused(Some(code));
                    self.metrics.bus_auth_failures.get_or_create(&crate::metrics::CodeLabel { code }).inc();
                    let now = Instant::now();
                    if refusal_logged.is_none_or(|(c, at)| c != code || now.duration_since(at) >= AUTH_LOG_EVERY) {
                        refusal_logged = Some((code, now));
                        error!(
                            code,
                            %why,
                            retry_in = ?backoff,
                            "redis refused this server's credentials (check --redis-password and --redis-username)"
                        );
                    } else {
                        debug!(code, %why, retry_in = ?backoff, "redis still refuses this server's credentials");
                    }
                }
                None => {
                    self.health.set_refused(None);
                    let outage = match outage {
                        Outage::Fleet => "the bus answers nobody",
                        Outage::Link => "this server's link (the bus answers a fresh connection)",
                    };
                    warn!(%why, outage, retry_in = ?backoff, "redis bus down");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(
        &mut self,
        pubsub: redis::aio::PubSub,
        shutdown: &CancellationToken,
        backoff: &mut Duration,
    ) -> SessionEnd {
        let (mut sink, stream) = pubsub.split();
        // From here on, what Redis sends waits in a backlog bounded in bytes, not in the redis
        // crate's unbounded queue; the pump stops with the session.
        let lag = Arc::new(Reported { health: self.health.clone(), metrics: self.metrics.clone() });
        let backlog = Arc::new(Backlog::new(self.bus_buffer, lag));
        let _pump = AbortOnDrop(tokio::spawn(pump(stream, backlog.clone())));
        // Resubscribe everything the hub has now; commands queued meanwhile are replayed after
        // (a duplicate SUBSCRIBE is harmless, and order keeps unsubscribe-then-subscribe right).
        let channels = self.hub.channels();
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|(c, _)| self.history.keys().pubsub(c)).collect();
            if let Err(e) = with_timeout(sink.subscribe(keys)).await {
                return SessionEnd::Lost(e.context("resubscribe failed"));
            }
            for (channel, generation) in chunk {
                self.hub.confirm(channel, *generation);
            }
        }
        // Refill what the channels missed while this server was away, before any live message:
        // live ones published meanwhile wait in the backlog, and the hub drops what it already
        // has. [`REFILL_CONCURRENCY`] channels at a time; a channel whose refill Redis refuses
        // is announced as a gap and the others go on, while a Redis that stops answering ends
        // the session.
        if let Err(down) = self.refill_all(&channels).await {
            return SessionEnd::Lost(down);
        }
        // Ready only when publishing works too.
        if let Err(e) = self.history.ping().await {
            return SessionEnd::Lost(Down::command("publishing connection", &e));
        }
        self.set(BusState::Up);
        self.health.lag.set_resyncing(false);
        *backoff = BACKOFF_MIN;
        info!(channels = channels.len(), "redis bus connected");
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Subscribe/unsubscribe and the liveness ping come before messages, so a message
                // flood cannot starve them (subscribes would time out).
                biased;
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => if let Err(e) = self.on_command(&mut sink, cmd).await {
                        return SessionEnd::Lost(e.context("subscribing"));
                    },
                    None => return SessionEnd::Shutdown,
                },
                _ = ping.tick() => if let Err(end) = self.ping(&mut sink).await {
                    return end;
                },
                msg = backlog.next() => match msg {
                    Ok(msg) => self.on_message(&msg).await,
                    Err(End::Closed) => return SessionEnd::Lost("connection closed".to_owned().into()),
                    Err(End::Overflow) => return SessionEnd::Behind,
                },
            }
        }
    }

    /// Pings on the subscription. Unanswered for [`PING_TIMEOUT`] (of time this process ran),
    /// it asks a fresh connection whether Redis answers anyone, listening for its own answer
    /// meanwhile: a Redis that was paused answers both at once when it resumes, and that is no
    /// broken link.
    async fn ping(&self, sink: &mut PubSubSink) -> Result<(), SessionEnd> {
        let failed = |e: redis::RedisError| SessionEnd::Lost(Down::new("ping failed", &e));
        let pong = sink.ping::<redis::Value>();
        tokio::pin!(pong);
        let unanswered = match timeout_awake(PING_TIMEOUT, &mut pong).await {
            Ok(answer) => return answer.map(drop).map_err(failed),
            Err(()) => format!("ping unanswered for {PING_TIMEOUT:?}"),
        };
        let outage = tokio::select! {
            answer = &mut pong => return answer.map(drop).map_err(failed),
            outage = self.probe() => outage,
        };
        if outage == Outage::Link
            && let Ok(answer) = tokio::time::timeout(PROBE_TIMEOUT, &mut pong).await
        {
            return answer.map(drop).map_err(failed);
        }
        Err(SessionEnd::Lost(Down { outage: Some(outage), ..Down::from(unanswered) }))
    }

    async fn on_command(&self, sink: &mut PubSubSink, cmd: BusCommand) -> Result<(), Failed> {
        match cmd {
            BusCommand::Subscribe { channel, generation } => {
                with_timeout(sink.subscribe(self.history.keys().pubsub(&channel))).await?;
                debug!(%channel, "subscribed on the bus");
                self.hub.confirm(&channel, generation);
            }
            BusCommand::Unsubscribe { channel } => {
                with_timeout(sink.unsubscribe(self.history.keys().pubsub(&channel))).await?;
                debug!(%channel, "unsubscribed on the bus");
            }
        }
        Ok(())
    }

    /// Refills every channel of `channels`, a bounded number at a time (see [`Subscriber::session`]).
    async fn refill_all(&self, channels: &[(Arc<str>, u64)]) -> Result<(), Down> {
        let names: Vec<Arc<str>> = channels.iter().map(|(channel, _)| channel.clone()).collect();
        let mut refills = futures_util::stream::iter(names)
            .map(|channel| self.refill_named(channel))
            .buffer_unordered(REFILL_CONCURRENCY);
        while let Some((channel, result)) = refills.next().await {
            let Err(e) = result else { continue };
            if !refused_for_this_channel(&e) {
                return Err(Down::command(&format!("refilling {channel} failed"), &e));
            }
            // Redis answers, but not for this channel (its keys hold something else, a script
            // error): what it missed cannot be refilled, and its subscribers are told.
            self.metrics.bus_gaps_lost.inc();
            warn!(%channel, error = %e, "could not refill the channel; its subscribers are told of the gap");
            if let Some((epoch, offset)) = self.hub.cursor(&channel) {
                self.announce(&channel, &epoch, offset + 1, None, Lost::HistoryGap);
            }
        }
        Ok(())
    }

    /// [`Subscriber::refill`], and which channel it was (a named future: a closure's borrow
    /// would not be `Send` for every lifetime).
    async fn refill_named(&self, channel: Arc<str>) -> (Arc<str>, Result<(), CommandError>) {
        let result = self.refill(&channel).await;
        (channel, result)
    }

    /// Tells the channel's subscribers that offsets `from` to `to` of `epoch` will not reach them.
    fn announce(&self, channel: &str, epoch: &str, from: u64, to: Option<u64>, lost: Lost) {
        let told = self.hub.announce_gap(channel, (Arc::from(epoch), from), to, lost);
        self.metrics.bus_gap_notices.inc_by(told as u64);
    }

    async fn refill(&self, channel: &str) -> Result<(), CommandError> {
        let Some((epoch, offset)) = self.hub.cursor(channel) else { return Ok(()) };
        let replay = self.history.read_page(channel, &Since { epoch: epoch.to_string(), offset }).await?;
        self.hub.learn_head(channel, &(replay.epoch.clone(), replay.head));
        match replay.recovery {
            Some(Ok(())) => {
                let refilled = self.deliver_pages(channel, replay).await?;
                if refilled > 0 {
                    info!(%channel, messages = refilled, "refilled a gap from history");
                }
            }
            Some(Err(Lost::EpochChanged)) => {
                // Redis lost the old sequence; deliver the new one from its start, so nothing
                // published after the loss is missed either.
                self.metrics.bus_gaps_lost.inc();
                warn!(%channel, epoch = %replay.epoch, "the channel's history was lost; continuing with its new epoch");
                self.announce(channel, &epoch, offset + 1, None, Lost::EpochChanged);
                self.deliver_from_start(channel, &replay.epoch).await?;
            }
            Some(Err(Lost::OffsetAhead)) => {
                // Redis is behind what this server delivered in the same epoch: its state went
                // back (a restore, a failover to a replica that lagged), and it would hand out
                // offsets already delivered, which every hub would drop as duplicates. The epoch
                // ends (in Redis, only if it is still this one and still behind), so clients are
                // told of the loss instead of missing the next messages silently.
                self.metrics.bus_gaps_lost.inc();
                let ended = self.history.end_rewound_epoch(channel, &epoch, offset).await?;
                let now = self.history.read(channel, None).await?;
                warn!(
                    %channel, %epoch, delivered = offset, head = replay.head, ended, new_epoch = %now.epoch,
                    "Redis went back in the channel's order; continuing with a new epoch"
                );
                // Redis handed out offsets after its head again; this server dropped those as
                // delivered already.
                self.announce(channel, &epoch, replay.head + 1, None, Lost::OffsetAhead);
                self.deliver_from_start(channel, &now.epoch).await?;
            }
            Some(Err(lost)) => {
                // Older than history reaches (or than one refill may replay): deliver the part
                // history still holds, and announce the rest.
                self.metrics.bus_gaps_lost.inc();
                let tail = self.history.config().size.min(replay.head - offset);
                let mut lost_to = replay.head;
                let mut kept = None;
                if tail > 0 {
                    let since = Since { epoch: epoch.to_string(), offset: replay.head - tail };
                    let tail = self.history.read_page(channel, &since).await?;
                    if tail.recovered() {
                        lost_to = since.offset;
                        kept = Some(tail);
                    }
                }
                // The announcement first, so it comes before the messages after the gap.
                if lost_to > offset {
                    self.announce(channel, &epoch, offset + 1, Some(lost_to), lost);
                }
                if let Some(kept) = kept {
                    self.deliver_pages(channel, kept).await?;
                }
                warn!(
                    %channel, reason = lost.as_str(), from = offset + 1, to = lost_to,
                    "messages missed during the outage are no longer in history; subscribers are told"
                );
            }
            None => {}
        }
        Ok(())
    }

    /// Delivers `first` (a page of history, [`RedisHistory::read_page`]) and the pages after it
    /// up to the head it reported; returns how many messages that was. A page that no longer
    /// follows on (history trimmed meanwhile, or a new epoch) stops it: what it did not deliver
    /// up to that head is announced as a gap, and live messages go on from the head.
    async fn deliver_pages(&self, channel: &str, first: Replay) -> Result<u64, CommandError> {
        let mut page = first;
        let mut delivered = 0u64;
        // Each page moves on by at least one message, up to a head fixed by the first read.
        let (epoch, head) = (page.epoch.clone(), page.head);
        while let Some(last) = page.entries.last().map(|m| m.offset) {
            for msg in &page.entries {
                self.hub.deliver(channel, msg);
            }
            delivered += page.entries.len() as u64;
            if last >= head {
                break;
            }
            page = self.history.read_page(channel, &Since { epoch: epoch.to_string(), offset: last }).await?;
            self.hub.learn_head(channel, &(page.epoch.clone(), page.head));
            if !page.recovered() {
                self.metrics.bus_gaps_lost.inc();
                self.announce(channel, &epoch, last + 1, Some(head), Lost::HistoryGap);
                warn!(%channel, from = last + 1, to = head, "history moved on during a refill; subscribers are told");
                break;
            }
        }
        self.metrics.bus_refilled.inc_by(delivered);
        Ok(delivered)
    }

    /// Delivers the channel's epoch `epoch` from its first message (after the old one ended).
    async fn deliver_from_start(&self, channel: &str, epoch: &str) -> Result<(), CommandError> {
        let fresh = Since { epoch: epoch.to_owned(), offset: 0 };
        let replay = self.history.read_page(channel, &fresh).await?;
        self.hub.learn_head(channel, &(replay.epoch.clone(), replay.head));
        if replay.recovered() {
            self.deliver_pages(channel, replay).await?;
        }
        Ok(())
    }

    /// Admits one pub/sub message to the hub; reads the channel's position first when the hub
    /// asks for a check.
    async fn on_message(&mut self, msg: &redis::Msg) {
        self.metrics.bus_messages.inc();
        let Some(channel) = self.history.keys().channel_of(msg.get_channel_name()) else { return };
        let msg = match Sequenced::decode(Bytes::copy_from_slice(msg.get_payload_bytes())) {
            Ok(msg) => msg,
            Err(e) => return self.refused(channel, Refusal::Undecodable, &e.to_string()),
        };
        let now = Instant::now();
        let mut admission = self.hub.admit(channel, &msg, self.checks.available(now), now);
        if admission == Admission::Check {
            self.checks.spend();
            match self.history.read(channel, None).await {
                Ok(now) => self.hub.learn_head(channel, &(now.epoch, now.head)),
                Err(e) => debug!(%channel, error = %e, "could not read the channel's position to check a message"),
            }
            admission = self.hub.admit(channel, &msg, false, Instant::now());
        }
        if let Admission::Refused(reason) = admission {
            let at = format!("offset {} of epoch {}", msg.offset, msg.epoch);
            self.refused(channel, reason, &at);
        }
    }

    /// Counts a refused message, and logs it unless a line was written lately.
    fn refused(&mut self, channel: &str, reason: Refusal, what: &str) {
        self.metrics.bus_refused(reason.as_str());
        debug!(%channel, reason = reason.as_str(), what, "refused a bus message");
        let log = &mut self.refusals;
        log.unlogged += 1;
        let now = Instant::now();
        if log.logged_at.is_none_or(|at| now.saturating_duration_since(at) >= REFUSAL_LOG_EVERY) {
            warn!(
                %channel,
                reason = reason.as_str(),
                what,
                refused = log.unlogged,
                "refused bus messages that cannot be right (forged or corrupt); the channel keeps delivering"
            );
            log.unlogged = 0;
            log.logged_at = Some(now);
        }
    }

    fn set(&self, state: BusState) {
        self.health.set(state, &self.metrics);
    }

    /// Whether Redis answers a fresh connection now: the evidence that tells this server's
    /// broken link from an outage of the whole fleet, got without the link itself.
    async fn probe(&self) -> Outage {
        let fresh = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await
        };
        match tokio::time::timeout(PROBE_TIMEOUT, fresh).await {
            Ok(Ok(())) => Outage::Link,
            Ok(Err(e)) => outage_of(&e),
            Err(_) => Outage::Fleet,
        }
    }
}

/// Whose outage a failed connect or command is: refused credentials are this server's (the
/// others may hold the right ones); anything else (refused, reset, timed out, loading, paused)
/// is the bus's.
fn outage_of(e: &redis::RedisError) -> Outage {
    if refused_credentials(e).is_some() { Outage::Link } else { Outage::Fleet }
}

/// Like [`tokio::time::timeout`], but only time in which this process ran counts: the wait is
/// measured in one-second slices, and a slice whose timer fired late by more than a second (the
/// process was stopped or starved of CPU) does not count. An answer that sat in the socket while
/// the server could not read it is not a dead bus.
async fn timeout_awake<F: Future>(limit: Duration, f: F) -> Result<F::Output, ()> {
    const SLICE: Duration = Duration::from_secs(1);
    tokio::pin!(f);
    let mut counted = Duration::ZERO;
    loop {
        let started = tokio::time::Instant::now();
        match tokio::time::timeout(SLICE, &mut f).await {
            Ok(out) => return Ok(out),
            Err(_) => {
                let took = started.elapsed();
                if took < SLICE * 2 {
                    counted += took;
                }
                if counted >= limit {
                    return Err(());
                }
            }
        }
    }
}

/// Whether Redis answered but refused this one channel's command (its keys hold something
/// else, a script error), rather than failing to answer at all.
fn refused_for_this_channel(e: &CommandError) -> bool {
    match e {
        CommandError::Reply(_) => true,
        CommandError::Redis(e) => matches!(e.code(), Some("ERR" | "WRONGTYPE")),
        CommandError::Timeout => false,
    }
}

/// Aborts a task when dropped: the pump ends with the session that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A pub/sub command that failed: the Redis error, or none when it timed out.
struct Failed(Option<redis::RedisError>);

impl Failed {
    fn context(self, what: &str) -> Down {
        match self.0 {
            Some(e) => Down::new(what, &e),
            None => format!("{what}: timed out").into(),
        }
    }
}

async fn with_timeout<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, Failed> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failed(Some(e))),
        Err(_) => Err(Failed(None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_while_the_process_could_not_run_is_not_counted() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // The whole runtime is blocked for 3 s (as if stopped), then the answer comes.
            std::thread::sleep(Duration::from_secs(3));
            tokio::time::sleep(Duration::from_millis(500)).await;
            let _ = tx.send(());
        });
        assert!(timeout_awake(Duration::from_secs(2), rx).await.is_ok(), "3 s stopped is not 2 s of waiting");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_wait_while_running_times_out_on_time() {
        let started = std::time::Instant::now();
        assert!(timeout_awake(Duration::from_secs(2), std::future::pending::<()>()).await.is_err());
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    }

    #[test]
    fn refused_credentials_are_this_servers_outage_anything_else_the_fleets() {
        let auth = redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, "invalid password"));
        assert_eq!(outage_of(&auth), Outage::Link);
        let refused = redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(outage_of(&refused), Outage::Fleet);
    }
}
