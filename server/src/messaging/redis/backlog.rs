//! The bounded hand-off between Redis pub/sub and the hub.
//!
//! The redis crate reads a pub/sub connection into a queue of its own that has no bound. A task
//! ([`pump`]) empties it as fast as messages arrive into this [`Backlog`], bounded in bytes
//! (`--bus-buffer`), which the subscriber's session drains into the hub. So the crate's queue
//! stays short, and what waits for delivery is counted here: the first message that would take
//! the backlog past its budget ends the pump instead ([`End::Overflow`]), and the subscriber
//! drops the connection and catches up from history. A message that arrives to an empty backlog
//! is always taken, whatever its size, so one large message cannot end every session.
//!
//! What waits is published to [`BusLag`] (readiness and `/metrics` read it) and to the
//! `bus_queue_*` gauges on every change: counts and one timestamp, no allocation.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, StreamExt};
use tokio::sync::Notify;
use wsfleet_contract::sync::lock;

use crate::messaging::bus::BusLag;
use crate::messaging::envelope::now_micros;
use crate::metrics::Metrics;

/// What a waiting message costs besides its payload and channel name (its place in the queue,
/// the crate's message struct), in bytes.
const OVERHEAD: usize = 64;

/// Why the pump stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The connection closed.
    Closed,
    /// The backlog was full: delivery fell behind by more than the budget.
    Overflow,
}

/// Messages received from pub/sub and not yet handed to the hub, at most `budget` bytes.
pub struct Backlog<T> {
    state: Mutex<State<T>>,
    ready: Notify,
    budget: usize,
    lag: Arc<dyn LagSink>,
}

struct State<T> {
    /// Each message with its size and when it arrived (wall clock, µs).
    queue: VecDeque<(T, usize, u64)>,
    bytes: usize,
    end: Option<End>,
}

/// Where a backlog reports what waits (the bus's health and the gauges; nothing in tests).
pub trait LagSink: Send + Sync {
    fn report(&self, messages: u64, bytes: u64, oldest_micros: u64);
}

/// Reports to the bus's [`BusLag`] and the `bus_queue_*` gauges.
pub struct Reported {
    pub health: Arc<crate::messaging::bus::BusHealth>,
    pub metrics: Arc<Metrics>,
}

impl LagSink for Reported {
    fn report(&self, messages: u64, bytes: u64, oldest_micros: u64) {
        let lag: &BusLag = &self.health.lag;
        lag.set(messages, bytes, oldest_micros);
        self.metrics.bus_queue_messages.set(messages as i64);
        self.metrics.bus_queue_bytes.set(bytes as i64);
    }
}

impl<T> Backlog<T> {
    pub fn new(budget: usize, lag: Arc<dyn LagSink>) -> Self {
        let state = State { queue: VecDeque::new(), bytes: 0, end: None };
        Backlog { state: Mutex::new(state), ready: Notify::new(), budget, lag }
    }

    /// Takes `msg` of `size` bytes, unless that would pass the budget (and something waits
    /// already): then the backlog ends with [`End::Overflow`] and `false` is returned.
    pub fn push(&self, msg: T, size: usize) -> bool {
        let size = size + OVERHEAD;
        let mut state = lock(&self.state);
        if state.end.is_some() {
            return false;
        }
        if !state.queue.is_empty() && state.bytes + size > self.budget {
            state.end = Some(End::Overflow);
            drop(state);
            self.ready.notify_one();
            return false;
        }
        state.bytes += size;
        state.queue.push_back((msg, size, now_micros()));
        self.report(&state);
        drop(state);
        self.ready.notify_one();
        true
    }

    /// Ends the backlog: what waits is still handed out, then [`Backlog::next`] says why.
    pub fn close(&self, end: End) {
        lock(&self.state).end.get_or_insert(end);
        self.ready.notify_one();
    }

    /// The oldest waiting message; once none waits and the backlog has ended, why it ended.
    /// An overflow is reported at once (what waits is dropped: history will repair it).
    pub async fn next(&self) -> Result<T, End> {
        loop {
            let notified = self.ready.notified();
            {
                let mut state = lock(&self.state);
                if state.end == Some(End::Overflow) {
                    state.queue.clear();
                    state.bytes = 0;
                    self.report(&state);
                    return Err(End::Overflow);
                }
                if let Some((msg, size, _)) = state.queue.pop_front() {
                    state.bytes -= size;
                    self.report(&state);
                    return Ok(msg);
                }
                if let Some(end) = state.end {
                    return Err(end);
                }
            }
            notified.await;
        }
    }

    fn report(&self, state: &State<T>) {
        let oldest = state.queue.front().map_or(0, |(_, _, at)| *at);
        self.lag.report(state.queue.len() as u64, state.bytes as u64, oldest);
    }
}

impl<T> Drop for Backlog<T> {
    fn drop(&mut self) {
        self.lag.report(0, 0, 0);
    }
}

/// Moves every message of `stream` into `backlog` until the stream ends or the backlog is full.
pub async fn pump(stream: impl Stream<Item = redis::Msg>, backlog: Arc<Backlog<redis::Msg>>) {
    tokio::pin!(stream);
    while let Some(msg) = stream.next().await {
        let size = msg.get_payload_bytes().len() + msg.get_channel_name().len();
        if !backlog.push(msg, size) {
            return;
        }
    }
    backlog.close(End::Closed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[derive(Default)]
    struct Seen(AtomicU64, AtomicU64);
    impl LagSink for Seen {
        fn report(&self, messages: u64, bytes: u64, _oldest: u64) {
            self.0.store(messages, Ordering::Relaxed);
            self.1.store(bytes, Ordering::Relaxed);
        }
    }

    #[tokio::test]
    async fn within_the_budget_everything_comes_out_in_order_then_the_end() {
        let seen = Arc::new(Seen::default());
        let b = Backlog::new(1000, seen.clone());
        for i in 0..5 {
            assert!(b.push(i, 100));
        }
        assert_eq!((seen.0.load(Ordering::Relaxed), seen.1.load(Ordering::Relaxed)), (5, 5 * (100 + OVERHEAD as u64)));
        b.close(End::Closed);
        for i in 0..5 {
            assert_eq!(b.next().await, Ok(i));
        }
        assert_eq!(b.next().await, Err(End::Closed));
        assert_eq!(seen.0.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn past_the_budget_it_overflows_and_drops_what_waits() {
        let seen = Arc::new(Seen::default());
        let b = Backlog::new(600, seen.clone());
        assert!(b.push(1, 10_000), "a message to an empty backlog is always taken");
        assert_eq!(b.next().await, Ok(1));
        assert!(b.push(2, 200) && b.push(3, 200));
        assert!(!b.push(4, 200), "the third would pass 600 bytes (with the overhead of each)");
        assert!(!b.push(5, 1), "an overflowed backlog takes nothing more");
        assert_eq!(b.next().await, Err(End::Overflow));
        assert_eq!((seen.0.load(Ordering::Relaxed), seen.1.load(Ordering::Relaxed)), (0, 0));
    }

    #[tokio::test]
    async fn a_waiting_reader_wakes_for_a_message() {
        let b = Arc::new(Backlog::new(500, Arc::new(Seen::default())));
        let reader = tokio::spawn({
            let b = b.clone();
            async move { b.next().await }
        });
        tokio::task::yield_now().await;
        b.push(7, 1);
        assert_eq!(reader.await.unwrap(), Ok(7));
    }
}
