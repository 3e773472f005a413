//! A replay plan made while a pod works on another copy of a dead letter's key (SPEC §7
//! "Console"): that message is `held`, by the pod whose live fleet claim holds the key, and
//! the others are `call`.

mod common;

use common::console::{Console, OPERATOR};
use common::{request, Pod, TestEnv};
use session_worker::sim::Faults;
use std::time::Duration;

/// Put a dead letter of `key` straight into the worker DLQ, as the worker would have.
async fn dead_letter(env: &TestEnv, key: &str) {
    let a = &env.settings.amqp;
    let props = common::dlq::dead_letter_props(
        key,
        "permanent_api_error",
        "Genesys answered 400: queue 7 not found",
        "2026-12-05T10:00:00Z",
    );
    common::dlq::publish_confirmed(
        &env.ch,
        &a.dead_letter_exchange,
        &a.dead_letter_queue,
        [(request(key), props)],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_a_pod_is_working_on_is_held_by_that_pods_live_claim() {
    let faults = Faults {
        latency_ms: 8_000,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.genesys.request_timeout = Duration::from_secs(30);
        s.rate_limit.requests_per_minute = 600;
    })
    .await;
    let mut pod = Pod::new(&env, "busy");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    dead_letter(&env, "busy-key").await;
    dead_letter(&env, "free-key").await;
    // A copy of busy-key comes in: the pod claims it and waits 8 s on Genesys.
    env.publish(&request("busy-key"), Some("busy-key")).await;
    let inbound = env.settings.amqp.inbound_queue.clone();
    let taken = env
        .wait_for_async(Duration::from_secs(10), || async {
            env.queue_len(&inbound).await == 0
        })
        .await;
    assert!(taken, "the pod took busy-key");
    // Its claim comes back through the ledger within milliseconds; the call lasts 8 s.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let console = Console::start(
        env!("CARGO_BIN_EXE_session-worker"),
        pod.config_path(),
        Duration::from_secs(60),
    );
    console.up().await;
    let group = console.group_of("permanent_api_error").await;
    let body = serde_json::json!({ "queue": "worker", "group": group });
    let (status, plan) = console
        .post("/api/plans", OPERATOR, Some("alice"), body)
        .await;
    assert_eq!(status, 200, "{plan}");
    let of = |key: &str| {
        plan["messages"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["idempotency_key"] == key))
            .cloned()
            .unwrap_or_else(|| panic!("{key} is in the plan: {plan}"))
    };
    let busy = of("busy-key");
    assert_eq!(busy["class"], "held", "{plan}");
    assert_eq!(
        busy["held_by"],
        format!("{}-busy", env.prefix).as_str(),
        "{plan}"
    );
    assert_eq!(of("free-key")["class"], "call", "{plan}");
    assert!(of("free-key").get("held_by").is_none(), "{plan}");
    drop(console);
    assert_eq!(pod.stop(), Some(0));
}
