//! The runbook in docs/operations.md ("From DLQ is growing to replayed and verified"), step by
//! step, with the commands as the page shows them (the page's `--config config/prod.toml` is
//! the test pod's config), beside a running worker process; and replays that end by
//! construction.

mod common;

use common::{Pod, TestEnv};
use session_worker::sim::Faults;
use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn run(pod: &Pod, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("--config")
        .arg(pod.config_path())
        .args(args)
        .env_remove("RUST_LOG")
        .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
        .env("USER", "runbook-test")
        .output()
        .expect("the command runs")
}

/// `run`, but a command still running after `limit` is killed and the test fails.
fn run_within(pod: &Pod, args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("--config")
        .arg(pod.config_path())
        .args(args)
        .env_remove("RUST_LOG")
        .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
        .env("USER", "runbook-test")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the command runs");
    let deadline = Instant::now() + limit;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{}` did not end within {limit:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: &Output) -> String {
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        stdout(o),
        String::from_utf8_lossy(&o.stderr)
    );
    stdout(o)
}

/// A pod whose simulator answers 404 for `missing-queue`, with `perm` requests for that queue
/// and `bad` invalid ones dead-lettered.
async fn broken(perm: usize, bad: usize) -> (TestEnv, Pod) {
    let env = TestEnv::new(
        Faults {
            reject_queues: vec!["missing-queue".into()],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let mut pod = Pod::new(&env, "runbook");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    for i in 0..perm {
        let body = format!(r#"{{"visitor_id":"rb-{i}","queue_id":"missing-queue"}}"#);
        env.publish(body.as_bytes(), Some(&format!("rb-{i}"))).await;
    }
    for i in 0..bad {
        env.publish(
            br#"{"visitor_id":"v","queue_id":"q","bot_score":5}"#,
            Some(&format!("bad-{i}")),
        )
        .await;
    }
    let q = env.settings.amqp.dead_letter_queue.clone();
    let filled = env
        .wait_for_async(WAIT, || async {
            env.queue_len(&q).await as usize == perm + bad
        })
        .await;
    assert!(filled, "the DLQ filled");
    (env, pod)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runbook_from_dlq_growing_to_replayed_and_verified() {
    let (env, mut pod) = broken(3, 2).await;
    let q = env.settings.amqp.dead_letter_queue.clone();

    // 1. How many, and why?
    let table = ok(&run(&pod, &["dlq", "list"]));
    let first = table.lines().next().unwrap_or_default();
    assert!(first.contains("5 message(s)"), "{table}");
    assert!(table.contains("rb-0") && table.contains("permanent_api_error"));
    let limited = ok(&run(
        &pod,
        &[
            "dlq",
            "list",
            "--reason",
            "permanent_api_error",
            "--limit",
            "20",
        ],
    ));
    assert!(limited.contains("showing 3"), "{limited}");
    let json = ok(&run(&pod, &["dlq", "list", "--json"]));
    let mut reasons = BTreeMap::new();
    for line in json.lines() {
        let m: serde_json::Value = serde_json::from_str(line).expect("one JSON object a line");
        *reasons
            .entry(m["reason"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(reasons.get("permanent_api_error"), Some(&3));
    assert_eq!(reasons.get("invalid_request"), Some(&2));

    // 2. Look at one in full: detail, the key audit show takes, and that key's audit entries.
    let shown = ok(&run(&pod, &["dlq", "show", "rb-0"]));
    assert!(shown.contains("idempotency key  rb-0"), "{shown}");
    assert!(shown.contains("404"), "{shown}");
    assert!(shown.contains("audit entries"), "{shown}");
    assert!(shown.contains("permanent_api_error"), "{shown}");
    let audit = ok(&run(&pod, &["audit", "show", "rb-0"]));
    assert!(audit.contains("permanent_api_error"), "{audit}");

    // 3. Fix the cause: the routing queue exists now.
    env.sim.sim.set_faults(Faults::default());

    // 4. Rehearse.
    let rehearsal = ok(&run(
        &pod,
        &[
            "dlq",
            "replay",
            "--reason",
            "permanent_api_error",
            "--since",
            "6h",
            "--dry-run",
        ],
    ));
    assert!(rehearsal.contains("would replay 3 of 5"), "{rehearsal}");
    assert_eq!(env.queue_len(&q).await, 5, "a rehearsal moves nothing");

    // 5. Replay, gently.
    let replayed = ok(&run(
        &pod,
        &[
            "dlq",
            "replay",
            "--reason",
            "permanent_api_error",
            "--since",
            "6h",
            "--rate",
            "20",
        ],
    ));
    assert!(replayed.contains("replayed 3 of 5"), "{replayed}");
    let created = env
        .wait_for(WAIT, || env.sim.sim.stats().sessions_created == 3)
        .await;
    assert!(created, "the replayed requests got their sessions");

    // 6. Verify.
    let after = ok(&run(&pod, &["dlq", "list"]));
    assert!(
        after
            .lines()
            .next()
            .unwrap_or_default()
            .contains("2 message(s)"),
        "{after}"
    );
    let tail = ok(&run(&pod, &["audit", "tail", "-n", "20"]));
    assert!(
        tail.contains("started") && tail.contains("dlq_replay"),
        "{tail}"
    );
    assert!(tail.contains("runbook-test"), "the operator: {tail}");
    let stats = ok(&run(&pod, &["audit", "stats", "--since", "1h"]));
    assert!(stats.contains("started"), "{stats}");
    let metrics = reqwest::get(format!("http://{}/metrics", pod.http))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(metrics.contains("session_requests_total"));

    // 7. Drop what cannot succeed.
    let counted = run(&pod, &["dlq", "purge", "--reason", "invalid_request"]);
    assert_eq!(counted.status.code(), Some(2), "without --yes: counts only");
    assert!(
        stdout(&counted).contains("2 of 2")
            || String::from_utf8_lossy(&counted.stderr).contains("2 of 2")
    );
    assert_eq!(env.queue_len(&q).await, 2);
    let purged = ok(&run(
        &pod,
        &["dlq", "purge", "--reason", "invalid_request", "--yes"],
    ));
    assert!(purged.contains("purged 2"), "{purged}");
    assert_eq!(env.queue_len(&q).await, 0);
    let tail = ok(&run(&pod, &["audit", "tail", "-n", "1", "--json"]));
    assert!(tail.contains("dlq_purge"), "{tail}");
    assert_eq!(pod.stop(), Some(0));
}

/// The replay's audit entry (the newest `dlq_replay` one).
fn replay_entry(pod: &Pod) -> serde_json::Value {
    let tail = ok(&run(pod, &["audit", "tail", "-n", "50", "--json"]));
    tail.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|e| e["event_type"] == "dlq_replay")
        .expect("a dlq_replay audit entry")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_messages_that_fail_again_ends_with_one_attempt_each() {
    // Nothing is fixed: every replayed copy fails again and is dead-lettered again while the
    // replay runs. The replay must not take its own copies back.
    let (env, mut pod) = broken(4, 0).await;
    let before = env.sim.sim.stats().not_found;
    assert_eq!(before, 4);
    // If the replay took its own copies back it would never end: give it a minute.
    let out = ok(&run_within(
        &pod,
        &[
            "dlq",
            "replay",
            "--reason",
            "permanent_api_error",
            "--rate",
            "2",
            "--operator",
            "alice",
        ],
        Duration::from_secs(60),
    ));
    assert!(out.contains("replayed 4 of 4"), "{out}");
    // Every replayed copy is tried once and comes back to the DLQ; nothing more happens.
    let q = env.settings.amqp.dead_letter_queue.clone();
    let back = env
        .wait_for_async(WAIT, || async { env.queue_len(&q).await == 4 })
        .await;
    assert!(back, "the copies failed again and are back in the DLQ");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.sim.sim.stats().not_found,
        8,
        "one attempt per replayed message"
    );
    let entry = replay_entry(&pod);
    assert_eq!(entry["operator"], "alice");
    assert_eq!(entry["outcome"], "done");
    assert_eq!(entry["count"], 4);
    let detail = entry["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("filter: queue=worker reason=permanent_api_error"),
        "{detail}"
    );
    // The copies carry the run that published them.
    let listed = ok(&run(&pod, &["dlq", "list", "--json"]));
    assert!(
        listed.lines().all(|l| l.contains("\"replay_count\":1")),
        "{listed}"
    );
    assert_eq!(pod.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_replay_says_so_and_still_writes_its_audit_entry() {
    let (env, mut pod) = broken(4, 0).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("--config")
        .arg(pod.config_path())
        .args(["dlq", "replay", "--rate", "1"])
        .env_remove("RUST_LOG")
        .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
        .env_remove("USER")
        .env("LOGNAME", "night-shift")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("replay starts");
    // Ctrl-C once the first replayed copy has reached the API (so the replay is under way, with
    // its signal handler in place), long before the fourth is due (one a second).
    let under_way = env
        .wait_for(Duration::from_secs(20), || {
            env.sim.sim.stats().not_found >= 5
        })
        .await;
    assert!(under_way, "the replay started");
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        assert!(Instant::now() < deadline, "the replay stopped after Ctrl-C");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = child.wait_with_output().expect("output");
    let text = stdout(&out);
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("interrupted"), "{text}");
    let entry = replay_entry(&pod);
    assert_eq!(entry["outcome"], "interrupted");
    assert_eq!(entry["operator"], "night-shift");
    let moved = entry["count"].as_u64().unwrap_or(99);
    assert!((1..4).contains(&moved), "{entry}");
    // What was not replayed is still in the DLQ (the replayed ones may be back too).
    let left = env.queue_len(&env.settings.amqp.dead_letter_queue).await;
    assert!(
        left >= 4 - moved as u32,
        "{left} left after {moved} replayed"
    );
    assert_eq!(pod.stop(), Some(0));
}
