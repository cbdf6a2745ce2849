//! Channel -> local subscribers, and the fan-out of every message that reaches this server.
//!
//! * A channel exists here while it has at least one local subscriber. Its first subscriber asks
//!   the bus to subscribe it; its last one leaving asks the bus to unsubscribe. A subscriber is
//!   told "subscribed" only once the bus confirms, so it sees every message published after that.
//! * [`Hub::deliver`] renders a message once per client mode (see [`protocol`]) and pushes the
//!   same reference-counted frame into every subscriber's [`Outbox`]. A full outbox closes that
//!   client (1013); nobody else waits for it.
//! * Messages of one channel are delivered under that channel's lock, in the order the bus hands
//!   them over, so every local subscriber sees one order.
//!
//! No I/O here: the hub talks to the bus only through a bounded command queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::envelope::{Envelope, now_micros};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Push};
use crate::protocol::{self, Payload, RawFrame};

/// How long a subscribe waits for the bus to confirm before it fails with `bus_unavailable`.
pub const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The two client modes of the public interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `/ws/<channel>`: payloads as-is.
    Raw,
    /// `/ws`: JSON frames.
    Protocol,
}

pub type ConnId = u64;

/// What the hub asks of the bus. `generation` ties a confirmation to the channel entry that
/// asked for it, so a late confirmation never vouches for a newer entry of the same name.
#[derive(Debug)]
pub enum BusCommand {
    Subscribe { channel: Arc<str>, generation: u64 },
    Unsubscribe { channel: Arc<str> },
}

struct Subscriber {
    outbox: Arc<Outbox>,
    mode: Mode,
}

struct Channel {
    generation: u64,
    subscribers: Mutex<HashMap<ConnId, Subscriber>>,
    confirmed: AtomicBool,
    confirmed_notify: Notify,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("the message bus did not confirm the subscription in time")]
    BusUnavailable,
}

