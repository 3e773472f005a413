//! The health, metrics and store HTTP endpoint on `http.listen`.
//!
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: 200 when the broker is connected, the store is open and no auth pause is in
//!   force; 503 with the reasons otherwise.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /audit?since_us=&until_us=&key=&tail=`: audit entries, for `session-worker audit` while
//!   this process holds the sled store (sled allows one process per store).
//! - `POST /audit`: append an audit entry (for `dlq replay`/`purge` while the store is held).

use crate::health::Health;
use crate::store::{AuditEntry, AuditQuery, Store};
use axum::extract::{Query, State};
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

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    store: Store,
}

pub fn router(health: Arc<Health>, store: Store) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/audit", get(audit_query).post(audit_append))
        .with_state(AppState { health, store })
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
    store: Store,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "health and metrics listening (/healthz, /readyz, /metrics)");
    }
    axum::serve(listener, router(health, store))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(HttpError::Serve)
}

async fn readyz(State(s): State<AppState>) -> Response {
    let reasons = s.health.not_ready_reasons();
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

async fn audit_query(State(s): State<AppState>, Query(q): Query<AuditQuery>) -> Response {
    match s.store.audit_query(&q) {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn audit_append(State(s): State<AppState>, Json(entry): Json<AuditEntry>) -> Response {
    let result = s.store.append_audit(&entry);
    let flushed = match result {
        Ok(()) => s.store.durable().await,
        Err(e) => Err(e),
    };
    match flushed {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}
