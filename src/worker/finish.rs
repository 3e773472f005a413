//! Stage 4, finish: [`Recorder::finish`] is the single path that turns an [`Outcome`] into
//! effects, in stages, always in this order:
//!
//! 1. **persist**: the [`Plan`]'s idempotency record and audit entry are written to sled and
//!    made durable (a group commit), while the fleet ledger is told the outcome when this
//!    delivery holds a fleet claim; once durable, the call permit goes and the result event may
//!    leave. A store that fails holds an answered outcome until it takes it ([`Recorder::until_durable`]);
//! 2. **tell** the fleet what it was not told yet: the outcome, or the claim given back;
//! 3. **route**: the result event is published with confirm (if it has not left), then the
//!    delivery is acked, dead-lettered, parked, sent to a delayed-retry queue or re-published,
//!    and the outcome is logged and counted (`internal_events`), once.
//!
//! The verdict goes back to the consume loop, which acks or requeues. A crash between any two
//! steps loses nothing: the delivery is unacked until then.

use super::intake::Job;
use super::outcome::Outcome;
use super::permit::CallPermit;
use super::plan::{Plan, Planner, Route};
use crate::amqp::consumer::Settle;
use crate::amqp::{self, header, int, text, AmqpError, DeadLetters, Failure};
use crate::config::Settings;
use crate::event::{Reason, ResultEvent};
use crate::fleet::record::OutcomeRecord;
use crate::fleet::{Fleet, FleetError};
use crate::genesys::GenesysError;
use crate::internal_events;
use crate::request::ValidRequest;
use crate::shutdown::Shutdown;
use crate::store::{now_ms, IdemRecord, IdemState, Store, StoreError};
use lapin::Channel;
use std::sync::Arc;

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

/// One outcome on its way to the store: what [`Recorder::write`] writes, kept together through
/// the stages.
#[derive(Clone, Copy)]
struct Writing<'a> {
    job: &'a Job,
    valid: Option<&'a ValidRequest>,
    plan: &'a Plan,
    record: Option<&'a IdemRecord>,
    /// The answered outcome as JSON, made once for the store and the fleet ledger alike.
    json: Option<&'a OutcomeRecord>,
}

/// What stage 1 left: the write's result, the event if it left meanwhile, and whether the
/// fleet ledger has the outcome.
struct Persisted {
    written: Result<(), StoreError>,
    published: Option<Result<(), AmqpError>>,
    told_fleet: bool,
}

/// After [`Recorder::until_durable`]: the outcome is durable (go on), or the delivery is
/// settled already.
enum Durable {
    Yes {
        published: Option<Result<(), AmqpError>>,
        told_fleet: bool,
    },
    Settled(Settle),
}

