//! The in-process bus: one server alone, no Redis. Publishing orders, records and delivers
//! straight into the local hub, with the semantics of the Redis scripts
//! ([`crate::messaging::history`]): offsets from 1 per epoch, a bounded history, a new epoch for a
//! channel idle past its TTL.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use wsfleet_contract::sync::lock;

use crate::messaging::bus::{Backend, Bus, BusError, BusHealth, BusState, PresenceStore, Start};
use crate::messaging::envelope::{Envelope, Sequenced, new_epoch};
use crate::messaging::history::{HistoryConfig, Lost, Outgoing, Placed, Published, Replay, Since};
use crate::messaging::hub::Hub;

/// The in-process bus, always up.
pub fn start(start: Start<'_>) -> Bus {
    let health = Arc::new(BusHealth::new(BusState::Connecting));
    health.set(BusState::Up, &start.metrics);
    let hub = Arc::new(Hub::new(None, start.hold_limit, start.metrics));
    Bus::new(Box::new(LocalHistory::new(start.history)), hub, health)
}

impl Backend for LocalHistory {
    fn publish<'a>(
        &'a self,
        hub: &'a Hub,
        channel: &'a str,
        messages: Vec<Outgoing>,
    ) -> BoxFuture<'a, Result<Published, BusError>> {
        let published = LocalHistory::publish(self, channel, messages, |msg| hub.deliver(channel, msg));
        futures_util::future::ready(Ok(published)).boxed()
    }

    fn read<'a>(&'a self, channel: &'a str, since: Option<&'a Since>) -> BoxFuture<'a, Result<Replay, BusError>> {
        futures_util::future::ready(Ok(LocalHistory::read(self, channel, since))).boxed()
    }

    fn presence(&self) -> Option<Arc<dyn PresenceStore>> {
        None
    }

    fn name(&self) -> &'static str {
        "in-process"
    }
}

/// Channel entries the in-process history keeps before it sweeps expired ones.
const SWEEP_AT: usize = 4096;

/// Order and history for the in-process bus, with the semantics of the Redis scripts.
pub struct LocalHistory {
    config: HistoryConfig,
    channels: Mutex<HashMap<String, LocalChannel>>,
}

struct LocalChannel {
    epoch: Arc<str>,
    head: u64,
    entries: VecDeque<Envelope>,
    /// Publish ids of the last [`HistoryConfig::id_window`] offsets, and their offsets.
    ids: HashMap<Box<str>, u64>,
    /// The same ids, oldest first, to forget them in order.
    id_order: VecDeque<(u64, Box<str>)>,
    touched: Instant,
}

impl LocalHistory {
    pub fn new(config: HistoryConfig) -> Self {
        LocalHistory { config, channels: Mutex::default() }
    }

    /// Orders and records messages, handing each to `deliver` while still holding the order, so
    /// deliveries happen in offset order. A message whose id the channel remembers is not
    /// published again.
    pub fn publish(&self, channel: &str, messages: Vec<Outgoing>, mut deliver: impl FnMut(&Sequenced)) -> Published {
        let mut channels = lock(&self.channels);
        let c = self.channel(&mut channels, channel);
        c.touched = Instant::now();
        let mut placed = Vec::with_capacity(messages.len());
        for Outgoing { envelope, id } in messages {
            if let Some(&offset) = id.as_ref().and_then(|id| c.ids.get(id)) {
                placed.push(Placed { offset, duplicate: true });
                continue;
            }
            c.head += 1;
            placed.push(Placed { offset: c.head, duplicate: false });
            if let Some(id) = id {
                c.ids.insert(id.clone(), c.head);
                c.id_order.push_back((c.head, id));
            }
            while c.id_order.front().is_some_and(|(offset, _)| offset + self.config.id_window() <= c.head) {
                if let Some((_, id)) = c.id_order.pop_front() {
                    c.ids.remove(&id);
                }
            }
            if self.config.size > 0 {
                c.entries.push_back(envelope.clone());
                while c.entries.len() as u64 > self.config.size {
                    c.entries.pop_front();
                }
            }
            deliver(&Sequenced { epoch: c.epoch.clone(), offset: c.head, envelope });
        }
        Published { epoch: c.epoch.clone(), placed }
    }

