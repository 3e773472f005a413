//! The consume loop shared by the session worker and the webhook forwarder: manual acks,
//! prefetch, at most `concurrency` deliveries in flight (one task each), and a drain that lets
//! in-flight work finish before the loop returns.
//!
//! Handlers return a [`Settle`] verdict instead of acking; the loop settles deliveries in
//! batches (see [`super::settle`]). A handler that panics has its delivery requeued.

use super::settle::{Action, Settlements};
use super::AmqpError;
use crate::shutdown::Shutdown;
use futures_util::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

pub use super::settle::Settle;

/// How long a finished delivery's ack may wait for slower deliveries ahead of it.
pub const ACK_HOLD: Duration = Duration::from_millis(10);

/// Pause before requeueing a delivery whose handling failed or panicked: a fault that persists
/// (a broker or disk problem, a message that trips a bug) would otherwise become a hot
/// redelivery loop. The pause holds the task's slot, throttling the loop.
pub const REQUEUE_PAUSE: Duration = Duration::from_secs(1);

/// Why [`consume`] returned.
#[derive(Debug)]
pub enum ConsumeEnd {
    /// Shutdown was requested; in-flight work was given the grace period.
    Shutdown,
    /// The `interrupt` notification fired; in-flight work finished and the channel is closed,
    /// so prefetched deliveries are back in the queue.
    Interrupted,
    /// The broker connection or channel went away.
    Lost(String),
}

pub struct ConsumeOptions<'a> {
    pub queue: &'a str,
    pub consumer_tag: String,
    pub prefetch: u16,
    pub concurrency: usize,
    /// How long in-flight work may take after shutdown or connection loss.
    pub grace: Duration,
    /// `basic.consume` arguments (a stream's `x-stream-offset`, ...).
    pub arguments: FieldTable,
}

/// A new channel of `conn` with `basic.qos` set, consuming `opts.queue`.
async fn open(
    conn: &Connection,
    opts: &ConsumeOptions<'_>,
) -> Result<(Channel, lapin::Consumer), AmqpError> {
    let ch = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::op("channel.open", e))?;
    ch.basic_qos(opts.prefetch, BasicQosOptions::default())
        .await
        .map_err(|e| AmqpError::op("basic.qos", e))?;
    let consumer = ch
        .basic_consume(
            opts.queue.into(),
            opts.consumer_tag.as_str().into(),
            BasicConsumeOptions::default(),
            opts.arguments.clone(),
        )
        .await
        .map_err(|e| AmqpError::op(format!("basic.consume on {}", opts.queue), e))?;
    Ok((ch, consumer))
}

/// Consume `opts.queue` on a new channel of `conn`, running `handle` for each delivery and
/// settling it with the broker as `handle` decides.
pub async fn consume<F, Fut>(
    conn: &Connection,
    opts: ConsumeOptions<'_>,
    shutdown: &mut Shutdown,
    interrupt: Option<&Notify>,
    handle: F,
) -> Result<ConsumeEnd, AmqpError>
where
    F: Fn(Delivery) -> Fut,
    Fut: Future<Output = Settle> + Send + 'static,
{
    let (ch, mut consumer) = open(conn, &opts).await?;
    tracing::info!(
        queue = opts.queue,
        prefetch = opts.prefetch,
        concurrency = opts.concurrency,
        "consuming"
    );
    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut tasks: JoinSet<(u64, Settle)> = JoinSet::new();
    let mut settlements = Settlements::new(opts.prefetch, ACK_HOLD);
    let never = Notify::new();
    let interrupt = interrupt.unwrap_or(&never);
    let end = loop {
        let deadline = settlements.deadline();
        tokio::select! {
            biased;
            _ = shutdown.requested() => break ConsumeEnd::Shutdown,
            _ = interrupt.notified() => break ConsumeEnd::Interrupted,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                let mut actions = finished(&mut settlements, joined);
                // Whatever else finished meanwhile goes into the same batch.
                while let Some(joined) = tasks.try_join_next() {
                    actions.extend(finished(&mut settlements, joined));
                }
                send(&ch, &actions).await;
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                send(&ch, &settlements.overdue(Instant::now())).await;
            }
            next = next_delivery(&permits, &mut consumer) => match next {
                Some((Ok(delivery), permit)) => {
                    let tag = delivery.delivery_tag;
                    settlements.delivered(tag);
                    let work = AssertUnwindSafe(handle(delivery)).catch_unwind();
                    tasks.spawn(async move {
                        let verdict = match work.await {
                            Ok(verdict) => verdict,
                            Err(_) => {
                                crate::internal_events::handler_panicked(tag);
                                tokio::time::sleep(REQUEUE_PAUSE).await;
                                Settle::Requeue
                            }
                        };
                        drop(permit);
                        (tag, verdict)
                    });
                }
                Some((Err(e), _)) => break ConsumeEnd::Lost(e.to_string()),
                None => break ConsumeEnd::Lost(format!("consumer on {} was cancelled by the broker", opts.queue)),
            },
        }
    };
    let _ = ch
        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
        .await;
    let grace = match end {
        ConsumeEnd::Interrupted => None,
        _ => Some(opts.grace),
    };
    drain(&ch, &mut tasks, &mut settlements, grace).await;
    if !matches!(end, ConsumeEnd::Lost(_)) {
        send(&ch, &settlements.finish()).await;
        // Returns prefetched deliveries that were never started to the queue.
        let _ = ch.close(200, "done".into()).await;
    }
    Ok(end)
}

