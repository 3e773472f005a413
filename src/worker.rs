//! The consumer pipeline: consume → validate → dedupe → limit → create → record → publish → ack.
//!
//! One [`Worker`] per process. The consume loop owns the connection lifecycle (reconnect with
//! back-off), the auth pause, and graceful shutdown; each delivery runs in its own task, at most
//! `worker.concurrency` at once. A delivery is acked only after its outcome is flushed to sled
//! and, where it produces one, its result event or dead letter is confirmed by the broker.

use crate::amqp::consumer::{self, ConsumeEnd, ConsumeOptions, Settle};
use crate::amqp::{self, header_i64, int, text, topology, AmqpError};
use crate::config::Settings;
use crate::event::{EventError, EventKind, ResultEvent};
use crate::genesys::{Disposition, GenesysClient, GenesysError, SessionCreated};
use crate::health::Health;
use crate::limiter::Limiter;
use crate::metrics::{metrics, InflightGuard};
use crate::request::{self, ValidRequest, ValidationError};
use crate::store::{now_ms, AuditEntry, Claim, IdemRecord, IdemState, Store, StoreError};
use lapin::message::Delivery;
use lapin::{Channel, Connection};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify, OwnedMutexGuard};
use tracing::{field::Empty, Instrument};

/// Failure reasons, as written to `x-failure-reason` and result events.
pub mod reason {
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const IDEMPOTENCY_CONFLICT: &str = "idempotency_conflict";
    pub const PERMANENT_API_ERROR: &str = "permanent_api_error";
    pub const RETRIES_EXHAUSTED: &str = "retries_exhausted";
}

pub use crate::amqp::header;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error("cannot build the Genesys Cloud client: {0}")]
    Client(#[from] GenesysError),
}

/// Serializes work on one idempotency key inside the process, so an `in_progress` record seen
/// while holding the lock can only have been left by a crash.
#[derive(Default)]
pub struct KeyLocks {
    map: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

pub struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: String,
    _guard: OwnedMutexGuard<()>,
}

impl KeyLocks {
    pub async fn lock(&self, key: &str) -> KeyGuard<'_> {
        let m = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.to_string()).or_default().clone()
        };
        KeyGuard {
            locks: self,
            key: key.to_string(),
            _guard: m.lock_owned().await,
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // The map and this guard hold one reference each; more means someone is waiting.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) <= 2)
        {
            map.remove(&self.key);
        }
    }
}

/// Tripped by a task that got an auth error; the consume loop pauses and probes.
#[derive(Default)]
struct AuthGate {
    tripped: AtomicBool,
    notify: Notify,
    /// Consecutive pauses without a successful session in between; grows the probe back-off.
    streak: AtomicU32,
}

impl AuthGate {
    fn trip(&self) {
        if !self.tripped.swap(true, Ordering::SeqCst) {
            self.notify.notify_one();
        }
    }
}

pub use crate::amqp::consumer::REQUEUE_PAUSE;

pub struct Worker {
    settings: Arc<Settings>,
    worker_id: String,
    client: GenesysClient,
    store: Store,
    limiter: Limiter,
    locks: KeyLocks,
    health: Arc<Health>,
    auth: AuthGate,
}

pub use consumer::shutdown_requested;

/// Run the session workers until `shutdown` turns true.
pub async fn run(
    settings: Arc<Settings>,
    store: Store,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), WorkerError> {
    let worker = Arc::new(Worker::new(settings, store, health)?);
    worker.run(shutdown).await
}

