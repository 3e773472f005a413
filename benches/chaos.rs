//! `make chaos`: fault drills against the real broker, the simulator and the worker binary.
//! Each drill prints sent / created / duplicated / dead-lettered / lost; lost must be 0.
//! The drills are scripted and bounded; they assert nothing about timing.

#[path = "../tests/common/mod.rs"]
mod common;

use axum::http::StatusCode;
use common::{request, TestEnv};
use rand::Rng;
use session_worker::sim::Faults;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Row {
    drill: String,
    sent: u64,
    created: u64,
    duplicated: u64,
    dead_lettered: u64,
    lost: i64,
    note: String,
}

async fn dlq_len(env: &TestEnv) -> u64 {
    u64::from(queue_len_fresh(&env.settings.amqp.dead_letter_queue).await)
}

/// Queue length over a new connection (the test's own may have died with the broker).
async fn queue_len_fresh(queue: &str) -> u32 {
    let conn = common::broker().await;
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("queue exists");
    let _ = conn.close(200, "".into()).await;
    q.message_count()
}

fn row(drill: &str, sent: u64, env: &TestEnv, dead: u64, note: String) -> Row {
    let s = env.sim.sim.stats();
    Row {
        drill: drill.into(),
        sent,
        created: s.distinct_visitors,
        duplicated: s.duplicate_sessions,
        dead_lettered: dead,
        lost: sent as i64 - s.distinct_visitors as i64 - dead as i64,
        note,
    }
}

async fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// The drills that run on both backends: `web` runs them on `web_messaging`, where the
/// duplicated column must be 0 (the derived session token), not just within a bound.
fn backend(web: bool) -> &'static str {
    if web {
        " (web_messaging)"
    } else {
        ""
    }
}

async fn sigkill_drill(n: u64, kills: u64, web: bool) -> Row {
    let env = TestEnv::new(
        Faults {
            latency_ms: 2,
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 32;
            if web {
                common::web_messaging_on(s);
            }
        },
    )
    .await;
    let cfg = env.config_file();
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("kill-{i}"))).collect();
    env.publish_requests(&bodies).await;
    for k in 1..=kills {
        let mut child = common::spawn_worker_binary(cfg.path(), "error");
        let target = k * n / (kills + 1);
        wait_until(Duration::from_secs(120), || {
            env.sim.sim.stats().sessions_created >= target
        })
        .await;
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut child = common::spawn_worker_binary(cfg.path(), "error");
    wait_until(Duration::from_secs(300), || {
        env.sim.sim.stats().distinct_visitors >= n
    })
    .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let dead = dlq_len(&env).await;
    row(
        &format!(
            "worker SIGKILLed {kills}× during {n} requests{}",
            backend(web)
        ),
        n,
        &env,
        dead,
        if web {
            "duplicated must be 0".into()
        } else {
            String::new()
        },
    )
}

/// Three pods on one queue; one of them SIGKILLed and restarted `kills` times while every
/// request is re-published (a storm of copies). Lost must be 0; duplicates at most the killed
/// pod's in-flight count per kill.
async fn fleet_drill(n: u64, kills: u64, web: bool) -> Row {
    let env = TestEnv::new(
        Faults {
            latency_ms: 2,
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 16;
            if web {
                common::web_messaging_on(s);
            }
        },
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("fleet-{i}"))).collect();
    let mut pods: Vec<common::Pod> = (0..3)
        .map(|i| common::Pod::new(&env, &format!("pod{i}")))
        .collect();
    for p in &mut pods {
        p.start();
    }
    env.publish_requests(&bodies).await;
    for k in 1..=kills {
        let target = k * n / (kills + 1);
        wait_until(Duration::from_secs(120), || {
            env.sim.sim.stats().distinct_visitors >= target
        })
        .await;
        pods[0].kill();
        // The storm: every request again while a pod is down.
        env.publish_requests(&bodies).await;
        pods[0].start();
    }
    wait_until(Duration::from_secs(300), || {
        env.sim.sim.stats().distinct_visitors >= n
    })
    .await;
    // Let the parked and re-published copies drain (they replay, making no call).
    let a = env.settings.amqp.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut left = queue_len_fresh(&a.inbound_queue).await;
        for d in &a.retry_delays {
            left +=
                queue_len_fresh(&session_worker::amqp::topology::retry_queue_name(&a, *d)).await;
        }
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for p in &mut pods {
        p.stop();
    }
    let dead = dlq_len(&env).await;
    row(
        &format!(
            "3 pods, one SIGKILLed {kills}×, every request re-published after each kill ({n} keys){}",
            backend(web)
        ),
        n,
        &env,
        dead,
        if web {
            "duplicated must be 0".into()
        } else {
            format!("in-flight bound: {} per kill", 16)
        },
    )
}

