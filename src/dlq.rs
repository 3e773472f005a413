//! Operator tools for the dead-letter queues (SPEC §7): list, show, replay, purge.
//!
//! Inspection never consumes for good: messages are fetched with `basic.get` *without* ack on a
//! dedicated channel, held until the pass is over, then the ones that stay are returned with
//! `basic.nack(requeue)` in one go, which puts them back in their original order. A pass looks
//! at no more messages than the queue held when it began, so nothing is seen twice.
//! Replay publishes each matching message (with confirm, to a destination that must exist) to
//! its source before acking it off the DLQ: a crash mid-replay can duplicate, never lose.

use crate::amqp::{self, header, header_i64, header_string, int, AmqpError};
use crate::config::Settings;
use crate::event::Reason;
use base64::Engine;
use lapin::message::BasicGetMessage;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;
use std::time::Duration;

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
    let mut pass = Pass::open(conn, queue).await?;
    let mut out = Vec::new();
    let max = filter.max.unwrap_or(usize::MAX);
    while out.len() < max {
        let Some(m) = pass.next().await? else { break };
        let msg = DlqMessage::from_parts(&m.delivery.properties, &m.delivery.data);
        if msg.matches(filter) {
            out.push(msg);
        }
    }
    let depth = pass.depth;
    pass.finish().await?;
    Ok((depth, out))
}

/// Full properties and headers of one message, for `dlq show`.
pub async fn show(
    conn: &Connection,
    queue: &str,
    id: &str,
) -> Result<Option<serde_json::Value>, AmqpError> {
    let mut pass = Pass::open(conn, queue).await?;
    let mut found = None;
    while let Some(m) = pass.next().await? {
        let p = &m.delivery.properties;
        if message_id(p, &m.delivery.data) == id {
            let mut headers = serde_json::Map::new();
            if let Some(table) = p.headers() {
                for (k, v) in table.inner() {
                    headers.insert(k.to_string(), amqp_value_json(v));
                }
            }
            let summary = DlqMessage::from_parts(p, &m.delivery.data);
            found = Some(serde_json::json!({
                "message_id": summary.message_id,
                "reason": summary.reason,
                "detail": summary.detail,
                "status": summary.status,
                "failed_at": summary.failed_at,
                "attempts": summary.attempts,
                "replay_count": summary.replay_count,
                "idempotency_key": summary.idempotency_key,
                "correlation_id": summary.correlation_id,
                "exchange": m.delivery.exchange.as_str(),
                "routing_key": m.delivery.routing_key.as_str(),
                "content_type": p.content_type().as_ref().map(|c| c.as_str().to_string()),
                "delivery_mode": p.delivery_mode(),
                "timestamp": p.timestamp(),
                "headers": headers,
                "body": summary.body,
                "body_base64": summary.body_base64,
            }));
            break;
        }
    }
    pass.finish().await?;
    Ok(found)
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

/// Where a dead-lettered message goes back to: its recorded source, else the queue's default.
pub fn replay_target(
    settings: &Settings,
    kind: DlqKind,
    props: &BasicProperties,
) -> (String, String) {
    let exchange = header_string(props, header::ORIGINAL_EXCHANGE);
    let routing_key = header_string(props, header::ORIGINAL_ROUTING_KEY);
    match (kind, exchange, routing_key) {
        // Webhook events go straight back to the webhook queue, not through the results
        // exchange, so no other subscriber sees them twice.
        (DlqKind::Webhook, _, _) => (String::new(), settings.amqp.webhook_queue.clone()),
        (DlqKind::Worker, Some(x), Some(k)) if !x.is_empty() => (x, k),
        (DlqKind::Worker, _, _) => (
            settings.amqp.inbound_exchange.clone(),
            settings.amqp.inbound_routing_key.clone(),
        ),
    }
}

/// Headers for a replayed copy: failure and retry bookkeeping cleared, `x-replay-count` + 1,
/// `x-replay-run` set to the replay's run id.
pub fn replay_properties(props: &BasicProperties, run_id: &str) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    let replays = header_i64(props, header::REPLAY_COUNT)
        .unwrap_or(0)
        .max(0)
        .saturating_add(1);
    let cleared = [
        header::FAILURE_REASON,
        header::FAILURE_DETAIL,
        header::FAILURE_STATUS,
        header::FAILED_AT,
        header::WORKER_ID,
        header::ATTEMPTS,
        header::DELAYED_RETRIES,
        header::LAST_ERROR,
        header::CORRELATION_ID,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-delivery-count",
    ];
    let kept: std::collections::BTreeMap<_, _> = table
        .inner()
        .iter()
        .filter(|(k, _)| !cleared.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    table = FieldTable::from(kept);
    table.insert(header::REPLAY_COUNT.into(), int(replays));
    table.insert(header::REPLAY_RUN.into(), amqp::text(run_id));
    props.clone().with_headers(table)
}

/// What a replay or purge did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Moved {
    pub depth: u32,
    /// Messages looked at.
    pub seen: usize,
    pub matched: usize,
    pub moved: usize,
    /// Matching `outcome_unknown` messages left in place because `--force` was not given.
    pub held_back: usize,
    /// The pass ended at a copy this replay had published itself, failed again and back in
    /// the DLQ: everything after it is newer than the replay.
    pub met_own_copy: bool,
    /// False when the replay was interrupted before it had looked at every message.
    pub completed: bool,
}

