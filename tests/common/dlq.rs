//! Dead letters put straight into a queue, as the worker would have left them, for the tests
//! and benches that need a DLQ without running requests into it.

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel};

/// The properties of a worker dead letter: its message id and failure headers, persistent.
pub fn dead_letter_props(id: &str, reason: &str, detail: &str, failed_at: &str) -> BasicProperties {
    let headers: FieldTable = [
        ("x-failure-reason", reason),
        ("x-failure-detail", detail),
        ("x-failed-at", failed_at),
    ]
    .into_iter()
    .map(|(k, v)| (ShortString::from(k), AMQPValue::LongString(v.into())))
    .collect::<std::collections::BTreeMap<_, _>>()
    .into();
    BasicProperties::default()
        .with_message_id(id.into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

/// Publish every (body, properties) to `exchange` with `routing_key` on a channel in confirm
/// mode, waiting for the confirms 2,000 at a time.
pub async fn publish_confirmed(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    messages: impl IntoIterator<Item = (Vec<u8>, BasicProperties)>,
) {
    let mut pending = Vec::new();
    for (body, props) in messages {
        let confirm = ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish");
        pending.push(confirm);
        if pending.len() == 2_000 {
            for c in pending.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
}
