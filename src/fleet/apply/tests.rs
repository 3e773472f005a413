//! Unit tests of `fleet/apply.rs`.

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
