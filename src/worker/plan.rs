//! What finishing an outcome writes and sends, decided without effects: [`Planner::plan`]
//! turns an [`Outcome`] into a [`Plan`] — the idempotency record's new state, the audit entry,
//! the result event — and a [`Route`] for the delivery. [`super::finish`] carries it out.

use super::intake::Job;
use super::outcome::Outcome;
use crate::amqp::{header, header_i64, topology};
use crate::config::Settings;
use crate::event::{EventError, EventKind, Reason, ResultEvent};
use crate::genesys::{GenesysError, SessionCreated};
use crate::store::{AuditEntry, FleetClaim, IdemRecord, IdemState};

/// Where a finished delivery goes after its outcome is recorded.
pub enum Route {
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
pub struct Plan {
    /// The idempotency record's new state (with the event), if it changes.
    pub record: Option<IdemState>,
    /// Keep the attempts made so far on the existing record.
    pub keep_attempts: bool,
    pub audit: Option<AuditEntry>,
    pub event: Option<ResultEvent>,
    pub route: Route,
}

/// Decides plans: what it needs of the settings (retry delays, `max_redeliveries`) and the
/// worker id the audit entries carry.
pub struct Planner<'a> {
    pub settings: &'a Settings,
    pub worker_id: &'a str,
}

