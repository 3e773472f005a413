//! Unit tests of `fleet/writer.rs`.

use super::*;
use std::time::Duration;

fn audits(offset: u64, n: usize) -> Batch {
    Batch {
        records: Vec::new(),
        audits: entries(offset, n),
    }
}

fn entries(offset: u64, n: usize) -> Vec<ForeignAudit> {
    (0..n)
        .map(|index| ForeignAudit {
            audit: Json::new(&AuditEntry {
                idempotency_key: Some(format!("k{offset}-{index}")),
                outcome: "started".into(),
                ..Default::default()
            }),
            at_ms: crate::store::now_ms(),
            offset,
            index,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_met_by_a_failing_store_is_stored_once_the_store_heals() {
    let dir = tempfile::tempdir().unwrap();
    // Opened in the runtime: the healer reopens it after a failure.
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let writer = Writer::start(store.clone(), Shutdown::never());
    store.fail_for_test();
    writer.send(audits(1, 5)).await;
    assert!(writer.done().await, "nothing was given up");
    assert!(
        store.failure().is_none(),
        "done waited for the store to heal"
    );
    assert_eq!(store.audit_all().count(), 5);
}

/// Hand `batch` over, then fail the store and shut down: `done` must say something was
/// given up (the offset is held).
fn given_up_at_shutdown(batch: Batch) -> bool {
    let dir = tempfile::tempdir().unwrap();
    // Opened outside a runtime: no healer, so the store fails until the test ends.
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (trigger, shutdown) = Shutdown::new();
        let writer = Writer::start(store.clone(), shutdown);
        // A run is gathered now and stored at `done`, after the store failed.
        let gathered = !batch.records.is_empty();
        if gathered {
            writer.send(batch).await;
            store.fail_for_test();
            trigger.fire();
        } else {
            store.fail_for_test();
            trigger.fire();
            writer.send(batch).await;
        }
        !writer.done().await
    })
}

#[test]
fn shutdown_while_the_store_fails_gives_the_entry_up_and_done_says_so() {
    assert!(given_up_at_shutdown(audits(1, 1)));
}

#[test]
fn shutdown_while_the_store_fails_gives_a_run_up_and_done_says_so() {
    assert!(given_up_at_shutdown(restored(
        (0..5).map(|i| format!("k{i}"))
    )));
}

#[tokio::test]
async fn other_pods_audit_entries_are_all_stored_once_the_writer_says_done() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let writer = Writer::start(store.clone(), Shutdown::never());
    for offset in 0..20u64 {
        writer.send(audits(offset, 10)).await;
    }
    assert!(writer.done().await);
    assert_eq!(store.audit_all().count(), 200);
}

fn completed(k: &str) -> IdemRecord {
    IdemRecord {
        state: crate::store::IdemState::Completed,
        fingerprint: format!("fp-{k}"),
        attempts: 1,
        conversation_id: Some(format!("conv-{k}")),
        event: None,
        worker_id: "w2".into(),
        created_at_ms: 1,
        updated_at_ms: 2,
    }
}

fn restored(keys: impl Iterator<Item = String>) -> Batch {
    Batch {
        records: keys
            .map(|k| {
                let record = Json::new(&completed(&k));
                (k, record)
            })
            .collect(),
        audits: Vec::new(),
    }
}

#[tokio::test]
async fn restored_records_go_to_a_run_and_are_all_stored_when_the_writer_says_done() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let writer = Writer::start(store.clone(), Shutdown::never());
    let key = |i: u64| format!("k-{:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    for message in 0..50u64 {
        writer
            .send(restored((0..20).map(|i| key(message * 20 + i))))
            .await;
    }
    // Gathered, not stored yet: the run is stored when the reader asks.
    assert!(store.get(&key(0)).unwrap().is_none());
    assert!(writer.done().await);
    for i in 0..1000 {
        assert_eq!(store.get(&key(i)).unwrap(), Some(completed(&key(i))));
    }
    let spills = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".spill")
        })
        .count();
    assert_eq!(spills, 0, "the spill file is gone");
}

#[tokio::test]
async fn records_that_cannot_spill_are_stored_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let nowhere = dir.path().join("no-such-directory");
    let writer = Writer::spilling_into(store.clone(), Shutdown::never(), nowhere);
    writer
        .send(restored((0..30).map(|i| format!("k{i}"))))
        .await;
    assert!(writer.done().await, "nothing was given up");
    assert!(!writer.spilling.load(Ordering::SeqCst), "runs stopped");
    for i in 0..30 {
        let k = format!("k{i}");
        assert_eq!(store.get(&k).unwrap(), Some(completed(&k)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_records_met_by_a_failing_store_are_stored_once_it_heals() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let writer = Writer::start(store.clone(), Shutdown::never());
    store.fail_for_test();
    let batch = Batch {
        records: ["a", "b"]
            .iter()
            .map(|k| (k.to_string(), Json::new(&completed(k))))
            .collect(),
        audits: entries(3, 2),
    };
    writer.send(batch).await;
    assert!(writer.done().await, "nothing was given up");
    assert_eq!(store.get("a").unwrap(), Some(completed("a")));
    assert_eq!(store.get("b").unwrap(), Some(completed("b")));
    assert_eq!(store.audit_all().count(), 2);
}
