//! Order and history kept in Redis: one Lua script per publish run and one per read, so a
//! channel's order and history are decided inside Redis, atomically, with the semantics of
//! [`crate::messaging::history`]. The script for a publish takes the next offsets, appends the
//! envelopes to the channel's history stream and PUBLISHes each as `<offset>:<epoch>:<envelope>`
//! ([`Sequenced`]); the read script answers a resume.
//!
//! Publish ids: the same script remembers the ids clients gave their messages (a sorted set
//! scored by offset, trimmed to the channel's last [`HistoryConfig::id_window`] offsets, expiring
//! and starting anew with the channel's epoch), and places a message whose id it remembers where
//! the first one went instead of publishing it again. So a retry after an unknown outcome is
//! atomic with the publish it retries: delivered once, whichever of the two runs first.
//!
//! Every command runs with a timeout on the shared multiplexed connection, and is retried once
//! only when running it twice cannot publish twice. A publish that failed after it may have
//! reached Redis says so ([`CommandError::may_have_run`]): its outcome is unknown, never "not
//! published".

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;

use super::keys::Keys;
use crate::messaging::envelope::{Envelope, Sequenced, new_epoch};
use crate::messaging::history::{HistoryConfig, Lost, MAX_PUBLISH_BATCH, Outgoing, Placed, Published, Replay, Since};

/// Why a Redis command of the bus failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("timed out")]
    Timeout,
    #[error("unexpected reply from the history script: {0}")]
    Reply(String),
}

