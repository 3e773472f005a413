//! Stage 2, claim: take the key in this pod's store, then in the fleet ledger; or find it
//! already finished, used with another body, or in progress on another pod (SPEC §5, §9).
//! Runs under the key's lock.

use super::intake::Job;
use super::outcome::Outcome;
use crate::fleet::apply::Decision;
use crate::fleet::record::OutcomeRecord;
use crate::fleet::{Fleet, FleetError};
use crate::request::ValidRequest;
use crate::store::{AuditEntry, Claim, IdemRecord, IdemState, Store, StoreError};

/// Take the key for this job. On `Proceed`, `job.attempts` covers every earlier attempt.
pub fn claim(
    store: &Store,
    job: &mut Job,
    valid: &ValidRequest,
    worker_id: &str,
) -> Result<Claim, StoreError> {
    let claim = store.claim(&job.key, &valid.fingerprint, worker_id)?;
    if let Claim::Proceed { attempts } = claim {
        job.attempts = job.attempts.max(attempts);
    }
    Ok(claim)
}

/// What the claim stage decided.
pub enum Claimed {
    /// This delivery holds the key fleet-wide: call Genesys.
    Call,
    /// No call: the outcome is decided (a replay or a conflict), or another pod holds the key.
    Decided(Box<Outcome>),
}

/// Take the key locally, then fleet-wide.
pub async fn claim_key(
    store: &Store,
    fleet: &Fleet,
    job: &mut Job,
    valid: &ValidRequest,
    worker_id: &str,
) -> Result<Claimed, ClaimError> {
    // Read before the local record: see `Seen`.
    let seen = fleet.seen();
    let claimed = claim(store, job, valid, worker_id)?;
    let open = matches!(claimed, Claim::Proceed { .. }).then_some(seen);
    if let Claim::Completed(rec) = &claimed {
        if rec.worker_id == worker_id && fleet.unheard(&job.key).await {
            // This pod recorded the outcome, but the fleet never heard it: tell it now, or
            // another pod would call again once this pod's claim lapses.
            tracing::warn!(state = ?rec.state, "the fleet ledger never had this key's outcome (the pod stopped first); telling it now");
            let told = OutcomeRecord::new(&job.key, rec, &retold(job, rec));
            fleet.outcome(told, true).await?;
        }
    }
    match claimed {
        // An `unknown` key may have been cleared by an operator (`dlq replay --force`) in a
        // ledger record this pod has not applied yet: the fleet claim below decides.
        Claim::Completed(rec) if rec.state != IdemState::Unknown => {
            return Ok(Claimed::Decided(Box::new(Outcome::Replayed(rec))))
        }
        Claim::Completed(_) => {}
        Claim::Conflict(rec) => return Ok(Claimed::Decided(Box::new(Outcome::Conflict(rec)))),
        Claim::Proceed { .. } => {}
    }
    let (held, decision) = fleet.claim(&job.key, &valid.fingerprint, open).await?;
    Ok(match decision {
        Decision::Won => {
            job.held = Some(held);
            Claimed::Call
        }
        Decision::Done(rec) if rec.fingerprint != valid.fingerprint => {
            Claimed::Decided(Box::new(Outcome::Conflict(*rec)))
        }
        Decision::Done(rec) => Claimed::Decided(Box::new(Outcome::Replayed(*rec))),
        Decision::Busy(holder) => Claimed::Decided(Box::new(Outcome::Parked(holder))),
    })
}

/// The audit entry that goes with an outcome told again: what the record holds, dated when
/// the outcome was made.
fn retold(job: &Job, rec: &IdemRecord) -> AuditEntry {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(rec.updated_at_ms);
    AuditEntry {
        timestamp: humantime::format_rfc3339_millis(at).to_string(),
        event_type: "session_init".into(),
        idempotency_key: Some(job.key.clone()),
        visitor_id: Some(job.visitor_id.clone()).filter(|v| !v.is_empty()),
        queue_id: Some(job.queue_id.clone()).filter(|v| !v.is_empty()),
        bot_score: job.bot_score,
        outcome: match rec.state {
            IdemState::Completed => "started".into(),
            _ => "outcome_unknown".into(),
        },
        conversation_id: rec.conversation_id.clone(),
        attempts: Some(rec.attempts),
        worker_id: rec.worker_id.clone(),
        detail: Some(
            "told to the fleet ledger again: the pod stopped before the ledger had it".into(),
        ),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fleet(#[from] FleetError),
}
