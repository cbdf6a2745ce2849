//! Per-channel order and recovery: offsets, epochs and a bounded history.
//!
//! Every channel has an *epoch* and a *head*. Each publish atomically takes the next offset
//! (`head + 1`), appends the message to the channel's history (the last `--history-size`
//! entries, kept `--history-ttl` seconds after the channel's last publish) and publishes it
//! with its offset and epoch. The epoch is replaced whenever the channel's state is lost (Redis
//! restarted empty, or the channel idle past its TTL), and offsets start again from 1 under the
//! new epoch, so "same epoch" always means "same sequence".
//!
//! [`read`](RedisHistory::read) answers a resume: given the client's last `(epoch, offset)`, it
//! returns the missed entries when history still covers them, or says why it cannot.
//!
//! Two implementations with the same semantics: [`RedisHistory`] (one Lua script per publish
//! batch and one per read, so order and history are decided inside Redis) and [`LocalHistory`] for
//! the in-process bus.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::ConnectionManager;

use crate::envelope::{Envelope, Sequenced, new_epoch};

/// Settings shared by both implementations.
#[derive(Debug, Clone, Copy)]
pub struct HistoryConfig {
    /// Entries kept per channel; 0 keeps none (offsets and epochs still work).
    pub size: u64,
    /// Seconds a channel's state outlives its last publish.
    pub ttl: Duration,
    /// Most messages one resume (or one gap refill) replays; a longer gap is reported as
    /// `history_gap`. Below the per-client queue, so a replay never overflows it.
    pub max_replay: u64,
}

/// Where a client left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: String,
    pub offset: u64,
}

/// Why missed messages cannot be replayed. Part of the public interface (`reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The channel's epoch is not the client's: its history was lost or it never existed.
    EpochChanged,
    /// The client claims an offset the channel has not reached.
    OffsetAhead,
    /// History no longer reaches back to the client's offset (trimmed, expired or disabled).
    HistoryGap,
}

impl Lost {
    pub fn as_str(self) -> &'static str {
        match self {
            Lost::EpochChanged => "epoch_changed",
            Lost::OffsetAhead => "offset_ahead",
            Lost::HistoryGap => "history_gap",
        }
    }
    fn parse(s: &str) -> Option<Lost> {
        [Lost::EpochChanged, Lost::OffsetAhead, Lost::HistoryGap].into_iter().find(|l| l.as_str() == s)
    }
}

/// The answer to a subscribe: the channel's position now, and what was missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    pub epoch: Arc<str>,
    pub head: u64,
    /// `None` when no `since` was given.
    pub recovery: Option<Result<(), Lost>>,
    /// Entries after `since`, up to `head`, in order (empty unless recovered).
    pub entries: Vec<Sequenced>,
}

impl Replay {
    pub fn recovered(&self) -> bool {
        matches!(self.recovery, Some(Ok(())))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("timed out")]
    Timeout,
    #[error("unexpected reply from the history script: {0}")]
    Reply(String),
}

const TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(50);

/// Most messages one publish carries (one script call); a client's longer run of publishes is
/// split into several.
pub const MAX_PUBLISH_BATCH: usize = 64;

/// KEYS: meta hash, history stream. ARGV: pub/sub channel, history size, ttl seconds, epoch to
/// use if the channel has none, then the envelopes in order. They take consecutive offsets and
/// are published one pub/sub message each. Returns the last one's offset.
const PUBLISH_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
end
local size = tonumber(ARGV[2])
local count = #ARGV - 4
local last = redis.call('HINCRBY', KEYS[1], 'offset', count)
local offset = last - count
for i = 5, #ARGV do
  offset = offset + 1
  if size > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', size, offset .. '-0', 'e', ARGV[i])
  end
  redis.call('PUBLISH', ARGV[1], offset .. ':' .. epoch .. ':' .. ARGV[i])
end
if size > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return last
";

