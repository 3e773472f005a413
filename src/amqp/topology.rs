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
use lapin::{Channel, Connection, ExchangeKind};
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
    declare_error(kind, name, e.to_string())
}

/// A declare the broker refused. Fatal (an operator has to act; reconnecting cannot help)
/// when the object exists with other settings or the user may not declare it; anything else
/// — right after a broker restart, say, a queue whose home node "is down or inaccessible"
/// until the broker has started it — is an operation to retry.
fn declare_error(kind: &str, name: &str, msg: String) -> AmqpError {
    if msg.contains("PRECONDITION_FAILED") || msg.contains("inequivalent") {
        AmqpError::Declare {
            object: format!("{kind} {name}"),
            message: format!(
                "{msg}; {kind} {name} already exists with other settings (e.g. amqp.queue_type changed). Drain and delete it, or keep the old settings"
            ),
        }
    } else if msg.contains("ACCESS_REFUSED") {
        AmqpError::Declare {
            object: format!("{kind} {name}"),
            message: msg,
        }
    } else {
        AmqpError::op(format!("declare {kind} {name}"), msg)
    }
}

/// Declare everything the worker and forwarder use, dead-letter queues included. Safe to run
/// any number of times. With `convert`, a dead-letter queue left as a quorum queue by an
/// earlier version is converted (see [`declare_dead_letter_queues`]); what was done is returned
/// as lines for the operator.
pub async fn declare_all(
    conn: &Connection,
    s: &AmqpSettings,
    convert: bool,
) -> Result<Vec<String>, AmqpError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::op("channel.open", e))?;
    declare(&ch, s).await?;
    let _ = ch.close(200, "declared".into()).await;
    declare_dead_letter_queues(conn, s, convert).await
}

/// Classic queue arguments for a dead-letter queue (whatever `amqp.queue_type` says).
///
/// A dead-letter queue is read by operators: `dlq list` and `dlq show` fetch messages and give
/// them back (`basic.nack`, requeue). A classic queue puts a returned message back where it
/// was, adds no `x-delivery-count`, and has no delivery limit. A quorum queue moves it to the
/// back and counts the return (measured on RabbitMQ 3.10.8), and on RabbitMQ 4.x drops it after
/// its default delivery limit of 20: listing would reorder the DLQ and could lose messages.
fn dead_letter_queue_args() -> FieldTable {
    table(vec![("x-queue-type", text("classic"))])
}

/// Suffix of the queue that holds a dead-letter queue's messages while it is converted.
const CONVERTING: &str = ".converting";

/// Declare both dead-letter queues as classic queues and bind them. One that exists as a quorum
/// queue (declared by an earlier version) is converted when `convert` is set: its messages move
/// (in order, each published with confirm before it is acked) to `<dlq>.converting`, the quorum
/// queue is deleted once empty, the classic one declared, and the messages move back. Without
/// `convert` it is left as it is, with a warning. A conversion cut short is finished by the
/// next run.
pub async fn declare_dead_letter_queues(
    conn: &Connection,
    s: &AmqpSettings,
    convert: bool,
) -> Result<Vec<String>, AmqpError> {
    let mut notes = Vec::new();
    for dlq in [&s.dead_letter_queue, &s.webhook_dead_letter_queue] {
        let ch = open(conn).await?;
        match queue(&ch, dlq, dead_letter_queue_args()).await {
            Ok(()) => {}
            Err(e) if !e.to_string().contains("PRECONDITION_FAILED") => return Err(e),
            Err(_) if !convert => {
                tracing::warn!(queue = %dlq, "this dead-letter queue is a quorum queue (an earlier version declared it so): `dlq list` on it moves messages to its back, and RabbitMQ 4.x may drop a message listed 20 times. Run `session-worker topology declare` once to convert it to a classic queue");
                notes.push(format!("{dlq}: quorum queue left as it is (run `session-worker topology declare` to convert)"));
                continue;
            }
            Err(_) => {
                let moved = convert_to_classic(conn, s, dlq).await?;
                notes.push(format!(
                    "{dlq}: converted from a quorum queue to a classic queue ({moved} messages kept, in order)"
                ));
            }
        }
        let ch = open(conn).await?;
        bind(&ch, dlq, &s.dead_letter_exchange, dlq).await?;
        let _ = ch.close(200, "declared".into()).await;
        if convert {
            // Finish a conversion cut short: messages still parked beside the queue go back.
            let parked = format!("{dlq}{CONVERTING}");
            let moved = move_all(conn, &parked, dlq).await?;
            delete(conn, &parked, true).await?;
            if moved > 0 {
                notes.push(format!(
                    "{dlq}: finished an earlier conversion ({moved} messages moved back)"
                ));
            }
        }
    }
    Ok(notes)
}

