//! One place per thing operators are told: each function here logs an event and counts it from
//! the same values, so logs and metrics cannot drift (the idea of Vector's `internal_events`).
//! Pipelines call these instead of pairing a `tracing` call with a metric themselves.
//!
//! May use `metrics` and the reason types of `event`; nothing else of the crate.

use crate::event::Reason;
use crate::metrics::metrics;
use std::time::Duration;

/// A session was created at Genesys Cloud and recorded.
pub fn session_started(attempts: u32, latency_ms: f64, allowed: Option<u64>, count: Option<u64>) {
    tracing::info!(attempts, latency_ms, "session created");
    let m = metrics();
    m.outcome("started");
    if let Some(a) = allowed {
        m.genesys_ratelimit_allowed.set(a as i64);
    }
    if let Some(c) = count {
        m.genesys_ratelimit_count.set(c as i64);
    }
}

/// A key that was already finished came again: its stored event was re-published.
pub fn session_replayed(conversation_id: Option<&str>) {
    tracing::info!(
        conversation_id,
        "already completed: re-published the stored event, no API call"
    );
    metrics().outcome("duplicate");
    metrics().idempotent_replays.inc();
}

/// A session request was dead-lettered (`reason` in `x-failure-reason`).
pub fn session_dead_lettered(reason: Reason, attempts: u32, detail: &str) {
    tracing::warn!(
        reason = reason.as_str(),
        attempts,
        detail,
        "session request dead-lettered"
    );
    metrics().outcome(reason.as_str());
    metrics().dead_letter(reason.as_str());
}

/// A session request went to a delayed-retry queue.
pub fn session_retry_scheduled(attempts: u32, queue: &str, error: &str) {
    tracing::info!(
        attempts,
        retry_queue = queue,
        error,
        "scheduled a delayed retry"
    );
    metrics().outcome("retry_scheduled");
    metrics().retry("delayed");
}

/// A retryable Genesys error; the call is tried again in-process after `backoff`.
pub fn session_retry_in_process(attempt: u32, error: &str, backoff: Duration) {
    tracing::info!(
        attempt,
        error,
        backoff_ms = backoff.as_millis() as u64,
        "retryable error"
    );
    metrics().retry("in_process");
}

/// Genesys Cloud answered 429: every task of the process pauses.
pub fn rate_limited(pause: Duration) {
    tracing::warn!(
        pause_ms = pause.as_millis() as u64,
        "Genesys Cloud rate limit: pausing all tasks"
    );
}

/// Genesys Cloud refused the credentials: the delivery is requeued and consumption pauses.
pub fn auth_refused(error: &str) {
    tracing::error!(error, "auth failure: requeueing and pausing consumption");
    metrics().outcome("requeued_auth");
}

/// Consumption paused by an auth failure; the token endpoint is probed again after `probe_in`.
pub fn auth_paused(probe_in: Duration, hint: &str) {
    tracing::error!(
        probe_in_s = probe_in.as_secs(),
        "paused: Genesys Cloud refused the credentials or the configuration; no new messages are taken and none are dead-lettered. Fix: {hint}"
    );
    metrics().auth_paused.set(1);
}

/// The auth pause is over.
pub fn auth_resumed() {
    tracing::info!("Genesys Cloud accepts the credentials and the configuration again; resuming");
    metrics().auth_paused.set(0);
}

/// A delivery could not be finished (broker or store trouble); it is requeued after a pause.
pub fn delivery_failed(pipeline: &'static str, error: &dyn std::fmt::Display) {
    tracing::error!(pipeline, error = %error, "could not finish the delivery; it will be redelivered");
    metrics().delivery_error(pipeline);
}

/// A delivery handler panicked; the delivery is requeued after a pause.
pub fn handler_panicked(delivery_tag: u64) {
    tracing::error!(
        delivery_tag,
        "delivery handler panicked; requeueing the delivery"
    );
    metrics().delivery_error("panic");
}

/// A result event reached the webhook receiver.
pub fn webhook_delivered(attempts: u32, status: u16) {
    tracing::info!(attempts, status, "webhook delivered");
    metrics().webhook("delivered");
}

/// A webhook delivery failed and goes to a delayed-retry queue.
pub fn webhook_retry_scheduled(attempts: u32, queue: &str, error: &str) {
    tracing::warn!(
        attempts,
        retry_queue = queue,
        error,
        "webhook delivery failed; retrying later"
    );
    metrics().webhook("retry_scheduled");
    metrics().retry("webhook");
}

/// A result event was dead-lettered to the webhook DLQ.
pub fn webhook_dead_lettered(reason: Reason, attempts: u32, detail: &str) {
    tracing::warn!(
        reason = reason.as_str(),
        attempts,
        detail,
        "webhook event dead-lettered"
    );
    metrics().webhook("dead_lettered");
    metrics().dead_letter(reason.as_str());
}

/// The broker could not be reached; the next attempt is in `retry_in`.
pub fn broker_unavailable(error: &dyn std::fmt::Display, retry_in: Duration) {
    tracing::warn!(error = %error, retry_in_ms = retry_in.as_millis() as u64, "broker unavailable");
    metrics().broker_reconnect("unavailable");
}

/// A broker connection or its setup went away; the shell reconnects.
pub fn broker_lost(why: &dyn std::fmt::Display) {
    tracing::warn!(reason = %why, "broker connection lost; reconnecting");
    metrics().broker_reconnect("lost");
}

