//! A local Genesys Cloud API simulator (`session-worker sim`) for development, demos and tests.
//!
//! It serves the OAuth token endpoint, the conversations session endpoint, the Open Messaging
//! inbound endpoint and the Web Messaging Guest API ([`web_messaging`]: the `/v1` WebSocket,
//! history and message details), with Genesys-style error bodies, `inin-correlation-id` and
//! `inin-ratelimit-*` headers, a per-minute rate limit answering 429 with `Retry-After`, and
//! fault injection (latency, 5xx rate, 429 rate, unknown queues, auth failures) set by flags or
//! changed at run time through `POST /sim/faults`. `GET /sim/stats` counts what it saw, so tests
//! can check for duplicate sessions. `POST /sim/webhook` is a sink that logs webhook deliveries.

mod rest;
pub mod web_messaging;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot listen on {addr}: {source}; pick a free address with --listen")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("simulator server failed: {0}")]
    Serve(std::io::Error),
}

/// How the simulator starts. Faults can be changed later through `POST /sim/faults`.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub listen: String,
    pub client_id: String,
    pub client_secret: String,
    pub token_ttl: Duration,
    pub session_path: String,
    pub integration_ids: Vec<String>,
    pub faults: Faults,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8089".into(),
            client_id: "local-client".into(),
            client_secret: "local-secret".into(),
            token_ttl: Duration::from_secs(86_400),
            session_path: "/api/v2/conversations/messaging".into(),
            integration_ids: vec!["sim-integration".into()],
            faults: Faults::default(),
        }
    }
}

/// How the session endpoints answer 401/403.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Valid credentials and tokens work.
    #[default]
    Normal,
    /// The token endpoint refuses every client (wrong client secret, deleted OAuth client).
    RejectClients,
    /// Every issued token is refused with 401 (revoked tokens).
    RevokeTokens,
    /// Session endpoints answer 403 (missing permission).
    Forbidden,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every session request.
    pub latency_ms: u64,
    /// Fraction of session requests answered 503.
    pub fail_rate: f64,
    /// Fraction of session requests answered 429 (Retry-After: 1).
    pub throttle_rate: f64,
    /// Session requests allowed per minute (fixed window); 0 = unlimited.
    pub rate_limit_per_minute: u32,
    /// Queue ids answered with 404 (unknown routing queue): a permanent error.
    pub reject_queues: Vec<String>,
    pub auth: AuthMode,
    /// Create the session, then wait this long before answering (0 = answer at once): a
    /// client whose timeout is shorter sees no answer although the session exists.
    pub answer_late_ms: u64,
    /// Guest API: fraction of starts answered with a TooManyRequestsErrorMessage frame.
    pub ws_throttle_rate: f64,
    /// Guest API: close the socket right after a session's first start is written.
    pub ws_drop_after_start: bool,
    /// Guest API: the only `Origin` the handshake accepts (403 otherwise); empty: any.
    pub allowed_origin: String,
}

/// Counts of what the simulator saw, served at `GET /sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStats {
    pub token_grants: u64,
    pub token_rejections: u64,
    pub session_requests: u64,
    pub sessions_created: u64,
    pub distinct_visitors: u64,
    pub duplicate_sessions: u64,
    pub bad_requests: u64,
    pub not_found: u64,
    pub unauthorized: u64,
    pub forbidden: u64,
    pub rate_limited: u64,
    pub injected_errors: u64,
    pub webhook_deliveries: u64,
    /// The most session requests answered at once (each counted until its answer is ready).
    #[serde(default)]
    pub most_at_once: u64,
    /// The Web Messaging Guest API: sessions, conversations and starts per token.
    #[serde(default)]
    pub web_messaging: web_messaging::GuestStats,
}

#[derive(Default)]
struct Counters {
    token_grants: AtomicU64,
    token_rejections: AtomicU64,
    session_requests: AtomicU64,
    sessions_created: AtomicU64,
    bad_requests: AtomicU64,
    not_found: AtomicU64,
    unauthorized: AtomicU64,
    forbidden: AtomicU64,
    rate_limited: AtomicU64,
    injected_errors: AtomicU64,
    webhook_deliveries: AtomicU64,
    at_once: AtomicU64,
    most_at_once: AtomicU64,
}

