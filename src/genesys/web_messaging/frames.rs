//! The Web Messaging Guest API's frames as typed values (SPEC §4).
//!
//! Requests are serialized from structs; replies arrive as the envelope
//! `{"type", "class", "code", "body", "tracingId"}` and are read into [`Reply`] by their
//! `class`. Whatever the server sends (unknown classes, unknown fields, wrong types, no JSON at
//! all) becomes a value or an error, never a panic; an unknown class is logged once.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Mutex;

/// `configureSession`: open (or resume) the guest session the token names.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigureSession<'a> {
    pub action: &'static str,
    pub deployment_id: &'a str,
    pub token: &'a str,
    pub start_new: bool,
    pub tracing_id: &'a str,
}

impl<'a> ConfigureSession<'a> {
    pub fn new(
        deployment_id: &'a str,
        token: &'a str,
        start_new: bool,
        tracing_id: &'a str,
    ) -> Self {
        Self {
            action: "configureSession",
            deployment_id,
            token,
            start_new,
            tracing_id,
        }
    }
}

/// `onMessage`: the start of the conversation (a Presence Join event or a first Text).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OnMessage<'a> {
    pub action: &'static str,
    pub token: &'a str,
    pub message: StartMessage<'a>,
    pub tracing_id: &'a str,
}

#[derive(Debug, Serialize)]
pub struct StartMessage<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<Value>,
    pub channel: SendChannel<'a>,
}

#[derive(Debug, Serialize)]
pub struct SendChannel<'a> {
    pub metadata: SendMetadata<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SendMetadata<'a> {
    pub custom_attributes: &'a Map<String, Value>,
}

impl<'a> OnMessage<'a> {
    /// A Presence Join event (`text` is `None`) or a Text message carrying the attributes.
    pub fn start(
        token: &'a str,
        text: Option<&'a str>,
        custom_attributes: &'a Map<String, Value>,
        tracing_id: &'a str,
    ) -> Self {
        let (kind, events) = match text {
            Some(_) => ("Text", Vec::new()),
            None => (
                "Event",
                vec![serde_json::json!({"eventType": "Presence", "presence": {"type": "Join"}})],
            ),
        };
        Self {
            action: "onMessage",
            token,
            message: StartMessage {
                kind,
                text,
                events,
                channel: SendChannel {
                    metadata: SendMetadata { custom_attributes },
                },
            },
            tracing_id,
        }
    }
}

/// `getJwt` (the session's JWT, for the history call) and `echo` (a ping the server answers).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenAction<'a> {
    pub action: &'static str,
    pub token: &'a str,
    pub tracing_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Value>,
}

impl<'a> TokenAction<'a> {
    pub fn get_jwt(token: &'a str, tracing_id: &'a str) -> Self {
        Self {
            action: "getJwt",
            token,
            tracing_id,
            message: None,
        }
    }

    pub fn echo(token: &'a str, tracing_id: &'a str) -> Self {
        Self {
            action: "echo",
            token,
            tracing_id,
            message: Some(serde_json::json!({"type": "Text", "text": "ping"})),
        }
    }
}

/// `SessionResponse`: the session is configured.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionResponse {
    #[serde(default)]
    pub connected: bool,
    #[serde(default)]
    pub new_session: bool,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub max_custom_data_bytes: Option<u64>,
}

/// `StructuredMessage`: a message of the session (the echo of what was sent is `Inbound`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StructuredMessage {
    #[serde(default)]
    pub id: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub text: Option<String>,
    #[serde(default)]
    pub events: Vec<Value>,
}

impl StructuredMessage {
    pub fn inbound(&self) -> bool {
        self.direction == "Inbound"
    }

    /// The guest's own message or event (what this worker sends as a start), not a ping echo.
    pub fn is_start(&self) -> bool {
        self.inbound() && !self.id.is_empty() && self.text.as_deref() != Some("ping")
    }
}

/// `JwtResponse`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct JwtResponse {
    #[serde(default)]
    pub jwt: String,
}

