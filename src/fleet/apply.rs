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
            let (claim_id, at_ms) = (claim_id.clone(), *at_ms);
            let this_claim = || FleetClaim {
                claim_id: claim_id.clone(),
                worker_id: claimer.clone(),
                fingerprint: fingerprint.clone(),
                at_ms,
                lease_ms: *lease_ms,
            };
            let read = !matches!(known, Known::Open | Known::Absent);
            if read && store.state_of(key)?.is_some_and(IdemState::is_final) {
                if let Some(rec) = store.get(key)? {
                    if *claimer == worker_id
                        && rec.worker_id == worker_id
                        && at_ms <= rec.updated_at_ms
                    {
                        // This pod's claim that led to its own outcome, read again after a
                        // restart: it stays in the view until the outcome follows in the
                        // ledger, so the pod can tell whether the fleet ever heard it
                        // (`Fleet::unheard`).
                        claims.insert(key, this_claim());
                    }
                    return Ok(Applied::Claim {
                        claim_id,
                        decision: Decision::Done(Box::new(rec)),
                    });
                }
            }
            if let Some(held) = claims.get(key) {
                // A pod holds a key under its per-key lock until the claim ends, so another
                // claim from the same pod means the holder restarted: its claim is dead.
                let restarted = held.worker_id == *claimer;
                if held.claim_id != claim_id && held.live_at(at_ms) && !restarted {
                    return Ok(Applied::Claim {
                        claim_id,
                        decision: Decision::Busy(held.clone()),
                    });
                }
            }
            claims.insert(key, this_claim());
            Ok(Applied::Claim {
                claim_id,
                decision: Decision::Won,
            })
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
        Record::Outcome(OutcomeRecord {
            key,
            head,
            record,
            audit,
        }) => {
            let mut told_before = false;
            if !replay {
                // Checked whole before it is stored as it came, and against the head every
                // pod decides on.
                if !record.parse().is_some_and(|r| head.of(&r)) {
                    return Ok(Applied::Stranger);
                }
                if known == Known::Absent {
                    // A new store restoring: nothing to read, and the caller stores the
                    // record and its audit entry (even this pod's own: its entry went with
                    // the lost volume).
                    claims.remove(key);
                    return Ok(Applied::Restored {
                        record: record.clone(),
                        audit: audit.clone(),
                        at_ms: head.updated_at_ms,
                    });
                }
                // An `unknown` from the ledger does not overwrite a local `completed` either;
                // a local `unknown` is replaced by whatever the fleet learned.
                let state = store.state_of(key)?;
                // The same outcome told again (its pod stopped before the ledger had it), or
                // read again after a restart: its audit entry is here already, unless its
                // insert failed (a failing store), and then it is stored now.
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

    /// A store of its own (kept while the directory lives).
    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        (dir, s)
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
        let (_dir, s) = store();
        let c = &mut Claims::default();
        assert_eq!(
            decision(apply(&s, c, &claim("a", "w1", 100), "me", Known::Nothing).unwrap()),
            Decision::Won
        );
        // A second pod inside the lease loses; the owner renewing keeps it.
        assert!(matches!(
            decision(apply(&s, c, &claim("b", "w2", 500), "me", Known::Nothing).unwrap()),
            Decision::Busy(c) if c.claim_id == "a"
        ));
        assert_eq!(
            decision(apply(&s, c, &claim("a", "w1", 900), "me", Known::Nothing).unwrap()),
            Decision::Won
        );
        assert!(matches!(
            decision(apply(&s, c, &claim("b", "w2", 1_800), "me", Known::Nothing).unwrap()),
            Decision::Busy(_)
        ));
        // Past the renewed lease (900 + 1000) the next claim takes over.
        assert_eq!(
            decision(apply(&s, c, &claim("b", "w2", 1_901), "me", Known::Nothing).unwrap()),
            Decision::Won
        );
    }

    #[tokio::test]
    async fn release_frees_and_outcome_ends_claims() {
        let (_dir, s) = store();
        let c = &mut Claims::default();
        apply(&s, c, &claim("a", "w1", 100), "me", Known::Nothing).unwrap();
        // A release by someone else's claim id changes nothing.
        apply(
            &s,
            c,
            &Record::Release {
                key: "k".into(),
                claim_id: "x".into(),
            },
            "me",
            Known::Nothing,
        )
        .unwrap();
        assert!(matches!(
            decision(apply(&s, c, &claim("b", "w2", 200), "me", Known::Nothing).unwrap()),
            Decision::Busy(_)
        ));
        apply(
            &s,
            c,
            &Record::Release {
                key: "k".into(),
                claim_id: "a".into(),
            },
            "me",
            Known::Nothing,
        )
        .unwrap();
        assert_eq!(
            decision(apply(&s, c, &claim("b", "w2", 300), "me", Known::Nothing).unwrap()),
            Decision::Won
        );
        let applied = apply(
            &s,
            c,
            &Record::outcome("k", &completed("w2"), &AuditEntry::default()),
            "me",
            Known::Nothing,
        )
        .unwrap();
        assert!(matches!(applied, Applied::Foreign { .. }));
        assert!(matches!(
            decision(apply(&s, c, &claim("c", "w3", 400), "me", Known::Nothing).unwrap()),
            Decision::Done(r) if r.conversation_id.as_deref() == Some("conv")
        ));
    }

    #[tokio::test]
    async fn this_pods_claim_before_its_own_outcome_stays_until_the_outcome_follows() {
        let (_dir, s) = store();
        let mut rec = completed("me");
        rec.updated_at_ms = 500;
        s.put("k", &rec).unwrap();
        let c = &mut Claims::default();
        // A claim made after the outcome (the key asked again) is not kept.
        apply(&s, c, &claim("late", "me", 600), "me", Known::Nothing).unwrap();
        assert!(c.get("k").is_none());
        // The claim that led to it is, until the outcome comes through the ledger.
        apply(&s, c, &claim("a", "me", 100), "me", Known::Applied).unwrap();
        assert_eq!(c.get("k").map(|h| h.claim_id.as_str()), Some("a"));
        let outcome = Record::outcome("k", &rec, &AuditEntry::default());
        apply(&s, c, &outcome, "me", Known::Nothing).unwrap();
        assert!(c.get("k").is_none());
    }

    #[tokio::test]
    async fn what_the_reader_knows_spares_the_store_reads() {
        let (_dir, s) = store();
        let c = &mut Claims::default();
        s.put("k", &completed("w2")).unwrap();
        // Read, the store decides; an open claim is decided on the live claims alone (the
        // worker saw `in_progress` and nothing touched the key since).
        assert!(matches!(
            decision(apply(&s, c, &claim("a", "me", 100), "me", Known::Nothing).unwrap()),
            Decision::Done(_)
        ));
        assert_eq!(
            decision(apply(&s, c, &claim("b", "me", 200), "me", Known::Open).unwrap()),
            Decision::Won
        );
        // An own outcome the store holds already is not written again.
        let mut failed = completed("me");
        failed.state = IdemState::Failed;
        let outcome = Record::outcome("k", &failed, &AuditEntry::default());
        s.remove("k").unwrap();
        assert_eq!(
            apply(&s, c, &outcome, "me", Known::Applied).unwrap(),
            Applied::Other
        );
        assert_eq!(s.get("k").unwrap(), None);
        assert!(c.get("k").is_none());
        apply(&s, c, &outcome, "me", Known::Nothing).unwrap();
        assert_eq!(s.get("k").unwrap().unwrap().state, IdemState::Failed);
    }

    #[tokio::test]
    async fn a_new_store_restoring_decides_alike_without_reads_and_keeps_its_own_audit() {
        let (_dir, s) = store();
        let c = &mut Claims::default();
        // Claim and outcome of a key the new store has not written: as with a read.
        assert_eq!(
            decision(apply(&s, c, &claim("a", "w1", 100), "me", Known::Absent).unwrap()),
            Decision::Won
        );
        assert!(matches!(
            decision(apply(&s, c, &claim("b", "w2", 200), "me", Known::Absent).unwrap()),
            Decision::Busy(c) if c.claim_id == "a"
        ));
        let foreign = Record::outcome("k", &completed("w1"), &AuditEntry::default());
        let Applied::Restored { record, at_ms, .. } =
            apply(&s, c, &foreign, "me", Known::Absent).unwrap()
        else {
            panic!("an absent key's outcome is handed back to be stored")
        };
        let record = record.parse().unwrap();
        assert_eq!(record.worker_id, "w1");
        assert_eq!(
            at_ms, record.updated_at_ms,
            "filed under the outcome's time"
        );
        assert_eq!(s.get("k").unwrap(), None, "the caller stores it");
        assert!(c.get("k").is_none(), "the outcome ended the claim");
        // This pod's own outcome, from before it lost its volume: its audit entry is gone
        // with the volume, so it is restored too (read, a live pod's own outcome is not).
        let own = Record::outcome("j", &completed("me"), &AuditEntry::default());
        assert!(matches!(
            apply(&s, c, &own, "me", Known::Absent).unwrap(),
            Applied::Restored { .. }
        ));
        let own = Record::outcome("i", &completed("me"), &AuditEntry::default());
        assert_eq!(
            apply(&s, c, &own, "me", Known::Nothing).unwrap(),
            Applied::Other
        );
        // A forget of a key never stored.
        let forget = Record::Forget { key: "h".into() };
        assert_eq!(
            apply(&s, c, &forget, "me", Known::Absent).unwrap(),
            Applied::Other
        );
    }

    #[tokio::test]
    async fn an_outcome_whose_record_is_not_whole_is_a_stranger_and_changes_nothing() {
        let (_dir, s) = store();
        let c = &mut Claims::default();
        apply(&s, c, &claim("a", "w1", 100), "me", Known::Nothing).unwrap();
        // The fields the reader decides on are there; the fingerprint is not.
        let body = br#"{"kind":"outcome","key":"k","record":{"state":"completed","worker_id":"w1","updated_at_ms":5},"audit":{}}"#;
        let record = Record::decode(body).expect("decodes: the head is there");
        assert_eq!(
            apply(&s, c, &record, "me", Known::Nothing).unwrap(),
            Applied::Stranger
        );
        assert_eq!(s.get("k").unwrap(), None);
        assert!(c.get("k").is_some(), "the claim stays");
        // A whole one is stored as it came.
        let rec = completed("w1");
        let whole = Record::outcome("k", &rec, &AuditEntry::default());
        apply(&s, c, &whole, "me", Known::Nothing).unwrap();
        assert_eq!(s.get("k").unwrap(), Some(rec));
        assert!(c.get("k").is_none());
    }

    #[tokio::test]
    async fn an_outcome_read_again_brings_its_audit_entry_only_while_it_is_missing() {
        let (_dir, s) = store();
        let c = &mut Claims::default();
        let audit = AuditEntry {
            idempotency_key: Some("k".into()),
            ..Default::default()
        };
        let outcome = Record::outcome("k", &completed("w2"), &audit);
        let first = apply(&s, c, &outcome, "me", Known::Nothing).unwrap();
        assert!(matches!(first, Applied::Foreign { .. }), "{first:?}");
        // The entry's insert failed (a failing store) and the record is read again after a
        // restart: the entry is handed over again, to be stored under the same position.
        let again = apply(&s, c, &outcome, "me", Known::Nothing).unwrap();
        let Applied::Foreign { audit, at_ms } = again else {
            panic!("{again:?}")
        };
        s.put_foreign_audit(audit.text(), at_ms, 10, 0).unwrap();
        // Told again (at another position): the entry is here, no second one.
        let told = apply(&s, c, &outcome, "me", Known::Nothing).unwrap();
        assert_eq!(told, Applied::Other);
    }

    #[tokio::test]
    async fn a_restart_rebuilds_the_claims_from_a_snapshot_and_the_records_after_it() {
        let (_dir, s) = store();
        let key = |k: &str, r: Record| match r {
            Record::Claim {
                claim_id,
                worker_id,
                fingerprint,
                at_ms,
                lease_ms,
                ..
            } => Record::Claim {
                key: k.into(),
                claim_id,
                worker_id,
                fingerprint,
                at_ms,
                lease_ms,
            },
            other => other,
        };
        let records = [
            key("a", claim("a1", "w1", 100)),
            key("b", claim("b1", "w2", 110)),
            key("c", claim("c1", "w3", 120)),
            Record::outcome("a", &completed("w1"), &AuditEntry::default()),
            key("b", claim("b2", "w1", 130)),
            Record::Release {
                key: "c".into(),
                claim_id: "c1".into(),
            },
            key("d", claim("d1", "w2", 140)),
            key("c", claim("c2", "w1", 150)),
        ];
        // Applied as it came, with a snapshot after the third record.
        let mut live = Claims::default();
        for (offset, r) in records.iter().enumerate() {
            apply(&s, &mut live, r, "me", Known::Nothing).unwrap();
            live.set_offset(offset as u64);
            if offset == 2 {
                live.save(&s).unwrap();
            }
        }
        s.set_ledger_offset(records.len() as u64 - 1).unwrap();
        // A restart: the snapshot, then every later record again; the store has them all.
        let mut back = Claims::load(&s).unwrap();
        assert_eq!(back.offset(), Some(2));
        for (offset, r) in records.iter().enumerate().skip(3) {
            let applied = apply(&s, &mut back, r, "me", Known::Applied).unwrap();
            assert!(
                !matches!(applied, Applied::Foreign { .. }),
                "no audit twice"
            );
            back.set_offset(offset as u64);
        }
        assert_eq!(back, live);
        assert_eq!(back.get("b").map(|c| c.claim_id.as_str()), Some("b1"));
        assert_eq!(back.get("c").map(|c| c.claim_id.as_str()), Some("c2"));
        assert!(back.get("a").is_none());
    }

    #[tokio::test]
    async fn an_outcome_whose_head_disagrees_with_its_record_is_a_stranger() {
        let (_dir, s) = store();
        let c = &mut Claims::default();
        let Record::Outcome(mut o) = Record::outcome("k", &completed("w1"), &AuditEntry::default())
        else {
            unreachable!()
        };
        o.head.state = IdemState::Failed;
        let forged = Record::Outcome(o);
        for known in [Known::Nothing, Known::Absent] {
            assert_eq!(
                apply(&s, c, &forged, "me", known).unwrap(),
                Applied::Stranger,
                "{known:?}"
            );
        }
        assert_eq!(s.get("k").unwrap(), None, "nothing stored");
    }
}