struct Window {
    started: Instant,
    count: u32,
}

pub struct Sim {
    opts: SimOptions,
    faults: RwLock<Faults>,
    tokens: Mutex<HashMap<String, Instant>>,
    window: Mutex<Window>,
    counters: Counters,
    /// Sessions created per visitor id; more than one is a duplicate.
    visitors: Mutex<HashMap<String, u32>>,
    integrations: HashSet<String>,
    webhooks: Mutex<Vec<Value>>,
    /// Guest sessions by token, their messages and JWTs.
    guests: Mutex<web_messaging::Guests>,
    guest_counters: web_messaging::GuestCounters,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sim {
    pub fn new(opts: SimOptions) -> Arc<Self> {
        Arc::new(Self {
            faults: RwLock::new(opts.faults.clone()),
            integrations: opts.integration_ids.iter().cloned().collect(),
            opts,
            tokens: Mutex::new(HashMap::new()),
            window: Mutex::new(Window {
                started: Instant::now(),
                count: 0,
            }),
            counters: Counters::default(),
            visitors: Mutex::new(HashMap::new()),
            webhooks: Mutex::new(Vec::new()),
            guests: Mutex::new(web_messaging::Guests::default()),
            guest_counters: web_messaging::GuestCounters::default(),
        })
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        // The guests' lock before the visitors' (never both at once here): a start holds the
        // guests' while it records its conversation among the visitors.
        let mut guests = lock(&self.guests).stats();
        let distinct = lock(&self.visitors).len() as u64;
        let created = load(&c.sessions_created);
        self.guest_counters.fill(&mut guests);
        SimStats {
            web_messaging: guests,
            token_grants: load(&c.token_grants),
            token_rejections: load(&c.token_rejections),
            session_requests: load(&c.session_requests),
            sessions_created: created,
            distinct_visitors: distinct,
            duplicate_sessions: created.saturating_sub(distinct),
            bad_requests: load(&c.bad_requests),
            not_found: load(&c.not_found),
            unauthorized: load(&c.unauthorized),
            forbidden: load(&c.forbidden),
            rate_limited: load(&c.rate_limited),
            injected_errors: load(&c.injected_errors),
            webhook_deliveries: load(&c.webhook_deliveries),
            most_at_once: load(&c.most_at_once),
        }
    }

    pub fn faults(&self) -> Faults {
        self.faults.read().map(|f| f.clone()).unwrap_or_default()
    }

    pub fn set_faults(&self, faults: Faults) {
        if let Ok(mut f) = self.faults.write() {
            *f = faults;
        }
    }

    /// Sessions created for one visitor id.
    pub fn sessions_for(&self, visitor_id: &str) -> u32 {
        lock(&self.visitors).get(visitor_id).copied().unwrap_or(0)
    }

    /// Guest API starts and conversations of one session token.
    pub fn guest_session(&self, token: &str) -> (u64, u64) {
        lock(&self.guests).of(token)
    }

    /// Expire every guest session (Genesys Cloud's session duration running out).
    pub fn expire_guest_sessions(&self) {
        lock(&self.guests).expire_all();
    }

    /// Count one more request in the per-minute window: false if it is over the limit.
    fn within_rate_window(&self) -> bool {
        let limit = self.faults().rate_limit_per_minute;
        let (count, _) = self.count_in_window();
        limit == 0 || count <= limit
    }

    /// Count a request in the fixed one-minute window: its count and the seconds to the reset.
    fn count_in_window(&self) -> (u32, u64) {
        let mut w = lock(&self.window);
        if w.started.elapsed() >= Duration::from_secs(60) {
            w.started = Instant::now();
            w.count = 0;
        }
        w.count = w.count.saturating_add(1);
        let reset = 60u64.saturating_sub(w.started.elapsed().as_secs()).max(1);
        (w.count, reset)
    }

    /// Forget every issued token: the next session request with an old token gets 401.
    pub fn revoke_tokens(&self) {
        lock(&self.tokens).clear();
    }

    /// Webhook deliveries received at `/sim/webhook`, with their headers.
    pub fn webhooks(&self) -> Vec<Value> {
        lock(&self.webhooks).clone()
    }

    pub fn router(self: &Arc<Self>) -> Router {
        let session_path = if self.opts.session_path.starts_with('/') {
            self.opts.session_path.clone()
        } else {
            format!("/{}", self.opts.session_path)
        };
        Router::new()
            .route("/oauth/token", post(rest::token))
            .route(&session_path, post(rest::create_conversation))
            .route(
                "/api/v2/conversations/messages/{id}/inbound/open/message",
                post(rest::open_message),
            )
            .route("/v1", get(web_messaging::upgrade))
            .route("/api/v2/webmessaging/messages", get(web_messaging::history))
            .route(
                "/api/v2/conversations/messages/{id}/details",
                get(web_messaging::details),
            )
            .route("/sim/expire-sessions", post(expire_sessions))
            .route("/sim/stats", get(stats))
            .route("/sim/faults", get(get_faults).post(set_faults))
            .route("/sim/webhook", post(webhook))
            .route("/sim/revoke-tokens", post(revoke_tokens))
            .route("/healthz", get(|| async { "ok" }))
            .with_state(self.clone())
    }
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    pub sim: Arc<Sim>,
    task: tokio::task::JoinHandle<()>,
}

impl SimHandle {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bind(listen: &str) -> Result<(tokio::net::TcpListener, SocketAddr), SimError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| SimError::Bind {
            addr: listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(SimError::Serve)?;
    Ok((listener, addr))
}

/// Bind and serve in the background (tests, benchmarks).
pub async fn spawn(opts: SimOptions) -> Result<SimHandle, SimError> {
    let (listener, addr) = bind(&opts.listen).await?;
    let sim = Sim::new(opts);
    let app = sim.router();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "simulator stopped");
        }
    });
    Ok(SimHandle { addr, sim, task })
}

