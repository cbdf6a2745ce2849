//! Channel -> local subscribers, and the fan-out of every message that reaches this server.
//!
//! * A channel exists here while it has at least one local subscriber. Its first subscriber asks
//!   the bus to subscribe it; its last one leaving asks the bus to unsubscribe. A subscribe
//!   returns only once the bus confirms, so the subscriber sees every message published after.
//! * [`Hub::deliver`] renders a message once per client mode (see [`protocol`]) and pushes the
//!   same reference-counted frame into every subscriber's [`Outbox`]. A full outbox closes that
//!   client (1013, counted by the outbox); nobody else waits for it.
//! * Order and exactly-once: messages of one channel are delivered under that channel's lock, in
//!   the order the bus hands them over. The channel remembers the last `(epoch, offset)` it
//!   delivered and drops anything at or before it, so a gap refilled from history after a bus
//!   reconnect never duplicates a message.
//! * Trust: what the bus hands over from Redis pub/sub goes through [`Hub::admit`], which judges
//!   it against the cursor and the highest head Redis reported ([`admission`]) before it can move
//!   the cursor; history entries and the in-process bus go through [`Hub::deliver`].
//! * The seam of a resume: a protocol subscriber starts *gated*; live messages are held for it
//!   while its connection reads history. The connection renders the replay
//!   ([`Hub::render_replay`], outside any lock, within the replay's share of the client's
//!   [`Budget`]); [`Hub::open_gate`] then queues, under the channel lock, the `subscribed` reply,
//!   the replayed frames and the held messages after the replay's head, and from then on skips
//!   anything at or before that head. No gap, no duplicate. What is held for a gated subscriber
//!   is bounded by the same budget as its outbox; past it the client is closed as slow.
//!
//! * Loss is said: what the bus can no longer deliver (a gap history does not cover) is
//!   announced to the protocol subscribers it concerns, in order with their messages
//!   ([`Hub::announce_gap`]).
//!
//! * Locks: `deliver` holds a channel's lock for a whole fan-out, so nothing waits for a
//!   channel's lock while holding the channel map. A channel whose last subscriber left is
//!   marked closed, then taken out of the map under the map lock together with its bus
//!   Unsubscribe; a subscriber that finds it closed starts a new entry, whose Subscribe is
//!   therefore queued after that Unsubscribe.
//!
//! No I/O here: the hub talks to the bus only through a bounded command queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};

use wsfleet_contract::sync::{lock, read, write};

use crate::messaging::admission::{self, Refusal, Verdict};
use crate::messaging::envelope::{Sequenced, now_micros};
use crate::messaging::history::{Lost, Replay};
use crate::metrics::Metrics;
use crate::protocol::{self, RawFrame};
use crate::transport::frame::{self, Frame};
use crate::transport::outbox::{Budget, Outbox, Push};

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

/// A position in a channel's order.
pub type Position = (Arc<str>, u64);

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
    /// Messages at or before this position are not for this subscriber (it got them, or they
    /// predate it).
    skip_through: Option<Position>,
    /// While gated: live messages held back until the replay is queued.
    held: Option<Vec<(Position, Frame)>>,
    /// Bytes of `held`.
    held_bytes: usize,
}

#[derive(Default)]
struct ChannelState {
    subscribers: HashMap<ConnId, Subscriber>,
    /// The last position delivered here.
    cursor: Option<Position>,
    /// The highest position Redis reported for the channel (a join's read, a refill, a check).
    head: Option<Position>,
    /// When a message from pub/sub last had this channel's position read to check it.
    checked_at: Option<Instant>,
    /// Its last subscriber left: the entry is on its way out of the map and takes no one new.
    closed: bool,
}

struct Channel {
    generation: u64,
    state: Mutex<ChannelState>,
    confirmed: AtomicBool,
    confirmed_notify: Notify,
}

/// What became of a message from pub/sub ([`Hub::admit`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Delivered to the local subscribers, or dropped as a duplicate.
    Taken,
    /// Not believable as it stands: read the channel's position, give it to
    /// [`Hub::learn_head`], and admit the message again with `may_check` false.
    Check,
    Refused(Refusal),
    /// No local subscriber has the channel (any more).
    NotHere,
}

#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("the message bus did not confirm the subscription in time")]
    BusUnavailable,
    /// The server already holds its limit of channels (`--max-channels`), and this is a new one.
    #[error("this server holds {0} channels, its limit (--max-channels)")]
    ChannelLimit(usize),
}

