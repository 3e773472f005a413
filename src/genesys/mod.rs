//! Genesys Cloud client: OAuth2 client-credentials tokens and session creation.
//!
//! One `GenesysClient` per process, cloned into every task. Tokens are cached and shared:
//! reading the cached token takes a short read lock, and concurrent callers that find it
//! missing or due wait on a single refresh. A 401 refreshes the token once and retries;
//! a second 401 (or a 403) is an [`GenesysError::Auth`]. The API itself is chosen by
//! [`Backend`]; the simulator and the real cloud differ only in base URLs.
//!
//! - [`backend`]: the three session APIs (Web Messaging, conversations, Open Messaging);
//! - [`web_messaging`]: the Guest API over WebSocket, a guest session per idempotency key;
//! - [`error`]: every answer classified once into retry, permanent or auth.
//!
//! The client knows nothing of the broker, the store or the pipelines; it uses `config`,
//! `request` and the helpers.

pub mod backend;
pub mod error;
pub mod web_messaging;

pub use backend::Backend;
pub use error::{Disposition, GenesysError};

use crate::config::GenesysSettings;
use crate::request::SessionRequest;
use crate::secret::Secret;
use base64::Engine;
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use std::sync::{Arc, RwLock};
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
    /// The start's message id (Web Messaging), recorded in the audit trail.
    pub message_id: Option<String>,
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
        let num = |name: &str| {
            crate::http_headers::header_str(h, name).and_then(|v| v.trim().parse().ok())
        };
        RateLimitHeaders {
            allowed: num("inin-ratelimit-allowed"),
            count: num("inin-ratelimit-count"),
            reset: num("inin-ratelimit-reset"),
        }
    }
}

/// Upper bound on how long a token is cached, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME_SECS: u64 = 86_400;

struct CachedToken {
    value: Secret,
    /// `Bearer <token>`, built once per token and marked sensitive (never logged by the stack).
    header: HeaderValue,
    refresh_at: Instant,
}

impl CachedToken {
    fn fresh(&self) -> bool {
        Instant::now() < self.refresh_at
    }
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
    /// The backend's session URL, parsed once.
    session_url: reqwest::Url,
    client_id: String,
    client_secret: Secret,
    backend: Backend,
    /// The Guest API client when `genesys.api = "web_messaging"`.
    web: Option<web_messaging::WebMessaging>,
    refresh_margin: Duration,
    /// Shared, so a request takes the token with a reference-count bump, not a copy.
    token: RwLock<Option<Arc<CachedToken>>>,
    /// Held while a token is fetched, so concurrent callers wait for one refresh.
    refreshing: Mutex<()>,
}

