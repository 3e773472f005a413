//! The two REST calls of the Web Messaging backend: the guest session's history (with the
//! session's JWT and the `Origin`) and a message's details (with the OAuth client token), which
//! names the conversation. Both only read, so every failure that is not a configuration problem
//! is retried.

use super::frames::StructuredMessage;
use crate::genesys::error::{self, GenesysError};
use crate::genesys::reply::{answer, RateLimitHeaders};
use crate::genesys::token::Tokens;
use reqwest::header::{HeaderMap, AUTHORIZATION};
use serde::Deserialize;
use std::time::Duration;

/// Pages of history read before giving up on finding the start (100 messages a page).
const MAX_HISTORY_PAGES: u32 = 10;
/// A 404 right after the echo: the details are not there yet. Tries, a short pause apart.
const DETAILS_NOT_FOUND_TRIES: u32 = 5;
const DETAILS_NOT_FOUND_PAUSE: Duration = Duration::from_millis(200);

const DETAILS_HINT: &str = "check GENESYS_CLIENT_ID/GENESYS_CLIENT_SECRET and the region; the OAuth client (client credentials grant) needs a role with the conversation:message:view permission, which the message details call (GET /api/v2/conversations/messages/{id}/details) requires";
const HISTORY_HINT: &str = "the Guest API's history call refused the session's JWT: check that genesys.web_messaging_origin is one of the deployment's allowed domains and that api_base_url / region match web_messaging_url";

#[derive(Deserialize)]
struct HistoryPage {
    #[serde(default)]
    entities: Vec<serde_json::Value>,
    #[serde(default, rename = "pageCount")]
    page_count: Option<u32>,
}

/// The start's message id if the session's history has one.
pub async fn start_in_history(
    http: &reqwest::Client,
    api_base: &str,
    jwt: &str,
    origin: &str,
) -> Result<Option<String>, GenesysError> {
    for page in 1..=MAX_HISTORY_PAGES {
        let (status, headers, body) = answer(
            http.get(format!("{api_base}/api/v2/webmessaging/messages"))
                .query(&[("pageSize", "100"), ("pageNumber", &page.to_string())])
                .header(AUTHORIZATION, format!("Bearer {jwt}"))
                .header("origin", origin),
        )
        .await?;
        if !(200..300).contains(&status) {
            return Err(read_only_error(status, &headers, &body, HISTORY_HINT));
        }
        let parsed: HistoryPage =
            serde_json::from_slice(&body).map_err(|e| GenesysError::Server {
                status,
                code: "history.body".into(),
                message: format!("the history is not the expected JSON: {e}"),
                correlation_id: None,
            })?;
        // Entities of another shape (attachments, events this client does not know) are skipped.
        let start = parsed
            .entities
            .into_iter()
            .filter_map(|e| serde_json::from_value::<StructuredMessage>(e).ok())
            .find(StructuredMessage::is_start);
        if let Some(m) = start {
            return Ok(Some(m.id));
        }
        if page >= parsed.page_count.unwrap_or(1) {
            return Ok(None);
        }
    }
    Ok(None)
}

/// What the details call found.
pub struct Found {
    pub conversation_id: String,
    pub status: u16,
    pub correlation_id: Option<String>,
    pub rate_limit: RateLimitHeaders,
}

/// The conversation of `message_id`. A 401 refreshes the token once; a 404 right after the echo
/// is tried again briefly.
pub async fn conversation_of(
    http: &reqwest::Client,
    tokens: &Tokens,
    api_base: &str,
    message_id: &str,
) -> Result<Found, GenesysError> {
    let url = format!("{api_base}/api/v2/conversations/messages/{message_id}/details");
    let mut refreshed = false;
    let mut not_found = 0;
    loop {
        let token = tokens.bearer().await?;
        let (status, headers, body) =
            answer(http.get(&url).header(AUTHORIZATION, token.header.clone())).await?;
        match status {
            200..=299 => return found(status, &headers, &body),
            401 if !refreshed => {
                refreshed = true;
                tokens.invalidate(&token.value).await;
            }
            404 if not_found + 1 < DETAILS_NOT_FOUND_TRIES => {
                not_found += 1;
                tokio::time::sleep(DETAILS_NOT_FOUND_PAUSE * not_found).await;
            }
            _ => return Err(read_only_error(status, &headers, &body, DETAILS_HINT)),
        }
    }
}

fn found(status: u16, headers: &HeaderMap, body: &[u8]) -> Result<Found, GenesysError> {
    let correlation_id = crate::http_headers::header_str(headers, "inin-correlation-id");
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let conversation_id = json
        .get("conversationId")
        .and_then(serde_json::Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    match conversation_id {
        Some(conversation_id) => Ok(Found {
            conversation_id,
            status,
            correlation_id,
            rate_limit: RateLimitHeaders::from_headers(headers),
        }),
        // Retried: the call only reads, and the next attempt finds the same start.
        None => Err(GenesysError::Server {
            status,
            code: "details.no.conversation".into(),
            message: format!(
                "the message details answered {status} without a conversationId: {}",
                crate::text::truncate(&String::from_utf8_lossy(body))
            ),
            correlation_id,
        }),
    }
}

/// A non-2xx answer of a call that only reads: what would be `outcome_unknown` for a create
/// (500/502/504) is retried, a 404 that outlasted its tries too; 401/403 pause with `hint`.
fn read_only_error(status: u16, headers: &HeaderMap, body: &[u8], hint: &str) -> GenesysError {
    match error::classify(status, headers, body, hint) {
        GenesysError::Unknown {
            detail,
            correlation_id,
            ..
        } => GenesysError::Server {
            status,
            code: "server.error".into(),
            message: detail,
            correlation_id,
        },
        GenesysError::Permanent {
            status: 404,
            code,
            message,
            correlation_id,
        } => GenesysError::Server {
            status: 404,
            code,
            message: format!("not found yet: {message}"),
            correlation_id,
        },
        other => other,
    }
}