pub struct Hub {
    channels: RwLock<HashMap<Arc<str>, Arc<Channel>>>,
    /// `None`: in-process bus, where every subscription is confirmed at once.
    bus: Option<mpsc::Sender<BusCommand>>,
    next_generation: AtomicU64,
    /// Most held for one gated subscriber (its outbox's budget).
    hold_limit: Budget,
    metrics: Arc<Metrics>,
    /// Most channels at once ([`Hub::limit_channels`]); unlimited until set.
    channel_limit: AtomicUsize,
}

impl Hub {
    pub fn new(bus: Option<mpsc::Sender<BusCommand>>, hold_limit: Budget, metrics: Arc<Metrics>) -> Self {
        Hub {
            channels: RwLock::default(),
            bus,
            next_generation: AtomicU64::new(1),
            hold_limit,
            metrics,
            channel_limit: AtomicUsize::new(usize::MAX),
        }
    }

    /// Caps the channels this hub holds: past `limit`, a subscribe that would add a channel
    /// fails with [`SubscribeError::ChannelLimit`] and changes nothing (checked under the map
    /// lock, so concurrent subscribes never overshoot).
    pub fn limit_channels(&self, limit: usize) {
        self.channel_limit.store(limit, Ordering::Relaxed);
    }

    /// Adds a local subscriber and waits until the bus delivers the channel to this server. A
    /// `gated` subscriber receives nothing until [`Hub::open_gate`].
    pub async fn subscribe(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: Arc<Outbox>,
        mode: Mode,
        gated: bool,
    ) -> Result<(), SubscribeError> {
        let sub = Subscriber { outbox, mode, skip_through: None, held: gated.then(Vec::new), held_bytes: 0 };
        // The map lock is never held while waiting for a channel's lock, which `deliver` holds
        // for a whole fan-out: every other channel's delivery needs the map too.
        let (entry, created) = loop {
            let mut channels = write(&self.channels);
            let Some(entry) = channels.get(channel).cloned() else {
                let limit = self.channel_limit.load(Ordering::Relaxed);
                if channels.len() >= limit {
                    return Err(SubscribeError::ChannelLimit(limit));
                }
                // A new entry holds its creator before anyone else can see it, so it cannot be
                // closed before the creator has asked the bus for the channel.
                let subscribers = HashMap::from([(conn, sub)]);
                let entry = Arc::new(Channel {
                    generation: self.next_generation.fetch_add(1, Ordering::Relaxed),
                    state: Mutex::new(ChannelState { subscribers, ..Default::default() }),
                    confirmed: AtomicBool::new(self.bus.is_none()),
                    confirmed_notify: Notify::new(),
                });
                channels.insert(Arc::from(channel), entry.clone());
                self.metrics.bus_channels.set(channels.len() as i64);
                break (entry, true);
            };
            drop(channels);
            let mut state = lock(&entry.state);
            if state.closed {
                // Its last subscriber just left; take it out (if that one has not yet) and
                // start a new entry.
                drop(state);
                self.retire(channel, &entry);
                continue;
            }
            state.subscribers.insert(conn, sub);
            drop(state);
            break (entry, false);
        };
        if created && let Some(bus) = &self.bus {
            let cmd = BusCommand::Subscribe { channel: Arc::from(channel), generation: entry.generation };
            if tokio::time::timeout(SUBSCRIBE_TIMEOUT, bus.send(cmd)).await.is_err() {
                self.unsubscribe(channel, conn);
                return Err(SubscribeError::BusUnavailable);
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
        if tokio::time::timeout(SUBSCRIBE_TIMEOUT, confirmed).await.is_err() {
            self.unsubscribe(channel, conn);
            return Err(SubscribeError::BusUnavailable);
        }
        Ok(())
    }

    /// Renders a resume's entries as a subscriber of `mode` receives them, without any lock held.
    /// When they come to more bytes than a client's budget leaves a replay
    /// ([`Budget::replay_bytes`]), nothing is replayed and `replay` says `history_gap`, as for a
    /// resume too far back: the client learns it missed messages instead of being closed as slow.
    pub fn render_replay(&self, channel: &str, mode: Mode, replay: &mut Replay) -> Vec<Frame> {
        let room = self.hold_limit.replay_bytes();
        let mut bytes = 0usize;
        let mut frames = Vec::with_capacity(replay.entries.len());
        for entry in &replay.entries {
            let frame = render(channel, mode, entry);
            bytes += frame.len();
            if bytes > room {
                replay.recovery = Some(Err(Lost::HistoryGap));
                replay.entries = Vec::new();
                return Vec::new();
            }
            frames.push(frame);
        }
        frames
    }

    /// Ends a subscriber's gate: queues `first` (the reply), then `replay` (rendered by
    /// [`Hub::render_replay`]), then the messages held meanwhile that come after `head`; later
    /// messages at or before `head` are skipped. Also gives the channel its starting cursor, so a
    /// bus reconnect knows where to refill from.
    pub fn open_gate(&self, channel: &str, conn: ConnId, first: Option<Frame>, replay: Vec<Frame>, head: Position) {
        let Some(entry) = read(&self.channels).get(channel).cloned() else { return };
        let mut state = lock(&entry.state);
        if state.cursor.is_none() {
            state.cursor = Some(head.clone());
        }
        raise(&mut state.head, &head);
        let Some(sub) = state.subscribers.get_mut(&conn) else { return };
        let mut held = sub.held.take().unwrap_or_default();
        sub.held_bytes = 0;
        // Held messages of the replay's epoch after its head (older epochs are history), in
        // order and once each: a message can be held twice when the channel's cursor ran ahead
        // of this subscriber's read ([`Hub::hold_for_gated`]).
        held.retain(|(pos, _)| pos.0 == head.0 && pos.1 > head.1);
        held.sort_by_key(|(pos, _)| pos.1);
        held.dedup_by_key(|(pos, _)| pos.1);
        let mut frames = first.into_iter().chain(replay);
        // Pushing stops at an overflow: the outbox has closed the client (and counted it).
        if !frames.any(|f| sub.outbox.push(f) == Push::Overflow) {
            let _ = held.into_iter().any(|(_, f)| sub.outbox.push(f) == Push::Overflow);
        }
        sub.skip_through = Some(head);
    }

    /// Removes a local subscriber; returns whether it was subscribed. The last one to leave
    /// closes the channel here and on the bus.
    pub fn unsubscribe(&self, channel: &str, conn: ConnId) -> bool {
        let Some(entry) = read(&self.channels).get(channel).cloned() else { return false };
        let mut state = lock(&entry.state);
        let was = state.subscribers.remove(&conn).is_some();
        let last = was && state.subscribers.is_empty();
        state.closed |= last;
        drop(state);
        if last {
            self.retire(channel, &entry);
        }
        was
    }

    /// Takes a closed entry out of the map (whoever comes first: its last subscriber, or a new
    /// one that found it closed) and asks the bus to unsubscribe, under the map lock: the
    /// Unsubscribe is queued before the Subscribe of any newer entry of the same name.
    fn retire(&self, channel: &str, entry: &Arc<Channel>) {
        let mut channels = write(&self.channels);
        if !channels.get(channel).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            return;
        }
        channels.remove(channel);
        self.metrics.bus_channels.set(channels.len() as i64);
        if let Some(bus) = &self.bus {
            // The bus drains its queue continuously; if it is momentarily full, the stale
            // subscription only costs messages that `deliver` ignores.
            let _ = bus.try_send(BusCommand::Unsubscribe { channel: Arc::from(channel) });
        }
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
        read(&self.channels).iter().map(|(name, c)| (name.clone(), c.generation)).collect()
    }

    /// The last position delivered on `channel`, for refilling a gap after a bus reconnect.
    pub fn cursor(&self, channel: &str) -> Option<Position> {
        let entry = read(&self.channels).get(channel).cloned()?;
        let state = lock(&entry.state);
        state.cursor.clone()
    }

    /// Records a position Redis reported for `channel` (a read), which vouches for every
    /// message up to it ([`admission`]).
    pub fn learn_head(&self, channel: &str, head: &Position) {
        if let Some(entry) = read(&self.channels).get(channel).cloned() {
            raise(&mut lock(&entry.state).head, head);
        }
    }

    /// Fans a message from Redis pub/sub out if it is believable ([`admission::judge`]); a
    /// refused one moves nothing. `may_check`: whether the caller can read the channel's
    /// position when asked to ([`Admission::Check`], at most once per channel per
    /// [`admission::CHECK_EVERY`]); without it, what cannot be believed now is refused.
    pub fn admit(&self, channel: &str, msg: &Sequenced, may_check: bool, now: Instant) -> Admission {
        let Some(entry) = read(&self.channels).get(channel).cloned() else { return Admission::NotHere };
        let mut state = lock(&entry.state);
        let (last, head) = (position(&state.cursor), position(&state.head));
        match admission::judge(last, head, &msg.epoch, msg.offset) {
            Verdict::Deliver => self.fan_out(channel, &mut state, msg),
            Verdict::Duplicate => self.hold_for_gated(channel, &mut state, msg),
            Verdict::Check(_) if may_check && admission::may_check(state.checked_at, now) => {
                state.checked_at = Some(now);
                return Admission::Check;
            }
            Verdict::Check(refusal) => return Admission::Refused(refusal),
        }
        Admission::Taken
    }

    /// Tells the channel's protocol-mode subscribers, in order with its messages, that offsets
    /// from `from` to `to` (inclusive; `None`: to the end of that epoch) will not reach them
    /// (a `gap` frame, see [`protocol::gap_frame`]). Subscribers that joined after the gap, or
    /// are still reading history for their own resume, are not told. Returns how many were.
    pub fn announce_gap(&self, channel: &str, from: Position, to: Option<u64>, lost: Lost) -> usize {
        let Some(entry) = read(&self.channels).get(channel).cloned() else { return 0 };
        let mut state = lock(&entry.state);
        let frame = frame::text(protocol::gap_frame(channel, &from.0, from.1, to, lost.as_str()).as_bytes());
        let mut told = 0;
        for sub in state.subscribers.values_mut() {
            // Joined in another epoch, or after the gap's last offset.
            let joined_after =
                sub.skip_through.as_ref().is_some_and(|skip| skip.0 != from.0 || to.is_some_and(|to| to <= skip.1));
            if sub.mode != Mode::Protocol || sub.held.is_some() || joined_after {
                continue;
            }
            sub.outbox.push(frame.clone());
            told += 1;
        }
        told
    }

    /// Fans one message out to the channel's local subscribers. Messages at or before the
    /// channel's cursor (same epoch) were delivered already and are dropped. For messages whose
    /// position is known to be real: history entries, the in-process bus.
    pub fn deliver(&self, channel: &str, msg: &Sequenced) {
        let Some(entry) = read(&self.channels).get(channel).cloned() else { return };
        let mut state = lock(&entry.state);
        if let Some(cursor) = &state.cursor
            && cursor.0 == msg.epoch
            && msg.offset <= cursor.1
        {
            return self.hold_for_gated(channel, &mut state, msg);
        }
        self.fan_out(channel, &mut state, msg);
    }

    /// A message at or before the channel's cursor: delivered already to every subscriber that
    /// is live, but not necessarily to one still reading history. The cursor may have been set
    /// by another subscriber's read, whose head was later than this one's ([`Hub::open_gate`]):
    /// without this, a message between the two heads reached the second subscriber neither in
    /// its replay nor live. Each gated subscriber holds it; its own head decides at the gate.
    fn hold_for_gated(&self, channel: &str, state: &mut ChannelState, msg: &Sequenced) {
        let pos: Position = (msg.epoch.clone(), msg.offset);
        let mut rendered: [Option<Frame>; 2] = [None, None];
        for sub in state.subscribers.values_mut() {
            let Some(held) = &mut sub.held else { continue };
            let frame = rendered[sub.mode as usize].get_or_insert_with(|| render(channel, sub.mode, msg)).clone();
            if self.hold_limit.admits(held.len(), sub.held_bytes, frame.len()) {
                sub.held_bytes += frame.len();
                held.push((pos.clone(), frame));
            } else {
                sub.outbox.close_slow();
            }
        }
    }

    /// Moves the cursor to `msg` and hands it to every subscriber, under the channel's lock.
    fn fan_out(&self, channel: &str, state: &mut ChannelState, msg: &Sequenced) {
        let pos: Position = (msg.epoch.clone(), msg.offset);
        state.cursor = Some(pos.clone());
        let latency = now_micros().saturating_sub(msg.envelope.published_at_micros);
        self.metrics.deliver_latency.observe(latency as f64 / 1e6);
        let mut rendered: [Option<Frame>; 2] = [None, None];
        for sub in state.subscribers.values_mut() {
            if sub.skip_through.as_ref().is_some_and(|skip| at_or_before(&pos, skip)) {
                continue;
            }
            let frame = rendered[sub.mode as usize].get_or_insert_with(|| render(channel, sub.mode, msg)).clone();
            match &mut sub.held {
                Some(held) if self.hold_limit.admits(held.len(), sub.held_bytes, frame.len()) => {
                    sub.held_bytes += frame.len();
                    held.push((pos.clone(), frame));
                }
                Some(_) => sub.outbox.close_slow(),
                // A full outbox closes its client and counts it.
                None => {
                    sub.outbox.push(frame);
                }
            }
        }
    }
}

fn position(p: &Option<Position>) -> Option<(&str, u64)> {
    p.as_ref().map(|(epoch, offset)| (&**epoch, *offset))
}

/// Raises a channel's known head to `to`: later in the same epoch, or any position of another
/// epoch (the latest read knows the channel's current one).
fn raise(head: &mut Option<Position>, to: &Position) {
    if !head.as_ref().is_some_and(|h| h.0 == to.0 && h.1 >= to.1) {
        *head = Some(to.clone());
    }
}

/// `a` is at or before `b` in the same epoch.
fn at_or_before(a: &Position, b: &Position) -> bool {
    a.1 <= b.1 && (Arc::ptr_eq(&a.0, &b.0) || a.0 == b.0)
}

/// The frame a subscriber of `mode` receives for `msg`.
fn render(channel: &str, mode: Mode, msg: &Sequenced) -> Frame {
    match mode {
        Mode::Raw => match protocol::encode_raw(&msg.envelope.payload) {
            // UTF-8 already: checked where it entered (the frame reader, or the envelope decoder
            // for what came over the bus).
            RawFrame::Text(b) => frame::text(&b),
            RawFrame::Binary(b) => frame::binary(&b),
        },
        Mode::Protocol => {
            frame::text(protocol::encode_message(channel, &msg.epoch, msg.offset, &msg.envelope.payload).as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messaging::envelope::{Envelope, Payload};
    use prometheus_client::metrics::counter::Counter;
    use std::collections::VecDeque;

    fn budget(frames: usize) -> Budget {
        Budget { frames, bytes: usize::MAX }
    }

    fn outbox(frames: usize) -> Arc<Outbox> {
        Arc::new(Outbox::new(budget(frames), Counter::default()))
    }

    fn local_hub() -> Hub {
        Hub::new(None, budget(16), Arc::new(Metrics::new()))
    }

    fn seq(epoch: &str, offset: u64, text: &str) -> Sequenced {
        Sequenced {
            epoch: Arc::from(epoch),
            offset,
            envelope: Envelope::new(Payload::Json(bytes::Bytes::from(serde_json::to_string(text).unwrap()))),
        }
    }

    async fn drain(o: &Outbox) -> Vec<Frame> {
        let mut batch = VecDeque::new();
        o.next_batch(&mut batch).await;
        batch.into()
    }

    fn payload(f: &Frame) -> &str {
        std::str::from_utf8(frame::decode_server_frame(f).unwrap().1).unwrap()
    }

    fn offsets(frames: &[Frame]) -> Vec<u64> {
        frames
            .iter()
            .filter_map(|f| serde_json::from_str::<serde_json::Value>(payload(f)).ok()?["offset"].as_u64())
            .collect()
    }

    #[tokio::test]
    async fn one_encoding_shared_by_all_subscribers_of_a_mode() {
        let hub = local_hub();
        let (a, b, c) = (outbox(8), outbox(8), outbox(8));
        hub.subscribe("room", 1, a.clone(), Mode::Protocol, false).await.unwrap();
        hub.subscribe("room", 2, b.clone(), Mode::Protocol, false).await.unwrap();
        hub.subscribe("room", 3, c.clone(), Mode::Raw, false).await.unwrap();
        hub.deliver("room", &seq("e", 1, "hi"));
        let (ma, mb, mc) = (drain(&a).await, drain(&b).await, drain(&c).await);
        assert_eq!(payload(&ma[0]), r#"{"type":"message","channel":"room","epoch":"e","offset":1,"data":"hi"}"#);
        assert_eq!(payload(&mc[0]), "hi");
        // Same allocation, not just equal bytes.
        assert_eq!(ma[0].as_ptr(), mb[0].as_ptr());
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_closed_and_the_others_keep_receiving() {
        let hub = local_hub();
        let (slow, fast) = (Arc::new(Outbox::new(budget(2), hub.metrics.slow_client_closes.clone())), outbox(100));
        hub.subscribe("c", 1, slow.clone(), Mode::Raw, false).await.unwrap();
        hub.subscribe("c", 2, fast.clone(), Mode::Raw, false).await.unwrap();
        for i in 1..=10 {
            hub.deliver("c", &seq("e", i, "x"));
        }
        assert!(slow.is_closing());
        assert_eq!(drain(&fast).await.len(), 10);
        assert_eq!(hub.metrics.slow_client_closes.get(), 1);
    }

    #[tokio::test]
    async fn duplicates_and_stale_offsets_are_dropped_per_channel() {
        let hub = local_hub();
        let o = outbox(100);
        hub.subscribe("c", 1, o.clone(), Mode::Protocol, false).await.unwrap();
        for (epoch, off) in [("e", 1), ("e", 2), ("e", 2), ("e", 1), ("e", 3), ("f", 1), ("f", 2)] {
            hub.deliver("c", &seq(epoch, off, "x"));
        }
        assert_eq!(offsets(&drain(&o).await), [1, 2, 3, 1, 2]);
        assert_eq!(hub.cursor("c"), Some((Arc::from("f"), 2)));
    }

    #[tokio::test]
    async fn a_forged_offset_is_refused_and_the_channel_keeps_delivering() {
        let hub = local_hub();
        let o = outbox(100);
        hub.subscribe("c", 1, o.clone(), Mode::Protocol, true).await.unwrap();
        hub.open_gate("c", 1, None, vec![], (Arc::from("e"), 4));
        let now = Instant::now();
        assert_eq!(hub.admit("c", &seq("e", 5, "real"), true, now), Admission::Taken);
        // Far ahead: checked once (the caller reads Redis's head: 5), then refused.
        assert_eq!(hub.admit("c", &seq("e", 1 << 60, "forged"), true, now), Admission::Check);
        hub.learn_head("c", &(Arc::from("e"), 5));
        let refused = Admission::Refused(Refusal::OffsetAhead);
        assert_eq!(hub.admit("c", &seq("e", 1 << 60, "forged"), false, now), refused);
        // A flood meanwhile gets no second check, and an unknown epoch none either.
        assert_eq!(hub.admit("c", &seq("e", 1 << 61, "forged"), true, now), refused);
        let unknown = Admission::Refused(Refusal::UnknownEpoch);
        assert_eq!(hub.admit("c", &seq("forged", 6, "forged"), true, now), unknown);
        for off in [6, 7] {
            assert_eq!(hub.admit("c", &seq("e", off, "real"), true, now), Admission::Taken);
        }
        assert_eq!(offsets(&drain(&o).await), [5, 6, 7]);
        assert_eq!(hub.cursor("c"), Some((Arc::from("e"), 7)));
        assert_eq!(hub.admit("gone", &seq("e", 1, "x"), true, now), Admission::NotHere);
    }

    #[tokio::test]
    async fn a_message_between_two_resumes_heads_reaches_both() {
        let hub = local_hub();
        let (a, b) = (outbox(100), outbox(100));
        hub.subscribe("c", 1, a.clone(), Mode::Protocol, true).await.unwrap();
        hub.subscribe("c", 2, b.clone(), Mode::Protocol, true).await.unwrap();
        let read = |head: u64| {
            let mut replay = Replay {
                epoch: Arc::from("e"),
                head,
                recovery: Some(Ok(())),
                entries: (4..=head).map(|o| seq("e", o, "replayed")).collect(),
            };
            hub.render_replay("c", Mode::Protocol, &mut replay)
        };
        // A read history when the head was 4, B a moment later at 5; B's gate opens first and
        // gives the channel its cursor (5). Then 5 arrives live: A needs it, B has it.
        let (replay_a, replay_b) = (read(4), read(5));
        hub.open_gate("c", 2, None, replay_b, (Arc::from("e"), 5));
        hub.deliver("c", &seq("e", 5, "live"));
        hub.deliver("c", &seq("e", 6, "live"));
        hub.open_gate("c", 1, None, replay_a, (Arc::from("e"), 4));
        hub.deliver("c", &seq("e", 7, "live"));
        assert_eq!(offsets(&drain(&a).await), [4, 5, 6, 7], "A: nothing missed, nothing twice");
        assert_eq!(offsets(&drain(&b).await), [4, 5, 6, 7], "B: nothing twice");
    }

    #[tokio::test]
    async fn the_resume_seam_has_no_gap_and_no_duplicate() {
        let hub = local_hub();
        let o = outbox(100);
        hub.subscribe("c", 1, o.clone(), Mode::Protocol, true).await.unwrap();
        // Live messages arrive while the connection reads history (head was 5 at the read).
        for off in [4, 5, 6, 7] {
            hub.deliver("c", &seq("e", off, "live"));
        }
        let mut replay = Replay {
            epoch: Arc::from("e"),
            head: 5,
            recovery: Some(Ok(())),
            entries: (3..=5).map(|o| seq("e", o, "replayed")).collect(),
        };
        let replay = hub.render_replay("c", Mode::Protocol, &mut replay);
        hub.open_gate("c", 1, Some(frame::text(b"subscribed")), replay, (Arc::from("e"), 5));
        hub.deliver("c", &seq("e", 8, "live"));
        let frames = drain(&o).await;
        assert_eq!(payload(&frames[0]), "subscribed");
        assert_eq!(offsets(&frames), [3, 4, 5, 6, 7, 8]);
    }

    #[tokio::test]
    async fn a_gap_is_announced_in_order_to_the_protocol_subscribers_it_concerns() {
        let hub = local_hub();
        let (before, raw, after, resuming) = (outbox(8), outbox(8), outbox(8), outbox(8));
        hub.subscribe("c", 1, before.clone(), Mode::Protocol, false).await.unwrap();
        hub.subscribe("c", 2, raw.clone(), Mode::Raw, false).await.unwrap();
        hub.deliver("c", &seq("e", 1, "x"));
        // One joins after the gap (its read saw offset 9), one is still reading history.
        hub.subscribe("c", 3, after.clone(), Mode::Protocol, true).await.unwrap();
        hub.open_gate("c", 3, None, Vec::new(), (Arc::from("e"), 9));
        hub.subscribe("c", 4, resuming.clone(), Mode::Protocol, true).await.unwrap();
        let told = hub.announce_gap("c", (Arc::from("e"), 2), Some(8), Lost::HistoryGap);
        hub.deliver("c", &seq("e", 9, "x"));
        hub.deliver("c", &seq("e", 10, "x"));
        assert_eq!(told, 1, "only the subscriber that was there before the gap");
        let frames = drain(&before).await;
        let gap: serde_json::Value = serde_json::from_str(payload(&frames[1])).unwrap();
        assert_eq!(gap["type"], "gap");
        assert_eq!((gap["from"].as_u64(), gap["to"].as_u64()), (Some(2), Some(8)));
        assert_eq!(offsets(&frames), [1, 9, 10], "the gap frame sits between 1 and 9");
        assert_eq!(offsets(&drain(&after).await), [10]);
        assert_eq!(drain(&raw).await.len(), 3);
        assert_eq!(hub.announce_gap("gone", (Arc::from("e"), 1), None, Lost::EpochChanged), 0);
    }

    #[tokio::test]
    async fn a_gated_subscriber_that_falls_too_far_behind_is_closed() {
        let hub = Hub::new(None, budget(3), Arc::new(Metrics::new()));
        let o = outbox(100);
        hub.subscribe("c", 1, o.clone(), Mode::Protocol, true).await.unwrap();
        for off in 1..=5 {
            hub.deliver("c", &seq("e", off, "x"));
        }
        assert!(o.is_closing());
    }

    #[tokio::test]
    async fn held_messages_and_replays_are_bounded_in_rendered_bytes() {
        let hub = Hub::new(None, Budget { frames: 100, bytes: 400 }, Arc::new(Metrics::new()));
        let o = outbox(100);
        hub.subscribe("c", 1, o.clone(), Mode::Protocol, true).await.unwrap();
        // A replay of 3 short messages fits three quarters of 400 bytes; 3 messages of 20
        // control characters (6 bytes each once escaped as JSON) do not.
        let entries = |text: &str| (1..=3).map(|off| seq("e", off, text)).collect::<Vec<_>>();
        let mut fits = Replay { epoch: Arc::from("e"), head: 3, recovery: Some(Ok(())), entries: entries("x") };
        assert_eq!(hub.render_replay("c", Mode::Protocol, &mut fits).len(), 3);
        assert!(fits.recovered());
        let escaped = "\u{1}".repeat(20);
        let mut too_big = Replay { epoch: Arc::from("e"), head: 3, recovery: Some(Ok(())), entries: entries(&escaped) };
        assert!(hub.render_replay("c", Mode::Protocol, &mut too_big).is_empty());
        assert_eq!((too_big.recovery, too_big.entries.len()), (Some(Err(Lost::HistoryGap)), 0));
        // Held live messages of about 72 bytes: five fit 400, the sixth does not.
        for off in 4..=8 {
            hub.deliver("c", &seq("e", off, "live"));
        }
        assert!(!o.is_closing());
        hub.deliver("c", &seq("e", 9, "live"));
        assert!(o.is_closing());
    }

    #[tokio::test]
    async fn channels_come_and_go_with_their_subscribers() {
        let (tx, mut rx) = mpsc::channel(8);
        let hub = Arc::new(Hub::new(Some(tx), budget(16), Arc::new(Metrics::new())));
        let h = hub.clone();
        let sub = tokio::spawn(async move { h.subscribe("c", 1, outbox(4), Mode::Raw, false).await });
        let Some(BusCommand::Subscribe { channel, generation }) = rx.recv().await else { panic!() };
        assert_eq!(&*channel, "c");
        hub.confirm("c", generation + 1); // a stale confirmation does not count
        tokio::task::yield_now().await;
        assert!(!sub.is_finished());
        hub.confirm("c", generation);
        sub.await.unwrap().unwrap();
        assert_eq!(hub.channels().len(), 1);
        assert!(hub.unsubscribe("c", 1));
        assert!(matches!(rx.recv().await, Some(BusCommand::Unsubscribe { .. })));
        assert!(hub.channels().is_empty());
        assert!(!hub.unsubscribe("c", 1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_unconfirmed_subscribe_fails_and_leaves_nothing_behind() {
        let (tx, _rx) = mpsc::channel(8);
        let hub = Hub::new(Some(tx), budget(16), Arc::new(Metrics::new()));
        let r = hub.subscribe("c", 1, outbox(4), Mode::Raw, false).await;
        assert!(matches!(r, Err(SubscribeError::BusUnavailable)));
        assert!(hub.channels().is_empty());
    }

    #[tokio::test]
    async fn past_the_channel_limit_only_held_channels_take_subscribers() {
        let hub = local_hub();
        hub.limit_channels(2);
        hub.subscribe("a", 1, outbox(4), Mode::Raw, false).await.unwrap();
        hub.subscribe("b", 1, outbox(4), Mode::Raw, false).await.unwrap();
        let refused = hub.subscribe("c", 2, outbox(4), Mode::Raw, false).await;
        assert!(matches!(refused, Err(SubscribeError::ChannelLimit(2))), "{refused:?}");
        assert_eq!(hub.channels().len(), 2, "nothing half-added");
        hub.subscribe("a", 2, outbox(4), Mode::Raw, false).await.expect("a held channel takes more subscribers");
        assert!(hub.unsubscribe("b", 1));
        hub.subscribe("c", 2, outbox(4), Mode::Raw, false).await.expect("room again once one is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fan_out_under_way_holds_up_no_other_channel() {
        let hub = Arc::new(local_hub());
        for (channel, conn) in [("busy", 1), ("busy", 2), ("other", 3)] {
            hub.subscribe(channel, conn, outbox(16), Mode::Raw, false).await.unwrap();
        }
        // Hold "busy" as `deliver` does during a fan-out, and have a subscriber leave it and
        // another join it meanwhile: both wait for that channel, and nothing else may.
        let busy = read(&hub.channels).get("busy").cloned().unwrap();
        let fan_out = lock(&busy.state);
        let (h1, h2) = (hub.clone(), hub.clone());
        let leaving = std::thread::spawn(move || h1.unsubscribe("busy", 1));
        let joining = tokio::spawn(async move {
            h2.subscribe("busy", 4, outbox(16), Mode::Raw, false).await.unwrap();
        });
        std::thread::sleep(Duration::from_millis(100));
        let (h3, o5) = (hub.clone(), outbox(16));
        let others = std::thread::spawn(move || {
            h3.deliver("other", &seq("e", 1, "x"));
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                h3.subscribe("third", 5, o5, Mode::Raw, false).await.unwrap();
                assert!(h3.unsubscribe("third", 5));
            });
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !others.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let others_done = others.is_finished();
        assert!(!leaving.is_finished() && !joining.is_finished(), "they wait for the busy channel");
        drop(fan_out);
        assert!(others_done, "a fan-out on one channel held up delivery and subscribes on others");
        others.join().unwrap();
        assert!(leaving.join().unwrap());
        joining.await.unwrap();
        let subscribers = |c: &str| read(&hub.channels).get(c).map(|e| lock(&e.state).subscribers.len());
        assert_eq!((subscribers("busy"), subscribers("other"), subscribers("third")), (Some(2), Some(1), None));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn churn_on_one_channel_keeps_the_bus_in_step() {
        let (tx, mut rx) = mpsc::channel(1024);
        let hub = Arc::new(Hub::new(Some(tx), budget(16), Arc::new(Metrics::new())));
        // The bus: confirms every Subscribe and records what it was asked, until the hub is gone.
        let h = Arc::downgrade(&hub);
        let bus = tokio::spawn(async move {
            let mut log = Vec::new();
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    BusCommand::Subscribe { channel, generation } => {
                        log.push(true);
                        if let Some(h) = h.upgrade() {
                            h.confirm(&channel, generation);
                        }
                    }
                    BusCommand::Unsubscribe { .. } => log.push(false),
                }
            }
            log
        });
        let clients: Vec<_> = (0..8u64)
            .map(|c| {
                let hub = hub.clone();
                tokio::spawn(async move {
                    for round in 0..200u64 {
                        let conn = c * 1000 + round;
                        hub.subscribe("c", conn, outbox(4), Mode::Raw, false).await.unwrap();
                        if round % 3 == 0 {
                            tokio::task::yield_now().await;
                        }
                        assert!(hub.unsubscribe("c", conn));
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        assert!(hub.channels().is_empty());
        drop(hub);
        let log = bus.await.unwrap();
        // Subscribe and Unsubscribe alternate, starting with a Subscribe and ending with an
        // Unsubscribe: the bus ends subscribed exactly when the hub has the channel.
        assert!(log.len() >= 2 && log.len() % 2 == 0, "{} commands", log.len());
        assert!(log.iter().enumerate().all(|(i, subscribe)| *subscribe == (i % 2 == 0)), "{log:?}");
    }
}
