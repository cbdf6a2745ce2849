//! Health and metrics over plain HTTP: `/livez`, `/readyz`, `/metrics`.
//!
//! `/readyz` is what Kubernetes routes by: 503 while the server drains (so endpoints drop it
//! before its clients are closed) and while the message bus is down (a server that cannot
//! deliver should not take new clients). `/livez` only says the process serves HTTP.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::connection::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    if shared.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
    } else if !shared.bus.health.is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: message bus down\n")
    } else {
        (StatusCode::OK, "ok\n")
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], shared.metrics.render())
}
