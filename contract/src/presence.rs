//! Fleet presence in Redis: one hash per fleet, `<prefix>:presence`, with one field per server
//! (its pod name) holding `<connections> <expires>`. A server refreshes its field every few
//! seconds ([`refresh`]) and removes it when it drains ([`remove`]); a field past its expiry is
//! a server that died, and is ignored by readers and pruned by the next refresh. Expiry times
//! come from Redis's own clock (`TIME` inside the scripts), so clock skew between pods and the
//! operator does not matter. The hash itself expires when no server refreshes it any more.
//!
//! [`fleet_stats`] reads a fleet with one command on one key, never a `SCAN` of the keyspace:
//! the server's `fleet-stats` subcommand and the operator's status both use it.

use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::Duration;

use redis::aio::ConnectionLike;

/// The hash of a fleet's presence entries.
pub fn key(prefix: &str) -> String {
    format!("{prefix}:presence")
}

/// KEYS: the hash. ARGV: pod, connections, ttl seconds. Sets the pod's entry to expire `ttl`
/// from now, drops entries already expired, keeps the hash for `ttl`.
static REFRESH: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = tonumber(redis.call('TIME')[1])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local expires = tonumber(string.match(all[i + 1], ' (%d+)$'))
  if not expires or expires <= now then redis.call('HDEL', KEYS[1], all[i]) end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. (now + tonumber(ARGV[3])))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
",
    )
});

/// KEYS: the hash. Returns `{pod, connections, ...}` for the entries not yet expired.
static READ: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local now = tonumber(redis.call('TIME')[1])
local all = redis.call('HGETALL', KEYS[1])
local live = {}
for i = 1, #all, 2 do
  local count, expires = string.match(all[i + 1], '^(%d+) (%d+)$')
  if count and tonumber(expires) > now then
    live[#live + 1] = all[i]
    live[#live + 1] = count
  end
end
return live
",
    )
});

/// Sets `pod`'s entry in the fleet of `prefix` to `connections`, live for `ttl`.
pub async fn refresh<C: ConnectionLike>(
    conn: &mut C,
    prefix: &str,
    pod: &str,
    connections: u64,
    ttl: Duration,
) -> redis::RedisResult<()> {
    REFRESH.key(key(prefix)).arg(pod).arg(connections).arg(ttl.as_secs().max(1)).invoke_async::<()>(conn).await
}

/// Removes `pod`'s entry from the fleet of `prefix`.
pub async fn remove<C: ConnectionLike + Send>(conn: &mut C, prefix: &str, pod: &str) -> redis::RedisResult<()> {
    redis::cmd("HDEL").arg(key(prefix)).arg(pod).query_async(conn).await
}

/// Live connection counts per pod of the fleet that uses `prefix`.
pub async fn fleet_stats<C: ConnectionLike>(conn: &mut C, prefix: &str) -> redis::RedisResult<BTreeMap<String, u64>> {
    let live: Vec<String> = READ.key(key(prefix)).invoke_async(conn).await?;
    Ok(live.chunks_exact(2).filter_map(|e| Some((e[0].clone(), e[1].parse().ok()?))).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_key_per_fleet() {
        assert_eq!(super::key("team-a.chat"), "team-a.chat:presence");
    }
}
