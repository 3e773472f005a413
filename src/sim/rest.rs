//! The simulator's REST endpoints: the OAuth token endpoint and the two session endpoints
//! (conversations, Open Messaging inbound), with what they share: admission (faults, OAuth,
//! the per-minute window, 429 and 503 injection), body checks and the rejected-queue fault
//! ([`accept_body`]), Genesys-style error bodies and `inin-*` headers.

use super::{bump, lock, AuthMode, Counters, Sim};
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use rand::Rng;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) fn genesys_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = json!({
        "message": message,
        "code": code,
        "status": status.as_u16(),
        "contextId": uuid::Uuid::new_v4().to_string(),
        "details": [],
        "errors": [],
    });
    (status, Json(body)).into_response()
}

/// A Genesys-style error answer with its `inin-*` headers (`rl`: allowed, count, reset).
fn error_answer(status: StatusCode, code: &str, message: &str, rl: (u32, u32, u64)) -> Response {
    with_headers(genesys_error(status, code, message), rl.0, rl.1, rl.2)
}

pub(super) fn with_headers(mut resp: Response, allowed: u32, count: u32, reset: u64) -> Response {
    let h = resp.headers_mut();
    let put = |h: &mut HeaderMap, name: &'static str, v: String| {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(name, v);
        }
    };
    put(h, "inin-correlation-id", uuid::Uuid::new_v4().to_string());
    if allowed > 0 {
        put(h, "inin-ratelimit-allowed", allowed.to_string());
        put(h, "inin-ratelimit-count", count.to_string());
        put(h, "inin-ratelimit-reset", reset.to_string());
    }
    resp
}

pub(super) async fn token(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let faults = sim.faults();
    let expected = format!("{}:{}", sim.opts.client_id, sim.opts.client_secret);
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|b| String::from_utf8(b).ok());
    let grant_ok = String::from_utf8_lossy(&body)
        .split('&')
        .any(|kv| kv == "grant_type=client_credentials");
    if !grant_ok {
        bump(&sim.counters.token_rejections);
        let body = json!({"error": "unsupported_grant_type", "description": "grant_type must be client_credentials"});
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    if given.as_deref() != Some(expected.as_str()) || faults.auth == AuthMode::RejectClients {
        bump(&sim.counters.token_rejections);
        let body =
            json!({"error": "invalid_client", "description": "client credentials are invalid"});
        return (StatusCode::UNAUTHORIZED, Json(body)).into_response();
    }
    let token = format!("sim-{}", uuid::Uuid::new_v4().simple());
    let now = Instant::now();
    let expires = now
        .checked_add(sim.opts.token_ttl)
        .unwrap_or(now + Duration::from_secs(10 * 365 * 86_400));
    lock(&sim.tokens).insert(token.clone(), expires);
    bump(&sim.counters.token_grants);
    Json(json!({"access_token": token, "token_type": "bearer", "expires_in": sim.opts.token_ttl.as_secs()})).into_response()
}

/// A session request being answered, counted in `at_once` while it lives.
struct Answering<'a>(&'a Counters);

impl<'a> Answering<'a> {
    fn new(c: &'a Counters) -> Self {
        let now = c.at_once.fetch_add(1, Ordering::Relaxed) + 1;
        c.most_at_once.fetch_max(now, Ordering::Relaxed);
        Answering(c)
    }
}

