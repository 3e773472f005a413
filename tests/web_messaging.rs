//! The whole product on `genesys.api = "web_messaging"`: the real broker, the simulator's Guest
//! API, the worker in process and as real pods. With this backend the fleet's bound on
//! duplicates is not needed: every test here expects exactly one conversation per key.

mod common;

use common::{bodies, drained, publish_all, web_messaging_on, Pod, TestEnv};
use session_worker::amqp::header_string;
use session_worker::event::EventKind;
use session_worker::sim::Faults;
use std::collections::HashSet;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn assert_one_conversation_per_key(env: &TestEnv, keys: u64) {
    let stats = env.sim.sim.stats();
    let wm = &stats.web_messaging;
    assert_eq!(
        wm.conversations, keys,
        "one conversation per key: {stats:?}"
    );
    assert_eq!(
        (
            wm.repeated_starts,
            wm.repeated_conversations,
            stats.duplicate_sessions
        ),
        (0, 0, 0),
        "nothing twice: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_conversation_per_key_with_each_request_published_three_times() {
    let env = TestEnv::new(Faults::default(), web_messaging_on).await;
    let worker = env.start_worker(env.open_store());
    let all = bodies("wm-", 20);
    for _ in 0..3 {
        publish_all(&env, &all).await;
    }
    let events = env.events(60, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), 60);
    assert!(events
        .iter()
        .all(|e| e.event == EventKind::SessionStarted && e.conversation_id.is_some()));
    let per_key: HashSet<_> = events
        .iter()
        .map(|e| (e.idempotency_key.clone(), e.conversation_id.clone()))
        .collect();
    assert_eq!(
        per_key.len(),
        20,
        "each key always reports one conversation"
    );
    assert_one_conversation_per_key(&env, 20);
    let audit = env
        .open_store()
        .audit_query(&session_worker::store::AuditQuery {
            key: Some(events[0].idempotency_key.clone()),
            ..Default::default()
        })
        .expect("audit reads");
    assert!(
        audit
            .iter()
            .any(|e| e.message_id.is_some() && e.conversation_id.is_some()),
        "the audit entry names the message and the conversation: {audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_dropped_after_every_first_start_still_creates_each_key_once() {
    let faults = Faults {
        ws_drop_after_start: true,
        ..Default::default()
    };
    let env = TestEnv::new(faults, web_messaging_on).await;
    let worker = env.start_worker(env.open_store());
    publish_all(&env, &bodies("drop-", 20)).await;
    let events = env.events(20, WAIT).await;
    assert!(drained(&env, WAIT).await);
    worker.stop().await;
    assert_eq!(events.len(), 20);
    assert!(events.iter().all(|e| e.event == EventKind::SessionStarted));
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
    let stats = env.sim.sim.stats();
    assert_eq!(stats.web_messaging.dropped_after_start, 20, "{stats:?}");
    assert_one_conversation_per_key(&env, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_requests_frames_pause_and_every_key_still_lands_once() {
    let faults = Faults {
        ws_throttle_rate: 0.3,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        web_messaging_on(s);
        s.worker.max_attempts = 20;
    })
    .await;
    let worker = env.start_worker(env.open_store());
    publish_all(&env, &bodies("slow-", 15)).await;
    let events = env.events(15, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), 15);
    let stats = env.sim.sim.stats();
    assert!(stats.web_messaging.throttled > 0, "{stats:?}");
    assert_one_conversation_per_key(&env, 15);
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_attributes_over_the_limit_are_dead_lettered_invalid_request() {
    let env = TestEnv::new(Faults::default(), web_messaging_on).await;
    let worker = env.start_worker(env.open_store());
    let big = format!(
        r#"{{"visitor_id":"big","queue_id":"q","attributes":{{"blob":"{}"}}}}"#,
        "x".repeat(2100)
    );
    env.publish(big.as_bytes(), Some("big-key")).await;
    let dead = env.dead_letters(1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("invalid_request")
    );
    let detail = header_string(props, "x-failure-detail").unwrap_or_default();
    assert!(
        detail.contains("bytes") && detail.contains("2048"),
        "{detail}"
    );
    assert_eq!(env.sim.sim.stats().web_messaging.sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_origin_is_not_ready_and_dead_letters_nothing_until_it_is_fixed() {
    let faults = Faults {
        allowed_origin: "https://www.allowed.example".into(),
        ..Default::default()
    };
    let env = TestEnv::new(faults, web_messaging_on).await;
    let mut pod = Pod::new(&env, "origin");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(30)).await.is_some());
    publish_all(&env, &bodies("origin-", 5)).await;
    let refused = env
        .wait_for(Duration::from_secs(30), || {
            env.sim.sim.stats().web_messaging.handshakes_refused > 0
        })
        .await;
    assert!(refused);
    let not_ready = async {
        for _ in 0..100 {
            let r = reqwest::get(format!("http://{}/readyz", pod.http)).await;
            if r.is_ok_and(|r| r.status().as_u16() == 503) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    assert!(not_ready.await, "a refused handshake pauses the pod");
    // The operator adds the origin to the deployment's allowed domains.
    let mut fixed = env.sim.sim.faults();
    fixed.allowed_origin = "http://localhost".into();
    env.sim.sim.set_faults(fixed);
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    let events = env.events(5, WAIT).await;
    assert_eq!(pod.stop(), Some(0));
    assert_eq!(events.len(), 5);
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
    assert_one_conversation_per_key(&env, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_pods_with_republishes_and_a_kill_make_no_duplicate_conversation() {
    let faults = Faults {
        latency_ms: 10,
        ..Default::default()
    };
    let env = TestEnv::new(faults, web_messaging_on).await;
    let mut pods: Vec<Pod> = (0..3).map(|i| Pod::new(&env, &format!("wm{i}"))).collect();
    for p in &mut pods {
        p.start();
    }
    let n = 300u64;
    let all = bodies("wm-fleet-", n as usize);
    publish_all(&env, &all).await;
    publish_all(&env, &all).await;
    let reached = env
        .wait_for(WAIT, || {
            env.sim.sim.stats().web_messaging.conversations >= n / 3
        })
        .await;
    assert!(reached, "the fleet made progress");
    pods[1].kill();
    publish_all(&env, &all).await;
    pods[1].start();
    let done = env
        .wait_for(Duration::from_secs(120), || {
            env.sim.sim.stats().web_messaging.conversations >= n
        })
        .await;
    assert!(
        drained(&env, Duration::from_secs(120)).await,
        "queues drained"
    );
    for p in &mut pods {
        assert_eq!(p.stop(), Some(0), "SIGTERM exits 0");
    }
    assert!(
        done,
        "every key got a conversation: {:?}",
        env.sim.sim.stats()
    );
    assert_one_conversation_per_key(&env, n);
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_that_lost_everything_opens_no_new_conversation_for_republished_keys() {
    let env = TestEnv::new(Faults::default(), web_messaging_on).await;
    let all = bodies("lost-", 10);
    let mut first = Pod::new(&env, "first");
    first.start();
    publish_all(&env, &all).await;
    let first_events = env.events(10, WAIT).await;
    assert_eq!(first.stop(), Some(0));
    assert_eq!(first_events.len(), 10);
    // A pod on an empty store that cannot learn from the fleet either: its own ledger stream.
    let mut second = Pod::with(&env, "amnesiac", |s| {
        s.amqp.ledger_stream = format!("{}.other-ledger", env.prefix);
        s.amqp.fleet_exchange = format!("{}.other-fleet", env.prefix);
    });
    second.start();
    publish_all(&env, &all).await;
    let again = env.events(10, WAIT).await;
    assert_eq!(second.stop(), Some(0));
    assert_eq!(again.len(), 10);
    let conversations = |events: &[session_worker::event::ResultEvent]| -> HashSet<_> {
        events.iter().map(|e| e.conversation_id.clone()).collect()
    };
    assert_eq!(
        conversations(&first_events),
        conversations(&again),
        "the same guest sessions, the same conversations"
    );
    assert_one_conversation_per_key(&env, 10);
    let stats = env.sim.sim.stats();
    assert_eq!(stats.web_messaging.resumed, 10, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_that_runs_out_mid_call_puts_the_request_back_not_unknown() {
    // The simulator holds every start 3 s; shutdown gives in-flight work 1 s.
    let faults = Faults {
        latency_ms: 3_000,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        web_messaging_on(s);
        s.genesys.request_timeout = Duration::from_secs(30);
        s.worker.shutdown_grace = Duration::from_secs(1);
    })
    .await;
    let worker = env.start_worker(env.open_store());
    publish_all(&env, &bodies("grace-", 1)).await;
    let in_flight = env
        .wait_for(WAIT, || env.sim.sim.stats().web_messaging.sessions == 1)
        .await;
    assert!(in_flight, "the call reached the Guest API");
    worker.stop().await;
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
    assert_eq!(
        env.queue_len(&env.settings.amqp.inbound_queue).await,
        1,
        "the request is back in the queue"
    );
    // The next pod finds the session and finishes. The cut-short start was written before
    // the shutdown, and lands in the same conversation when the API gets to it: a second
    // start event, never a second conversation.
    env.sim.sim.set_faults(Faults::default());
    let worker = env.start_worker(env.open_store());
    let events = env.events(1, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].event, EventKind::SessionStarted);
    let late_start_landed = env
        .wait_for(WAIT, || env.sim.sim.stats().web_messaging.starts == 2)
        .await;
    assert!(late_start_landed, "{:?}", env.sim.sim.stats());
    let stats = env.sim.sim.stats();
    assert_eq!(
        (
            stats.web_messaging.conversations,
            stats.web_messaging.repeated_conversations,
            stats.duplicate_sessions
        ),
        (1, 0, 0),
        "{stats:?}"
    );
}
