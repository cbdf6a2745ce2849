//! The write side of a connection: the only code that writes to its socket once it is upgraded.
//! It hands every queued frame to one vectored write (frames are encoded once per message and
//! shared by every recipient, so a burst costs one syscall per client and no copy), queues the
//! keepalive ping, drops a peer silent past `ping interval + ping timeout`, closes the
//! connection when its token expires (4001; all on one timer), and abandons a write that blocks
//! while the outbox overflows for a 1013 close. It tells the outbox of every byte the socket
//! takes (the outbox's byte budget counts bytes until they are written), and closes a client
//! whose socket takes no byte for `--write-stall-timeout` while something waits to be written
//! (1013 "client not reading", counted in `write_stall_closes`): a client that never reads
//! holds its queue no longer than that, whatever it sends meanwhile.

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
        match Box::pin(write_batch(stream, &mut batch, outbox, heard, shared)).await {
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
/// too slow, or its socket stalled, and got its 1013).
async fn write_batch(
    stream: &TcpStream,
    batch: &mut VecDeque<Frame>,
    outbox: &Outbox,
    heard: &Heard,
    shared: &Shared,
) -> Option<u64> {
    let silence_limit = shared.silence_limit;
    let mut mid_frame = false;
    let progress = Progress { outbox, stall: shared.write_stall };
    let reason = {
        let write = write_frames(stream, batch, &mut mid_frame, Some(&progress));
        let silence = tokio::time::sleep_until(heard.deadline(silence_limit));
        tokio::pin!(write, silence);
        loop {
            tokio::select! {
                r = &mut write => match r {
                    Ok(writes) => return Some(writes),
                    Err(WriteError::Stalled) => {
                        debug!("the socket took no byte for the write stall timeout; closing");
                        if outbox.close_stalled() {
                            shared.metrics.write_stall_closes.inc();
                        }
                        break CloseReason::WriteStalled;
                    }
                    Err(WriteError::Io) => return None,
                },
                _ = outbox.slow() => break CloseReason::Slow,
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
    };
    // Too slow, or stalled: finish the frame under way (a close frame cannot follow half a
    // frame), drop the rest, then close (the close reaches a stalled peer only if it reads again
    // within the close timeout).
    batch.truncate(usize::from(mid_frame));
    finish(stream, std::mem::take(batch), reason).await;
    None
}

/// What a write of queued frames reports as it goes: bytes written to the outbox that counts
/// them, and a socket that takes nothing for `stall`.
struct Progress<'a> {
    outbox: &'a Outbox,
    stall: Duration,
}

enum WriteError {
    /// The socket failed (the peer is gone).
    Io,
    /// The socket took no byte for the stall timeout.
    Stalled,
}

/// Writes every frame of `frames`, as many per syscall as the kernel takes; returns the number
/// of syscalls that wrote. `mid_frame` tells whether the socket has seen only part of the front
/// frame. With `progress`, every byte written is reported to its outbox, and a socket that stays
/// unwritable for its stall timeout ends the write.
async fn write_frames(
    stream: &TcpStream,
    frames: &mut VecDeque<Frame>,
    mid_frame: &mut bool,
    progress: Option<&Progress<'_>>,
) -> Result<u64, WriteError> {
    let mut writes = 0;
    while !frames.is_empty() {
        // A socket writable at once (the common case) costs no timer and no clock read; only
        // one that is not waits under the stall timeout.
        let now = std::future::poll_fn(|cx| std::task::Poll::Ready(stream.poll_write_ready(cx))).await;
        let writable = std::future::poll_fn(|cx| stream.poll_write_ready(cx));
        let ready = match (now, progress) {
            (std::task::Poll::Ready(ready), _) => ready,
            (std::task::Poll::Pending, Some(p)) => {
                tokio::time::timeout(p.stall, writable).await.map_err(|_| WriteError::Stalled)?
            }
            (std::task::Poll::Pending, None) => writable.await,
        };
        ready.map_err(|_| WriteError::Io)?;
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
                if let Some(p) = progress {
                    p.outbox.written(n);
                }
                n
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
            Err(_) => return Err(WriteError::Io),
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
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, write_frames(stream, &mut rest, &mut false, None)).await;
}
