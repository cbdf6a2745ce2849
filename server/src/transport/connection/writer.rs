//! The write side of a connection: the only code that writes to its socket once it is upgraded.
//! It hands every queued frame to one vectored write (frames are encoded once per message and
//! shared by every recipient, so a burst costs one syscall per client and no copy), queues the
//! keepalive ping, drops a peer silent past `ping interval + ping timeout`, closes the
//! connection when its token expires (4001; all on one timer), and abandons a write that blocks
//! while the outbox overflows for a 1013 close.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::time::{Duration, SystemTime};

use bytes::Buf;
use tokio::net::TcpStream;
use tracing::debug;

use super::{CLOSE_TIMEOUT, Heard, Shared};
use crate::transport::frame::{self, Frame};
use crate::transport::outbox::{CloseReason, Outbox};

/// Frames handed to one vectored write, at most.
const MAX_IOV: usize = 64;

/// Writes queued frames (one vectored write per batch), queues a keepalive ping every
/// `--ping-interval`, drops a peer silent past `ping interval + ping timeout`, and closes the
/// connection with 4001 when its token expires, all on one timer. Returns whether a close frame
/// went out (then the peer's answer is worth waiting for).
pub(super) async fn write_loop(stream: &TcpStream, outbox: &Outbox, shared: &Shared, heard: &Heard) -> bool {
    let mut batch = VecDeque::new();
    let mut next_ping = tokio::time::Instant::now() + shared.ping_interval;
    let timer = tokio::time::sleep_until(or_expiry(next_ping, heard));
    tokio::pin!(timer);
    loop {
        let close = tokio::select! {
            close = outbox.next_batch(&mut batch) => close,
            _ = &mut timer => {
                let now = tokio::time::Instant::now();
                let silent_at = heard.deadline(shared.silence_limit);
                if now >= silent_at {
                    debug!("peer silent past the ping timeout; dropping it");
                    return false;
                }
                if heard.token_exp().is_some_and(|exp| crate::auth::time_left(exp, SystemTime::now()).is_zero()) {
                    // Nothing more is delivered on an expired token: what is still queued is
                    // dropped, and the outbox takes nothing more while the close goes out.
                    debug!("token expired; closing");
                    outbox.close(CloseReason::TokenExpired);
                    Box::pin(finish(stream, VecDeque::new(), CloseReason::TokenExpired)).await;
                    return true;
                }
                if now >= next_ping {
                    // Queued like any frame: a peer that stopped reading overflows its queue and
                    // is closed as slow, or falls silent and is dropped here.
                    outbox.push(frame::ping());
                    next_ping = now + shared.ping_interval;
                }
                timer.as_mut().reset(or_expiry(next_ping.min(silent_at), heard));
                continue;
            }
        };
        // A refresh moves the expiry and always queues its reply, so the timer is re-aimed here,
        // on the batch that carries the reply.
        if heard.take_token_moved() {
            timer.as_mut().reset(or_expiry(next_ping.min(heard.deadline(shared.silence_limit)), heard));
        }
        if let Some(reason) = close {
            Box::pin(finish(stream, VecDeque::new(), reason)).await;
            return true;
        }
        // Everything queued by the time the writer runs goes in one write. (Yielding to the
        // scheduler first, to let more arrive, measured no better in the burst benchmark.)
        let (frames, bytes) = (batch.len() as u64, batch.iter().map(|f| f.len() as u64).sum::<u64>());
        // Boxed, like everything a connection only needs while it writes.
        match Box::pin(write_batch(stream, &mut batch, outbox, heard, shared.silence_limit)).await {
            Some(writes) => {
                shared.metrics.socket_writes.inc_by(writes);
                shared.metrics.messages_out.inc_by(frames);
                shared.metrics.bytes_out.inc_by(bytes);
            }
            None => return false,
        }
        // Give the buffer back: the outbox gets an unallocated queue on the next swap, so a
        // connection between bursts holds no queue memory (one allocation per batch instead).
        batch = VecDeque::new();
    }
}

/// `deadline`, or the connection's token expiry when that comes first.
fn or_expiry(deadline: tokio::time::Instant, heard: &Heard) -> tokio::time::Instant {
    match heard.token_exp() {
        Some(exp) => deadline.min(tokio::time::Instant::now() + crate::auth::time_left(exp, SystemTime::now())),
        None => deadline,
    }
}

/// Writes one batch; returns the number of write syscalls. `None`: the connection is over (the
/// socket failed, the peer fell silent while the write was blocked, or the client turned out
/// too slow and got its 1013).
async fn write_batch(
    stream: &TcpStream,
    batch: &mut VecDeque<Frame>,
    outbox: &Outbox,
    heard: &Heard,
    silence_limit: Duration,
) -> Option<u64> {
    let mut mid_frame = false;
    {
        let write = write_frames(stream, batch, &mut mid_frame);
        let silence = tokio::time::sleep_until(heard.deadline(silence_limit));
        tokio::pin!(write, silence);
        loop {
            tokio::select! {
                r = &mut write => return r.ok(),
                _ = outbox.slow() => break,
                _ = &mut silence => {
                    let silent_at = heard.deadline(silence_limit);
                    if tokio::time::Instant::now() >= silent_at {
                        debug!("peer silent past the ping timeout while a write waited; dropping it");
                        return None;
                    }
                    silence.as_mut().reset(silent_at);
                }
            }
        }
    }
    // Too slow: finish the frame under way (a close frame cannot follow half a frame), drop
    // the rest, then close.
    batch.truncate(usize::from(mid_frame));
    finish(stream, std::mem::take(batch), CloseReason::Slow).await;
    None
}

/// Writes every frame of `frames`, as many per syscall as the kernel takes; returns the number
/// of syscalls that wrote. `mid_frame` tells whether the socket has seen only part of the front
/// frame.
async fn write_frames(stream: &TcpStream, frames: &mut VecDeque<Frame>, mid_frame: &mut bool) -> io::Result<u64> {
    let mut writes = 0;
    while !frames.is_empty() {
        std::future::poll_fn(|cx| stream.poll_write_ready(cx)).await?;
        let result = {
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let n = frames.len().min(MAX_IOV);
            for (slice, frame) in slices.iter_mut().zip(frames.iter()) {
                *slice = IoSlice::new(frame);
            }
            stream.try_write_vectored(&slices[..n])
        };
        let mut written = match result {
            Ok(n) => {
                writes += 1;
                n
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(e) => return Err(e),
        };
        while written > 0 {
            let Some(front) = frames.front_mut() else { break };
            if written >= front.len() {
                written -= front.len();
                frames.pop_front();
                *mid_frame = false;
            } else {
                front.advance(written);
                written = 0;
                *mid_frame = true;
            }
        }
    }
    Ok(writes)
}

/// Sends `rest` (what must still go out before it) and the close frame of `reason`, bounded by
/// [`CLOSE_TIMEOUT`].
async fn finish(stream: &TcpStream, mut rest: VecDeque<Frame>, reason: CloseReason) {
    rest.push_back(reason.frame());
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, write_frames(stream, &mut rest, &mut false)).await;
}
