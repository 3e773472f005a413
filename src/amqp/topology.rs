//! Exchanges, queues and bindings, declared idempotently by `run` and `topology declare`.
//!
//! ```text
//! session.init (direct) ──session.init──▶ session.init.requests ──(broker dead-letter)──▶ session.dlx
//! session.init.requests.retry.<delay>  (TTL = delay, dead-letters back to session.init)
//! session.results (topic) ──session.*──▶ session.results.webhook
//! session.dlx (direct) ──session.init.dlq──▶ session.init.dlq
//!                      ──session.results.webhook.dlq──▶ session.results.webhook.dlq
//! session.ledger (stream, x-max-age = store.idempotency_ttl)   the fleet ledger
//! session.fleet (fanout) ──▶ one exclusive queue per live pod     heartbeats for the rate budget
//! ```
//! Queue arguments cannot change once a queue exists: a mismatch is reported with the fix.

use super::{int, table, text, AmqpError};
use crate::config::{AmqpSettings, QueueType};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};
use std::time::Duration;

/// Name of the delayed-retry queue for one delay: `session.init.requests.retry.30s`.
pub fn retry_queue_name(settings: &AmqpSettings, delay: Duration) -> String {
    format!(
        "{}.retry.{}",
        settings.inbound_queue,
        crate::config::format_duration(delay).replace(' ', "")
    )
}

/// Name of the webhook delayed-retry queue for one delay: `session.results.webhook.retry.30s`.
pub fn webhook_retry_queue_name(settings: &AmqpSettings, delay: Duration) -> String {
    format!(
        "{}.retry.{}",
        settings.webhook_queue,
        crate::config::format_duration(delay).replace(' ', "")
    )
}

fn queue_type_arg(settings: &AmqpSettings) -> (&'static str, AMQPValue) {
    let kind = match settings.queue_type {
        QueueType::Quorum => "quorum",
        QueueType::Classic => "classic",
    };
    ("x-queue-type", text(kind))
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), AmqpError> {
    ch.exchange_declare(
        name.into(),
        kind,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .map_err(|e| mismatch_hint("exchange", name, e))
}

async fn queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), AmqpError> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .map(|_| ())
    .map_err(|e| mismatch_hint("queue", name, e))
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), AmqpError> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| AmqpError::op(format!("bind {queue} to {exchange} ({key})"), e))
}

fn mismatch_hint(kind: &str, name: &str, e: lapin::Error) -> AmqpError {
    let msg = e.to_string();
    let hint = if msg.contains("PRECONDITION_FAILED") || msg.contains("inequivalent") {
        format!(
            "; {kind} {name} already exists with other settings (e.g. amqp.queue_type changed). Drain and delete it, or keep the old settings"
        )
    } else {
        String::new()
    };
    AmqpError::Declare {
        object: format!("{kind} {name}"),
        message: format!("{msg}{hint}"),
    }
}

/// Declare everything the worker and forwarder use. Safe to run any number of times.
pub async fn declare(ch: &Channel, s: &AmqpSettings) -> Result<(), AmqpError> {
    exchange(ch, &s.inbound_exchange, ExchangeKind::Direct).await?;
    exchange(ch, &s.results_exchange, ExchangeKind::Topic).await?;
    exchange(ch, &s.dead_letter_exchange, ExchangeKind::Direct).await?;
    exchange(ch, &s.fleet_exchange, ExchangeKind::Fanout).await?;

    let dead_letter_to = |queue: &str| {
        vec![
            queue_type_arg(s),
            (
                "x-dead-letter-exchange",
                text(s.dead_letter_exchange.clone()),
            ),
            ("x-dead-letter-routing-key", text(queue.to_string())),
        ]
    };
    queue(
        ch,
        &s.inbound_queue,
        table(dead_letter_to(&s.dead_letter_queue)),
    )
    .await?;
    bind(
        ch,
        &s.inbound_queue,
        &s.inbound_exchange,
        &s.inbound_routing_key,
    )
    .await?;

    queue(
        ch,
        &s.webhook_queue,
        table(dead_letter_to(&s.webhook_dead_letter_queue)),
    )
    .await?;
    bind(ch, &s.webhook_queue, &s.results_exchange, "session.*").await?;

    for dlq in [&s.dead_letter_queue, &s.webhook_dead_letter_queue] {
        queue(ch, dlq, table(vec![queue_type_arg(s)])).await?;
        bind(ch, dlq, &s.dead_letter_exchange, dlq).await?;
    }

    for delay in &s.retry_delays {
        // Session retries go back through the inbound exchange; webhook retries straight to
        // the webhook queue (through the default exchange), so no other subscriber of the
        // results exchange sees an event twice.
        let to_inbound = retry_args(s, *delay, &s.inbound_exchange, &s.inbound_routing_key);
        queue(ch, &retry_queue_name(s, *delay), to_inbound).await?;
        let to_webhook = retry_args(s, *delay, "", &s.webhook_queue);
        queue(ch, &webhook_retry_queue_name(s, *delay), to_webhook).await?;
    }
    Ok(())
}

