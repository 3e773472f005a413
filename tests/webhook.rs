//! The webhook forwarder and the producer tool against the real broker and a webhook receiver
//! started inside the test.

mod common;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::{request, TestEnv};
use session_worker::amqp::{header_i64, header_string};
use session_worker::secret::Secret;
use session_worker::sim::Faults;
use session_worker::webhook::signature;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "whsec_dGVzdC13ZWJob29rLXNlY3JldC0xMjM0NQ==";
const WAIT: Duration = Duration::from_secs(30);

/// A webhook receiver whose answer can change mid-test.
#[derive(Default)]
struct Receiver {
    /// Answer this many requests with `fail_status` before answering 204.
    failures_left: AtomicU32,
    fail_status: AtomicU32,
    received: Mutex<Vec<(HeaderMap, Bytes)>>,
}

async fn receive(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    r.received.lock().unwrap().push((headers, body));
    let left = r.failures_left.load(Ordering::SeqCst);
    if left > 0 {
        r.failures_left.store(left - 1, Ordering::SeqCst);
        return StatusCode::from_u16(r.fail_status.load(Ordering::SeqCst) as u16).unwrap();
    }
    StatusCode::NO_CONTENT
}

async fn start_receiver(failures: u32, fail_status: u16) -> (Arc<Receiver>, String) {
    let r = Arc::new(Receiver::default());
    r.failures_left.store(failures, Ordering::SeqCst);
    r.fail_status
        .store(u32::from(fail_status), Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(r.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (r, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_the_receiver_signed_exactly_once_per_webhook_id_despite_503s() {
    let (receiver, url) = start_receiver(4, 503).await;
    let env = TestEnv::new(Faults::default(), |s| {
        s.webhook.url = url.clone();
        s.webhook.secret = Secret::new(SECRET);
        s.amqp.retry_delays = vec![Duration::from_millis(300)];
    })
    .await;
    let store = env.open_store();
    let worker = env.start_worker(store.clone());
    let forwarder = env.start_forwarder(store.clone());
    let n = 10;
    for i in 0..n {
        env.publish(&request(&format!("w{i}")), None).await;
    }
    let ok = env
        .wait_for(WAIT, || {
            let got = receiver.received.lock().unwrap();
            got.len() >= n + 4
        })
        .await;
    // Give a stray duplicate the chance to show up before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    worker.stop().await;
    forwarder.stop().await;
    assert!(ok, "every event delivered");
    let got = receiver.received.lock().unwrap().clone();
    let mut per_id: HashMap<String, u32> = HashMap::new();
    for (headers, body) in got.iter() {
        signature::verify(SECRET, headers, body).expect("signature verifies");
        assert_eq!(headers.get("x-source").unwrap(), "genesys-messaging-init");
        assert_eq!(headers.get("content-type").unwrap(), "application/json");
        let event: serde_json::Value = serde_json::from_slice(body).unwrap();
        let id = headers
            .get("webhook-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(
            event["event_id"].as_str(),
            Some(id.as_str()),
            "webhook-id is the event id"
        );
        *per_id.entry(id).or_default() += 1;
    }
    assert_eq!(per_id.len(), n, "one webhook-id per event");
    // The 4 failed attempts were retried under the same id; 2xx exactly once each.
    assert_eq!(per_id.values().sum::<u32>() as usize, n + 4);
    let delivered = store.audit_all().filter(|e| {
        let e = e.as_ref().unwrap();
        e.event_type == "webhook_delivery" && e.outcome == "delivered"
    });
    assert_eq!(delivered.count(), n);
    assert_eq!(
        env.queue_len(&env.settings.amqp.webhook_dead_letter_queue)
            .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_receiver_sends_events_to_the_webhook_dlq() {
    let (_receiver, url) = start_receiver(u32::MAX, 410).await;
    let env = TestEnv::new(Faults::default(), |s| s.webhook.url = url.clone()).await;
    let store = env.open_store();
    let worker = env.start_worker(store.clone());
    let forwarder = env.start_forwarder(store.clone());
    env.publish(&request("gone"), None).await;
    let dead = env
        .take(&env.settings.amqp.webhook_dead_letter_queue, 1, WAIT)
        .await;
    worker.stop().await;
    forwarder.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("webhook_rejected")
    );
    assert_eq!(header_i64(props, "x-failure-status"), Some(410));
    let event: serde_json::Value = serde_json::from_slice(&dead[0].delivery.data).unwrap();
    assert_eq!(event["visitor_id"], "gone", "the event body is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_webhook_retries_dead_letter() {
    let (receiver, url) = start_receiver(u32::MAX, 503).await;
    let env = TestEnv::new(Faults::default(), |s| {
        s.webhook.url = url.clone();
        s.webhook.max_attempts = 3;
        s.amqp.retry_delays = vec![Duration::from_millis(200)];
    })
    .await;
    let store = env.open_store();
    let worker = env.start_worker(store.clone());
    let forwarder = env.start_forwarder(store);
    env.publish(&request("down"), None).await;
    let dead = env
        .take(&env.settings.amqp.webhook_dead_letter_queue, 1, WAIT)
        .await;
    worker.stop().await;
    forwarder.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("retries_exhausted")
    );
    assert_eq!(header_i64(props, "x-attempts"), Some(3));
    assert_eq!(receiver.received.lock().unwrap().len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_tool_publishes_only_valid_lines() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let input = [
        r#"{"visitor_id":"p1","queue_id":"q"}"#,
        r#"{"visitor_id":"p2","queue_id":"q","bot_score":9}"#,
        "",
        r#"{"visitor_id":"p3","queue_id":"q","idempotency_key":"explicit"}"#,
        "not json at all",
    ]
    .join("\n");
    let total_bytes = Some(input.len() as u64);
    let reader: Box<dyn std::io::BufRead> = Box::new(std::io::Cursor::new(input.into_bytes()));
    let input = session_worker::publish::Input {
        reader,
        total_bytes,
    };
    let summary = session_worker::publish::publish(&env.settings, input, "test input")
        .await
        .unwrap();
    assert_eq!(summary.published, 2);
    assert_eq!(summary.invalid, 2);
    let lines: Vec<u64> = summary.invalid_lines.iter().map(|(n, _)| *n).collect();
    assert_eq!(lines, vec![2, 5]);
    assert!(summary.invalid_lines[0].1.contains("bot_score"));
    let msgs = env
        .take(&env.settings.amqp.inbound_queue, 10, Duration::from_secs(3))
        .await;
    assert_eq!(msgs.len(), 2);
    let ids: Vec<String> = msgs
        .iter()
        .map(|m| {
            m.delivery
                .properties
                .message_id()
                .as_ref()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        ids.contains(&"explicit".to_string()),
        "message_id is the idempotency key: {ids:?}"
    );
    assert!(msgs
        .iter()
        .all(|m| m.delivery.properties.delivery_mode() == &Some(2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirecting_receiver_is_a_failure_and_the_event_goes_nowhere_else() {
    for status in [302u16, 307] {
        let (target, target_url) = start_receiver(0, 200).await;
        let app = axum::Router::new().fallback(move || {
            let target_url = target_url.clone();
            async move {
                (
                    StatusCode::from_u16(status).unwrap(),
                    [("location", target_url)],
                )
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let env = TestEnv::new(Faults::default(), |s| {
            s.webhook.url = format!("http://{addr}/hook");
        })
        .await;
        let store = env.open_store();
        let worker = env.start_worker(store.clone());
        let forwarder = env.start_forwarder(store.clone());
        env.publish(&request("redirected"), None).await;
        let dead = env
            .take(&env.settings.amqp.webhook_dead_letter_queue, 1, WAIT)
            .await;
        worker.stop().await;
        forwarder.stop().await;
        assert_eq!(dead.len(), 1, "{status}: the event is dead-lettered");
        let props = &dead[0].delivery.properties;
        let detail = header_string(props, "x-failure-detail").unwrap_or_default();
        assert!(detail.contains("never followed"), "{detail}");
        assert_eq!(
            header_i64(props, "x-failure-status"),
            Some(i64::from(status))
        );
        assert!(
            target.received.lock().unwrap().is_empty(),
            "{status}: nothing reached the Location"
        );
    }
}

/// A webhook replay plan is judged by the forwarder's verdicts (SPEC §7 "Console"): while the
/// receiver still refuses, the first canary fails again and the run stops by itself; once it
/// accepts, the plan replays every event and counts each delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_replay_plan_stops_on_a_refusing_receiver_and_finishes_once_it_accepts() {
    use common::console::{Console, OPERATOR};
    let (receiver, url) = start_receiver(u32::MAX, 400).await;
    let env = TestEnv::new(Faults::default(), |s| {
        s.webhook.url = url.clone();
        s.rate_limit.requests_per_minute = 600;
    })
    .await;
    let mut pod = common::Pod::new(&env, "forwarder");
    pod.start_all(&[("ANALYTICS_WEBHOOK_SECRET", SECRET)]);
    assert!(pod.ready_within(WAIT * 2).await.is_some(), "pod ready");
    let n = 6;
    for i in 0..n {
        env.publish(
            &request(&format!("hook-{i}")),
            Some(&format!("hook-key-{i}")),
        )
        .await;
    }
    let dlq = env.settings.amqp.webhook_dead_letter_queue.clone();
    assert!(
        env.wait_for_async(WAIT * 2, || async { env.queue_len(&dlq).await >= n })
            .await,
        "{n} events refused into the webhook DLQ"
    );
    let bin = env!("CARGO_BIN_EXE_session-worker");
    let console = Console::start(bin, pod.config_path(), Duration::from_secs(120));
    console.up().await;
    let group = console.group_of("webhook_rejected").await;
    let plan_body = serde_json::json!({ "queue": "webhook", "group": group });
    let replay_of =
        |plan: &serde_json::Value| serde_json::json!({ "plan_id": plan["id"], "canary": [1, 2] });

    // Still refused: the first canary's delivery fails again, and the run stops by itself.
    let (status, plan) = console
        .post("/api/plans", OPERATOR, Some("alice"), plan_body.clone())
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["total"], n, "{plan}");
    let (status, _) = console
        .post("/api/replay", OPERATOR, Some("alice"), replay_of(&plan))
        .await;
    assert_eq!(status, 202);
    let stopped = console
        .replay_to_the_end(plan["id"].as_str().unwrap())
        .await;
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["replayed"], 1, "{stopped}");
    assert_eq!(stopped["refailed"], 1, "{stopped}");
    assert!(
        env.wait_for_async(WAIT, || async { env.queue_len(&dlq).await >= n })
            .await,
        "the canary is back in the DLQ"
    );

    // The receiver is fixed: a new plan replays all six, each delivery a verdict.
    receiver.failures_left.store(0, Ordering::SeqCst);
    let (_, plan) = console
        .post("/api/plans", OPERATOR, Some("alice"), plan_body)
        .await;
    let (status, _) = console
        .post("/api/replay", OPERATOR, Some("alice"), replay_of(&plan))
        .await;
    assert_eq!(status, 202);
    let done = console
        .replay_to_the_end(plan["id"].as_str().unwrap())
        .await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["replayed"], n, "{done}");
    assert_eq!(done["refailed"], 0, "{done}");
    assert!(
        done["succeeded"].as_u64().unwrap_or(0) >= 3,
        "the canaries' deliveries were counted: {done}"
    );
    assert_eq!(env.queue_len(&dlq).await, 0);
    drop(console);
    assert_eq!(pod.stop(), Some(0));
}
