//! RabbitMQ plumbing, shared by every pipeline and operator tool.
//!
//! - this file: connecting (with a time limit), publishing with confirms, dead-lettering,
//!   header helpers;
//! - [`topology`]: exchanges, queues and bindings, named by the `amqp` config keys;
//! - [`consumer`]: the consume loop (manual acks, prefetch, bounded concurrency, drain);
//! - [`settle`]: the batched-ack state machine behind it;
//! - [`shell`]: the one consume / reconnect / dead-letter shell the pipelines run in;
//! - [`guard`]: the transport every connection reads through, which bounds how deep a
//!   message's headers may nest before lapin parses them.
//!
//! This folder knows nothing of Genesys, the store or what a message means: it may use
//! `config`, `health`, `shutdown` and the helpers (`text`, `backoff`, `secret`), nothing above.

pub mod consumer;
pub mod guard;
pub mod settle;
pub mod shell;
pub mod topology;

/// Headers the worker, the forwarder and the DLQ tools read and write.
pub mod header {
    pub const ATTEMPTS: &str = "x-attempts";
    pub const DELAYED_RETRIES: &str = "x-delayed-retries";
    pub const LAST_ERROR: &str = "x-last-error";
    pub const FAILURE_REASON: &str = "x-failure-reason";
    pub const FAILURE_DETAIL: &str = "x-failure-detail";
    pub const FAILURE_STATUS: &str = "x-failure-status";
    pub const FAILED_AT: &str = "x-failed-at";
    pub const WORKER_ID: &str = "x-worker-id";
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    pub const REPLAY_COUNT: &str = "x-replay-count";
    /// Genesys Cloud's `inin-correlation-id` of the call that failed, on a dead letter.
    pub const CORRELATION_ID: &str = "x-correlation-id";
    /// The replay run that published this copy (`dlq replay`), so the run never takes it again.
    pub const REPLAY_RUN: &str = "x-replay-run";
}

use crate::config::AmqpSettings;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    #[error("cannot connect to RabbitMQ at {url}: {message}; {}", problem.fix())]
    Connect {
        url: String,
        message: String,
        problem: ConnectProblem,
    },
    #[error("RabbitMQ {operation} failed: {message}")]
    Operation { operation: String, message: String },
    /// The broker refused a declaration (e.g. a queue exists with other arguments):
    /// reconnecting cannot fix it.
    #[error("RabbitMQ refused to declare {object}: {message}")]
    Declare { object: String, message: String },
    #[error("RabbitMQ refused to confirm the publish to {exchange:?} (nack)")]
    Nacked { exchange: String },
    #[error("no queue took the message published to exchange {exchange:?} with routing key {routing_key:?}; run `session-worker topology declare`")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

/// Why a connection failed, as far as the broker's answer tells: each has its own fix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectProblem {
    /// Nothing answers at the address.
    Refused,
    /// The broker refused the user or password.
    LoginRefused,
    /// The virtual host does not exist, or the user may not use it.
    NoVhost,
    /// No answer within `amqp.connect_timeout`.
    Timeout,
    Other,
}

impl ConnectProblem {
    fn classify(err: &lapin::Error) -> Self {
        let text = err.to_string();
        if text.contains("ACCESS_REFUSED") || text.contains("ACCESS-REFUSED") {
            ConnectProblem::LoginRefused
        } else if text.contains("NOT_ALLOWED") && text.contains("vhost") {
            ConnectProblem::NoVhost
        } else if text.contains("Connection refused") {
            ConnectProblem::Refused
        } else {
            ConnectProblem::Other
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            ConnectProblem::Refused => "nothing listens there: is the broker running? (`make broker` starts a local one)",
            ConnectProblem::LoginRefused => "the broker refused the login: check the user and password in amqp.url (SESSION_WORKER__AMQP__URL)",
            ConnectProblem::NoVhost => "the virtual host in amqp.url does not exist or the user may not use it: create it (`rabbitmqctl add_vhost NAME` and `set_permissions`) or fix the URL's path (%2f is the default vhost)",
            ConnectProblem::Timeout => "no answer in time: check the host and port in amqp.url, the network, and amqp.connect_timeout",
            ConnectProblem::Other => "check amqp.url and the broker's log",
        }
    }
}

impl AmqpError {
    /// Whether reconnecting cannot help (an operator has to change something first).
    pub fn is_fatal(&self) -> bool {
        matches!(self, AmqpError::Declare { .. })
    }

    pub fn op(operation: impl Into<String>, err: impl std::fmt::Display) -> Self {
        AmqpError::Operation {
            operation: operation.into(),
            message: err.to_string(),
        }
    }
}

