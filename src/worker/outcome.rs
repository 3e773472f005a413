//! Stage 4, finish: every way a delivery can end is one [`Outcome`], and [`Recorder::finish`]
//! is the single path that turns it into effects, always in the same order:
//!
//! 1. the idempotency record and the audit entry are written to sled;
//! 2. the store is made durable (group commit);
//! 3. the result event is published with confirm (while the fleet ledger is told the
//!    outcome, when this delivery holds a fleet claim; the ack waits for both);
//! 4. the delivery is routed: dead-lettered, sent to a delayed-retry queue, or nothing;
//! 5. the outcome is logged and counted (`internal_events`), once;
//! 6. the verdict goes back to the consume loop, which acks or requeues.
//!
//! A crash between any two steps loses nothing: the delivery is unacked until step 6.

use super::intake::Job;
use super::permit::CallPermit;
use crate::amqp::consumer::Settle;
use crate::amqp::{self, header, header_i64, int, text, topology, AmqpError, DeadLetters, Failure};
use crate::config::Settings;
use crate::event::{EventError, EventKind, Reason, ResultEvent};
use crate::fleet::record::OutcomeRecord;
use crate::fleet::{Fleet, FleetError};
use crate::genesys::{GenesysError, SessionCreated};
use crate::internal_events;
use crate::request::{ValidRequest, ValidationError};
use crate::shutdown::Shutdown;
use crate::store::{now_ms, AuditEntry, FleetClaim, IdemRecord, IdemState, Store, StoreError};
use lapin::Channel;
use std::sync::Arc;

