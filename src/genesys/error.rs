//! Every outcome of a Genesys Cloud call, classified once: retryable, permanent or auth.

use crate::http_headers::{header_str, retry_after};
use crate::text::{describe_chain, truncate};
use reqwest::header::HeaderMap;
use serde::Deserialize;
use std::time::Duration;

/// What the caller should do about an error. Decided here and nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Try again later; `after` is the server's requested delay (429 `Retry-After`).
    Retry { after: Option<Duration> },
    /// The request itself is wrong; retrying cannot help. Dead-letter it.
    Permanent,
    /// Credentials or scopes are wrong; every request would fail. Pause, do not dead-letter.
    Auth,
    /// The request was sent and no usable answer came back: Genesys may have created the
    /// session. Never re-sent automatically (SPEC §5).
    Unknown,
}

#[derive(Debug, thiserror::Error)]
pub enum GenesysError {
    #[error("Genesys Cloud rate limit hit (429 {code}); retry after {}s", retry_after.as_secs_f64())]
    RateLimited {
        retry_after: Duration,
        code: String,
        correlation_id: Option<String>,
    },
    #[error("Genesys Cloud server error {status} {code}: {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
        correlation_id: Option<String>,
    },
    #[error("Genesys Cloud request timed out ({0})")]
    Timeout(String),
    #[error("cannot reach Genesys Cloud: {0}")]
    Connection(String),
    #[error("Genesys Cloud rejected the request: {status} {code}: {message}")]
    Permanent {
        status: u16,
        code: String,
        message: String,
        correlation_id: Option<String>,
    },
    #[error("Genesys Cloud refused the credentials ({status}): {message}. Fix: {hint}")]
    Auth {
        status: u16,
        message: String,
        hint: String,
    },
    #[error("outcome unknown: {detail}")]
    Unknown {
        status: Option<u16>,
        detail: String,
        correlation_id: Option<String>,
    },
    /// The request is too large for the guest session (`maxCustomDataBytes`): `invalid_request`.
    #[error("{message}")]
    TooLarge { message: String },
    #[error("unexpected answer from Genesys Cloud ({status}): {message}")]
    InvalidResponse {
        status: u16,
        message: String,
        correlation_id: Option<String>,
    },
}

impl GenesysError {
    pub fn disposition(&self) -> Disposition {
        match self {
            GenesysError::RateLimited { retry_after, .. } => Disposition::Retry {
                after: Some(*retry_after),
            },
            GenesysError::Server { .. }
            | GenesysError::Timeout(_)
            | GenesysError::Connection(_) => Disposition::Retry { after: None },
            GenesysError::Permanent { .. }
            | GenesysError::InvalidResponse { .. }
            | GenesysError::TooLarge { .. } => Disposition::Permanent,
            GenesysError::Auth { .. } => Disposition::Auth,
            GenesysError::Unknown { .. } => Disposition::Unknown,
        }
    }

    /// The HTTP status, where one applies.
    pub fn status(&self) -> Option<u16> {
        match self {
            GenesysError::RateLimited { .. } => Some(429),
            GenesysError::Server { status, .. }
            | GenesysError::Permanent { status, .. }
            | GenesysError::Auth { status, .. }
            | GenesysError::InvalidResponse { status, .. } => Some(*status),
            GenesysError::Unknown { status, .. } => *status,
            GenesysError::Timeout(_)
            | GenesysError::Connection(_)
            | GenesysError::TooLarge { .. } => None,
        }
    }

    /// The `inin-correlation-id` Genesys returned, for support tickets.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            GenesysError::RateLimited { correlation_id, .. }
            | GenesysError::Server { correlation_id, .. }
            | GenesysError::Permanent { correlation_id, .. }
            | GenesysError::InvalidResponse { correlation_id, .. }
            | GenesysError::Unknown { correlation_id, .. } => correlation_id.as_deref(),
            _ => None,
        }
    }

    /// A transport error of a session POST: only a failure to connect (DNS, refused, connect
    /// timeout, TLS handshake) proves the request was not written; anything later (a read
    /// timeout, a reset after writing) leaves the outcome unknown.
    pub fn from_session_transport(err: &reqwest::Error) -> Self {
        if err.is_connect() {
            return GenesysError::Connection(describe_chain(err));
        }
        let what = if err.is_timeout() {
            "no answer within genesys.request_timeout"
        } else {
            "the connection failed after the request was sent"
        };
        GenesysError::Unknown {
            status: None,
            detail: format!(
                "{what} ({}) at {}; Genesys Cloud may have created the session",
                describe_chain(err),
                crate::event::now_rfc3339()
            ),
            correlation_id: None,
        }
    }

    pub fn from_transport(err: &reqwest::Error) -> Self {
        if err.is_timeout() {
            GenesysError::Timeout(describe_chain(err))
        } else {
            GenesysError::Connection(describe_chain(err))
        }
    }
}

/// Genesys Cloud's error body: `{"message", "code", "status", "contextId", ...}`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub context_id: Option<String>,
}

