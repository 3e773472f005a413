//! The ledger's one rule, applied by every pod in stream order to its view of the live claims
//! ([`Claims`], in memory) and its store, so every pod reaches the same decision without
//! talking to the others:
//!
//! - a **claim** wins when the key has no outcome and no other live claim (one whose
//!   `at_ms + lease_ms` lies after the new claim's `at_ms`); a claim with the same id renews;
//!   a new claim from the pod that holds the key wins too (the pod restarted: a live pod
//!   works on a key under its per-key lock, so it never claims a key it still holds);
//! - a **release** frees the key if the releasing claim holds it;
//! - an **outcome** ends every claim on the key; `completed` and `unknown` are stored for
//!   replay, `failed` frees the key (a local `completed` is never overwritten);
//! - a **forget** (an operator's `dlq replay --force`) clears an `unknown` key.
//!
//! With [`Known::Applied`] (a record the store has already applied: read again after a
//! restart to rebuild the claims, or this pod's own outcome, stored before the ledger had it),
//! only the claims change; with [`Known::Open`] (this pod's own fresh claim, see
//! [`super::Fleet::claim`]) and [`Known::Absent`] (a key a restoring pod has not written yet)
//! the store is not read, and an `Absent` outcome is handed back to be stored
//! ([`Applied::Restored`]). Every change is idempotent, so a record
//! applied again (retried after a store error, or read again after a restart because the
//! reader saves its offset every few seconds) applies once: the claims change after the
//! store, an outcome is stored whole, and a foreign audit entry is stored under its ledger
//! position.

use super::claims::Claims;
use super::record::{Json, OutcomeRecord, Record};
use crate::store::{AuditEntry, FleetClaim, IdemRecord, IdemState, Store, StoreError};

/// What a claim came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// This claim holds the key: call Genesys.
    Won,
    /// Another pod holds a live claim: wait for its outcome.
    Busy(FleetClaim),
    /// The key already has a completed outcome: replay it.
    Done(Box<IdemRecord>),
}

/// What applying one record did, for the reader to act on.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Claim {
        claim_id: String,
        decision: Decision,
    },
    Mark {
        id: String,
    },
    /// An outcome made at `at_ms` whose audit entry this store lacks (another pod's, or this
    /// pod's own when it lost its volume): the entry is to be stored here.
    Foreign {
        audit: Json<AuditEntry>,
        at_ms: u64,
    },
    /// An outcome for a key a new store does not hold yet ([`Known::Absent`]): the record and
    /// its audit entry (made at `at_ms`) are for the caller to store. The reader hands them
    /// to its writer thread, so a restoring pod's sled inserts run beside its decoding.
    Restored {
        record: Json<IdemRecord>,
        audit: Json<AuditEntry>,
        at_ms: u64,
    },
    /// A record that decoded but whose parts are not what this version writes: skipped.
    Stranger,
    Other,
}

/// What the reader knows of this pod's store for a record without reading it: every pod
/// decides alike either way, the reader only skips the reads it does not need (two per
/// request of this pod's own, on a store larger than its cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Nothing: read the store.
    Nothing,
    /// The store has this record's change already: only the live claims change.
    Applied,
    /// This pod's own claim, made on a key its store held `in_progress` for it, and no record
    /// applied since has changed that key: there is no outcome to find.
    Open,
    /// The store holds nothing for the key (a pod restoring a new store has not written
    /// it yet, see [`super::unseen`]).
    Absent,
}

pub fn apply(
    store: &Store,
    claims: &mut Claims,
    record: &Record,
    worker_id: &str,
    known: Known,
) -> Result<Applied, StoreError> {
    let replay = known == Known::Applied;
    match record {
        Record::Claim {
            key,
            claim_id,
            worker_id: claimer,
            fingerprint,
            at_ms,
            lease_ms,
        } => {
            let claim = FleetClaim {
                claim_id: claim_id.clone(),
                worker_id: claimer.clone(),
                fingerprint: fingerprint.clone(),
                at_ms: *at_ms,
                lease_ms: *lease_ms,
            };
            apply_claim(store, claims, key, claim, worker_id, known)
        }
        Record::Release { key, claim_id } => {
            if claims
                .get(key)
                .is_some_and(|held| held.claim_id == *claim_id)
            {
                claims.remove(key);
            }
            Ok(Applied::Other)
        }
        Record::Outcome(outcome) => apply_outcome(store, claims, outcome, worker_id, known),
        Record::Forget { key } => {
            if !replay && known != Known::Absent && store.state_of(key)? == Some(IdemState::Unknown)
            {
                store.remove(key)?;
            }
            claims.remove(key);
            Ok(Applied::Other)
        }
        Record::Mark { id, .. } => Ok(Applied::Mark { id: id.clone() }),
    }
}

