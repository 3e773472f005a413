//! The ledger's one rule, applied by every pod to its own store in stream order, so every pod
//! reaches the same decision without talking to the others:
//!
//! - a **claim** wins when the key has no outcome and no other live claim (one whose
//!   `at_ms + lease_ms` lies after the new claim's `at_ms`); a claim with the same id renews;
//!   a new claim from the pod that holds the key wins too (the pod restarted: a live pod
//!   works on a key under its per-key lock, so it never claims a key it still holds);
//! - a **release** frees the key if the releasing claim holds it;
//! - an **outcome** ends every claim on the key; `completed` and `unknown` are stored for
//!   replay, `failed` frees the key (a local `completed` is never overwritten);
//! - a **forget** (an operator's `dlq replay --force`) clears an `unknown` key.

use super::record::Record;
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
    /// An outcome from another pod; its audit entry is to be appended here.
    Foreign(Box<AuditEntry>),
    Other,
}

pub fn apply(store: &Store, record: &Record, worker_id: &str) -> Result<Applied, StoreError> {
    match record {
        Record::Claim {
            key,
            claim_id,
            worker_id: claimer,
            fingerprint,
            at_ms,
            lease_ms,
        } => {
            let (claim_id, at_ms, lease_ms) = (claim_id.clone(), *at_ms, *lease_ms);
            if let Some(rec) = store.get(key)? {
                if rec.state.is_final() {
                    return Ok(Applied::Claim {
                        claim_id,
                        decision: Decision::Done(Box::new(rec)),
                    });
                }
            }
            if let Some(held) = store.fleet_claim(key)? {
                // A pod holds a key under its per-key lock until the claim ends, so another
                // claim from the same pod means the holder restarted: its claim is dead.
                let restarted = held.worker_id == *claimer;
                if held.claim_id != claim_id && held.live_at(at_ms) && !restarted {
                    return Ok(Applied::Claim {
                        claim_id,
                        decision: Decision::Busy(held),
                    });
                }
            }
            let claim = FleetClaim {
                claim_id: claim_id.clone(),
                worker_id: claimer.clone(),
                fingerprint: fingerprint.clone(),
                at_ms,
                lease_ms,
            };
            store.put_fleet_claim(key, &claim)?;
            Ok(Applied::Claim {
                claim_id,
                decision: Decision::Won,
            })
        }
        Record::Release { key, claim_id } => {
            if store
                .fleet_claim(key)?
                .is_some_and(|held| held.claim_id == *claim_id)
            {
                store.remove_fleet_claim(key)?;
            }
            Ok(Applied::Other)
        }
        Record::Outcome { key, record, audit } => {
            store.remove_fleet_claim(key)?;
            let keep_local = store
                .get(key)?
                .is_some_and(|l| l.state == IdemState::Completed);
            // An `unknown` from the ledger does not overwrite a local `completed` either; a
            // local `unknown` is replaced by whatever the fleet learned.
            if !keep_local {
                store.put(key, record)?;
            }
            if record.worker_id != worker_id {
                Ok(Applied::Foreign(audit.clone()))
            } else {
                Ok(Applied::Other)
            }
        }
        Record::Forget { key } => {
            if store
                .get(key)?
                .is_some_and(|r| r.state == IdemState::Unknown)
            {
                store.remove(key)?;
            }
            store.remove_fleet_claim(key)?;
            Ok(Applied::Other)
        }
        Record::Mark { id, .. } => Ok(Applied::Mark { id: id.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn claim(id: &str, worker: &str, at_ms: u64) -> Record {
        Record::Claim {
            key: "k".into(),
            claim_id: id.into(),
            worker_id: worker.into(),
            fingerprint: "fp".into(),
            at_ms,
            lease_ms: 1_000,
        }
    }

    fn decision(a: Applied) -> Decision {
        match a {
            Applied::Claim { decision, .. } => decision,
            other => panic!("{other:?}"),
        }
    }

    fn completed(worker: &str) -> IdemRecord {
        IdemRecord {
            state: IdemState::Completed,
            fingerprint: "fp".into(),
            attempts: 1,
            conversation_id: Some("conv".into()),
            event: None,
            worker_id: worker.into(),
            created_at_ms: crate::store::now_ms(),
            updated_at_ms: crate::store::now_ms(),
        }
    }

    #[tokio::test]
    async fn first_live_claim_wins_until_its_lease_lapses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        assert_eq!(
            decision(apply(&s, &claim("a", "w1", 100), "me").unwrap()),
            Decision::Won
        );
        // A second pod inside the lease loses; the owner renewing keeps it.
        assert!(matches!(
            decision(apply(&s, &claim("b", "w2", 500), "me").unwrap()),
            Decision::Busy(c) if c.claim_id == "a"
        ));
        assert_eq!(
            decision(apply(&s, &claim("a", "w1", 900), "me").unwrap()),
            Decision::Won
        );
        assert!(matches!(
            decision(apply(&s, &claim("b", "w2", 1_800), "me").unwrap()),
            Decision::Busy(_)
        ));
        // Past the renewed lease (900 + 1000) the next claim takes over.
        assert_eq!(
            decision(apply(&s, &claim("b", "w2", 1_901), "me").unwrap()),
            Decision::Won
        );
    }

    #[tokio::test]
    async fn release_frees_and_outcome_ends_claims() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        apply(&s, &claim("a", "w1", 100), "me").unwrap();
        // A release by someone else's claim id changes nothing.
        apply(
            &s,
            &Record::Release {
                key: "k".into(),
                claim_id: "x".into(),
            },
            "me",
        )
        .unwrap();
        assert!(matches!(
            decision(apply(&s, &claim("b", "w2", 200), "me").unwrap()),
            Decision::Busy(_)
        ));
        apply(
            &s,
            &Record::Release {
                key: "k".into(),
                claim_id: "a".into(),
            },
            "me",
        )
        .unwrap();
        assert_eq!(
            decision(apply(&s, &claim("b", "w2", 300), "me").unwrap()),
            Decision::Won
        );
        let applied = apply(
            &s,
            &Record::Outcome {
                key: "k".into(),
                record: Box::new(completed("w2")),
                audit: Box::default(),
            },
            "me",
        )
        .unwrap();
        assert!(matches!(applied, Applied::Foreign(_)));
        assert!(matches!(
            decision(apply(&s, &claim("c", "w3", 400), "me").unwrap()),
            Decision::Done(r) if r.conversation_id.as_deref() == Some("conv")
        ));
    }
}
