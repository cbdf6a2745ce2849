//! One client's outbound queue: bounded, lock-light, and where a slow client is caught.
//!
//! Producers (the hub's fan-out, the connection's own replies) [`Outbox::push`] frames; the
//! connection's write loop takes them in batches. The outbox holds the client to a [`Budget`]:
//! frames queued, and bytes not yet written to the socket (queued, or taken by the write loop
//! and still waiting for the kernel). When a push would pass either, the client is too slow:
//! its queue is dropped and the write loop closes it with 1013 (Try Again Later). A slow client
//! therefore costs at most its budget (or one frame, when a single frame is larger) and never
//! delays the producer. Bytes are the frames as sent: a protocol-mode frame counts what its
//! JSON rendering made of the payload. The outbox counts its own slow verdict
//! (`slow_client_closes`), once per client, whoever pushed: callers need not.
//!
//! The queue is a `VecDeque` that allocates only when frames are waiting, and the write loop
//! waits on a single waker slot rather than a `Notify`, so an idle connection pays for a mutex,
//! an empty deque and one `Option<Waker>`.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::{Poll, Waker};

use prometheus_client::metrics::counter::Counter;

use crate::transport::frame::{self, Frame};

/// Why a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue overflowed: 1013.
    Slow,
    /// The socket took no byte for `--write-stall-timeout`: 1013 too (the client is slow, or
    /// its network stalled; either way it should come back later and resume).
    WriteStalled,
    /// The server drains: 1012 (Service Restart), reconnect elsewhere after the hint
    /// ([`crate::drain::close_reason`]).
    Draining { reconnect_after_ms: u16 },
    /// A message or frame over `--max-message-size`: 1009.
    TooLarge,
    /// A text frame that is not UTF-8: 1007.
    InvalidUtf8,
    /// A WebSocket protocol violation: 1002.
    ProtocolViolation,
    /// The bus could not take the raw-mode subscription: 1013 with its own reason.
    BusUnavailable,
    /// The connection's token expired and was not refreshed: 4001.
    TokenExpired,
    /// A raw-mode frame on a channel the token does not let its holder publish on: 1008.
    PublishForbidden,
    /// The peer sent a close frame (with this code); only the reply remains to be flushed.
    PeerClosed(Option<u16>),
    /// A raw-mode client published faster than `--publish-rate` allows: 1008.
    RateLimited,
    /// The server holds `--max-channels` channels and the raw-mode channel is not one of them:
    /// 1013 with its own reason.
    ChannelLimit,
    /// The raw-mode subscribe took longer than `--subscribe-timeout`: 1013 with its own reason.
    SubscribeTimeout,
}

impl CloseReason {
    /// The close frame the server sends: its own code and reason, or the echo of the peer's.
    pub fn frame(self) -> Frame {
        let (code, reason) = match self {
            CloseReason::Slow => (1013, "client too slow"),
            CloseReason::WriteStalled => (1013, "client not reading"),
            CloseReason::Draining { reconnect_after_ms } => {
                return frame::close(Some(1012), &crate::drain::close_reason(reconnect_after_ms));
            }
            CloseReason::TooLarge => (1009, "message too large"),
            CloseReason::InvalidUtf8 => (1007, "text frame is not valid UTF-8"),
            CloseReason::ProtocolViolation => (1002, "protocol violation"),
            CloseReason::BusUnavailable => (1013, "message bus unavailable"),
            CloseReason::TokenExpired => (4001, "token expired"),
            CloseReason::PublishForbidden => (1008, "token does not allow publishing on this channel"),
            CloseReason::RateLimited => (1008, "publish rate limit exceeded (--publish-rate)"),
            CloseReason::ChannelLimit => (1013, "server at its channel limit"),
            CloseReason::SubscribeTimeout => (1013, "subscribe timed out"),
            CloseReason::PeerClosed(code) => return frame::close(code.filter(|c| frame::is_valid_close_code(*c)), ""),
        };
        frame::close(Some(code), reason)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue was full: the client is now marked slow and will be closed.
    Overflow,
    /// The connection is already closing; the frame was dropped.
    Closed,
}

/// What one client may have waiting: frames queued, and bytes not yet written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub frames: usize,
    pub bytes: usize,
}

