//! Health and metrics over plain HTTP: `/livez`, `/readyz`, `/metrics`.
//!
//! `/readyz` is what Kubernetes routes by, so it answers 503 only for what is wrong with this
//! server: it drains (endpoints drop it before its clients are closed), it is full, its bus has
//! never connected (a pod whose configuration never worked must not take clients or let a
//! rollout go on), or its own link to the bus is broken while the bus answers others. A bus
//! that is down for the whole fleet (the shared Redis stopped, paused, restarting) keeps the
//! server ready under the default `--readiness pod`: every server sees the same outage, and
//! taking them all out of the Service at once would refuse every new client although each
//! server still serves (subscriptions wait for the bus, publishes get `bus_unavailable`).
//! `--readiness bus` restores the strict rule (503 whenever the bus is down); `/metrics` shows
//! the state either way (`bus_up`, `bus_link_broken`); the body says when Redis refuses the
//! server's credentials. `/livez` only says the process serves HTTP.
//!
//! It sees the server through [`Health`] alone: no connection handler, no bus internals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::config::Readiness;
use crate::messaging::bus::{BusHealth, BusState, Lag, Outage};
use crate::messaging::envelope::now_micros;
use crate::metrics::Metrics;

/// What the endpoints report: the server's state, not its connections.
#[derive(Clone)]
pub struct Health {
    /// Set once the server drains.
    pub draining: Arc<AtomicBool>,
    pub bus: Arc<BusHealth>,
    pub metrics: Arc<Metrics>,
    /// Whether the server is at `--max-connections`.
    pub full: Arc<dyn Fn() -> bool + Send + Sync>,
    pub readiness: Readiness,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    let draining = health.draining.load(Ordering::Acquire);
    let lag = health.bus.lag.get(now_micros());
    match readiness(draining, (health.full)(), health.bus.state(), health.bus.refused(), health.readiness, lag) {
        Ok(body) => (StatusCode::OK, body),
        Err(body) => (StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

/// Pure: the readiness answer's body, `Err` for 503. `refused` is the backend's reply code
/// while it refuses this server's credentials. A bus that lags ([`Lag::is_behind`]) keeps the
/// server ready and says so: a flood or a slow Redis lags every server alike.
pub fn readiness(
    draining: bool,
    full: bool,
    bus: BusState,
    refused: Option<&str>,
    policy: Readiness,
    lag: Lag,
) -> Result<String, String> {
    if draining {
        return Err("not ready: draining\n".into());
    }
    if full {
        return Err("not ready: at --max-connections\n".into());
    }
    // Set only while the bus is not up (an up bus clears it).
    if let Some(code) = refused {
        return Err(format!("not ready: message bus down: Redis refused this server's credentials ({code})\n"));
    }
    match (bus, policy) {
        (BusState::Up, _) if lag.is_behind() => Ok(format!(
            "ok, degraded: the message bus is behind: {} messages ({} bytes) wait, the oldest for {:.1} s{}\n",
            lag.messages,
            lag.bytes,
            lag.oldest.as_secs_f64(),
            if lag.resyncing { "; catching up from history" } else { "" }
        )),
        (BusState::Up, _) => Ok("ok\n".into()),
        (BusState::Connecting, _) => Err("not ready: the message bus has not connected yet\n".into()),
        (BusState::Down(Outage::Link), _) => {
            Err("not ready: this server's link to the message bus is broken while the bus answers\n".into())
        }
        (BusState::Down(Outage::Fleet), Readiness::Bus) => Err("not ready: message bus down\n".into()),
        (BusState::Down(Outage::Fleet), Readiness::Pod) => {
            Ok("ok, degraded: the message bus is down for the whole fleet; publishes fail and subscriptions wait\n"
                .into())
        }
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    // The lag grows while nothing happens (a stuck delivery): read it now, not when it last moved.
    let lag = health.bus.lag.get(now_micros());
    health.metrics.bus_lag_seconds.set(lag.oldest.as_secs_f64());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], health.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn only_what_is_wrong_with_this_server_makes_it_unready() {
        let fleet_down = BusState::Down(Outage::Fleet);
        let link_down = BusState::Down(Outage::Link);
        for policy in [Readiness::Pod, Readiness::Bus] {
            assert!(readiness(false, false, BusState::Up, None, policy, Lag::default()).is_ok());
            assert!(
                readiness(true, false, BusState::Up, None, policy, Lag::default()).unwrap_err().contains("draining")
            );
            assert!(
                readiness(false, true, BusState::Up, None, policy, Lag::default())
                    .unwrap_err()
                    .contains("--max-connections")
            );
            assert!(
                readiness(false, false, BusState::Connecting, None, policy, Lag::default())
                    .unwrap_err()
                    .contains("not connected yet")
            );
            assert!(readiness(false, false, link_down, None, policy, Lag::default()).unwrap_err().contains("link"));
        }
        assert!(
            readiness(false, false, fleet_down, None, Readiness::Pod, Lag::default()).unwrap().contains("degraded")
        );
        assert!(readiness(false, false, fleet_down, None, Readiness::Bus, Lag::default()).is_err());
        assert!(
            readiness(true, false, fleet_down, None, Readiness::Pod, Lag::default()).is_err(),
            "a draining server is never ready"
        );
        let refused = readiness(false, false, BusState::Connecting, Some("WRONGPASS"), Readiness::Pod, Lag::default());
        assert!(refused.unwrap_err().contains("refused this server's credentials (WRONGPASS)"));
    }

    #[test]
    fn a_lagging_bus_is_degraded_never_unready() {
        let behind = Lag { messages: 12, bytes: 3400, oldest: Duration::from_secs(2), resyncing: false };
        for policy in [Readiness::Pod, Readiness::Bus] {
            let body = readiness(false, false, BusState::Up, None, policy, behind).unwrap();
            assert!(body.starts_with("ok, degraded") && body.contains("12 messages"), "{body}");
            let resyncing = Lag { resyncing: true, ..Lag::default() };
            assert!(readiness(false, false, BusState::Up, None, policy, resyncing).unwrap().contains("history"));
            let fresh = Lag { oldest: Duration::from_millis(200), messages: 3, ..Lag::default() };
            assert_eq!(readiness(false, false, BusState::Up, None, policy, fresh).unwrap(), "ok\n");
        }
    }
}
