//! Genesys Cloud client: OAuth2 client-credentials tokens and session creation.
//!
//! One `GenesysClient` per process, cloned into every task. Tokens are cached and shared;
//! concurrent callers wait on a single refresh. A 401 refreshes the token once and retries;
//! a second 401 (or a 403) is an [`GenesysError::Auth`]. The API itself is chosen by
//! [`Backend`]; the simulator and the real cloud differ only in base URLs.

pub mod backend;
pub mod error;
pub mod region;

pub use backend::Backend;
pub use error::{Disposition, GenesysError};

use crate::config::GenesysSettings;
use crate::request::SessionRequest;
use crate::secret::Secret;
use base64::Engine;
use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Mutex;

/// A created session.
#[derive(Debug, Clone)]
pub struct SessionCreated {
    pub conversation_id: String,
    pub status: u16,
    pub latency: Duration,
    pub correlation_id: Option<String>,
    pub rate_limit: RateLimitHeaders,
}

/// Genesys Cloud's `inin-ratelimit-*` headers, logged and exported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitHeaders {
    pub allowed: Option<u64>,
    pub count: Option<u64>,
    pub reset: Option<u64>,
}

impl RateLimitHeaders {
    pub fn from_headers(h: &HeaderMap) -> Self {
        let num = |name: &str| error::header_str(h, name).and_then(|v| v.trim().parse().ok());
        RateLimitHeaders {
            allowed: num("inin-ratelimit-allowed"),
            count: num("inin-ratelimit-count"),
            reset: num("inin-ratelimit-reset"),
        }
    }
}

/// Upper bound on how long a token is cached, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME_SECS: u64 = 86_400;

#[derive(Clone)]
struct CachedToken {
    value: Secret,
    refresh_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Clone)]
pub struct GenesysClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    backend: Backend,
    refresh_margin: Duration,
    /// Held while a token is fetched, so concurrent callers wait for one refresh.
    token: Mutex<Option<CachedToken>>,
}

impl GenesysClient {
    pub fn new(settings: &GenesysSettings, max_connections: usize) -> Result<Self, GenesysError> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(max_connections.max(1))
            .user_agent(concat!("session-worker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GenesysError::Connection(error::describe_chain(&e)))?;
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                token_url: format!("{}/oauth/token", settings.login_base()),
                client_id: settings.client_id.clone(),
                client_secret: settings.client_secret.clone(),
                backend: Backend::from_settings(settings),
                refresh_margin: settings.token_refresh_margin,
                token: Mutex::new(None),
            }),
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// A valid access token, fetching one if none is cached or it is about to expire.
    pub async fn token(&self) -> Result<Secret, GenesysError> {
        let mut guard = self.inner.token.lock().await;
        if let Some(t) = guard.as_ref() {
            if Instant::now() < t.refresh_at {
                return Ok(t.value.clone());
            }
        }
        let fresh = self.fetch_token().await?;
        let value = fresh.value.clone();
        *guard = Some(fresh);
        Ok(value)
    }

    /// Forget `stale` (the token a 401 answered) unless another task already replaced it.
    pub async fn invalidate(&self, stale: &Secret) {
        let mut guard = self.inner.token.lock().await;
        if guard.as_ref().is_some_and(|t| &t.value == stale) {
            *guard = None;
        }
    }

    /// Fetch a new token now, replacing the cached one: the auth probe.
    pub async fn refresh_token(&self) -> Result<(), GenesysError> {
        let mut guard = self.inner.token.lock().await;
        let fresh = self.fetch_token().await?;
        *guard = Some(fresh);
        Ok(())
    }