/// Serve until `shutdown` resolves (the `sim` command).
pub async fn serve(
    opts: SimOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), SimError> {
    let (listener, addr) = bind(&opts.listen).await?;
    tracing::info!(%addr, faults = ?opts.faults, "Genesys Cloud simulator listening; stats at /sim/stats");
    let sim = Sim::new(opts);
    axum::serve(listener, sim.router())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(SimError::Serve)
}

async fn stats(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    Json(sim.stats())
}

async fn get_faults(State(sim): State<Arc<Sim>>) -> Json<Faults> {
    Json(sim.faults())
}

async fn set_faults(State(sim): State<Arc<Sim>>, Json(faults): Json<Faults>) -> Json<Faults> {
    tracing::info!(?faults, "simulator faults changed");
    sim.set_faults(faults);
    Json(sim.faults())
}

async fn expire_sessions(State(sim): State<Arc<Sim>>) -> StatusCode {
    sim.expire_guest_sessions();
    StatusCode::NO_CONTENT
}

async fn revoke_tokens(State(sim): State<Arc<Sim>>) -> StatusCode {
    sim.revoke_tokens();
    StatusCode::NO_CONTENT
}

async fn webhook(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    bump(&sim.counters.webhook_deliveries);
    let event: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let header = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let field = |k: &str| {
        event
            .get(k)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("-")
            .to_string()
    };
    let (kind, visitor, conversation) = (
        field("event"),
        field("visitor_id"),
        field("conversation_id"),
    );
    tracing::info!(
        webhook_id = %header("webhook-id"),
        event = %kind,
        visitor_id = %visitor,
        conversation_id = %conversation,
        "webhook delivery received"
    );
    lock(&sim.webhooks).push(json!({
        "webhook-id": header("webhook-id"),
        "webhook-timestamp": header("webhook-timestamp"),
        "webhook-signature": header("webhook-signature"),
        "x-source": header("x-source"),
        "body": String::from_utf8_lossy(&body),
    }));
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_count_duplicates() {
        let sim = Sim::new(SimOptions::default());
        rest::record_session(&sim, "a");
        rest::record_session(&sim, "a");
        rest::record_session(&sim, "b");
        let s = sim.stats();
        assert_eq!(
            (
                s.sessions_created,
                s.distinct_visitors,
                s.duplicate_sessions
            ),
            (3, 2, 1)
        );
    }
}