/// KEYS: meta hash, history stream. ARGV: since epoch ('' for none), since offset, epoch to use
/// if the channel has none, ttl seconds, most entries to replay (a longer gap is a history_gap:
/// one client must not make Redis build an unbounded reply). Returns {epoch, head, status,
/// envelope...}.
const READ_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[3]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
local head = tonumber(redis.call('HGET', KEYS[1], 'offset'))
if ARGV[1] == '' then return {epoch, head, 'none'} end
if ARGV[1] ~= epoch then return {epoch, head, 'epoch_changed'} end
local since = tonumber(ARGV[2])
if since > head then return {epoch, head, 'offset_ahead'} end
if since == head then return {epoch, head, 'ok'} end
if head - since > tonumber(ARGV[5]) then return {epoch, head, 'history_gap'} end
local entries = redis.call('XRANGE', KEYS[2], (since + 1) .. '-0', '+', 'COUNT', ARGV[5])
if #entries == 0 or entries[1][1] ~= (since + 1) .. '-0' then return {epoch, head, 'history_gap'} end
local out = {epoch, head, 'ok'}
for _, e in ipairs(entries) do out[#out + 1] = e[2][2] end
return out
";

/// Order and history kept in Redis.
#[derive(Clone)]
pub struct RedisHistory {
    conn: ConnectionManager,
    prefix: Arc<str>,
    config: HistoryConfig,
    publish: Arc<redis::Script>,
    read: Arc<redis::Script>,
}

impl RedisHistory {
    pub fn new(conn: ConnectionManager, prefix: &str, config: HistoryConfig) -> Self {
        RedisHistory {
            conn,
            prefix: Arc::from(prefix),
            config,
            publish: Arc::new(redis::Script::new(PUBLISH_SCRIPT)),
            read: Arc::new(redis::Script::new(READ_SCRIPT)),
        }
    }

    /// The multiplexed connection this history publishes through, for other small commands.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The pub/sub channel a server subscribes to for `channel`.
    pub fn pubsub_key(&self, channel: &str) -> String {
        format!("{}:ch:{channel}", self.prefix)
    }

    /// The wsfleet channel of a pub/sub channel name, `None` for another fleet's.
    pub fn channel_of<'a>(&self, pubsub_key: &'a str) -> Option<&'a str> {
        pubsub_key.strip_prefix(&*self.prefix)?.strip_prefix(":ch:")
    }

    fn meta_key(&self, channel: &str) -> String {
        format!("{}:meta:{channel}", self.prefix)
    }

    fn stream_key(&self, channel: &str) -> String {
        format!("{}:hist:{channel}", self.prefix)
    }

    /// Orders, records and publishes `envelopes` (at most [`MAX_PUBLISH_BATCH`], in one script
    /// call: all of them or none); returns the last one's offset.
    pub async fn publish(&self, channel: &str, envelopes: &[Envelope]) -> Result<u64, HistoryError> {
        debug_assert!(!envelopes.is_empty() && envelopes.len() <= MAX_PUBLISH_BATCH);
        let (meta, stream, pubsub) = (self.meta_key(channel), self.stream_key(channel), self.pubsub_key(channel));
        let bodies: Vec<Bytes> = envelopes.iter().map(Envelope::encode).collect();
        // Not idempotent: retried only when the command cannot have reached Redis.
        self.call(false, |mut conn| {
            let mut call = self.publish.prepare_invoke();
            call.key(&meta)
                .key(&stream)
                .arg(&pubsub)
                .arg(self.config.size)
                .arg(self.config.ttl.as_secs().max(1))
                .arg(new_epoch());
            for body in &bodies {
                call.arg(body.as_ref());
            }
            async move { call.invoke_async::<u64>(&mut conn).await }
        })
        .await
    }

    /// The channel's position, and what was missed since `since`.
    pub async fn read(&self, channel: &str, since: Option<&Since>) -> Result<Replay, HistoryError> {
        let (meta, stream) = (self.meta_key(channel), self.stream_key(channel));
        let reply = self
            .call(true, |mut conn| {
                let mut call = self.read.prepare_invoke();
                call.key(&meta)
                    .key(&stream)
                    .arg(since.map(|s| s.epoch.as_str()).unwrap_or(""))
                    .arg(since.map(|s| s.offset).unwrap_or(0))
                    .arg(new_epoch())
                    .arg(self.config.ttl.as_secs().max(1))
                    .arg(self.config.max_replay);
                async move { call.invoke_async::<Vec<redis::Value>>(&mut conn).await }
            })
            .await?;
        parse_read_reply(reply, since)
    }

    /// Checks that commands go through (the connection reconnects behind the scenes).
    pub async fn ping(&self) -> Result<(), HistoryError> {
        self.call(true, |mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await }).await
    }

    /// Runs one command with a timeout. After a Redis restart the shared connection fails its
    /// next command once while it reconnects; that command is retried once, if it is idempotent
    /// or provably never reached Redis.
    async fn call<T, F, Fut>(&self, idempotent: bool, command: F) -> Result<T, HistoryError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        loop {
            match tokio::time::timeout(TIMEOUT, command(self.conn.clone())).await {
                Err(_) => return Err(HistoryError::Timeout),
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if !retried && (if idempotent { e.is_connection_dropped() } else { never_sent(&e) }) => {
                    retried = true;
                    tokio::time::sleep(RETRY_DELAY).await;
                }
                Ok(Err(e)) => return Err(e.into()),
            }
        }
    }
}