async fn broker_restart_drill(n: u64) -> Row {
    let env = TestEnv::new(
        Faults {
            latency_ms: 5,
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 16;
            s.amqp.reconnect_max_delay = Duration::from_secs(2);
        },
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("restart-{i}"))).collect();
    env.publish_requests(&bodies).await;
    let worker = env.start_worker(env.open_store());
    wait_until(Duration::from_secs(60), || {
        env.sim.sim.stats().sessions_created >= n / 3
    })
    .await;
    let t = Instant::now();
    let stop = Command::new("rabbitmqctl").arg("stop_app").output();
    let start = Command::new("rabbitmqctl").arg("start_app").output();
    let restarted =
        stop.is_ok_and(|o| o.status.success()) && start.is_ok_and(|o| o.status.success());
    let _ = Command::new("rabbitmqctl").arg("await_startup").output();
    let note = if restarted {
        format!("broker down {:.1} s", t.elapsed().as_secs_f64())
    } else {
        "rabbitmqctl failed: broker NOT restarted".into()
    };
    wait_until(Duration::from_secs(300), || {
        env.sim.sim.stats().distinct_visitors >= n
    })
    .await;
    worker.stop().await;
    let dead = dlq_len(&env).await;
    row(
        &format!("broker restarted once during {n} requests"),
        n,
        &env,
        dead,
        note,
    )
}

async fn faulty_api_drill(n: u64) -> Row {
    let env = TestEnv::new(
        Faults {
            fail_rate: 0.25,
            throttle_rate: 0.10,
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 32;
            s.worker.max_attempts = 6;
            s.amqp.retry_delays = vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(5),
            ];
        },
    )
    .await;
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("faulty-{i}"))).collect();
    env.publish_requests(&bodies).await;
    let worker = env.start_worker(env.open_store());
    let dead_q = env.settings.amqp.dead_letter_queue.clone();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = env.sim.sim.stats().distinct_visitors + u64::from(env.queue_len(&dead_q).await);
        if done >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
    let s = env.sim.sim.stats();
    let dead = dlq_len(&env).await;
    row(
        &format!("simulator at 25 % 503 + 10 % 429, {n} requests"),
        n,
        &env,
        dead,
        format!(
            "{} × 503, {} × 429 answered",
            s.injected_errors, s.rate_limited
        ),
    )
}

