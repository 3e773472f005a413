//! OAuth2 client-credentials tokens (SPEC §4): fetched from `{login_base_url}/oauth/token`,
//! cached and shared by every task. Reading the cached token takes a short read lock;
//! concurrent callers that find it missing or due wait on a single refresh. A token is
//! refreshed `genesys.token_refresh_margin` before it expires, and forgotten when a 401 says
//! it no longer works.

use super::error::{self, GenesysError};
use super::reply::answer;
use crate::config::GenesysSettings;
use crate::secret::Secret;
use base64::Engine;
use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Upper bound on how long a token is cached, whatever `expires_in` says.
const MAX_TOKEN_LIFETIME_SECS: u64 = 86_400;

pub struct CachedToken {
    pub value: Secret,
    /// `Bearer <token>`, built once per token and marked sensitive (never logged by the stack).
    pub header: HeaderValue,
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

/// The token cache of one process.
pub struct Tokens {
    http: reqwest::Client,
    token_url: String,
    client_id: String,
    client_secret: Secret,
    refresh_margin: Duration,
    /// Shared, so a request takes the token with a reference-count bump, not a copy.
    token: RwLock<Option<Arc<CachedToken>>>,
    /// Held while a token is fetched, so concurrent callers wait for one refresh.
    refreshing: Mutex<()>,
}

impl Tokens {
    pub fn new(http: reqwest::Client, settings: &GenesysSettings) -> Self {
        Self {
            http,
            token_url: format!("{}/oauth/token", settings.login_base()),
            client_id: settings.client_id.clone(),
            client_secret: settings.client_secret.clone(),
            refresh_margin: settings.token_refresh_margin,
            token: RwLock::new(None),
            refreshing: Mutex::new(()),
        }
    }

    fn cached(&self) -> Option<Arc<CachedToken>> {
        let guard = self.token.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().filter(|t| t.fresh()).cloned()
    }

    fn store_token(&self, token: Arc<CachedToken>) {
        *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
    }

    pub async fn bearer(&self) -> Result<Arc<CachedToken>, GenesysError> {
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let _refreshing = self.refreshing.lock().await;
        // Another task may have refreshed it while this one waited.
        if let Some(t) = self.cached() {
            return Ok(t);
        }
        let fresh = Arc::new(self.fetch().await?);
        self.store_token(fresh.clone());
        Ok(fresh)
    }

    /// Forget `stale` (the token a 401 answered) unless another task already replaced it.
    pub async fn invalidate(&self, stale: &Secret) {
        let _refreshing = self.refreshing.lock().await;
        let mut guard = self.token.write().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_some_and(|t| &t.value == stale) {
            *guard = None;
        }
    }

    /// Fetch a new token now, replacing the cached one.
    pub async fn refresh(&self) -> Result<(), GenesysError> {
        let _refreshing = self.refreshing.lock().await;
        let fresh = self.fetch().await?;
        self.store_token(Arc::new(fresh));
        Ok(())
    }

    async fn fetch(&self) -> Result<CachedToken, GenesysError> {
        let inner = self;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            inner.client_id,
            inner.client_secret.expose()
        ));
        let (status, headers, body) = answer(
            inner
                .http
                .post(&inner.token_url)
                .header(AUTHORIZATION, format!("Basic {basic}"))
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials"),
        )
        .await?;
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
