//! The handshake of one connection: read the upgrade request, let [`admission`](super::admission)
//! decide, answer (101, or a plain HTTP refusal that the client can read whole before the
//! socket closes). Every way it can end is an [`Outcome`], the `upgrades_total` label included.
//!
//! Two budgets, so that sockets which connect and never finish a request cannot keep real
//! clients out: handshakes in progress are [`Handshakes`] (`--max-handshakes`; one more evicts
//! the oldest still reading its request, which a real client, whose request comes at once,
//! practically never is), and a slot among the established connections (`--max-connections`)
//! is taken only once a request has been read, so only then can the answer be 503.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use wsfleet_contract::sync::lock;

use super::Shared;
use super::admission::{Refusal, Route, admit};
use crate::auth::Grant;
use crate::transport::upgrade::{self, HeadError};

/// The handshakes in progress, oldest first, at most `limit` of them.
pub struct Handshakes {
    limit: usize,
    next: AtomicU64,
    /// Dropping a sender evicts its handshake.
    pending: std::sync::Mutex<BTreeMap<u64, oneshot::Sender<()>>>,
    gauge: Gauge,
}

/// One handshake's place in [`Handshakes`]; dropping it gives the place back.
pub struct Slot {
    handshakes: Arc<Handshakes>,
    id: u64,
    evicted: oneshot::Receiver<()>,
}

impl Handshakes {
    pub fn new(limit: usize, gauge: Gauge) -> Self {
        Handshakes { limit, next: AtomicU64::new(0), pending: Default::default(), gauge }
    }

    /// Registers a new handshake; at the limit, the oldest one is evicted to make room.
    pub fn start(self: &Arc<Self>) -> Slot {
        let (tx, evicted) = oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut pending = lock(&self.pending);
        while pending.len() >= self.limit {
            pending.pop_first();
        }
        pending.insert(id, tx);
        self.gauge.set(pending.len() as i64);
        Slot { handshakes: self.clone(), id, evicted }
    }

    pub fn len(&self) -> usize {
        lock(&self.pending).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut pending = lock(&self.handshakes.pending);
        pending.remove(&self.id);
        self.handshakes.gauge.set(pending.len() as i64);
    }
}

/// How a handshake ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Upgraded: the connection speaks WebSocket now.
    Accepted,
    /// Refused by admission, with the answer that says why.
    Refused(Refusal),
    /// Not a WebSocket upgrade this server takes (400, 405, 426, 431).
    BadRequest,
    /// The connection closed or failed before the handshake was done.
    Failed,
    /// Not done within `--handshake-timeout`.
    TimedOut,
    /// Still reading its request when `--max-handshakes` newer handshakes needed the room.
    Evicted,
}

impl Outcome {
    /// The `result` label of `wsfleet_upgrades_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused(refusal) => refusal.metric_label(),
            Outcome::BadRequest => "bad_request",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timeout",
            Outcome::Evicted => "evicted",
        }
    }
}

/// What an upgraded connection takes from its handshake: the route, what the token allows
/// (with `--jwt-secret`), the bytes the client sent after its request, and its place among the
/// established connections.
pub(super) type Upgraded = (Route, Option<Box<Grant>>, Vec<u8>, OwnedSemaphorePermit);

/// Takes a place among the handshakes in progress, reads the upgrade request (unless evicted
/// meanwhile), takes a place among the established connections, decides, answers. A refusal
/// holds no such place while the client reads it.
pub(super) async fn handshake(stream: &mut TcpStream, shared: &Shared) -> Result<Upgraded, Outcome> {
    let mut slot = shared.handshakes.start();
    let read = tokio::select! {
        read = upgrade::read_head(stream) => read,
        _ = &mut slot.evicted => return Err(Outcome::Evicted),
    };
    let (head, leftover) = match read {
        Ok(read) => read,
        Err(HeadError::Closed) => return Err(Outcome::Failed),
        Err(e) => {
            refuse(stream, e.response().unwrap_or_default()).await;
            return Err(Outcome::BadRequest);
        }
    };
    let permit = shared.admission.clone().try_acquire_owned().ok();
    let draining = shared.draining.load(Ordering::Acquire);
    match admit(&head, &shared.allowed_origins, shared.auth.as_ref(), draining, permit.is_none()) {
        Ok((route, grant)) => {
            // Checked by `admit`: not full.
            let Some(permit) = permit else { return Err(Outcome::Refused(Refusal::Full)) };
            stream.write_all(&upgrade::switching_protocols(&head.key)).await.map_err(|_| Outcome::Failed)?;
            Ok((route, grant.map(Box::new), leftover, permit))
        }
        Err((refusal, detail)) => {
            drop(permit);
            refuse(stream, refusal.response(&detail)).await;
            Err(Outcome::Refused(refusal))
        }
    }
}

/// Sends a refusal and ends the connection, letting the client read the whole answer.
async fn refuse(stream: &mut TcpStream, answer: Vec<u8>) {
    if stream.write_all(&answer).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_outcome_has_its_metric_label() {
        assert_eq!(Outcome::Accepted.metric_label(), "accepted");
        assert_eq!(Outcome::Refused(Refusal::Full).metric_label(), "full");
        assert_eq!(Outcome::TimedOut.metric_label(), "timeout");
        assert_eq!(Outcome::BadRequest.metric_label(), "bad_request");
        assert_eq!(Outcome::Evicted.metric_label(), "evicted");
    }

    #[test]
    fn past_the_budget_the_oldest_handshake_is_evicted() {
        let handshakes = Arc::new(Handshakes::new(2, Gauge::default()));
        let mut first = handshakes.start();
        let mut second = handshakes.start();
        assert!(first.evicted.try_recv().is_err() && second.evicted.try_recv().is_err());
        let third = handshakes.start();
        assert!(matches!(first.evicted.try_recv(), Err(oneshot::error::TryRecvError::Closed)), "the oldest goes");
        assert!(second.evicted.try_recv().is_err(), "the others stay");
        assert_eq!(handshakes.len(), 2);
        drop((first, second, third));
        assert!(handshakes.is_empty(), "every slot gives its place back");
    }
}