/// How a replay runs.
#[derive(Debug, Default, Clone)]
pub struct ReplayOptions {
    /// Marks every copy this replay publishes (`x-replay-run`), so the pass stops, rather than
    /// take it again, when a copy fails and comes back to the DLQ during the replay.
    pub run_id: String,
    /// Messages per second at most.
    pub rate_per_sec: Option<f64>,
    /// List what would move; move nothing.
    pub dry_run: bool,
    /// Replay `outcome_unknown` messages too, clearing their keys fleet-wide first, so the
    /// replayed copy is sent to Genesys once more (SPEC §5, §7).
    pub force: bool,
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

/// Clear an `unknown` key in every pod's store: a `forget` record in the fleet ledger, which
/// every pod applies before it can claim the key again.
async fn forget(ch: &Channel, settings: &Settings, key: &str) -> Result<(), AmqpError> {
    let record = crate::fleet::record::Record::Forget {
        key: key.to_string(),
    };
    let props = amqp::json_properties().with_type(crate::fleet::record::RECORD_TYPE.into());
    amqp::publish_routed(
        ch,
        "",
        &settings.amqp.ledger_stream,
        &record.encode(),
        props,
    )
    .await
}

/// Replay (or, with `dry_run`, only list) matching messages. `on_each` sees every match and
/// the counts so far. The pass ends by construction: it looks at no more messages than the
/// queue held when it began, and stops early at a copy this run published (`x-replay-run`)
/// that failed again. `stop` ends it after the message in hand; the result then says
/// `completed: false`. `--rate` is held to a schedule (the n-th message at start + n / rate),
/// not a pause after each, so the time the broker takes does not slow it down.
pub async fn replay(
    conn: &Connection,
    settings: &Settings,
    kind: DlqKind,
    filter: &Filter,
    options: &ReplayOptions,
    stop: &crate::shutdown::Shutdown,
    mut on_each: impl FnMut(&DlqMessage, &Moved),
) -> Result<Moved, AmqpError> {
    let publish_ch = amqp::confirm_channel(conn).await?;
    let mut pass = Pass::open(conn, queue_name(settings, kind)).await?;
    let mut result = Moved {
        depth: pass.depth,
        ..Default::default()
    };
    let max = filter.max.unwrap_or(usize::MAX);
    let every = options
        .rate_per_sec
        .filter(|r| *r > 0.0)
        .map(|r| Duration::from_secs_f64(1.0 / r));
    let started = tokio::time::Instant::now();
    let mut interrupted = false;
    while result.matched < max {
        if stop.is_requested() {
            interrupted = true;
            break;
        }
        let Some(m) = pass.next().await? else { break };
        result.seen += 1;
        if header_string(&m.delivery.properties, header::REPLAY_RUN).as_deref()
            == Some(options.run_id.as_str())
        {
            result.met_own_copy = true;
            break;
        }
        let msg = DlqMessage::from_parts(&m.delivery.properties, &m.delivery.data);
        if !msg.matches(filter) {
            continue;
        }
        let unknown = msg.reason.as_deref() == Some(Reason::OutcomeUnknown.as_str());
        if unknown && !options.force {
            // Genesys may have created this session: only an operator who checked says so.
            result.held_back += 1;
            continue;
        }
        result.matched += 1;
        if options.dry_run {
            on_each(&msg, &result);
            continue;
        }
        if let Some(every) = every {
            // The n-th replay at start + n / rate.
            let due = started + every.mul_f64(result.moved as f64);
            let mut waiting = stop.clone();
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = waiting.requested() => {
                    interrupted = true;
                    break;
                }
            }
        }
        if unknown && kind == DlqKind::Worker {
            if let Some(key) = idempotency_key(&m.delivery.properties, &m.delivery.data) {
                forget(&publish_ch, settings, &key).await?;
            }
        }
        let (exchange, routing_key) = replay_target(settings, kind, &m.delivery.properties);
        let props = replay_properties(&m.delivery.properties, &options.run_id);
        let body = m.delivery.data.clone();
        amqp::publish_routed(&publish_ch, &exchange, &routing_key, &body, props).await?;
        pass.remove_last().await?;
        result.moved += 1;
        on_each(&msg, &result);
    }
    result.completed = !interrupted;
    pass.finish().await?;
    let _ = publish_ch.close(200, "done".into()).await;
    Ok(result)
}