/// The error proves the command was not written to Redis: the connection was refused. (A broken
/// pipe does not: redis-rs reports every request in flight on a dropped connection that way,
/// including ones Redis already ran, and running a publish twice would publish it twice.)
fn never_sent(e: &redis::RedisError) -> bool {
    e.is_connection_refusal()
}

fn parse_read_reply(reply: Vec<redis::Value>, since: Option<&Since>) -> Result<Replay, HistoryError> {
    let bad = |what: &str| HistoryError::Reply(what.to_owned());
    let mut it = reply.into_iter();
    let epoch: String = it.next().and_then(|v| redis::from_redis_value(v).ok()).ok_or_else(|| bad("epoch"))?;
    let head: u64 = it.next().and_then(|v| redis::from_redis_value(v).ok()).ok_or_else(|| bad("head"))?;
    let status: String = it.next().and_then(|v| redis::from_redis_value(v).ok()).ok_or_else(|| bad("status"))?;
    let epoch: Arc<str> = Arc::from(epoch);
    let recovery = match (status.as_str(), since) {
        ("none", _) | (_, None) => None,
        ("ok", Some(_)) => Some(Ok(())),
        (other, Some(_)) => Some(Err(Lost::parse(other).ok_or_else(|| bad(other))?)),
    };
    let mut entries = Vec::new();
    if let (Some(Ok(())), Some(since)) = (recovery, since) {
        for (i, v) in it.enumerate() {
            let raw: Vec<u8> = redis::from_redis_value(v).map_err(|_| bad("entry"))?;
            let envelope = Envelope::decode(Bytes::from(raw)).map_err(|e| bad(&e.to_string()))?;
            entries.push(Sequenced { epoch: epoch.clone(), offset: since.offset + 1 + i as u64, envelope });
        }
    }
    Ok(Replay { epoch, head, recovery, entries })
}

/// Channel entries the in-process history keeps before it sweeps expired ones.
const SWEEP_AT: usize = 4096;

/// Order and history for the in-process bus, with the semantics of the Redis scripts.
pub struct LocalHistory {
    config: HistoryConfig,
    channels: Mutex<HashMap<String, LocalChannel>>,
}

struct LocalChannel {
    epoch: Arc<str>,
    head: u64,
    entries: VecDeque<Envelope>,
    touched: Instant,
}

impl LocalHistory {
    pub fn new(config: HistoryConfig) -> Self {
        LocalHistory { config, channels: Mutex::default() }
    }

