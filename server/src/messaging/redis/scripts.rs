//! Order and history kept in Redis: one Lua script per publish run and one per read, so a
//! channel's order and history are decided inside Redis, atomically, with the semantics of
//! [`crate::messaging::history`]. The script for a publish takes the next offsets, appends the
//! envelopes to the channel's history stream and PUBLISHes each as `<offset>:<epoch>:<envelope>`
//! ([`Sequenced`]); the read script answers a resume.
//!
//! Every command runs with a timeout on the shared multiplexed connection, and is retried once
//! only when running it twice cannot publish twice.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::aio::ConnectionManager;

use super::keys::Keys;
use crate::messaging::envelope::{Envelope, Sequenced, new_epoch};
use crate::messaging::history::{HistoryConfig, Lost, MAX_PUBLISH_BATCH, Replay, Since};

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

const TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_DELAY: Duration = Duration::from_millis(50);

/// Lua, the start of both scripts: the channel's epoch, or (when Redis has none: a new channel,
/// or its state was lost) a new epoch from `ARGV[$fresh]` with the offset back at 0 and the old
/// history dropped. The `if` is left open for the script to finish.
macro_rules! epoch_or_new {
    ($fresh:literal) => {
        concat!(
            "
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[",
            $fresh,
            "]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'offset', 0)
"
        )
    };
}

/// KEYS: meta hash, history stream. ARGV: pub/sub channel, history size, ttl seconds, epoch to
/// use if the channel has none, then the envelopes in order. They take consecutive offsets and
/// are published one pub/sub message each. Returns the last one's offset.
const PUBLISH_SCRIPT: &str = concat!(
    epoch_or_new!(4),
    r"end
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
"
);

/// KEYS: meta hash, history stream. ARGV: since epoch ('' for none), since offset, epoch to use
/// if the channel has none, ttl seconds, most entries to replay, most bytes of entries to replay
/// (a longer or larger gap is a history_gap: one client must not make Redis build an unbounded
/// reply). The entries are read a page at a time and the read stops at the byte cap, so a gap
/// of large entries costs Redis no more than the cap. Returns {epoch, head, status,
/// envelope...}.
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
if head - since > tonumber(ARGV[5]) then return {epoch, head, 'history_gap'} end
local room = tonumber(ARGV[6])
local out = {epoch, head, 'ok'}
local from = since + 1
while from <= head do
  local entries = redis.call('XRANGE', KEYS[2], from .. '-0', '+', 'COUNT', 64)
  if #entries == 0 or entries[1][1] ~= from .. '-0' then return {epoch, head, 'history_gap'} end
  for _, e in ipairs(entries) do
    room = room - #e[2][2]
    if room < 0 then return {epoch, head, 'history_gap'} end
    out[#out + 1] = e[2][2]
  end
  from = from + #entries
end
return out
"
);

/// KEYS: meta hash, history stream. ARGV: the epoch a server delivered in, the offset it reached.
/// Ends that epoch (its order and history are deleted, so the next read or publish starts a new
/// one) only if Redis still has it and is behind that offset: Redis's state went back (a restore
/// from an older snapshot, a failover to a replica that lagged), and the offsets it would hand
/// out next were already delivered. Returns 1 when it ended the epoch.
const END_REWOUND_SCRIPT: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local head = tonumber(redis.call('HGET', KEYS[1], 'offset'))
if epoch == ARGV[1] and head ~= nil and head < tonumber(ARGV[2]) then
  redis.call('DEL', KEYS[1], KEYS[2])
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

    /// Orders, records and publishes `envelopes` (at most [`MAX_PUBLISH_BATCH`], in one script
    /// call: all of them or none); returns the last one's offset.
    pub async fn publish(&self, channel: &str, envelopes: &[Envelope]) -> Result<u64, CommandError> {
        debug_assert!(!envelopes.is_empty() && envelopes.len() <= MAX_PUBLISH_BATCH);
        let (meta, stream, pubsub) = (self.keys.meta(channel), self.keys.stream(channel), self.keys.pubsub(channel));
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
    pub async fn read(&self, channel: &str, since: Option<&Since>) -> Result<Replay, CommandError> {
        let (meta, stream) = (self.keys.meta(channel), self.keys.stream(channel));
        let reply = self
            .call(true, |mut conn| {
                let mut call = self.read.prepare_invoke();
                call.key(&meta)
                    .key(&stream)
                    .arg(since.map(|s| s.epoch.as_str()).unwrap_or(""))
                    .arg(since.map(|s| s.offset).unwrap_or(0))
                    .arg(new_epoch())
                    .arg(self.config.ttl.as_secs().max(1))
                    .arg(self.config.max_replay)
                    .arg(self.config.max_replay_bytes);
                async move { call.invoke_async::<Vec<redis::Value>>(&mut conn).await }
            })
            .await?;
        parse_read_reply(reply, since)
    }

    /// Ends the channel's epoch `epoch` if Redis is behind `delivered` in it (see
    /// [`END_REWOUND_SCRIPT`]); true when it did. Only a server's own evidence may call this (an
    /// offset its hub delivered, which Redis had vouched for), never a client's `since`.
    pub async fn end_rewound_epoch(&self, channel: &str, epoch: &str, delivered: u64) -> Result<bool, CommandError> {
        let (meta, stream) = (self.keys.meta(channel), self.keys.stream(channel));
        self.call(true, |mut conn| {
            let mut call = self.end_rewound.prepare_invoke();
            call.key(&meta).key(&stream).arg(epoch).arg(delivered);
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