/// `TooManyRequestsErrorMessage` (code 429, error code 4029).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TooManyRequests {
    #[serde(default)]
    pub retry_after: Option<f64>,
    #[serde(default)]
    pub error_code: Option<i64>,
    #[serde(default)]
    pub error_message: Option<String>,
}

/// One reply, read by its class.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Session(SessionResponse),
    Message(StructuredMessage),
    Jwt(JwtResponse),
    TooManyRequests(TooManyRequests),
    /// The session ended on the server's side (`SessionExpiredEvent`).
    SessionExpired,
    /// An error: `class` `string` (or any class) with a code of 400 or more.
    Error {
        code: i64,
        message: String,
    },
    /// A class this client does not use (presence, typing, attachments...).
    Other {
        class: String,
    },
}

/// A reply and the `tracingId` it answers, if it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    pub code: i64,
    pub tracing_id: Option<String>,
    pub reply: Reply,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("the Guest API sent a frame that is not its JSON envelope: {0}")]
pub struct FrameError(pub String);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    #[serde(default)]
    class: Option<String>,
    #[serde(default)]
    code: Option<Value>,
    #[serde(default)]
    body: Value,
    #[serde(default)]
    tracing_id: Option<Value>,
}

/// Read one text frame.
pub fn parse(text: &str) -> Result<Frame, FrameError> {
    let env: Envelope = serde_json::from_str(text)
        .map_err(|e| FrameError(crate::text::truncate(&e.to_string())))?;
    let code = env.code.as_ref().and_then(code_of).unwrap_or(200);
    let tracing_id = env.tracing_id.and_then(|t| t.as_str().map(str::to_string));
    let class = env.class.unwrap_or_default();
    let reply = read_body(&class, code, env.body);
    Ok(Frame {
        code,
        tracing_id,
        reply,
    })
}

