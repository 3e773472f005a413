//! `make bench` (fleet part): what sharing one ledger and one rate budget costs and gives.
//!
//! - restore: a pod on an empty store reads N completed keys from the ledger stream; keys
//!   applied per second, and the time from start to `/readyz` 200; with scattered keys (as
//!   real idempotency keys are), and in *restore-ordered* with keys in order (as the runs
//!   before the tenth session measured); *restore-quiet* one record a message, keys in order;
//! - fleet rate: 1, 2 and 3 pods against the simulator's limit, with the deployment's budget
//!   equal to it; achieved ÷ budget and the 429s received.
//!
//! Figures are printed as tables. Nothing here asserts timing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::ledger::fill_ledger;
use common::{env_or, request, Pod, TestEnv};
use session_worker::sim::Faults;
use std::time::{Duration, Instant};

/// How fast a bare consumer reads the whole ledger stream of `n` messages (ack in batches,
/// nothing applied), in messages per second: the ceiling the broker allows for a restore on
/// this machine.
async fn stream_baseline(env: &TestEnv, n: usize) -> f64 {
    use futures_util::StreamExt;
    let conn = common::broker().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = common::ledger::read_from_first(env, &ch, "stream-baseline", 2000).await;
    let started = Instant::now();
    let mut seen = 0usize;
    while seen < n {
        let d = consumer.next().await.expect("open").expect("delivery");
        seen += 1;
        if seen % 500 == 0 || seen == n {
            d.acker
                .ack(lapin::options::BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let _ = conn.close(200, "".into()).await;
    rate
}

/// Keys per second a new pod applies from a ledger of `n` keys written `per_message` records
/// to a message, its time to ready, the keys per second a bare reader gets through, and the
/// pod's peak RSS (MiB).
async fn restore(n: usize, per_message: usize) -> (f64, Duration, f64, f64) {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let filled = Instant::now();
    fill_ledger(&env, n, per_message).await;
    let messages = (2 * n).div_ceil(per_message);
    eprintln!(
        "  ledger filled with {n} keys ({messages} messages) in {:.1} s",
        filled.elapsed().as_secs_f64()
    );
    // The ledger holds two records (claim, outcome) per key.
    let baseline = stream_baseline(&env, messages).await * (per_message as f64 / 2.0);
    let mut pod = Pod::new(&env, "restore");
    pod.start();
    let started = Instant::now();
    // Sample the applied counter to see when the first record is applied.
    let mut samples: Vec<(Instant, f64)> = Vec::new();
    let ready = loop {
        if let Some(v) = pod.metric("ledger_records_applied_total").await {
            samples.push((Instant::now(), v));
        }
        if let Ok(r) = reqwest::get(format!("http://{}/readyz", pod.http)).await {
            if r.status().is_success() {
                break started.elapsed();
            }
        }
        if started.elapsed() > Duration::from_secs(1800) {
            panic!("the pod did not become ready within 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // From the first record applied to ready: every key read and stored (the reader's
    // counter runs ahead of the store while a run of records waits to be stored), the
    // process's start and connection excluded.
    let ready_at = started + ready;
    let first = samples
        .iter()
        .find(|(_, v)| *v > 0.0)
        .map_or(started, |(at, _)| *at);
    let rate = n as f64 / ready_at.duration_since(first).as_secs_f64().max(1e-3);
    let peak_kib = pod
        .child
        .as_ref()
        .and_then(|c| common::peak_rss_kib(c.id()))
        .unwrap_or(0);
    pod.stop();
    (rate, ready, baseline, peak_kib as f64 / 1024.0)
}

/// `pods` pods against the simulator's limit of `budget` a minute (the deployment's budget
/// too), over `window`: requests per second achieved, the budget per second, 429s.
async fn fleet_rate(pods: usize, budget: u32, window: Duration) -> (f64, f64, u64) {
    let faults = Faults {
        rate_limit_per_minute: budget,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.rate_limit.requests_per_minute = budget;
        s.rate_limit.burst = 1;
        s.worker.concurrency = 32;
    })
    .await;
    let per_sec = f64::from(budget) / 60.0;
    let backlog = (per_sec * window.as_secs_f64() * 1.5) as usize + 100;
    let bodies: Vec<Vec<u8>> = (0..backlog)
        .map(|i| request(&format!("rate-{pods}-{i:08}")))
        .collect();
    let mut fleet: Vec<Pod> = (0..pods)
        .map(|i| Pod::new(&env, &format!("r{i}")))
        .collect();
    for p in &mut fleet {
        p.start();
    }
    for p in &fleet {
        p.ready_within(Duration::from_secs(60)).await;
    }
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &bodies)
        .await;
    while env.sim.sim.stats().sessions_created == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start = env.sim.sim.stats().sessions_created;
    tokio::time::sleep(window).await;
    let stats = env.sim.sim.stats();
    for p in &mut fleet {
        p.stop();
    }
    let achieved = (stats.sessions_created - start) as f64 / window.as_secs_f64();
    (achieved, per_sec, stats.rate_limited)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let run = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
        let mut rows = Vec::new();
        // Scattered keys (as real idempotency keys are) first; keys in order as the runs
        // before the tenth session measured, for comparison.
        for (name, scattered) in [("restore", true), ("restore-ordered", false)] {
            if !run(name) {
                continue;
            }
            let n: usize = env_or("BENCH_RESTORE_KEYS", 1_000_000);
            let per: usize = env_or("BENCH_RESTORE_BATCH", 40).max(1);
            let keys = if scattered { "scattered keys" } else { "keys in order" };
            common::ledger::scatter_keys(scattered);
            eprintln!("{name}: {n} keys in the ledger ({keys}), {per} records a message");
            let (rate, ready, baseline, peak_mib) = restore(n, per).await;
            rows.push(format!("| {name}: a new pod applies {n} completed keys (claim + outcome each, {keys}) from a busy fleet's ledger ({per} records a message) | {rate:.0} keys/s | 50000 keys/s | {:.2} | ≥ 1.0 |", rate / 50_000.0));
            rows.push(format!("| the same vs a bare consumer reading that stream (nothing applied) | {rate:.0} keys/s | {baseline:.0} keys/s | {:.2} | — |", rate / baseline));
            rows.push(format!("| {name}: time from start to `/readyz` 200 with {n} keys in the ledger | {:.1} s | — | — | — |", ready.as_secs_f64()));
            rows.push(format!("| {name}: peak RSS of the restoring pod | {peak_mib:.1} MiB | — | — | — |"));
        }
        if run("restore-quiet") {
            common::ledger::scatter_keys(false);
            let n: usize = env_or("BENCH_RESTORE_QUIET_KEYS", 200_000);
            eprintln!("restore: {n} keys in the ledger, one record a message");
            let (rate, ready, baseline, _) = restore(n, 1).await;
            rows.push(format!("| restore from a quiet fleet's ledger (one record a message), {n} keys | {rate:.0} keys/s | {baseline:.0} keys/s (bare consumer) | {:.2} | — |", rate / baseline));
            rows.push(format!("| the same: time from start to `/readyz` 200 | {:.1} s | — | — | — |", ready.as_secs_f64()));
        }
        if run("fleet-rate") {
            let window = Duration::from_secs(env_or("BENCH_FLEET_WINDOW_SECS", 55));
            let budget: u32 = env_or("BENCH_FLEET_BUDGET", 600);
            let counts: Vec<usize> = std::env::var("BENCH_FLEET_PODS")
                .unwrap_or_else(|_| "1,2,3".into())
                .split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect();
            for pods in counts {
                eprintln!("fleet rate: {pods} pod(s), budget {budget}/min, {} s", window.as_secs());
                let (achieved, per_sec, r429) = fleet_rate(pods, budget, window).await;
                let goal = if pods == 1 { "≥ 0.98, 0 × 429" } else { "≥ 0.95, 0 × 429" };
                rows.push(format!("| fleet rate: {pods} pod(s), budget {budget}/min = simulator limit, {} s | {achieved:.2} req/s, {r429} × 429 | {per_sec:.2} req/s | {:.3} | {goal} |", window.as_secs(), achieved / per_sec));
            }
        }
        common::print_scenarios(&rows);
    });
}