impl Drop for Answering<'_> {
    fn drop(&mut self) {
        self.0.at_once.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The OAuth checks every REST endpoint shares: a live token, and the permission `needs`
/// unless the forbidden fault is on. `Some` is the refusal to send.
pub(super) fn refusal(sim: &Sim, headers: &HeaderMap, needs: &str) -> Option<Response> {
    let faults = sim.faults();
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let valid = bearer.is_some_and(|t| {
        lock(&sim.tokens)
            .get(t)
            .is_some_and(|exp| *exp > Instant::now())
    });
    if !valid || faults.auth == AuthMode::RevokeTokens {
        bump(&sim.counters.unauthorized);
        return Some(error_answer(
            StatusCode::UNAUTHORIZED,
            "authentication.required",
            "No authentication bearer token specified in authorization header.",
            (0, 0, 0),
        ));
    }
    if faults.auth == AuthMode::Forbidden {
        bump(&sim.counters.forbidden);
        return Some(error_answer(StatusCode::FORBIDDEN, "missing.any.permissions", &format!("Unable to perform the requested action. You are missing the following permission(s): {needs}"), (0, 0, 0)));
    }
    None
}

/// Checks every session endpoint shares: faults, auth, rate limit. `Err` is the answer to send.
async fn admit(sim: &Sim, headers: &HeaderMap) -> Result<(u32, u32, u64), Response> {
    bump(&sim.counters.session_requests);
    let _answering = Answering::new(&sim.counters);
    let faults = sim.faults();
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    if let Some(refused) = refusal(sim, headers, "conversation:messaging:write") {
        return Err(refused);
    }
    let limit = faults.rate_limit_per_minute;
    let (count, reset) = sim.count_in_window();
    if limit > 0 && count > limit {
        bump(&sim.counters.rate_limited);
        return Err(too_many(limit, count, reset));
    }
    let (throttle, fail) = {
        let mut rng = rand::rng();
        (
            rng.random::<f64>() < faults.throttle_rate,
            rng.random::<f64>() < faults.fail_rate,
        )
    };
    if throttle {
        bump(&sim.counters.rate_limited);
        return Err(too_many(limit, count, 1));
    }
    if fail {
        bump(&sim.counters.injected_errors);
        return Err(error_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "service.unavailable",
            "The service is currently unavailable (injected by the simulator).",
            (limit, count, reset),
        ));
    }
    Ok((limit, count, reset))
}

fn too_many(limit: u32, count: u32, reset: u64) -> Response {
    let mut resp = with_headers(
        genesys_error(
            StatusCode::TOO_MANY_REQUESTS,
            "too.many.requests.retry.after",
            &format!("Rate limit exceeded the maximum. Retry the request in [{reset}] seconds"),
        ),
        limit.max(1),
        count,
        reset,
    );
    if let Ok(v) = HeaderValue::from_str(&reset.to_string()) {
        resp.headers_mut().insert("retry-after", v);
    }
    resp
}

fn bad_request(sim: &Sim, message: String, rl: (u32, u32, u64)) -> Response {
    bump(&sim.counters.bad_requests);
    with_headers(
        genesys_error(StatusCode::BAD_REQUEST, "bad.request", &message),
        rl.0,
        rl.1,
        rl.2,
    )
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

/// The late-answer fault: the session exists, the answer takes `answer_late_ms`.
async fn answer_late(sim: &Sim) {
    let late = sim.faults().answer_late_ms;
    if late > 0 {
        tokio::time::sleep(Duration::from_millis(late)).await;
    }
}

pub(super) fn record_session(sim: &Sim, visitor: &str) -> String {
    bump(&sim.counters.sessions_created);
    *lock(&sim.visitors).entry(visitor.to_string()).or_insert(0) += 1;
    uuid::Uuid::new_v4().to_string()
}

fn first_failed(checks: &[(bool, &'static str)]) -> Option<&'static str> {
    checks.iter().find(|(ok, _)| !ok).map(|(_, msg)| *msg)
}

/// What both REST session endpoints check after admission, in order: the body is JSON,
/// `problem` finds nothing wrong with it, and its queue (`queue_of`) is not one the faults
/// reject (404). `Err` is the answer to send.
fn accept_body(
    sim: &Sim,
    body: &[u8],
    rl: (u32, u32, u64),
    problem: fn(&Value) -> Option<&'static str>,
    queue_of: impl Fn(&Value) -> &str,
) -> Result<Value, Box<Response>> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Box::new(bad_request(
            sim,
            format!("The request body is not valid JSON: {e}"),
            rl,
        ))
    })?;
    if let Some(msg) = problem(&v) {
        return Err(Box::new(bad_request(
            sim,
            format!("Invalid request body: {msg}."),
            rl,
        )));
    }
    let queue = queue_of(&v);
    if sim.faults().reject_queues.iter().any(|q| q == queue) {
        bump(&sim.counters.not_found);
        return Err(Box::new(error_answer(
            StatusCode::NOT_FOUND,
            "not.found",
            &format!("The routing queue {queue} was not found."),
            rl,
        )));
    }
    Ok(v)
}

/// What is wrong with a conversations session body, if anything.
fn conversation_problem(v: &Value) -> Option<&'static str> {
    let checks: [(bool, &str); 6] = [
        (
            str_at(v, &["type"]) == Some("messaging"),
            "type must be \"messaging\"",
        ),
        (
            str_at(v, &["initiator", "type"]) == Some("external"),
            "initiator.type must be \"external\"",
        ),
        (
            str_at(v, &["initiator", "id"]).is_some(),
            "initiator.id is required",
        ),
        (
            str_at(v, &["to", "type"]) == Some("routingQueue"),
            "to.type must be \"routingQueue\"",
        ),
        (str_at(v, &["to", "id"]).is_some(), "to.id is required"),
        (
            v.get("metadata").is_none_or(Value::is_object),
            "metadata must be an object",
        ),
    ];
    first_failed(&checks)
}

