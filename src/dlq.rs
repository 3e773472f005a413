//! Operator tools for the dead-letter queues (SPEC §7): list, show, replay, purge.
//!
//! Inspection never consumes for good ([`scan`]): a consumer on a dedicated channel takes the
//! messages without ack, and the ones that stay are returned with `basic.nack(requeue)` in one
//! go, which puts them back in their original order. A pass looks at no more messages than the
//! queue held when it began, so nothing is seen twice. Purge acks the ones it removes in that
//! same pass; replay fetches one message at a time with `basic.get` ([`Pass`]).
//! Replay publishes each matching message (with confirm, to a destination that must exist) to
//! its source before acking it off the DLQ: a crash mid-replay can duplicate, never lose.

use crate::amqp::{self, header, header_i64, header_string, AmqpError};
use crate::config::Settings;
use base64::Engine;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use std::time::Duration;

pub mod group;
pub mod paced;
pub mod plan;
mod replay;
pub mod scan;
pub use replay::{replay, replay_properties, replay_target, Moved, ReplayOptions};
use scan::{scan, Take};

/// Which dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DlqKind {
    /// `amqp.dead_letter_queue`: session requests.
    Worker,
    /// `amqp.webhook_dead_letter_queue`: result events.
    Webhook,
}

/// Which messages an operation applies to. Empty filters match everything.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub id: Option<String>,
    /// Failed at or after this time (microseconds since the epoch).
    pub since_us: Option<u64>,
    pub max: Option<usize>,
    /// Only messages of this group (`group::group_of`) of this queue.
    pub group: Option<(DlqKind, String)>,
    /// Only messages with one of these ids (a plan's).
    pub ids: Option<std::sync::Arc<std::collections::BTreeSet<String>>>,
}

/// One dead-lettered message as operators see it (`dlq list --json`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DlqMessage {
    pub message_id: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub status: Option<i64>,
    pub failed_at: Option<String>,
    pub attempts: Option<i64>,
    pub replay_count: i64,
    /// The key `audit show` looks up: the one the worker derived (session requests), or the
    /// event's (webhook events). None for a body that never had one.
    pub idempotency_key: Option<String>,
    /// Genesys Cloud's `inin-correlation-id` of the failed call, where there was one.
    pub correlation_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_base64: Option<String>,
}

impl DlqMessage {
    pub fn from_parts(props: &BasicProperties, body: &[u8]) -> Self {
        let (text, b64) = match std::str::from_utf8(body) {
            Ok(s) => (Some(s.to_string()), None),
            Err(_) => (
                None,
                Some(base64::engine::general_purpose::STANDARD.encode(body)),
            ),
        };
        DlqMessage {
            message_id: message_id(props, body),
            reason: header_string(props, header::FAILURE_REASON),
            detail: header_string(props, header::FAILURE_DETAIL),
            status: header_i64(props, header::FAILURE_STATUS),
            failed_at: header_string(props, header::FAILED_AT),
            attempts: header_i64(props, header::ATTEMPTS),
            replay_count: header_i64(props, header::REPLAY_COUNT).unwrap_or(0),
            idempotency_key: idempotency_key(props, body).or_else(|| event_key(body)),
            correlation_id: header_string(props, header::CORRELATION_ID),
            body: text,
            body_base64: b64,
        }
    }

    pub fn matches(&self, f: &Filter) -> bool {
        if f.reason
            .as_deref()
            .is_some_and(|r| self.reason.as_deref() != Some(r))
        {
            return false;
        }
        if f.id.as_deref().is_some_and(|id| self.message_id != id) {
            return false;
        }
        if f.ids
            .as_ref()
            .is_some_and(|ids| !ids.contains(&self.message_id))
        {
            return false;
        }
        if let Some((kind, group)) = &f.group {
            if group::group_of(*kind, self).id != *group {
                return false;
            }
        }
        if let Some(since) = f.since_us {
            let failed = self
                .failed_at
                .as_deref()
                .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                .map(crate::audit::micros);
            if failed.is_none_or(|t| t < since) {
                return false;
            }
        }
        true
    }
}