pub struct Hub {
    channels: RwLock<HashMap<Arc<str>, Arc<Channel>>>,
    /// `None`: in-process bus, where every subscription is confirmed at once.
    bus: Option<mpsc::Sender<BusCommand>>,
    next_generation: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Hub {
    pub fn new(bus: Option<mpsc::Sender<BusCommand>>, metrics: Arc<Metrics>) -> Self {
        Hub {
            channels: RwLock::default(),
            bus,
            next_generation: AtomicU64::new(1),
            metrics,
        }
    }

    /// Adds a local subscriber and waits until the bus delivers the channel to this server.
    pub async fn subscribe(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: Arc<Outbox>,
        mode: Mode,
    ) -> Result<(), SubscribeError> {
        let (entry, created) = {
            let mut channels = write(&self.channels);
            let mut created = false;
            let entry = channels
                .entry(Arc::from(channel))
                .or_insert_with(|| {
                    created = true;
                    Arc::new(Channel {
                        generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
                        subscribers: Mutex::default(),
                        confirmed: AtomicBool::new(self.bus.is_none()),
                        confirmed_notify: Notify::new(),
                    })
                })
                .clone();
            lock(&entry.subscribers).insert(conn, Subscriber { outbox, mode });
            (entry, created)
        };
        if created {
            self.metrics
                .bus_channels
                .set(read(&self.channels).len() as i64);
            if let Some(bus) = &self.bus {
                let cmd = BusCommand::Subscribe {
                    channel: Arc::from(channel),
                    generation: entry.generation,
                };
                if tokio::time::timeout(SUBSCRIBE_TIMEOUT, bus.send(cmd))
                    .await
                    .is_err()
                {
                    self.unsubscribe(channel, conn);
                    return Err(SubscribeError::BusUnavailable);
                }
            }
        }
        let confirmed = async {
            loop {
                let notified = entry.confirmed_notify.notified();
                if entry.confirmed.load(Ordering::Acquire) {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(SUBSCRIBE_TIMEOUT, confirmed)
            .await
            .is_err()
        {
            self.unsubscribe(channel, conn);
            return Err(SubscribeError::BusUnavailable);
        }
        Ok(())
    }

    /// Removes a local subscriber; returns whether it was subscribed.
    pub fn unsubscribe(&self, channel: &str, conn: ConnId) -> bool {
        let mut channels = write(&self.channels);
        let Some(entry) = channels.get(channel) else {
            return false;
        };
        let mut subs = lock(&entry.subscribers);
        let was = subs.remove(&conn).is_some();
        if subs.is_empty() {
            drop(subs);
            channels.remove(channel);
            self.metrics.bus_channels.set(channels.len() as i64);
            if let Some(bus) = &self.bus {
                // The bus drains its queue continuously; if it is momentarily full, the bus task
                // reconciles its subscriptions against `channels()` on the next reconnect anyway.
                let _ = bus.try_send(BusCommand::Unsubscribe {
                    channel: Arc::from(channel),
                });
            }
        }
        was
    }

    /// Called by the bus when `channel` (entry `generation`) is subscribed on the bus.
    pub fn confirm(&self, channel: &str, generation: u64) {
        if let Some(entry) = read(&self.channels).get(channel)
            && entry.generation == generation
        {
            entry.confirmed.store(true, Ordering::Release);
            entry.confirmed_notify.notify_waiters();
        }
    }

    /// Channels with local subscribers and their generations, for the bus to (re)subscribe.
    pub fn channels(&self) -> Vec<(Arc<str>, u64)> {
        read(&self.channels)
            .iter()
            .map(|(name, c)| (name.clone(), c.generation))
            .collect()
    }

    /// Fans one message out to the channel's local subscribers.
    pub fn deliver(&self, channel: &str, envelope: &Envelope) {
        let Some(entry) = read(&self.channels).get(channel).cloned() else {
            return;
        };
        let latency = now_micros().saturating_sub(envelope.published_at_micros);
        self.metrics.deliver_latency.observe(latency as f64 / 1e6);
        let mut raw: Option<Message> = None;
        let mut proto: Option<Message> = None;
        let mut slow = 0;
        let subs = lock(&entry.subscribers);
        for sub in subs.values() {
            let frame = match sub.mode {
                Mode::Raw => {
                    raw.get_or_insert_with(|| match protocol::encode_raw(&envelope.payload) {
                        RawFrame::Text(b) => {
                            Message::Text(Utf8Bytes::try_from(b).unwrap_or_default())
                        }
                        RawFrame::Binary(b) => Message::Binary(b),
                    })
                }
                Mode::Protocol => proto.get_or_insert_with(|| {
                    Message::text(protocol::encode_message(channel, &envelope.payload))
                }),
            };
            if sub.outbox.push(frame.clone()) == Push::Overflow {
                slow += 1;
            }
        }
        drop(subs);
        if slow > 0 {
            self.metrics.slow_client_closes.inc_by(slow);
        }
    }

    /// Convenience for the in-process bus and tests: deliver a payload published now.
    pub fn deliver_payload(&self, channel: &str, payload: Payload) {
        self.deliver(channel, &Envelope::new(payload));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    fn local_hub() -> Hub {
        Hub::new(None, Arc::new(Metrics::new()))
    }

    async fn drain(o: &Outbox) -> Vec<Message> {
        let mut batch = VecDeque::new();
        o.next_batch(&mut batch).await;
        batch.into()
    }

    #[tokio::test]
    async fn one_encoding_shared_by_all_subscribers_of_a_mode() {
        let hub = local_hub();
        let (a, b, c) = (
            Arc::new(Outbox::new(8)),
            Arc::new(Outbox::new(8)),
            Arc::new(Outbox::new(8)),
        );
        hub.subscribe("room", 1, a.clone(), Mode::Protocol)
            .await
            .unwrap();
        hub.subscribe("room", 2, b.clone(), Mode::Protocol)
            .await
            .unwrap();
        hub.subscribe("room", 3, c.clone(), Mode::Raw)
            .await
            .unwrap();
        hub.deliver_payload("room", Payload::Json(bytes::Bytes::from_static(br#""hi""#)));
        let (ma, mb, mc) = (drain(&a).await, drain(&b).await, drain(&c).await);
        assert_eq!(
            ma[0],
            Message::text(r#"{"type":"message","channel":"room","data":"hi"}"#)
        );
        assert_eq!(mc[0], Message::text("hi"));
        // Same allocation, not just equal bytes.
        let (Message::Text(x), Message::Text(y)) = (&ma[0], &mb[0]) else {
            panic!()
        };
        assert_eq!(x.as_str().as_ptr(), y.as_str().as_ptr());
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_closed_and_the_others_keep_receiving() {
        let hub = local_hub();
        let (slow, fast) = (Arc::new(Outbox::new(2)), Arc::new(Outbox::new(100)));
        hub.subscribe("c", 1, slow.clone(), Mode::Raw)
            .await
            .unwrap();
        hub.subscribe("c", 2, fast.clone(), Mode::Raw)
            .await
            .unwrap();
        for i in 0..10 {
            hub.deliver_payload("c", Payload::Text(format!("{i}").into()));
        }
        assert!(slow.is_closing());
        assert_eq!(drain(&fast).await.len(), 10);
        assert_eq!(hub.metrics.slow_client_closes.get(), 1);
    }

    #[tokio::test]
    async fn channels_come_and_go_with_their_subscribers() {
        let (tx, mut rx) = mpsc::channel(8);
        let hub = Arc::new(Hub::new(Some(tx), Arc::new(Metrics::new())));
        let h = hub.clone();
        let sub = tokio::spawn(async move {
            h.subscribe("c", 1, Arc::new(Outbox::new(4)), Mode::Raw)
                .await
        });
        let Some(BusCommand::Subscribe {
            channel,
            generation,
        }) = rx.recv().await
        else {
            panic!()
        };
        assert_eq!(&*channel, "c");
        hub.confirm("c", generation + 1); // a stale confirmation does not count
        tokio::task::yield_now().await;
        assert!(!sub.is_finished());
        hub.confirm("c", generation);
        sub.await.unwrap().unwrap();
        assert_eq!(hub.channels().len(), 1);
        assert!(hub.unsubscribe("c", 1));
        assert!(matches!(
            rx.recv().await,
            Some(BusCommand::Unsubscribe { .. })
        ));
        assert!(hub.channels().is_empty());
        assert!(!hub.unsubscribe("c", 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_subscribe_fails_and_leaves_nothing_behind() {
        let (tx, _rx) = mpsc::channel(8);
        let hub = Hub::new(Some(tx), Arc::new(Metrics::new()));
        let r = hub
            .subscribe("c", 1, Arc::new(Outbox::new(4)), Mode::Raw)
            .await;
        assert!(matches!(r, Err(SubscribeError::BusUnavailable)));
        assert!(hub.channels().is_empty());
    }
}
