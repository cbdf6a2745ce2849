//! Health and metrics over plain HTTP: `/livez`, `/readyz`, `/metrics`.
//!
//! `/readyz` is what Kubernetes routes by: 503 while the server drains (so endpoints drop it
//! before its clients are closed) and while the message bus is down (a server that cannot
//! deliver should not take new clients; the body says when Redis refuses the server's
//! credentials). `/livez` only says the process serves HTTP.
//!
//! It sees the server through [`Health`] alone: no connection handler, no bus internals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::messaging::bus::BusHealth;
use crate::metrics::Metrics;

/// What the endpoints report: the server's state, not its connections.
#[derive(Clone)]
pub struct Health {
    /// Set once the server drains.
    pub draining: Arc<AtomicBool>,
    pub bus: Arc<BusHealth>,
    pub metrics: Arc<Metrics>,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n".to_owned())
    } else if !health.bus.is_up() {
        let why = match health.bus.refused() {
            Some(code) => format!("not ready: message bus down: Redis refused this server's credentials ({code})\n"),
            None => "not ready: message bus down\n".into(),
        };
        (StatusCode::SERVICE_UNAVAILABLE, why)
    } else {
        (StatusCode::OK, "ok\n".into())
    }
}

async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], health.metrics.render())
}