impl Worker {
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        health: Arc<Health>,
    ) -> Result<Self, WorkerError> {
        let client = GenesysClient::new(&settings.genesys, settings.worker.concurrency)?;
        let limiter = Limiter::new(
            settings.rate_limit.requests_per_minute,
            settings.rate_limit.burst,
        );
        health.set_store_open(true);
        Ok(Self {
            worker_id: settings.worker_id(),
            client,
            store,
            limiter,
            locks: KeyLocks::default(),
            health,
            auth: AuthGate::default(),
            settings,
        })
    }

    pub async fn run(
        self: Arc<Self>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Result<(), WorkerError> {
        tracing::info!(
            worker_id = %self.worker_id,
            queue = %self.settings.amqp.inbound_queue,
            backend = self.client.backend().name(),
            concurrency = self.settings.worker.concurrency,
            requests_per_minute = self.settings.rate_limit.requests_per_minute,
            "session worker starting"
        );
        let pruner = tokio::spawn(prune_loop(
            self.store.clone(),
            self.settings.store.audit_retention,
        ));
        let name = format!("session-worker {}", self.worker_id);
        let health = self.health.clone();
        let result = consumer::with_reconnect(
            &self.settings.amqp,
            &name,
            &mut shutdown,
            |up| health.set_broker_connected(up),
            |conn, mut rx| {
                let this = self.clone();
                async move {
                    let result = this.session(&conn, &mut rx).await;
                    (conn, result)
                }
            },
        )
        .await;
        self.health.set_broker_connected(false);
        pruner.abort();
        let _ = pruner.await;
        self.store.flush_now()?;
        tracing::info!("session worker stopped; store flushed");
        result
    }

    /// One broker connection's worth of consuming: `Ok(true)` on shutdown, `Ok(false)` to
    /// reconnect, `Err` only for problems reconnecting cannot fix.
    async fn session(
        self: &Arc<Self>,
        conn: &Connection,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool, WorkerError> {
        let publish_ch = match consumer::prepare(conn, &self.settings.amqp).await? {
            Some(ch) => ch,
            None => return Ok(false),
        };
        self.health.set_broker_connected(true);
        loop {
            let opts = ConsumeOptions {
                queue: &self.settings.amqp.inbound_queue,
                consumer_tag: format!("{}-{}", self.worker_id, uuid::Uuid::new_v4().simple()),
                prefetch: self.settings.amqp.prefetch,
                concurrency: self.settings.worker.concurrency,
                grace: self.settings.worker.shutdown_grace,
            };
            let end =
                consumer::consume(conn, opts, shutdown, Some(&self.auth.notify), |delivery| {
                    let this = self.clone();
                    let ch = publish_ch.clone();
                    async move { this.handle(delivery, &ch).await }
                })
                .await;
            match end {
                Ok(ConsumeEnd::Shutdown) => {
                    // Closed here, before the connection, so lapin does not close it twice.
                    let _ = publish_ch.close(200, "shutdown".into()).await;
                    return Ok(true);
                }
                Ok(ConsumeEnd::Lost(why)) => {
                    tracing::warn!(reason = %why, "broker connection lost; reconnecting");
                    return Ok(false);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consuming failed; reconnecting");
                    return Ok(false);
                }
                Ok(ConsumeEnd::Interrupted) => {
                    if !self.auth_pause(shutdown).await {
                        return Ok(true);
                    }
                }
            }
        }
    }

    /// Paused by an auth failure: not ready, probe the token endpoint with back-off.
    /// Returns false if shutdown was requested meanwhile.
    async fn auth_pause(&self, shutdown: &mut watch::Receiver<bool>) -> bool {
        self.health.set_auth_paused(true);
        metrics().auth_paused.set(1);
        let streak = self.auth.streak.fetch_add(1, Ordering::SeqCst);
        let delay =
            crate::backoff::ceiling(streak, Duration::from_secs(5), Duration::from_secs(300));
        tracing::error!(
            probe_in_s = delay.as_secs(),
            "paused: Genesys Cloud refused the credentials; no new messages are taken and none are dead-lettered. Fix: {}",
            self.client.backend().auth_hint()
        );
        let mut wait = delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown_requested(shutdown) => return false,
            }
            match self.client.refresh_token().await {
                Ok(()) => {
                    tracing::info!("credentials accepted by the token endpoint; resuming");
                    self.auth.tripped.store(false, Ordering::SeqCst);
                    self.health.set_auth_paused(false);
                    metrics().auth_paused.set(0);
                    return true;
                }
                Err(e) => {
                    wait = (wait * 2).min(Duration::from_secs(300));
                    tracing::error!(error = %e, probe_in_s = wait.as_secs(), "still paused");
                }
            }
        }
    }

    async fn handle(&self, delivery: Delivery, publish_ch: &Channel) -> Settle {
        let _inflight = InflightGuard::new();
        let span = tracing::info_span!(
            "message",
            delivery_tag = delivery.delivery_tag,
            idempotency_key = Empty,
            conversation_id = Empty,
            correlation_id = Empty
        );
        async {
            match self.process(&delivery, publish_ch).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "could not finish the delivery; it will be redelivered");
                    tokio::time::sleep(REQUEUE_PAUSE).await;
                    Settle::Requeue
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn process(&self, delivery: &Delivery, ch: &Channel) -> Result<Settle, WorkerError> {
        let props = &delivery.properties;
        let message_id = props.message_id().as_ref().map(|m| m.as_str().to_string());
        let valid = match request::validate_message(&delivery.data, message_id.as_deref()) {
            Ok(v) => v,
            Err(e) => return self.reject_invalid(delivery, ch, e, message_id).await,
        };
        let key = valid.idempotency_key.clone();
        tracing::Span::current().record("idempotency_key", key.as_str());
        let _guard = self.locks.lock(&key).await;
        let stored_attempts = match self
            .store
            .claim(&key, &valid.fingerprint, &self.worker_id)?
        {
            Claim::Completed(rec) => return self.replay_completed(&valid, rec, ch).await,
            Claim::Conflict(rec) => return self.reject_conflict(delivery, ch, &valid, rec).await,
            Claim::Proceed { attempts } => attempts,
        };
        let header_attempts = header_i64(props, header::ATTEMPTS)
            .unwrap_or(0)
            .clamp(0, u32::MAX as i64) as u32;
        let attempts_before = stored_attempts.max(header_attempts);
        let started = Instant::now();
        let mut attempts_here = 0u32;
        let max_attempts = self.settings.worker.max_attempts;
        let outcome = loop {
            attempts_here += 1;
            let waited = self.limiter.acquire().await;
            metrics().limiter_wait(waited);
            if waited > Duration::from_millis(100) {
                tracing::debug!(waited_ms = waited.as_millis() as u64, "rate limiter wait");
            }
            let call_started = Instant::now();
            let result = self.client.create_session(&valid.request, &key).await;
            metrics()
                .genesys_request_duration
                .observe(call_started.elapsed().as_secs_f64());
            match result {
                Ok(created) => break Ok(created),
                Err(e) => match e.disposition() {
                    Disposition::Retry { after } => {
                        if let Some(after) = after {
                            self.limiter.pause_for(after);
                            tracing::warn!(
                                pause_ms = after.as_millis() as u64,
                                "Genesys Cloud rate limit: pausing all tasks"
                            );
                        }
                        if attempts_here >= max_attempts {
                            break Err(e);
                        }
                        let delay = crate::backoff::full_jitter(
                            attempts_here - 1,
                            self.settings.worker.backoff_base,
                            self.settings.worker.backoff_max,
                        );
                        tracing::info!(attempt = attempts_here, error = %e, backoff_ms = delay.as_millis() as u64, "retryable error");
                        metrics().retry("in_process");
                        tokio::time::sleep(delay).await;
                    }
                    Disposition::Permanent => break Err(e),
                    Disposition::Auth => {
                        self.record_attempts(
                            &key,
                            &valid,
                            attempts_before.saturating_add(attempts_here),
                        )?;
                        tracing::error!(error = %e, "auth failure: requeueing and pausing consumption");
                        metrics().outcome("requeued_auth");
                        self.auth.trip();
                        return Ok(Settle::Requeue);
                    }
                },
            }
        };
        let attempts = attempts_before.saturating_add(attempts_here);
        match outcome {
            Ok(created) => self.succeed(&valid, created, attempts, started, ch).await,
            Err(e) if e.disposition() == Disposition::Permanent => {
                self.fail(
                    delivery,
                    ch,
                    &valid,
                    reason::PERMANENT_API_ERROR,
                    &e,
                    attempts,
                    started,
                )
                .await
            }
            Err(e) => {
                self.retry_later(delivery, ch, &valid, &e, attempts, started)
                    .await
            }
        }
    }

    fn record_attempts(
        &self,
        key: &str,
        valid: &ValidRequest,
        attempts: u32,
    ) -> Result<(), StoreError> {
        if let Some(mut rec) = self.store.get(key)? {
            if rec.fingerprint == valid.fingerprint {
                rec.attempts = attempts;
                rec.updated_at_ms = now_ms();
                self.store.put(key, &rec)?;
            }
        }
        Ok(())
    }

    fn audit(&self, valid: Option<&ValidRequest>, outcome: &str) -> AuditEntry {
        AuditEntry {
            timestamp: crate::event::now_rfc3339(),
            event_type: "session_init".into(),
            idempotency_key: valid.map(|v| v.idempotency_key.clone()),
            visitor_id: valid.map(|v| v.request.visitor_id.clone()),
            queue_id: valid.map(|v| v.request.queue_id.clone()),
            bot_score: valid.and_then(|v| v.request.bot_score),
            outcome: outcome.into(),
            worker_id: self.worker_id.clone(),
            ..Default::default()
        }
    }

    async fn succeed(
        &self,
        valid: &ValidRequest,
        created: SessionCreated,
        attempts: u32,
        started: Instant,
        ch: &Channel,
    ) -> Result<Settle, WorkerError> {
        let span = tracing::Span::current();
        span.record("conversation_id", created.conversation_id.as_str());
        if let Some(c) = &created.correlation_id {
            span.record("correlation_id", c.as_str());
        }
        self.auth.streak.store(0, Ordering::Relaxed);
        let key = &valid.idempotency_key;
        let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut event = ResultEvent::new(
            EventKind::SessionStarted,
            key,
            &valid.request.visitor_id,
            &valid.request.queue_id,
        );
        event.conversation_id = Some(created.conversation_id.clone());
        event.latency_ms = round_ms(latency_ms);
        event.attempts = attempts;
        let now = now_ms();
        self.store.put(
            key,
            &IdemRecord {
                state: IdemState::Completed,
                fingerprint: valid.fingerprint.clone(),
                attempts,
                conversation_id: Some(created.conversation_id.clone()),
                event: Some(event.clone()),
                worker_id: self.worker_id.clone(),
                created_at_ms: now,
                updated_at_ms: now,
            },
        )?;
        let mut entry = self.audit(Some(valid), "started");
        entry.http_status = Some(created.status);
        entry.conversation_id = Some(created.conversation_id.clone());
        entry.correlation_id = created.correlation_id.clone();
        entry.latency_ms = Some(round_ms(created.latency.as_secs_f64() * 1000.0));
        entry.attempts = Some(attempts);
        self.store.append_audit(&entry)?;
        self.store.durable().await?;
        self.publish_event(ch, &event).await?;
        tracing::info!(attempts, latency_ms = event.latency_ms, "session created");
        let m = metrics();
        m.outcome("started");
        if let Some(a) = created.rate_limit.allowed {
            m.genesys_ratelimit_allowed.set(a as i64);
        }
        if let Some(c) = created.rate_limit.count {
            m.genesys_ratelimit_count.set(c as i64);
        }
        Ok(Settle::Ack)
    }

    async fn replay_completed(
        &self,
        valid: &ValidRequest,
        rec: IdemRecord,
        ch: &Channel,
    ) -> Result<Settle, WorkerError> {
        let event = rec.event.unwrap_or_else(|| {
            let mut e = ResultEvent::new(
                EventKind::SessionStarted,
                &valid.idempotency_key,
                &valid.request.visitor_id,
                &valid.request.queue_id,
            );
            e.conversation_id = rec.conversation_id.clone();
            e.attempts = rec.attempts;
            e
        });
        let mut entry = self.audit(Some(valid), "duplicate");
        entry.conversation_id = event.conversation_id.clone();
        entry.attempts = Some(rec.attempts);
        self.store.append_audit(&entry)?;
        self.store.durable().await?;
        self.publish_event(ch, &event).await?;
        tracing::info!(conversation_id = ?event.conversation_id, "already completed: re-published the stored event, no API call");
        metrics().outcome("duplicate");
        metrics().idempotent_replays.inc();
        Ok(Settle::Ack)
    }

    async fn reject_invalid(
        &self,
        delivery: &Delivery,
        ch: &Channel,
        err: ValidationError,
        message_id: Option<String>,
    ) -> Result<Settle, WorkerError> {
        // Best effort to say who the request was for, from whatever parses.
        let loose: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        let field = |k: &str| {
            loose
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string()
        };
        let key = message_id.unwrap_or_else(|| request::sha256_hex(&delivery.data));
        tracing::Span::current().record("idempotency_key", key.as_str());
        let detail = err.to_string();
        let mut event = ResultEvent::new(
            EventKind::SessionRejected,
            &key,
            &field("visitor_id"),
            &field("queue_id"),
        );
        event.error = Some(EventError {
            reason: reason::INVALID_REQUEST.into(),
            status: None,
            message: detail.clone(),
        });
        let mut entry = self.audit(None, reason::INVALID_REQUEST);
        entry.idempotency_key = Some(key);
        entry.visitor_id = Some(event.visitor_id.clone()).filter(|v| !v.is_empty());
        entry.queue_id = Some(event.queue_id.clone()).filter(|v| !v.is_empty());
        entry.detail = Some(detail.clone());
        entry.attempts = Some(0);
        self.store.append_audit(&entry)?;
        self.store.durable().await?;
        self.publish_event(ch, &event).await?;
        self.dead_letter_request(ch, delivery, reason::INVALID_REQUEST, &detail, None, 0)
            .await?;
        tracing::warn!(detail = %detail, "invalid request dead-lettered");
        metrics().outcome(reason::INVALID_REQUEST);
        metrics().dead_letter(reason::INVALID_REQUEST);
        Ok(Settle::Ack)
    }

    async fn reject_conflict(
        &self,
        delivery: &Delivery,
        ch: &Channel,
        valid: &ValidRequest,
        existing: IdemRecord,
    ) -> Result<Settle, WorkerError> {
        let detail = format!(
            "idempotency key {:?} was already used with a different body (state {:?}); use a new key for a new request",
            valid.idempotency_key, existing.state
        );
        let mut event = ResultEvent::new(
            EventKind::SessionRejected,
            &valid.idempotency_key,
            &valid.request.visitor_id,
            &valid.request.queue_id,
        );
        event.error = Some(EventError {
            reason: reason::IDEMPOTENCY_CONFLICT.into(),
            status: None,
            message: detail.clone(),
        });
        let mut entry = self.audit(Some(valid), reason::IDEMPOTENCY_CONFLICT);
        entry.detail = Some(detail.clone());
        self.store.append_audit(&entry)?;
        self.store.durable().await?;
        self.publish_event(ch, &event).await?;
        self.dead_letter_request(ch, delivery, reason::IDEMPOTENCY_CONFLICT, &detail, None, 0)
            .await?;
        tracing::warn!("idempotency conflict dead-lettered");
        metrics().outcome(reason::IDEMPOTENCY_CONFLICT);
        metrics().dead_letter(reason::IDEMPOTENCY_CONFLICT);
        Ok(Settle::Ack)
    }

    #[allow(clippy::too_many_arguments)]
    async fn fail(
        &self,
        delivery: &Delivery,
        ch: &Channel,
        valid: &ValidRequest,
        why: &str,
        err: &GenesysError,
        attempts: u32,
        started: Instant,
    ) -> Result<Settle, WorkerError> {
        let key = &valid.idempotency_key;
        let detail = err.to_string();
        if let Some(c) = err.correlation_id() {
            tracing::Span::current().record("correlation_id", c);
        }
        let mut event = ResultEvent::new(
            EventKind::SessionFailed,
            key,
            &valid.request.visitor_id,
            &valid.request.queue_id,
        );
        event.latency_ms = round_ms(started.elapsed().as_secs_f64() * 1000.0);
        event.attempts = attempts;
        event.error = Some(EventError {
            reason: why.into(),
            status: err.status(),
            message: detail.clone(),
        });
        let now = now_ms();
        self.store.put(
            key,
            &IdemRecord {
                state: IdemState::Failed,
                fingerprint: valid.fingerprint.clone(),
                attempts,
                conversation_id: None,
                event: Some(event.clone()),
                worker_id: self.worker_id.clone(),
                created_at_ms: now,
                updated_at_ms: now,
            },
        )?;
        let mut entry = self.audit(Some(valid), why);
        entry.http_status = err.status();
        entry.correlation_id = err.correlation_id().map(str::to_string);
        entry.attempts = Some(attempts);
        entry.latency_ms = Some(event.latency_ms);
        entry.detail = Some(detail.clone());
        self.store.append_audit(&entry)?;
        self.store.durable().await?;
        self.publish_event(ch, &event).await?;
        self.dead_letter_request(ch, delivery, why, &detail, err.status(), attempts)
            .await?;
        tracing::warn!(reason = why, attempts, error = %detail, "request dead-lettered");
        metrics().outcome(why);
        metrics().dead_letter(why);
        Ok(Settle::Ack)
    }

    /// Retryable failure after the in-process attempts: the next delayed-retry queue, or the DLQ.
    async fn retry_later(
        &self,
        delivery: &Delivery,
        ch: &Channel,
        valid: &ValidRequest,
        err: &GenesysError,
        attempts: u32,
        started: Instant,
    ) -> Result<Settle, WorkerError> {
        let props = &delivery.properties;
        let delayed = header_i64(props, header::DELAYED_RETRIES)
            .unwrap_or(0)
            .max(0) as usize;
        let Some(delay) = self.settings.amqp.retry_delays.get(delayed) else {
            return self
                .fail(
                    delivery,
                    ch,
                    valid,
                    reason::RETRIES_EXHAUSTED,
                    err,
                    attempts,
                    started,
                )
                .await;
        };
        self.record_attempts(&valid.idempotency_key, valid, attempts)?;
        let mut entry = self.audit(Some(valid), "retry_scheduled");
        entry.http_status = err.status();
        entry.attempts = Some(attempts);
        entry.detail = Some(format!(
            "{err}; retrying in {}",
            crate::config::format_duration(*delay)
        ));
        self.store.append_audit(&entry)?;
        self.store.durable().await?;
        let queue = topology::retry_queue_name(&self.settings.amqp, *delay);
        let properties = amqp::with_headers(
            props,
            vec![
                (header::ATTEMPTS, int(i64::from(attempts))),
                (header::DELAYED_RETRIES, int(delayed as i64 + 1)),
                (header::LAST_ERROR, text(truncate(&err.to_string()))),
            ],
        );
        amqp::publish_routed(ch, "", &queue, &delivery.data, properties).await?;
        tracing::info!(attempts, retry_queue = %queue, error = %err, "scheduled a delayed retry");
        metrics().outcome("retry_scheduled");
        metrics().retry("delayed");
        Ok(Settle::Ack)
    }

    async fn publish_event(&self, ch: &Channel, event: &ResultEvent) -> Result<(), AmqpError> {
        let props = amqp::json_properties()
            .with_message_id(event.event_id.as_str().into())
            .with_timestamp(now_ms() / 1000)
            .with_type(event.event.as_str().into());
        amqp::publish_confirmed(
            ch,
            &self.settings.amqp.results_exchange,
            event.event.routing_key(),
            &event.to_json(),
            props,
        )
        .await
    }
}

