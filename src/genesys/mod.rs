//! Genesys Cloud client: OAuth2 client-credentials tokens and session creation.
//!
//! One `GenesysClient` per process, cloned into every task. A 401 refreshes the token once and
//! retries; a second 401 (or a 403) is an [`GenesysError::Auth`]. The API itself is chosen by
//! [`Backend`]; the simulator and the real cloud differ only in base URLs.
//!
//! - [`backend`]: the three session APIs (Web Messaging, conversations, Open Messaging);
//! - [`web_messaging`]: the Guest API over WebSocket, a guest session per idempotency key;
//! - [`token`]: the OAuth2 token cache every call shares;
//! - [`reply`]: what an answer carries back (the created session, rate-limit headers);
//! - [`error`]: every answer classified once into retry, permanent or auth.
//!
//! Imports point down this list's reverse: `web_messaging` uses `token`, `reply` and `error`,
//! never this file.
//!
//! The client knows nothing of the broker, the store or the pipelines; it uses `config`,
//! `request` and the helpers.

pub mod backend;
pub mod error;
pub mod reply;
pub mod token;
pub mod web_messaging;

pub use backend::Backend;
pub use error::{Disposition, GenesysError};
pub use reply::{RateLimitHeaders, SessionCreated};

use crate::config::GenesysSettings;
use crate::request::SessionRequest;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use token::{CachedToken, Tokens};

#[derive(Clone)]
pub struct GenesysClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    tokens: Tokens,
    /// The backend's session URL, parsed once.
    session_url: reqwest::Url,
    backend: Backend,
    /// The Guest API client when `genesys.api = "web_messaging"`.
    web: Option<web_messaging::WebMessaging>,
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
                Some(web_messaging::WebMessaging::new(settings, http.clone())?)
            }
            _ => None,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                web,
                tokens: Tokens::new(http.clone(), settings),
                http,
                session_url,
                backend,
            }),
        })
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The auth gate's probe: a new token and, for Web Messaging, the Guest API handshake with
    /// a session of the probe's own and an echo.
    pub async fn probe(&self) -> Result<(), GenesysError> {
        self.inner.tokens.refresh().await?;
        match &self.inner.web {
            Some(web) => web.probe().await,
            None => Ok(()),
        }
    }

    /// Create one session. A 401 refreshes the token once and tries again.
    pub async fn create_session(
        &self,
        req: &SessionRequest,
        idempotency_key: &str,
    ) -> Result<SessionCreated, GenesysError> {
        if let Some(web) = &self.inner.web {
            // Boxed: a Guest API call's future (the handshake, the socket) is many times an
            // HTTP call's, and every delivery's task would carry its size inline otherwise
            // (measured: +9 MiB peak RSS on the conversations backend with 96 deliveries in
            // hand).
            return Box::pin(web.open(&self.inner.tokens, req, idempotency_key)).await;
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
        let tokens = &self.inner.tokens;
        let token = tokens.bearer().await?;
        match self.post_session(&token, &body).await {
            Err(GenesysError::Auth { status: 401, .. }) => {
                tracing::info!("Genesys Cloud answered 401; refreshing the token once");
                tokens.invalidate(&token.value).await;
                let token = tokens.bearer().await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_call_future_stays_small_whatever_the_backend() {
        let settings = crate::config::Settings::load_from(None, &Default::default())
            .expect("defaults load")
            .genesys;
        let client = GenesysClient::new(&settings, 1).expect("client");
        let req = SessionRequest::parse(br#"{"visitor_id":"v","queue_id":"q"}"#).expect("parses");
        let call = client.create_session(&req, "k");
        // Every delivery's task holds one of these: the Guest API's path is boxed.
        assert!(
            std::mem::size_of_val(&call) < 8 * 1024,
            "{} bytes",
            std::mem::size_of_val(&call)
        );
    }
}
