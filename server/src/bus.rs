//! The message bus that joins the servers of a fleet: Redis pub/sub, or in-process.
//!
//! Redis: one connection subscribes (a channel while it has local subscribers, see [`Hub`]) and
//! one multiplexed connection publishes for every client of this server. Every server receives
//! a channel's messages from Redis in the order Redis executed the PUBLISH commands, so all
//! subscribers fleet-wide see one order. Local publishes also go through Redis: short-cutting
//! them would let local subscribers see a different order than remote ones.
//!
//! The subscriber task reconnects with capped exponential backoff, resubscribes every channel
//! the hub still has, pings to find half-open connections, and keeps [`BusHealth`] true only
//! while it is connected (readiness reports it).
//!
//! Publishing goes through [`crate::history`]: each message gets its channel's next offset and
//! is recorded before it is published. After a reconnect the subscriber task refills, from that
//! history, every message its channels missed while it was away, before it reads any live one
//! (the hub drops what it already delivered), so a Redis blip within the history window loses
//! nothing.
//!
//! Without Redis, publishing orders, records and delivers straight into the local hub.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::envelope::{Envelope, Sequenced};
use crate::history::{HistoryConfig, HistoryError, LocalHistory, Lost, RedisHistory, Replay, Since};
use crate::hub::{BusCommand, Hub};
use crate::metrics::Metrics;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const PING_EVERY: Duration = Duration::from_secs(5);
/// A subscription connection whose PING is unanswered this long is taken as dead. Generous: a
/// busy server (or machine) must not drop a healthy bus — a reconnect costs a resubscribe and a
/// refill, the last thing an overloaded fleet needs (5 s was too short for a million
/// connections on two cores).
const PING_TIMEOUT: Duration = Duration::from_secs(15);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// Channels per SUBSCRIBE command when resubscribing after a reconnect.
const RESUBSCRIBE_CHUNK: usize = 256;
const COMMAND_QUEUE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid --redis-url: {0}")]
    InvalidUrl(#[source] redis::RedisError),
    #[error("the message bus is unavailable: {0}")]
    Unavailable(String),
}

/// Whether the bus can deliver right now.
#[derive(Debug)]
pub struct BusHealth {
    up: AtomicBool,
}

impl BusHealth {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }
}

enum Transport {
    Local(LocalHistory),
    Redis(RedisHistory),
}

/// The publishing side of the bus, shared by every connection.
pub struct Bus {
    transport: Transport,
    hub: Arc<Hub>,
    pub health: Arc<BusHealth>,
}

