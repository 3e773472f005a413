//! The reader's ears on the broker: the shell pipeline that declares the ledger, consumes it
//! from where the reader's claims are, appends a catch-up mark on every (re)connect, and
//! hands each ledger message to the reader loop ([`super::LedgerReader`]), which owns
//! everything it learns. A message is acknowledged once the loop has applied it.

use super::super::record::{Record, RECORD_TYPE};
use crate::amqp::consumer::Settle;
use crate::amqp::shell::Pipeline;
use crate::amqp::{self, topology, AmqpError};
use crate::config::Settings;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use std::convert::Infallible;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

/// What the feed tells the loop, in the order it happened.
pub enum Fed {
    /// Connected; the catch-up mark with this id is about to be appended.
    Connected {
        mark: String,
    },
    /// A ledger message; answered once it is applied.
    Message(Box<Delivery>, oneshot::Sender<()>),
    Disconnected,
}

pub struct Feed {
    pub settings: Arc<Settings>,
    pub worker_id: String,
    pub fed: mpsc::UnboundedSender<Fed>,
    /// The last offset the loop applied (published by the loop): where a new consumer starts.
    pub offset: watch::Receiver<Option<u64>>,
}

impl Pipeline for Feed {
    const NAME: &'static str = "ledger";
    const IN_ORDER: bool = true;
    type Error = Infallible;

    fn span(&self, delivery: &Delivery) -> tracing::Span {
        tracing::debug_span!("ledger", delivery_tag = delivery.delivery_tag)
    }

    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        _publish: Channel,
    ) -> Result<Settle, Infallible> {
        let (done, applied) = oneshot::channel();
        if self
            .fed
            .send(Fed::Message(Box::new(delivery), done))
            .is_err()
            || applied.await.is_err()
        {
            // The loop stopped: the message is read again at the next start.
            return Ok(Settle::Requeue);
        }
        Ok(Settle::Ack)
    }

    fn arguments(&self) -> FieldTable {
        // On from where the claims are (the store's own offset may lie further on: what lies
        // between is applied to the claims alone).
        let start = match *self.offset.borrow() {
            Some(o) => {
                AMQPValue::LongLongInt(i64::try_from(o.saturating_add(1)).unwrap_or(i64::MAX))
            }
            None => AMQPValue::LongString("first".into()),
        };
        amqp::table(vec![("x-stream-offset", start)])
    }

    async fn connected(&self, conn: &Connection, publish: &Channel) -> Result<(), AmqpError> {
        let s = &self.settings;
        topology::declare_ledger(conn, &s.amqp, s.store.idempotency_ttl).await?;
        let id = uuid::Uuid::new_v4().simple().to_string();
        // Told before the mark goes out, so the loop knows it when it reads it back.
        let _ = self.fed.send(Fed::Connected { mark: id.clone() });
        let mark = Record::Mark {
            id,
            worker_id: self.worker_id.clone(),
        };
        let props = amqp::json_properties().with_type(RECORD_TYPE.into());
        amqp::publish_routed(publish, "", &s.amqp.ledger_stream, &mark.encode(), props).await
    }

    fn disconnected(&self) {
        let _ = self.fed.send(Fed::Disconnected);
    }
}
