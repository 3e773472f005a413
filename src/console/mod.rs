//! The operator console (SPEC §7 "Console"): a web page and its JSON API, served by
//! `session-worker console` (or by `run` when `console.listen` is set), never on `http.listen`.
//!
//! - [`auth`]: the two roles and their bearer tokens (no cookies);
//! - [`dlq_view`]: the DLQs read without consuming, grouped, paged behind a cursor;
//! - [`api`]: the JSON routes;
//! - this file: the server, the page (static files compiled into the binary, no inline
//!   script, a strict Content-Security-Policy on every response) and what the console reads
//!   besides the broker: the audit trail (the store, or the running worker's admin endpoint,
//!   as the `audit` commands read it) and this pod's `/readyz` and `/metrics`.
//!
//! It listens on loopback unless told otherwise (reach it with `kubectl port-forward`), and
//! refuses to start without a token.

mod api;
pub mod auth;
pub mod dlq_view;
mod write;

use crate::audit::{AuditAccess, AuditError};
use crate::config::Settings;
use crate::store::{AuditEntry, AuditQuery};
use auth::Tokens;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use dlq_view::DlqView;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// Where `session-worker console` listens when neither `--listen ADDR` nor `console.listen`
/// says.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";

/// Every response's security headers: scripts, styles and requests from this origin only,
/// nothing inline, no framing, no referrer.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error(transparent)]
    Token(#[from] auth::TokenError),
    #[error("cannot listen on {addr} (console.listen): {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("the console's server failed: {0}")]
    Serve(std::io::Error),
}

/// What the handlers share.
pub struct Console {
    settings: Arc<Settings>,
    dlq: DlqView,
    /// One audit read at a time: with no worker running, each read opens the store (sled
    /// allows one holder) and closes it again, so a worker can start beside the console.
    audit_turn: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    /// Replays started from this console, by plan id.
    runs: tokio::sync::Mutex<std::collections::BTreeMap<String, write::RunHandle>>,
}

impl Console {
    /// A broker connection of its own for one write (a replay run keeps it while it runs).
    async fn connect(&self) -> Result<lapin::Connection, api::ApiError> {
        crate::amqp::connect(&self.settings.amqp, "session-worker console")
            .await
            .map_err(|e| api::ApiError::new(axum::http::StatusCode::BAD_GATEWAY, e.to_string()))
    }

    async fn audit_query(&self, q: &AuditQuery) -> Result<Vec<AuditEntry>, AuditError> {
        let _turn = self.audit_turn.lock().await;
        let access = AuditAccess::open(&self.settings)?;
        access.query(q).await
    }

    /// This pod as its own health endpoint reports it: ready or why not, the live pods and
    /// its share of the budget.
    async fn fleet(&self) -> Value {
        let listen = &self.settings.http.listen;
        let port = listen.rsplit(':').next().unwrap_or("9464");
        let base = format!("http://127.0.0.1:{port}");
        let ready = self.get_text(&format!("{base}/readyz")).await;
        let metrics = self.get_text(&format!("{base}/metrics")).await;
        let gauge = |name: &str| {
            metrics.as_ref().ok().and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|v| v.parse::<f64>().ok())
            })
        };
        match ready {
            Ok(text) => json!({
                "reachable": true,
                "readyz": serde_json::from_str::<Value>(&text).unwrap_or(Value::Null),
                "live_pods": gauge("fleet_live_pods"),
                "rate_limit_share_per_minute": gauge("rate_limit_share_per_minute"),
                "rate_limit_held": gauge("rate_limit_held"),
            }),
            Err(e) => json!({
                "reachable": false,
                "error": format!("no worker answers on http.listen ({listen}): {e}"),
            }),
        }
    }

    async fn get_text(&self, url: &str) -> Result<String, reqwest::Error> {
        self.http.get(url).send().await?.text().await
    }
}

/// Serve the console on `listen` until `shutdown` resolves.
pub async fn serve(
    settings: Arc<Settings>,
    listen: &str,
    tokens: Tokens,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ConsoleError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ConsoleError::Bind {
            addr: listen.to_string(),
            source,
        })?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "operator console listening (the page at /, its API under /api/)");
    }
    axum::serve(listener, router(settings, tokens))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ConsoleError::Serve)
}

/// The console's routes: the page without a token, `/api/` with one.
pub fn router(settings: Arc<Settings>, tokens: Tokens) -> Router {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let console = Arc::new(Console {
        dlq: DlqView::new(settings.clone()),
        settings,
        audit_turn: tokio::sync::Mutex::new(()),
        http,
        runs: tokio::sync::Mutex::new(std::collections::BTreeMap::new()),
    });
    let api = Router::new()
        .route("/api/overview", get(api::overview))
        .route("/api/groups", get(api::groups))
        .route("/api/messages", get(api::messages))
        .route("/api/messages/{id}", get(api::message))
        .route("/api/keys/{key}", get(api::key))
        .route("/api/plans", post(write::make_plan))
        .route("/api/plans/{id}", get(write::show_plan))
        .route("/api/replay", post(write::replay))
        .route("/api/replay/{id}", get(write::progress))
        .route("/api/replay/{id}/{action}", post(write::steer))
        .route("/api/purge", post(write::purge))
        .with_state(console)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(tokens),
            auth::require_token,
        ));
    Router::new()
        .route("/", get(|| asset("text/html; charset=utf-8", PAGE)))
        .route(
            "/console.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route(
            "/console.css",
            get(|| asset("text/css; charset=utf-8", STYLE)),
        )
        .merge(api)
        .layer(axum::middleware::map_response(secure))
}

const PAGE: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/console.js");
const STYLE: &str = include_str!("assets/console.css");

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn secure(mut response: Response) -> Response {
    let h = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CSP),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        h.insert(name, HeaderValue::from_static(value));
    }
    response
}