/// Connect once, within `settings.connect_timeout`.
pub async fn connect(settings: &AmqpSettings, name: &str) -> Result<Connection, AmqpError> {
    let shown = crate::secret::redact_url(&settings.url);
    let props = ConnectionProperties::default().with_connection_name(name.to_string().into());
    let uri = settings
        .url
        .parse::<lapin::uri::AMQPUri>()
        .map_err(|e| AmqpError::Connect {
            url: shown.clone(),
            message: format!("not an AMQP URL: {e}"),
            problem: ConnectProblem::Other,
        })?;
    match tokio::time::timeout(settings.connect_timeout, guard::connect(uri, props)).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(AmqpError::Connect {
            url: shown,
            problem: ConnectProblem::classify(&e),
            message: e.to_string(),
        }),
        Err(_) => Err(AmqpError::Connect {
            url: shown,
            message: format!("no answer within {:?}", settings.connect_timeout),
            problem: ConnectProblem::Timeout,
        }),
    }
}

/// Messages ready in `queue` (a passive declare: an error if the queue does not exist, which
/// closes the channel).
pub async fn queue_depth(ch: &Channel, queue: &str) -> Result<u32, AmqpError> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .map(|q| q.message_count())
    .map_err(|e| AmqpError::op(format!("look up queue {queue}"), e))
}

/// A channel in publisher-confirm mode.
pub async fn confirm_channel(conn: &Connection) -> Result<Channel, AmqpError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::op("channel.open", e))?;
    ch.confirm_select(Default::default())
        .await
        .map_err(|e| AmqpError::op("confirm.select", e))?;
    Ok(ch)
}

/// Publish and wait for the broker's confirm.
pub async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    publish(false, channel, (exchange, routing_key), body, properties).await
}

/// Publish with confirm to a destination that must exist (a retry queue, a DLQ): a message
/// that no queue takes comes back as an error instead of being dropped.
pub async fn publish_routed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    publish(true, channel, (exchange, routing_key), body, properties).await
}

/// Send, then wait for the confirm.
async fn publish(
    mandatory: bool,
    channel: &Channel,
    (exchange, routing_key): (&str, &str),
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), AmqpError> {
    let confirm = send(channel, exchange, routing_key, body, properties, mandatory).await?;
    confirmed(confirm.await, exchange, routing_key)
}

/// [`publish_routed`] in two steps: the message is sent when this returns, and the future it
/// gives resolves with the broker's confirm, so one task can keep more than one message in
/// flight (the fleet ledger's appender).
pub async fn send_routed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<impl std::future::Future<Output = Result<(), AmqpError>> + Send + 'static, AmqpError> {
    let confirm = send(channel, exchange, routing_key, body, properties, true).await?;
    let (exchange, routing_key) = (exchange.to_string(), routing_key.to_string());
    Ok(async move { confirmed(confirm.await, &exchange, &routing_key) })
}

/// `basic.publish`; the confirm is the caller's to await.
async fn send(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
) -> Result<lapin::PublisherConfirm, AmqpError> {
    let options = lapin::options::BasicPublishOptions {
        mandatory,
        ..Default::default()
    };
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties,
        )
        .await
        .map_err(|e| AmqpError::op(format!("publish to {exchange:?}"), e))
}

/// A broker's confirm as a result: no confirm (the channel closed), a nack, or a mandatory
/// message no queue took, is an error.
fn confirmed(
    confirm: Result<lapin::Confirmation, lapin::Error>,
    exchange: &str,
    routing_key: &str,
) -> Result<(), AmqpError> {
    let confirm = confirm.map_err(|e| AmqpError::op(format!("confirm from {exchange:?}"), e))?;
    if confirm.is_nack() {
        return Err(AmqpError::Nacked {
            exchange: exchange.to_string(),
        });
    }
    if confirm.take_message().is_some() {
        return Err(AmqpError::Unroutable {
            exchange: exchange.to_string(),
            routing_key: routing_key.to_string(),
        });
    }
    Ok(())
}

/// Why a message is dead-lettered.
pub struct Failure<'a> {
    pub reason: crate::event::Reason,
    pub detail: &'a str,
    pub status: Option<u16>,
    pub attempts: u32,
    /// Genesys Cloud's `inin-correlation-id` of the failed call, for support tickets.
    pub correlation_id: Option<&'a str>,
}

/// Where one pipeline dead-letters: its dead-letter exchange and queue, and who is writing.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    pub exchange: String,
    pub queue: String,
    pub worker_id: String,
}