    pub fn read(&self, channel: &str, since: Option<&Since>) -> Replay {
        let mut channels = lock(&self.channels);
        let c = self.channel(&mut channels, channel);
        let (epoch, head) = (c.epoch.clone(), c.head);
        let Some(since) = since else { return Replay { epoch, head, recovery: None, entries: vec![] } };
        let first_kept = head + 1 - c.entries.len() as u64;
        let outcome = if *since.epoch != *epoch {
            Err(Lost::EpochChanged)
        } else if since.offset > head {
            Err(Lost::OffsetAhead)
        } else if since.offset + 1 < first_kept
            || head - since.offset > self.config.max_replay
            || Self::bytes_after(c, since.offset, first_kept) > self.config.max_replay_bytes
        {
            Err(Lost::HistoryGap)
        } else {
            Ok(())
        };
        let entries = match outcome {
            Ok(()) => c
                .entries
                .iter()
                .skip((since.offset + 1 - first_kept) as usize)
                .enumerate()
                .map(|(i, e)| Sequenced {
                    epoch: epoch.clone(),
                    offset: since.offset + 1 + i as u64,
                    envelope: e.clone(),
                })
                .collect(),
            Err(_) => vec![],
        };
        Replay { epoch, head, recovery: Some(outcome), entries }
    }

    /// Bytes of the entries after `offset`, as the Redis script counts them (encoded envelopes).
    fn bytes_after(c: &LocalChannel, offset: u64, first_kept: u64) -> u64 {
        let skip = offset.saturating_add(1).saturating_sub(first_kept) as usize;
        c.entries.iter().skip(skip).map(|e| e.encode().len() as u64).sum()
    }

