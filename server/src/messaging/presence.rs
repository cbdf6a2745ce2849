//! Fleet presence: each server heartbeats its pod name and connection count into the bus's
//! store with a short TTL, and `fleet-stats` (and the operator) sum the live entries. A server
//! that dies simply stops refreshing its entry, which expires within [`PRESENCE_TTL`]; a server
//! that drains removes its entry at the end.
//!
//! The cadence lives here; where entries are kept is the backend's ([`PresenceStore`], part of
//! the bus seam).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::messaging::bus::PresenceStore;

/// How often a server refreshes its entry.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(5);
/// How long an entry lives without a refresh.
pub const PRESENCE_TTL: Duration = Duration::from_secs(15);

/// Refreshes this server's entry until `stop`, then removes it.
pub async fn heartbeat(
    store: Arc<dyn PresenceStore>,
    pod: String,
    connections: impl Fn() -> u64,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(PRESENCE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                let refresh = store.refresh(&pod, connections(), PRESENCE_TTL);
                if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), refresh).await {
                    debug!(error = %e, "presence heartbeat failed");
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), store.remove(&pod)).await;
}
