//! The worker pipeline against the real broker and the simulator (no mocks of either).

mod common;

use common::{header, request, TestEnv};
use lapin::types::{AMQPValue, FieldTable};
use session_worker::amqp::{header_i64, header_string};
use session_worker::event::EventKind;
use session_worker::sim::{AuthMode, Faults};
use session_worker::store::IdemState;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_valid_requests_make_n_sessions_events_and_audit_entries() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let store = env.open_store();
    let worker = env.start_worker(store.clone());
    let n = 40;
    for i in 0..n {
        env.publish(&request(&format!("v{i}")), None).await;
    }
    let events = env.events(n, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), n, "every request produces one event");
    assert!(events.iter().all(|e| e.event == EventKind::SessionStarted
        && e.conversation_id.is_some()
        && e.attempts == 1));
    let stats = env.sim.sim.stats();
    assert_eq!(
        (stats.sessions_created, stats.duplicate_sessions),
        (n as u64, 0)
    );
    assert_eq!(stats.token_grants, 1, "one token serves every request");
    let started = store
        .audit_all()
        .filter(|e| e.as_ref().unwrap().outcome == "started")
        .count();
    assert_eq!(started, n);
    let entry = store.audit_all().next().unwrap().unwrap();
    assert_eq!(entry.event_type, "session_init");
    assert!(
        entry.correlation_id.is_some()
            && entry.latency_ms.is_some()
            && entry.http_status == Some(201)
    );
    assert_eq!(env.queue_len(&env.settings.amqp.inbound_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn republished_request_creates_one_session() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let store = env.open_store();
    let worker = env.start_worker(store.clone());
    let body = request("same-visitor");
    // Twice at once (same key, concurrent), then once more after the first finished.
    env.publish(&body, Some("key-1")).await;
    env.publish(&body, Some("key-1")).await;
    let first = env.events(2, WAIT).await;
    env.publish(&body, Some("key-1")).await;
    let again = env.events(1, WAIT).await;
    worker.stop().await;
    assert_eq!(first.len() + again.len(), 3);
    assert_eq!(
        env.sim.sim.sessions_for("same-visitor"),
        1,
        "exactly one session"
    );
    let ids: std::collections::HashSet<_> = first
        .iter()
        .chain(&again)
        .map(|e| (e.event_id.clone(), e.conversation_id.clone()))
        .collect();
    assert_eq!(ids.len(), 1, "the stored event is re-published unchanged");
    assert_eq!(
        store.get("key-1").unwrap().unwrap().state,
        IdemState::Completed
    );
    let dups = store
        .audit_all()
        .filter(|e| e.as_ref().unwrap().outcome == "duplicate")
        .count();
    assert_eq!(dups, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_body_under_same_key_is_a_conflict() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let worker = env.start_worker(env.open_store());
    env.publish(
        br#"{"visitor_id":"a","queue_id":"q","idempotency_key":"k-1"}"#,
        None,
    )
    .await;
    assert_eq!(env.events(1, WAIT).await.len(), 1);
    let changed = br#"{"visitor_id":"a","queue_id":"other-queue","idempotency_key":"k-1"}"#;
    env.publish(changed, None).await;
    let dead = env.dead_letters(1, WAIT).await;
    let events = env.events(1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("idempotency_conflict")
    );
    assert_eq!(dead[0].delivery.data, changed.to_vec());
    assert_eq!(events[0].event, EventKind::SessionRejected);
    assert_eq!(
        events[0].error.as_ref().unwrap().reason,
        "idempotency_conflict"
    );
    assert_eq!(env.sim.sim.stats().sessions_created, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_bad_input_is_dead_lettered_with_original_bytes() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let worker = env.start_worker(env.open_store());
    let big = format!(
        r#"{{"visitor_id":"v","queue_id":"q","attributes":{{"blob":"{}"}}}}"#,
        "x".repeat(70_000)
    );
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not json", b"{this is not json".to_vec(), "not JSON"),
        ("not utf-8", vec![0xff, 0xfe, 0x00, 0x41], "UTF-8"),
        (
            "wrong type",
            br#"{"visitor_id":42,"queue_id":"q"}"#.to_vec(),
            "visitor_id: must be a string",
        ),
        (
            "missing field",
            br#"{"queue_id":"q"}"#.to_vec(),
            "visitor_id",
        ),
        (
            "out of range",
            br#"{"visitor_id":"v","queue_id":"q","bot_score":7}"#.to_vec(),
            "bot_score",
        ),
        ("oversize metadata", big.into_bytes(), "64 KiB"),
        (
            "unknown field",
            br#"{"visitor_id":"v","queue_id":"q","evil":true}"#.to_vec(),
            "evil",
        ),
        ("not an object", b"[]".to_vec(), "object"),
        ("empty body", Vec::new(), "not JSON"),
    ];
    for (i, (_, body, _)) in cases.iter().enumerate() {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-producer".into(),
            AMQPValue::LongString("test-suite".into()),
        );
        env.publish_with(body, Some(&format!("bad-{i}")), headers)
            .await;
    }
    let dead = env.dead_letters(cases.len(), WAIT).await;
    let events = env.events(cases.len(), WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), cases.len(), "every bad input reaches the DLQ");
    for m in &dead {
        let props = &m.delivery.properties;
        let id = props.message_id().as_ref().unwrap().as_str().to_string();
        let i: usize = id.trim_start_matches("bad-").parse().unwrap();
        let (name, body, needle) = &cases[i];
        assert_eq!(&m.delivery.data, body, "{name}: original bytes kept");
        assert_eq!(
            header_string(props, "x-failure-reason").as_deref(),
            Some("invalid_request"),
            "{name}"
        );
        let detail = header_string(props, "x-failure-detail").unwrap();
        assert!(
            detail.contains(needle),
            "{name}: {detail:?} should mention {needle:?}"
        );
        assert_eq!(
            header_string(props, "x-producer").as_deref(),
            Some("test-suite"),
            "{name}: original headers kept"
        );
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("application/json")
        );
        for h in ["x-attempts", "x-failed-at", "x-worker-id"] {
            assert!(header(props, h).is_some(), "{name}: {h}");
        }
    }
    assert!(events.iter().all(|e| e.event == EventKind::SessionRejected));
    assert_eq!(
        env.sim.sim.stats().session_requests,
        0,
        "no API call for bad input"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_faults_still_create_every_session_exactly_once() {
    let faults = Faults {
        fail_rate: 0.3,
        throttle_rate: 0.15,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.max_attempts = 10;
    })
    .await;
    let worker = env.start_worker(env.open_store());
    let n = 30;
    for i in 0..n {
        env.publish(&request(&format!("f{i}")), None).await;
    }
    let events = env.events(n, Duration::from_secs(90)).await;
    worker.stop().await;
    let stats = env.sim.sim.stats();
    assert_eq!(events.len(), n);
    assert!(events.iter().all(|e| e.event == EventKind::SessionStarted));
    assert_eq!(stats.distinct_visitors, n as u64);
    assert_eq!(stats.duplicate_sessions, 0);
    assert!(
        stats.injected_errors + stats.rate_limited > 0,
        "faults were injected: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_error_goes_straight_to_the_dlq() {
    let faults = Faults {
        reject_queues: vec!["missing-queue".into()],
        ..Default::default()
    };
    let env = TestEnv::new(faults, |_| {}).await;
    let worker = env.start_worker(env.open_store());
    let body = br#"{"visitor_id":"p1","queue_id":"missing-queue"}"#;
    env.publish(body, None).await;
    let dead = env.dead_letters(1, WAIT).await;
    let events = env.events(1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("permanent_api_error")
    );
    assert_eq!(header_i64(props, "x-failure-status"), Some(404));
    assert_eq!(
        header_i64(props, "x-attempts"),
        Some(1),
        "no retry of a permanent error"
    );
    assert!(header_string(props, "x-failure-detail")
        .unwrap()
        .contains("was not found"));
    assert_eq!(events[0].event, EventKind::SessionFailed);
    assert_eq!(events[0].error.as_ref().unwrap().status, Some(404));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_go_through_delayed_retry_then_dlq() {
    let faults = Faults {
        fail_rate: 1.0,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.max_attempts = 2;
    })
    .await;
    let worker = env.start_worker(env.open_store());
    env.publish(&request("always-503"), None).await;
    let dead = env.dead_letters(1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(header_i64(props, "x-failure-status"), Some(503));
    // Two in-process attempts, one delayed retry, two more attempts.
    assert_eq!(header_i64(props, "x-attempts"), Some(4));
    assert_eq!(header_i64(props, "x-delayed-retries"), Some(1));
    assert_eq!(env.sim.sim.stats().session_requests, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_pause_without_dead_lettering_then_resume() {
    let faults = Faults {
        auth: AuthMode::RejectClients,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |_| {}).await;
    let worker = env.start_worker(env.open_store());
    let n = 5;
    for i in 0..n {
        env.publish(&request(&format!("a{i}")), None).await;
    }
    let paused = env.wait_for(WAIT, || worker.health.auth_paused()).await;
    assert!(paused, "the worker reports the auth pause");
    assert!(!worker.health.ready());
    // Everything goes back to the queue; nothing is dead-lettered.
    let inbound = env.settings.amqp.inbound_queue.clone();
    let mut queued = 0;
    for _ in 0..100 {
        queued = env.queue_len(&inbound).await;
        if queued == n as u32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(queued, n as u32, "messages stay queued");
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
    // Credentials fixed: the probe succeeds and the backlog drains.
    env.sim.sim.set_faults(Faults::default());
    let events = env.events(n, WAIT).await;
    assert_eq!(events.len(), n);
    assert!(worker.health.ready());
    worker.stop().await;
    assert_eq!(env.sim.sim.stats().sessions_created, n as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_pauses_and_requeues() {
    let faults = Faults {
        auth: AuthMode::Forbidden,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |_| {}).await;
    let worker = env.start_worker(env.open_store());
    env.publish(&request("forbidden"), None).await;
    assert!(env.wait_for(WAIT, || worker.health.auth_paused()).await);
    worker.stop().await;
    assert_eq!(env.queue_len(&env.settings.amqp.inbound_queue).await, 1);
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_attempts_header_saturates_instead_of_panicking() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let worker = env.start_worker(env.open_store());
    let mut headers = FieldTable::default();
    headers.insert("x-attempts".into(), AMQPValue::LongLongInt(i64::MAX));
    env.publish_with(&request("many-attempts"), None, headers)
        .await;
    let events = env.events(1, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), 1, "the delivery was processed and acked");
    assert_eq!(events[0].event, EventKind::SessionStarted);
    assert_eq!(events[0].attempts, u32::MAX);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queues_work_too() {
    let env = TestEnv::new(Faults::default(), |s| {
        s.amqp.queue_type = session_worker::config::QueueType::Classic
    })
    .await;
    let worker = env.start_worker(env.open_store());
    for i in 0..5 {
        env.publish(&request(&format!("c{i}")), None).await;
    }
    assert_eq!(env.events(5, WAIT).await.len(), 5);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_429_pauses_and_every_request_completes() {
    // The simulator answers 30 % of requests with 429 + Retry-After: 1; the worker must pause
    // and retry instead of failing requests.
    let faults = Faults {
        rate_limit_per_minute: 1000,
        throttle_rate: 0.3,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| s.worker.max_attempts = 20).await;
    let worker = env.start_worker(env.open_store());
    // 40 requests: the chance that none of them draws a 429 is 0.7^40, about 6e-7.
    for i in 0..40 {
        env.publish(&request(&format!("r{i}")), None).await;
    }
    let events = env.events(40, Duration::from_secs(90)).await;
    worker.stop().await;
    assert_eq!(events.len(), 40);
    let stats = env.sim.sim.stats();
    assert!(stats.rate_limited > 0);
    assert_eq!(stats.duplicate_sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_answer_is_an_unknown_outcome_never_resent() {
    // The simulator creates each session and answers after 2 s; the client gives up after 1 s.
    let faults = Faults {
        answer_late_ms: 2_000,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.genesys.request_timeout = Duration::from_secs(1);
        s.worker.max_attempts = 5;
    })
    .await;
    let worker = env.start_worker(env.open_store());
    let n = 5;
    for i in 0..n {
        env.publish(&request(&format!("late{i}")), None).await;
    }
    let dead = env.dead_letters(n, WAIT).await;
    let events = env.events(n, WAIT).await;
    // Published again: replayed from the record, no call.
    for i in 0..n {
        env.publish(&request(&format!("late{i}")), None).await;
    }
    let replayed = env.events(n, WAIT).await;
    worker.stop().await;
    let stats = env.sim.sim.stats();
    assert_eq!(
        stats.sessions_created, n as u64,
        "one call per request, none re-sent"
    );
    assert_eq!(stats.duplicate_sessions, 0);
    assert_eq!(dead.len(), n);
    for d in &dead {
        let props = &d.delivery.properties;
        assert_eq!(
            header_string(props, "x-failure-reason").as_deref(),
            Some("outcome_unknown")
        );
        let detail = header_string(props, "x-failure-detail").unwrap_or_default();
        assert!(detail.contains("no answer within"), "{detail}");
    }
    assert_eq!(events.len(), n);
    for e in events.iter().chain(replayed.iter()) {
        assert_eq!(e.event, EventKind::SessionFailed);
        assert_eq!(
            e.error.as_ref().map(|x| x.reason.as_str()),
            Some("outcome_unknown")
        );
    }
    assert_eq!(replayed.len(), n, "a re-publish replays the outcome");
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_that_runs_out_mid_call_is_an_unknown_outcome() {
    // The simulator creates the session at once and answers after 10 s; shutdown gives
    // in-flight work 1 s.
    let faults = Faults {
        answer_late_ms: 10_000,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.genesys.request_timeout = Duration::from_secs(30);
        s.worker.shutdown_grace = Duration::from_secs(1);
    })
    .await;
    let worker = env.start_worker(env.open_store());
    env.publish(&request("grace"), None).await;
    let sent = env
        .wait_for(WAIT, || env.sim.sim.stats().sessions_created == 1)
        .await;
    assert!(sent, "the call reached the simulator");
    let stopping = std::time::Instant::now();
    worker.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_secs(9),
        "shutdown kept to the grace (1 s), not the late answer (10 s)"
    );
    let dead = env.dead_letters(1, WAIT).await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("outcome_unknown")
    );
    let detail = header_string(props, "x-failure-detail").unwrap_or_default();
    assert!(detail.contains("shutdown_grace"), "{detail}");
    let events = env.events(1, WAIT).await;
    assert_eq!(events.len(), 1);
    let record = env
        .open_store()
        .get(&events[0].idempotency_key)
        .expect("read")
        .expect("record");
    assert_eq!(record.state, IdemState::Unknown);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_unknown_outcome_opts_into_resending() {
    let faults = Faults {
        answer_late_ms: 1_500,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.genesys.request_timeout = Duration::from_millis(500);
        s.genesys.retry_unknown_outcome = true;
        s.worker.max_attempts = 2;
        s.amqp.retry_delays = vec![];
    })
    .await;
    let worker = env.start_worker(env.open_store());
    env.publish(&request("resend"), None).await;
    let dead = env.dead_letters(1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_string(&dead[0].delivery.properties, "x-failure-reason").as_deref(),
        Some("retries_exhausted"),
        "treated like a retryable error"
    );
    assert_eq!(
        env.sim.sim.stats().sessions_created,
        2,
        "re-sent once: the duplicate the operator opted into"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_redelivered_too_often_is_dead_lettered_as_poison() {
    let env = TestEnv::new(Faults::default(), |s| s.worker.max_redeliveries = 5).await;
    let worker = env.start_worker(env.open_store());
    // What the broker's x-delivery-count says after five failed deliveries.
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(5));
    env.publish_with(&request("poisoned"), None, headers).await;
    // One delivery below the limit goes through.
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(4));
    env.publish_with(&request("not-yet"), None, headers).await;
    let dead = env.dead_letters(1, WAIT).await;
    let events = env.events(2, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_string(&dead[0].delivery.properties, "x-failure-reason").as_deref(),
        Some("poison_message")
    );
    let detail =
        header_string(&dead[0].delivery.properties, "x-failure-detail").unwrap_or_default();
    assert!(detail.contains("delivered 5 times"), "{detail}");
    assert_eq!(
        env.sim.sim.stats().distinct_visitors,
        1,
        "only the other request was sent"
    );
    assert!(events
        .iter()
        .any(|e| e.visitor_id == "not-yet" && e.event == EventKind::SessionStarted));
    assert!(events.iter().any(|e| e.visitor_id == "poisoned"
        && e.error.as_ref().map(|x| x.reason.as_str()) == Some("poison_message")));
}