/// A claim: `Done` if the store already holds the key's final outcome, `Busy` if another pod's
/// live claim holds it, else `Won` (and the claim joins the view).
fn apply_claim(
    store: &Store,
    claims: &mut Claims,
    key: &str,
    claim: FleetClaim,
    worker_id: &str,
    known: Known,
) -> Result<Applied, StoreError> {
    let claim_id = claim.claim_id.clone();
    let read = !matches!(known, Known::Open | Known::Absent);
    if read && store.state_of(key)?.is_some_and(IdemState::is_final) {
        if let Some(rec) = store.get(key)? {
            if claim.worker_id == worker_id
                && rec.worker_id == worker_id
                && claim.at_ms <= rec.updated_at_ms
            {
                // This pod's claim that led to its own outcome, read again after a restart:
                // it stays in the view until the outcome follows in the ledger, so the pod
                // can tell whether the fleet ever heard it (`Fleet::unheard`).
                claims.insert(key, claim);
            }
            return Ok(Applied::Claim {
                claim_id,
                decision: Decision::Done(Box::new(rec)),
            });
        }
    }
    if let Some(held) = claims.get(key) {
        // A pod holds a key under its per-key lock until the claim ends, so another claim
        // from the same pod means the holder restarted: its claim is dead.
        let restarted = held.worker_id == claim.worker_id;
        if held.claim_id != claim_id && held.live_at(claim.at_ms) && !restarted {
            return Ok(Applied::Claim {
                claim_id,
                decision: Decision::Busy(held.clone()),
            });
        }
    }
    claims.insert(key, claim);
    Ok(Applied::Claim {
        claim_id,
        decision: Decision::Won,
    })
}

/// An outcome: stored unless the store has it (or a completed one) already; the claim leaves
/// the view; another pod's audit entry is handed back to be stored, once.
fn apply_outcome(
    store: &Store,
    claims: &mut Claims,
    outcome: &OutcomeRecord,
    worker_id: &str,
    known: Known,
) -> Result<Applied, StoreError> {
    let OutcomeRecord {
        key,
        head,
        record,
        audit,
    } = outcome;
    let replay = known == Known::Applied;
    let mut told_before = false;
    if !replay {
        // Checked whole before it is stored as it came, and against the head every pod
        // decides on.
        if !record.parse().is_some_and(|r| head.of(&r)) {
            return Ok(Applied::Stranger);
        }
        if known == Known::Absent {
            // A new store restoring: nothing to read, and the caller stores the record and
            // its audit entry (even this pod's own: its entry went with the lost volume).
            claims.remove(key);
            return Ok(Applied::Restored {
                record: record.clone(),
                audit: audit.clone(),
                at_ms: head.updated_at_ms,
            });
        }
        // An `unknown` from the ledger does not overwrite a local `completed` either; a local
        // `unknown` is replaced by whatever the fleet learned.
        let state = store.state_of(key)?;
        // The same outcome told again (its pod stopped before the ledger had it), or read
        // again after a restart: its audit entry is here already, unless its insert failed
        // (a failing store), and then it is stored now.
        told_before = state.is_some()
            && head.worker_id != worker_id
            && store.get(key)?.is_some_and(|r| {
                r.state == head.state
                    && r.worker_id == head.worker_id
                    && r.updated_at_ms == head.updated_at_ms
            })
            && store.has_foreign_audit(key, head.updated_at_ms)?;
        if state != Some(IdemState::Completed) {
            store.put_json(key, record.text())?;
        }
    }
    claims.remove(key);
    // This pod's own outcome has its audit entry here.
    let audited = head.worker_id == worker_id;
    if !audited && !replay && !told_before {
        Ok(Applied::Foreign {
            audit: audit.clone(),
            at_ms: head.updated_at_ms,
        })
    } else {
        Ok(Applied::Other)
    }
}

#[cfg(test)]
mod tests;
