//! The Redis bus: a single Redis (`--redis-url`) joins the servers of a fleet.
//!
//! | module | job |
//! |---|---|
//! | [`keys`] | pure: the fleet's key and pub/sub names under its prefix |
//! | [`scripts`] | order and history: the publish and read Lua scripts, commands with timeouts |
//! | [`subscriber`] | the pub/sub connection: subscribe on demand, reconnect, refill, health |
//! | [`backlog`] | the hand-off from pub/sub to the hub, bounded in bytes (`--bus-buffer`) |
//! | [`presence`] | this server's presence entry, and reading the fleet's |
//! | [`budget`] | the fleet's reconnect budget for draining servers: a token bucket script |
//!
//! One multiplexed connection publishes for every client of this server (and carries the
//! presence heartbeat); one pub/sub connection subscribes. Local publishes also go through
//! Redis, so every server sees a channel's messages in the one order Redis gave them.
//!
//! Credentials: `--redis-password` (and `--redis-username` for an ACL user) go with every
//! connection this module opens, beside or instead of the URL's own `user:password@`
//! ([`client`]). A Redis that refuses them (`NOAUTH`, `WRONGPASS`, `NOPERM`) keeps the bus down:
//! the subscriber logs the reply code (never the secret), readiness says why, and
//! `wsfleet_bus_auth_failures_total` counts it.
//!
//! In the server, only this module (and the `fleet-stats` subcommand through [`presence`])
//! speaks Redis; the presence format it shares with the operator is `wsfleet_contract::presence`.
//! A second topology lives beside it as its own module.

pub mod backlog;
pub mod budget;
pub mod keys;
pub mod presence;
pub mod scripts;
pub mod subscriber;

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use self::keys::Keys;
use self::presence::RedisPresence;
pub use self::presence::fleet_stats;
use self::scripts::{CommandError, RedisHistory};
use self::subscriber::Subscriber;
use crate::messaging::bus::{Backend, Bus, BusError, BusHealth, BusState, PresenceStore, Start};
use crate::messaging::history::{Outgoing, Published, Replay, Since};
use crate::messaging::hub::Hub;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// Subscribe and unsubscribe requests of the hub waiting for the subscriber task, at most.
const COMMAND_QUEUE: usize = 4096;

/// Where the fleet's Redis is, and who this server is to it.
#[derive(Clone, Copy, Default)]
pub struct Target<'a> {
    pub url: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a str>,
}

/// The client for `target`: its URL with the credentials given beside it. A credential given
/// both in the URL and beside it is refused rather than one silently winning.
pub fn client(target: Target<'_>) -> Result<redis::Client, BusError> {
    use redis::IntoConnectionInfo;
    let invalid = |e: redis::RedisError| BusError::InvalidUrl(Box::new(e));
    let info = target.url.into_connection_info().map_err(invalid)?;
    let mut settings = info.redis_settings().clone();
    if let Some(username) = target.username {
        if settings.username().is_some() {
            return Err(BusError::CredentialTwice("username"));
        }
        settings = settings.set_username(username);
    }
    if let Some(password) = target.password {
        if settings.password().is_some() {
            return Err(BusError::CredentialTwice("password"));
        }
        settings = settings.set_password(password);
    }
    redis::Client::open(info.set_redis_settings(settings)).map_err(invalid)
}

/// The reply code of a Redis that refused this server's credentials, `None` for any other
/// error. What a Redis operator looks up; it never contains the secret.
pub fn refused_credentials(e: &redis::RedisError) -> Option<&'static str> {
    match e.code() {
        Some("NOAUTH") => Some("NOAUTH"),
        Some("WRONGPASS") => Some("WRONGPASS"),
        Some("NOPERM") => Some("NOPERM"),
        // The client reports a refused AUTH without Redis's code: a wrong password, or one given
        // to a Redis that has none.
        _ if e.kind() == redis::ErrorKind::AuthenticationFailed => Some("WRONGPASS"),
        _ => None,
    }
}

/// Starts the Redis bus: the publishing connection (lazy: an unreachable Redis is retried, not
/// an error) and the subscriber task on `start.tracker`, until `start.shutdown`. Fails only on
/// invalid settings (the URL, a credential given twice).
pub fn start(target: Target<'_>, prefix: &str, start: Start<'_>) -> Result<Bus, BusError> {
    let invalid = |e: redis::RedisError| BusError::InvalidUrl(Box::new(e));
    let client = client(target)?;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(1)
        .set_max_delay(BACKOFF_MAX);
    let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(invalid)?;
    let history = RedisHistory::new(conn, Keys::new(prefix), start.history);
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let hub = Arc::new(Hub::new(Some(tx), start.hold_limit, start.metrics.clone()));
    let health = Arc::new(BusHealth::new(BusState::Connecting));
    let subscriber = Subscriber {
        client,
        history: history.clone(),
        hub: hub.clone(),
        commands: rx,
        health: health.clone(),
        metrics: start.metrics,
        refusals: Default::default(),
        checks: Default::default(),
        bus_buffer: start.bus_buffer,
    };
    start.tracker.spawn(subscriber.run(start.shutdown));
    Ok(Bus::new(Box::new(history), hub, health))
}

impl From<CommandError> for BusError {
    fn from(e: CommandError) -> Self {
        BusError::Unavailable(Box::new(e))
    }
}

impl Backend for RedisHistory {
    fn publish<'a>(
        &'a self,
        _hub: &'a Hub,
        channel: &'a str,
        messages: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Published, BusError>> {
        // Delivered to the local hub by the subscriber, in Redis's order like everyone else's.
        async move {
            RedisHistory::publish(self, channel, &messages)
                .await
                .map_err(|e| if e.may_have_run() { BusError::OutcomeUnknown(Box::new(e)) } else { BusError::from(e) })
        }
        .boxed()
    }

    fn read<'a>(&'a self, channel: &'a str, since: Option<&'a Since>) -> BoxFuture<'a, Result<Replay, BusError>> {
        async move { RedisHistory::read(self, channel, since).await.map_err(BusError::from) }.boxed()
    }

    fn presence(&self) -> Option<Arc<dyn PresenceStore>> {
        Some(Arc::new(RedisPresence::new(self.connection(), self.keys().clone())))
    }

    fn name(&self) -> &'static str {
        "redis"
    }
}
