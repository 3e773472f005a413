//! `dlq replay`: each matching message back to its source exchange, published with confirm
//! (with `x-replay-count` incremented and the run's id) before it is acked off the DLQ.
//! `outcome_unknown` messages need `--force`, which first tells the fleet to forget the key.

use super::{idempotency_key, queue_name, DlqKind, DlqMessage, Filter, Pass};
use crate::amqp::{self, header, header_i64, header_string, int, AmqpError};
use crate::config::Settings;
use crate::event::Reason;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use std::time::Duration;

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