fn malformed(i: usize, rng: &mut impl Rng) -> Vec<u8> {
    let good = request(&format!("m-{i}"));
    match i % 6 {
        0 => (0..rng.random_range(1..200))
            .map(|_| rng.random::<u8>())
            .collect(),
        1 => format!(r#"{{"visitor_id":{},"queue_id":"q"}}"#, rng.random::<u32>()).into_bytes(),
        2 => good[..rng.random_range(1..good.len() - 1)].to_vec(),
        3 => format!(
            r#"{{"visitor_id":"{}","queue_id":"q"}}"#,
            "x".repeat(rng.random_range(300..5000))
        )
        .into_bytes(),
        4 => {
            let mut b = good.clone();
            b.insert(15, 0xC3);
            b.insert(16, 0x28);
            b
        }
        _ => format!(
            r#"{{"visitor_id":"v","queue_id":"q","attributes":{{"blob":"{}"}}}}"#,
            "y".repeat(70_000)
        )
        .into_bytes(),
    }
}

async fn malformed_drill(n: usize) -> Row {
    let env = TestEnv::new(Faults::default(), |s| s.worker.concurrency = 32).await;
    let mut rng = rand::rng();
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| malformed(i, &mut rng)).collect();
    env.publish_requests(&bodies).await;
    let worker = env.start_worker(env.open_store());
    let q = env.settings.amqp.dead_letter_queue.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    while (env.queue_len(&q).await as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.stop().await;
    let (_, messages) = session_worker::dlq::list(&env.conn, &q, &Default::default())
        .await
        .expect("list DLQ");
    let with_reason = messages
        .iter()
        .filter(|m| m.reason.as_deref() == Some("invalid_request") && m.detail.is_some())
        .count();
    let dead = messages.len() as u64;
    let mut r = row(
        &format!("{n} malformed inputs"),
        n as u64,
        &env,
        dead,
        format!("{with_reason} dead-lettered as invalid_request with a detail"),
    );
    r.created = env.sim.sim.stats().sessions_created;
    r
}

async fn webhook_outage_drill(n: u64, outage: Duration) -> Row {
    let down = Arc::new(AtomicBool::new(true));
    let delivered = Arc::new(AtomicU64::new(0));
    let app = {
        let (down, delivered) = (down.clone(), delivered.clone());
        axum::Router::new().route(
            "/hook",
            axum::routing::post(move || {
                let (down, delivered) = (down.clone(), delivered.clone());
                async move {
                    if down.load(Ordering::SeqCst) {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        delivered.fetch_add(1, Ordering::SeqCst);
                        StatusCode::NO_CONTENT
                    }
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind receiver");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let env = TestEnv::new(Faults::default(), |s| {
        s.webhook.url = url.clone();
        s.webhook.max_attempts = 20;
        s.amqp.retry_delays = vec![
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(15),
        ];
    })
    .await;
    let store = env.open_store();
    let worker = env.start_worker(store.clone());
    let forwarder = env.start_forwarder(store);
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("hook-{i}"))).collect();
    env.publish_requests(&bodies).await;
    tokio::time::sleep(outage).await;
    down.store(false, Ordering::SeqCst);
    let back = Instant::now();
    wait_until(Duration::from_secs(120), || {
        delivered.load(Ordering::SeqCst) >= n
    })
    .await;
    let drained = back.elapsed();
    worker.stop().await;
    forwarder.stop().await;
    server.abort();
    let webhook_dead =
        u64::from(queue_len_fresh(&env.settings.amqp.webhook_dead_letter_queue).await);
    let got = delivered.load(Ordering::SeqCst);
    let mut r = row(
        &format!("webhook receiver down {} s, {n} events", outage.as_secs()),
        n,
        &env,
        webhook_dead,
        format!(
            "{got} events delivered; backlog drained {:.1} s after the receiver came back",
            drained.as_secs_f64()
        ),
    );
    r.lost = n as i64 - got as i64 - webhook_dead as i64;
    r
}

/// Keys neither created at the simulator nor dead-lettered: what was lost.
async fn lost_of(env: &TestEnv, visitors: &[String]) -> (u64, i64) {
    let (_, messages) = session_worker::dlq::list(
        &env.conn,
        &env.settings.amqp.dead_letter_queue,
        &Default::default(),
    )
    .await
    .expect("list DLQ");
    let dead: std::collections::HashSet<String> = messages
        .iter()
        .filter_map(|m| m.body.as_deref())
        .filter_map(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .filter_map(|v| v.get("visitor_id")?.as_str().map(str::to_string))
        .collect();
    let lost = visitors
        .iter()
        .filter(|v| env.sim.sim.sessions_for(v) == 0 && !dead.contains(*v))
        .count();
    (messages.len() as u64, lost as i64)
}

/// Requests carrying hostile headers: nested as deep as a frame allows, the worker's own header
/// names with values of the wrong type, a forged delivery count. The worker process must live
/// through all of them.
async fn poison_headers_drill(n: usize) -> Row {
    use lapin::types::{AMQPValue, FieldTable};
    let env = TestEnv::new(Faults::default(), |s| s.worker.concurrency = 16).await;
    let cfg = env.config_file();
    let mut child = common::spawn_worker_binary(cfg.path(), "error");
    let visitors: Vec<String> = (0..n).map(|i| format!("poison-{i}")).collect();
    for (i, v) in visitors.iter().enumerate() {
        let mut h = FieldTable::default();
        let id = format!("poison-id-{i}");
        match i % 4 {
            0 => {
                // As deep as a frame allows, built as bytes (`raw_amqp`).
                env.publish_deep(&request(v), Some(&id), 26_100).await;
                continue;
            }
            1 => {
                h.insert("x-attempts".into(), AMQPValue::LongString("many".into()));
                h.insert("x-delayed-retries".into(), AMQPValue::LongLongInt(i64::MIN));
                h.insert("x-death".into(), AMQPValue::Boolean(true));
            }
            2 => {
                h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(1_000));
            }
            _ => {
                h.insert(
                    "x-failure-reason".into(),
                    AMQPValue::FieldTable(FieldTable::default()),
                );
            }
        }
        env.publish_with(&request(v), Some(&id), h).await;
    }
    let dead_q = env.settings.amqp.dead_letter_queue.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let done = env.sim.sim.stats().distinct_visitors + u64::from(env.queue_len(&dead_q).await);
        if done >= n as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alive = matches!(child.try_wait(), Ok(None));
    let code = common::terminate(&mut child);
    let (dead, lost) = lost_of(&env, &visitors).await;
    let mut r = row(
        &format!("{n} requests with hostile headers (26,100-deep nesting, wrong types, forged delivery count)"),
        n as u64,
        &env,
        dead,
        format!(
            "worker alive throughout: {}; SIGTERM exit {code:?}",
            if alive { "yes" } else { "NO" }
        ),
    );
    r.lost = lost + i64::from(!alive);
    r
}

/// Genesys creates every session but answers after the client's timeout: each is recorded
/// `unknown` and dead-lettered `outcome_unknown`, none re-sent.
async fn slow_api_drill(n: usize) -> Row {
    let env = TestEnv::new(
        Faults {
            answer_late_ms: 1_500,
            ..Default::default()
        },
        |s| {
            s.worker.concurrency = 32;
            s.genesys.request_timeout = Duration::from_secs(1);
        },
    )
    .await;
    let visitors: Vec<String> = (0..n).map(|i| format!("slow-{i}")).collect();
    let bodies: Vec<Vec<u8>> = visitors.iter().map(|v| request(v)).collect();
    env.publish_requests(&bodies).await;
    let worker = env.start_worker(env.open_store());
    let dead_q = env.settings.amqp.dead_letter_queue.clone();
    let deadline = Instant::now() + Duration::from_secs(180);
    while (env.queue_len(&dead_q).await as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Published again: replayed from the `unknown` record, no call.
    env.publish_requests(&bodies).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    worker.stop().await;
    let s = env.sim.sim.stats();
    let (dead, lost) = lost_of(&env, &visitors).await;
    let mut r = row(
        &format!("API creates each session and answers after the 1 s timeout, {n} requests, each published twice"),
        n as u64,
        &env,
        dead,
        format!(
            "{} session requests for {n} keys; all dead-lettered outcome_unknown",
            s.session_requests
        ),
    );
    r.lost = lost;
    r
}

/// The store's volume (a 24 MiB tmpfs) fills while a worker process works, stays full, then
/// space is freed: intake pauses, answered outcomes are held, the worker resumes by itself.
async fn full_store_drill(n: u64, full_for: Duration) -> Option<Row> {
    let mount = tempfile::tempdir().expect("mount point");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m", "tmpfs"])
        .arg(mount.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("full store drill not run: mounting a tmpfs needs root");
        return None;
    }
    let env = TestEnv::new(
        Faults {
            latency_ms: 20,
            ..Default::default()
        },
        |_| {},
    )
    .await;
    let mut pod = common::Pod::with(&env, "full", |s| {
        s.store.path = mount.path().join("store");
        s.worker.concurrency = 16;
    });
    pod.start();
    pod.ready_within(Duration::from_secs(30)).await;
    let visitors: Vec<String> = (0..n).map(|i| format!("full-{i}")).collect();
    let bodies: Vec<Vec<u8>> = visitors.iter().map(|v| request(v)).collect();
    env.publish_requests(&bodies).await;
    wait_until(Duration::from_secs(120), || {
        env.sim.sim.stats().sessions_created >= n / 3
    })
    .await;
    let filler = mount.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("filler");
        let block = vec![0u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&[0u8]).is_ok() {}
    }
    let filled = Instant::now();
    let mut not_ready = false;
    while filled.elapsed() < full_for {
        if let Ok(r) = reqwest::get(format!("http://{}/readyz", pod.http)).await {
            not_ready |= r.status() == StatusCode::SERVICE_UNAVAILABLE;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let created_while_full = env.sim.sim.stats().sessions_created;
    let _ = std::fs::remove_file(&filler);
    let back = pod.ready_within(Duration::from_secs(60)).await;
    wait_until(Duration::from_secs(300), || {
        env.sim.sim.stats().distinct_visitors >= n
    })
    .await;
    let failures = pod.metric("store_failures_total").await.unwrap_or(0.0);
    let code = pod.stop();
    let (dead, lost) = lost_of(&env, &visitors).await;
    let _ = Command::new("umount").arg(mount.path()).status();
    let mut r = row(
        &format!("store volume full for {} s mid-run, {n} requests", full_for.as_secs()),
        n,
        &env,
        dead,
        format!(
            "/readyz not ready while full: {}; store failures {failures}; {created_while_full} created by the end of the full period; ready again {} after space was freed, no restart; SIGTERM exit {code:?}",
            if not_ready { "yes" } else { "NO" },
            back.map_or("never".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
        ),
    );
    r.lost = lost;
    Some(r)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let kill_n = std::env::var("CHAOS_REQUESTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10_000);
        let outage = Duration::from_secs(
            std::env::var("CHAOS_OUTAGE_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(60),
        );
        // CHAOS_ONLY=sigkill,broker,... runs a subset (all by default).
        let only = std::env::var("CHAOS_ONLY").unwrap_or_default();
        let run = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
        let mut rows = Vec::new();
        if run("sigkill") {
            eprintln!("drill: SIGKILL");
            rows.push(sigkill_drill(kill_n, 5, false).await);
            eprintln!("drill: SIGKILL (web_messaging)");
            rows.push(sigkill_drill(kill_n, 5, true).await);
        }
        if run("broker") {
            eprintln!("drill: broker restart");
            rows.push(broker_restart_drill(3000).await);
        }
        if run("faulty") {
            eprintln!("drill: faulty API");
            rows.push(faulty_api_drill(2000).await);
        }
        if run("malformed") {
            eprintln!("drill: malformed inputs");
            rows.push(malformed_drill(1000).await);
        }
        if run("webhook") {
            eprintln!("drill: webhook outage");
            rows.push(webhook_outage_drill(500, outage).await);
        }
        if run("fleet") {
            eprintln!("drill: fleet: SIGKILL and re-publish storm");
            rows.push(fleet_drill(3000, 3, false).await);
            eprintln!("drill: fleet on web_messaging");
            rows.push(fleet_drill(3000, 3, true).await);
        }
        if run("poison") {
            eprintln!("drill: hostile headers");
            rows.push(poison_headers_drill(400).await);
        }
        if run("slow") {
            eprintln!("drill: slow-answering API");
            rows.push(slow_api_drill(300).await);
        }
        if run("full") {
            eprintln!("drill: full store volume");
            if let Some(r) = full_store_drill(1500, Duration::from_secs(10)).await {
                rows.push(r);
            }
        }
        println!();
        println!("| drill | sent | created | duplicated | dead-lettered | lost | notes |");
        println!("|---|---:|---:|---:|---:|---:|---|");
        for r in &rows {
            println!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                r.drill, r.sent, r.created, r.duplicated, r.dead_lettered, r.lost, r.note
            );
        }
        let lost: i64 = rows.iter().map(|r| r.lost.max(0)).sum();
        let web_duplicates: u64 = rows
            .iter()
            .filter(|r| r.drill.ends_with(backend(true)))
            .map(|r| r.duplicated)
            .sum();
        println!();
        println!("lost in total: {lost}");
        println!("duplicated on web_messaging: {web_duplicates}");
        if lost != 0 || web_duplicates != 0 {
            std::process::exit(1);
        }
    });
}
