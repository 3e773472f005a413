//! Unit tests of `store/mod.rs`.

use super::*;

fn open() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_group_commits_and_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = store.clone();
            tokio::spawn(async move {
                let key = format!("k{i}");
                assert_eq!(
                    s.claim(&key, "fp", "w").unwrap(),
                    Claim::Proceed { attempts: 0 }
                );
                s.durable().await.unwrap();
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let commits = store.group_commits();
    assert!(
        (1..64).contains(&commits),
        "64 concurrent writers took {commits} group commits"
    );
    drop(store);
    // Reopen once the flusher task has seen its channel close and let go of the database:
    // every durable write is there.
    let mut reopened = None;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Ok(s) = Store::open(dir.path(), Duration::from_secs(3600)) {
            reopened = Some(s);
            break;
        }
    }
    let store = reopened.expect("store reopens after the flusher stops");
    for i in 0..64 {
        let rec = store.get(&format!("k{i}")).unwrap().unwrap();
        assert_eq!(rec.state, IdemState::InProgress);
    }
}

#[tokio::test]
async fn claim_states() {
    let (_d, s) = open();
    assert_eq!(
        s.claim("k", "fp", "w").unwrap(),
        Claim::Proceed { attempts: 0 }
    );
    // Left in progress (a crash): proceed again, keeping the attempts.
    let mut rec = s.get("k").unwrap().unwrap();
    rec.attempts = 2;
    s.put("k", &rec).unwrap();
    assert_eq!(
        s.claim("k", "fp", "w").unwrap(),
        Claim::Proceed { attempts: 2 }
    );
    assert!(matches!(
        s.claim("k", "other", "w").unwrap(),
        Claim::Conflict(_)
    ));
    let mut rec = s.get("k").unwrap().unwrap();
    rec.state = IdemState::Completed;
    rec.conversation_id = Some("c".into());
    s.put("k", &rec).unwrap();
    match s.claim("k", "fp", "w").unwrap() {
        Claim::Completed(r) => assert_eq!(r.conversation_id.as_deref(), Some("c")),
        other => panic!("{other:?}"),
    }
    s.durable().await.unwrap();
}

#[tokio::test]
async fn a_claim_never_overwrites_an_outcome_stored_after_its_read() {
    let (_d, s) = open();
    let read = s.trees().unwrap().idem.get(b"k").unwrap();
    // The ledger reader stores another pod's outcome between the claim's read and write.
    s.claim("k", "fp", "other-pod").unwrap();
    let mut rec = s.get("k").unwrap().unwrap();
    rec.state = IdemState::Completed;
    rec.conversation_id = Some("c".into());
    s.put("k", &rec).unwrap();
    assert_eq!(s.claim_as_read("k", "fp", "w", read).unwrap(), None);
    assert_eq!(s.get("k").unwrap().unwrap().state, IdemState::Completed);
    // Read again, the claim finds the outcome.
    assert!(matches!(
        s.claim("k", "fp", "w").unwrap(),
        Claim::Completed(r) if r.conversation_id.as_deref() == Some("c")
    ));
}

#[tokio::test]
async fn failed_key_is_retried() {
    let (_d, s) = open();
    s.claim("k", "fp", "w").unwrap();
    let mut rec = s.get("k").unwrap().unwrap();
    rec.state = IdemState::Failed;
    rec.attempts = 5;
    s.put("k", &rec).unwrap();
    assert_eq!(
        s.claim("k", "fp", "w").unwrap(),
        Claim::Proceed { attempts: 5 }
    );
}

#[tokio::test]
async fn group_commit_serves_concurrent_waiters() {
    let (_d, s) = open();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.claim(&format!("k{i}"), "fp", "w").unwrap();
            s.durable().await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(s.trees().unwrap().idem.len(), 50);
}

#[tokio::test]
async fn audit_is_ordered_and_pruned() {
    let (_d, s) = open();
    for i in 0..3 {
        s.append_audit(&AuditEntry {
            outcome: format!("o{i}"),
            ..Default::default()
        })
        .unwrap();
    }
    let all: Vec<_> = s.audit_all().map(|e| e.unwrap().outcome).collect();
    assert_eq!(all, vec!["o0", "o1", "o2"]);
    // Nothing is older than a day.
    assert_eq!(s.prune(Duration::from_secs(86_400)).unwrap(), (0, 0));
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(s.prune(Duration::from_millis(1)).unwrap().1, 3);
    assert_eq!(s.audit_len(), 0);
}

#[tokio::test]
async fn expired_keys_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let s = Store::open(dir.path(), Duration::from_millis(1)).unwrap();
    s.claim("k", "fp", "w").unwrap();
    let mut rec = s.get("k").unwrap().unwrap();
    rec.state = IdemState::Completed;
    s.put("k", &rec).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    // Past the TTL the key is new again, even with another body.
    assert_eq!(
        s.claim("k", "fp2", "w").unwrap(),
        Claim::Proceed { attempts: 0 }
    );
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(s.prune(Duration::from_secs(60)).unwrap().0, 1);
}
