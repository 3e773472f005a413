//! The operator console's read API against the real broker and a running worker (SPEC §7
//! "Console"): `session-worker console` beside a pod, reading its DLQ and, through the pod's
//! admin endpoint, its audit trail.

mod common;

use common::{request, Pod, TestEnv};
use session_worker::sim::Faults;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::console::{Console, OPERATOR, VIEWER};

fn start_console(pod: &Pod) -> Console {
    Console::start(
        env!("CARGO_BIN_EXE_session-worker"),
        pod.config_path(),
        Duration::from_secs(120),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_groups_pages_and_looks_up_what_a_worker_dead_lettered() {
    let faults = Faults {
        reject_queues: vec!["missing-queue".into()],
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| s.worker.max_attempts = 1).await;
    let mut pod = Pod::new(&env, "console");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    for i in 0..3 {
        env.publish(format!("{{\"visitor_id\":\"bad-{i}\"").as_bytes(), None)
            .await;
    }
    for i in 0..2 {
        let body = format!(
            r#"{{"visitor_id":"rejected-{i}","queue_id":"missing-queue","bot_score":0.1,"source":"test","external_id":"x-{i}"}}"#
        );
        env.publish(body.as_bytes(), None).await;
    }
    env.publish(&request("console-good"), Some("console-good-key"))
        .await;
    let dlq = env.settings.amqp.dead_letter_queue.clone();
    assert!(
        env.wait_for_async(Duration::from_secs(60), || async {
            env.queue_len(&dlq).await >= 5
        })
        .await,
        "five dead letters"
    );
    assert_eq!(env.events(1, Duration::from_secs(30)).await.len(), 1);

    let console = start_console(&pod);
    console.up().await;

    // The page loads without a token, under a strict policy; the API needs one.
    let page = console.http.get(&console.base).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(page.text().await.unwrap().contains("/console.js"));
    assert_eq!(console.get("/api/overview", None).await.0, 401);
    assert_eq!(
        console
            .get("/api/overview", Some("wrong-token-0123456789"))
            .await
            .0,
        401
    );

    let (status, overview) = console.get("/api/overview", Some(VIEWER)).await;
    assert_eq!(status, 200, "{overview}");
    let worker = &overview["queues"][0];
    assert_eq!(worker["queue"], "worker");
    assert_eq!(worker["depth"], 5, "{overview}");
    assert_eq!(worker["groups"], 2, "{overview}");
    assert_eq!(overview["fleet"]["reachable"], true, "{overview}");
    assert!(
        overview["last_hour"]["created"].as_u64() >= Some(1),
        "{overview}"
    );
    assert!(
        overview["last_hour"]["failed"].as_u64() >= Some(5),
        "{overview}"
    );

    let (_, groups) = console.get("/api/groups", Some(OPERATOR)).await;
    let groups = groups["groups"].as_array().unwrap().clone();
    let invalid = groups
        .iter()
        .find(|g| g["reason"] == "invalid_request")
        .expect("an invalid_request group");
    assert_eq!(invalid["count"], 3);
    assert!(groups
        .iter()
        .any(|g| g["reason"] == "permanent_api_error" && g["count"] == 2));

    // Pages of two, through the cursor, every message once.
    let id = invalid["id"].as_str().unwrap();
    let (_, first) = console
        .get(&format!("/api/messages?group={id}&limit=2"), Some(VIEWER))
        .await;
    assert_eq!(first["messages"].as_array().unwrap().len(), 2, "{first}");
    let cursor = first["next_cursor"].as_str().expect("a cursor").to_string();
    let (_, second) = console
        .get(
            &format!("/api/messages?group={id}&limit=2&cursor={cursor}"),
            Some(VIEWER),
        )
        .await;
    assert_eq!(second["messages"].as_array().unwrap().len(), 1, "{second}");
    assert!(second["next_cursor"].is_null());
    let (status, _) = console.get("/api/messages?group=nope", Some(VIEWER)).await;
    assert_eq!(status, 404);
    let (status, _) = console
        .get(
            &format!("/api/messages?group={id}&cursor=1.x"),
            Some(VIEWER),
        )
        .await;
    assert_eq!(status, 400);

    // A key, and the same key found by its visitor id.
    let (_, by_key) = console
        .get("/api/keys/console-good-key", Some(VIEWER))
        .await;
    assert_eq!(by_key["state"], "started", "{by_key}");
    assert_eq!(by_key["decided_by"], format!("{}-console", env.prefix));
    let (_, by_visitor) = console.get("/api/keys/console-good", Some(VIEWER)).await;
    assert_eq!(by_visitor["matched_by"], "visitor_id", "{by_visitor}");
    assert_eq!(by_visitor["keys"][0], "console-good-key");
    // A dead letter's key: its audit entry and the dead letter, in one timeline.
    let rejected = groups
        .iter()
        .find(|g| g["reason"] == "permanent_api_error")
        .and_then(|g| g["id"].as_str())
        .unwrap();
    let (_, page) = console
        .get(
            &format!("/api/messages?group={rejected}&limit=1"),
            Some(VIEWER),
        )
        .await;
    let key = page["messages"][0]["idempotency_key"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, dead) = console.get(&format!("/api/keys/{key}"), Some(VIEWER)).await;
    let kinds: Vec<&str> = dead["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"audit") && kinds.contains(&"dead_letter"),
        "{dead}"
    );

    // One message whole: every header and the body, read from the queue, and its key's
    // timeline.
    let id = page["messages"][0]["message_id"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/messages/{id}?queue=worker");
    assert_eq!(console.get(&path, None).await.0, 401);
    let (status, whole) = console.get(&path, Some(VIEWER)).await;
    assert_eq!(status, 200, "{whole}");
    let m = &whole["message"];
    assert_eq!(
        m["headers"]["x-failure-reason"], "permanent_api_error",
        "{whole}"
    );
    assert!(m["headers"]["x-failed-at"].is_string(), "{whole}");
    assert!(
        m["body"].as_str().unwrap_or("").contains("queue_id"),
        "{whole}"
    );
    assert_eq!(whole["key"]["keys"][0], key.as_str(), "{whole}");
    let (status, _) = console
        .get("/api/messages/no-such-message?queue=worker", Some(VIEWER))
        .await;
    assert_eq!(status, 404);
    let (status, _) = console
        .get(&format!("/api/messages/{id}?queue=elsewhere"), Some(VIEWER))
        .await;
    assert_eq!(status, 400);

    // Nothing was consumed: the DLQ holds the five still.
    assert_eq!(env.queue_len(&dlq).await, 5);
    drop(console);
    assert_eq!(pod.stop(), Some(0));
}

#[test]
fn the_console_refuses_to_start_without_a_token() {
    let out = Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .args(["console", "--listen", "127.0.0.1:0"])
        .env_remove("SESSION_WORKER_CONSOLE_VIEWER_TOKEN")
        .env_remove("SESSION_WORKER_CONSOLE_OPERATOR_TOKEN")
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SESSION_WORKER_CONSOLE_VIEWER_TOKEN"), "{err}");
    let short = Command::new(env!("CARGO_BIN_EXE_session-worker"))
        .args(["console"])
        .env("SESSION_WORKER_CONSOLE_VIEWER_TOKEN", "short")
        .output()
        .unwrap();
    assert_eq!(short.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replays_a_group_through_a_plan_in_paced_canary_steps_and_purges_another() {
    let faults = Faults {
        reject_queues: vec!["missing-queue".into()],
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.max_attempts = 1;
        s.rate_limit.requests_per_minute = 600;
    })
    .await;
    let mut pod = Pod::new(&env, "replayer");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    for i in 0..12 {
        let body = format!(
            r#"{{"visitor_id":"later-{i}","queue_id":"missing-queue","bot_score":0.1,"source":"test","external_id":"x-{i}"}}"#
        );
        env.publish(body.as_bytes(), Some(&format!("later-key-{i}")))
            .await;
    }
    for i in 0..2 {
        env.publish(format!("{{\"broken-{i}\"").as_bytes(), None)
            .await;
    }
    let dlq = env.settings.amqp.dead_letter_queue.clone();
    assert!(
        env.wait_for_async(Duration::from_secs(60), || async {
            env.queue_len(&dlq).await >= 14
        })
        .await,
        "fourteen dead letters"
    );
    let console = start_console(&pod);
    console.up().await;
    let group = console.group_of("permanent_api_error").await;
    let plan_body = serde_json::json!({ "queue": "worker", "group": group });

    // Only an operator who says who they are plans.
    assert_eq!(
        console
            .post("/api/plans", VIEWER, Some("vic"), plan_body.clone())
            .await
            .0,
        403
    );
    assert_eq!(
        console
            .post("/api/plans", OPERATOR, None, plan_body.clone())
            .await
            .0,
        400
    );
    let (status, plan) = console
        .post("/api/plans", OPERATOR, Some("alice"), plan_body.clone())
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["total"], 12, "{plan}");
    assert_eq!(plan["counts"]["call"], 12, "{plan}");
    assert_eq!(plan["rate_per_sec"], 5.0, "half of 600/min");
    let plan_id = plan["id"].as_str().unwrap().to_string();

    // Genesys still refuses: the first canary fails again and the run stops by itself.
    let replay = serde_json::json!({ "plan_id": plan_id, "canary": [1, 3] });
    assert_eq!(
        console
            .post("/api/replay", VIEWER, Some("vic"), replay.clone())
            .await
            .0,
        403
    );
    let (status, started) = console
        .post("/api/replay", OPERATOR, Some("alice"), replay.clone())
        .await;
    assert_eq!(status, 202, "{started}");
    let stopped = console.replay_to_the_end(&plan_id).await;
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert_eq!(stopped["replayed"], 1, "{stopped}");
    assert_eq!(stopped["refailed"], 1, "{stopped}");
    // The DLQ is not what the plan saw any more: applying it again is refused.
    assert!(
        env.wait_for_async(Duration::from_secs(30), || async {
            env.queue_len(&dlq).await >= 14
        })
        .await
    );
    let (status, refused) = console
        .post("/api/replay", OPERATOR, Some("alice"), replay)
        .await;
    assert_eq!(status, 409, "{refused}");

    // Fixed in Genesys: a new plan replays all twelve, 1 → 3 → 8, paced at 5/s.
    env.sim.sim.set_faults(Faults::default());
    let (_, plan) = console
        .post("/api/plans", OPERATOR, Some("alice"), plan_body.clone())
        .await;
    let plan_id = plan["id"].as_str().unwrap().to_string();
    assert_eq!(plan["total"], 12, "{plan}");
    let replay = serde_json::json!({ "plan_id": plan_id, "canary": [1, 3] });
    let (status, _) = console
        .post("/api/replay", OPERATOR, Some("alice"), replay)
        .await;
    assert_eq!(status, 202);
    // While it runs (12 at 5/s: seconds), a reading of the queue would hold what it replays.
    let (status, busy) = console
        .post("/api/plans", OPERATOR, Some("alice"), plan_body)
        .await;
    assert_eq!(status, 409, "{busy}");
    let done = console.replay_to_the_end(&plan_id).await;
    assert_eq!(done["state"], "done", "{done}");
    assert_eq!(done["replayed"], 12, "{done}");
    assert_eq!(done["steps"], serde_json::json!([1, 3, 8]), "{done}");
    // Pacing, for the record (not asserted: timing belongs to make bench).
    eprintln!(
        "replay pacing: 12 messages in {:.2} s of replaying at {} /s (schedule: steps 1, 3, 8 → (0 + 2 + 7) / 5 = 1.80 s)",
        done["elapsed_secs"].as_f64().unwrap_or(0.0),
        done["rate_per_sec"],
    );
    assert!(
        env.wait_for_async(Duration::from_secs(30), || async {
            env.queue_len(&dlq).await == 2
        })
        .await
    );

    // Each message's replay is in its key's timeline: who, in which role, under which plan.
    let (_, timeline) = console.get("/api/keys/later-key-3", Some(VIEWER)).await;
    let replayed = timeline["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["event_type"] == "dlq_replay" && e["plan_id"] == plan_id.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("no dlq_replay entry of {plan_id}: {timeline}"));
    assert_eq!(replayed["operator"], "alice");
    assert_eq!(replayed["role"], "operator");
    assert_eq!(timeline["state"], "started", "{timeline}");

    // A purge of one group, only with the queue's name typed.
    let broken = console.group_of("invalid_request").await;
    let wrong = serde_json::json!({ "group": broken, "confirm": "yes" });
    assert_eq!(
        console
            .post("/api/purge", OPERATOR, Some("alice"), wrong)
            .await
            .0,
        400
    );
    let right = serde_json::json!({ "group": broken, "confirm": dlq });
    assert_eq!(
        console
            .post("/api/purge", VIEWER, Some("vic"), right.clone())
            .await
            .0,
        403
    );
    let (status, purged) = console
        .post("/api/purge", OPERATOR, Some("alice"), right)
        .await;
    assert_eq!(status, 200, "{purged}");
    assert_eq!(purged["purged"], 2, "{purged}");
    assert_eq!(env.queue_len(&dlq).await, 0);
    drop(console);
    assert_eq!(pod.stop(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_headless_chromium_a_viewer_looks_and_an_operator_replays_a_group_through_a_plan() {
    let (chromium, dir) = common::console::browser_tools().unwrap_or_else(|why| panic!("{why}"));
    let faults = Faults {
        reject_queues: vec!["missing-queue".into()],
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.max_attempts = 1;
        s.rate_limit.requests_per_minute = 600;
    })
    .await;
    let mut pod = Pod::new(&env, "browser");
    pod.start();
    assert!(pod.ready_within(Duration::from_secs(60)).await.is_some());
    for i in 0..5 {
        let body = format!(
            r#"{{"visitor_id":"browser-{i}","queue_id":"missing-queue","bot_score":0.1,"source":"test","external_id":"b-{i}"}}"#
        );
        env.publish(body.as_bytes(), Some(&format!("browser-key-{i}")))
            .await;
    }
    let dlq = env.settings.amqp.dead_letter_queue.clone();
    assert!(
        env.wait_for_async(Duration::from_secs(60), || async {
            env.queue_len(&dlq).await >= 5
        })
        .await
    );
    // Fixed in Genesys: the replay will create the sessions.
    env.sim.sim.set_faults(Faults::default());
    let console = start_console(&pod);
    console.up().await;
    let shots = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let out = console
        .browser(&chromium, &dir, &shots, &[("LOOKUP_KEY", "browser-key-2")])
        .output()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{stdout}");
    eprintln!(
        "browser test measured: {stdout}; screenshots in {}",
        shots.display()
    );
    for view in [
        "1-overview",
        "2-lookup",
        "3-group",
        "4-plan",
        "5-replay",
        "6-audit",
    ] {
        assert!(shots.join(format!("{view}.png")).exists(), "{view}.png");
    }
    assert_eq!(env.queue_len(&dlq).await, 0, "the group was replayed");
    drop(console);
    assert_eq!(pod.stop(), Some(0));
}
