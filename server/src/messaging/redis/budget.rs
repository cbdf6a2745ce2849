//! The fleet's reconnect budget in Redis: one token bucket (`<prefix>:drain-budget`, a hash of
//! `tokens` and `at`) that every draining server of the fleet draws from, so the fleet-wide rate
//! of drain closes stays under `--drain-max-reconnects-per-second` however many pods drain at
//! once. One Lua script refills and takes atomically, on Redis's own clock (`TIME`), so the
//! servers' clocks do not matter. The bucket holds a tenth of a second's worth
//! ([`crate::drain::burst_of`]), like a server's own, and expires a minute after its last use
//! (or after its debt is repaid: a forced take at the drain window's end takes everything it
//! asks for, and tells how long the bucket owed others first, where the forced clients' hints
//! start).
//!
//! Its own connection, opened lazily when a drain first asks: a server that never drains never
//! opens it, and the bus's connections are none of its business.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::keys::Keys;
use super::{BusError, Target};

/// A take that Redis does not answer within this falls back to the server's own bucket.
const TIMEOUT: Duration = Duration::from_millis(500);

/// KEYS: the bucket. ARGV: tokens per second, bucket size, tokens wanted, `1` to take them all
/// whatever the bucket holds (the window's end: the bucket goes into debt, which later takes
/// repay). Returns how many it took, and the milliseconds until the bucket would have held the
/// first of them (0 unless it went into debt). Milliseconds of Redis's clock; fractional tokens
/// carry over.
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
if ARGV[4] == '1' then granted = want end
local wait = math.floor(math.max(0, -tokens) * 1000 / rate)
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', string.format('%d', now))
redis.call('PEXPIRE', KEYS[1], 60000 + math.floor(math.max(0, -tokens) * 1000 / rate))
return {granted, wait}
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

    /// Takes up to `want` tokens from the fleet's bucket (with `force`, all of them, into debt);
    /// returns how many it took and how long until the bucket would have held the first.
    pub async fn take(&mut self, want: usize, force: bool) -> Result<(usize, Duration), super::scripts::CommandError> {
        use super::scripts::CommandError;
        if self.conn.is_none() {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(TIMEOUT))
                .set_response_timeout(Some(TIMEOUT))
                .set_number_of_retries(0);
            self.conn = Some(ConnectionManager::new_lazy_with_config(self.client.clone(), config)?);
        }
        let Some(conn) = self.conn.as_mut() else { return Ok((0, Duration::ZERO)) };
        let burst = crate::drain::burst_of(self.per_second);
        let mut call = self.script.prepare_invoke();
        call.key(&self.key).arg(self.per_second).arg(burst).arg(want).arg(u8::from(force));
        match tokio::time::timeout(TIMEOUT, call.invoke_async::<(usize, u64)>(conn)).await {
            Ok(reply) => reply.map(|(granted, wait)| (granted, Duration::from_millis(wait))).map_err(Into::into),
            Err(_) => Err(CommandError::Timeout),
        }
    }
}
