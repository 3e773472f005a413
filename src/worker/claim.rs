//! Stage 2, claim: take the key in the idempotency store, or find it already finished or used
//! with another body (SPEC §5). Runs under the key's lock.

use super::intake::Job;
use crate::request::ValidRequest;
use crate::store::{Claim, Store, StoreError};

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
