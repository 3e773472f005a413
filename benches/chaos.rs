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

async fn sigkill_drill(n: u64, kills: u64) -> Row {
    let env = TestEnv::new(
        Faults {
            latency_ms: 2,
            ..Default::default()
        },
        |s| s.worker.concurrency = 32,
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
        &format!("worker SIGKILLed {kills}× during {n} requests"),
        n,
        &env,
        dead,
        String::new(),
    )
}

/// Three pods on one queue; one of them SIGKILLed and restarted `kills` times while every
/// request is re-published (a storm of copies). Lost must be 0; duplicates at most the killed
/// pod's in-flight count per kill.
async fn fleet_drill(n: u64, kills: u64) -> Row {
    let env = TestEnv::new(
        Faults {
            latency_ms: 2,
            ..Default::default()
        },
        |s| s.worker.concurrency = 16,
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
            "3 pods, one SIGKILLed {kills}×, every request re-published after each kill ({n} keys)"
        ),
        n,
        &env,
        dead,
        format!("in-flight bound: {} per kill", 16),
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
        let mut rows = Vec::new();
        eprintln!("drill 1/6: SIGKILL");
        rows.push(sigkill_drill(kill_n, 5).await);
        eprintln!("drill 2/6: broker restart");
        rows.push(broker_restart_drill(3000).await);
        eprintln!("drill 3/6: faulty API");
        rows.push(faulty_api_drill(2000).await);
        eprintln!("drill 4/6: malformed inputs");
        rows.push(malformed_drill(1000).await);
        eprintln!("drill 5/6: webhook outage");
        rows.push(webhook_outage_drill(500, outage).await);
        eprintln!("drill 6/6: fleet: SIGKILL and re-publish storm");
        rows.push(fleet_drill(3000, 3).await);
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
        println!();
        println!("lost in total: {lost}");
        if lost != 0 {
            std::process::exit(1);
        }
    });
}
