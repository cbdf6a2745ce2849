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
//! the open connections are closed with 1012 and a reconnect hint, in equal batches spread over
//! the first three quarters of `--drain-timeout`, or with a reconnect budget as fast as the
//! fleet's budget allows within those three quarters ([`crate::drain`]), so their clients
//! reconnect elsewhere gradually rather than in one stampede; the server then waits for them to finish (at most until the drain timeout), stops
//! its bus and HTTP listener, and returns.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Config;
use crate::drain::{BUDGET_TICK, HINT_WINDOW, Jitter, ReconnectBudget, Schedule};
use crate::http::Health;
use crate::messaging::bus::{Bus, BusError};
use crate::metrics::Metrics;
use crate::transport::connection::{self, Shared};
use crate::transport::outbox::CloseReason;

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
    let fleet_budget = match (&config.redis_url, config.drain_max_reconnects_per_second) {
        (Some(url), per_second) if per_second > 0 => Some(crate::messaging::redis::budget::RedisBudget::new(
            config.redis_auth.target(url),
            &config.redis_prefix,
            per_second,
        )?),
        _ => None,
    };
    let budget = ReconnectBudget::new(config.drain_max_reconnects_per_second, fleet_budget);

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
    let closes = drain(&shared, budget, config.drain_timeout(), deadline).await;
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
        info!(took = ?started.elapsed(), closed = closes.closed, delayed = closes.delayed, forced = closes.forced, "drained gracefully");
    } else {
        warn!(connections = left, took = ?started.elapsed(), closed = closes.closed, delayed = closes.delayed, forced = closes.forced, "drain deadline reached with connections still open");
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

/// What a drain did: clients closed (forced ones included), closes the budget delayed, clients
/// closed at the window's end without the budget's leave.
#[derive(Debug, Default, Clone, Copy)]
struct Closes {
    closed: u64,
    delayed: u64,
    forced: u64,
}

/// Closes every open connection with 1012 and a reconnect hint, on the [`Schedule`] and within
/// the `budget` until the schedule's window ends, then the rest at once; waits (until
/// `deadline`) for them to finish.
async fn drain(shared: &Shared, mut budget: ReconnectBudget, drain_timeout: Duration, deadline: Instant) -> Closes {
    shared.draining.store(true, Ordering::Release);
    shared.metrics.draining.set(1);
    let open = shared.connections.snapshot();
    let schedule = match budget.per_second() {
        0 => Schedule::new(open.len(), drain_timeout),
        _ => Schedule::at_once(open.len(), drain_timeout),
    };
    info!(connections = open.len(), window = ?schedule.window(), budget = budget.per_second(), "draining");
    let metrics = &shared.metrics;
    let mut jitter = Jitter::default();
    let mut closes = Closes::default();
    let close = |outbox: &crate::transport::outbox::Outbox, reconnect_after_ms: u16| {
        outbox.close(CloseReason::Draining { reconnect_after_ms });
    };
    // `next`: the first client not yet closed (or found gone); `delayed_up_to`: clients before
    // it were counted as delayed already.
    let (mut next, mut delayed_up_to) = (0, 0);
    let start = Instant::now();
    while next < open.len() {
        let elapsed = start.elapsed();
        // Without a budget the last batch is due at the window's end like any other.
        if elapsed >= schedule.window() && budget.per_second() > 0 {
            // The window wins. The rest take their places in the budget anyway, into debt, and
            // are told to come back at its pace, after whoever else the budget owes.
            let left: Vec<_> = open[next..].iter().filter(|o| !o.is_closing()).collect();
            let forced = left.len() as u64;
            if forced > 0 {
                let after = budget.force(left.len()).await;
                let spread = crate::drain::forced_hint_window(left.len(), budget.per_second(), HINT_WINDOW);
                let n = left.len();
                for (i, outbox) in left.into_iter().enumerate() {
                    close(outbox, jitter.slot_hint(after, spread, i, n));
                }
                warn!(forced, "the drain window ended before the reconnect budget let every client go");
            }
            closes.forced = forced;
            closes.closed += forced;
            metrics.drain_closes_forced.inc_by(forced);
            metrics.drain_closes.inc_by(forced);
            break;
        }
        // Clients that left on their own cost no budget.
        while next < open.len() && open[next].is_closing() {
            next += 1;
        }
        let due = schedule.due(elapsed).max(next);
        let granted = if due > next { budget.take(due - next).await } else { 0 };
        let mut sent = 0;
        while sent < granted && next < open.len() {
            if !open[next].is_closing() {
                close(&open[next], jitter.hint(HINT_WINDOW));
                sent += 1;
            }
            next += 1;
        }
        closes.closed += sent as u64;
        metrics.drain_closes.inc_by(sent as u64);
        let waiting = due.saturating_sub(next.max(delayed_up_to));
        if waiting > 0 {
            closes.delayed += waiting as u64;
            metrics.drain_closes_delayed.inc_by(waiting as u64);
            delayed_up_to = due;
        }
        // Behind (the budget said no): ask again shortly, at a random moment so that no server
        // always asks right after another and finds the bucket emptied; on time: at the next batch.
        let elapsed = start.elapsed();
        let wake = if due > next {
            let again = BUDGET_TICK / 2 + Duration::from_millis(jitter.hint(BUDGET_TICK).into());
            (elapsed + again).min(schedule.next_batch(elapsed))
        } else {
            schedule.next_batch(elapsed)
        };
        tokio::time::sleep_until(start + wake.min(schedule.window())).await;
    }
    drop(open);
    while !shared.connections.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    closes
}