/// A code as a number, whether the server wrote `429` or `"429"`.
fn code_of(v: &Value) -> Option<i64> {
    v.as_i64()
        .or_else(|| v.as_f64().map(|f| f as i64))
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn read_body(class: &str, code: i64, body: Value) -> Reply {
    let typed = |body: Value| match class {
        "SessionResponse" => serde_json::from_value(body).map(Reply::Session).ok(),
        "StructuredMessage" => serde_json::from_value(body).map(Reply::Message).ok(),
        "JwtResponse" => serde_json::from_value(body).map(Reply::Jwt).ok(),
        "TooManyRequestsErrorMessage" => serde_json::from_value(body)
            .map(Reply::TooManyRequests)
            .ok(),
        "SessionExpiredEvent" => Some(Reply::SessionExpired),
        _ => None,
    };
    if class == "TooManyRequestsErrorMessage" || code == 429 {
        return typed(body).unwrap_or(Reply::TooManyRequests(TooManyRequests {
            retry_after: None,
            error_code: Some(4029),
            error_message: None,
        }));
    }
    if code >= 400 {
        return Reply::Error {
            code,
            message: message_of(&body),
        };
    }
    let known = matches!(
        class,
        "SessionResponse" | "StructuredMessage" | "JwtResponse" | "SessionExpiredEvent"
    );
    match typed(body) {
        Some(reply) => reply,
        None => {
            if !known {
                log_unknown_once(class);
            }
            Reply::Other {
                class: class.to_string(),
            }
        }
    }
}

fn message_of(body: &Value) -> String {
    let text = match body {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other
            .get("errorMessage")
            .or_else(|| other.get("message"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| other.to_string()),
    };
    crate::text::truncate(&text)
}

/// Classes logged so far; bounded, so a server inventing classes cannot grow it.
static UNKNOWN_SEEN: Mutex<Option<HashSet<String>>> = Mutex::new(None);
const UNKNOWN_KEPT: usize = 64;

fn log_unknown_once(class: &str) {
    let mut seen = UNKNOWN_SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let seen = seen.get_or_insert_with(HashSet::new);
    if seen.len() < UNKNOWN_KEPT && seen.insert(class.to_string()) {
        crate::internal_events::web_messaging_unknown_class(class);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_have_the_guest_api_shape() {
        let c = ConfigureSession::new("dep", "tok", false, "t1");
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            json!({"action": "configureSession", "deploymentId": "dep", "token": "tok",
                   "startNew": false, "tracingId": "t1"})
        );
        let attrs: Map<String, Value> =
            [("queue_id".to_string(), json!("q"))].into_iter().collect();
        let join = OnMessage::start("tok", None, &attrs, "t2");
        assert_eq!(
            serde_json::to_value(&join).unwrap(),
            json!({"action": "onMessage", "token": "tok", "tracingId": "t2",
                   "message": {"type": "Event",
                               "events": [{"eventType": "Presence", "presence": {"type": "Join"}}],
                               "channel": {"metadata": {"customAttributes": {"queue_id": "q"}}}}})
        );
        let text = OnMessage::start("tok", Some("hi"), &attrs, "t3");
        let v = serde_json::to_value(&text).unwrap();
        assert_eq!(v["message"]["type"], "Text");
        assert_eq!(v["message"]["text"], "hi");
        assert!(v["message"].get("events").is_none());
        assert_eq!(
            serde_json::to_value(TokenAction::get_jwt("tok", "t4")).unwrap(),
            json!({"action": "getJwt", "token": "tok", "tracingId": "t4"})
        );
        assert_eq!(
            serde_json::to_value(TokenAction::echo("tok", "t5")).unwrap()["message"]["text"],
            "ping"
        );
    }

    #[test]
    fn replies_are_read_by_class() {
        let f = parse(r#"{"type":"response","class":"SessionResponse","code":200,"body":{"connected":true,"newSession":true,"maxCustomDataBytes":2048,"extra":1},"tracingId":"t1"}"#).unwrap();
        assert_eq!(f.tracing_id.as_deref(), Some("t1"));
        assert_eq!(
            f.reply,
            Reply::Session(SessionResponse {
                connected: true,
                new_session: true,
                read_only: false,
                max_custom_data_bytes: Some(2048)
            })
        );
        let f = parse(r#"{"type":"message","class":"StructuredMessage","code":200,"body":{"id":"m1","type":"Event","direction":"Inbound"}}"#).unwrap();
        assert!(matches!(f.reply, Reply::Message(ref m) if m.id == "m1" && m.is_start()));
        let f = parse(r#"{"type":"response","class":"TooManyRequestsErrorMessage","code":429,"body":{"retryAfter":3,"errorCode":4029,"errorMessage":"slow down"}}"#).unwrap();
        assert!(matches!(f.reply, Reply::TooManyRequests(ref t) if t.retry_after == Some(3.0)));
        let f =
            parse(r#"{"type":"response","class":"string","code":4007,"body":"Session not found"}"#)
                .unwrap();
        assert_eq!(
            f.reply,
            Reply::Error {
                code: 4007,
                message: "Session not found".into()
            }
        );
        let f = parse(
            r#"{"type":"response","class":"JwtResponse","code":"200","body":{"jwt":"j","exp":1}}"#,
        )
        .unwrap();
        assert_eq!(f.reply, Reply::Jwt(JwtResponse { jwt: "j".into() }));
    }

    #[test]
    fn strangers_are_tolerated() {
        let f =
            parse(r#"{"type":"message","class":"PresenceEvent","code":200,"body":{}}"#).unwrap();
        assert_eq!(
            f.reply,
            Reply::Other {
                class: "PresenceEvent".into()
            }
        );
        // A known class whose body has the wrong shape is not a panic either.
        let f = parse(r#"{"class":"SessionResponse","code":200,"body":[1,2]}"#).unwrap();
        assert!(matches!(f.reply, Reply::Other { .. }));
        assert!(parse("not json").is_err());
        let _ = parse("[]");
        let _ = parse(r#"{"class":{"a":1},"code":[],"tracingId":5}"#);
        let f = parse(r#"{"class":"TooManyRequestsErrorMessage","body":"x"}"#).unwrap();
        assert!(matches!(f.reply, Reply::TooManyRequests(_)));
    }
}