impl Worker {
    /// Dead-letter a session request to `amqp.dead_letter_queue`.
    async fn dead_letter_request(
        &self,
        ch: &Channel,
        delivery: &Delivery,
        why: &str,
        detail: &str,
        status: Option<u16>,
        attempts: u32,
    ) -> Result<(), AmqpError> {
        let a = &self.settings.amqp;
        let failure = amqp::Failure {
            reason: why,
            detail,
            status,
            attempts,
            worker_id: &self.worker_id,
        };
        amqp::dead_letter(
            ch,
            &a.dead_letter_exchange,
            &a.dead_letter_queue,
            delivery,
            &failure,
        )
        .await
    }
}

async fn prune_loop(store: Store, audit_retention: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(600));
    loop {
        tick.tick().await;
        let s = store.clone();
        match tokio::task::spawn_blocking(move || s.prune(audit_retention)).await {
            Ok(Ok((records, entries))) if records + entries > 0 => {
                tracing::info!(
                    records,
                    audit_entries = entries,
                    "pruned expired idempotency records and audit entries"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "pruning the store failed"),
            Err(e) => tracing::error!(error = %e, "pruning task failed"),
        }
    }
}

fn round_ms(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// Header values are kept short: AMQP headers travel with every copy of the message.
fn truncate(s: &str) -> String {
    crate::genesys::error::truncate(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn key_locks_serialize_and_clean_up() {
        let locks = Arc::new(KeyLocks::default());
        let g = locks.lock("a").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a").await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        // Another key is not blocked.
        drop(locks.lock("b").await);
        drop(g);
        waiter.await.unwrap();
        assert!(locks.is_empty());
    }
}