/// Remove matching messages (only when `confirmed`); the rest stay in order.
pub async fn purge(
    conn: &Connection,
    queue: &str,
    filter: &Filter,
    confirmed: bool,
) -> Result<Moved, AmqpError> {
    let mut pass = Pass::open(conn, queue).await?;
    let mut result = Moved {
        depth: pass.depth,
        ..Default::default()
    };
    let max = filter.max.unwrap_or(usize::MAX);
    while result.matched < max {
        let Some(m) = pass.next().await? else { break };
        result.seen += 1;
        let msg = DlqMessage::from_parts(&m.delivery.properties, &m.delivery.data);
        if !msg.matches(filter) {
            continue;
        }
        result.matched += 1;
        if confirmed {
            pass.remove_last().await?;
            result.moved += 1;
        }
    }
    result.completed = true;
    pass.finish().await?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::{table, text};

    fn props() -> BasicProperties {
        BasicProperties::default()
            .with_message_id("m-1".into())
            .with_headers(table(vec![
                (header::FAILURE_REASON, text("retries_exhausted")),
                (header::FAILURE_DETAIL, text("503")),
                (header::FAILED_AT, text("2026-11-24T10:00:00Z")),
                (header::ATTEMPTS, int(7)),
                (header::DELAYED_RETRIES, int(4)),
                ("x-producer", text("site")),
            ]))
    }

    #[test]
    fn filters_match_reason_id_and_time() {
        let m = DlqMessage::from_parts(&props(), b"{}");
        assert!(m.matches(&Filter::default()));
        assert!(m.matches(&Filter {
            reason: Some("retries_exhausted".into()),
            ..Default::default()
        }));
        assert!(!m.matches(&Filter {
            reason: Some("invalid_request".into()),
            ..Default::default()
        }));
        assert!(!m.matches(&Filter {
            id: Some("other".into()),
            ..Default::default()
        }));
        let at = crate::audit::parse_time("2026-11-24T09:00:00Z").unwrap();
        assert!(m.matches(&Filter {
            since_us: Some(at),
            ..Default::default()
        }));
        let later = crate::audit::parse_time("2026-11-24T11:00:00Z").unwrap();
        assert!(!m.matches(&Filter {
            since_us: Some(later),
            ..Default::default()
        }));
    }

    #[test]
    fn binary_bodies_are_base64() {
        let m = DlqMessage::from_parts(&BasicProperties::default(), &[0xff, 0x00]);
        assert_eq!(m.body, None);
        assert_eq!(m.body_base64.as_deref(), Some("/wA="));
        assert!(m.message_id.starts_with("sha256:"));
    }

    #[test]
    fn replay_clears_failure_headers_and_counts() {
        let p = replay_properties(&props(), "run-1");
        assert_eq!(header_i64(&p, header::REPLAY_COUNT), Some(1));
        assert_eq!(
            header_string(&p, header::REPLAY_RUN).as_deref(),
            Some("run-1")
        );
        assert_eq!(header_string(&p, header::FAILURE_REASON), None);
        assert_eq!(header_i64(&p, header::DELAYED_RETRIES), None);
        assert_eq!(header_string(&p, "x-producer").as_deref(), Some("site"));
        assert_eq!(
            header_i64(&replay_properties(&p, "run-2"), header::REPLAY_COUNT),
            Some(2)
        );
        let huge = BasicProperties::default()
            .with_headers(table(vec![(header::REPLAY_COUNT, int(i64::MAX))]));
        assert_eq!(
            header_i64(&replay_properties(&huge, "run-3"), header::REPLAY_COUNT),
            Some(i64::MAX)
        );
    }
}
