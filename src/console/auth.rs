//! Who may use the console: two roles, each a secret bearer token from the environment
//! (SPEC §7). No cookies, so no CSRF: a request carries `Authorization: Bearer <token>` or is
//! refused. Tokens are compared in constant time.

use crate::secret::Secret;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;

pub const VIEWER_ENV: &str = "SESSION_WORKER_CONSOLE_VIEWER_TOKEN";
pub const OPERATOR_ENV: &str = "SESSION_WORKER_CONSOLE_OPERATOR_TOKEN";
/// The shortest token accepted: a token is a password for the dead-letter queues.
pub const MIN_TOKEN_CHARS: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads.
    Viewer,
    /// Reads, plans, replays and purges.
    Operator,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("the console needs a token: set {VIEWER_ENV} (read only) and/or {OPERATOR_ENV} (plan, replay, purge), each a secret of at least {MIN_TOKEN_CHARS} characters (e.g. `openssl rand -hex 24`)")]
    None,
    #[error("{0} is shorter than {MIN_TOKEN_CHARS} characters: use a long random secret (e.g. `openssl rand -hex 24`)")]
    Short(&'static str),
    #[error("{VIEWER_ENV} and {OPERATOR_ENV} are the same: a viewer could then replay and purge; give each role its own secret")]
    Same,
}

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens {
    viewer: Option<Secret>,
    operator: Option<Secret>,
}

impl Tokens {
    /// From the environment (or anything that answers like it).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, TokenError> {
        let read = |name: &'static str| -> Result<Option<Secret>, TokenError> {
            match get(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
            {
                None => Ok(None),
                Some(v) if v.chars().count() < MIN_TOKEN_CHARS => Err(TokenError::Short(name)),
                Some(v) => Ok(Some(Secret::new(v))),
            }
        };
        let tokens = Self {
            viewer: read(VIEWER_ENV)?,
            operator: read(OPERATOR_ENV)?,
        };
        match (&tokens.viewer, &tokens.operator) {
            (None, None) => Err(TokenError::None),
            (Some(v), Some(o)) if v.expose() == o.expose() => Err(TokenError::Same),
            _ => Ok(tokens),
        }
    }

    pub fn from_env() -> Result<Self, TokenError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The role a presented token has, if any.
    pub fn role(&self, presented: &str) -> Option<Role> {
        let is = |t: &Option<Secret>| t.as_ref().is_some_and(|t| same(t.expose(), presented));
        // Both compared, whatever the first answer, so the time taken says nothing.
        let (operator, viewer) = (is(&self.operator), is(&self.viewer));
        if operator {
            Some(Role::Operator)
        } else if viewer {
            Some(Role::Viewer)
        } else {
            None
        }
    }
}

/// Constant-time equality of two strings (their lengths aside).
fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Middleware for `/api/`: a valid bearer token, its role added to the request; otherwise 401.
pub async fn require_token(
    State(tokens): State<Arc<Tokens>>,
    mut request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented.and_then(|p| tokens.role(p)) {
        Some(role) => {
            request.extensions_mut().insert(role);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            Json(serde_json::json!({
                "error": "a console token is required: Authorization: Bearer <token>"
            })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(viewer: Option<&str>, operator: Option<&str>) -> Result<Tokens, TokenError> {
        Tokens::from_lookup(|name| match name {
            VIEWER_ENV => viewer.map(str::to_string),
            OPERATOR_ENV => operator.map(str::to_string),
            _ => None,
        })
    }

    #[test]
    fn the_console_refuses_to_start_without_a_good_token() {
        assert_eq!(tokens(None, None).err(), Some(TokenError::None));
        assert_eq!(tokens(Some("  "), None).err(), Some(TokenError::None));
        assert_eq!(
            tokens(Some("short"), None).err(),
            Some(TokenError::Short(VIEWER_ENV))
        );
        let same = "0123456789abcdef0123";
        assert_eq!(tokens(Some(same), Some(same)).err(), Some(TokenError::Same));
    }

    #[test]
    fn each_token_has_its_role_and_nothing_else_has_one() {
        let t = tokens(
            Some("viewer-token-0123456789"),
            Some("operator-token-0123456789"),
        )
        .unwrap();
        assert_eq!(t.role("viewer-token-0123456789"), Some(Role::Viewer));
        assert_eq!(t.role("operator-token-0123456789"), Some(Role::Operator));
        assert_eq!(t.role("viewer-token-012345678"), None);
        assert_eq!(t.role(""), None);
        let viewer_only = tokens(Some("viewer-token-0123456789"), None).unwrap();
        assert_eq!(viewer_only.role("operator-token-0123456789"), None);
    }
}