impl GenesysClient {
    pub fn new(settings: &GenesysSettings, max_connections: usize) -> Result<Self, GenesysError> {
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(max_connections.max(1))
            .user_agent(concat!("session-worker/", env!("CARGO_PKG_VERSION")))
            // A visitor's data goes to the configured host only (SPEC §4): a 3xx is an error.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| GenesysError::Connection(crate::text::describe_chain(&e)))?;
        let backend = Backend::from_settings(settings);
        let session_url = reqwest::Url::parse(backend.url()).map_err(|e| {
            GenesysError::Connection(format!("invalid session URL {:?}: {e}", backend.url()))
        })?;
        let web = match settings.api {
            crate::config::GenesysApi::WebMessaging => {
                Some(web_messaging::WebMessaging::new(settings)?)
            }
            _ => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                web,
                http,
                token_url: format!("{}/oauth/token", settings.login_base()),
                session_url,
                client_id: settings.client_id.clone(),
                client_secret: settings.client_secret.clone(),
                backend,
                refresh_margin: settings.token_refresh_margin,
                token: RwLock::new(None),
                refreshing: Mutex::new(()),
            }),
        })
    }

    fn cached(&self) -> Option<Arc<CachedToken>> {
        let guard = self.inner.token.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|t| t.fresh()).cloned()
    }

    fn store_token(&self, token: Arc<CachedToken>) {
        *self.inner.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// A valid access token, fetching one if none is cached or it is about to expire.
    pub async fn token(&self) -> Result<Secret, GenesysError> {
        Ok(self.bearer().await?.value.clone())
    }

    async fn bearer(&self) -> Result<Arc<CachedToken>, GenesysError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _refreshing = self.inner.refreshing.lock().await;
        // Another task may have refreshed it while this one waited.
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let fresh = Arc::new(self.fetch_token().await?);
        self.store_token(fresh.clone());
        Ok(fresh)
    }

    /// Forget `stale` (the token a 401 answered) unless another task already replaced it.
    pub async fn invalidate(&self, stale: &Secret) {
        let _refreshing = self.inner.refreshing.lock().await;
        let mut guard = self.inner.token.write().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|t| &t.value == stale) {
            *guard = None;
        }
    }

    /// The auth gate's probe: a new token and, for Web Messaging, the Guest API handshake with
    /// a session of the probe's own and an echo.
    pub async fn probe(&self) -> Result<(), GenesysError> {
        self.refresh_token().await?;
        match &self.inner.web {
            Some(web) => web.probe().await,
            None => Ok(()),
        }
    }

    /// Fetch a new token now, replacing the cached one.
    pub async fn refresh_token(&self) -> Result<(), GenesysError> {
        let _refreshing = self.inner.refreshing.lock().await;
        let fresh = self.fetch_token().await?;
        self.store_token(Arc::new(fresh));
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
        let mut header = HeaderValue::from_str(&format!("Bearer {}", parsed.access_token))
            .map_err(|_| GenesysError::InvalidResponse {
                status,
                message:
                    "the token endpoint returned an access token that cannot be sent in a header"
                        .into(),
                correlation_id: None,
            })?;
        header.set_sensitive(true);
        Ok(CachedToken {
            value: Secret::new(parsed.access_token),
            header,
            refresh_at: Instant::now() + lifetime - margin,
        })
    }

    /// Create one session. A 401 refreshes the token once and tries again.
    pub async fn create_session(
        &self,
        req: &SessionRequest,
        idempotency_key: &str,
    ) -> Result<SessionCreated, GenesysError> {
        if let Some(web) = &self.inner.web {
            return web.open(self, req, idempotency_key).await;
        }
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
        let token = self.bearer().await?;
        match self.post_session(&token, &body).await {
            Err(GenesysError::Auth { status: 401, .. }) => {
                tracing::info!("Genesys Cloud answered 401; refreshing the token once");
                self.invalidate(&token.value).await;
                let token = self.bearer().await?;
                self.post_session(&token, &body).await
            }
            other => other,
        }
    }

    async fn post_session(
        &self,
        token: &CachedToken,
        body: &[u8],
    ) -> Result<SessionCreated, GenesysError> {
        let inner = &self.inner;
        let started = Instant::now();
        let response = inner
            .http
            .post(inner.session_url.clone())
            .header(AUTHORIZATION, token.header.clone())
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| GenesysError::from_session_transport(&e))?;
        let status = response.status().as_u16();
        let headers = response.headers();
        let correlation_id = crate::http_headers::header_str(headers, "inin-correlation-id");
        let rate_limit = RateLimitHeaders::from_headers(headers);
        if rate_limit.allowed.is_some() {
            tracing::trace!(allowed = ?rate_limit.allowed, count = ?rate_limit.count, reset = ?rate_limit.reset, "genesys rate limit headers");
        }
        if !(200..300).contains(&status) {
            // Errors are the rare path: their headers (Retry-After, ...) are kept for classifying.
            let headers = headers.clone();
            // The status decides; a body cut off on the way only loses the message.
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(error::classify(
                status,
                &headers,
                &bytes,
                inner.backend.auth_hint(),
            ));
        }
        let bytes = response.bytes().await.map_err(|e| GenesysError::Unknown {
            status: Some(status),
            detail: format!(
                "Genesys Cloud answered {status} but the body was lost ({}) at {}; the session exists, its id is unknown",
                crate::text::describe_chain(&e),
                crate::event::now_rfc3339()
            ),
            correlation_id: correlation_id.clone(),
        })?;
        let latency = started.elapsed();
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
                        crate::text::truncate(&String::from_utf8_lossy(&bytes))
                    ),
                    correlation_id: correlation_id.clone(),
                })?;
        Ok(SessionCreated {
            conversation_id,
            status,
            latency,
            correlation_id,
            rate_limit,
            message_id: None,
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
        Err(_) => crate::text::truncate(&String::from_utf8_lossy(body)),
    }
}
