//! Hostile input the worker must survive (SPEC §5): AMQP headers nested as deep as a frame
//! allows, in a request and in a dead letter read back by `dlq list`.

mod common;

use common::{request, Pod, TestEnv};
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use session_worker::sim::Faults;
use std::time::Duration;

/// A header value nested `depth` arrays deep (5 bytes a level on the wire).
fn nested(depth: usize) -> AMQPValue {
    let mut v = AMQPValue::Boolean(true);
    for _ in 0..depth {
        v = AMQPValue::FieldArray(FieldArray::from(vec![v]));
    }
    v
}

fn deep_headers(depth: usize) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-deep".into(), nested(depth));
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_as_deep_as_a_frame_allows_do_not_stop_the_worker() {
    // RabbitMQ's default frame_max is 131072 bytes: 26,100 levels of 5 bytes each is the most
    // one content header frame carries (about 130.5 KB).
    let depth = 26_100;
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let mut pod = Pod::new(&env, "deep");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    env.publish_with(&request("deep-valid"), None, deep_headers(depth))
        .await;
    env.publish_with(b"{not json", Some("deep-invalid"), deep_headers(depth))
        .await;
    env.publish(&request("after-deep"), None).await;
    let events = env.events(3, Duration::from_secs(60)).await;
    assert_eq!(events.len(), 3, "every message was handled: {events:?}");
    assert!(
        pod.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the worker is still running"
    );
    // The dead letter with the deep headers can be listed (it is published after the event).
    let dlq = env.settings.amqp.dead_letter_queue.clone();
    assert!(
        env.wait_for_async(Duration::from_secs(20), || async {
            env.queue_len(&dlq).await >= 1
        })
        .await
    );
    let list = std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("--config")
        .arg(pod.config_path())
        .args(["dlq", "list", "--json"])
        .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
        .output()
        .unwrap();
    assert_eq!(
        list.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    assert!(String::from_utf8_lossy(&list.stdout).contains("invalid_request"));
    assert_eq!(pod.stop(), Some(0), "SIGTERM exits 0");
}
