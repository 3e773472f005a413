//! The health and metrics endpoint on `http.listen`. Deployments bind it to all interfaces so
//! Prometheus and the kubelet reach it, so it serves these three and nothing else: no audit
//! data, no write of any kind (SPEC §3). Operator commands use [`crate::admin`] instead.
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: 200 when the broker is connected, the store is open, the fleet ledger is
//!   caught up and no auth pause is in force; 503 with the reasons otherwise.
//! - `GET /metrics`: Prometheus text format.

use crate::health::Health;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} (http.listen): {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

pub fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Bind `http.listen` (before anything else starts, so a taken port fails fast).
pub async fn bind(listen: &str) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| HttpError::Bind {
            addr: listen.to_string(),
            source,
        })
}

/// Serve until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "health and metrics listening (/healthz, /readyz, /metrics)");
    }
    axum::serve(listener, router(health))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}

async fn readyz(State(health): State<Arc<Health>>) -> Response {
    let reasons = health.not_ready_reasons();
    if reasons.is_empty() {
        (StatusCode::OK, Json(serde_json::json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"ready": false, "reasons": reasons})),
        )
            .into_response()
    }
}

async fn metrics() -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::metrics().encode(),
    )
        .into_response()
}
