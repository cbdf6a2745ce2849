//! Fleet presence: each server heartbeats its pod name and connection count into Redis with a
//! short TTL, and [`fleet_stats`] sums the live entries. A server that dies simply stops
//! refreshing its entry, which expires within [`PRESENCE_TTL`]; a server that drains removes its
//! entry at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often a server refreshes its entry.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(5);
/// How long an entry lives without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(15);

fn key(prefix: &str, pod: &str) -> String {
    format!("{prefix}:presence:{pod}")
}

/// Refreshes this server's entry until `stop`, then removes it.
pub async fn heartbeat(
    mut conn: ConnectionManager,
    prefix: String,
    pod: String,
    connections: impl Fn() -> u64,
    stop: CancellationToken,
) {
    let key = key(&prefix, &pod);
    let mut tick = tokio::time::interval(PRESENCE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                let set = conn.set_ex::<_, _, ()>(&key, connections(), PRESENCE_TTL.as_secs());
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), set).await {
                    debug!(error = %e, "presence heartbeat failed");
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), conn.del::<_, ()>(&key)).await;
}

/// Live connection counts per pod of the fleet that uses `prefix`.
pub async fn fleet_stats(client: &redis::Client, prefix: &str) -> redis::RedisResult<BTreeMap<String, u64>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    let pattern = key(prefix, "*");
    let mut keys: Vec<String> = Vec::new();
    {
        let mut iter = conn.scan_match::<_, String>(&pattern).await?;
        while let Some(k) = futures_util::StreamExt::next(&mut iter).await {
            keys.push(k?);
        }
    }
    let mut stats = BTreeMap::new();
    if keys.is_empty() {
        return Ok(stats);
    }
    let values: Vec<Option<u64>> = conn.mget(&keys).await?;
    let strip = key(prefix, "");
    for (k, v) in keys.iter().zip(values) {
        if let (Some(pod), Some(count)) = (k.strip_prefix(&strip), v) {
            stats.insert(pod.to_owned(), count);
        }
    }
    Ok(stats)
}
