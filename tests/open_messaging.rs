//! The full pipeline with `genesys.api = "open_messaging"` against the simulator.

mod common;

use common::{request, TestEnv};
use session_worker::amqp::{header_i64, header_string};
use session_worker::config::{GenesysApi, Settings};
use session_worker::event::EventKind;
use session_worker::sim::Faults;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn open_messaging(s: &mut Settings) {
    s.genesys.api = GenesysApi::OpenMessaging;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_created_through_open_messaging() {
    let env = TestEnv::new(Faults::default(), open_messaging).await;
    let worker = env.start_worker(env.open_store());
    for i in 0..20 {
        env.publish(&request(&format!("om{i}")), None).await;
    }
    let events = env.events(20, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), 20);
    assert!(events
        .iter()
        .all(|e| e.event == EventKind::SessionStarted && e.conversation_id.is_some()));
    let stats = env.sim.sim.stats();
    assert_eq!(
        (
            stats.sessions_created,
            stats.duplicate_sessions,
            stats.bad_requests
        ),
        (20, 0, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_holds_with_open_messaging() {
    let env = TestEnv::new(
        Faults {
            fail_rate: 0.3,
            ..Default::default()
        },
        |s| {
            open_messaging(s);
            s.worker.max_attempts = 10;
        },
    )
    .await;
    let worker = env.start_worker(env.open_store());
    let body = request("om-same");
    for _ in 0..3 {
        env.publish(&body, Some("om-key")).await;
    }
    let events = env.events(3, WAIT).await;
    worker.stop().await;
    assert_eq!(events.len(), 3);
    assert_eq!(env.sim.sim.sessions_for("om-same"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_integration_id_dead_letters_as_permanent() {
    let env = TestEnv::new(Faults::default(), |s| {
        open_messaging(s);
        s.genesys.integration_id = "integration-that-does-not-exist".into();
    })
    .await;
    let worker = env.start_worker(env.open_store());
    env.publish(&request("om-x"), None).await;
    let dead = env.dead_letters(1, WAIT).await;
    worker.stop().await;
    assert_eq!(dead.len(), 1);
    let props = &dead[0].delivery.properties;
    assert_eq!(
        header_string(props, "x-failure-reason").as_deref(),
        Some("permanent_api_error")
    );
    assert_eq!(header_i64(props, "x-failure-status"), Some(404));
    assert!(header_string(props, "x-failure-detail")
        .unwrap()
        .contains("integration-that-does-not-exist"));
}

#[test]
fn missing_integration_id_is_a_config_error() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("check-config")
        .env("SESSION_WORKER__GENESYS__API", "open_messaging")
        .env("SESSION_WORKER__GENESYS__INTEGRATION_ID", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("genesys.integration_id"));
}