impl Planner<'_> {
    /// Decide what an outcome writes and where the delivery goes. No effects.
    pub fn plan(&self, job: &Job, outcome: &Outcome) -> Plan {
        match outcome {
            Outcome::Started(created) => self.started(job, created),
            Outcome::Replayed(rec) => self.replayed(job, rec),
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
            Outcome::Retryable(err) => self.retry(job, err),
            Outcome::AuthRefused(_) | Outcome::Abandoned => Plan {
                record: None,
                keep_attempts: true,
                audit: None,
                event: None,
                route: Route::Republish,
            },
            Outcome::Poison(deliveries) => self.poison(job, *deliveries),
            Outcome::Parked(holder) => self.parked(holder),
        }
    }

    fn event(job: &Job, kind: EventKind) -> ResultEvent {
        let mut e = ResultEvent::new(kind, &job.key, &job.visitor_id, &job.queue_id);
        e.latency_ms = job.latency_ms();
        e.attempts = job.attempts;
        e
    }

    fn started(&self, job: &Job, created: &SessionCreated) -> Plan {
        let mut ev = Self::event(job, EventKind::SessionStarted);
        ev.conversation_id = Some(created.conversation_id.clone());
        let mut entry = self.audit_entry(job, "started");
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

    /// A key finished before: its stored event again (or one rebuilt from the record).
    fn replayed(&self, job: &Job, rec: &IdemRecord) -> Plan {
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
        let mut entry = self.audit_entry(job, "duplicate");
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

    /// Retryable failures used up in process: the next delayed-retry queue, or
    /// `retries_exhausted` after the last.
    fn retry(&self, job: &Job, err: &GenesysError) -> Plan {
        let delayed = header_i64(&job.delivery.properties, header::DELAYED_RETRIES)
            .unwrap_or(0)
            .max(0) as usize;
        let Some(delay) = self.settings.amqp.retry_delays.get(delayed) else {
            return self.failure(job, Reason::RetriesExhausted, err);
        };
        let mut entry = self.audit_entry(job, "retry_scheduled");
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

    fn poison(&self, job: &Job, deliveries: u32) -> Plan {
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

    /// Another pod holds the key: park the copy in the first delayed-retry queue.
    fn parked(&self, holder: &FleetClaim) -> Plan {
        Plan {
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

    pub fn audit_entry(&self, job: &Job, outcome: &str) -> AuditEntry {
        AuditEntry {
            timestamp: crate::event::now_rfc3339(),
            event_type: "session_init".into(),
            idempotency_key: Some(job.key.clone()),
            visitor_id: Some(job.visitor_id.clone()).filter(|v| !v.is_empty()),
            queue_id: Some(job.queue_id.clone()).filter(|v| !v.is_empty()),
            bot_score: job.bot_score,
            outcome: outcome.into(),
            worker_id: self.worker_id.to_string(),
            ..Default::default()
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::genesys::RateLimitHeaders;
    use crate::request::ValidationError;
    use lapin::types::{AMQPValue, FieldTable};
    use std::time::Duration;

    fn settings() -> Settings {
        Settings::load_from(None, &Default::default()).expect("defaults load")
    }

    fn job(headers: FieldTable) -> Job {
        let mut delivery =
            lapin::message::Delivery::mock(1, "in".into(), "rk".into(), false, b"{}".to_vec());
        delivery.properties = lapin::BasicProperties::default().with_headers(headers);
        Job {
            delivery,
            key: "k-1".into(),
            visitor_id: "v-1".into(),
            queue_id: "q-1".into(),
            bot_score: Some(0.25),
            attempts: 2,
            call_started: None,
            held: None,
        }
    }

    fn plan_of(settings: &Settings, job: &Job, outcome: &Outcome) -> Plan {
        Planner {
            settings,
            worker_id: "pod-a",
        }
        .plan(job, outcome)
    }

    fn server_error() -> GenesysError {
        GenesysError::Server {
            status: 503,
            code: "service.unavailable".into(),
            message: "down".into(),
            correlation_id: Some("corr".into()),
        }
    }

    fn dead_letter_reason(plan: &Plan) -> Option<Reason> {
        match &plan.route {
            Route::DeadLetter { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    #[test]
    fn a_started_session_completes_the_key_with_its_ids() {
        let s = settings();
        let created = SessionCreated {
            conversation_id: "conv-1".into(),
            status: 200,
            latency: Duration::from_millis(12),
            correlation_id: Some("corr-1".into()),
            rate_limit: RateLimitHeaders::default(),
            message_id: Some("msg-1".into()),
        };
        let plan = plan_of(&s, &job(FieldTable::default()), &Outcome::Started(created));
        assert_eq!(plan.record, Some(IdemState::Completed));
        assert!(matches!(plan.route, Route::Ack));
        let event = plan.event.expect("an event");
        assert_eq!(event.event, EventKind::SessionStarted);
        assert_eq!(event.conversation_id.as_deref(), Some("conv-1"));
        let audit = plan.audit.expect("an audit entry");
        assert_eq!(
            (
                audit.outcome.as_str(),
                audit.message_id.as_deref(),
                audit.worker_id.as_str()
            ),
            ("started", Some("msg-1"), "pod-a")
        );
        assert_eq!(audit.latency_ms, Some(12.0));
    }

    #[test]
    fn a_retryable_failure_takes_the_next_delay_then_is_exhausted() {
        let s = settings();
        let plan = plan_of(
            &s,
            &job(FieldTable::default()),
            &Outcome::Retryable(server_error()),
        );
        match &plan.route {
            Route::DelayedRetry { queue, delayed, .. } => {
                assert_eq!(*delayed, 0);
                assert!(queue.ends_with("retry.5s"), "{queue}");
            }
            _ => panic!("a delayed retry"),
        }
        assert!(plan.keep_attempts && plan.record.is_none() && plan.event.is_none());
        let mut used_up = FieldTable::default();
        let delays = s.amqp.retry_delays.len() as i64;
        used_up.insert(
            header::DELAYED_RETRIES.into(),
            AMQPValue::LongLongInt(delays),
        );
        let plan = plan_of(&s, &job(used_up), &Outcome::Retryable(server_error()));
        assert_eq!(dead_letter_reason(&plan), Some(Reason::RetriesExhausted));
        assert_eq!(plan.record, Some(IdemState::Failed));
        assert_eq!(plan.event.map(|e| e.event), Some(EventKind::SessionFailed));
    }

    #[test]
    fn an_unknown_outcome_is_recorded_unknown_and_dead_lettered() {
        let s = settings();
        let unknown = GenesysError::Unknown {
            status: Some(504),
            detail: "no answer".into(),
            correlation_id: None,
        };
        let plan = plan_of(&s, &job(FieldTable::default()), &Outcome::Unknown(unknown));
        assert_eq!(plan.record, Some(IdemState::Unknown));
        assert_eq!(dead_letter_reason(&plan), Some(Reason::OutcomeUnknown));
        let audit = plan.audit.expect("audit");
        assert_eq!(audit.http_status, Some(504));
    }

    #[test]
    fn bad_input_is_rejected_without_a_record() {
        let s = settings();
        let invalid = ValidationError {
            field: Some("bot_score".into()),
            message: "out of range".into(),
        };
        let plan = plan_of(&s, &job(FieldTable::default()), &Outcome::Invalid(invalid));
        assert_eq!(plan.record, None);
        assert_eq!(dead_letter_reason(&plan), Some(Reason::InvalidRequest));
        let event = plan.event.expect("event");
        assert_eq!(event.event, EventKind::SessionRejected);
        assert!(event.error.expect("error").message.contains("bot_score"));
        assert_eq!(plan.audit.and_then(|a| a.attempts), Some(0));
    }

    #[test]
    fn a_poison_message_fails_with_its_own_event_id() {
        let s = settings();
        let plan = plan_of(&s, &job(FieldTable::default()), &Outcome::Poison(5));
        assert_eq!(dead_letter_reason(&plan), Some(Reason::PoisonMessage));
        let event = plan.event.expect("event");
        assert_eq!(event.event, EventKind::SessionFailed);
        assert_eq!(
            event.event_id,
            crate::event::event_id("k-1", EventKind::SessionFailed)
        );
    }

    #[test]
    fn a_parked_copy_waits_in_the_first_retry_queue_or_is_requeued() {
        let mut s = settings();
        let claim = FleetClaim::for_test(0);
        let plan = plan_of(
            &s,
            &job(FieldTable::default()),
            &Outcome::Parked(claim.clone()),
        );
        match &plan.route {
            Route::Park { holder, .. } => assert_eq!(holder, "w"),
            _ => panic!("parked"),
        }
        assert!(plan.audit.is_none() && plan.event.is_none());
        s.amqp.retry_delays.clear();
        let plan = plan_of(&s, &job(FieldTable::default()), &Outcome::Parked(claim));
        assert!(matches!(plan.route, Route::Requeue));
    }

    #[test]
    fn an_auth_refusal_and_a_shutdown_put_the_request_back_untouched() {
        let s = settings();
        let refused = GenesysError::Auth {
            status: 403,
            message: "no".into(),
            hint: "fix".into(),
        };
        for outcome in [Outcome::AuthRefused(refused), Outcome::Abandoned] {
            let plan = plan_of(&s, &job(FieldTable::default()), &outcome);
            assert!(matches!(plan.route, Route::Republish));
            assert!(plan.audit.is_none() && plan.event.is_none() && plan.record.is_none());
            assert!(plan.keep_attempts);
        }
    }
}
