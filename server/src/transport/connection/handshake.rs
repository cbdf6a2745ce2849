//! The handshake of one connection: read the upgrade request, let [`admission`](super::admission)
//! decide, answer (101, or a plain HTTP refusal that the client can read whole before the
//! socket closes). Every way it can end is an [`Outcome`], the `upgrades_total` label included.

use std::sync::atomic::Ordering;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::Shared;
use super::admission::{Refusal, Route, admit};
use crate::auth::Grant;
use crate::transport::upgrade::{self, HeadError};

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
        }
    }
}

/// Reads the upgrade request, decides, answers. Returns the route, what the token allows (with
/// `--jwt-secret`) and the bytes the client sent after its request, or how the handshake failed.
/// A refusal frees `permit` before the client reads its answer.
pub(super) async fn handshake(
    stream: &mut TcpStream,
    shared: &Shared,
    permit: &mut Option<OwnedSemaphorePermit>,
) -> Result<(Route, Option<Box<Grant>>, Vec<u8>), Outcome> {
    let (head, leftover) = match upgrade::read_head(stream).await {
        Ok(read) => read,
        Err(HeadError::Closed) => return Err(Outcome::Failed),
        Err(e) => {
            refuse(stream, e.response().unwrap_or_default()).await;
            return Err(Outcome::BadRequest);
        }
    };
    let draining = shared.draining.load(Ordering::Acquire);
    match admit(&head, &shared.allowed_origins, shared.auth.as_ref(), draining, permit.is_none()) {
        Ok((route, grant)) => {
            stream.write_all(&upgrade::switching_protocols(&head.key)).await.map_err(|_| Outcome::Failed)?;
            Ok((route, grant.map(Box::new), leftover))
        }
        Err((refusal, detail)) => {
            *permit = None;
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
    }
}