impl Bus {
    /// Builds the hub and the bus. With a Redis URL, the subscriber task is spawned on `tracker`
    /// and stops on `shutdown`. Fails only on an invalid URL: an unreachable Redis is retried.
    /// `hold_limit` bounds what the hub holds for one resuming subscriber.
    pub fn start(
        redis_url: Option<&str>,
        prefix: &str,
        history: HistoryConfig,
        hold_limit: usize,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Bus, BusError> {
        let Some(url) = redis_url else {
            metrics.bus_up.set(1);
            let hub = Arc::new(Hub::new(None, hold_limit, metrics));
            let health = Arc::new(BusHealth { up: AtomicBool::new(true) });
            return Ok(Bus { transport: Transport::Local(LocalHistory::new(history)), hub, health });
        };
        let client = redis::Client::open(url).map_err(BusError::InvalidUrl)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(BusError::InvalidUrl)?;
        let history = RedisHistory::new(conn, prefix, history);
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let hub = Arc::new(Hub::new(Some(tx), hold_limit, metrics.clone()));
        let health = Arc::new(BusHealth { up: AtomicBool::new(false) });
        let subscriber = Subscriber {
            client,
            history: history.clone(),
            hub: hub.clone(),
            commands: rx,
            health: health.clone(),
            metrics,
        };
        tracker.spawn(subscriber.run(shutdown));
        Ok(Bus { transport: Transport::Redis(history), hub, health })
    }

    /// The Redis connection for small commands (presence), `None` for the in-process bus.
    pub fn redis_connection(&self) -> Option<ConnectionManager> {
        match &self.transport {
            Transport::Local(_) => None,
            Transport::Redis(history) => Some(history.connection()),
        }
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Publishes `envelopes` (at most [`MAX_PUBLISH_BATCH`](crate::history::MAX_PUBLISH_BATCH)),
    /// all or none, to every subscriber of `channel` in the fleet, in the channel's order.
    pub async fn publish(&self, channel: &str, envelopes: Vec<Envelope>) -> Result<(), BusError> {
        match &self.transport {
            Transport::Local(history) => {
                history.publish(channel, envelopes, |msg| self.hub.deliver(channel, msg));
                Ok(())
            }
            Transport::Redis(history) => history.publish(channel, &envelopes).await.map(drop).map_err(BusError::from),
        }
    }

    /// The channel's position now, and the messages missed since `since`.
    pub async fn read(&self, channel: &str, since: Option<&Since>) -> Result<Replay, BusError> {
        match &self.transport {
            Transport::Local(history) => Ok(history.read(channel, since)),
            Transport::Redis(history) => history.read(channel, since).await.map_err(BusError::from),
        }
    }
}

impl From<HistoryError> for BusError {
    fn from(e: HistoryError) -> Self {
        BusError::Unavailable(e.to_string())
    }
}

struct Subscriber {
    client: redis::Client,
    history: RedisHistory,
    hub: Arc<Hub>,
    commands: mpsc::Receiver<BusCommand>,
    health: Arc<BusHealth>,
    metrics: Arc<Metrics>,
}

/// Why a subscription session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

impl Subscriber {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_MIN;
        let mut sessions = 0u64;
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
                    Ok(Err(e)) => SessionEnd::Lost(format!("connect failed: {e}")),
                    Err(_) => SessionEnd::Lost("connect timed out".into()),
                },
            };
            self.set_up(false);
            match end {
                SessionEnd::Shutdown => return,
                SessionEnd::Lost(why) => warn!(%why, retry_in = ?backoff, "redis bus down"),
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
        let (mut sink, mut stream) = pubsub.split();
        // Resubscribe everything the hub has now; commands queued meanwhile are replayed after
        // (a duplicate SUBSCRIBE is harmless, and order keeps unsubscribe-then-subscribe right).
        let channels = self.hub.channels();
        for chunk in channels.chunks(RESUBSCRIBE_CHUNK) {
            let keys: Vec<String> = chunk.iter().map(|(c, _)| self.history.pubsub_key(c)).collect();
            if let Err(e) = with_timeout(sink.subscribe(keys)).await {
                return SessionEnd::Lost(format!("resubscribe failed: {e}"));
            }
            for (channel, generation) in chunk {
                self.hub.confirm(channel, *generation);
            }
        }
        // Refill what the channels missed while this server was away, before any live message:
        // live ones published meanwhile wait in the subscription's buffer, and the hub drops
        // what it already has.
        for (channel, _) in &channels {
            if let Err(e) = self.refill(channel).await {
                return SessionEnd::Lost(format!("refilling {channel} failed: {e}"));
            }
        }
        // Ready only when publishing works too.
        if let Err(e) = self.history.ping().await {
            return SessionEnd::Lost(format!("publishing connection: {e}"));
        }
        self.set_up(true);
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
                        return SessionEnd::Lost(e);
                    },
                    None => return SessionEnd::Shutdown,
                },
                _ = ping.tick() => match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return SessionEnd::Lost(format!("ping failed: {e}")),
                    Err(_) => return SessionEnd::Lost(format!("ping unanswered for {PING_TIMEOUT:?}")),
                },
                msg = stream.next() => match msg {
                    Some(msg) => self.on_message(&msg),
                    None => return SessionEnd::Lost("connection closed".into()),
                },
            }
        }
    }

    async fn on_command(&self, sink: &mut PubSubSink, cmd: BusCommand) -> Result<(), String> {
        match cmd {
            BusCommand::Subscribe { channel, generation } => {
                with_timeout(sink.subscribe(self.history.pubsub_key(&channel))).await?;
                debug!(%channel, "subscribed on the bus");
                self.hub.confirm(&channel, generation);
            }
            BusCommand::Unsubscribe { channel } => {
                with_timeout(sink.unsubscribe(self.history.pubsub_key(&channel))).await?;
                debug!(%channel, "unsubscribed on the bus");
            }
        }
        Ok(())
    }

    async fn refill(&self, channel: &str) -> Result<(), HistoryError> {
        let Some((epoch, offset)) = self.hub.cursor(channel) else { return Ok(()) };
        let replay = self.history.read(channel, Some(&Since { epoch: epoch.to_string(), offset })).await?;
        match replay.recovery {
            Some(Ok(())) => {
                if !replay.entries.is_empty() {
                    info!(%channel, messages = replay.entries.len(), "refilled a gap from history");
                }
                self.metrics.bus_refilled.inc_by(replay.entries.len() as u64);
                for msg in &replay.entries {
                    self.hub.deliver(channel, msg);
                }
            }
            Some(Err(Lost::EpochChanged)) => {
                // Redis lost the old sequence; deliver the new one from its start, so nothing
                // published after the loss is missed either.
                self.metrics.bus_gaps_lost.inc();
                warn!(%channel, epoch = %replay.epoch, "the channel's history was lost; continuing with its new epoch");
                let fresh = Since { epoch: replay.epoch.to_string(), offset: 0 };
                let replay = self.history.read(channel, Some(&fresh)).await?;
                for msg in &replay.entries {
                    self.hub.deliver(channel, msg);
                }
            }
            Some(Err(lost)) => {
                self.metrics.bus_gaps_lost.inc();
                warn!(%channel, reason = lost.as_str(), "messages missed during the outage cannot be refilled");
            }
            None => {}
        }
        Ok(())
    }

    fn on_message(&self, msg: &redis::Msg) {
        self.metrics.bus_messages.inc();
        let Some(channel) = self.history.channel_of(msg.get_channel_name()) else { return };
        match Sequenced::decode(Bytes::copy_from_slice(msg.get_payload_bytes())) {
            Ok(msg) => self.hub.deliver(channel, &msg),
            Err(e) => {
                self.metrics.bus_undecodable.inc();
                debug!(%channel, error = %e, "dropped a bus message");
            }
        }
    }

    fn set_up(&self, up: bool) {
        self.health.up.store(up, Ordering::Release);
        self.metrics.bus_up.set(up as i64);
    }
}

async fn with_timeout<T>(f: impl Future<Output = redis::RedisResult<T>>) -> Result<T, String> {
    match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_url_is_refused_up_front() {
        let tracker = TaskTracker::new();
        let history = HistoryConfig { size: 10, ttl: Duration::from_secs(10), max_replay: 10 };
        let metrics = Arc::new(Metrics::new());
        let r = Bus::start(Some("http://nope"), "p", history, 10, metrics, &tracker, CancellationToken::new());
        assert!(matches!(r, Err(BusError::InvalidUrl(_))));
    }
}
