//! The console's read API (SPEC §7): `GET /api/overview`, `/api/groups`,
//! `/api/messages?group=&cursor=&limit=`, `/api/messages/{id}?queue=`, `/api/keys/{key}`.
//! JSON in, JSON out; an error is `{"error": "..."}` with a status that says whose fault it is.

use super::dlq_view::{queue_label, ViewError};
use super::Console;
use crate::audit::AuditError;
use crate::dlq::DlqKind;
use crate::event::Reason;
use crate::store::{AuditEntry, AuditQuery};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// An API error, shown to the operator as it is.
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError(status, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<ViewError> for ApiError {
    fn from(e: ViewError) -> Self {
        let status = match e {
            ViewError::Amqp(_) => StatusCode::BAD_GATEWAY,
            ViewError::NoGroup(_) => StatusCode::NOT_FOUND,
            ViewError::StaleCursor => StatusCode::CONFLICT,
            ViewError::BadCursor(_) => StatusCode::BAD_REQUEST,
            ViewError::Replaying(_) => StatusCode::CONFLICT,
        };
        ApiError(status, e.to_string())
    }
}

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> Self {
        ApiError(StatusCode::BAD_GATEWAY, e.to_string())
    }
}

type Api<T> = Result<Json<T>, ApiError>;

/// `GET /api/groups`: every group of both DLQs, the largest first.
pub async fn groups(State(c): State<Arc<Console>>) -> Api<Value> {
    Ok(Json(json!({ "groups": c.dlq.groups().await? })))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    group: String,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/messages?group=ID&cursor=C&limit=N`: one page of a group.
pub async fn messages(
    State(c): State<Arc<Console>>,
    Query(q): Query<MessagesQuery>,
) -> Api<super::dlq_view::Page> {
    let page = c
        .dlq
        .page(&q.group, q.cursor.as_deref(), q.limit.unwrap_or(50))
        .await?;
    Ok(Json(page))
}

#[derive(Deserialize)]
pub struct MessageQuery {
    queue: Option<String>,
}

/// `GET /api/messages/{id}?queue=worker|webhook`: one dead letter whole, read from the queue
/// (its properties, every header, its body), and its key's timeline. A reading stops at the
/// message, so one near the head of a large DLQ comes back at once.
pub async fn message(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
    Query(q): Query<MessageQuery>,
) -> Api<Value> {
    let kind = match q.queue.as_deref().unwrap_or("worker") {
        "worker" => DlqKind::Worker,
        "webhook" => DlqKind::Webhook,
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("queue must be worker or webhook, not {other:?}"),
            ))
        }
    };
    let queue = crate::dlq::queue_name(&c.settings, kind).to_string();
    let turn = c.dlq.reading_turn("reading a message").await?;
    let conn = c.connect().await?;
    let shown = crate::dlq::show(&conn, &queue, &id).await;
    drop(turn);
    let _ = conn.close(200, "done".into()).await;
    let shown = shown.map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    let Some(message) = shown else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no message {id:?} in the {} DLQ now (replayed or purged since?)",
                queue_label(kind)
            ),
        ));
    };
    let timeline = match message["idempotency_key"].as_str() {
        Some(key) => key_timeline(&c, key.to_string()).await?,
        None => Value::Null,
    };
    Ok(Json(
        json!({ "queue": queue_label(kind), "message": message, "key": timeline }),
    ))
}

/// `GET /api/overview`: the DLQs, this pod's view of the fleet, and the last hour.
pub async fn overview(State(c): State<Arc<Console>>) -> Api<Value> {
    let mut queues = Vec::new();
    for s in c.dlq.snapshots().await? {
        let oldest = s.groups.iter().filter_map(|g| g.oldest.as_ref()).min();
        let newest = s.groups.iter().filter_map(|g| g.newest.as_ref()).max();
        queues.push(json!({
            "queue": queue_label(s.kind),
            "name": s.queue,
            "depth": s.messages.len(),
            "groups": s.groups.len(),
            "oldest": oldest,
            "newest": newest,
            "read_ms_ago": s.taken.elapsed().as_millis() as u64,
        }));
    }
    let mut groups = c.dlq.groups().await?;
    groups.truncate(10);
    let since = SystemTime::now() - Duration::from_secs(3600);
    let entries = c
        .audit_query(&AuditQuery {
            since_us: Some(crate::audit::micros(since)),
            ..Default::default()
        })
        .await?;
    Ok(Json(json!({
        "queues": queues,
        "groups": groups,
        "fleet": c.fleet().await,
        "last_hour": LastHour::of(&entries, since),
    })))
}

/// Per minute of the last hour: sessions created, requests that failed, messages replayed.
#[derive(Serialize, Default)]
pub struct LastHour {
    pub created: u64,
    pub failed: u64,
    pub replayed: u64,
    /// 60 buckets, oldest first: `[created, failed, replayed]`.
    pub per_minute: Vec<[u64; 3]>,
}

impl LastHour {
    pub fn of(entries: &[AuditEntry], since: SystemTime) -> Self {
        let mut h = LastHour {
            per_minute: vec![[0; 3]; 60],
            ..Default::default()
        };
        let failures: BTreeSet<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        for e in entries {
            let (slot, n) = match (e.event_type.as_str(), e.outcome.as_str()) {
                ("session_init", "started") => (0, 1),
                ("session_init", o) if failures.contains(o) => (1, 1),
                // A plan's run writes an entry per message and one at the end: the first count.
                ("dlq_replay", o) if e.plan_id.is_none() || o == "replayed" => {
                    (2, e.count.unwrap_or(1))
                }
                _ => continue,
            };
            let at = humantime::parse_rfc3339_weak(&e.timestamp).unwrap_or(since);
            let minute = at
                .duration_since(since)
                .map(|d| (d.as_secs() / 60) as usize)
                .unwrap_or(0)
                .min(59);
            h.per_minute[minute][slot] += n;
            match slot {
                0 => h.created += n,
                1 => h.failed += n,
                _ => h.replayed += n,
            }
        }
        h
    }
}

/// `GET /api/keys/{id}`: one timeline for an idempotency key, or for the keys a visitor,
/// conversation or correlation id belongs to (searched over the last
/// `store.idempotency_ttl`): audit entries and dead letters, oldest first.
pub async fn key(State(c): State<Arc<Console>>, Path(id): Path<String>) -> Api<Value> {
    Ok(Json(key_timeline(&c, id).await?))
}

async fn key_timeline(c: &Console, id: String) -> Result<Value, ApiError> {
    let mut entries = c
        .audit_query(&AuditQuery {
            key: Some(id.clone()),
            ..Default::default()
        })
        .await?;
    let mut keys: BTreeSet<String> = BTreeSet::new();
    let mut matched_by = "idempotency_key";
    if entries.is_empty() {
        let since = SystemTime::now() - c.settings.store.idempotency_ttl;
        let recent = c
            .audit_query(&AuditQuery {
                since_us: Some(crate::audit::micros(since)),
                ..Default::default()
            })
            .await?;
        for e in &recent {
            for (field, value) in [
                ("visitor_id", &e.visitor_id),
                ("conversation_id", &e.conversation_id),
                ("correlation_id", &e.correlation_id),
            ] {
                if value.as_deref() == Some(id.as_str()) {
                    matched_by = field;
                    if let Some(k) = &e.idempotency_key {
                        keys.insert(k.clone());
                    }
                }
            }
        }
        entries = recent
            .into_iter()
            .filter(|e| e.idempotency_key.as_ref().is_some_and(|k| keys.contains(k)))
            .collect();
    } else {
        keys.insert(id.clone());
    }
    let mut ids: Vec<String> = keys.iter().cloned().collect();
    ids.push(id.clone());
    let dead = c.dlq.find(&ids).await?;
    Ok(timeline(&id, matched_by, keys, entries, dead))
}

fn timeline(
    id: &str,
    matched_by: &str,
    keys: BTreeSet<String>,
    entries: Vec<AuditEntry>,
    dead: Vec<(String, super::dlq_view::Listed)>,
) -> Value {
    let mut events: BTreeMap<(String, usize), Value> = BTreeMap::new();
    let decided_by = entries
        .iter()
        .rev()
        .find(|e| e.event_type == "session_init")
        .map(|e| (e.outcome.clone(), e.worker_id.clone()));
    for (i, e) in entries.iter().enumerate() {
        let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
        v["kind"] = json!("audit");
        events.insert((e.timestamp.clone(), i), v);
    }
    for (i, (queue, listed)) in dead.iter().enumerate() {
        let mut v = serde_json::to_value(listed).unwrap_or(Value::Null);
        v["kind"] = json!("dead_letter");
        v["queue"] = json!(queue);
        let at = listed.message.failed_at.clone().unwrap_or_default();
        events.insert((at, entries.len() + i), v);
    }
    json!({
        "query": id,
        "matched_by": if keys.is_empty() && dead.is_empty() { Value::Null } else { json!(matched_by) },
        "keys": keys,
        "state": decided_by.as_ref().map(|(o, _)| o.clone()),
        "decided_by": decided_by.map(|(_, w)| w),
        "timeline": events.into_values().collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event_type: &str, outcome: &str, minutes_after: u64, since: SystemTime) -> AuditEntry {
        let at = since + Duration::from_secs(minutes_after * 60 + 5);
        AuditEntry {
            timestamp: humantime::format_rfc3339_millis(at).to_string(),
            event_type: event_type.into(),
            outcome: outcome.into(),
            worker_id: "pod-a".into(),
            count: (event_type == "dlq_replay").then_some(3),
            ..Default::default()
        }
    }

    #[test]
    fn the_last_hour_counts_created_failed_and_replayed_per_minute() {
        let since = SystemTime::now() - Duration::from_secs(3600);
        let entries = vec![
            entry("session_init", "started", 0, since),
            entry("session_init", "started", 59, since),
            entry("session_init", "invalid_request", 10, since),
            entry("session_init", "duplicate", 10, since),
            entry("dlq_replay", "replayed", 30, since),
            entry("webhook_delivery", "delivered", 30, since),
        ];
        let h = LastHour::of(&entries, since);
        assert_eq!((h.created, h.failed, h.replayed), (2, 1, 3));
        assert_eq!(h.per_minute.len(), 60);
        assert_eq!(h.per_minute[0], [1, 0, 0]);
        assert_eq!(h.per_minute[10], [0, 1, 0]);
        assert_eq!(h.per_minute[30], [0, 0, 3]);
        assert_eq!(h.per_minute[59], [1, 0, 0]);
    }
}
