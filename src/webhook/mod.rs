//! The webhook forwarder: drains `session.results.webhook` to the analytics endpoint.
//!
//! Each event is POSTed with `x-source: genesys-messaging-init` and the Standard Webhooks
//! headers (`webhook-id` = the event id, `webhook-timestamp`, and `webhook-signature` when a
//! secret is set). 2xx acks. 408, 429, 5xx and transport errors are retried through the webhook
//! delayed-retry queues (so an outage holds no consumer slot), honouring `Retry-After`, up to
//! `webhook.max_attempts`; other 4xx and exhausted retries are dead-lettered to
//! `session.results.webhook.dlq` with the failure headers. Every outcome is an audit entry.
//!
//! - this file: the [`Forwarder`] pipeline (runs in [`crate::amqp::shell`]);
//! - [`signature`]: Standard Webhooks signing and verification.
//!
//! The forwarder may use the infrastructure; it knows nothing of the session worker, the
//! operator tools or the command line.

pub mod signature;

use crate::amqp::consumer::Settle;
use crate::amqp::shell::{self, Pipeline, ShellOptions};
use crate::amqp::{self, header, header_i64, int, text, topology, AmqpError, DeadLetters, Failure};
use crate::config::Settings;
use crate::event::Reason;
use crate::health::Health;
use crate::internal_events;
use crate::shutdown::Shutdown;
use crate::store::{AuditEntry, Store, StoreError};
use lapin::message::Delivery;
use lapin::Channel;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `x-source` header value on every delivery.
pub const SOURCE: &str = "genesys-messaging-init";

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("webhook.secret: {0}")]
    Secret(#[from] signature::VerifyError),
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
}

/// What one POST came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Delivered(u16),
    /// Worth another try; `after` is the receiver's `Retry-After`.
    Retry {
        status: Option<u16>,
        after: Option<Duration>,
        detail: String,
    },
    /// The receiver refused it for good (4xx other than 408/429).
    Rejected {
        status: u16,
        detail: String,
    },
}

/// Classify a receiver's answer (the retry rules of SPEC §4).
pub fn classify(status: u16, retry_after: Option<Duration>, body: &str) -> Outcome {
    let detail = format!(
        "receiver answered {status}: {}",
        crate::text::truncate(body.trim())
    );
    match status {
        200..=299 => Outcome::Delivered(status),
        408 | 429 | 500..=599 => Outcome::Retry {
            status: Some(status),
            after: retry_after,
            detail,
        },
        _ => Outcome::Rejected { status, detail },
    }
}

pub struct Forwarder {
    settings: Arc<Settings>,
    http: reqwest::Client,
    key: Option<Vec<u8>>,
    store: Store,
    health: Arc<Health>,
    worker_id: String,
    dead_letters: DeadLetters,
}

/// Whether the forwarder has anywhere to deliver (`webhook.url` is set).
pub fn enabled(settings: &Settings) -> bool {
    !settings.webhook.url.trim().is_empty()
}

