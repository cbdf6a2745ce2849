//! The server's lifecycle: accept -> serve -> drain -> exit.
//!
//! [`run`] takes bound listeners and a shutdown token, so tests bind port 0 and trigger the
//! drain themselves. The accept loop never dies on one error. Every accepted socket takes a
//! place among the handshakes in progress (`--max-handshakes`, the oldest evicted past it); a
//! place among the established connections (`--max-connections`) is taken only once its request
//! has been read, and a client that finds none gets a proper HTTP 503. Sockets that connect and
//! send nothing therefore never make the server answer 503 to anyone; `/readyz` says "full"
//! from the same places the handshakes take.
//!
//! Drain (the shutdown token fires): readiness goes 503 and new upgrades are refused at once;
//! the open connections are closed with 1012 in equal batches spread over the first three
//! quarters of `--drain-timeout`, so their clients reconnect elsewhere gradually rather than in
//! one stampede; the server then waits for them to finish (at most until the drain timeout),
//! stops its bus and HTTP listener, and returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::http::Health;
use crate::messaging::bus::{Bus, BusError};
use crate::metrics::Metrics;
use crate::transport::connection::{self, Shared};
use crate::transport::outbox::CloseReason;

/// The drain closes a batch at most this often.
const MIN_DRAIN_TICK: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("invalid settings: {0}")]
    Config(String),
    #[error("HTTP listener failed: {0}")]
    Http(#[source] std::io::Error),
}

/// Serves until `shutdown` fires, then drains and returns.
pub async fn run(
    ws: TcpListener,
    http: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new());
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let bus = Bus::start(
        config.redis_url.as_deref().map(|url| config.redis_auth.target(url)),
        &config.redis_prefix,
        config.history(),
        config.client_budget(),
        config.bus_buffer as usize,
        metrics.clone(),
        &tracker,
        stop.clone(),
    )?;
    let shared = Arc::new(Shared::new(&config, bus, metrics).map_err(ServerError::Config)?);

    let http_task = {
        let stop = stop.clone();
        let admission = shared.admission.clone();
        let app = crate::http::router(Health {
            draining: shared.draining.clone(),
            bus: shared.bus.health.clone(),
            metrics: shared.metrics.clone(),
            full: Arc::new(move || admission.available_permits() == 0),
            readiness: config.readiness,
        });
        tokio::spawn(async move { axum::serve(http, app).with_graceful_shutdown(stop.cancelled_owned()).await })
    };
    if let Some(store) = shared.bus.presence() {
        let counted = shared.clone();
        let connections = move || counted.connections.len() as u64;
        tracker.spawn(crate::messaging::presence::heartbeat(store, config.pod_name.clone(), connections, stop.clone()));
    }
    let accept_task = tokio::spawn(accept_loop(ws, shared.clone(), tracker.clone(), stop.clone()));
    info!(pod = %config.pod_name, bus = shared.bus.backend_name(), "serving");

    shutdown.cancelled().await;
    let started = Instant::now();
    let deadline = started + config.drain_timeout();
    drain(&shared, config.drain_timeout(), deadline).await;
    let left = shared.connections.len();

    stop.cancel();
    let _ = accept_task.await;
    tracker.close();
    if tokio::time::timeout_at(deadline.max(Instant::now() + Duration::from_millis(200)), tracker.wait()).await.is_err()
    {
        warn!("tasks still running at the drain deadline; exiting anyway");
    }
    let http_result = http_task.await;
    if left == 0 {
        info!(took = ?started.elapsed(), "drained gracefully");
    } else {
        warn!(connections = left, took = ?started.elapsed(), "drain deadline reached with connections still open");
    }
    match http_result {
        Ok(Err(e)) => Err(ServerError::Http(e)),
        _ => Ok(()),
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tracker: TaskTracker, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                tracker.spawn(connection::serve(stream, peer, shared.clone()));
            }
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS...: back off briefly instead of spinning; the
                // listener itself stays usable.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Closes every open connection with 1012, in paced batches, and waits (until `deadline`) for
/// them to finish.
async fn drain(shared: &Shared, drain_timeout: Duration, deadline: Instant) {
    shared.draining.store(true, Ordering::Release);
    shared.metrics.draining.set(1);
    let open = shared.connections.snapshot();
    let window = drain_timeout * 3 / 4;
    let most_batches = (window.as_millis() / MIN_DRAIN_TICK.as_millis()).max(1) as usize;
    let per_batch = open.len().div_ceil(most_batches).max(1);
    let batches = open.len().div_ceil(per_batch).max(1);
    // Batches are evenly spaced so that the last one goes out at the end of the window.
    let period = if batches > 1 { window / (batches as u32 - 1) } else { window };
    info!(connections = open.len(), ?window, per_batch, ?period, "draining");
    let start = Instant::now();
    for (i, batch) in open.chunks(per_batch).enumerate() {
        tokio::time::sleep_until(start + period * i as u32).await;
        for outbox in batch {
            outbox.close(CloseReason::Draining);
        }
    }
    drop(open);
    while !shared.connections.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