impl Recorder {
    fn planner(&self) -> Planner<'_> {
        Planner {
            settings: &self.settings,
            worker_id: &self.worker_id,
        }
    }

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
        note_ids(&outcome);
        let plan = self.planner().plan(job, &outcome);
        let record = match (plan.record, valid) {
            (Some(state), Some(valid)) => Some(self.record(job, valid, state, &outcome, &plan)),
            _ => None,
        };
        let json = match (&record, &plan.audit) {
            (Some(record), Some(entry)) => Some(OutcomeRecord::new(&job.key, record, entry)),
            _ => None,
        };
        let w = Writing {
            job,
            valid,
            plan: &plan,
            record: record.as_ref(),
            json: json.as_ref(),
        };
        let persisted = self.persist(w, permit, ch).await?;
        let (published, told_fleet) = match self.until_durable(w, persisted, ch, shutdown).await? {
            Durable::Yes {
                published,
                told_fleet,
            } => (published, told_fleet),
            Durable::Settled(settle) => return Ok(settle),
        };
        self.tell_fleet(job, json.as_ref(), told_fleet).await?;
        match (published, &plan.event) {
            (Some(sent), _) => sent?,
            (None, Some(event)) => self.publish_event(ch, event).await?,
            (None, None) => {}
        }
        self.route(job, &outcome, plan, ch).await
    }

    /// Stage 1: write and wait for the store while the fleet ledger is told the outcome (the
    /// two wait on different disks, so neither waits for the other; an answered outcome is
    /// told to the fleet whatever the store does). Once durable, the event may leave while the
    /// fleet is told: the claim and the outcome are the ledger's two round trips per request,
    /// and this one does not add to a request's time in hand.
    async fn persist(
        &self,
        w: Writing<'_>,
        permit: Option<CallPermit<'_>>,
        ch: &Channel,
    ) -> Result<Persisted, FinishError> {
        let telling = w.job.held.is_some() && w.json.is_some();
        let tell = async {
            match w.json {
                Some(json) if telling => Some(self.fleet.outcome(json.clone(), false).await),
                _ => None,
            }
        };
        // Kept until the answer is durable: while the store fails, an answered outcome held
        // in memory keeps its call's place, so no more calls are answered than the permits.
        let mut permit = permit;
        let write_then_publish = async {
            let written = self.write(&w).await;
            if written.is_ok() {
                // The answer is durable: a SIGKILL from here on cannot lead to a second
                // call, so the permit goes to the next call (`Caller::permit`).
                drop(permit.take());
                if let (true, Some(record)) = (telling, w.record) {
                    self.fleet.stored(&w.job.key, record.updated_at_ms);
                }
            }
            let published = match (&written, &w.plan.event) {
                (Ok(()), Some(event)) if telling => Some(self.publish_event(ch, event).await),
                _ => None,
            };
            (written, published)
        };
        let ((written, published), told) = tokio::join!(write_then_publish, tell);
        let told_fleet = match told {
            Some(Ok(())) => true,
            Some(Err(fe)) if written.is_ok() => return Err(fe.into()),
            Some(Err(fe)) => {
                tracing::error!(error = %fe, "cannot tell the fleet ledger the held outcome either");
                false
            }
            None => false,
        };
        Ok(Persisted {
            written,
            published,
            told_fleet,
        })
    }

    /// Stage 1, when the store refused the write. Nothing answered: the delivery goes back
    /// while the store heals. Genesys answered (or may have): never throw that away for a
    /// redelivery to repeat the call — tell the fleet first (the ledger is on the broker), then
    /// hold the outcome until the store takes it.
    async fn until_durable(
        &self,
        w: Writing<'_>,
        persisted: Persisted,
        ch: &Channel,
        shutdown: &Shutdown,
    ) -> Result<Durable, FinishError> {
        let Persisted {
            mut written,
            published,
            mut told_fleet,
        } = persisted;
        let mut held = false;
        let mut other_errors = 0u32;
        while let Err(e) = written {
            let Some(answered) = w.json else {
                return Ok(Durable::Settled(self.defer(w.job, ch, &e).await?));
            };
            if !told_fleet {
                told_fleet = self.tell_held(w.job, answered).await;
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
            } else if !self.store.writable(&mut shutdown.clone()).await {
                // Shutting down with the store still failing. The ledger holds the outcome,
                // so the redelivery replays it on whichever pod takes it.
                internal_events::outcome_released();
                tracing::warn!(in_ledger = told_fleet, "shutdown while holding an answered outcome; the delivery goes back and its redelivery replays the outcome from the fleet ledger");
                return Ok(Durable::Settled(Settle::Requeue));
            }
            written = self.write(&w).await;
        }
        if held {
            internal_events::outcome_released();
        }
        Ok(Durable::Yes {
            published,
            told_fleet,
        })
    }

    /// Tell the fleet ledger an outcome the store does not take yet; whether it has it now.
    async fn tell_held(&self, job: &Job, answered: &OutcomeRecord) -> bool {
        let Some(claim) = &job.held else {
            return false;
        };
        match self.fleet.outcome(answered.clone(), false).await {
            Ok(()) => true,
            Err(fe) => {
                tracing::error!(error = %fe, claim_id = %claim.claim_id, "cannot tell the fleet ledger the held outcome either");
                false
            }
        }
    }

    /// Stage 2: tell the fleet the key's outcome (if stage 1 could not), or give the claim back.
    async fn tell_fleet(
        &self,
        job: &Job,
        json: Option<&OutcomeRecord>,
        told: bool,
    ) -> Result<(), FinishError> {
        let Some(claim) = &job.held else {
            return Ok(());
        };
        match json {
            Some(json) if !told => self.fleet.outcome(json.clone(), true).await?,
            Some(_) => {}
            None => self.fleet.release(&job.key, claim).await?,
        }
        Ok(())
    }

    /// Stage 3: send the delivery where the plan says, and log and count the outcome once.
    async fn route(
        &self,
        job: &Job,
        outcome: &Outcome,
        plan: Plan,
        ch: &Channel,
    ) -> Result<Settle, FinishError> {
        let settle = match plan.route {
            Route::Ack => {
                let latency = plan.event.as_ref().map_or(0.0, |e| e.latency_ms);
                match outcome {
                    Outcome::Started(created) => internal_events::session_started(
                        job.attempts,
                        latency,
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
                match outcome.error() {
                    Some(e) => internal_events::auth_refused(&e.to_string()),
                    None => internal_events::session_abandoned(),
                }
                Settle::Ack
            }
            Route::Park { queue, holder } => {
                let props = amqp::without_headers(&job.delivery.properties, &["x-delivery-count"]);
                amqp::publish_routed(ch, "", &queue, &job.delivery.data, props).await?;
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
                self.delay(job, &queue, delayed, &error, ch).await?;
                Settle::Ack
            }
        };
        Ok(settle)
    }

    /// To the next delayed-retry queue, with the attempts so far.
    async fn delay(
        &self,
        job: &Job,
        queue: &str,
        delayed: usize,
        error: &str,
        ch: &Channel,
    ) -> Result<(), AmqpError> {
        let properties = amqp::with_headers(
            &amqp::without_headers(&job.delivery.properties, &["x-delivery-count"]),
            vec![
                (header::ATTEMPTS, int(i64::from(job.attempts))),
                (header::DELAYED_RETRIES, int(delayed as i64 + 1)),
                (header::LAST_ERROR, text(crate::text::truncate(error))),
            ],
        );
        amqp::publish_routed(ch, "", queue, &job.delivery.data, properties).await?;
        internal_events::session_retry_scheduled(job.attempts, queue, error);
        Ok(())
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
    async fn write(&self, w: &Writing<'_>) -> Result<(), StoreError> {
        let Writing {
            job,
            valid,
            plan,
            record,
            json,
        } = *w;
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
            self.fleet.release(&job.key, claim).await?;
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

/// The ids an outcome brings, on the delivery's span.
fn note_ids(outcome: &Outcome) {
    let span = tracing::Span::current();
    if let Outcome::Started(created) = outcome {
        span.record("conversation_id", created.conversation_id.as_str());
        if let Some(c) = &created.correlation_id {
            span.record("correlation_id", c.as_str());
        }
    }
    if let Some(c) = outcome.error().and_then(GenesysError::correlation_id) {
        span.record("correlation_id", c);
    }
}
