//! Presence in a single Redis: this server's entry in its fleet's presence hash (the format and
//! its scripts are `wsfleet_contract::presence`, which the operator reads too), and the reading
//! of every entry that the `fleet-stats` subcommand prints.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::aio::ConnectionManager;
use wsfleet_contract::presence;

use super::keys::Keys;
use crate::messaging::bus::{BusError, PresenceStore};

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
        async move {
            presence::refresh(&mut conn, self.keys.prefix(), pod, connections, ttl)
                .await
                .map_err(|e| BusError::Unavailable(e.into()))
        }
        .boxed()
    }

    fn remove<'a>(&'a self, pod: &'a str) -> BoxFuture<'a, Result<(), BusError>> {
        let mut conn = self.conn.clone();
        async move {
            presence::remove(&mut conn, self.keys.prefix(), pod).await.map_err(|e| BusError::Unavailable(e.into()))
        }
        .boxed()
    }
}

/// Live connection counts per pod of the fleet that uses `prefix`.
pub async fn fleet_stats(client: &redis::Client, prefix: &str) -> redis::RedisResult<BTreeMap<String, u64>> {
    let mut conn = client.get_multiplexed_async_connection().await?;
    presence::fleet_stats(&mut conn, prefix).await
}