/// How one delivery ended.
pub enum Outcome {
    /// Genesys created the session.
    Started(SessionCreated),
    /// The key was finished before: re-publish its stored event, no API call.
    Replayed(IdemRecord),
    /// The body did not validate.
    Invalid(ValidationError),
    /// The key was used before with another body.
    Conflict(IdemRecord),
    /// Genesys refused the request for good.
    Rejected(GenesysError),
    /// Retryable failures used up the in-process attempts: a delayed retry, or dead-lettered
    /// once the delayed retries are used up too.
    Retryable(GenesysError),
    /// Genesys refused the credentials: requeue; the consume loop pauses.
    AuthRefused(GenesysError),
    /// Another pod holds a live claim on the key: park the copy (no call, no consumer slot
    /// held) until that pod's outcome is in the ledger, then it replays.
    Parked(FleetClaim),
    /// Shutdown came before the call was sent: give the claim back and requeue.
    Abandoned,
    /// The call was sent and no usable answer came: the key is `unknown`, dead-lettered
    /// `outcome_unknown`, never re-sent by itself.
    Unknown(GenesysError),
    /// Delivered this many times without being finished: dead-lettered `poison_message`.
    Poison(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum FinishError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Amqp(#[from] AmqpError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
}

/// Tries of a held outcome's write that fails while the store does not report a failure.
const HOLD_RETRIES: u32 = 5;

/// Writes outcomes: owns the store, the results exchange and the dead-letter target.
pub struct Recorder {
    pub settings: Arc<Settings>,
    pub store: Store,
    pub worker_id: String,
    pub dead_letters: DeadLetters,
    pub fleet: Arc<Fleet>,
}

/// Where a finished delivery goes after its outcome is recorded.
enum Route {
    Ack,
    Requeue,
    DeadLetter {
        reason: Reason,
        detail: String,
        status: Option<u16>,
        correlation_id: Option<String>,
        /// `x-attempts` on the dead letter: API attempts made (0 when none could be).
        attempts: u32,
    },
    DelayedRetry {
        queue: String,
        delayed: usize,
        error: String,
    },
    /// Back through the first delayed-retry queue, not counted as a retry.
    Park {
        queue: String,
        holder: String,
    },
    /// A fresh copy to the inbound queue, then ack: a requeue that does not count towards the
    /// broker's `x-delivery-count` (auth pauses and shutdowns are not the message's fault).
    Republish,
}

/// What finishing one outcome writes and sends.
struct Plan {
    /// The idempotency record's new state (with the event), if it changes.
    record: Option<IdemState>,
    /// Keep the attempts made so far on the existing record.
    keep_attempts: bool,
    audit: Option<AuditEntry>,
    event: Option<ResultEvent>,
    route: Route,
}

impl Recorder {
    /// Record, publish and route one outcome; the verdict settles the delivery.
    pub async fn finish(
        &self,
        job: &Job,
        valid: Option<&ValidRequest>,
        outcome: Outcome,
        permit: Option<CallPermit<'_>>,
        ch: &Channel,
        shutdown: &Shutdown,
    ) -> Result<Settle, FinishError> {
        let span = tracing::Span::current();
        if let Outcome::Started(created) = &outcome {
            span.record("conversation_id", created.conversation_id.as_str());
            if let Some(c) = &created.correlation_id {
                span.record("correlation_id", c.as_str());
            }
        }
        if let Some(c) = error_of(&outcome).and_then(GenesysError::correlation_id) {
            span.record("correlation_id", c);
        }
        let plan = self.plan(job, &outcome);
        let record = match (plan.record, valid) {
            (Some(state), Some(valid)) => Some(self.record(job, valid, state, &outcome, &plan)),
            _ => None,
        };
        // An answered outcome as JSON, made once for the store and the fleet ledger alike.
        let json = match (&record, &plan.audit) {
            (Some(record), Some(entry)) => Some(OutcomeRecord::new(&job.key, record, entry)),
            _ => None,
        };

        // 1. Record, 2. durable before anything leaves the process; meanwhile the fleet
        // ledger is told the outcome (the two wait on different disks, so neither waits for
        // the other; an answered outcome is told to the fleet whatever the store does).
        let tell = async {
            match (&job.held, &json) {
                (Some(_), Some(json)) => Some(self.fleet.outcome(ch, json.clone(), false).await),
                _ => None,
            }
        };
        let to_write = record.as_ref();
        // 3 (while the fleet is told): once the outcome is durable, its event may leave. The
        // ack still waits for both; the claim and the outcome are the ledger's two round trips
        // per request, and this one no longer adds to a request's time in hand.
        let telling = job.held.is_some() && json.is_some();
        // Kept until the answer is durable: while the store fails, an answered outcome held
        // in memory keeps its call's place, so no more calls are answered than the permits.
        let mut permit = permit;
        let write_then_publish = async {
            let written = self.write(job, valid, &plan, to_write, json.as_ref()).await;
            if written.is_ok() {
                // The answer is durable: a SIGKILL from here on cannot lead to a second
                // call, so the permit goes to the next call (`Caller::permit`).
                drop(permit.take());
                if let (true, Some(record)) = (telling, &record) {
                    self.fleet.stored(&job.key, record.updated_at_ms);
                }
            }
            let published = match (&written, &plan.event) {
                (Ok(()), Some(event)) if telling => Some(self.publish_event(ch, event).await),
                _ => None,
            };
            (written, published)
        };
        let ((mut written, published), told) = tokio::join!(write_then_publish, tell);
        let mut told_fleet = match told {
            Some(Ok(())) => true,
            Some(Err(fe)) if written.is_ok() => return Err(fe.into()),
            Some(Err(fe)) => {
                tracing::error!(error = %fe, "cannot tell the fleet ledger the held outcome either");
                false
            }
            None => false,
        };
        let mut held = false;
        let mut other_errors = 0u32;
        while let Err(e) = written {
            let Some(answered) = &json else {
                // Nothing answered to keep: the delivery goes back while the store heals.
                return self.defer(job, ch, &e).await;
            };
            // Genesys answered (or may have): never throw that away for a redelivery to
            // repeat the call. Tell the fleet first (the ledger is on the broker), then hold
            // the outcome until the store takes it.
            if !told_fleet {
                if let Some(claim) = &job.held {
                    match self.fleet.outcome(ch, answered.clone(), false).await {
                        Ok(()) => told_fleet = true,
                        Err(fe) => {
                            tracing::error!(error = %fe, claim_id = %claim.claim_id, "cannot tell the fleet ledger the held outcome either")
                        }
                    }
                }
            }
            if !held {
                internal_events::outcome_held(&e, told_fleet);
                held = true;
            }
            if self.store.failure().is_none() {
                // Not a failure the store heals (a reopen raced the write, or an error that
                // is not I/O): try again at a pace, and after a few tries hand the delivery
                // back to the shell (logged, counted, requeued; the ledger has the outcome).
                other_errors += 1;
                if other_errors > HOLD_RETRIES {
                    internal_events::outcome_released();
                    return Err(e.into());
                }
                tokio::time::sleep(crate::store::HEAL_EVERY).await;
                written = self.write(job, valid, &plan, to_write, json.as_ref()).await;
                continue;
            }
            let mut waiting = shutdown.clone();
            if !self.store.writable(&mut waiting).await {
                // Shutting down with the store still failing. The ledger holds the outcome,
                // so the redelivery replays it on whichever pod takes it.
                internal_events::outcome_released();
                tracing::warn!(in_ledger = told_fleet, "shutdown while holding an answered outcome; the delivery goes back and its redelivery replays the outcome from the fleet ledger");
                return Ok(Settle::Requeue);
            }
            written = self.write(job, valid, &plan, to_write, json.as_ref()).await;
        }
        if held {
            internal_events::outcome_released();
        }
        // 2b. Tell the fleet: the key's outcome, or the claim given back.
        if let Some(claim) = &job.held {
            match &json {
                Some(json) if !told_fleet => self.fleet.outcome(ch, json.clone(), true).await?,
                Some(_) => {}
                None => self.fleet.release(ch, &job.key, claim).await?,
            }
        }
        // 3. Publish the result event (unless it left while the fleet was told).
        match (published, &plan.event) {
            (Some(sent), _) => sent?,
            (None, Some(event)) => self.publish_event(ch, event).await?,
            (None, None) => {}
        }
        // 4. Route, 5. tell.
        let settle = match plan.route {
            Route::Ack => {
                match &outcome {
                    Outcome::Started(created) => internal_events::session_started(
                        job.attempts,
                        plan.event.as_ref().map_or(0.0, |e| e.latency_ms),
                        created.rate_limit.allowed,
                        created.rate_limit.count,
                    ),
                    _ => internal_events::session_replayed(
                        plan.event
                            .as_ref()
                            .and_then(|e| e.conversation_id.as_deref()),
                    ),
                }
                Settle::Ack
            }
            Route::Requeue => Settle::Requeue,
            Route::Republish => {
                self.republish_fresh(job, ch).await?;
                match error_of(&outcome) {
                    Some(e) => internal_events::auth_refused(&e.to_string()),
                    None => internal_events::session_abandoned(),
                }
                Settle::Ack
            }
            Route::Park { queue, holder } => {
                amqp::publish_routed(
                    ch,
                    "",
                    &queue,
                    &job.delivery.data,
                    amqp::without_headers(&job.delivery.properties, &["x-delivery-count"]),
                )
                .await?;
                internal_events::session_parked(&holder, &queue);
                Settle::Ack
            }
            Route::DeadLetter {
                reason,
                detail,
                status,
                correlation_id,
                attempts,
            } => {
                let failure = Failure {
                    reason,
                    detail: &detail,
                    status,
                    attempts,
                    correlation_id: correlation_id.as_deref(),
                };
                self.dead_letters.send(ch, &job.delivery, &failure).await?;
                internal_events::session_dead_lettered(reason, attempts, &detail);
                if reason == Reason::OutcomeUnknown {
                    internal_events::unknown_outcome(&detail);
                }
                Settle::Ack
            }
            Route::DelayedRetry {
                queue,
                delayed,
                error,
            } => {
                let properties = amqp::with_headers(
                    &amqp::without_headers(&job.delivery.properties, &["x-delivery-count"]),
                    vec![
                        (header::ATTEMPTS, int(i64::from(job.attempts))),
                        (header::DELAYED_RETRIES, int(delayed as i64 + 1)),
                        (header::LAST_ERROR, text(crate::text::truncate(&error))),
                    ],
                );
                amqp::publish_routed(ch, "", &queue, &job.delivery.data, properties).await?;
                internal_events::session_retry_scheduled(job.attempts, &queue, &error);
                Settle::Ack
            }
        };
        Ok(settle)
    }

    /// The idempotency record an outcome leaves.
    fn record(
        &self,
        job: &Job,
        valid: &ValidRequest,
        state: IdemState,
        outcome: &Outcome,
        plan: &Plan,
    ) -> IdemRecord {
        let now = now_ms();
        IdemRecord {
            state,
            fingerprint: valid.fingerprint.clone(),
            attempts: job.attempts,
            conversation_id: match outcome {
                Outcome::Started(c) => Some(c.conversation_id.clone()),
                _ => None,
            },
            event: plan.event.clone(),
            worker_id: self.worker_id.clone(),
            created_at_ms: now,
            updated_at_ms: now,
        }
    }

    /// Write what the plan records, and wait until it is durable. A store reopened meanwhile
    /// (after a failure) may have lost the first writes: that counts as a failure, so the
    /// caller writes again.
    async fn write(
        &self,
        job: &Job,
        valid: Option<&ValidRequest>,
        plan: &Plan,
        record: Option<&IdemRecord>,
        json: Option<&OutcomeRecord>,
    ) -> Result<(), StoreError> {
        let generation = self.store.generation();
        match (record, json) {
            (_, Some(json)) => self.store.put_json(&job.key, json.record.text())?,
            (Some(record), None) => self.store.put(&job.key, record)?,
            (None, None) => {}
        }
        if let (true, Some(valid)) = (plan.keep_attempts, valid) {
            self.store
                .record_attempts(&job.key, &valid.fingerprint, job.attempts)?;
        }
        if let Some(entry) = &plan.audit {
            match json {
                Some(json) => self.store.append_audit_json(json.audit.text())?,
                None => self.store.append_audit(entry)?,
            }
            self.store.durable().await?;
        }
        if self.store.generation() != generation {
            return Err(StoreError::Io(
                "the store was reopened while this outcome was written".into(),
            ));
        }
        Ok(())
    }

    /// The store fails and nothing answered needs keeping: give the fleet claim back and put a
    /// fresh copy of the delivery back on the queue (not counted as a redelivery).
    pub async fn defer(
        &self,
        job: &Job,
        ch: &Channel,
        error: &StoreError,
    ) -> Result<Settle, FinishError> {
        if let Some(claim) = &job.held {
            self.fleet.release(ch, &job.key, claim).await?;
        }
        self.republish_fresh(job, ch).await?;
        internal_events::session_deferred(error);
        Ok(Settle::Ack)
    }

    /// A fresh copy of the delivery to the inbound queue (then the caller acks it): a requeue
    /// that does not count towards `x-delivery-count`, for pauses that are not the message's
    /// fault (auth, shutdown, a failing store).
    async fn republish_fresh(&self, job: &Job, ch: &Channel) -> Result<(), AmqpError> {
        let properties = amqp::without_headers(&job.delivery.properties, &["x-delivery-count"]);
        amqp::publish_routed(
            ch,
            "",
            &self.settings.amqp.inbound_queue,
            &job.delivery.data,
            properties,
        )
        .await
    }

    /// Decide what an outcome writes and where the delivery goes. No effects.
    fn plan(&self, job: &Job, outcome: &Outcome) -> Plan {
        let audit = |outcome: &str| self.audit_entry(job, outcome);
        let event = |kind: EventKind| {
            let mut e = ResultEvent::new(kind, &job.key, &job.visitor_id, &job.queue_id);
            e.latency_ms = job.latency_ms();
            e.attempts = job.attempts;
            e
        };
        match outcome {
            Outcome::Started(created) => {
                let mut ev = event(EventKind::SessionStarted);
                ev.conversation_id = Some(created.conversation_id.clone());
                let mut entry = audit("started");
                entry.http_status = Some(created.status);
                entry.conversation_id = Some(created.conversation_id.clone());
                entry.correlation_id = created.correlation_id.clone();
                entry.message_id = created.message_id.clone();
                entry.latency_ms = Some(super::intake::round_ms(
                    created.latency.as_secs_f64() * 1000.0,
                ));
                entry.attempts = Some(job.attempts);
                Plan {
                    record: Some(IdemState::Completed),
                    keep_attempts: false,
                    audit: Some(entry),
                    event: Some(ev),
                    route: Route::Ack,
                }
            }
            Outcome::Replayed(rec) => {
                let ev = rec.event.clone().unwrap_or_else(|| {
                    let mut e = ResultEvent::new(
                        EventKind::SessionStarted,
                        &job.key,
                        &job.visitor_id,
                        &job.queue_id,
                    );
                    e.conversation_id = rec.conversation_id.clone();
                    e.attempts = rec.attempts;
                    e
                });
                let mut entry = audit("duplicate");
                entry.conversation_id = ev.conversation_id.clone();
                entry.attempts = Some(rec.attempts);
                Plan {
                    record: None,
                    keep_attempts: false,
                    audit: Some(entry),
                    event: Some(ev),
                    route: Route::Ack,
                }
            }
            Outcome::Invalid(err) => {
                self.rejection(job, Reason::InvalidRequest, err.to_string(), Some(0))
            }
            Outcome::Conflict(existing) => {
                let detail = format!(
                    "idempotency key {:?} was already used with a different body (state {:?}); use a new key for a new request",
                    job.key, existing.state
                );
                self.rejection(job, Reason::IdempotencyConflict, detail, None)
            }
            Outcome::Rejected(err) => self.failure(job, Reason::PermanentApiError, err),
            Outcome::Unknown(err) => {
                let mut plan = self.failure(job, Reason::OutcomeUnknown, err);
                plan.record = Some(IdemState::Unknown);
                plan
            }
            Outcome::Retryable(err) => {
                let delayed = header_i64(&job.delivery.properties, header::DELAYED_RETRIES)
                    .unwrap_or(0)
                    .max(0) as usize;
                let Some(delay) = self.settings.amqp.retry_delays.get(delayed) else {
                    return self.failure(job, Reason::RetriesExhausted, err);
                };
                let mut entry = audit("retry_scheduled");
                entry.http_status = err.status();
                entry.attempts = Some(job.attempts);
                entry.detail = Some(format!(
                    "{err}; retrying in {}",
                    crate::config::format_duration(*delay)
                ));
                Plan {
                    record: None,
                    keep_attempts: true,
                    audit: Some(entry),
                    event: None,
                    route: Route::DelayedRetry {
                        queue: topology::retry_queue_name(&self.settings.amqp, *delay),
                        delayed,
                        error: err.to_string(),
                    },
                }
            }
            Outcome::AuthRefused(_) | Outcome::Abandoned => Plan {
                record: None,
                keep_attempts: true,
                audit: None,
                event: None,
                route: Route::Republish,
            },
            Outcome::Poison(deliveries) => {
                let detail = format!(
                    "delivered {deliveries} times without being finished (worker.max_redeliveries = {}); the failures are in the workers' logs and delivery_errors_total",
                    self.settings.worker.max_redeliveries
                );
                let mut plan = self.rejection(job, Reason::PoisonMessage, detail, None);
                if let Some(ev) = plan.event.as_mut() {
                    ev.event = EventKind::SessionFailed;
                    ev.event_id = crate::event::event_id(&job.key, EventKind::SessionFailed);
                }
                plan
            }
            Outcome::Parked(holder) => Plan {
                record: None,
                keep_attempts: false,
                audit: None,
                event: None,
                route: match self.settings.amqp.retry_delays.first() {
                    Some(delay) => Route::Park {
                        queue: topology::retry_queue_name(&self.settings.amqp, *delay),
                        holder: holder.worker_id.clone(),
                    },
                    // No delayed-retry queue to park in: requeue after the pause.
                    None => Route::Requeue,
                },
            },
        }
    }

    /// A request refused before any API call: a `session.rejected` event and a dead letter.
    fn rejection(&self, job: &Job, reason: Reason, detail: String, attempts: Option<u32>) -> Plan {
        let ev = error_event(job, EventKind::SessionRejected, reason, None, &detail);
        let mut entry = self.audit_entry(job, reason.as_str());
        entry.detail = Some(detail.clone());
        entry.attempts = attempts;
        Plan {
            record: None,
            keep_attempts: false,
            audit: Some(entry),
            event: Some(ev),
            route: Route::DeadLetter {
                reason,
                detail,
                status: None,
                correlation_id: None,
                attempts: 0,
            },
        }
    }

    /// A request Genesys failed: the key is `failed`, a `session.failed` event, a dead letter.
    fn failure(&self, job: &Job, reason: Reason, err: &GenesysError) -> Plan {
        let detail = err.to_string();
        let mut ev = error_event(job, EventKind::SessionFailed, reason, err.status(), &detail);
        ev.latency_ms = job.latency_ms();
        ev.attempts = job.attempts;
        let mut entry = self.audit_entry(job, reason.as_str());
        entry.http_status = err.status();
        entry.correlation_id = err.correlation_id().map(str::to_string);
        entry.attempts = Some(job.attempts);
        entry.latency_ms = Some(ev.latency_ms);
        entry.detail = Some(detail.clone());
        Plan {
            record: Some(IdemState::Failed),
            keep_attempts: false,
            audit: Some(entry),
            event: Some(ev),
            route: Route::DeadLetter {
                reason,
                detail,
                status: err.status(),
                correlation_id: err.correlation_id().map(str::to_string),
                attempts: job.attempts,
            },
        }
    }

    fn audit_entry(&self, job: &Job, outcome: &str) -> AuditEntry {
        AuditEntry {
            timestamp: crate::event::now_rfc3339(),
            event_type: "session_init".into(),
            idempotency_key: Some(job.key.clone()),
            visitor_id: Some(job.visitor_id.clone()).filter(|v| !v.is_empty()),
            queue_id: Some(job.queue_id.clone()).filter(|v| !v.is_empty()),
            bot_score: job.bot_score,
            outcome: outcome.into(),
            worker_id: self.worker_id.clone(),
            ..Default::default()
        }
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

/// A `session.rejected` or `session.failed` event carrying its reason.
fn error_event(
    job: &Job,
    kind: EventKind,
    reason: Reason,
    status: Option<u16>,
    detail: &str,
) -> ResultEvent {
    let mut ev = ResultEvent::new(kind, &job.key, &job.visitor_id, &job.queue_id);
    ev.error = Some(EventError {
        reason: reason.as_str().into(),
        status,
        message: detail.to_string(),
    });
    ev
}

fn error_of(outcome: &Outcome) -> Option<&GenesysError> {
    match outcome {
        Outcome::Rejected(e)
        | Outcome::Retryable(e)
        | Outcome::AuthRefused(e)
        | Outcome::Unknown(e) => Some(e),
        _ => None,
    }
}
