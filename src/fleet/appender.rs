//! The ledger's appender: one task that owns this pod's publishing channel to the ledger stream
//! and publishes what the worker's tasks append, many records per stream message.
//!
//! While batches wait for their confirms (up to [`IN_FLIGHT`] at once), the next one gathers
//! (group commit, as the store does for fsyncs), so the broker handles one message per batch
//! instead of one per record; under load a batch also lingers ([`LINGER`]) to hold more.
//! Batches reach the stream in the order they were sent: on one channel the broker keeps it,
//! and before sending on a new channel the appender waits until the old one's are settled. The channel is the appender's own, on
//! the worker's shared connection: opened when first needed, and again after the broker
//! closed it, so no caller hands one in and no batch is split by channel.

use super::record::{Record, RECORD_TYPE};
use crate::amqp::shell::SharedConnection;
use crate::amqp::{self, AmqpError};
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use lapin::Channel;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// One record to append, and who waits for the confirm.
pub(super) struct Append {
    pub record: Record,
    pub done: oneshot::Sender<Result<(), String>>,
}

/// The most records one ledger message carries.
const MAX_BATCH: usize = 512;

/// How long a batch gathers when the last one was busy (at least [`LINGER_FROM`] records).
/// The broker's cost is per ledger message, not per record (on the 2-core bench machine a
/// stream message published with a confirm and read back costs RabbitMQ ~0.7 ms of CPU
/// whether it holds one record or fifty), but every claim waits out the linger before its
/// call. 5 ms paid on a CPU-starved machine (+9 % against none) and cost 30 % on an idle one,
/// where the run is bound by latency; 1 ms was the best of 0, 1 and 5 ms there. A quiet pod
/// sends at once.
const LINGER: Duration = Duration::from_millis(1);
const LINGER_FROM: usize = 4;

/// Batches sent and not yet confirmed. With one, a record waited for the batch ahead of it to
/// be confirmed before its own was sent: a claim's round trip was up to two confirms.
const IN_FLIGHT: usize = 2;

/// `first` and whatever else is queued, up to [`MAX_BATCH`].
fn gather(first: Append, rx: &mut mpsc::UnboundedReceiver<Append>) -> Vec<Append> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(a) => batch.push(a),
            Err(_) => break,
        }
    }
    batch
}

/// The appender's state: the stream, the connection and the channel it publishes on.
pub(super) struct Appender {
    stream: String,
    link: Arc<SharedConnection>,
    channel: Option<Channel>,
}

impl Appender {
    pub fn new(stream: String, link: Arc<SharedConnection>) -> Self {
        Self {
            stream,
            link,
            channel: None,
        }
    }

    /// Publish batches until every sender is gone. Up to [`IN_FLIGHT`] batches wait for their
    /// confirms at once; the next one gathers meanwhile.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Append>) {
        let mut confirming = FuturesOrdered::new();
        let mut last_len = 0usize;
        loop {
            tokio::select! {
                Some(()) = confirming.next(), if !confirming.is_empty() => {}
                first = rx.recv(), if confirming.len() < IN_FLIGHT => {
                    let Some(first) = first else { break };
                    if last_len >= LINGER_FROM {
                        // Busy: let the batch gather a little longer.
                        tokio::time::sleep(LINGER).await;
                    }
                    let batch = gather(first, &mut rx);
                    last_len = batch.len();
                    if !self.channel_open() {
                        // A new channel: what the old one sent is settled first, so the
                        // stream keeps this pod's records in the order they were appended.
                        while confirming.next().await.is_some() {}
                    }
                    confirming.push_back(self.publish(batch).await);
                }
            }
        }
        while confirming.next().await.is_some() {}
    }

    /// Send one batch; the future answers its senders once the broker confirmed it.
    async fn publish(&mut self, batch: Vec<Append>) -> impl Future<Output = ()> + use<> {
        let (records, done): (Vec<Record>, Vec<_>) =
            batch.into_iter().map(|a| (a.record, a.done)).unzip();
        let body = if records.len() == 1 {
            records[0].encode()
        } else {
            Record::encode_batch(&records)
        };
        let sent = std::time::Instant::now();
        let sending = match self.channel().await {
            Ok(ch) => {
                let props = amqp::json_properties().with_type(RECORD_TYPE.into());
                amqp::send_routed(&ch, "", &self.stream, &body, props).await
            }
            Err(e) => Err(e),
        };
        if sending.is_err() {
            // Opened again for the next batch if the broker closed it.
            self.channel = self.channel.take().filter(|c| c.status().connected());
        }
        let len = records.len();
        async move {
            let result = match sending {
                Ok(confirm) => confirm.await,
                Err(e) => Err(e),
            };
            let m = crate::metrics::metrics();
            m.ledger_append_seconds
                .observe(sent.elapsed().as_secs_f64());
            m.ledger_batch_records.observe(len as f64);
            let result = result.map_err(|e| e.to_string());
            for d in done {
                let _ = d.send(result.clone());
            }
        }
    }

    fn channel_open(&self) -> bool {
        self.channel
            .as_ref()
            .is_some_and(|c| c.status().connected())
    }

    /// The open publishing channel, opening one (with confirms) if there is none.
    async fn channel(&mut self) -> Result<Channel, AmqpError> {
        if let Some(ch) = self.channel.as_ref().filter(|c| c.status().connected()) {
            return Ok(ch.clone());
        }
        let conn = self.link.get().await?;
        let ch = amqp::confirm_channel(&conn).await?;
        self.channel = Some(ch.clone());
        Ok(ch)
    }
}