impl Forwarder {
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        health: Arc<Health>,
    ) -> Result<Self, ForwarderError> {
        let secret = settings.webhook.secret.expose();
        let key = if secret.is_empty() {
            None
        } else {
            Some(signature::secret_bytes(secret)?)
        };
        let http = reqwest::Client::builder()
            .timeout(settings.webhook.timeout)
            .connect_timeout(settings.webhook.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(settings.webhook.concurrency)
            .user_agent(concat!("session-worker/", env!("CARGO_PKG_VERSION")))
            // A signed event goes to the configured URL only (SPEC §4): a 3xx is a failure.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ForwarderError::Client(e.to_string()))?;
        let worker_id = settings.worker_id();
        Ok(Self {
            dead_letters: DeadLetters {
                exchange: settings.amqp.dead_letter_exchange.clone(),
                queue: settings.amqp.webhook_dead_letter_queue.clone(),
                worker_id: worker_id.clone(),
            },
            worker_id,
            settings,
            http,
            key,
            store,
            health,
        })
    }

    /// Run the forwarder until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: impl Into<Shutdown>) -> Result<(), ForwarderError> {
        tracing::info!(url = %crate::secret::redact_url(&self.settings.webhook.url), signed = self.key.is_some(), "webhook forwarder starting");
        let w = &self.settings.webhook;
        let opts = ShellOptions {
            name: format!("session-worker forwarder {}", self.worker_id),
            queue: self.settings.amqp.webhook_queue.clone(),
            tag_prefix: format!("{}-forwarder", self.worker_id),
            prefetch: u16::try_from(w.concurrency.saturating_mul(2)).unwrap_or(u16::MAX),
            concurrency: w.concurrency,
            grace: self.settings.worker.shutdown_grace,
            link: None,
        };
        shell::run(
            &self.settings.amqp,
            &opts,
            self.clone(),
            &self.health,
            shutdown.into(),
        )
        .await?;
        tracing::info!("webhook forwarder stopped");
        Ok(())
    }

    /// The webhook id: the event's `event_id`, else the message id, else a hash of the body.
    fn webhook_id(delivery: &Delivery, event: &Value) -> String {
        event
            .get("event_id")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| {
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.as_str().to_string())
            })
            .unwrap_or_else(|| format!("evt_{}", &crate::text::sha256_hex(&delivery.data)[..32]))
    }

    /// POST one event. The signature is computed over the exact bytes sent.
    pub async fn post(&self, id: &str, body: &[u8]) -> Outcome {
        let timestamp = signature::unix_now();
        let mut req = self
            .http
            .post(&self.settings.webhook.url)
            .header("content-type", "application/json")
            .header("x-source", SOURCE)
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string());
        if let Some(key) = &self.key {
            match signature::sign(key, id, timestamp, body) {
                Ok(sig) => req = req.header("webhook-signature", sig),
                Err(e) => {
                    return Outcome::Rejected {
                        status: 0,
                        detail: e.to_string(),
                    }
                }
            }
        }
        match req.body(body.to_vec()).send().await {
            Ok(resp) => {
                let status = resp.status().as_u16();
                if (300..400).contains(&status) {
                    let location = crate::http_headers::header_str(resp.headers(), "location")
                        .map(|l| crate::secret::redact_url(&l))
                        .unwrap_or_else(|| "nowhere".into());
                    return Outcome::Rejected {
                        status,
                        detail: format!("receiver answered {status} redirecting to {location}; redirects are never followed"),
                    };
                }
                let retry_after = crate::http_headers::retry_after(resp.headers());
                let text = resp.text().await.unwrap_or_default();
                classify(status, retry_after, &text)
            }
            Err(e) => Outcome::Retry {
                status: None,
                after: None,
                detail: crate::text::describe_chain(&e),
            },
        }
    }

    async fn forward(&self, delivery: &Delivery, ch: &Channel) -> Result<(), ForwarderError> {
        let event: Value = serde_json::from_slice(&delivery.data).unwrap_or(Value::Null);
        let id = Self::webhook_id(delivery, &event);
        tracing::Span::current().record("webhook_id", id.as_str());
        // Any integer a producer put in the header is accepted; the count saturates.
        let attempts = header_i64(&delivery.properties, header::ATTEMPTS)
            .unwrap_or(0)
            .clamp(0, i64::from(u32::MAX)) as u32;
        let attempts = attempts.saturating_add(1);
        let started = Instant::now();
        let outcome = self.post(&id, &delivery.data).await;
        let latency_ms = (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0;
        let mut entry = AuditEntry {
            timestamp: crate::event::now_rfc3339(),
            event_type: "webhook_delivery".into(),
            idempotency_key: field(&event, "idempotency_key"),
            visitor_id: field(&event, "visitor_id"),
            queue_id: field(&event, "queue_id"),
            conversation_id: field(&event, "conversation_id"),
            latency_ms: Some(latency_ms),
            attempts: Some(attempts),
            worker_id: self.worker_id.clone(),
            detail: Some(format!("webhook-id {id}")),
            ..Default::default()
        };
        let max = self.settings.webhook.max_attempts;
        match outcome {
            Outcome::Delivered(status) => {
                entry.outcome = "delivered".into();
                entry.http_status = Some(status);
                self.store.append_audit(&entry)?;
                internal_events::webhook_delivered(attempts, status);
            }
            Outcome::Retry {
                status,
                after,
                detail,
            } if attempts < max && !self.settings.amqp.retry_delays.is_empty() => {
                let delay = self.retry_delay(attempts, after);
                let queue = topology::webhook_retry_queue_name(&self.settings.amqp, delay);
                let props = amqp::with_headers(
                    &delivery.properties,
                    vec![
                        (header::ATTEMPTS, int(i64::from(attempts))),
                        (header::LAST_ERROR, text(detail.clone())),
                    ],
                );
                amqp::publish_routed(ch, "", &queue, &delivery.data, props).await?;
                entry.outcome = "retry_scheduled".into();
                entry.http_status = status;
                entry.detail = Some(format!(
                    "{detail}; retry in {}",
                    crate::config::format_duration(delay)
                ));
                self.store.append_audit(&entry)?;
                internal_events::webhook_retry_scheduled(attempts, &queue, &detail);
            }
            Outcome::Retry { status, detail, .. } => {
                let failure = Failure {
                    correlation_id: None,
                    reason: Reason::RetriesExhausted,
                    detail: &detail,
                    status,
                    attempts,
                };
                self.dead_letter(ch, delivery, &failure, entry).await?;
            }
            Outcome::Rejected { status, detail } => {
                let failure = Failure {
                    correlation_id: None,
                    reason: Reason::WebhookRejected,
                    detail: &detail,
                    status: Some(status),
                    attempts,
                };
                self.dead_letter(ch, delivery, &failure, entry).await?;
            }
        }
        Ok(())
    }

    /// Dead-letter the event to the webhook DLQ, then record and tell.
    async fn dead_letter(
        &self,
        ch: &Channel,
        delivery: &Delivery,
        failure: &Failure<'_>,
        mut entry: AuditEntry,
    ) -> Result<(), ForwarderError> {
        self.dead_letters.send(ch, delivery, failure).await?;
        internal_events::webhook_dead_lettered(failure.reason, failure.attempts, failure.detail);
        entry.outcome = "dead_lettered".into();
        entry.http_status = failure.status;
        entry.detail = Some(failure.detail.to_string());
        self.store.append_audit(&entry)?;
        Ok(())
    }

    /// The delayed-retry queue for attempt `n`: the n-th configured delay (the last one
    /// repeating), or the first one at least as long as the receiver's `Retry-After`.
    fn retry_delay(&self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let delays = &self.settings.amqp.retry_delays;
        let by_attempt = delays
            .get((attempts as usize).saturating_sub(1))
            .or(delays.last())
            .copied()
            .unwrap_or(Duration::from_secs(5));
        match retry_after {
            Some(after) if after > by_attempt => delays
                .iter()
                .copied()
                .find(|d| *d >= after)
                .or(delays.last().copied())
                .unwrap_or(by_attempt),
            _ => by_attempt,
        }
    }
}

impl Pipeline for Forwarder {
    const NAME: &'static str = "forwarder";
    type Error = ForwarderError;

    fn span(&self, _delivery: &Delivery) -> tracing::Span {
        tracing::info_span!("webhook", webhook_id = tracing::field::Empty)
    }

    async fn handle(
        self: Arc<Self>,
        delivery: Delivery,
        publish: Channel,
    ) -> Result<Settle, ForwarderError> {
        self.forward(&delivery, &publish)
            .await
            .map(|()| Settle::Ack)
    }
}

fn field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_rules_follow_the_spec() {
        assert_eq!(classify(204, None, ""), Outcome::Delivered(204));
        for s in [408, 429, 500, 502, 503] {
            assert!(
                matches!(classify(s, None, ""), Outcome::Retry { .. }),
                "{s}"
            );
        }
        for s in [400, 401, 404, 410, 422] {
            assert!(
                matches!(classify(s, None, ""), Outcome::Rejected { .. }),
                "{s}"
            );
        }
    }
}
