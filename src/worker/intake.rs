//! Stage 1, intake: a delivery becomes a [`Job`], the one value that carries it through the
//! stages (claim → call → finish), and its body is validated (SPEC §4).

use crate::amqp::{header, header_i64};
use crate::fleet::Held;
use crate::request::{self, ValidRequest, ValidationError};
use lapin::message::Delivery;
use std::time::Instant;

/// One delivery on its way through the worker.
pub struct Job {
    pub delivery: Delivery,
    /// The idempotency key; for a body that does not validate, the message id, else a hash.
    pub key: String,
    /// Who the request is for, as far as the body says (empty where it does not).
    pub visitor_id: String,
    pub queue_id: String,
    pub bot_score: Option<f64>,
    /// API attempts made for this key so far: earlier deliveries, then this one's.
    pub attempts: u32,
    /// When the first API attempt of this delivery began.
    pub call_started: Option<Instant>,
    /// The fleet claim this delivery holds on its key, once it won one.
    pub held: Option<Held>,
}

impl Job {
    /// Milliseconds since the first API attempt (0 when none was made), to 0.1 ms.
    pub fn latency_ms(&self) -> f64 {
        self.call_started
            .map(|t| round_ms(t.elapsed().as_secs_f64() * 1000.0))
            .unwrap_or(0.0)
    }
}

/// What intake made of a delivery.
pub enum Intake {
    Valid(Job, ValidRequest),
    Invalid(Job, ValidationError),
    /// Redelivered `max_redeliveries` times without being finished: dead-letter it.
    Poison(Job, u32),
}

/// Validate the body and derive the key. A delivery the broker has handed out
/// `max_redeliveries` times already (`x-delivery-count`, set by quorum queues) is poison.
/// `custom_data_limit` is the Web Messaging backend's limit on custom attributes, checked here
/// so an oversize request never reaches Genesys Cloud.
pub fn accept(
    delivery: Delivery,
    max_redeliveries: u32,
    custom_data_limit: Option<usize>,
) -> Intake {
    let deliveries = header_i64(&delivery.properties, "x-delivery-count")
        .unwrap_or(0)
        .clamp(0, i64::from(u32::MAX)) as u32;
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string());
    // Any integer a producer put in the header is accepted; the count saturates.
    let header_attempts = header_i64(&delivery.properties, header::ATTEMPTS)
        .unwrap_or(0)
        .clamp(0, i64::from(u32::MAX)) as u32;
    let checked = request::validate_message(&delivery.data, message_id.as_deref())
        .and_then(|valid| request::within_custom_limit(valid, custom_data_limit));
    let delivery_bytes = if checked.is_err() {
        delivery.data.clone()
    } else {
        Vec::new()
    };
    let job = |key: String, visitor_id, queue_id, bot_score, attempts| Job {
        key,
        visitor_id,
        queue_id,
        bot_score,
        attempts,
        call_started: None,
        held: None,
        delivery,
    };
    let (job, verdict) = match checked {
        Ok(valid) => (
            job(
                valid.idempotency_key.clone(),
                valid.request.visitor_id.clone(),
                valid.request.queue_id.clone(),
                valid.request.bot_score,
                header_attempts,
            ),
            Ok(valid),
        ),
        Err(e) => {
            // Best effort to say who the request was for, from whatever parses.
            let (visitor_id, queue_id) = loose_ids(&delivery_bytes);
            let key = message_id.unwrap_or_else(|| crate::text::sha256_hex(&delivery_bytes));
            (job(key, visitor_id, queue_id, None, 0), Err(e))
        }
    };
    match verdict {
        _ if deliveries >= max_redeliveries => Intake::Poison(job, deliveries),
        Ok(valid) => Intake::Valid(job, valid),
        Err(e) => Intake::Invalid(job, e),
    }
}

/// The visitor and queue ids of a body that did not validate, as far as it parses.
fn loose_ids(bytes: &[u8]) -> (String, String) {
    let loose: serde_json::Value = serde_json::from_slice(bytes).unwrap_or_default();
    let field = |k: &str| {
        loose
            .get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    (field("visitor_id"), field("queue_id"))
}

pub fn round_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}
