//! What an answer from Genesys Cloud carries back to the pipeline: the created session, the
//! rate-limit headers, and [`answer`], the one way a call that is safe to repeat is sent and
//! read whole.

use super::error::GenesysError;
use reqwest::header::HeaderMap;
use std::time::Duration;

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

/// Send a request that only reads or is safe to repeat, and take its whole answer: status,
/// headers and body. A transport failure is a timeout or a connection error (retried).
pub async fn answer(
    request: reqwest::RequestBuilder,
) -> Result<(u16, HeaderMap, bytes::Bytes), GenesysError> {
    let response = request
        .send()
        .await
        .map_err(|e| GenesysError::from_transport(&e))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .bytes()
        .await
        .map_err(|e| GenesysError::from_transport(&e))?;
    Ok((status, headers, body))
}
