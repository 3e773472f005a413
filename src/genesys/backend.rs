//! The seam between the pipeline and the three Genesys Cloud APIs that can open a session: the
//! Web Messaging Guest API (its conversation is [`super::web_messaging`]'s), the conversations
//! endpoint the product was specified with, and Open Messaging inbound. Each backend builds its
//! request and reads its answer; nothing else knows which one runs.

use crate::config::{GenesysApi, GenesysSettings};
use crate::request::SessionRequest;
use serde_json::{json, Map, Value};
use std::time::SystemTime;

#[derive(Debug, Clone)]
pub enum Backend {
    /// The Guest API WebSocket at `url` (`{web_messaging_url}`); see [`super::web_messaging`].
    WebMessaging { url: String },
    /// `POST {api_base}{session_path}` with the SPEC §4 body.
    Conversations { url: String },
    /// `POST {api_base}/api/v2/conversations/messages/{integration_id}/inbound/open/message`.
    OpenMessaging { url: String, text: String },
}

impl Backend {
    pub fn from_settings(g: &GenesysSettings) -> Self {
        let base = g.api_base();
        match g.api {
            GenesysApi::WebMessaging => Backend::WebMessaging {
                url: g.web_messaging_base(),
            },
            GenesysApi::Conversations => Backend::Conversations {
                url: format!("{base}{}", g.session_path),
            },
            GenesysApi::OpenMessaging => Backend::OpenMessaging {
                url: open_messaging_url(&base, g.integration_id.trim()),
                text: g.open_messaging_text.clone(),
            },
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Backend::WebMessaging { url }
            | Backend::Conversations { url }
            | Backend::OpenMessaging { url, .. } => url,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Backend::WebMessaging { .. } => "web_messaging",
            Backend::Conversations { .. } => "conversations",
            Backend::OpenMessaging { .. } => "open_messaging",
        }
    }

    /// The JSON body for one request.
    pub fn body(&self, req: &SessionRequest, idempotency_key: &str, now: SystemTime) -> Value {
        match self {
            // The start frame is built by web_messaging; its custom attributes are the payload.
            Backend::WebMessaging { .. } => Value::Object(req.custom_attributes()),
            Backend::Conversations { .. } => conversations_body(req),
            Backend::OpenMessaging { text, .. } => {
                open_messaging_body(req, idempotency_key, text, now)
            }
        }
    }

    /// The conversation id in a 2xx answer, if there is one.
    pub fn conversation_id(&self, body: &Value) -> Option<String> {
        let pick = |key: &str| {
            body.get(key)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        match self {
            Backend::Conversations { .. } => pick("conversationId").or_else(|| pick("id")),
            Backend::OpenMessaging { .. } | Backend::WebMessaging { .. } => pick("conversationId"),
        }
    }

    /// Whether sending the same request again can never open a second session (the Web
    /// Messaging session token is derived from the key): then nothing is `outcome_unknown`.
    pub fn idempotent(&self) -> bool {
        matches!(self, Backend::WebMessaging { .. })
    }

    /// What to tell the operator when the API answers 401/403.
    pub fn auth_hint(&self) -> &'static str {
        match self {
            Backend::WebMessaging { .. } => {
                "check GENESYS_CLIENT_ID/GENESYS_CLIENT_SECRET and the region; the OAuth client (client credentials grant) needs a role with conversation:message:view (the message details call); the Guest API handshake needs genesys.web_messaging_origin among the Messenger deployment's allowed domains"
            }
            Backend::Conversations { .. } => {
                "check GENESYS_CLIENT_ID/GENESYS_CLIENT_SECRET and the region; the OAuth client (client credentials grant) needs a role with conversation:messaging:write"
            }
            Backend::OpenMessaging { .. } => {
                "check GENESYS_CLIENT_ID/GENESYS_CLIENT_SECRET and the region; the OAuth client (client credentials grant) needs a role with the conversation:message:receive permission"
            }
        }
    }
}

pub fn open_messaging_url(base: &str, integration_id: &str) -> String {
    format!("{base}/api/v2/conversations/messages/{integration_id}/inbound/open/message?prefetchConversationId=true")
}

fn conversations_body(req: &SessionRequest) -> Value {
    json!({
        "type": "messaging",
        "initiator": {"type": "external", "id": req.visitor_id, "name": req.visitor_name()},
        "to": {"type": "routingQueue", "id": req.queue_id},
        "metadata": req.metadata(),
    })
}

