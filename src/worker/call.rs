//! Stage 3, call: wait on the rate limiter, create the session at Genesys Cloud, and retry
//! in-process what the error's disposition allows, up to `worker.max_attempts` (SPEC §5).

use super::intake::Job;
use super::outcome::Outcome;
use super::permit::CallPermit;
use crate::genesys::{Disposition, GenesysClient, GenesysError};
use crate::internal_events;
use crate::limiter::Limiter;
use crate::metrics::metrics;
use crate::request::ValidRequest;
use crate::shutdown::Shutdown;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// Everything a call needs: the client, the process-wide limiter, the call permits and the
/// retry policy.
pub struct Caller {
    pub client: GenesysClient,
    pub limiter: Arc<Limiter>,
    /// `worker.concurrency` permits: the Genesys calls this pod makes at once, each with the
    /// recording of its answer. A delivery takes one only once its key is claimed, so
    /// deliveries waiting for their fleet claim overlap the calls in progress instead of
    /// holding a call's place.
    pub calls: Arc<Semaphore>,
    pub max_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `genesys.retry_unknown_outcome`: re-send what may have been acted on.
    pub retry_unknown: bool,
    /// `worker.shutdown_grace`: how long a call in flight may still take once shutdown begins.
    pub grace: Duration,
}

/// Kept back from `shutdown_grace` for recording the outcome after the call gives up.
fn record_margin(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(2))
}

impl Caller {
    /// Wait for one of the `worker.concurrency` call permits; `None` if shutdown came first
    /// (nothing was sent). The permit is held through the call and the recording of its
    /// answer, so at most `worker.concurrency` calls are ever answered but not yet durable:
    /// the most a SIGKILL can make Genesys Cloud do twice.
    pub async fn permit(&self, shutdown: &Shutdown) -> Option<CallPermit<'_>> {
        let mut stop = shutdown.clone();
        tokio::select! {
            biased;
            _ = stop.requested() => None,
            // Never closed; if it were, nothing was sent either.
            permit = self.calls.acquire() => permit.ok().map(CallPermit::new),
        }
    }

    /// Call until an answer decides the outcome or the in-process attempts are used up. If
    /// shutdown comes while the first attempt still waits for the limiter, or between attempts
    /// (every earlier one provably not acted on), nothing is pending: the outcome is
    /// [`Outcome::Abandoned`]. If `shutdown_grace` runs out while a call is in flight, the
    /// outcome is [`Outcome::Unknown`] (SPEC §5): Genesys may have acted on it.
    pub async fn call(&self, job: &mut Job, valid: &ValidRequest, shutdown: &Shutdown) -> Outcome {
        job.call_started = Some(Instant::now());
        let mut attempts_here = 0u32;
        loop {
            attempts_here += 1;
            let waited = if attempts_here == 1 {
                let mut stop = shutdown.clone();
                tokio::select! {
                    biased;
                    _ = stop.requested() => return Outcome::Abandoned,
                    waited = self.limiter.acquire() => waited,
                }
            } else {
                self.limiter.acquire().await
            };
            job.attempts = job.attempts.saturating_add(1);
            metrics().limiter_wait(waited);
            if waited > Duration::from_millis(100) {
                tracing::debug!(waited_ms = waited.as_millis() as u64, "rate limiter wait");
            }
            let call_started = Instant::now();
            let result = tokio::select! {
                biased;
                r = self.client.create_session(&valid.request, &job.key) => r,
                _ = self.grace_over(shutdown) => {
                    if self.client.backend().idempotent() {
                        // Web Messaging: the redelivery finds this key's guest session and
                        // its start, so a call cut short is put back, never `unknown`.
                        return Outcome::Abandoned;
                    }
                    return Outcome::Unknown(GenesysError::Unknown {
                        status: None,
                        detail: format!(
                            "shutdown: worker.shutdown_grace ({}) ran out while the call was in flight; Genesys Cloud may have created the session",
                            crate::config::format_duration(self.grace)
                        ),
                        correlation_id: None,
                    });
                }
            };
            metrics()
                .genesys_request_duration
                .observe(call_started.elapsed().as_secs_f64());
            let err = match result {
                Ok(created) => return Outcome::Started(created),
                Err(e) => e,
            };
            let disposition = match err.disposition() {
                Disposition::Unknown if self.retry_unknown => {
                    internal_events::unknown_outcome_resent(&err.to_string());
                    Disposition::Retry { after: None }
                }
                d => d,
            };
            if let GenesysError::TooLarge { message } = err {
                // The guest session allows less than the intake checked: the request's fault.
                return Outcome::Invalid(crate::request::ValidationError {
                    field: Some("attributes".into()),
                    message,
                });
            }
            match disposition {
                Disposition::Unknown => return Outcome::Unknown(err),
                Disposition::Permanent => return Outcome::Rejected(err),
                Disposition::Auth => return Outcome::AuthRefused(err),
                Disposition::Retry { after } => {
                    if let Some(after) = after {
                        self.limiter.pause_for(after);
                        internal_events::rate_limited(after);
                    }
                    if attempts_here >= self.max_attempts {
                        return Outcome::Retryable(err);
                    }
                    let delay = crate::backoff::full_jitter(
                        attempts_here - 1,
                        self.backoff_base,
                        self.backoff_max,
                    );
                    internal_events::session_retry_in_process(
                        attempts_here,
                        &err.to_string(),
                        delay,
                    );
                    let mut stop = shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = stop.requested() => return Outcome::Abandoned,
                    }
                }
            }
        }
    }

    /// Resolves once shutdown has been requested and the grace, less the time kept for
    /// recording, has passed since.
    async fn grace_over(&self, shutdown: &Shutdown) {
        let mut stop = shutdown.clone();
        stop.requested().await;
        tokio::time::sleep(self.grace.saturating_sub(record_margin(self.grace))).await;
    }
}