/// The message id, or for messages without one a stable id derived from the body.
pub fn message_id(props: &BasicProperties, body: &[u8]) -> String {
    props
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| format!("sha256:{}", &crate::text::sha256_hex(body)[..16]))
}

/// An open pass over one DLQ.
pub struct Pass {
    ch: Channel,
    queue: String,
    /// Messages the queue held (ready) when the pass began.
    pub depth: u32,
    /// Messages fetched and not yet settled.
    held: Vec<BasicGetMessage>,
    /// Messages fetched in this pass, settled or not.
    fetched: u32,
    /// Messages acked off the queue during this pass.
    removed: u32,
}

impl Pass {
    pub async fn open(conn: &Connection, queue: &str) -> Result<Self, AmqpError> {
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| AmqpError::op("channel.open", e))?;
        let depth = amqp::queue_depth(&ch, queue).await.map_err(|e| {
            AmqpError::op(
                format!("look up queue {queue} (run `session-worker topology declare` first?)"),
                e,
            )
        })?;
        Ok(Self {
            ch,
            queue: queue.to_string(),
            depth,
            held: Vec::new(),
            fetched: 0,
            removed: 0,
        })
    }

    /// The next message, up to the depth seen at the start (counting the ones removed along
    /// the way, so whatever arrives during the pass is never reached); `None` when done.
    pub async fn next(&mut self) -> Result<Option<&BasicGetMessage>, AmqpError> {
        if self.fetched >= self.depth {
            return Ok(None);
        }
        let got = self
            .ch
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|e| AmqpError::op(format!("basic.get on {}", self.queue), e))?;
        match got {
            Some(m) => {
                self.fetched += 1;
                self.held.push(m);
                Ok(self.held.last())
            }
            None => Ok(None),
        }
    }

    /// Remove the most recently fetched message from the queue (after it was dealt with).
    pub async fn remove_last(&mut self) -> Result<(), AmqpError> {
        if let Some(m) = self.held.pop() {
            m.delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(|e| AmqpError::op("basic.ack", e))?;
            self.removed += 1;
        }
        Ok(())
    }

    /// Return every held message to the queue, in order, and close the channel.
    pub async fn finish(mut self) -> Result<(), AmqpError> {
        if let Some(last) = self.held.last() {
            // One multiple-nack returns every held message at once, preserving their order.
            self.ch
                .basic_nack(
                    last.delivery.delivery_tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                )
                .await
                .map_err(|e| AmqpError::op("basic.nack", e))?;
        }
        self.held.clear();
        // Quorum queues apply returns asynchronously; wait until the queue shows them again so
        // that a command run right after this one sees every message.
        let expected = self.depth.saturating_sub(self.removed);
        for _ in 0..250 {
            if amqp::queue_depth(&self.ch, &self.queue).await? >= expected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.ch.close(200, "done".into()).await;
        Ok(())
    }
}

pub fn queue_name(settings: &Settings, kind: DlqKind) -> &str {
    match kind {
        DlqKind::Worker => &settings.amqp.dead_letter_queue,
        DlqKind::Webhook => &settings.amqp.webhook_dead_letter_queue,
    }
}

/// Every message (matching the filter) without removing any. Returns (queue depth, messages).
pub async fn list(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
) -> Result<(u32, Vec<DlqMessage>), AmqpError> {
    let mut out = Vec::new();
    let max = filter.max.unwrap_or(usize::MAX);
    let scanned = scan(conn, queue, |d| {
        if out.len() >= max {
            return Take::Stop;
        }
        let msg = DlqMessage::from_parts(&d.properties, &d.data);
        if msg.matches(filter) {
            out.push(msg);
        }
        Take::Keep
    })
    .await?;
    Ok((scanned.depth, out))
}

/// Full properties and headers of one message, for `dlq show`.
pub async fn show(
    conn: &Connection,
    queue: &str,
    id: &str,
) -> Result<Option<serde_json::Value>, AmqpError> {
    let mut found = None;
    scan(conn, queue, |d| {
        let p = &d.properties;
        if message_id(p, &d.data) != id {
            return Take::Keep;
        }
        found = Some(show_json(d));
        Take::Stop
    })
    .await?;
    Ok(found)
}

