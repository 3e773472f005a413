//! Operator tools against the real broker: DLQ list/replay/purge, audit reads, health and metrics.

mod common;

use common::{request, TestEnv};
use session_worker::dlq::{self, DlqKind, Filter, ReplayOptions};
use session_worker::sim::{AuthMode, Faults};
use std::io::Write;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Dead-letter `n` invalid requests with message ids `bad-0`.. and `m` permanent errors `perm-0`..
async fn fill_dlq(env: &TestEnv, n: usize, m: usize) {
    let worker = env.start_worker(env.open_store_shared());
    for i in 0..n {
        env.publish(
            br#"{"visitor_id":"v","queue_id":"q","bot_score":5}"#,
            Some(&format!("bad-{i}")),
        )
        .await;
    }
    for i in 0..m {
        let body = format!(r#"{{"visitor_id":"perm-{i}","queue_id":"missing-queue"}}"#);
        env.publish(body.as_bytes(), Some(&format!("perm-{i}")))
            .await;
    }
    let dlq_name = env.settings.amqp.dead_letter_queue.clone();
    let mut depth = 0;
    for _ in 0..300 {
        depth = env.queue_len(&dlq_name).await;
        if depth as usize == n + m {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
    assert_eq!(depth as usize, n + m, "DLQ filled");
}

/// A shutdown nobody fires.
fn never() -> session_worker::shutdown::Shutdown {
    session_worker::shutdown::Shutdown::never()
}

fn ids(messages: &[dlq::DlqMessage]) -> Vec<String> {
    messages.iter().map(|m| m.message_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_leaves_the_dlq_unchanged_and_dry_run_moves_nothing() {
    let env = TestEnv::new(
        Faults {
            reject_queues: vec!["missing-queue".into()],
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 1;
        },
    )
    .await;
    fill_dlq(&env, 3, 2).await;
    let q = env.settings.amqp.dead_letter_queue.clone();
    let (depth, first) = dlq::list(&env.conn, &q, &Filter::default()).await.unwrap();
    let (_, second) = dlq::list(&env.conn, &q, &Filter::default()).await.unwrap();
    assert_eq!(depth, 5);
    assert_eq!(
        ids(&first),
        vec!["bad-0", "bad-1", "bad-2", "perm-0", "perm-1"]
    );
    assert_eq!(ids(&first), ids(&second), "same order after listing");
    assert_eq!(first[0].reason.as_deref(), Some("invalid_request"));
    assert!(first[0].body.is_some());
    let (_, only_perm) = dlq::list(
        &env.conn,
        &q,
        &Filter {
            reason: Some("permanent_api_error".into()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(ids(&only_perm), vec!["perm-0", "perm-1"]);

    let moved = dlq::replay(
        &env.conn,
        &env.settings,
        DlqKind::Worker,
        &Filter::default(),
        &ReplayOptions {
            dry_run: true,
            ..Default::default()
        },
        &never(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((moved.matched, moved.moved), (5, 0));
    assert_eq!(env.queue_len(&q).await, 5, "dry run moves nothing");
    let (_, after) = dlq::list(&env.conn, &q, &Filter::default()).await.unwrap();
    assert_eq!(ids(&after), ids(&first));
}

/// Everything `dlq show` says about every message, in queue order.
async fn snapshot(env: &TestEnv, q: &str) -> Vec<serde_json::Value> {
    let (_, listed) = dlq::list(&env.conn, q, &Filter::default()).await.unwrap();
    let mut out = Vec::new();
    for m in &listed {
        out.push(
            dlq::show(&env.conn, q, &m.message_id)
                .await
                .unwrap()
                .expect("listed message is shown"),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_a_dlq_fifty_times_leaves_it_identical() {
    let env = TestEnv::new(Faults::default(), |s| s.worker.concurrency = 1).await;
    fill_dlq(&env, 5, 0).await;
    let q = env.settings.amqp.dead_letter_queue.clone();
    let before = snapshot(&env, &q).await;
    for _ in 0..50 {
        let limited = Filter {
            max: Some(2),
            ..Default::default()
        };
        let (_, two) = dlq::list(&env.conn, &q, &limited).await.unwrap();
        assert_eq!(ids(&two), vec!["bad-0", "bad-1"]);
        dlq::show(&env.conn, &q, "bad-3").await.unwrap();
    }
    let after = snapshot(&env, &q).await;
    assert_eq!(before.len(), 5);
    assert_eq!(before, after, "same messages, same order, same headers");
    for m in &after {
        assert!(
            m["headers"].get("x-delivery-count").is_none(),
            "no delivery count: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_declare_converts_a_quorum_dlq_keeping_its_messages_in_order() {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let q = env.settings.amqp.dead_letter_queue.clone();
    // The DLQ as an earlier version declared it: a quorum queue, holding three messages.
    env.ch
        .queue_delete(q.as_str().into(), Default::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    env.ch
        .queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    for i in 0..3 {
        let props = lapin::BasicProperties::default().with_message_id(format!("old-{i}").into());
        env.ch
            .basic_publish(
                "".into(),
                q.as_str().into(),
                Default::default(),
                b"{}",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let notes = session_worker::amqp::topology::declare_all(&env.conn, &env.settings.amqp, true)
        .await
        .unwrap();
    assert!(
        notes
            .iter()
            .any(|n| n.contains("converted") && n.contains("3 messages")),
        "{notes:?}"
    );
    let (_, listed) = dlq::list(&env.conn, &q, &Filter::default()).await.unwrap();
    assert_eq!(ids(&listed), vec!["old-0", "old-1", "old-2"]);
    // It is a classic queue now: declaring it so again is accepted, and nothing is left over.
    let again = session_worker::amqp::topology::declare_all(&env.conn, &env.settings.amqp, true)
        .await
        .unwrap();
    assert!(again.is_empty(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_by_reason_moves_only_matches_which_then_get_processed_even_with_the_worker_down() {
    let env = TestEnv::new(
        Faults {
            reject_queues: vec!["missing-queue".into()],
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 1;
        },
    )
    .await;
    fill_dlq(&env, 2, 3).await;
    // The routing queue now exists: the permanent errors can succeed.
    env.sim.sim.set_faults(Faults::default());
    let filter = Filter {
        reason: Some("permanent_api_error".into()),
        ..Default::default()
    };
    let moved = dlq::replay(
        &env.conn,
        &env.settings,
        DlqKind::Worker,
        &filter,
        &ReplayOptions {
            rate_per_sec: Some(100.0),
            ..Default::default()
        },
        &never(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((moved.depth, moved.matched, moved.moved), (5, 3, 3));
    // The worker is down: the replayed messages wait in the inbound queue.
    assert_eq!(env.queue_len(&env.settings.amqp.inbound_queue).await, 3);
    let (_, left) = dlq::list(
        &env.conn,
        &env.settings.amqp.dead_letter_queue,
        &Filter::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        ids(&left),
        vec!["bad-0", "bad-1"],
        "non-matching messages stay, in order"
    );

    let store = env.open_store_shared();
    let worker = env.start_worker(store.clone());
    let ok = env
        .wait_for(WAIT, || {
            (0..3).all(|i| env.sim.sim.sessions_for(&format!("perm-{i}")) == 1)
        })
        .await;
    worker.stop().await;
    assert!(ok, "replayed requests were processed");
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_confirmation_and_removes_only_matches() {
    let env = TestEnv::new(
        Faults {
            reject_queues: vec!["missing-queue".into()],
            ..Default::default()
        },
        |_| {},
    )
    .await;
    fill_dlq(&env, 2, 1).await;
    let q = env.settings.amqp.dead_letter_queue.clone();
    let filter = Filter {
        reason: Some("invalid_request".into()),
        ..Default::default()
    };
    let unconfirmed = dlq::purge(&env.conn, &q, &filter, false, |_| {})
        .await
        .unwrap();
    assert_eq!((unconfirmed.matched, unconfirmed.moved), (2, 0));
    assert_eq!(env.queue_len(&q).await, 3);
    let done = dlq::purge(&env.conn, &q, &filter, true, |_| {})
        .await
        .unwrap();
    assert_eq!(done.moved, 2);
    let (_, left) = dlq::list(&env.conn, &q, &Filter::default()).await.unwrap();
    assert_eq!(ids(&left), vec!["perm-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_flips_under_auth_failure_and_metrics_move_with_traffic() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let store = env.open_store_shared();
    let worker = env.start_worker(store.clone());
    let listener = session_worker::http::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let health = worker.health.clone();
    let server = tokio::spawn(session_worker::http::serve(
        listener,
        health,
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let get = |path: &str| {
        let http = http.clone();
        let url = format!("{base}{path}");
        async move {
            let r = http.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert!(env.wait_for(WAIT, || worker.health.ready()).await);
    assert_eq!(get("/readyz").await.0, 200);
    assert_eq!(get("/healthz").await.0, 200);
    // The metrics port serves no audit data and takes no writes.
    assert_eq!(get("/audit").await.0, 404);
    let forged = http
        .post(format!("{base}/audit"))
        .header("content-type", "application/json")
        .body(r#"{"timestamp":"","event_type":"session_init","outcome":"started","worker_id":"attacker"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status().as_u16(), 404);
    drop(store);
    let count = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let before = count(
        &get("/metrics").await.1,
        "session_requests_total{outcome=\"started\"}",
    );
    for i in 0..3 {
        env.publish(&request(&format!("m{i}")), None).await;
    }
    assert_eq!(env.events(3, WAIT).await.len(), 3);
    let (_, text) = get("/metrics").await;
    assert!(
        count(&text, "session_requests_total{outcome=\"started\"}") >= before + 3.0,
        "{text}"
    );
    assert!(text.contains("genesys_request_duration_seconds_bucket"));
    // Three outcomes were made durable: at least one group commit, each with a writer or more.
    assert!(count(&text, "store_flushes_total") >= 1.0, "{text}");
    assert!(count(&text, "store_flush_waiters_sum") >= 3.0, "{text}");

    env.sim.sim.set_faults(Faults {
        auth: AuthMode::Forbidden,
        ..Default::default()
    });
    env.publish(&request("forbidden"), None).await;
    assert!(env.wait_for(WAIT, || worker.health.auth_paused()).await);
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains("paused"), "{body}");
    worker.stop().await;
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_commands_read_a_stopped_workers_store() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    {
        let store = env.open_store_shared();
        let worker = env.start_worker(store);
        env.publish(&request("audited"), Some("audit-key")).await;
        assert_eq!(env.events(1, WAIT).await.len(), 1);
        worker.stop().await;
    }
    env.close_store();
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(env.settings.to_redacted_toml().unwrap().as_bytes())
        .unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
            .arg("--config")
            .arg(file.path())
            .args(args)
            .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
            .output()
            .unwrap()
    };
    // The in-process worker's store handles are released asynchronously (its flusher task ends
    // once the last handle is dropped); a real worker releases the lock when its process exits.
    let mut show = run(&["audit", "show", "--json", "audit-key"]);
    for _ in 0..50 {
        if show.status.code() == Some(0) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        show = run(&["audit", "show", "--json", "audit-key"]);
    }
    assert_eq!(
        show.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    let line = String::from_utf8_lossy(&show.stdout).to_string();
    let entry: serde_json::Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    assert_eq!(entry["visitor_id"], "audited");
    assert_eq!(entry["outcome"], "started");
    let export = run(&["audit", "export", "--since", "1h"]);
    assert_eq!(String::from_utf8_lossy(&export.stdout).lines().count(), 1);
    let none = run(&["audit", "export", "--until", "2000-01-01T00:00:00Z"]);
    assert_eq!(String::from_utf8_lossy(&none.stdout).lines().count(), 0);
    let stats = run(&["audit", "stats"]);
    assert!(String::from_utf8_lossy(&stats.stdout).contains("started"));
    assert_eq!(
        run(&["audit", "show", "no-such-key"]).status.code(),
        Some(1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_dlq_commands_work_beside_a_running_worker_through_its_admin_socket() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let mut pod = common::Pod::new(&env, "admin");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    env.publish(&request("beside"), Some("beside-key")).await;
    assert_eq!(env.events(1, WAIT).await.len(), 1);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
            .arg("--config")
            .arg(pod.config_path())
            .args(args)
            .env("SESSION_WORKER__AMQP__URL", common::AMQP_URL)
            .output()
            .unwrap()
    };
    let show = run(&["audit", "show", "--json", "beside-key"]);
    assert_eq!(
        show.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&show.stderr)
    );
    assert!(String::from_utf8_lossy(&show.stdout).contains("\"outcome\":\"started\""));
    // The socket sits beside the store, owner-only.
    let socket = session_worker::admin::socket_path(&pod.store);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // A replay beside the running worker writes its audit entry through the socket.
    let replay = run(&["dlq", "replay", "--reason", "permanent_api_error"]);
    assert_eq!(
        replay.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let tail = run(&["audit", "tail", "-n", "1"]);
    assert!(
        String::from_utf8_lossy(&tail.stdout).contains("dlq_replay"),
        "{}",
        String::from_utf8_lossy(&tail.stdout)
    );
    assert_eq!(pod.stop(), Some(0));
    assert!(
        !socket.exists(),
        "the socket is removed when the worker stops"
    );
    // A store that does not exist is an error, not an empty trail.
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .arg("--config")
        .arg(pod.config_path())
        .args(["audit", "stats"])
        .env(
            "SESSION_WORKER__STORE__PATH",
            "/nonexistent/session-worker-store",
        )
        .output()
        .unwrap();
    assert_ne!(missing.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no store at"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcome_unknown_is_replayed_only_with_force_and_then_sent_once_more() {
    let env = TestEnv::new(
        Faults {
            answer_late_ms: 2_000,
            ..Default::default()
        },
        |s| s.genesys.request_timeout = Duration::from_secs(1),
    )
    .await;
    let worker = env.start_worker(env.open_store());
    env.publish(&request("unsure"), Some("unsure-key")).await;
    let q = env.settings.amqp.dead_letter_queue.clone();
    let mut listed = Vec::new();
    for _ in 0..100 {
        listed = dlq::list(&env.conn, &q, &Filter::default())
            .await
            .unwrap()
            .1;
        if !listed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].reason.as_deref(), Some("outcome_unknown"));
    assert_eq!(env.sim.sim.stats().sessions_created, 1);
    let unknown = Filter {
        reason: Some("outcome_unknown".into()),
        ..Default::default()
    };
    // Without --force the message stays where it is.
    let held = dlq::replay(
        &env.conn,
        &env.settings,
        DlqKind::Worker,
        &unknown,
        &ReplayOptions::default(),
        &never(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!((held.moved, held.held_back), (0, 1));
    assert_eq!(
        dlq::list(&env.conn, &q, &Filter::default())
            .await
            .unwrap()
            .1
            .len(),
        1
    );
    // The operator checked Genesys Cloud: no session. Now Genesys answers at once.
    env.sim.sim.set_faults(Faults::default());
    let forced = dlq::replay(
        &env.conn,
        &env.settings,
        DlqKind::Worker,
        &unknown,
        &ReplayOptions {
            force: true,
            ..Default::default()
        },
        &never(),
        |_, _| {},
    )
    .await
    .unwrap();
    assert_eq!(forced.moved, 1);
    let done = env
        .wait_for(WAIT, || env.sim.sim.stats().sessions_created >= 2)
        .await;
    let events = env.events(2, Duration::from_secs(10)).await;
    worker.stop().await;
    assert!(done, "the replayed request was sent once more");
    assert_eq!(env.sim.sim.stats().sessions_created, 2);
    assert!(
        events
            .iter()
            .any(|e| e.event == session_worker::event::EventKind::SessionStarted),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_is_its_own_not_ready_reason() {
    let env = TestEnv::new(Faults::default(), |s| {
        s.amqp.url = "amqp://guest:not-the-password@127.0.0.1:5672/%2f".into();
    })
    .await;
    let worker = env.start_worker(env.open_store());
    let named = env
        .wait_for(WAIT, || {
            worker
                .health
                .not_ready_reasons()
                .iter()
                .any(|r| r.contains("refused the login"))
        })
        .await;
    assert!(named, "{:?}", worker.health.not_ready_reasons());
    worker.stop().await;
}