/// A ledger record this program did not write or cannot parse: skipped.
pub fn ledger_record_skipped(offset: Option<i64>, bytes: usize) {
    tracing::warn!(
        offset,
        bytes,
        "skipped a fleet ledger record this version cannot read"
    );
    metrics().ledger_skipped.inc();
}

/// Applying a ledger record to the store failed; the reader tries again after a pause.
pub fn ledger_apply_failed(error: &dyn std::fmt::Display) {
    tracing::error!(error = %error, "could not apply a fleet ledger record to the store; retrying");
    metrics().delivery_error("ledger");
}

/// A restoring pod could not spill its records to sort them (`fleet::run`), or read one back.
pub fn ledger_spill_failed(error: &dyn std::fmt::Display, dir: &std::path::Path) {
    tracing::error!(error = %error, dir = %dir.display(), "could not spill or read back fleet ledger records being restored");
    metrics().delivery_error("ledger");
}

/// The ledger reader did not save its offset: an audit entry of a record before it was given
/// up (shutdown while the store failed), and the next start reads that record again.
pub fn ledger_offset_held() {
    tracing::warn!("shutdown while the store fails: an audit entry from the fleet ledger is not stored, so the ledger offset is not saved and the next start reads it again");
    metrics().delivery_error("ledger");
}

/// A copy of a key held by another pod was parked until that pod's outcome.
pub fn session_parked(holder: &str, queue: &str) {
    tracing::info!(
        holder,
        park_queue = queue,
        "key in progress on another pod; parked without a call"
    );
    metrics().outcome("parked");
}

/// Shutdown came before the call was sent: the claim is released, the delivery requeued.
pub fn session_abandoned() {
    tracing::info!("shutdown before the call was sent: claim released, delivery requeued");
    metrics().outcome("requeued_shutdown");
}

/// A session POST may have been acted on without an answer: recorded `unknown`, not re-sent.
pub fn unknown_outcome(detail: &str) {
    tracing::error!(detail, "outcome unknown: Genesys Cloud may have created the session; not re-sent. Check Genesys Cloud, then `dlq replay --reason outcome_unknown --force` to send it once more");
    metrics().unknown_outcomes.inc();
}

/// `genesys.retry_unknown_outcome` is on: what may have been acted on is sent again.
pub fn unknown_outcome_resent(error: &str) {
    tracing::warn!(error, "re-sending a call whose outcome is unknown (genesys.retry_unknown_outcome = true): a duplicate session is possible");
    metrics().unknown_outcome_resends.inc();
}

/// The store began failing writes: intake pauses, `/readyz` says why, the store is reopened
/// until a write succeeds.
pub fn store_failed(error: &str) {
    tracing::error!(error, "the store fails writes (disk full or I/O error): intake paused, answered outcomes held; retrying every second, resumes by itself once a write succeeds");
    let m = metrics();
    m.store_failures.inc();
    m.store_failing.set(1);
}

/// A write and flush succeeded again after a failure.
pub fn store_recovered(failed_for: Duration) {
    tracing::info!(
        failed_for_s = failed_for.as_secs_f64(),
        "the store takes writes again; intake resumes"
    );
    metrics().store_failing.set(0);
}

/// Genesys Cloud answered but the store could not record it: the outcome is held in memory
/// (and told to the fleet ledger) until a write succeeds; never re-sent.
pub fn outcome_held(error: &dyn std::fmt::Display, in_ledger: bool) {
    tracing::warn!(error = %error, in_ledger, "cannot record an answered outcome: holding it until the store takes writes again");
    metrics().outcomes_held.inc();
}

/// A held outcome was written.
pub fn outcome_released() {
    metrics().outcomes_held.dec();
}

/// The store failed before anything was sent: the delivery went back to the queue.
pub fn session_deferred(error: &dyn std::fmt::Display) {
    tracing::warn!(error = %error, "store failing before the call: delivery put back on the queue, no call made");
    metrics().outcome("requeued_store");
}

/// This pod has not heard its own heartbeat come back lately (or not yet): the other pods will
/// count it gone and take its share, so its calls wait until it hears itself again.
pub fn budget_held(silent_for: Option<Duration>) {
    if let Some(silent) = silent_for {
        tracing::warn!(
            silent_for_ms = silent.as_millis() as u64,
            "this pod has not heard its own heartbeat through the fleet exchange lately, so the other pods cannot hear it either and will take its share: it holds its calls and connects its listener again"
        );
    }
    metrics().rate_limit_held.set(1);
}

/// The other pods hear this one (again): its calls go on.
pub fn budget_heard() {
    if metrics().rate_limit_held.get() != 0 {
        tracing::info!("the other pods hear this pod: its calls go on");
    }
    metrics().rate_limit_held.set(0);
}

/// The Guest API sent a frame class this worker does not use (logged once per class).
pub fn web_messaging_unknown_class(class: &str) {
    tracing::info!(
        class,
        "Web Messaging Guest API sent a frame class this worker does not use; ignored (logged once)"
    );
}

/// A guest session was resumed (`newSession: false`): whether its start was already there.
pub fn web_messaging_resumed(start_found: bool) {
    tracing::info!(
        start_found,
        "resumed an existing guest session: {}",
        if start_found {
            "its start is in the history, not sent again"
        } else {
            "no start in its history, sending it"
        }
    );
}

/// Genesys Cloud said the guest session expired or is gone (4006/4007): a new one is opened.
pub fn web_messaging_session_renewed(code: i64) {
    tracing::warn!(
        code,
        "guest session expired or not found; opening a new one with startNew"
    );
}
