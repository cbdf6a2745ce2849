//! The fleet's reconnect budget in Redis: one token bucket (`<prefix>:drain-budget`, a hash of
//! `tokens` and `at`) that every draining server of the fleet draws from, so the fleet-wide rate
//! of drain closes stays under `--drain-max-reconnects-per-second` however many pods drain at
//! once. One Lua script refills and takes atomically, on Redis's own clock (`TIME`), so the
//! servers' clocks do not matter. The bucket holds a tenth of a second's worth
//! ([`crate::drain::burst_of`]), like a server's own, and expires a minute after its last use.
//!
//! Its own connection, opened lazily when a drain first asks: a server that never drains never
//! opens it, and the bus's connections are none of its business.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::keys::Keys;
use super::{BusError, Target};

/// A take that Redis does not answer within this falls back to the server's own bucket.
const TIMEOUT: Duration = Duration::from_millis(500);

/// KEYS: the bucket. ARGV: tokens per second, bucket size, tokens wanted. Returns how many it
/// took. Milliseconds of Redis's clock; fractional tokens carry over.
const TAKE_SCRIPT: &str = r"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or burst)
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate / 1000)
else
  now = at
end
local granted = math.max(0, math.min(want, math.floor(tokens)))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], 60000)
return granted
";

/// This server's handle on its fleet's bucket.
pub struct RedisBudget {
    client: redis::Client,
    conn: Option<ConnectionManager>,
    key: String,
    per_second: u32,
    script: redis::Script,
}

impl RedisBudget {
    /// The bucket of the fleet under `prefix`, at `per_second`. Connects on the first take.
    pub fn new(target: Target<'_>, prefix: &str, per_second: u32) -> Result<Self, BusError> {
        Ok(RedisBudget {
            client: super::client(target)?,
            conn: None,
            key: Keys::new(prefix).drain_budget(),
            per_second,
            script: redis::Script::new(TAKE_SCRIPT),
        })
    }

    /// Takes up to `want` tokens from the fleet's bucket; returns how many it took.
    pub async fn take(&mut self, want: usize) -> Result<usize, super::scripts::CommandError> {
        use super::scripts::CommandError;
        if self.conn.is_none() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(0);
            self.conn = Some(ConnectionManager::new_lazy_with_config(self.client.clone(), config)?);
        }
        let Some(conn) = self.conn.as_mut() else { return Ok(0) };
        let burst = crate::drain::burst_of(self.per_second);
        let mut call = self.script.prepare_invoke();
        call.key(&self.key).arg(self.per_second).arg(burst).arg(want);
        match tokio::time::timeout(TIMEOUT, call.invoke_async::<usize>(conn)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(CommandError::Timeout),
        }
    }
}