fn retry_args(s: &AmqpSettings, delay: Duration, exchange: &str, routing_key: &str) -> FieldTable {
    let mut args = vec![
        queue_type_arg(s),
        (
            "x-message-ttl",
            int(delay.as_millis().min(i64::MAX as u128) as i64),
        ),
        ("x-dead-letter-exchange", text(exchange)),
        ("x-dead-letter-routing-key", text(routing_key)),
    ];
    if s.queue_type == QueueType::Quorum {
        // Quorum queues dead-letter at most once unless asked otherwise.
        args.push(("x-dead-letter-strategy", text("at-least-once")));
        args.push(("x-overflow", text("reject-publish")));
    }
    table(args)
}

/// Declare the fleet ledger stream (`amqp.ledger_stream`), keeping records for `max_age`
/// (`store.idempotency_ttl`). A stream that exists with another retention is kept as it is, so
/// a changed TTL never stops the pods.
pub async fn declare_ledger(
    conn: &lapin::Connection,
    s: &AmqpSettings,
    max_age: Duration,
) -> Result<(), AmqpError> {
    let args = table(vec![
        ("x-queue-type", text("stream")),
        ("x-max-age", text(format!("{}s", max_age.as_secs().max(1)))),
    ]);
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::op("channel.open", e))?;
    if let Err(e) = queue(&ch, &s.ledger_stream, args).await {
        // Declared before with another retention: keep the stream as it is.
        let probe = conn
            .create_channel()
            .await
            .map_err(|e| AmqpError::op("channel.open", e))?;
        let found = probe
            .queue_declare(
                s.ledger_stream.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if found.is_err() {
            return Err(e);
        }
        tracing::info!(stream = %s.ledger_stream, "the ledger stream exists with other arguments; keeping them");
        let _ = probe.close(200, "found".into()).await;
        return Ok(());
    }
    let _ = ch.close(200, "declared".into()).await;
    Ok(())
}

/// Every queue [`declare`] and [`declare_ledger`] create (for tests and teardown).
pub fn queue_names(s: &AmqpSettings) -> Vec<String> {
    let mut names = vec![
        s.ledger_stream.clone(),
        s.inbound_queue.clone(),
        s.webhook_queue.clone(),
        s.dead_letter_queue.clone(),
        s.webhook_dead_letter_queue.clone(),
    ];
    names.extend(s.retry_delays.iter().map(|d| retry_queue_name(s, *d)));
    names.extend(
        s.retry_delays
            .iter()
            .map(|d| webhook_retry_queue_name(s, *d)),
    );
    names
}

/// Every exchange [`declare`] creates.
pub fn exchange_names(s: &AmqpSettings) -> Vec<String> {
    vec![
        s.inbound_exchange.clone(),
        s.results_exchange.clone(),
        s.dead_letter_exchange.clone(),
        s.fleet_exchange.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn retry_queue_names_are_readable() {
        let s = Settings::load_from(None, &Default::default()).unwrap();
        let names: Vec<_> = s
            .amqp
            .retry_delays
            .iter()
            .map(|d| retry_queue_name(&s.amqp, *d))
            .collect();
        assert_eq!(
            names,
            vec![
                "session.init.requests.retry.5s",
                "session.init.requests.retry.30s",
                "session.init.requests.retry.2m",
                "session.init.requests.retry.10m"
            ]
        );
    }
}
