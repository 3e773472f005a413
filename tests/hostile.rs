//! Hostile input the worker must survive (SPEC §5): AMQP headers nested as deep as a frame
//! allows, in a request and in a dead letter read back by `dlq list`.

mod common;

use common::{request, Pod, TestEnv};
use session_worker::sim::Faults;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_nested_as_deep_as_a_frame_allows_do_not_stop_the_worker() {
    // RabbitMQ's default frame_max is 131072 bytes: 26,100 levels of 5 bytes each is the most
    // one content header frame carries (about 130.5 KB).
    let depth = 26_100;
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let mut pod = Pod::new(&env, "deep");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    env.publish_deep(&request("deep-valid"), None, depth).await;
    env.publish_deep(b"{not json", Some("deep-invalid"), depth)
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
    // A dead letter as deep as a frame allows, put straight into the DLQ (not through the
    // worker): the operator tools read it through the same guard.
    tokio::task::spawn_blocking({
        let dlq = dlq.clone();
        move || {
            let headers = common::raw_amqp::nested_entry("x-deep", depth);
            common::raw_amqp::publish(
                "127.0.0.1:5672",
                "",
                &dlq,
                b"{}",
                Some("deep-raw"),
                &headers,
            )
        }
    })
    .await
    .unwrap();
    let dlq_cmd = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
            .arg("--config")
            .arg(pod.config_path())
            .arg("dlq")
            .args(args)
            .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(0), "dlq {args:?}: {stderr}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(dlq_cmd(&["list", "--json"]).contains("invalid_request"));
    for id in ["deep-invalid", "deep-raw"] {
        let shown = dlq_cmd(&["show", id]);
        assert!(
            shown.contains("nested deeper than 32 levels was dropped"),
            "{id}: {shown}"
        );
    }
    assert_eq!(pod.stop(), Some(0), "SIGTERM exits 0");
}
