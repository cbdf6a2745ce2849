//! Pure: the Redis names of one fleet. Every key and pub/sub channel starts with the fleet's
//! `--redis-prefix`, so fleets can share a Redis and never read each other's messages.
//!
//! | name | what |
//! |---|---|
//! | `<prefix>:ch:<channel>` | the pub/sub channel of a wsfleet channel |
//! | `<prefix>:meta:<channel>` | hash: the channel's epoch and head offset |
//! | `<prefix>:hist:<channel>` | stream: the channel's history, entry ids `<offset>-0` |
//! | `<prefix>:ids:<channel>` | sorted set: the publish ids of the channel's latest offsets (score: the offset) |
//! | `<prefix>:presence` | hash: each server's connection count (`wsfleet_contract::presence`) |
//! | `<prefix>:drain-budget` | hash: the fleet's reconnect budget, a token bucket ([`super::budget`]) |
//!
//! A channel's keys are built from the same name, the place a sharded topology would put a
//! hash tag so that they share a slot.

use std::sync::Arc;

/// The names of one fleet's keys.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys { prefix: Arc::from(prefix) }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The pub/sub channel a server subscribes to for `channel`.
    pub fn pubsub(&self, channel: &str) -> String {
        format!("{}:ch:{channel}", self.prefix)
    }

    /// The wsfleet channel of a pub/sub channel name, `None` for another fleet's.
    pub fn channel_of<'a>(&self, pubsub: &'a str) -> Option<&'a str> {
        pubsub.strip_prefix(&*self.prefix)?.strip_prefix(":ch:")
    }

    pub fn meta(&self, channel: &str) -> String {
        format!("{}:meta:{channel}", self.prefix)
    }

    pub fn stream(&self, channel: &str) -> String {
        format!("{}:hist:{channel}", self.prefix)
    }

    /// The publish ids the channel remembers, each scored with the offset it was published at.
    pub fn ids(&self, channel: &str) -> String {
        format!("{}:ids:{channel}", self.prefix)
    }

    /// The hash of the fleet's presence entries.
    pub fn presence(&self) -> String {
        wsfleet_contract::presence::key(&self.prefix)
    }

    /// The token bucket every draining server of the fleet draws from.
    pub fn drain_budget(&self) -> String {
        format!("{}:drain-budget", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubsub_keys_round_trip_and_ignore_other_fleets() {
        let keys = Keys::new("fleet-a");
        assert_eq!(keys.pubsub("room:1"), "fleet-a:ch:room:1");
        assert_eq!(keys.channel_of("fleet-a:ch:room:1"), Some("room:1"));
        assert_eq!(keys.channel_of("fleet-b:ch:room:1"), None);
        assert_eq!(keys.channel_of("fleet-a:xx:room:1"), None);
        assert_eq!(keys.presence(), "fleet-a:presence");
        assert_eq!(keys.drain_budget(), "fleet-a:drain-budget");
    }
}