    async fn fetch_token(&self) -> Result<CachedToken, GenesysError> {
        let inner = &self.inner;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            inner.client_id,
            inner.client_secret.expose()
        ));
        let response = inner
            .http
            .post(&inner.token_url)
            .header(AUTHORIZATION, format!("Basic {basic}"))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials")
            .send()
            .await
            .map_err(|e| GenesysError::from_transport(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| GenesysError::from_transport(&e))?;
        if !(200..300).contains(&status) {
            let hint = "check GENESYS_CLIENT_ID/GENESYS_CLIENT_SECRET, that the OAuth client uses the client credentials grant, and that genesys.region matches the org";
            return Err(match status {
                400 | 401 | 403 => GenesysError::Auth {
                    status,
                    message: format!(
                        "token endpoint refused the client: {}",
                        token_error_text(&body)
                    ),
                    hint: hint.to_string(),
                },
                _ => error::classify(status, &headers, &body, hint),
            });
        }
        let parsed: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| GenesysError::InvalidResponse {
                status,
                message: format!("token response is not the expected JSON: {e}"),
                correlation_id: None,
            })?;
        // Whatever the server says, a token is trusted for at most a day (Genesys issues 24 h).
        let lifetime = Duration::from_secs(
            parsed
                .expires_in
                .unwrap_or(3600)
                .min(MAX_TOKEN_LIFETIME_SECS),
        );
        // Refresh a margin before expiry, but never sooner than half-way through a short lifetime.
        let margin = inner.refresh_margin.min(lifetime / 2);
        tracing::debug!(
            expires_in = lifetime.as_secs(),
            "fetched Genesys Cloud access token"
        );
        Ok(CachedToken {
            value: Secret::new(parsed.access_token),
            refresh_at: Instant::now() + lifetime - margin,
        })
    }

    /// Create one session. A 401 refreshes the token once and tries again.
    pub async fn create_session(
        &self,
        req: &SessionRequest,
        idempotency_key: &str,
    ) -> Result<SessionCreated, GenesysError> {
        let body = serde_json::to_vec(&self.inner.backend.body(
            req,
            idempotency_key,
            SystemTime::now(),
        ))
        .map_err(|e| GenesysError::InvalidResponse {
            status: 0,
            message: format!("cannot serialize request body: {e}"),
            correlation_id: None,
        })?;
        let token = self.token().await?;
        match self.post_session(&token, &body).await {
            Err(GenesysError::Auth { status: 401, .. }) => {
                tracing::info!("Genesys Cloud answered 401; refreshing the token once");
                self.invalidate(&token).await;
                let token = self.token().await?;
                self.post_session(&token, &body).await
            }
            other => other,
        }
    }

    async fn post_session(
        &self,
        token: &Secret,
        body: &[u8],
    ) -> Result<SessionCreated, GenesysError> {
        let inner = &self.inner;
        let started = Instant::now();
        let response = inner
            .http
            .post(inner.backend.url())
            .header(AUTHORIZATION, format!("Bearer {}", token.expose()))
            .header(CONTENT_TYPE, "application/json")
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| GenesysError::from_transport(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| GenesysError::from_transport(&e))?;
        let latency = started.elapsed();
        let correlation_id = error::header_str(&headers, "inin-correlation-id");
        let rate_limit = RateLimitHeaders::from_headers(&headers);
        if rate_limit.allowed.is_some() {
            tracing::trace!(allowed = ?rate_limit.allowed, count = ?rate_limit.count, reset = ?rate_limit.reset, "genesys rate limit headers");
        }
        if !(200..300).contains(&status) {
            return Err(error::classify(
                status,
                &headers,
                &bytes,
                inner.backend.auth_hint(),
            ));
        }
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        let conversation_id =
            inner
                .backend
                .conversation_id(&json)
                .ok_or_else(|| GenesysError::InvalidResponse {
                    status,
                    message: format!(
                        "the {} API answered {status} without a conversationId; body: {}",
                        inner.backend.name(),
                        error::truncate(&String::from_utf8_lossy(&bytes))
                    ),
                    correlation_id: correlation_id.clone(),
                })?;
        Ok(SessionCreated {
            conversation_id,
            status,
            latency,
            correlation_id,
            rate_limit,
        })
    }
}

fn token_error_text(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct OAuthError {
        error: Option<String>,
        description: Option<String>,
        error_description: Option<String>,
    }
    match serde_json::from_slice::<OAuthError>(body) {
        Ok(e) => [e.error, e.description.or(e.error_description)]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(": "),
        Err(_) => error::truncate(&String::from_utf8_lossy(body)),
    }
}
