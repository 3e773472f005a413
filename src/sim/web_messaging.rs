//! The simulator's Web Messaging Guest API: the `/v1` WebSocket, the guest session's history
//! (`GET /api/v2/webmessaging/messages`) and message details
//! (`GET /api/v2/conversations/messages/{id}/details`).
//!
//! Sessions are keyed by their token and live as long as the simulator; a session's first start
//! opens its conversation, which is the whole point: `/sim/stats` counts sessions,
//! conversations and starts per token, so a test can prove one conversation per key. Faults:
//! 429 frames (`ws_throttle_rate`, and the per-minute window shared with the REST endpoints),
//! a socket dropped right after a session's first start is written (`ws_drop_after_start`), a
//! refused `Origin` (`allowed_origin`) and latency (`latency_ms`, before the echo).

use super::{bump, lock, Sim};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// What a guest session may carry in custom attributes (Genesys Cloud's limit).
pub const MAX_CUSTOM_DATA_BYTES: usize = 2048;

#[derive(Default)]
struct Session {
    conversation: Option<String>,
    /// Its messages, oldest first.
    messages: Vec<Value>,
    starts: u64,
    conversations: u64,
    expired: bool,
}

/// Every guest session the simulator holds, by token.
#[derive(Default)]
pub struct Guests {
    sessions: HashMap<String, Session>,
    jwts: HashMap<String, String>,
    /// Message id → conversation id, for the details call.
    messages: HashMap<String, String>,
    /// Kept as the sessions change, so `/sim/stats` costs nothing however many there are.
    counts: GuestStats,
}

/// The Guest API's counts in `/sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GuestStats {
    pub sessions: u64,
    pub conversations: u64,
    pub starts: u64,
    /// Starts beyond the first of a session, and conversations beyond the first of a token:
    /// both 0 when every key reached Genesys once.
    pub repeated_starts: u64,
    pub repeated_conversations: u64,
    pub most_starts_per_token: u64,
    pub most_conversations_per_token: u64,
    pub handshakes_refused: u64,
    pub throttled: u64,
    pub dropped_after_start: u64,
    pub resumed: u64,
}

impl Guests {
    pub fn stats(&self) -> GuestStats {
        GuestStats {
            sessions: self.sessions.len() as u64,
            ..self.counts.clone()
        }
    }

    /// Count one start of `session`, and its new conversation if it opened one.
    fn count_start(counts: &mut GuestStats, session: &Session, opened: bool) {
        counts.starts += 1;
        if session.starts > 1 {
            counts.repeated_starts += 1;
        }
        if opened {
            counts.conversations += 1;
            if session.conversations > 1 {
                counts.repeated_conversations += 1;
            }
        }
        counts.most_starts_per_token = counts.most_starts_per_token.max(session.starts);
        counts.most_conversations_per_token = counts
            .most_conversations_per_token
            .max(session.conversations);
    }

    /// Starts and conversations of one token.
    pub fn of(&self, token: &str) -> (u64, u64) {
        self.sessions
            .get(token)
            .map(|s| (s.starts, s.conversations))
            .unwrap_or((0, 0))
    }

    /// Every session ends: its next `configureSession` without `startNew` is answered 4006.
    pub fn expire_all(&mut self) {
        for s in self.sessions.values_mut() {
            s.expired = true;
        }
    }
}

/// Event counts kept beside the sessions (atomics in the simulator's counters would do too,
/// but these belong to this protocol alone).
#[derive(Default)]
pub struct GuestCounters {
    pub handshakes_refused: std::sync::atomic::AtomicU64,
    pub throttled: std::sync::atomic::AtomicU64,
    pub dropped_after_start: std::sync::atomic::AtomicU64,
    pub resumed: std::sync::atomic::AtomicU64,
    /// Starts seen so far, so `ws_throttle_rate` throttles an exact share of them.
    pub starts_seen: std::sync::atomic::AtomicU64,
}