fn open_messaging_body(req: &SessionRequest, key: &str, text: &str, now: SystemTime) -> Value {
    let mut attrs = Map::new();
    // Request attributes first, so the routing fields below always win.
    if let Some(extra) = &req.attributes {
        for (k, v) in extra {
            let s = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            attrs.insert(k.clone(), Value::String(s));
        }
    }
    attrs.insert("queue_id".into(), Value::String(req.queue_id.clone()));
    if let Some(score) = req.bot_score {
        attrs.insert("bot_score".into(), Value::String(score.to_string()));
    }
    if let Some(source) = &req.source {
        attrs.insert("source".into(), Value::String(source.clone()));
    }
    if let Some(ext) = &req.external_id {
        attrs.insert("external_id".into(), Value::String(ext.clone()));
    }
    json!({
        "channel": {
            "messageId": key,
            "time": humantime::format_rfc3339_millis(now).to_string(),
            "from": {"id": req.visitor_id, "idType": "Opaque", "nickname": req.visitor_name()},
            "metadata": {"customAttributes": Value::Object(attrs)},
        },
        "type": "Text",
        "direction": "Inbound",
        "text": text,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn sample() -> SessionRequest {
        SessionRequest::parse(
            br#"{"visitor_id": "guest-88421-uuid", "queue_id": "routing-queue-id",
 "visitor_name": "Anonymous Visitor", "bot_score": 0.12, "source": "marketing_landing",
 "external_id": "ext-track-9921", "attributes": {"campaign": "spring", "visits": 3}}"#,
        )
        .unwrap()
    }

    #[test]
    fn conversations_body_is_the_spec_body() {
        let b = Backend::Conversations { url: "u".into() };
        let body = b.body(&sample(), "k", UNIX_EPOCH);
        assert_eq!(
            body,
            json!({"type": "messaging",
                "initiator": {"type": "external", "id": "guest-88421-uuid", "name": "Anonymous Visitor"},
                "to": {"type": "routingQueue", "id": "routing-queue-id"},
                "metadata": {"bot_score": 0.12, "source_channel": "marketing_landing",
                             "external_session_id": "ext-track-9921",
                             "attributes": {"campaign": "spring", "visits": 3}}})
        );
    }

    #[test]
    fn conversations_body_omits_absent_values() {
        let req = SessionRequest::parse(br#"{"visitor_id":"v","queue_id":"q"}"#).unwrap();
        let body = Backend::Conversations { url: "u".into() }.body(&req, "k", UNIX_EPOCH);
        assert_eq!(body["metadata"], json!({}));
        assert_eq!(body["initiator"]["name"], "Anonymous Visitor");
    }

    #[test]
    fn open_messaging_body_is_the_spec_body() {
        let b = Backend::OpenMessaging {
            url: "u".into(),
            text: "Hello".into(),
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_764_000_000_123);
        let body = b.body(&sample(), "key-1", at);
        assert_eq!(
            body,
            json!({"channel": {"messageId": "key-1", "time": "2025-11-24T16:00:00.123Z",
                  "from": {"id": "guest-88421-uuid", "idType": "Opaque", "nickname": "Anonymous Visitor"},
                  "metadata": {"customAttributes": {"queue_id": "routing-queue-id", "bot_score": "0.12",
                     "source": "marketing_landing", "external_id": "ext-track-9921",
                     "campaign": "spring", "visits": "3"}}},
                  "type": "Text", "direction": "Inbound", "text": "Hello"})
        );
    }

    #[test]
    fn conversation_id_lookup_per_backend() {
        let conv = Backend::Conversations { url: "u".into() };
        assert_eq!(conv.conversation_id(&json!({"id": "a"})), Some("a".into()));
        assert_eq!(
            conv.conversation_id(&json!({"id": "a", "conversationId": "b"})),
            Some("b".into())
        );
        let om = Backend::OpenMessaging {
            url: "u".into(),
            text: "t".into(),
        };
        assert_eq!(om.conversation_id(&json!({"id": "message-id"})), None);
        assert_eq!(
            om.conversation_id(&json!({"conversationId": "c"})),
            Some("c".into())
        );
    }

    #[test]
    fn open_messaging_url_prefetches_conversation_id() {
        assert_eq!(
            open_messaging_url("https://api.mypurecloud.de", "int-1"),
            "https://api.mypurecloud.de/api/v2/conversations/messages/int-1/inbound/open/message?prefetchConversationId=true"
        );
    }
}
