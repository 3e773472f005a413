//! The fleet (SPEC §9) with real worker processes on the real broker: several pods, each with
//! its own store and worker id, on the same queues and the same ledger stream.

mod common;

use common::{bodies, drained, publish_all, request, Pod, TestEnv};
use session_worker::sim::Faults;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_with_republishes_and_a_kill_make_one_session_per_key() {
    let faults = Faults {
        latency_ms: 10,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |_| {}).await;
    let concurrency = env.settings.worker.concurrency as u64;
    let mut pods: Vec<Pod> = (0..3).map(|i| Pod::new(&env, &format!("pod{i}"))).collect();
    for p in &mut pods {
        p.start();
    }
    let n = 600;
    let all = bodies("fleet-", n);
    publish_all(&env, &all).await;
    // Re-publish every request twice while the pods work, and kill one pod mid-run.
    publish_all(&env, &all).await;
    let reached = env
        .wait_for(Duration::from_secs(60), || {
            env.sim.sim.stats().distinct_visitors >= n as u64 / 3
        })
        .await;
    assert!(reached, "the fleet made progress");
    pods[1].kill();
    publish_all(&env, &all).await;
    pods[1].start();
    let done = env
        .wait_for(Duration::from_secs(120), || {
            env.sim.sim.stats().distinct_visitors >= n as u64
        })
        .await;
    assert!(
        drained(&env, Duration::from_secs(120)).await,
        "queues drained"
    );
    let stats = env.sim.sim.stats();
    for p in &mut pods {
        assert_eq!(p.stop(), Some(0), "SIGTERM exits 0");
    }
    assert!(done, "every key got a session: {stats:?}");
    assert_eq!(stats.distinct_visitors, n as u64);
    // Only a pod killed between Genesys's answer and its record may repeat a call: at most
    // its in-flight count.
    assert!(
        stats.duplicate_sessions <= concurrency,
        "duplicates bounded by the killed pod's in-flight work: {stats:?}"
    );
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
    eprintln!(
        "fleet drill: {n} keys × 3 publishes on 3 pods, one SIGKILL: {} sessions, {} duplicated",
        stats.sessions_created, stats.duplicate_sessions
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_on_an_empty_store_knows_the_fleets_history() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let n = 300;
    let all = bodies("history-", n);

    let mut first = Pod::new(&env, "first");
    first.start();
    publish_all(&env, &all).await;
    let events = env.events(n, Duration::from_secs(60)).await;
    assert_eq!(events.len(), n, "the first pod finished every key");
    assert_eq!(first.stop(), Some(0));
    let calls_before = env.sim.sim.stats().session_requests;
    let ids_before: HashSet<_> = events.iter().map(|e| e.event_id.clone()).collect();

    // A new replica on an empty volume receives the same requests again.
    let mut fresh = Pod::new(&env, "fresh");
    assert!(
        !fresh.store.exists(),
        "the new pod starts on an empty store"
    );
    fresh.start();
    publish_all(&env, &all).await;
    let replayed = env.events(n, Duration::from_secs(60)).await;
    assert_eq!(fresh.stop(), Some(0));
    assert_eq!(replayed.len(), n, "every re-published key was answered");
    assert_eq!(
        env.sim.sim.stats().session_requests,
        calls_before,
        "no API call for keys the fleet already completed"
    );
    let ids_after: HashSet<_> = replayed.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(ids_after, ids_before, "the same event ids are re-published");

    // `audit show KEY` on the pod that did not process KEY reports its outcome.
    let key = &events[0].idempotency_key;
    let text = audit_show(&fresh, key);
    assert!(
        text.contains("\"outcome\":\"started\"") && text.contains("-first"),
        "the outcome and the pod that produced it: {text}"
    );

    // The first pod loses its volume and comes back under the same name (a StatefulSet's
    // lost PVC): its own outcomes' audit entries come back from the ledger too.
    std::fs::remove_dir_all(&first.store).expect("wipe the first pod's store");
    first.start();
    assert!(
        first.ready_within(Duration::from_secs(60)).await.is_some(),
        "the first pod catches up again"
    );
    assert_eq!(first.stop(), Some(0));
    let text = audit_show(&first, key);
    assert!(
        text.contains("\"outcome\":\"started\""),
        "audit show on the wiped pod: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_restoring_a_long_ledger_knows_every_key_and_stops_cleanly() {
    // 16,000 records (a claim and an outcome a key), 40 to a ledger message.
    let n = 8_000;
    // Scattered, as real keys are: the restore sorts them before sled takes them.
    common::ledger::scatter_keys(true);
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    common::ledger::fill_ledger(&env, n, 40).await;
    // Keys that come back within one message, so the reader reads what it has just handed
    // to its writer: a key failed by one pod and then completed by another, and a late
    // claim on a completed key.
    let now = session_worker::store::now_ms();
    let life = |state, worker: &str, at| {
        let mut outcome = common::ledger::outcome_of(0, at);
        if let session_worker::fleet::record::Record::Outcome(o) = &mut outcome {
            let mut record = o.record.parse().expect("the fill's record parses");
            let mut audit = o.audit.parse().expect("the fill's entry parses");
            record.state = state;
            record.worker_id = worker.into();
            audit.idempotency_key = Some("second-life".into());
            audit.worker_id = worker.into();
            audit.outcome = format!("{state:?}").to_lowercase();
            outcome =
                session_worker::fleet::record::Record::outcome("second-life", &record, &audit);
        }
        outcome
    };
    let claim = |key: &str, worker: &str, at| session_worker::fleet::record::Record::Claim {
        key: key.into(),
        claim_id: format!("{worker}-{at}"),
        worker_id: worker.into(),
        fingerprint: "fp-0".into(),
        at_ms: at,
        lease_ms: 60_000,
    };
    use session_worker::store::IdemState::{Completed, Failed};
    common::ledger::append(
        &env,
        &[
            claim("second-life", "pod-a", now),
            life(Failed, "pod-a", now + 1),
            claim("second-life", "pod-b", now + 2),
            life(Completed, "pod-b", now + 3),
            claim(&common::ledger::key_of(0), "late-pod", now + 4),
        ],
    )
    .await;
    let mut pod = Pod::new(&env, "restorer");
    pod.start();
    assert!(
        pod.ready_within(Duration::from_secs(120)).await.is_some(),
        "the pod catches up"
    );
    let applied = pod.metric("ledger_records_applied_total").await;
    assert!(
        applied.is_some_and(|v| v >= 2.0 * n as f64),
        "every record applied before ready: {applied:?}"
    );
    // The pod works on after the restore: a new key gets its session.
    publish_all(&env, &bodies("after-restore-", 20)).await;
    assert_eq!(env.events(20, Duration::from_secs(60)).await.len(), 20);
    assert_eq!(pod.stop(), Some(0), "SIGTERM exits 0");
    for i in [0, n / 2, n - 1] {
        let key = common::ledger::key_of(i);
        let text = audit_show(&pod, &key);
        assert!(
            text.contains(&key) && text.contains("\"outcome\":\"started\""),
            "audit show {key}: {text}"
        );
    }
    let text = audit_show(&pod, "second-life");
    assert!(
        text.contains("\"outcome\":\"failed\"") && text.contains("\"outcome\":\"completed\""),
        "both outcomes of the key are in the trail: {text}"
    );
    let store = session_worker::store::Store::open(&pod.store, Duration::from_secs(3600))
        .expect("the stopped pod's store opens");
    let second = store.get("second-life").expect("read").expect("stored");
    assert_eq!(
        (second.state, second.worker_id.as_str()),
        (Completed, "pod-b")
    );
    let first = store
        .get(&common::ledger::key_of(0))
        .expect("read")
        .expect("stored");
    assert_eq!(
        (first.state, first.worker_id.as_str()),
        (Completed, "another-pod"),
        "a late claim changes no outcome"
    );
    assert_completed(&store, n);
}

/// Every key of a restore fill of `n` is in `store`, completed.
fn assert_completed(store: &session_worker::store::Store, n: usize) {
    let missing: Vec<String> = (0..n)
        .map(common::ledger::key_of)
        .filter(|k| {
            !store
                .get(k)
                .ok()
                .flatten()
                .is_some_and(|r| r.state == session_worker::store::IdemState::Completed)
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {n} keys not restored, e.g. {:?}",
        missing.len(),
        missing.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_killed_while_it_restores_knows_every_key_after_its_restart() {
    const N: usize = 20_000;
    common::ledger::scatter_keys(true);
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    common::ledger::fill_ledger(&env, N, 40).await;
    let mut pod = Pod::new(&env, "killed-restorer");
    pod.start();
    // Killed once it has applied part of the ledger (its gathered records may not be stored
    // yet), or at once if it was quicker than this poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while std::time::Instant::now() < deadline
        && pod
            .metric("ledger_records_applied_total")
            .await
            .is_none_or(|v| v < N as f64)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pod.kill();
    pod.start();
    assert!(
        pod.ready_within(Duration::from_secs(180)).await.is_some(),
        "the restarted pod catches up"
    );
    assert_eq!(pod.stop(), Some(0), "SIGTERM exits 0");
    let store = session_worker::store::Store::open(&pod.store, Duration::from_secs(3600))
        .expect("the stopped pod's store opens");
    assert_completed(&store, N);
}

/// `audit show --json KEY` on a stopped pod's store: what it printed (it must succeed).
fn audit_show(pod: &Pod, key: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("--config")
        .arg(pod.config_path())
        .args(["audit", "show", "--json", key])
        .output()
        .expect("audit show runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "audit show: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_pods_share_one_rate_budget_and_take_a_leavers_share_back() {
    let env = TestEnv::new(Faults::default(), |s| {
        s.rate_limit.requests_per_minute = 600;
        s.rate_limit.burst = 30;
    })
    .await;
    let mut pods: Vec<Pod> = (0..3).map(|i| Pod::new(&env, &format!("b{i}"))).collect();
    for p in &mut pods {
        p.start();
    }
    let wait = Duration::from_secs(20);
    for p in &pods {
        assert_eq!(
            p.metric_becomes("fleet_live_pods", 3.0, wait).await,
            Some(3.0)
        );
        assert_eq!(
            p.metric_becomes("rate_limit_share_per_minute", 200.0, wait)
                .await,
            Some(200.0),
            "three pods take a third of the budget each"
        );
    }
    // Scale down: the leaving pod's share goes back to the other two.
    assert_eq!(pods[2].stop(), Some(0));
    for p in &pods[..2] {
        assert_eq!(
            p.metric_becomes("rate_limit_share_per_minute", 300.0, wait)
                .await,
            Some(300.0),
            "two pods take half each once the third leaves"
        );
    }
    // A pod that dies without saying goodbye is forgotten after the peer expiry.
    pods[1].kill();
    assert_eq!(
        pods[0]
            .metric_becomes("rate_limit_share_per_minute", 600.0, wait)
            .await,
        Some(600.0),
        "the last pod takes the whole budget"
    );
    assert_eq!(pods[0].stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_pod_never_takes_more_than_its_share_while_the_others_answer() {
    let env = TestEnv::new(Faults::default(), |s| {
        s.rate_limit.requests_per_minute = 600;
        s.rate_limit.burst = 30;
    })
    .await;
    let queue = env.settings.amqp.inbound_queue.clone();
    let wait = Duration::from_secs(30);
    let mut a = Pod::new(&env, "h0");
    a.start();
    assert!(
        env.wait_for_async(wait, || async { env.consumer_count(&queue).await == 1 })
            .await,
        "the first pod consumes"
    );
    let mut b = Pod::new(&env, "h1");
    b.start();
    assert!(
        env.wait_for_async(wait, || async { env.consumer_count(&queue).await == 2 })
            .await,
        "the second pod consumes"
    );
    // It consumes once its hello is out; until the answers are in it counts at least one
    // other pod, so from its first delivery its share is never above half.
    assert_eq!(b.metric("rate_limit_share_per_minute").await, Some(300.0));
    assert_eq!(
        b.metric_becomes("fleet_live_pods", 2.0, wait).await,
        Some(2.0)
    );
    assert_eq!(b.metric("rate_limit_share_per_minute").await, Some(300.0));
    assert_eq!(
        a.metric_becomes("rate_limit_share_per_minute", 300.0, wait)
            .await,
        Some(300.0)
    );
    assert_eq!(b.stop(), Some(0));
    assert_eq!(a.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_stop_hearing_themselves_connect_again_and_keep_sharing_the_budget() {
    let env = TestEnv::new(Faults::default(), |s| {
        s.rate_limit.requests_per_minute = 600;
        s.rate_limit.burst = 30;
    })
    .await;
    let wait = Duration::from_secs(30);
    let mut pods: Vec<Pod> = ["mute0", "mute1"]
        .iter()
        .map(|n| Pod::new(&env, n))
        .collect();
    for p in &mut pods {
        p.start();
    }
    for p in &pods {
        assert!(p.ready_within(wait).await.is_some(), "the pod gets ready");
        assert_eq!(
            p.metric_becomes("fleet_live_pods", 2.0, wait).await,
            Some(2.0)
        );
        assert_eq!(
            p.metric("rate_limit_held").await,
            Some(0.0),
            "heard: it spends"
        );
    }
    // Both consume (the consumer declares the topology as it connects, the exchange too).
    let queue = env.settings.amqp.inbound_queue.clone();
    assert!(
        env.wait_for_async(wait, || async { env.consumer_count(&queue).await == 2 })
            .await
    );
    let exchange = env.settings.amqp.fleet_exchange.clone();
    let settle = session_worker::fleet::budget::PEER_EXPIRY + Duration::from_secs(3);
    // 1. The fleet exchange disappears: the broker closes each pod's channel at its next
    // heartbeat. Each connects again (declaring the exchange and binding its queue anew) and
    // is heard again before the other forgets it, so neither takes the whole budget.
    env.ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await
        .expect("delete the fleet exchange");
    still_sharing_after(settle, &pods, "the exchange was deleted").await;
    // 2. The exchange is deleted and declared again at once (an operator's declare, another
    // process's topology): every binding is gone, yet every publish still succeeds. The pods
    // stop hearing themselves, hold their calls, and bind their queues again.
    redeclare(&env, &exchange, lapin::ExchangeKind::Fanout).await;
    still_sharing_after(settle, &pods, "the exchange lost its bindings").await;
    env.publish(&request("after-the-exchange-came-back"), None)
        .await;
    assert_eq!(env.events(1, wait).await.len(), 1);
    for p in &mut pods {
        assert_eq!(p.stop(), Some(0));
    }
}

/// The fleet exchange redeclared with another type: the budget listener cannot declare it
/// again, so the pod would hold every call for good while it looks ready. It exits instead
/// (non-zero), like a pod whose ledger reader stops for good, so its orchestrator restarts it
/// and shows the crash loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_whose_budget_listener_stops_for_good_exits() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let wait = Duration::from_secs(20);
    let mut pod = Pod::new(&env, "a");
    pod.start();
    assert!(pod.ready_within(wait).await.is_some(), "the pod gets ready");
    let queue = env.settings.amqp.inbound_queue.clone();
    assert!(
        env.wait_for_async(wait, || async { env.consumer_count(&queue).await == 1 })
            .await
    );
    let exchange = env.settings.amqp.fleet_exchange.clone();
    redeclare(&env, &exchange, lapin::ExchangeKind::Topic).await;
    let code = pod.exited_within(Duration::from_secs(30)).await;
    assert!(
        matches!(code, Some(Some(c)) if c != 0),
        "the pod exits with an error, got {code:?}"
    );
}

/// Delete `exchange` and declare it again at once, durable, of `kind`.
async fn redeclare(env: &TestEnv, exchange: &str, kind: lapin::ExchangeKind) {
    env.ch
        .exchange_delete(exchange.into(), Default::default())
        .await
        .expect("delete the exchange");
    env.ch
        .exchange_declare(
            exchange.into(),
            kind,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("declare it again");
}

/// After `settle`, each of two pods still hears the other, takes half and spends.
async fn still_sharing_after(settle: Duration, pods: &[Pod], what: &str) {
    tokio::time::sleep(settle).await;
    for p in pods {
        assert_eq!(
            p.metric("fleet_live_pods").await,
            Some(2.0),
            "still two pods after {what}"
        );
        assert_eq!(p.metric("rate_limit_share_per_minute").await, Some(300.0));
        assert_eq!(p.metric("rate_limit_held").await, Some(0.0), "heard again");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_the_ledger_never_had_is_told_when_its_key_comes_again() {
    use session_worker::fleet::record::{Record, RECORD_TYPE};
    use session_worker::store::{IdemRecord, IdemState};
    let env = TestEnv::new(Faults::default(), |s| {
        s.worker.claim_lease = Duration::from_secs(600);
    })
    .await;
    let me = env.settings.worker_id();
    // A pod that was killed after its record was durable and before the ledger confirmed
    // the outcome: its store has the key completed, the ledger only its claim.
    let body = request("untold");
    let valid = session_worker::request::validate_message(&body, Some("untold-key")).unwrap();
    let key = valid.idempotency_key.clone();
    let now = session_worker::store::now_ms();
    let store = env.open_store();
    store
        .put(
            &key,
            &IdemRecord {
                state: IdemState::Completed,
                fingerprint: valid.fingerprint.clone(),
                attempts: 1,
                conversation_id: Some("conv-untold".into()),
                event: None,
                worker_id: me.clone(),
                created_at_ms: now,
                updated_at_ms: now,
            },
        )
        .unwrap();
    common::ledger::declare(&env, &env.conn).await;
    let claim = Record::Claim {
        key: key.clone(),
        claim_id: "claim-before-the-kill".into(),
        worker_id: me.clone(),
        fingerprint: valid.fingerprint.clone(),
        at_ms: now - 1_000,
        lease_ms: 600_000,
    };
    let ch = env.conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        "".into(),
        env.settings.amqp.ledger_stream.as_str().into(),
        Default::default(),
        &claim.encode(),
        lapin::BasicProperties::default().with_type(RECORD_TYPE.into()),
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    // The key comes again to that pod: it replays, and tells the fleet the outcome.
    let worker = env.start_worker(store);
    env.publish(&body, Some("untold-key")).await;
    assert_eq!(env.events(1, Duration::from_secs(30)).await.len(), 1);
    worker.stop().await;
    // A pod on an empty store takes the next copy: it replays too, and does not wait out
    // the 10-minute claim of a pod whose outcome the fleet never heard.
    let mut b = Pod::new(&env, "other");
    b.start();
    b.ready_within(Duration::from_secs(60)).await;
    env.publish(&body, Some("untold-key")).await;
    let events = env.events(1, Duration::from_secs(30)).await;
    assert_eq!(b.stop(), Some(0));
    assert_eq!(events.len(), 1, "the other pod replayed the outcome");
    assert_eq!(events[0].conversation_id.as_deref(), Some("conv-untold"));
    assert_eq!(env.sim.sim.stats().session_requests, 0, "no API call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_completed_before_the_ledger_existed_still_deduplicate() {
    use session_worker::store::{IdemRecord, IdemState};
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let store = env.open_store();
    // What a pod of the previous version left in its store: a completed key, no ledger.
    let body = request("upgraded");
    let valid = session_worker::request::validate_message(&body, Some("old-key")).unwrap();
    let now = session_worker::store::now_ms();
    store
        .put(
            &valid.idempotency_key,
            &IdemRecord {
                state: IdemState::Completed,
                fingerprint: valid.fingerprint.clone(),
                attempts: 1,
                conversation_id: Some("conv-from-before".into()),
                event: None,
                worker_id: "old-pod".into(),
                created_at_ms: now,
                updated_at_ms: now,
            },
        )
        .unwrap();
    let worker = env.start_worker(store);
    env.publish(&body, Some("old-key")).await;
    let events = env.events(1, Duration::from_secs(30)).await;
    worker.stop().await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        events[0].conversation_id.as_deref(),
        Some("conv-from-before")
    );
    assert_eq!(env.sim.sim.stats().session_requests, 0, "no API call");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ledger_means_no_call_and_not_ready_and_strangers_are_skipped() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let worker = env.start_worker(env.open_store());
    assert!(
        env.wait_for(Duration::from_secs(30), || worker.health.ready())
            .await
    );
    let stream = env.settings.amqp.ledger_stream.clone();
    // Records this program did not write: skipped, never a crash or a stall.
    for body in [
        &b"not json"[..],
        br#"{"kind":"mystery"}"#,
        &[0xff, 0x00][..],
    ] {
        env.ch
            .basic_publish(
                "".into(),
                stream.as_str().into(),
                Default::default(),
                body,
                Default::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    env.publish(&request("after-strangers"), None).await;
    assert_eq!(env.events(1, Duration::from_secs(30)).await.len(), 1);
    // The ledger goes away: the pod is not ready and makes no call without a claim.
    env.ch
        .queue_delete(stream.as_str().into(), Default::default())
        .await
        .unwrap();
    let calls = env.sim.sim.stats().session_requests;
    env.publish(&request("no-ledger"), None).await;
    let not_ready = env
        .wait_for(Duration::from_secs(20), || !worker.health.ready())
        .await;
    assert!(not_ready, "not ready while the ledger is gone");
    // The reader declares the stream again on reconnect; the request then goes through, once.
    let events = env.events(1, Duration::from_secs(60)).await;
    worker.stop().await;
    assert_eq!(events.len(), 1, "processed once the ledger is back");
    assert_eq!(env.sim.sim.stats().session_requests, calls + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_killed_mid_call_loses_its_key_after_the_lease_and_sigterm_gives_claims_back() {
    // The simulator answers after 3 s; the lease is 4 s.
    let env = TestEnv::new(
        Faults {
            latency_ms: 3_000,
            ..Default::default()
        },
        |s| s.worker.claim_lease = Duration::from_secs(4),
    )
    .await;
    kill_mid_call(&env, "a", "mid-call").await;
    let killed_at = Instant::now();
    let mut b = Pod::new(&env, "b");
    b.start();
    let events = env.events(1, Duration::from_secs(60)).await;
    let taken_over_after = killed_at.elapsed();
    assert_eq!(events.len(), 1, "another pod finished the key");
    assert!(
        taken_over_after >= Duration::from_secs(4),
        "not before the lease lapsed ({taken_over_after:?})"
    );
    // The killed pod's call was answered too: the one duplicate SPEC §9 allows per in-flight call.
    assert!(env.sim.sim.stats().sessions_created <= 2);

    // SIGTERM while calls wait for the rate limiter: those claims are given back at once.
    let env2 = TestEnv::new(Faults::default(), |s| {
        s.rate_limit.requests_per_minute = 2;
        s.rate_limit.burst = 1;
        s.worker.claim_lease = Duration::from_secs(600);
    })
    .await;
    let mut slow = Pod::new(&env2, "slow");
    slow.start();
    assert!(slow.ready_within(Duration::from_secs(30)).await.is_some());
    for i in 0..4 {
        env2.publish(&request(&format!("queued{i}")), None).await;
    }
    assert!(
        env2.wait_for(Duration::from_secs(20), || env2
            .sim
            .sim
            .stats()
            .sessions_created
            >= 1)
            .await
    );
    assert_eq!(slow.stop(), Some(0), "SIGTERM exits 0");
    let mut fast = Pod::with(&env2, "fast", |s| s.rate_limit.requests_per_minute = 6_000);
    fast.start();
    // Far less than the 10-minute lease: the released keys were free at once.
    let done = env2
        .wait_for(Duration::from_secs(60), || {
            env2.sim.sim.stats().distinct_visitors >= 4
        })
        .await;
    assert_eq!(fast.stop(), Some(0));
    assert!(done, "{:?}", env2.sim.sim.stats());
    assert_eq!(env2.sim.sim.stats().duplicate_sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_pod_still_sees_the_live_claim_of_another_pod() {
    // A pod keeps the live claims in memory and saves them when it stops; a restart loads
    // them and reads the ledger on from there. Pod a dies mid-call, its claim live for a
    // minute; pod b learns of it, restarts, and must still leave the key alone.
    let env = TestEnv::new(
        Faults {
            latency_ms: 2_000,
            ..Default::default()
        },
        |s| s.worker.claim_lease = Duration::from_secs(60),
    )
    .await;
    kill_mid_call(&env, "a", "held-by-a").await;
    let mut b = Pod::new(&env, "b");
    b.start();
    assert!(b.ready_within(Duration::from_secs(30)).await.is_some());
    // b hears the key's copy (a's unacked delivery) and parks it: a's claim is live.
    assert!(parks_a_copy(&env, &b).await, "b parks the key a holds");
    assert_eq!(b.stop(), Some(0));
    b.start();
    assert!(b.ready_within(Duration::from_secs(30)).await.is_some());
    // After the restart the parked copy comes back, and b parks it again: no call.
    let parked_again = parks_a_copy(&env, &b).await;
    assert_eq!(b.stop(), Some(0));
    assert!(parked_again, "b, restarted, still parks the key");
    assert_eq!(
        env.sim.sim.stats().session_requests,
        1,
        "only a's call, none by the restarted pod"
    );
}

/// Start pod `name`, publish `key`, and SIGKILL the pod once the simulator has its call.
async fn kill_mid_call(env: &TestEnv, name: &str, key: &str) {
    let mut pod = Pod::new(env, name);
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(30)).await.is_some());
    env.publish(&request(key), None).await;
    let called = env
        .wait_for(Duration::from_secs(20), || {
            env.sim.sim.stats().session_requests >= 1
        })
        .await;
    assert!(called, "{name} calls the simulator");
    pod.kill();
}

/// Whether `pod` parks a copy (another pod holds the key) within 30 s of (re)starting.
async fn parks_a_copy(env: &TestEnv, pod: &Pod) -> bool {
    env.wait_for_async(Duration::from_secs(30), || async {
        pod.metric("session_requests_total{outcome=\"parked\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await
}

/// `worker.concurrency` bounds the Genesys calls; deliveries waiting for their fleet claim (or
/// recording an answer already durable) do not take a call's place, up to `amqp.prefetch`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_the_calls_while_more_deliveries_are_in_hand() {
    let faults = Faults {
        latency_ms: 300,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.concurrency = 2;
        s.amqp.prefetch = 16;
    })
    .await;
    let mut pod = Pod::new(&env, "a");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(20)).await.is_some());
    let n = 12;
    publish_all(&env, &bodies("calls-", n)).await;
    let most_in_hand = std::cell::Cell::new(0.0f64);
    let finished = env
        .wait_for_async(Duration::from_secs(30), || async {
            let now = pod.metric("inflight_requests").await.unwrap_or(0.0);
            most_in_hand.set(most_in_hand.get().max(now));
            env.sim.sim.stats().sessions_created >= n as u64
        })
        .await;
    let most_in_hand = most_in_hand.get();
    assert!(finished, "every request got its session");
    let stats = env.sim.sim.stats();
    assert_eq!(
        stats.most_at_once, 2,
        "never more calls than worker.concurrency: {stats:?}"
    );
    assert!(
        most_in_hand > 2.0,
        "deliveries beyond the calls were in hand at once: at most {most_in_hand}"
    );
    assert_eq!(pod.stop(), Some(0));
}
