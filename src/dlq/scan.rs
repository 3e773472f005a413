//! One quick pass over a whole DLQ: what `dlq list`, `dlq show`, `dlq purge`, replay plans and
//! the console read.
//!
//! A consumer with no prefetch limit on a channel of its own takes the messages at the
//! broker's streaming rate (a `basic.get` per message costs a round trip each: 100,000 dead
//! letters took 29 s that way). Nothing is acked unless the caller removes it; at the end one
//! multiple-nack returns the rest, and a classic queue puts requeued messages back in their
//! original places, so the queue's order survives. A pass stops after as many messages as the
//! queue held when it began, so whatever arrives meanwhile is never reached (and goes back with
//! the rest), and after an idle second if other readers took messages away meanwhile.
//!
//! Replays keep [`super::Pass`] (`basic.get`, one message at a time): they are paced far below
//! a round trip per message and must not hold messages they have not reached.

use crate::amqp::{self, AmqpError};
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::time::Duration;

/// How long a pass waits for the next message before it takes the queue as read (someone
/// else removed messages since the depth was read).
const IDLE: Duration = Duration::from_secs(1);

/// What to do with the message just seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Leave it in the queue, in its place.
    Keep,
    /// Ack it off the queue.
    Remove,
    /// Leave it, and end the pass here.
    Stop,
}

/// What a pass saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scanned {
    /// Messages the queue held (ready) when the pass began.
    pub depth: u32,
    pub seen: u32,
    pub removed: u32,
}

/// Show `each` every message `queue` holds now, in queue order; remove those it says to.
pub async fn scan(
    conn: &Connection,
    queue: &str,
    mut each: impl FnMut(&Delivery) -> Take,
) -> Result<Scanned, AmqpError> {
    let look = channel(conn).await?;
    let depth = amqp::queue_depth(&look, queue).await.map_err(|e| {
        AmqpError::op(
            format!("look up queue {queue} (run `session-worker topology declare` first?)"),
            e,
        )
    })?;
    let mut out = Scanned {
        depth,
        ..Default::default()
    };
    if depth > 0 {
        let ch = channel(conn).await?;
        let read = read(&ch, queue, &mut out, &mut each).await;
        // Closing the channel returns whatever it still holds (delivered after the last
        // message seen, or after an early stop).
        let _ = ch.close(200, "done".into()).await;
        let restored = restore(&look, queue, depth.saturating_sub(out.removed)).await;
        read?;
        restored?;
    }
    let _ = look.close(200, "done".into()).await;
    Ok(out)
}

async fn channel(conn: &Connection) -> Result<Channel, AmqpError> {
    conn.create_channel()
        .await
        .map_err(|e| AmqpError::op("channel.open", e))
}

async fn read(
    ch: &Channel,
    queue: &str,
    out: &mut Scanned,
    each: &mut impl FnMut(&Delivery) -> Take,
) -> Result<(), AmqpError> {
    ch.basic_qos(0, BasicQosOptions::default())
        .await
        .map_err(|e| AmqpError::op("basic.qos", e))?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::op(format!("basic.consume on {queue}"), e))?;
    let tag = consumer.tag();
    // The last message seen and left in the queue.
    let mut last = None;
    while out.seen < out.depth {
        let Ok(next) = tokio::time::timeout(IDLE, consumer.next()).await else {
            break;
        };
        let Some(delivery) = next else { break };
        let d = delivery.map_err(|e| AmqpError::op(format!("consume {queue}"), e))?;
        out.seen += 1;
        match each(&d) {
            Take::Keep => last = Some(d.delivery_tag),
            Take::Remove => {
                d.acker
                    .ack(BasicAckOptions::default())
                    .await
                    .map_err(|e| AmqpError::op("basic.ack", e))?;
                out.removed += 1;
            }
            Take::Stop => {
                last = Some(d.delivery_tag);
                break;
            }
        }
    }
    ch.basic_cancel(tag, BasicCancelOptions::default())
        .await
        .map_err(|e| AmqpError::op("basic.cancel", e))?;
    if let Some(tag) = last {
        // Every unacked message up to the last one kept, back in its place, in one frame (the
        // tag must be one still unacked: a removed one is unknown to the broker by now);
        // anything delivered after it goes back when the channel closes.
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .map_err(|e| AmqpError::op("basic.nack", e))?;
    }
    Ok(())
}

/// Wait until the queue shows the returned messages again (returns are applied
/// asynchronously), so a command run right after this one sees every message.
async fn restore(ch: &Channel, queue: &str, expected: u32) -> Result<(), AmqpError> {
    for _ in 0..250 {
        if amqp::queue_depth(ch, queue).await? >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