/// Each step on its own confirm channel: a refused declare closes only its channel.
async fn open(conn: &Connection) -> Result<Channel, AmqpError> {
    super::confirm_channel(conn).await
}

async fn delete(conn: &Connection, name: &str, if_empty: bool) -> Result<(), AmqpError> {
    let ch = open(conn).await?;
    ch.queue_delete(
        name.into(),
        lapin::options::QueueDeleteOptions {
            if_empty,
            ..Default::default()
        },
    )
    .await
    .map_err(|e| AmqpError::op(format!("delete queue {name}"), e))?;
    let _ = ch.close(200, "deleted".into()).await;
    Ok(())
}

/// Move every message from `from` (declared here as a classic queue if it is missing) to `to`
/// in order: each is published (properties kept, the broker's `x-delivery-count` dropped) with
/// confirm before it is acked. Returns how many.
async fn move_all(conn: &Connection, from: &str, to: &str) -> Result<u64, AmqpError> {
    let ch = open(conn).await?;
    if from.ends_with(CONVERTING) {
        queue(&ch, from, dead_letter_queue_args()).await?;
    }
    let mut moved = 0;
    while let Some(m) = ch
        .basic_get(
            from.into(),
            lapin::options::BasicGetOptions { no_ack: false },
        )
        .await
        .map_err(|e| AmqpError::op(format!("basic.get on {from}"), e))?
    {
        let props = super::without_headers(&m.delivery.properties, &["x-delivery-count"]);
        super::publish_routed(&ch, "", to, &m.delivery.data, props).await?;
        m.delivery
            .acker
            .ack(lapin::options::BasicAckOptions::default())
            .await
            .map_err(|e| AmqpError::op("basic.ack", e))?;
        moved += 1;
    }
    let _ = ch.close(200, "moved".into()).await;
    Ok(moved)
}

/// Convert a quorum dead-letter queue to a classic one, keeping its messages in order. It is
/// unbound from the dead-letter exchange first, so nothing new arrives while it is emptied
/// (a worker's dead letter finds no queue meanwhile, is returned, and its delivery requeued).
async fn convert_to_classic(
    conn: &Connection,
    s: &AmqpSettings,
    dlq: &str,
) -> Result<u64, AmqpError> {
    let ch = open(conn).await?;
    ch.queue_unbind(
        dlq.into(),
        s.dead_letter_exchange.as_str().into(),
        dlq.into(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| AmqpError::op(format!("unbind {dlq}"), e))?;
    let parked = format!("{dlq}{CONVERTING}");
    queue(&ch, &parked, dead_letter_queue_args()).await?;
    let mut moved = 0;
    loop {
        moved += move_all(conn, dlq, &parked).await?;
        // Quorum queues cannot be deleted `if-empty`: look, then delete.
        if super::queue_depth(&ch, dlq).await? == 0 {
            break;
        }
    }
    delete(conn, dlq, false).await?;
    queue(&open(conn).await?, dlq, dead_letter_queue_args()).await?;
    move_all(conn, &parked, dlq).await?;
    delete(conn, &parked, true).await?;
    Ok(moved)
}

/// Declare everything but the dead-letter queues (see [`declare_all`]).
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
    fn only_a_declare_an_operator_must_fix_is_fatal() {
        let other = declare_error(
            "queue",
            "q",
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type'".into(),
        );
        assert!(other.is_fatal());
        let refused = declare_error(
            "queue",
            "q",
            "ACCESS_REFUSED - access to queue 'q' refused".into(),
        );
        assert!(refused.is_fatal());
        // Right after a broker restart, before the broker has started the queue.
        let starting = declare_error(
            "queue",
            "q",
            "NOT_FOUND - home node 'rabbit@localhost' of durable queue 'q' in vhost '/' is down or inaccessible".into(),
        );
        assert!(!starting.is_fatal(), "{starting}");
    }

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