impl GuestCounters {
    pub fn fill(&self, s: &mut GuestStats) {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        s.handshakes_refused = load(&self.handshakes_refused);
        s.throttled = load(&self.throttled);
        s.dropped_after_start = load(&self.dropped_after_start);
        s.resumed = load(&self.resumed);
    }

    /// Whether this start is one of the `rate` share to throttle: every start whose running
    /// count crosses the next whole multiple of `1 / rate`, so 0.3 throttles starts 4, 7, 10, …
    /// exactly (a coin flip per start would let a short test see none).
    pub fn throttle_this_start(&self, rate: f64) -> bool {
        let n = self
            .starts_seen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as f64;
        rate > 0.0 && ((n + 1.0) * rate).floor() > (n * rate).floor()
    }
}

/// `GET /v1?deploymentId=...`: the handshake, refused when the `Origin` is not allowed.
pub async fn upgrade(
    State(sim): State<Arc<Sim>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let allowed = sim.faults().allowed_origin;
    let origin = headers
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !allowed.is_empty() && origin != allowed {
        bump(&sim.guest_counters.handshakes_refused);
        return (
            StatusCode::FORBIDDEN,
            format!("Origin {origin:?} is not an allowed domain of this deployment"),
        )
            .into_response();
    }
    let deployment = query.get("deploymentId").cloned().unwrap_or_default();
    if deployment.trim().is_empty() {
        return (StatusCode::BAD_REQUEST, "deploymentId is required").into_response();
    }
    // Small buffers, as the worker's: a guest session's frames are a few hundred bytes.
    ws.read_buffer_size(8 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| converse(sim, socket, deployment))
}