impl Budget {
    /// Whether `frames` frames and `bytes` bytes already waiting leave room for one more frame of
    /// `len` bytes. Nothing waiting always leaves room for one frame, whatever its size, so a
    /// budget below the largest frame delays nobody's messages forever.
    pub fn admits(&self, frames: usize, bytes: usize, len: usize) -> bool {
        frames < self.frames && (bytes == 0 || bytes.saturating_add(len) <= self.bytes)
    }

    /// Most messages one resume replays: three quarters of the budget, which leaves room in the
    /// client's queue for the `subscribed` reply and the live messages held meanwhile.
    pub fn replay_frames(&self) -> usize {
        (self.frames * 3 / 4).max(1)
    }

    /// Most bytes one resume replays, rendered as sent (the same three quarters).
    pub fn replay_bytes(&self) -> usize {
        (self.bytes / 4 * 3).max(1)
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Frame>,
    /// Bytes queued or taken by the write loop and not yet written to the socket.
    unwritten: usize,
    close: Option<CloseReason>,
    /// The write loop, when it waits for frames or for a slow verdict. One connection has one
    /// writer, so one slot is enough.
    waiting: Option<Waker>,
}

impl State {
    /// Remembers the writer's waker (`will_wake` spares a clone when the same task waits again).
    fn wait(&mut self, waker: &Waker) {
        match &self.waiting {
            Some(w) if w.will_wake(waker) => {}
            _ => self.waiting = Some(waker.clone()),
        }
    }
}

/// Wakes the writer, if it waits, after letting go of the lock.
fn wake(mut state: MutexGuard<'_, State>) {
    let waiting = state.waiting.take();
    drop(state);
    if let Some(w) = waiting {
        w.wake();
    }
}

pub struct Outbox {
    state: Mutex<State>,
    budget: Budget,
    /// Clients closed as too slow (the server's `slow_client_closes`).
    slow_closes: Counter,
}

impl Outbox {
    pub fn new(budget: Budget, slow_closes: Counter) -> Self {
        Outbox { state: Mutex::new(State::default()), budget, slow_closes }
    }

    pub fn push(&self, msg: Frame) -> Push {
        let mut state = self.lock();
        if state.close.is_some() {
            return Push::Closed;
        }
        if !self.budget.admits(state.queue.len(), state.unwritten, msg.len()) {
            state.queue = VecDeque::new();
            state.close = Some(CloseReason::Slow);
            wake(state);
            self.slow_closes.inc();
            return Push::Overflow;
        }
        state.unwritten += msg.len();
        state.queue.push_back(msg);
        wake(state);
        Push::Queued
    }

    /// The write loop wrote `bytes` of the frames it took: they no longer count.
    pub fn written(&self, bytes: usize) {
        let mut state = self.lock();
        state.unwritten = state.unwritten.saturating_sub(bytes);
    }

    /// The socket took nothing for the write stall timeout: what is queued is dropped, nothing
    /// more is taken, and the write loop sends the close of [`CloseReason::WriteStalled`] if the
    /// peer ever reads again. Returns whether this closed it (so the caller counts it once).
    pub fn close_stalled(&self) -> bool {
        let mut state = self.lock();
        if state.close.is_some() {
            return false;
        }
        state.queue = VecDeque::new();
        state.close = Some(CloseReason::WriteStalled);
        wake(state);
        true
    }

