//! The message contract's vocabulary: the result event published to `session.results`
//! (SPEC §4) for every finished request, and the failure [`Reason`]s written to dead letters.

use crate::text::sha256_hex;
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// Why a message failed: `x-failure-reason` on dead letters and `error.reason` in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Bad input (SPEC §5).
    InvalidRequest,
    /// The key was used before with another body.
    IdempotencyConflict,
    /// Genesys answered 400/404/409/422 (or an answer that cannot be used).
    PermanentApiError,
    /// Every in-process attempt and delayed retry failed.
    RetriesExhausted,
    /// The webhook receiver refused the event for good (4xx).
    WebhookRejected,
    /// The session POST was sent and no usable answer came back: not re-sent.
    OutcomeUnknown,
    /// A delivery kept failing for a reason no other rule covers.
    PoisonMessage,
}

impl Reason {
    pub const ALL: &'static [Reason] = &[
        Reason::InvalidRequest,
        Reason::IdempotencyConflict,
        Reason::PermanentApiError,
        Reason::RetriesExhausted,
        Reason::WebhookRejected,
        Reason::OutcomeUnknown,
        Reason::PoisonMessage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidRequest => "invalid_request",
            Reason::IdempotencyConflict => "idempotency_conflict",
            Reason::PermanentApiError => "permanent_api_error",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::WebhookRejected => "webhook_rejected",
            Reason::OutcomeUnknown => "outcome_unknown",
            Reason::PoisonMessage => "poison_message",
        }
    }

    /// The reason spelled `text`, if it is one.
    pub fn parse(text: &str) -> Option<Reason> {
        Reason::ALL.iter().copied().find(|r| r.as_str() == text)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    SessionStarted,
    SessionFailed,
    SessionRejected,
}

impl EventKind {
    /// Routing key on the results exchange.
    pub fn routing_key(self) -> &'static str {
        match self {
            EventKind::SessionStarted => "session.started",
            EventKind::SessionFailed => "session.failed",
            EventKind::SessionRejected => "session.rejected",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::SessionStarted => "session_started",
            EventKind::SessionFailed => "session_failed",
            EventKind::SessionRejected => "session_rejected",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventError {
    pub reason: String,
    pub status: Option<u16>,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultEvent {
    pub event: EventKind,
    pub event_id: String,
    pub timestamp: String,
    pub idempotency_key: String,
    pub conversation_id: Option<String>,
    pub visitor_id: String,
    pub queue_id: String,
    pub latency_ms: f64,
    pub attempts: u32,
    pub error: Option<EventError>,
}

/// Stable per idempotency key and outcome: a re-published event keeps its id, so webhook
/// receivers can deduplicate on `webhook-id`.
pub fn event_id(idempotency_key: &str, kind: EventKind) -> String {
    let digest = sha256_hex(format!("{idempotency_key}\n{}", kind.as_str()).as_bytes());
    format!("evt_{}", &digest[..32])
}

/// RFC 3339 UTC with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl ResultEvent {
    pub fn new(kind: EventKind, idempotency_key: &str, visitor_id: &str, queue_id: &str) -> Self {
        Self {
            event: kind,
            event_id: event_id(idempotency_key, kind),
            timestamp: now_rfc3339(),
            idempotency_key: idempotency_key.to_string(),
            conversation_id: None,
            visitor_id: visitor_id.to_string(),
            queue_id: queue_id.to_string(),
            latency_ms: 0.0,
            attempts: 0,
            error: None,
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_stable_per_key_and_outcome() {
        assert_eq!(
            event_id("k", EventKind::SessionStarted),
            event_id("k", EventKind::SessionStarted)
        );
        assert_ne!(
            event_id("k", EventKind::SessionStarted),
            event_id("k", EventKind::SessionFailed)
        );
        assert_ne!(
            event_id("k", EventKind::SessionStarted),
            event_id("k2", EventKind::SessionStarted)
        );
    }

    #[test]
    fn serializes_spec_fields() {
        let mut e = ResultEvent::new(EventKind::SessionFailed, "k", "v", "q");
        e.error = Some(EventError {
            reason: "permanent_api_error".into(),
            status: Some(404),
            message: "nope".into(),
        });
        let v: serde_json::Value = serde_json::from_slice(&e.to_json()).unwrap();
        assert_eq!(v["event"], "session_failed");
        assert_eq!(v["conversation_id"], serde_json::Value::Null);
        assert_eq!(v["error"]["status"], 404);
        for key in [
            "event_id",
            "timestamp",
            "idempotency_key",
            "visitor_id",
            "queue_id",
            "latency_ms",
            "attempts",
        ] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
    }
}