    /// The channel's state, replaced by a fresh epoch when it outlived its TTL. Channels past
    /// their TTL are forgotten once the map has grown, so clients naming ever new channels do
    /// not grow it without bound.
    fn channel<'a>(&self, channels: &'a mut HashMap<String, LocalChannel>, channel: &str) -> &'a mut LocalChannel {
        if channels.len() >= SWEEP_AT && !channels.contains_key(channel) {
            channels.retain(|_, c| c.touched.elapsed() <= self.config.ttl);
        }
        let fresh = || LocalChannel {
            epoch: Arc::from(new_epoch()),
            head: 0,
            entries: VecDeque::new(),
            ids: HashMap::new(),
            id_order: VecDeque::new(),
            touched: Instant::now(),
        };
        let c = channels.entry(channel.to_owned()).or_insert_with(fresh);
        if c.touched.elapsed() > self.config.ttl {
            *c = fresh();
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::envelope::Payload;
    use bytes::Bytes;
    use std::time::Duration;

    fn env(s: &'static str) -> Envelope {
        Envelope { published_at_micros: 0, payload: Payload::Text(Bytes::from_static(s.as_bytes())) }
    }

    fn out(e: Envelope) -> Vec<Outgoing> {
        vec![Outgoing { envelope: e, id: None }]
    }

    fn local(size: u64) -> LocalHistory {
        LocalHistory::new(HistoryConfig {
            size,
            ttl: Duration::from_secs(60),
            max_replay: 100,
            max_replay_bytes: 1 << 20,
        })
    }

    fn publish_all(h: &LocalHistory, msgs: &[&'static str]) -> Vec<u64> {
        let mut offsets = vec![];
        for m in msgs {
            h.publish("c", out(env(m)), |s| offsets.push(s.offset));
        }
        offsets
    }

    #[test]
    fn offsets_count_up_from_one_per_channel() {
        let h = local(10);
        assert_eq!(publish_all(&h, &["a", "b", "c"]), [1, 2, 3]);
        let mut other = 0;
        h.publish("d", out(env("x")), |s| other = s.offset);
        assert_eq!(other, 1);
    }

    #[test]
    fn resume_replays_exactly_what_was_missed() {
        let h = local(10);
        let epoch = h.read("c", None).epoch;
        publish_all(&h, &["a", "b", "c", "d"]);
        let r = h.read("c", Some(&Since { epoch: epoch.to_string(), offset: 2 }));
        assert!(r.recovered());
        assert_eq!(r.head, 4);
        assert_eq!(r.entries.iter().map(|e| e.offset).collect::<Vec<_>>(), [3, 4]);
        assert_eq!(r.entries[0].envelope, env("c"));
        let r = h.read("c", Some(&Since { epoch: epoch.to_string(), offset: 4 }));
        assert!(r.recovered() && r.entries.is_empty());
    }

    #[test]
    fn resume_says_why_it_cannot() {
        let h = local(2);
        let epoch = h.read("c", None).epoch.to_string();
        publish_all(&h, &["a", "b", "c", "d"]);
        let lost = |since: Since| h.read("c", Some(&since)).recovery;
        assert_eq!(lost(Since { epoch: "other".into(), offset: 1 }), Some(Err(Lost::EpochChanged)));
        assert_eq!(lost(Since { epoch: epoch.clone(), offset: 9 }), Some(Err(Lost::OffsetAhead)));
        assert_eq!(lost(Since { epoch: epoch.clone(), offset: 1 }), Some(Err(Lost::HistoryGap)));
        assert_eq!(lost(Since { epoch, offset: 2 }), Some(Ok(())));
    }

    #[test]
    fn a_resume_never_replays_more_than_max_replay() {
        let h = local(1000);
        let epoch = h.read("c", None).epoch.to_string();
        for _ in 0..150 {
            h.publish("c", out(env("x")), |_| {});
        }
        let lost = |offset| h.read("c", Some(&Since { epoch: epoch.clone(), offset })).recovery;
        assert_eq!(lost(49), Some(Err(Lost::HistoryGap)), "101 behind, the cap is 100");
        assert_eq!(lost(50), Some(Ok(())));
    }

    #[test]
    fn a_resume_never_replays_more_than_max_replay_bytes() {
        let config = HistoryConfig { size: 100, ttl: Duration::from_secs(60), max_replay: 100, max_replay_bytes: 0 };
        let envelope_len = env("0123456789").encode().len() as u64;
        let h = LocalHistory::new(HistoryConfig { max_replay_bytes: 3 * envelope_len, ..config });
        let epoch = h.read("c", None).epoch.to_string();
        for _ in 0..5 {
            h.publish("c", out(env("0123456789")), |_| {});
        }
        let lost = |offset| h.read("c", Some(&Since { epoch: epoch.clone(), offset })).recovery;
        assert_eq!(lost(1), Some(Err(Lost::HistoryGap)), "4 entries, room for 3");
        assert_eq!(lost(2), Some(Ok(())));
    }

    #[test]
    fn no_history_still_orders_and_knows_when_nothing_was_missed() {
        let h = local(0);
        let epoch = h.read("c", None).epoch.to_string();
        publish_all(&h, &["a", "b"]);
        assert_eq!(h.read("c", Some(&Since { epoch: epoch.clone(), offset: 2 })).recovery, Some(Ok(())));
        assert_eq!(h.read("c", Some(&Since { epoch, offset: 1 })).recovery, Some(Err(Lost::HistoryGap)));
    }

    #[test]
    fn an_idle_channel_past_its_ttl_starts_a_new_epoch() {
        let h = LocalHistory::new(HistoryConfig {
            size: 10,
            ttl: Duration::from_millis(1),
            max_replay: 100,
            max_replay_bytes: 1 << 20,
        });
        let first = h.read("c", None).epoch;
        publish_all(&h, &["a"]);
        std::thread::sleep(Duration::from_millis(5));
        let r = h.read("c", Some(&Since { epoch: first.to_string(), offset: 1 }));
        assert_eq!(r.recovery, Some(Err(Lost::EpochChanged)));
        assert_eq!(r.head, 0);
    }

    #[test]
    fn a_retried_id_is_placed_where_the_first_went_while_the_channel_remembers_it() {
        let h = local(0);
        let with_id = |id: &str| vec![Outgoing { envelope: env("x"), id: Some(id.into()) }];
        let mut delivered = vec![];
        let first = h.publish("c", with_id("a"), |s| delivered.push(s.offset));
        let again = h.publish("c", [with_id("b"), with_id("a"), with_id("b")].concat(), |s| delivered.push(s.offset));
        assert_eq!(first.placed, [Placed { offset: 1, duplicate: false }]);
        let placed: Vec<_> = again.placed.iter().map(|p| (p.offset, p.duplicate)).collect();
        assert_eq!(placed, [(2, false), (1, true), (2, true)]);
        assert_eq!(delivered, [1, 2], "each id published once");
        // Past the id window, an id is forgotten (and so bounded).
        let window = h.config.id_window();
        for _ in 0..window {
            h.publish("c", out(env("y")), |_| {});
        }
        assert!(!h.publish("c", with_id("a"), |_| {}).placed[0].duplicate);
        let c = lock(&h.channels);
        assert!(c["c"].ids.len() as u64 <= window && c["c"].id_order.len() == c["c"].ids.len());
    }
}
