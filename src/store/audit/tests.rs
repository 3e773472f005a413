//! Unit tests of `store/audit.rs`.

use super::*;
use std::time::Duration;

#[test]
fn a_foreign_entry_applied_twice_is_stored_once_in_time_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let entry = |k: &str| AuditEntry {
        idempotency_key: Some(k.into()),
        outcome: "started".into(),
        ..Default::default()
    };
    let json = |k: &str| serde_json::to_string(&entry(k)).unwrap();
    s.append_audit(&entry("local")).unwrap();
    let then = super::super::now_ms() - 60_000;
    s.put_foreign_audit(&json("a"), then, 41, 0).unwrap();
    s.put_foreign_audit(&json("b"), then, 41, 1).unwrap();
    // The same ledger records again (a restart before the offset was saved).
    s.put_foreign_audit(&json("a"), then, 41, 0).unwrap();
    s.put_foreign_audit(&json("b"), then, 41, 1).unwrap();
    // A time far ahead (a broken record) is filed under now, so retention prunes it.
    s.put_foreign_audit(&json("future"), u64::MAX, 42, 0)
        .unwrap();
    let keys: Vec<_> = s
        .audit_all()
        .map(|e| e.unwrap().idempotency_key.unwrap())
        .collect();
    // "future" is filed under the current millisecond, "local" under its microsecond.
    let (older, recent) = keys.split_at(2);
    assert_eq!(older, ["a", "b"]);
    let mut recent = recent.to_vec();
    recent.sort();
    assert_eq!(recent, ["future", "local"]);
    let within_a_second = (super::super::now_ms() + 1_000) * 1_000;
    assert_eq!(
        s.audit_range(0, within_a_second).count(),
        4,
        "nothing filed in the future, where retention would never reach it"
    );
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    (dir, s)
}

/// An entry of `key`'s, as JSON.
fn json(key: &str) -> String {
    serde_json::to_string(&AuditEntry {
        idempotency_key: Some(key.into()),
        outcome: "started".into(),
        ..Default::default()
    })
    .unwrap()
}

#[test]
fn a_foreign_entry_is_found_by_key_and_time_from_any_ledger_position() {
    let (_dir, s) = store();
    let then = super::super::now_ms() - 60_000;
    assert!(!s.has_foreign_audit("a", then).unwrap());
    s.put_foreign_audit(&json("a"), then, 7, 3).unwrap();
    s.put_foreign_audit(&json("b"), then, 7, 4).unwrap();
    assert!(s.has_foreign_audit("a", then).unwrap());
    assert!(s.has_foreign_audit("b", then).unwrap());
    assert!(!s.has_foreign_audit("c", then).unwrap(), "another key");
    assert!(!s.has_foreign_audit("a", then + 1).unwrap(), "another time");
    // This pod's own entry for a key is not another pod's.
    s.insert_audit(json("own").as_bytes(), then * 1000, None)
        .unwrap();
    assert!(!s.has_foreign_audit("own", then).unwrap());
}

#[test]
fn a_messages_entries_are_read_one_by_one_in_time_order_and_by_their_own_times() {
    let (_dir, s) = store();
    let t = super::super::now_ms() - 600_000;
    // One ledger message: a, b and c within the spread share one value; d lies further
    // on and gets its own. This pod's own entry x lies between a and c.
    let (a, b, c, d) = (json("a"), json("b"), json("c"), json("d"));
    let message = [
        ForeignEntry {
            at_ms: t + 900,
            index: 0,
            json: &c,
        },
        ForeignEntry {
            at_ms: t,
            index: 1,
            json: &a,
        },
        ForeignEntry {
            at_ms: t + 5_000,
            index: 2,
            json: &d,
        },
        ForeignEntry {
            at_ms: t + 400,
            index: 3,
            json: &b,
        },
    ];
    s.put_foreign_audits(9, &message).unwrap();
    s.insert_audit(json("x").as_bytes(), (t + 500) * 1000, None)
        .unwrap();
    // Applied again after a restart: replaces its values, adds nothing.
    s.put_foreign_audits(9, &message).unwrap();
    let keys = |since_ms: u64, until_ms: u64| -> Vec<String> {
        s.audit_range(since_ms * 1000, until_ms * 1000)
            .map(|e| e.unwrap().idempotency_key.unwrap())
            .collect()
    };
    assert_eq!(keys(0, u64::MAX / 1000), ["a", "b", "x", "c", "d"]);
    assert_eq!(s.audit_len(), 5, "a batch counts its entries");
    // Each entry is in or out of a window by its own time, not its batch's.
    assert_eq!(keys(t + 400, t + 900), ["b", "x"]);
    assert_eq!(keys(t + 1, t + 5_000), ["b", "x", "c"]);
    assert_eq!(keys(t + 901, t + 5_001), ["d"]);
    assert!(
        keys(t + 5_000, t).is_empty(),
        "a window that ends before it begins"
    );
    // Found by key and time inside a batch, as a lone entry is.
    assert!(s.has_foreign_audit("a", t).unwrap());
    assert!(s.has_foreign_audit("b", t + 400).unwrap());
    assert!(s.has_foreign_audit("d", t + 5_000).unwrap());
    assert!(!s.has_foreign_audit("b", t).unwrap(), "another time");
    assert!(
        !s.has_foreign_audit("x", t + 500).unwrap(),
        "this pod's own"
    );
    // Retention prunes a batch only once all of it is past: filed under its latest time.
    let pruned_before = |cutoff_ms: u64| {
        let t2 = s.trees().unwrap();
        t2.audit.range(..(cutoff_ms * 1000).to_be_bytes()).count()
    };
    assert_eq!(
        pruned_before(t + 899),
        1,
        "x only: the batch of a, b and c is kept whole"
    );
    assert_eq!(pruned_before(t + 901), 2, "the batch and x");
}

#[test]
fn an_audit_value_that_is_not_json_is_an_error_not_a_stop() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    s.insert_audit(b"[[1,", 1_000, Some(FOREIGN)).unwrap();
    s.append_audit(&AuditEntry::default()).unwrap();
    let read: Vec<_> = s.audit_all().collect();
    assert_eq!(read.len(), 2);
    assert!(matches!(read[0], Err(StoreError::Corrupt { .. })));
    assert!(read[1].is_ok());
}

#[test]
fn a_reader_holds_back_at_most_its_bound_of_entries() {
    let key = |micros: u64, seq: u64| {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&micros.to_be_bytes());
        k[8..].copy_from_slice(&seq.to_be_bytes());
        sled::IVec::from(&k[..])
    };
    // Ten entries filed under one time: none could be handed out before the end.
    let items: Vec<sled::Result<(sled::IVec, sled::IVec)>> = (0..10)
        .map(|i| {
            Ok((
                key(5_000_000, i),
                sled::IVec::from(json(&format!("k{i}")).as_bytes()),
            ))
        })
        .collect();
    let read = std::cell::Cell::new(0);
    let mut entries = InTimeOrder {
        items: items.into_iter().inspect(|_| read.set(read.get() + 1)),
        since_us: 0,
        until_us: u64::MAX,
        pending: BinaryHeap::new(),
        max_pending: 3,
        horizon: 0,
        count: 0,
        done: false,
    };
    let first = entries.next().unwrap().unwrap();
    assert_eq!(first.idempotency_key.as_deref(), Some("k0"));
    assert_eq!(read.get(), 4, "handed out once more than the bound waited");
    let rest: Vec<_> = entries
        .map(|e| e.unwrap().idempotency_key.unwrap())
        .collect();
    assert_eq!(rest, (1..10).map(|i| format!("k{i}")).collect::<Vec<_>>());
}