/// One connection: each frame answered in turn until the client closes (or a fault drops it).
async fn converse(sim: Arc<Sim>, mut socket: WebSocket, deployment: String) {
    let mut configured: Option<String> = None;
    while let Some(Ok(message)) = socket.recv().await {
        let text = match message {
            Message::Text(t) => t.to_string(),
            Message::Close(_) => return,
            _ => continue,
        };
        let answer = match serde_json::from_str::<Value>(&text) {
            Ok(frame) => answer(&sim, &frame, &deployment, &mut configured).await,
            Err(_) => Answer::Send(error_frame(400, "Message is not valid JSON", None)),
        };
        match answer {
            Answer::Send(frame) => {
                if socket
                    .send(Message::Text(frame.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Answer::Drop => {
                bump(&sim.guest_counters.dropped_after_start);
                return;
            }
        }
    }
}

enum Answer {
    Send(Value),
    /// Close the socket without answering (the drop-after-start fault).
    Drop,
}

fn envelope(kind: &str, class: &str, code: u16, body: Value, tracing: Option<&Value>) -> Value {
    let mut frame = json!({"type": kind, "class": class, "code": code, "body": body});
    if let Some(t) = tracing {
        frame["tracingId"] = t.clone();
    }
    frame
}

fn error_frame(code: u16, message: &str, tracing: Option<&Value>) -> Value {
    envelope("response", "string", code, json!(message), tracing)
}

async fn answer(
    sim: &Sim,
    frame: &Value,
    deployment: &str,
    configured: &mut Option<String>,
) -> Answer {
    let tracing = frame.get("tracingId");
    let token = frame.get("token").and_then(Value::as_str).unwrap_or("");
    let action = frame.get("action").and_then(Value::as_str).unwrap_or("");
    if action != "configureSession" && configured.as_deref() != Some(token) {
        return Answer::Send(error_frame(
            4007,
            "Session not found: send configureSession first",
            tracing,
        ));
    }
    let reply = match action {
        "configureSession" => configure(sim, frame, deployment, configured),
        "onMessage" => return start(sim, frame, token).await,
        "getJwt" => {
            let jwt = format!("sim-jwt-{}", uuid::Uuid::new_v4().simple());
            lock(&sim.guests)
                .jwts
                .insert(jwt.clone(), token.to_string());
            Ok((
                "response",
                "JwtResponse",
                json!({"jwt": jwt, "exp": 4_102_444_800u64}),
            ))
        }
        "echo" => Ok((
            "message",
            "StructuredMessage",
            json!({"id": uuid::Uuid::new_v4().to_string(), "type": "Text", "text": "ping", "direction": "Inbound"}),
        )),
        other => Err((400, format!("Unknown action {other:?}"))),
    };
    Answer::Send(match reply {
        Ok((kind, class, body)) => envelope(kind, class, 200, body, tracing),
        Err((code, message)) => error_frame(code, &message, tracing),
    })
}

type Reply = Result<(&'static str, &'static str, Value), (u16, String)>;

fn configure(sim: &Sim, frame: &Value, deployment: &str, configured: &mut Option<String>) -> Reply {
    let token = frame.get("token").and_then(Value::as_str).unwrap_or("");
    if frame.get("deploymentId").and_then(Value::as_str) != Some(deployment) {
        return Err((4001, "deploymentId does not match the connection's".into()));
    }
    if uuid::Uuid::parse_str(token).is_err() {
        return Err((4000, "token must be a UUID".into()));
    }
    let start_new = frame.get("startNew").and_then(Value::as_bool) == Some(true);
    let mut guests = lock(&sim.guests);
    let existing = guests.sessions.get(token).map(|s| s.expired);
    if existing == Some(true) && !start_new {
        return Err((4006, "Session expired".into()));
    }
    let new_session = existing.is_none() || start_new;
    let session = guests.sessions.entry(token.to_string()).or_default();
    if start_new {
        session.conversation = None;
        session.messages.clear();
        session.expired = false;
    } else if existing.is_some() {
        bump(&sim.guest_counters.resumed);
    }
    *configured = Some(token.to_string());
    Ok((
        "response",
        "SessionResponse",
        json!({"connected": true, "newSession": new_session, "readOnly": false,
               "maxCustomDataBytes": MAX_CUSTOM_DATA_BYTES}),
    ))
}

/// What is wrong with a start's message, if anything.
fn check_start(message: &Value) -> Option<String> {
    let kind = message.get("type").and_then(Value::as_str);
    let join = message
        .pointer("/events/0/presence/type")
        .and_then(Value::as_str)
        == Some("Join");
    let text = message
        .get("text")
        .and_then(Value::as_str)
        .is_some_and(|t| !t.is_empty());
    let attrs = message.pointer("/channel/metadata/customAttributes");
    match (kind, join, text) {
        (Some("Event"), true, _) | (Some("Text"), _, true) => {}
        _ => {
            return Some("message must be an Event with a Presence Join or a Text with text".into())
        }
    }
    if let Some(attrs) = attrs {
        let Some(map) = attrs
            .as_object()
            .filter(|m| m.values().all(Value::is_string))
        else {
            return Some("customAttributes values must be strings".into());
        };
        let size = serde_json::to_vec(map)
            .map(|v| v.len())
            .unwrap_or(usize::MAX);
        if size > MAX_CUSTOM_DATA_BYTES {
            return Some(format!(
                "customAttributes are {size} bytes; the limit is {MAX_CUSTOM_DATA_BYTES}"
            ));
        }
    }
    None
}

async fn start(sim: &Sim, frame: &Value, token: &str) -> Answer {
    let tracing = frame.get("tracingId");
    let message = frame.get("message").cloned().unwrap_or(Value::Null);
    if let Some(problem) = check_start(&message) {
        bump(&sim.counters.bad_requests);
        return Answer::Send(error_frame(4002, &problem, tracing));
    }
    let faults = sim.faults();
    let throttled = sim
        .guest_counters
        .throttle_this_start(faults.ws_throttle_rate);
    if throttled || !sim.within_rate_window() {
        bump(&sim.guest_counters.throttled);
        bump(&sim.counters.rate_limited);
        let body = json!({"retryAfter": 1, "errorCode": 4029, "errorMessage": "Message rate too high for this session"});
        return Answer::Send(envelope(
            "response",
            "TooManyRequestsErrorMessage",
            429,
            body,
            tracing,
        ));
    }
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let visitor = message
        .pointer("/channel/metadata/customAttributes/visitor_id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let (stored, first) = record_start(sim, token, &message, &visitor);
    if first && faults.ws_drop_after_start {
        return Answer::Drop;
    }
    Answer::Send(envelope(
        "message",
        "StructuredMessage",
        200,
        stored,
        tracing,
    ))
}

/// Store a start in its session, opening the session's conversation if it has none yet.
fn record_start(sim: &Sim, token: &str, message: &Value, visitor: &str) -> (Value, bool) {
    let id = uuid::Uuid::new_v4().to_string();
    // One lock from the check to the insert: two starts of one token at once (a start still
    // in hand while a retry resumes) share one conversation, as at Genesys Cloud.
    let mut guests = lock(&sim.guests);
    let guests = &mut *guests;
    let session = guests.sessions.entry(token.to_string()).or_default();
    let new_conversation = session.conversation.is_none();
    if new_conversation {
        session.conversation = Some(super::rest::record_session(sim, visitor));
        session.conversations += 1;
    }
    session.starts += 1;
    Guests::count_start(&mut guests.counts, session, new_conversation);
    let first = session.starts == 1;
    let conversation = session.conversation.clone().unwrap_or_default();
    let mut stored = message.clone();
    stored["id"] = json!(id);
    stored["direction"] = json!("Inbound");
    stored["channel"]["time"] = json!(crate::event::now_rfc3339());
    stored["channel"]["messageId"] = json!(id);
    session.messages.push(stored.clone());
    guests.messages.insert(id, conversation);
    (stored, first)
}

#[derive(Deserialize)]
pub struct Page {
    #[serde(rename = "pageSize")]
    page_size: Option<usize>,
    #[serde(rename = "pageNumber")]
    page_number: Option<usize>,
}

/// `GET /api/v2/webmessaging/messages`: the session's messages, newest first, by the JWT.
pub async fn history(
    State(sim): State<Arc<Sim>>,
    Query(page): Query<Page>,
    headers: HeaderMap,
) -> Response {
    let jwt = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let allowed = sim.faults().allowed_origin;
    let origin = headers
        .get("origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let guests = lock(&sim.guests);
    let session = guests.jwts.get(jwt).and_then(|t| guests.sessions.get(t));
    let Some(session) = session.filter(|_| allowed.is_empty() || origin == allowed) else {
        return super::rest::genesys_error(
            StatusCode::UNAUTHORIZED,
            "authentication.required",
            "Invalid JWT or origin",
        );
    };
    let size = page.page_size.unwrap_or(25).clamp(1, 100);
    let number = page.page_number.unwrap_or(1).max(1);
    let total = session.messages.len();
    let entities: Vec<Value> = session
        .messages
        .iter()
        .rev()
        .skip((number - 1) * size)
        .take(size)
        .cloned()
        .collect();
    Json(
        json!({"entities": entities, "pageSize": size, "pageNumber": number,
                "total": total, "pageCount": total.div_ceil(size).max(1)}),
    )
    .into_response()
}

/// `GET /api/v2/conversations/messages/{id}/details`: which conversation a message is in.
pub async fn details(
    State(sim): State<Arc<Sim>>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = super::rest::refusal(&sim, &headers, "conversation:message:view") {
        return refused;
    }
    let conversation = lock(&sim.guests).messages.get(&message_id).cloned();
    match conversation {
        Some(c) => super::rest::with_headers(
            Json(json!({"id": message_id, "conversationId": c, "messengerType": "web"}))
                .into_response(),
            0,
            0,
            0,
        ),
        None => super::rest::genesys_error(
            StatusCode::NOT_FOUND,
            "not.found",
            &format!("Message {message_id} was not found."),
        ),
    }
}
