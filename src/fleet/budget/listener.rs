//! The budget's ears and mouth on the broker: the shell pipeline that declares this pod's
//! heartbeat queue, says hello on every (re)connect, and hands each heartbeat it hears to the
//! budget loop ([`super::BudgetTask`]), which owns everything it learns. Sending is a free
//! function: the loop and this listener both send, neither waits for the other.

use super::{Heard, Heartbeat, Say};
use crate::amqp::consumer::Settle;
use crate::amqp::shell::Pipeline;
use crate::amqp::{self, AmqpError};
use lapin::message::Delivery;
use lapin::options::{QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};

/// Who this pod is on the fleet exchange, and where its heartbeats go.
#[derive(Clone)]
pub(super) struct Voice {
    pub exchange: String,
    pub worker_id: String,
    /// This process (a restarted pod keeps its worker id but is a new instance).
    pub instance: String,
    /// Fired when the publishing channel is found closed: the shell connects again.
    pub lost: Arc<Notify>,
}

impl Voice {
    /// Send a heartbeat on `ch`; whether the broker took it.
    pub async fn send(&self, ch: &Channel, say: Say) -> bool {
        let beat = Heartbeat {
            worker_id: self.worker_id.clone(),
            instance: self.instance.clone(),
            leaving: say == Say::Leaving,
            hello: say == Say::Hello,
        };
        let body = serde_json::to_vec(&beat).unwrap_or_default();
        let props = amqp::json_properties().with_delivery_mode(1);
        match amqp::publish_confirmed(ch, &self.exchange, "", &body, props).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "heartbeat not sent");
                if !ch.status().connected() {
                    // The broker closed the channel (the fleet exchange is gone, say): connect
                    // again, which declares the exchange and this pod's queue anew.
                    self.lost.notify_one();
                }
                false
            }
        }
    }

    /// This pod's own queue on the fleet exchange.
    pub fn queue(&self) -> String {
        format!("{}.{}.{}", self.exchange, self.worker_id, self.instance)
    }
}

/// The shell pipeline: consumes this pod's heartbeat queue and reports to the loop.
pub(super) struct Listener {
    pub voice: Voice,
    pub heard: mpsc::UnboundedSender<Heard>,
}

impl Pipeline for Listener {
    const NAME: &'static str = "budget";
    type Error = Infallible;

    fn span(&self, _delivery: &Delivery) -> tracing::Span {
        tracing::trace_span!("heartbeat")
    }

    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        _publish: Channel,
    ) -> Result<Settle, Infallible> {
        if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&delivery.data) {
            let _ = self.heard.send(Heard::Beat(beat));
        }
        Ok(Settle::Ack)
    }

    fn interrupt(&self) -> Option<&Notify> {
        Some(&self.voice.lost)
    }

    async fn connected(&self, _conn: &Connection, publish: &Channel) -> Result<(), AmqpError> {
        let queue = self.voice.queue();
        publish
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                amqp::table(vec![("x-queue-type", amqp::text("classic"))]),
            )
            .await
            .map_err(|e| AmqpError::op(format!("declare queue {queue}"), e))?;
        publish
            .queue_bind(
                queue.as_str().into(),
                self.voice.exchange.as_str().into(),
                "".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| AmqpError::op(format!("bind {queue}"), e))?;
        // Say hello at once, before consuming: the others count this pod and answer, so it
        // knows them before it takes a delivery.
        let hello_sent = self.voice.send(publish, Say::Hello).await;
        let _ = self.heard.send(Heard::Connected {
            publish: publish.clone(),
            hello_sent,
        });
        Ok(())
    }

    fn disconnected(&self) {
        let _ = self.heard.send(Heard::Disconnected);
    }
}