    /// Orders and records messages, handing each to `deliver` while still holding the order, so
    /// deliveries happen in offset order.
    pub fn publish(&self, channel: &str, envelopes: Vec<Envelope>, mut deliver: impl FnMut(&Sequenced)) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let c = self.channel(&mut channels, channel);
        c.touched = Instant::now();
        for envelope in envelopes {
            c.head += 1;
            if self.config.size > 0 {
                c.entries.push_back(envelope.clone());
                while c.entries.len() as u64 > self.config.size {
                    c.entries.pop_front();
                }
            }
            deliver(&Sequenced { epoch: c.epoch.clone(), offset: c.head, envelope });
        }
    }

    pub fn read(&self, channel: &str, since: Option<&Since>) -> Replay {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let c = self.channel(&mut channels, channel);
        let (epoch, head) = (c.epoch.clone(), c.head);
        let Some(since) = since else { return Replay { epoch, head, recovery: None, entries: vec![] } };
        let first_kept = head + 1 - c.entries.len() as u64;
        let outcome = if *since.epoch != *epoch {
            Err(Lost::EpochChanged)
        } else if since.offset > head {
            Err(Lost::OffsetAhead)
        } else if since.offset + 1 < first_kept || head - since.offset > self.config.max_replay {
            Err(Lost::HistoryGap)
        } else {
            Ok(())
        };
        let entries = match outcome {
            Ok(()) => c
                .entries
                .iter()
                .skip((since.offset + 1 - first_kept) as usize)
                .enumerate()
                .map(|(i, e)| Sequenced {
                    epoch: epoch.clone(),
                    offset: since.offset + 1 + i as u64,
                    envelope: e.clone(),
                })
                .collect(),
            Err(_) => vec![],
        };
        Replay { epoch, head, recovery: Some(outcome), entries }
    }

    /// The channel's state, replaced by a fresh epoch when it outlived its TTL. Channels past
    /// their TTL are forgotten once the map has grown, so clients naming ever new channels do
    /// not grow it without bound.
    fn channel<'a>(&self, channels: &'a mut HashMap<String, LocalChannel>, channel: &str) -> &'a mut LocalChannel {
        if channels.len() >= SWEEP_AT && !channels.contains_key(channel) {
            channels.retain(|_, c| c.touched.elapsed() <= self.config.ttl);
        }
        let fresh = || LocalChannel {
            epoch: Arc::from(new_epoch()),
            head: 0,
            entries: VecDeque::new(),
            touched: Instant::now(),
        };
        let c = channels.entry(channel.to_owned()).or_insert_with(fresh);
        if c.touched.elapsed() > self.config.ttl {
            *c = fresh();
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Payload;

    fn env(s: &'static str) -> Envelope {
        Envelope { published_at_micros: 0, payload: Payload::Text(Bytes::from_static(s.as_bytes())) }
    }

    fn local(size: u64) -> LocalHistory {
        LocalHistory::new(HistoryConfig { size, ttl: Duration::from_secs(60), max_replay: 100 })
    }

    fn publish_all(h: &LocalHistory, msgs: &[&'static str]) -> Vec<u64> {
        let mut offsets = vec![];
        for m in msgs {
            h.publish("c", vec![env(m)], |s| offsets.push(s.offset));
        }
        offsets
    }

    #[test]
    fn offsets_count_up_from_one_per_channel() {
        let h = local(10);
        assert_eq!(publish_all(&h, &["a", "b", "c"]), [1, 2, 3]);
        let mut other = 0;
        h.publish("d", vec![env("x")], |s| other = s.offset);
        assert_eq!(other, 1);
    }

    #[test]
    fn resume_replays_exactly_what_was_missed() {
        let h = local(10);
        let epoch = h.read("c", None).epoch;
        publish_all(&h, &["a", "b", "c", "d"]);
        let r = h.read("c", Some(&Since { epoch: epoch.to_string(), offset: 2 }));
        assert!(r.recovered());
        assert_eq!(r.head, 4);
        assert_eq!(r.entries.iter().map(|e| e.offset).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(r.entries[0].envelope, env("c"));
        let r = h.read("c", Some(&Since { epoch: epoch.to_string(), offset: 4 }));
        assert!(r.recovered() && r.entries.is_empty());
    }

    #[test]
    fn resume_says_why_it_cannot() {
        let h = local(2);
        let epoch = h.read("c", None).epoch.to_string();
        publish_all(&h, &["a", "b", "c", "d"]);
        let lost = |since: Since| h.read("c", Some(&since)).recovery;
        assert_eq!(lost(Since { epoch: "other".into(), offset: 1 }), Some(Err(Lost::EpochChanged)));
        assert_eq!(lost(Since { epoch: epoch.clone(), offset: 9 }), Some(Err(Lost::OffsetAhead)));
        assert_eq!(lost(Since { epoch: epoch.clone(), offset: 1 }), Some(Err(Lost::HistoryGap)));
        assert_eq!(lost(Since { epoch, offset: 2 }), Some(Ok(())));
    }

    #[test]
    fn a_resume_never_replays_more_than_max_replay() {
        let h = local(1000);
        let epoch = h.read("c", None).epoch.to_string();
        for _ in 0..150 {
            h.publish("c", vec![env("x")], |_| {});
        }
        let lost = |offset| h.read("c", Some(&Since { epoch: epoch.clone(), offset })).recovery;
        assert_eq!(lost(49), Some(Err(Lost::HistoryGap)), "101 behind, the cap is 100");
        assert_eq!(lost(50), Some(Ok(())));
    }

    #[test]
    fn no_history_still_orders_and_knows_when_nothing_was_missed() {
        let h = local(0);
        let epoch = h.read("c", None).epoch.to_string();
        publish_all(&h, &["a", "b"]);
        assert_eq!(h.read("c", Some(&Since { epoch: epoch.clone(), offset: 2 })).recovery, Some(Ok(())));
        assert_eq!(h.read("c", Some(&Since { epoch, offset: 1 })).recovery, Some(Err(Lost::HistoryGap)));
    }

    #[test]
    fn an_idle_channel_past_its_ttl_starts_a_new_epoch() {
        let h = LocalHistory::new(HistoryConfig { size: 10, ttl: Duration::from_millis(1), max_replay: 100 });
        let first = h.read("c", None).epoch;
        publish_all(&h, &["a"]);
        std::thread::sleep(Duration::from_millis(5));
        let r = h.read("c", Some(&Since { epoch: first.to_string(), offset: 1 }));
        assert_eq!(r.recovery, Some(Err(Lost::EpochChanged)));
        assert_eq!(r.head, 0);
    }

    #[tokio::test]
    async fn pubsub_keys_round_trip_and_ignore_other_fleets() {
        let client = redis::Client::open("redis://127.0.0.1:1").unwrap();
        let config = redis::aio::ConnectionManagerConfig::new();
        let conn = ConnectionManager::new_lazy_with_config(client, config).unwrap();
        let h =
            RedisHistory::new(conn, "fleet-a", HistoryConfig { size: 1, ttl: Duration::from_secs(1), max_replay: 1 });
        assert_eq!(h.pubsub_key("room:1"), "fleet-a:ch:room:1");
        assert_eq!(h.channel_of("fleet-a:ch:room:1"), Some("room:1"));
        assert_eq!(h.channel_of("fleet-b:ch:room:1"), None);
        assert_eq!(h.channel_of("fleet-a:xx:room:1"), None);
    }

    #[test]
    fn read_replies_from_redis_are_parsed() {
        use redis::Value as V;
        let since = Since { epoch: "e1".into(), offset: 5 };
        let envelope = env("x").encode().to_vec();
        let reply =
            vec![V::BulkString(b"e1".to_vec()), V::Int(6), V::BulkString(b"ok".to_vec()), V::BulkString(envelope)];
        let r = parse_read_reply(reply, Some(&since)).unwrap();
        assert_eq!((r.head, r.recovered(), r.entries[0].offset), (6, true, 6));
        let reply = vec![V::BulkString(b"e2".to_vec()), V::Int(0), V::BulkString(b"epoch_changed".to_vec())];
        assert_eq!(parse_read_reply(reply, Some(&since)).unwrap().recovery, Some(Err(Lost::EpochChanged)));
        let reply = vec![V::BulkString(b"e2".to_vec()), V::Int(0), V::BulkString(b"what".to_vec())];
        assert!(parse_read_reply(reply, Some(&since)).is_err());
    }
}
