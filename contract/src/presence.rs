//! Fleet presence in Redis: every server of a fleet keeps one key,
//! `<prefix>:presence:<pod>`, holding its live connection count with a short TTL (the server
//! refreshes it; a dead server's key expires). [`fleet_stats`] reads them all: the server's
//! `fleet-stats` subcommand and the operator's status both use it.

use std::collections::BTreeMap;

use redis::AsyncCommands;

/// The key of one server's entry.
pub fn key(prefix: &str, pod: &str) -> String {
    format!("{prefix}:presence:{pod}")
}

/// Live connection counts per pod of the fleet that uses `prefix`.
pub async fn fleet_stats<C>(conn: &mut C, prefix: &str) -> redis::RedisResult<BTreeMap<String, u64>>
where
    C: AsyncCommands,
{
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

#[cfg(test)]
mod tests {
    #[test]
    fn keys_name_the_fleet_and_the_pod() {
        assert_eq!(super::key("team-a.chat", "chat-server-0"), "team-a.chat:presence:chat-server-0");
    }
}