/// One message's properties, headers and body, for `dlq show`.
fn show_json(d: &lapin::message::Delivery) -> serde_json::Value {
    let p = &d.properties;
    let mut headers = serde_json::Map::new();
    if let Some(table) = p.headers() {
        for (k, v) in table.inner() {
            headers.insert(k.to_string(), amqp_value_json(v));
        }
    }
    let summary = DlqMessage::from_parts(p, &d.data);
    serde_json::json!({
        "message_id": summary.message_id,
        "reason": summary.reason,
        "detail": summary.detail,
        "status": summary.status,
        "failed_at": summary.failed_at,
        "attempts": summary.attempts,
        "replay_count": summary.replay_count,
        "idempotency_key": summary.idempotency_key,
        "correlation_id": summary.correlation_id,
        "exchange": d.exchange.as_str(),
        "routing_key": d.routing_key.as_str(),
        "content_type": p.content_type().as_ref().map(|c| c.as_str().to_string()),
        "delivery_mode": p.delivery_mode(),
        "timestamp": p.timestamp(),
        "headers": headers,
        "body": summary.body,
        "body_base64": summary.body_base64,
    })
}

fn amqp_value_json(v: &AMQPValue) -> serde_json::Value {
    use serde_json::Value;
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(n) => Value::from(*n),
        AMQPValue::ShortShortUInt(n) => Value::from(*n),
        AMQPValue::ShortInt(n) => Value::from(*n),
        AMQPValue::ShortUInt(n) => Value::from(*n),
        AMQPValue::LongInt(n) => Value::from(*n),
        AMQPValue::LongUInt(n) => Value::from(*n),
        AMQPValue::LongLongInt(n) => Value::from(*n),
        AMQPValue::Float(f) => Value::from(f64::from(*f)),
        AMQPValue::Double(f) => Value::from(*f),
        AMQPValue::Timestamp(t) => Value::from(*t),
        AMQPValue::ShortString(s) => Value::from(s.as_str()),
        AMQPValue::LongString(s) => Value::from(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::FieldArray(a) => {
            Value::Array(a.as_slice().iter().map(amqp_value_json).collect())
        }
        AMQPValue::FieldTable(t) => Value::Object(
            t.inner()
                .iter()
                .map(|(k, v)| (k.to_string(), amqp_value_json(v)))
                .collect(),
        ),
        other => Value::from(format!("{other:?}")),
    }
}

/// The idempotency key the worker derived for a dead-lettered session request, if its body
/// is valid (an invalid body never had a key state to clear).
fn idempotency_key(props: &BasicProperties, body: &[u8]) -> Option<String> {
    let message_id = props.message_id().as_ref().map(|m| m.as_str().to_string());
    crate::request::validate_message(body, message_id.as_deref())
        .ok()
        .map(|v| v.idempotency_key)
}

/// The `idempotency_key` of a result event (a webhook dead letter).
fn event_key(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("idempotency_key")?.as_str().map(str::to_string)
}

/// Remove matching messages (only when `confirmed`); the rest stay in order.
pub async fn purge(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    confirmed: bool,
    mut on_each: impl FnMut(&DlqMessage),
) -> Result<Moved, AmqpError> {
    let mut result = Moved::default();
    let max = filter.max.unwrap_or(usize::MAX);
    let scanned = scan(conn, queue, |d| {
        if result.matched >= max {
            return Take::Stop;
        }
        result.seen += 1;
        let msg = DlqMessage::from_parts(&d.properties, &d.data);
        if !msg.matches(filter) {
            return Take::Keep;
        }
        result.matched += 1;
        if !confirmed {
            return Take::Keep;
        }
        result.moved += 1;
        on_each(&msg);
        Take::Remove
    })
    .await?;
    result.depth = scanned.depth;
    result.completed = true;
    Ok(result)
}

#[cfg(test)]
mod tests;