    /// Asks the write loop to close the connection after the frames already queued.
    /// The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(reason);
        }
        wake(state);
    }

    /// Marks the client too slow without a push (it fell behind while its frames were held
    /// elsewhere): it is closed with 1013 after what is queued, and counted, unless it is
    /// closing already.
    pub fn close_slow(&self) {
        let mut state = self.lock();
        if state.close.is_none() {
            state.close = Some(CloseReason::Slow);
            self.slow_closes.inc();
        }
        wake(state);
    }

    pub fn is_closing(&self) -> bool {
        self.lock().close.is_some()
    }

    /// Resolves once the client has been marked slow. Meant to race a blocked write.
    pub async fn slow(&self) {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if state.close == Some(CloseReason::Slow) {
                return Poll::Ready(());
            }
            state.wait(cx.waker());
            Poll::Pending
        })
        .await
    }

    /// Moves every queued frame into `batch` (which must be empty), waiting until there is at
    /// least one or a close was asked for. Returns the close reason once the queue is empty.
    pub async fn next_batch(&self, batch: &mut VecDeque<Frame>) -> Option<CloseReason> {
        std::future::poll_fn(|cx| {
            let mut state = self.lock();
            if !state.queue.is_empty() {
                std::mem::swap(&mut state.queue, batch);
                return Poll::Ready(None);
            }
            if state.close.is_some() {
                return Poll::Ready(state.close);
            }
            state.wait(cx.waker());
            Poll::Pending
        })
        .await
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves a consistent queue; keep going.
        wsfleet_contract::sync::lock(&self.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Frame {
        frame::text(s.as_bytes())
    }

    #[tokio::test]
    async fn batches_in_order() {
        let o = outbox(10);
        assert_eq!(o.push(text("a")), Push::Queued);
        assert_eq!(o.push(text("b")), Push::Queued);
        let mut batch = VecDeque::new();
        assert_eq!(o.next_batch(&mut batch).await, None);
        assert_eq!(batch, [text("a"), text("b")]);
    }

    fn outbox(frames: usize) -> Outbox {
        Outbox::new(Budget { frames, bytes: usize::MAX }, Counter::default())
    }

    #[tokio::test]
    async fn overflow_drops_the_queue_and_closes_slow() {
        let o = outbox(2);
        o.push(text("a"));
        o.push(text("b"));
        assert_eq!(o.push(text("c")), Push::Overflow);
        assert_eq!(o.push(text("d")), Push::Closed);
        let mut batch = VecDeque::new();
        assert_eq!(o.next_batch(&mut batch).await, Some(CloseReason::Slow));
        assert!(batch.is_empty());
        o.close_slow();
        assert_eq!(o.slow_closes.get(), 1, "one slow client, counted once");
    }

    #[tokio::test]
    async fn bytes_not_yet_written_count_against_the_budget() {
        let o = Outbox::new(Budget { frames: 100, bytes: 100 }, Counter::default());
        let kib = frame::text(&[b'x'; 40]);
        assert_eq!(o.push(kib.clone()), Push::Queued);
        assert_eq!(o.push(kib.clone()), Push::Queued);
        // The write loop takes both; until they are written they still count.
        let mut batch = VecDeque::new();
        assert_eq!(o.next_batch(&mut batch).await, None);
        o.written(kib.len());
        assert_eq!(o.push(kib.clone()), Push::Queued, "one written, room for one more");
        assert_eq!(o.push(kib), Push::Overflow, "three unwritten frames pass 100 bytes");
        assert_eq!(o.slow_closes.get(), 1);
    }

    #[test]
    fn an_empty_queue_takes_one_frame_of_any_size() {
        let budget = Budget { frames: 10, bytes: 100 };
        assert!(budget.admits(0, 0, 1000));
        assert!(!budget.admits(1, 1, 100));
        assert!(budget.admits(1, 1, 99));
        assert!(!budget.admits(10, 10, 1), "the frame count still caps");
        assert_eq!((budget.replay_frames(), budget.replay_bytes()), (7, 75));
    }

    #[tokio::test]
    async fn a_stalled_writer_drops_the_queue_and_closes_once() {
        let o = outbox(10);
        o.push(text("a"));
        assert!(o.close_stalled());
        assert!(!o.close_stalled());
        assert_eq!(o.push(text("b")), Push::Closed);
        let mut batch = VecDeque::new();
        assert_eq!(o.next_batch(&mut batch).await, Some(CloseReason::WriteStalled));
        assert!(batch.is_empty());
        assert_eq!(o.slow_closes.get(), 0, "a stall is not counted as an overflow");
    }

    #[tokio::test]
    async fn drain_close_comes_after_queued_frames() {
        let o = outbox(10);
        o.push(text("a"));
        o.close(CloseReason::Draining { reconnect_after_ms: 5 });
        o.close(CloseReason::Slow);
        let mut batch = VecDeque::new();
        assert_eq!(o.next_batch(&mut batch).await, None);
        assert_eq!(batch.len(), 1);
        batch.clear();
        assert_eq!(o.next_batch(&mut batch).await, Some(CloseReason::Draining { reconnect_after_ms: 5 }));
    }

    #[tokio::test]
    async fn a_waiting_writer_wakes_on_push() {
        let o = std::sync::Arc::new(outbox(10));
        let o2 = o.clone();
        let writer = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            o2.next_batch(&mut batch).await;
            batch.len()
        });
        tokio::task::yield_now().await;
        o.push(text("x"));
        assert_eq!(writer.await.unwrap(), 1);
    }
}