impl DeadLetters {
    /// Publish the original message (body and properties kept) with the failure headers added,
    /// with confirm; a DLQ that does not exist is an error.
    pub async fn send(
        &self,
        ch: &Channel,
        delivery: &lapin::message::Delivery,
        f: &Failure<'_>,
    ) -> Result<(), AmqpError> {
        dead_letter(
            ch,
            &self.exchange,
            &self.queue,
            &self.worker_id,
            delivery,
            f,
        )
        .await
    }
}

async fn dead_letter(
    ch: &Channel,
    exchange: &str,
    dlq: &str,
    worker_id: &str,
    delivery: &lapin::message::Delivery,
    f: &Failure<'_>,
) -> Result<(), AmqpError> {
    let mut headers = vec![
        (header::FAILURE_REASON, text(f.reason.as_str())),
        (
            header::FAILURE_DETAIL,
            text(crate::text::truncate(f.detail)),
        ),
        (header::ATTEMPTS, int(i64::from(f.attempts))),
        (header::FAILED_AT, text(crate::event::now_rfc3339())),
        (header::WORKER_ID, text(worker_id)),
        (header::ORIGINAL_EXCHANGE, text(delivery.exchange.as_str())),
        (
            header::ORIGINAL_ROUTING_KEY,
            text(delivery.routing_key.as_str()),
        ),
    ];
    if let Some(s) = f.status {
        headers.push((header::FAILURE_STATUS, int(i64::from(s))));
    }
    if let Some(c) = f.correlation_id {
        headers.push((header::CORRELATION_ID, text(c)));
    }
    let props = with_headers(&delivery.properties, headers);
    publish_routed(ch, exchange, dlq, &delivery.data, props).await
}

/// Persistent JSON properties.
pub fn json_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// A header as an integer, whatever integer type the producer used.
pub fn header_i64(props: &BasicProperties, name: &str) -> Option<i64> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortInt(v) => Some(i64::from(*v)),
        AMQPValue::ShortUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongInt(v) => Some(i64::from(*v)),
        AMQPValue::LongUInt(v) => Some(i64::from(*v)),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        _ => None,
    }
}

/// A header as text.
pub fn header_string(props: &BasicProperties, name: &str) -> Option<String> {
    let value = props.headers().as_ref()?.inner().get(name)?;
    match value {
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => Some(String::from_utf8_lossy(b.as_slice()).into_owned()),
        other => header_i64(props, name)
            .map(|v| v.to_string())
            .or_else(|| Some(format!("{other:?}"))),
    }
}

/// The properties with extra headers merged in (existing ones with the same name replaced).
pub fn with_headers(props: &BasicProperties, extra: Vec<(&str, AMQPValue)>) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        table.insert(ShortString::from(k), v);
    }
    props.clone().with_headers(table)
}

/// The properties without the named headers.
pub fn without_headers(props: &BasicProperties, names: &[&str]) -> BasicProperties {
    let Some(table) = props.headers() else {
        return props.clone();
    };
    let kept: std::collections::BTreeMap<_, _> = table
        .inner()
        .iter()
        .filter(|(k, _)| !names.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    props.clone().with_headers(FieldTable::from(kept))
}

pub fn text(value: impl Into<String>) -> AMQPValue {
    AMQPValue::LongString(value.into().into())
}

pub fn int(value: i64) -> AMQPValue {
    AMQPValue::LongLongInt(value)
}

/// A field table from pairs.
pub fn table(pairs: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(k), v);
    }
    t
}

/// Delay before reconnect attempt `n`: 0.5 s doubling up to `max`, with full jitter.
pub fn reconnect_delay(attempt: u32, max: Duration) -> Duration {
    crate::backoff::full_jitter(attempt, Duration::from_millis(500), max)
        .max(Duration::from_millis(100))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_across_integer_types() {
        let props = BasicProperties::default().with_headers(table(vec![
            ("a", AMQPValue::ShortShortUInt(3)),
            ("b", AMQPValue::LongString("17".into())),
            ("c", text("hello")),
        ]));
        assert_eq!(header_i64(&props, "a"), Some(3));
        assert_eq!(header_i64(&props, "b"), Some(17));
        assert_eq!(header_string(&props, "c").as_deref(), Some("hello"));
        assert_eq!(header_i64(&props, "missing"), None);
        let merged = with_headers(&props, vec![("a", int(4)), ("d", int(1))]);
        assert_eq!(header_i64(&merged, "a"), Some(4));
        assert_eq!(header_i64(&merged, "d"), Some(1));
        assert_eq!(header_string(&merged, "c").as_deref(), Some("hello"));
    }
}