fn finished(
    settlements: &mut Settlements,
    joined: Result<(u64, Settle), tokio::task::JoinError>,
) -> Vec<Action> {
    match joined {
        Ok((tag, verdict)) => settlements.finished(tag, verdict, Instant::now()),
        Err(e) => {
            // Only an abort gets here (panics are caught in the task); the broker redelivers.
            tracing::warn!(error = %e, "delivery task ended without a verdict");
            Vec::new()
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(at) = deadline {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Send settlement frames in order. A failure means the channel is gone; the broker then
/// redelivers everything unsettled, so there is nothing more to do than say so.
async fn send(ch: &Channel, actions: &[Action]) {
    for action in actions {
        let result = match *action {
            Action::AckUpTo(tag) => ch.basic_ack(tag, BasicAckOptions { multiple: true }).await,
            Action::Ack(tag) => ch.basic_ack(tag, BasicAckOptions { multiple: false }).await,
            Action::Requeue(tag) => {
                ch.basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple: false,
                        requeue: true,
                    },
                )
                .await
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, ?action, "could not settle deliveries; the broker will redeliver them");
            return;
        }
    }
}

/// Wait for in-flight deliveries (up to `grace`, if given), settling each as it finishes;
/// unfinished ones are redelivered by the broker.
async fn drain(
    ch: &Channel,
    tasks: &mut JoinSet<(u64, Settle)>,
    settlements: &mut Settlements,
    grace: Option<Duration>,
) {
    if tasks.is_empty() {
        return;
    }
    if let Some(grace) = grace {
        tracing::info!(
            inflight = tasks.len(),
            grace_ms = grace.as_millis() as u64,
            "finishing in-flight deliveries"
        );
    }
    let all = async {
        while let Some(joined) = tasks.join_next().await {
            send(ch, &finished(settlements, joined)).await;
        }
    };
    let Some(grace) = grace else {
        all.await;
        return;
    };
    if tokio::time::timeout(grace, all).await.is_err() {
        tracing::warn!(
            left = tasks.len(),
            "grace period over; unfinished deliveries will be redelivered"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
}

/// Acquire a concurrency permit, then the next delivery. Cancel-safe: dropping it loses nothing.
async fn next_delivery(
    permits: &Arc<Semaphore>,
    consumer: &mut lapin::Consumer,
) -> Option<(
    Result<Delivery, lapin::Error>,
    tokio::sync::OwnedSemaphorePermit,
)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    let next = consumer.next().await?;
    Some((next, permit))
}

/// Consume `opts.queue` one delivery at a time, in order, running `handle` inline (no task per
/// delivery) and acking in batches: for a stream that must be applied in order, such as the
/// fleet ledger. A verdict other than `Ack` is treated as `Ack` after it was logged: a stream
/// cannot requeue.
pub async fn consume_in_order<F, Fut>(
    conn: &Connection,
    opts: ConsumeOptions<'_>,
    shutdown: &mut Shutdown,
    mut handle: F,
) -> Result<ConsumeEnd, AmqpError>
where
    F: FnMut(Delivery) -> Fut,
    Fut: Future<Output = Settle>,
{
    let (ch, mut consumer) = open(conn, &opts).await?;
    tracing::info!(
        queue = opts.queue,
        prefetch = opts.prefetch,
        "consuming in order"
    );
    // Ack once a quarter of the window is handled, or when the stream goes quiet.
    let batch = u64::from(opts.prefetch / 4).max(1);
    let mut unacked: Option<u64> = None;
    let mut pending = 0u64;
    let end = loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.requested() => break ConsumeEnd::Shutdown,
            next = tokio::time::timeout(ACK_HOLD, consumer.next()) => next,
        };
        match next {
            Err(_) => {
                if let Some(tag) = unacked.take() {
                    send(&ch, &[Action::AckUpTo(tag)]).await;
                    pending = 0;
                }
            }
            Ok(Some(Ok(delivery))) => {
                let tag = delivery.delivery_tag;
                handle(delivery).await;
                unacked = Some(tag);
                pending += 1;
                if pending >= batch {
                    send(&ch, &[Action::AckUpTo(tag)]).await;
                    unacked = None;
                    pending = 0;
                }
            }
            Ok(Some(Err(e))) => break ConsumeEnd::Lost(e.to_string()),
            Ok(None) => {
                break ConsumeEnd::Lost(format!(
                    "consumer on {} was cancelled by the broker",
                    opts.queue
                ))
            }
        }
    };
    if !matches!(end, ConsumeEnd::Lost(_)) {
        if let Some(tag) = unacked {
            send(&ch, &[Action::AckUpTo(tag)]).await;
        }
        let _ = ch
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let _ = ch.close(200, "done".into()).await;
    }
    Ok(end)
}
