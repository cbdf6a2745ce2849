//! The messaging half of the server: what a published message is, how it is ordered and
//! recorded, how it reaches every server of the fleet and, on each, every local subscriber.
//!
//! | module | job |
//! |---|---|
//! | [`envelope`] | pure: a published message's bytes on the bus, with its place in the order |
//! | [`history`] | pure: offsets, epochs, resume and why one fails — every backend's contract |
//! | [`admission`] | pure: which messages from Redis pub/sub a server believes |
//! | [`hub`] | channel -> local subscribers; encodes each message once and fans it out |
//! | [`bus`] | the bus the server uses, and the [`bus::Backend`] seam behind it |
//! | [`local`] | the in-process backend: one server alone |
//! | [`redis`] | the Redis backend: keys, scripts, subscriber, presence |
//! | [`presence`] | each server's connection count, heartbeated into the backend |
//!
//! Dependencies point one way: backends depend on the bus seam, the hub and the pure modules,
//! never the reverse; only this module, above them all, picks a backend ([`bus::Bus::start`]).
//! Nothing here knows a connection, only the [`crate::transport::outbox`] it pushes to.

pub mod admission;
pub mod bus;
pub mod envelope;
pub mod history;
pub mod hub;
pub mod local;
pub mod presence;
pub mod redis;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::bus::{Bus, BusError, Start};
use self::history::HistoryConfig;
use crate::metrics::Metrics;
use crate::transport::outbox::Budget;

impl Bus {
    /// Builds the hub and the bus: Redis with a URL, in-process without. A backend's tasks are
    /// spawned on `tracker` and stop on `shutdown`. Fails only on invalid settings: an
    /// unreachable Redis is retried. `hold_limit` bounds what the hub holds for one resuming
    /// subscriber (a client's outbox budget), `bus_buffer` the bytes received from the bus and not
    /// yet delivered.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        redis: Option<self::redis::Target<'_>>,
        prefix: &str,
        history: HistoryConfig,
        hold_limit: Budget,
        bus_buffer: usize,
        metrics: Arc<Metrics>,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Bus, BusError> {
        let start = Start { history, hold_limit, bus_buffer, metrics, tracker, shutdown };
        match redis {
            None => Ok(local::start(start)),
            Some(target) => self::redis::start(target, prefix, start),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn an_invalid_url_is_refused_up_front() {
        let tracker = TaskTracker::new();
        let history = HistoryConfig { size: 10, ttl: Duration::from_secs(10), max_replay: 10, max_replay_bytes: 1000 };
        let hold = Budget { frames: 10, bytes: 1000 };
        let metrics = Arc::new(Metrics::new());
        let target = redis::Target { url: "http://nope", ..Default::default() };
        let r = Bus::start(Some(target), "p", history, hold, 1 << 20, metrics, &tracker, CancellationToken::new());
        assert!(matches!(r, Err(BusError::InvalidUrl(_))));
    }

    #[test]
    fn a_credential_given_twice_is_refused_up_front() {
        let with = |url, username, password| redis::client(redis::Target { url, username, password });
        assert!(with("redis://127.0.0.1:1", Some("app"), Some("pw")).is_ok());
        assert!(with("redis://:pw@127.0.0.1:1", Some("app"), None).is_ok());
        let err = with("redis://:pw@127.0.0.1:1", None, Some("pw")).unwrap_err();
        assert!(matches!(err, BusError::CredentialTwice("password")), "{err}");
        assert!(!err.to_string().contains("pw@"), "{err}");
        let err = with("redis://app:pw@127.0.0.1:1", Some("other"), None).unwrap_err();
        assert!(matches!(err, BusError::CredentialTwice("username")), "{err}");
    }
}