/// Classify a non-2xx answer of the session endpoint.
/// `after_refresh` is true when a 401 comes after the token was already refreshed once.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8], auth_hint: &str) -> GenesysError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let correlation_id = header_str(headers, "inin-correlation-id").or(parsed.context_id.clone());
    let code = parsed
        .code
        .clone()
        .unwrap_or_else(|| status_code_name(status).to_string());
    let message = parsed
        .message
        .clone()
        .unwrap_or_else(|| truncate(&String::from_utf8_lossy(body)));
    match status {
        300..=399 => GenesysError::Permanent {
            status,
            code: "redirect".into(),
            message: format!(
                "answered with a redirect to {}; redirects are never followed (check genesys.region / api_base_url / login_base_url)",
                header_str(headers, "location").as_deref().map(crate::secret::redact_url).unwrap_or_else(|| "nowhere".into())
            ),
            correlation_id,
        },
        429 => GenesysError::RateLimited {
            retry_after: retry_after(headers).unwrap_or(Duration::from_secs(1)),
            code,
            correlation_id,
        },
        401 | 403 => GenesysError::Auth {
            status,
            message,
            hint: auth_hint.to_string(),
        },
        500 | 502 | 504 => GenesysError::Unknown {
            status: Some(status),
            detail: format!(
                "Genesys Cloud answered {status} {code} ({message}) at {}; it may have created the session",
                crate::event::now_rfc3339()
            ),
            correlation_id,
        },
        408 => GenesysError::Server {
            status,
            code,
            message,
            correlation_id,
        },
        501 => GenesysError::Permanent {
            status,
            code,
            message,
            correlation_id,
        },
        500..=599 => GenesysError::Server {
            status,
            code,
            message,
            correlation_id,
        },
        _ => GenesysError::Permanent {
            status,
            code,
            message,
            correlation_id,
        },
    }
}

fn status_code_name(status: u16) -> &'static str {
    match status {
        400 => "bad.request",
        401 => "authentication.required",
        403 => "missing.permissions",
        404 => "not.found",
        409 => "conflict",
        422 => "unprocessable.entity",
        429 => "too.many.requests",
        500..=599 => "server.error",
        _ => "http.error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn rate_limit_uses_retry_after() {
        let body = br#"{"message":"Rate limit exceeded","code":"too.many.requests.retry.after","status":429}"#;
        let e = classify(
            429,
            &headers(&[("retry-after", "7"), ("inin-correlation-id", "c-1")]),
            body,
            "",
        );
        assert_eq!(
            e.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_secs(7))
            }
        );
        assert_eq!(e.correlation_id(), Some("c-1"));
        assert_eq!(e.status(), Some(429));
        assert!(e.to_string().contains("too.many.requests.retry.after"));
    }

    #[test]
    fn rate_limit_falls_back_to_inin_reset() {
        let e = classify(429, &headers(&[("inin-ratelimit-reset", "12")]), b"", "");
        assert_eq!(
            e.disposition(),
            Disposition::Retry {
                after: Some(Duration::from_secs(12))
            }
        );
    }

    #[test]
    fn server_errors_retry_except_501() {
        for status in [503, 408] {
            assert_eq!(
                classify(status, &HeaderMap::new(), b"", "").disposition(),
                Disposition::Retry { after: None }
            );
        }
        assert_eq!(
            classify(501, &HeaderMap::new(), b"", "").disposition(),
            Disposition::Permanent
        );
    }

    #[test]
    fn client_errors_are_permanent_with_genesys_message() {
        let body = br#"{"message":"The routing queue was not found","code":"not.found","status":404,"contextId":"ctx-9"}"#;
        for status in [400, 404, 409, 422] {
            let e = classify(status, &HeaderMap::new(), body, "");
            assert_eq!(e.disposition(), Disposition::Permanent);
            assert!(e.to_string().contains("The routing queue was not found"));
            assert_eq!(e.correlation_id(), Some("ctx-9"));
        }
    }

    #[test]
    fn auth_errors_carry_the_fix() {
        let e = classify(
            403,
            &HeaderMap::new(),
            br#"{"message":"Missing permission"}"#,
            "grant the scope",
        );
        assert_eq!(e.disposition(), Disposition::Auth);
        assert!(e.to_string().contains("grant the scope"));
        assert_eq!(
            classify(401, &HeaderMap::new(), b"", "").disposition(),
            Disposition::Auth
        );
    }

    #[test]
    fn answers_that_may_have_acted_are_unknown() {
        for status in [500, 502, 504] {
            let e = classify(status, &HeaderMap::new(), b"", "");
            assert_eq!(e.disposition(), Disposition::Unknown, "{status}");
            assert_eq!(e.status(), Some(status));
        }
    }

    #[test]
    fn redirects_are_permanent_and_name_the_location() {
        let e = classify(
            307,
            &headers(&[("location", "https://elsewhere.example/x?token=abc")]),
            b"",
            "",
        );
        assert_eq!(e.disposition(), Disposition::Permanent);
        let text = e.to_string();
        assert!(
            text.contains("elsewhere.example") && text.contains("never followed"),
            "{text}"
        );
        assert!(
            !text.contains("abc"),
            "credentials in the Location are redacted: {text}"
        );
    }

    #[test]
    fn non_json_body_is_truncated() {
        let body = "x".repeat(2000);
        let e = classify(400, &HeaderMap::new(), body.as_bytes(), "");
        assert!(e.to_string().len() < 700);
    }
}