/// What is wrong with an Open Messaging inbound body, if anything.
fn open_message_problem(v: &Value) -> Option<&'static str> {
    let attrs = v.pointer("/channel/metadata/customAttributes");
    let checks: [(bool, &str); 8] = [
        (
            str_at(v, &["channel", "messageId"]).is_some(),
            "channel.messageId is required",
        ),
        (
            str_at(v, &["channel", "time"])
                .is_some_and(|t| humantime::parse_rfc3339_weak(t).is_ok()),
            "channel.time must be an RFC 3339 time",
        ),
        (
            str_at(v, &["channel", "from", "id"]).is_some(),
            "channel.from.id is required",
        ),
        (
            str_at(v, &["channel", "from", "idType"]).is_some(),
            "channel.from.idType is required",
        ),
        (
            str_at(v, &["type"]) == Some("Text"),
            "type must be \"Text\"",
        ),
        (
            str_at(v, &["direction"]) == Some("Inbound"),
            "direction must be \"Inbound\"",
        ),
        (str_at(v, &["text"]).is_some(), "text is required"),
        (
            attrs.is_none_or(|a| {
                a.as_object()
                    .is_some_and(|m| m.values().all(Value::is_string))
            }),
            "channel.metadata.customAttributes values must be strings",
        ),
    ];
    first_failed(&checks)
}

pub(super) async fn create_conversation(
    State(sim): State<Arc<Sim>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rl = match admit(&sim, &headers).await {
        Ok(rl) => rl,
        Err(resp) => return resp,
    };
    let v = match accept_body(&sim, &body, rl, conversation_problem, |v| {
        str_at(v, &["to", "id"]).unwrap_or_default()
    }) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let visitor = str_at(&v, &["initiator", "id"]).unwrap_or_default();
    let id = record_session(&sim, visitor);
    answer_late(&sim).await;
    with_headers(
        (
            StatusCode::CREATED,
            Json(json!({"id": id, "conversationId": id, "type": "messaging"})),
        )
            .into_response(),
        rl.0,
        rl.1,
        rl.2,
    )
}

pub(super) async fn open_message(
    State(sim): State<Arc<Sim>>,
    Path(integration_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let rl = match admit(&sim, &headers).await {
        Ok(rl) => rl,
        Err(resp) => return resp,
    };
    if !sim.integrations.contains(&integration_id) {
        bump(&sim.counters.not_found);
        return error_answer(
            StatusCode::NOT_FOUND,
            "not.found",
            &format!("Open Messaging integration {integration_id} was not found."),
            rl,
        );
    }
    let v = match accept_body(&sim, &body, rl, open_message_problem, |v| {
        v.pointer("/channel/metadata/customAttributes/queue_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }) {
        Ok(v) => v,
        Err(resp) => return *resp,
    };
    let visitor = str_at(&v, &["channel", "from", "id"]).unwrap_or_default();
    let conversation = record_session(&sim, visitor);
    answer_late(&sim).await;
    let answer = json!({
        "id": uuid::Uuid::new_v4().to_string(),
        "channel": v.get("channel"),
        "type": "Text",
        "text": v.get("text"),
        "direction": "Inbound",
        "conversationId": conversation,
    });
    with_headers(
        (StatusCode::ACCEPTED, Json(answer)).into_response(),
        rl.0,
        rl.1,
        rl.2,
    )
}