impl CommandError {
    /// Whether the command may have run although it failed: it timed out, or the connection was
    /// lost after it was sent, or its reply made no sense. Redis refusing it (an error reply) or
    /// a connection that was never made means it did not run.
    pub fn may_have_run(&self) -> bool {
        match self {
            CommandError::Timeout | CommandError::Reply(_) => true,
            CommandError::Redis(e) => {
                !never_sent(e) && (e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
            }
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(50);

/// Lua, the start of both scripts: the channel's epoch, or (when Redis has none: a new channel,
/// or its state was lost) a new epoch from `ARGV[$fresh]` with the offset back at 0 and the old
/// history and publish ids dropped. The `if` is left open for the script to finish.
macro_rules! epoch_or_new {
    ($fresh:literal) => {
        concat!(
            "
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[",
            $fresh,
            "]
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
"
        )
    };
}

/// KEYS: meta hash, history stream, publish ids. ARGV: pub/sub channel, history size, ttl
/// seconds, epoch to use if the channel has none, id window, count `n`, then `n` publish ids
/// (`''` for none), then the `n` envelopes in order. A message whose id the channel remembers is
/// not published again; the others take consecutive offsets and are published one pub/sub
/// message each, and their ids are remembered for the channel's last `id window` offsets.
/// Returns {epoch, offset...}: one offset per message, negated for one published before.
const PUBLISH_SCRIPT: &str = concat!(
    epoch_or_new!(4),
    r"end
local size = tonumber(ARGV[2])
local window = tonumber(ARGV[5])
local n = tonumber(ARGV[6])
local head = tonumber(redis.call('HGET', KEYS[1], 'offset'))
local out = {epoch}
local ids = false
for i = 1, n do
  local id = ARGV[6 + i]
  local seen = false
  if id ~= '' then
    ids = true
    seen = redis.call('ZSCORE', KEYS[3], id)
  end
  if seen then
    out[#out + 1] = -tonumber(seen)
  else
    head = head + 1
    local body = ARGV[6 + n + i]
    if size > 0 then
      redis.call('XADD', KEYS[2], 'MAXLEN', size, head .. '-0', 'e', body)
    end
    redis.call('PUBLISH', ARGV[1], head .. ':' .. epoch .. ':' .. body)
    if id ~= '' then redis.call('ZADD', KEYS[3], head, id) end
    out[#out + 1] = head
  end
end
redis.call('HSET', KEYS[1], 'offset', head)
if size > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
if ids or redis.call('EXISTS', KEYS[3]) == 1 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', head - window)
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return out
"
);

/// KEYS: meta hash, history stream, publish ids. ARGV: since epoch ('' for none), since offset,
/// epoch to use if the channel has none, ttl seconds, most entries to replay, most bytes of
/// entries to replay (a longer or larger gap is a history_gap: one client must not make Redis
/// build an unbounded reply), `page` to get the first entries of a longer or larger gap instead
/// (a server's refill, which reads on from the last entry it got). The entries are read 64 at a
/// time and the read stops at the byte cap, so a gap of large entries costs Redis no more than
/// the cap. Returns {epoch, head, status, envelope...}.
const READ_SCRIPT: &str = concat!(
    epoch_or_new!(3),
    r"  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
local head = tonumber(redis.call('HGET', KEYS[1], 'offset'))
if ARGV[1] == '' then return {epoch, head, 'none'} end
if ARGV[1] ~= epoch then return {epoch, head, 'epoch_changed'} end
local since = tonumber(ARGV[2])
if since > head then return {epoch, head, 'offset_ahead'} end
if since == head then return {epoch, head, 'ok'} end
local paging = ARGV[7] == 'page'
if head - since > tonumber(ARGV[5]) and not paging then return {epoch, head, 'history_gap'} end
local last = head
if paging then last = math.min(head, since + tonumber(ARGV[5])) end
local room = tonumber(ARGV[6])
local out = {epoch, head, 'ok'}
local from = since + 1
while from <= last do
  local entries = redis.call('XRANGE', KEYS[2], from .. '-0', '+', 'COUNT', math.min(64, last - from + 1))
  if #entries == 0 or entries[1][1] ~= from .. '-0' then return {epoch, head, 'history_gap'} end
  for _, e in ipairs(entries) do
    room = room - #e[2][2]
    if room < 0 and not (paging and #out == 3) then
      -- A page ends at the byte cap (the refill reads on from its last entry) and holds at least
      -- one entry, however large; a replay is refused.
      if paging then return out end
      return {epoch, head, 'history_gap'}
    end
    out[#out + 1] = e[2][2]
  end
  from = from + #entries
end
return out
"
);

/// KEYS: meta hash, history stream, publish ids. ARGV: the epoch a server delivered in, the offset it reached.
/// Ends that epoch (its order, history and ids are deleted, so the next read or publish starts a new
/// one) only if Redis still has it and is behind that offset: Redis's state went back (a restore
/// from an older snapshot, a failover to a replica that lagged), and the offsets it would hand
/// out next were already delivered. Returns 1 when it ended the epoch.
const END_REWOUND_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local head = tonumber(redis.call('HGET', KEYS[1], 'offset'))
if epoch == ARGV[1] and head ~= nil and head < tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
  return 1
end
return 0
";

/// Order and history kept in Redis.
#[derive(Clone)]
pub struct RedisHistory {
    conn: ConnectionManager,
    keys: Keys,
    config: HistoryConfig,
    publish: Arc<redis::Script>,
    read: Arc<redis::Script>,
    end_rewound: Arc<redis::Script>,
}

impl RedisHistory {
    pub fn new(conn: ConnectionManager, keys: Keys, config: HistoryConfig) -> Self {
        RedisHistory {
            conn,
            keys,
            config,
            publish: Arc::new(redis::Script::new(PUBLISH_SCRIPT)),
            read: Arc::new(redis::Script::new(READ_SCRIPT)),
            end_rewound: Arc::new(redis::Script::new(END_REWOUND_SCRIPT)),
        }
    }

    /// The multiplexed connection this history publishes through, for other small commands.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Orders, records and publishes `messages` (at most [`MAX_PUBLISH_BATCH`], in one script
    /// call: all of them or none); a message whose id the channel remembers is not published
    /// again. Fails with [`CommandError::may_have_run`] true when the outcome is unknown.
    pub async fn publish(&self, channel: &str, messages: &[Outgoing]) -> Result<Published, CommandError> {
        debug_assert!(!messages.is_empty() && messages.len() <= MAX_PUBLISH_BATCH);
        let (meta, stream, ids) = (self.keys.meta(channel), self.keys.stream(channel), self.keys.ids(channel));
        let pubsub = self.keys.pubsub(channel);
        let bodies: Vec<Bytes> = messages.iter().map(|m| m.envelope.encode()).collect();
        // Not idempotent: retried only when the command cannot have reached Redis.
        let reply = self
            .call(false, |mut conn| {
                let mut call = self.publish.prepare_invoke();
                call.key(&meta)
                    .key(&stream)
                    .key(&ids)
                    .arg(&pubsub)
                    .arg(self.config.size)
                    .arg(self.config.ttl.as_secs().max(1))
                    .arg(new_epoch())
                    .arg(self.config.id_window())
                    .arg(messages.len());
                for m in messages {
                    call.arg(m.id.as_deref().unwrap_or(""));
                }
                for body in &bodies {
                    call.arg(body.as_ref());
                }
                async move { call.invoke_async::<Vec<redis::Value>>(&mut conn).await }
            })
            .await?;
        parse_publish_reply(reply, messages.len())
    }

    /// The channel's position, and what was missed since `since`.
    pub async fn read(&self, channel: &str, since: Option<&Since>) -> Result<Replay, CommandError> {
        self.read_with(channel, since, false).await
    }

    /// Like [`RedisHistory::read`], but a gap longer than one replay is not refused: the first
    /// `max_replay` missed entries come back (fewer than `head - since`: read on from the last).
    /// For a server refilling its own channels, which pages through history a replay at a time.
    pub async fn read_page(&self, channel: &str, since: &Since) -> Result<Replay, CommandError> {
        self.read_with(channel, Some(since), true).await
    }

    async fn read_with(&self, channel: &str, since: Option<&Since>, page: bool) -> Result<Replay, CommandError> {
        let (meta, stream, ids) = (self.keys.meta(channel), self.keys.stream(channel), self.keys.ids(channel));
        let reply = self
            .call(true, |mut conn| {
                let mut call = self.read.prepare_invoke();
                call.key(&meta)
                    .key(&stream)
                    .key(&ids)
                    .arg(since.map(|s| s.epoch.as_str()).unwrap_or(""))
                    .arg(since.map(|s| s.offset).unwrap_or(0))
                    .arg(new_epoch())
                    .arg(self.config.ttl.as_secs().max(1))
                    .arg(self.config.max_replay)
                    .arg(self.config.max_replay_bytes)
                    .arg(if page { "page" } else { "" });
                async move { call.invoke_async::<Vec<redis::Value>>(&mut conn).await }
            })
            .await?;
        parse_read_reply(reply, since)
    }

    /// Ends the channel's epoch `epoch` if Redis is behind `delivered` in it (see
    /// [`END_REWOUND_SCRIPT`]); true when it did. Only a server's own evidence may call this (an
    /// offset its hub delivered, which Redis had vouched for), never a client's `since`.
    pub async fn end_rewound_epoch(&self, channel: &str, epoch: &str, delivered: u64) -> Result<bool, CommandError> {
        let (meta, stream, ids) = (self.keys.meta(channel), self.keys.stream(channel), self.keys.ids(channel));
        self.call(true, |mut conn| {
            let mut call = self.end_rewound.prepare_invoke();
            call.key(&meta).key(&stream).key(&ids).arg(epoch).arg(delivered);
            async move { call.invoke_async::<u8>(&mut conn).await }
        })
        .await
        .map(|ended| ended == 1)
    }

    /// Checks that commands go through (the connection reconnects behind the scenes).
    pub async fn ping(&self) -> Result<(), CommandError> {
        self.call(true, |mut conn| async move { redis::cmd("PING").query_async::<()>(&mut conn).await }).await
    }

    /// Runs one command with a timeout. After a Redis restart the shared connection fails its
    /// next command once while it reconnects; that command is retried once, if it is idempotent
    /// or provably never reached Redis.
    async fn call<T, F, Fut>(&self, idempotent: bool, command: F) -> Result<T, CommandError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let mut retried = false;
        loop {
            match tokio::time::timeout(TIMEOUT, command(self.conn.clone())).await {
                Err(_) => return Err(CommandError::Timeout),
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

fn parse_publish_reply(reply: Vec<redis::Value>, count: usize) -> Result<Published, CommandError> {
    let bad = |what: &str| CommandError::Reply(format!("publish: {what}"));
    let mut it = reply.into_iter();
    let epoch: String = it.next().and_then(|v| redis::from_redis_value(v).ok()).ok_or_else(|| bad("epoch"))?;
    let placed = it
        .map(|v| match redis::from_redis_value::<i64>(v) {
            Ok(o) if o > 0 => Ok(Placed { offset: o as u64, duplicate: false }),
            Ok(o) if o < 0 => Ok(Placed { offset: o.unsigned_abs(), duplicate: true }),
            _ => Err(bad("offset")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if placed.len() != count {
        return Err(bad("count"));
    }
    Ok(Published { epoch: Arc::from(epoch), placed })
}

fn parse_read_reply(reply: Vec<redis::Value>, since: Option<&Since>) -> Result<Replay, CommandError> {
    let bad = |what: &str| CommandError::Reply(what.to_owned());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::envelope::Payload;

    fn env(s: &'static str) -> Envelope {
        Envelope { published_at_micros: 0, payload: Payload::Text(Bytes::from_static(s.as_bytes())) }
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
