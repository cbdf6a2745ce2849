//! Presence in a single Redis: this server's entry (a key with a TTL, see
//! `wsfleet_contract::presence` for its name), and the reading of every entry of a fleet that
//! the `fleet-stats` subcommand prints.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;

use super::keys::Keys;
use crate::messaging::bus::BusError;
use crate::messaging::presence::PresenceStore;

/// This server's presence entry, written over the bus's publishing connection.
pub struct RedisPresence {
    conn: ConnectionManager,
    keys: Keys,
}

impl RedisPresence {
    pub fn new(conn: ConnectionManager, keys: Keys) -> Self {
        RedisPresence { conn, keys }
    }
}

impl PresenceStore for RedisPresence {
    fn refresh<'a>(&'a self, pod: &'a str, connections: u64, ttl: Duration) -> BoxFuture<'a, Result<(), BusError>> {
        let mut conn = self.conn.clone();
        let key = self.keys.presence(pod);
        async move {
            conn.set_ex::<_, _, ()>(&key, connections, ttl.as_secs()).await.map_err(|e| BusError::Unavailable(e.into()))
        }
        .boxed()
    }

    fn remove<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        let mut conn = self.conn.clone();
        let key = self.keys.presence(pod);
        async move { conn.del::<_, ()>(&key).await.map_err(|e| BusError::Unavailable(e.into())) }.boxed()
    }
}

/// Live connection counts per pod of the fleet that uses `prefix`.
pub async fn fleet_stats(client: &redis::Client, prefix: &str) -> redis::RedisResult<BTreeMap<String, u64>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    wsfleet_contract::presence::fleet_stats(&mut conn, prefix).await
}
