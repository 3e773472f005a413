//! `make bench`: throughput of the worker against a baseline measured in the same run.
//!
//! - broker baseline: a bare lapin consumer that only acks, same broker, same message size;
//! - end to end: N requests through `session-worker run` (the release binary, its own process)
//!   against the simulator (in this process; no latency, no limit).
//!
//! Figures are printed as a table with the ratio to the baseline. Nothing here asserts timing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::cpu::{per_msg_us, CpuMeter, CpuSpent};
use common::{env_or, median, request, TestEnv};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use session_worker::sim::Faults;
use std::time::{Duration, Instant};

/// The keys the Web Messaging backend added: a build from before it refuses them.
const WEB_MESSAGING_KEYS: &[&str] = &[
    "genesys.deployment_id",
    "genesys.web_messaging_origin",
    "genesys.web_messaging_url",
    "genesys.web_messaging_start",
    "genesys.web_messaging_text",
    "genesys.max_custom_data_bytes",
    "genesys.session_token_secret",
];

/// A bare consumer that acks every message: the ceiling the broker allows on this machine.
async fn broker_baseline(env: &TestEnv, bodies: &[Vec<u8>], prefetch: u16) -> (f64, CpuSpent) {
    let queue = format!("{}.baseline", env.prefix);
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    env.ch
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare baseline queue");
    env.publish_many("", &queue, bodies).await;
    let ch = env.conn.create_channel().await.expect("channel");
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let cpu = CpuMeter::start();
    let started = Instant::now();
    let mut n = 0;
    while n < bodies.len() {
        let d = consumer
            .next()
            .await
            .expect("stream open")
            .expect("delivery");
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        n += 1;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let cpu = cpu.stop(None);
    let _ = ch.close(200, "".into()).await;
    let _ = env
        .ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    (rate, cpu)
}

thread_local! {
    /// The steady-state rate of the last end-to-end run (first event to last).
    static STEADY: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
    /// Seconds from the last end-to-end run's start to its first result event (start-up).
    static FIRST_EVENT: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
}

/// `bodies` through the worker; the rate counts from the worker's start (connecting and
/// declaring included) to the last result event.
async fn end_to_end(env: &TestEnv, bodies: &[Vec<u8>], binary: bool) -> (f64, u64, CpuSpent) {
    end_to_end_with(
        env,
        bodies,
        binary.then_some(env!("CARGO_BIN_EXE_session-worker")),
    )
    .await
}

/// The same with a given binary (`None`: the worker in this process).
async fn end_to_end_with(
    env: &TestEnv,
    bodies: &[Vec<u8>],
    binary: Option<&str>,
) -> (f64, u64, CpuSpent) {
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, bodies)
        .await;
    // The build before the fleet work does not know the keys added since; another build of
    // this code (an A/B with `BENCH_BEFORE_CURRENT=1`) takes them all.
    let current = std::env::var("BENCH_BEFORE_CURRENT").is_ok_and(|v| v == "1");
    let file = match binary {
        Some(bin) if bin != env!("CARGO_BIN_EXE_session-worker") && !current => env
            .config_file_without(
                &[
                    &[
                        "amqp.ledger_stream",
                        "amqp.fleet_exchange",
                        "worker.claim_lease",
                        "worker.max_redeliveries",
                        "genesys.retry_unknown_outcome",
                    ][..],
                    WEB_MESSAGING_KEYS,
                    &["console"][..],
                ]
                .concat(),
            ),
        _ => env.config_file(),
    };
    let cpu = CpuMeter::start();
    let started = Instant::now();
    let (worker, mut child) = if let Some(bin) = binary {
        (
            None,
            Some(common::spawn_binary(
                bin,
                file.path(),
                &std::env::var("BENCH_WORKER_LOG").unwrap_or("warn".into()),
            )),
        )
    } else {
        (Some(env.start_worker(env.open_store())), None)
    };
    // Steady state: from the first result event to the last, start-up left out.
    let mut first_event: Option<(Instant, usize)> = None;
    loop {
        let done = env.queue_len(&a.webhook_queue).await as usize;
        if done > 0 && first_event.is_none() {
            first_event = Some((Instant::now(), done));
        }
        if done >= bodies.len() {
            break;
        }
        if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("the worker binary exited early ({status}) with {done} of {} done; its stderr is above", bodies.len());
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!(
                "end-to-end run did not finish in 10 minutes ({done} of {})",
                bodies.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = bodies.len() as f64 / started.elapsed().as_secs_f64();
    let steady = first_event
        .map(|(at, n)| (bodies.len() - n) as f64 / at.elapsed().as_secs_f64().max(1e-3))
        .unwrap_or(rate);
    STEADY.with(|s| s.set(steady));
    let first = first_event.map(|(at, _)| at.duration_since(started).as_secs_f64());
    FIRST_EVENT.with(|s| s.set(first.unwrap_or(0.0)));
    let cpu = cpu.stop(child.as_ref().map(|c| c.id()));
    if child.is_some() && binary == Some(env!("CARGO_BIN_EXE_session-worker")) {
        ledger_figures(&env.settings.http.listen).await;
    }
    if let Some(child) = child.as_mut() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let _ = child.wait();
    }
    if let Some(worker) = worker {
        worker.stop().await;
    }
    (rate, env.sim.sim.stats().duplicate_sessions, cpu)
}

/// Print what the worker's metrics say of its ledger: records per ledger message, and how
/// long a claim took to be decided and an append to be confirmed (means over the run).
async fn ledger_figures(listen: &str) {
    let Ok(resp) = reqwest::get(format!("http://{listen}/metrics")).await else {
        return;
    };
    let Ok(text) = resp.text().await else { return };
    let value = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| {
                l.split_whitespace()
                    .next()
                    .is_some_and(|n| n.ends_with(name))
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let mean = |name: &str| -> Option<f64> {
        let count = value(&format!("{name}_count"))?;
        (count > 0.0).then(|| value(&format!("{name}_sum")).unwrap_or(0.0) / count)
    };
    let (Some(per_msg), Some(msgs)) = (
        mean("ledger_batch_records"),
        value("ledger_batch_records_count"),
    ) else {
        return;
    };
    eprintln!(
        "    ledger: {msgs:.0} messages, {per_msg:.1} records each; claim decided in {:.2} ms, append confirmed in {:.2} ms (means)",
        mean("ledger_claim_seconds").unwrap_or(0.0) * 1e3,
        mean("ledger_append_seconds").unwrap_or(0.0) * 1e3,
    );
}

/// Latency-bound: the simulator answers after `latency`; ideal throughput = concurrency / latency.
async fn latency_bound(n: usize, concurrency: usize, latency: Duration) -> (f64, f64) {
    let faults = Faults {
        latency_ms: latency.as_millis() as u64,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.concurrency = concurrency;
        s.amqp.prefetch = (concurrency * 2) as u16;
        s.rate_limit.requests_per_minute = 100_000_000;
        s.rate_limit.burst = 100_000;
    })
    .await;
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("lat-{i:08}"))).collect();
    let (rate, _, _) = end_to_end(&env, &bodies, false).await;
    // Where the time beyond the simulator's latency goes (the worker ran in this process).
    let text = session_worker::metrics::metrics().encode();
    let mean = |name: &str| {
        let get = |suffix: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}_{suffix} ")))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        };
        match (get("sum"), get("count")) {
            (Some(s), Some(c)) if c > 0.0 => format!("{:.1} ms", s / c * 1000.0),
            _ => "n/a".into(),
        }
    };
    eprintln!(
        "  latency-bound: mean ledger claim {}, ledger append {}, Genesys call {}",
        mean("ledger_claim_seconds"),
        mean("ledger_append_seconds"),
        mean("genesys_request_duration_seconds")
    );
    (rate, concurrency as f64 / latency.as_secs_f64())
}

/// Limiter precision: worker and simulator both at `per_minute`; a backlog larger than the
/// window; sessions created over `window`, and 429s received.
async fn limiter_precision(per_minute: u32, window: Duration) -> (f64, f64, u64) {
    let faults = Faults {
        rate_limit_per_minute: per_minute,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| {
        s.worker.concurrency = 32;
        s.rate_limit.requests_per_minute = per_minute;
        s.rate_limit.burst = 1;
    })
    .await;
    let configured = f64::from(per_minute) / 60.0;
    let backlog = (configured * window.as_secs_f64() * 1.5) as usize;
    let bodies: Vec<Vec<u8>> = (0..backlog)
        .map(|i| request(&format!("lim-{i:08}")))
        .collect();
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &bodies)
        .await;
    let worker = env.start_worker(env.open_store());
    // Measure from the first session on, so connection set-up is not counted.
    while env.sim.sim.stats().sessions_created == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let start_count = env.sim.sim.stats().sessions_created;
    tokio::time::sleep(window).await;
    let stats = env.sim.sim.stats();
    worker.stop().await;
    let achieved = (stats.sessions_created - start_count) as f64 / window.as_secs_f64();
    (achieved, configured, stats.rate_limited)
}

/// Peak RSS (VmHWM) of the worker binary draining a backlog of `n` messages.
async fn peak_rss(n: usize) -> (u64, Duration) {
    let env = TestEnv::new(Faults::default(), |s| {
        s.worker.concurrency = 64;
        s.amqp.prefetch = 128;
        s.rate_limit.requests_per_minute = 100_000_000;
        s.rate_limit.burst = 100_000;
    })
    .await;
    let a = env.settings.amqp.clone();
    let chunk: Vec<Vec<u8>> = (0..10_000)
        .map(|i| request(&format!("rss-{i:08}")))
        .collect();
    let mut sent = 0;
    while sent < n {
        let take = chunk.len().min(n - sent);
        let bodies: Vec<Vec<u8>> = chunk[..take]
            .iter()
            .enumerate()
            .map(|(i, _)| request(&format!("rss-{:08}", sent + i)))
            .collect();
        env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &bodies)
            .await;
        sent += take;
    }
    // `BENCH_RSS_BIN`: another build to measure, A/B (its config without this build's new keys).
    let other = std::env::var("BENCH_RSS_BIN").ok();
    let file = match &other {
        Some(_) => env.config_file_without(WEB_MESSAGING_KEYS),
        None => env.config_file(),
    };
    let started = Instant::now();
    let mut child = match &other {
        Some(bin) => common::spawn_binary(bin, file.path(), "warn"),
        None => common::spawn_worker_binary(file.path(), "warn"),
    };
    let mut peak_kib = 0u64;
    loop {
        if let Some(v) = common::peak_rss_kib(child.id()) {
            peak_kib = peak_kib.max(v);
        }
        if env.queue_len(&a.webhook_queue).await as usize >= n
            || started.elapsed() > Duration::from_secs(600)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    (peak_kib, elapsed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let run = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
        let n = env_or::<usize>("BENCH_REQUESTS", 20_000);
        let concurrency = env_or::<usize>("BENCH_CONCURRENCY", 64);
        let rss_backlog = env_or::<usize>("BENCH_RSS_BACKLOG", 100_000);
        let rounds = env_or::<usize>("BENCH_ROUNDS", 5).max(1);
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("bench-{i:08}"))).collect();
        let size = bodies[0].len();
        let profile = if cfg!(debug_assertions) { "debug build: figures not representative" } else { "release build" };
        eprintln!("measuring: {n} messages of {size} bytes, worker concurrency {concurrency} ({profile})");
        let mut rows: Vec<String> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        if run("e2e") {
            // Baseline and end to end alternate, each round on fresh queues, a fresh store and
            // a fresh simulator; the medians are reported (single runs on 2 shared cores vary
            // by ±15 %).
            let (mut baselines, mut e2es, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            let mut dups = 0;
            let mut cpu_rows = Vec::new();
            // The build before the fleet ledger, if `make bench` built it: same rounds, same run.
            let before_bin = std::env::var("BENCH_BEFORE_BIN").ok().filter(|p| std::path::Path::new(p).exists());
            let mut befores = Vec::new();
            let mut before_rows = Vec::new();
            let (mut steady_now, mut steady_before) = (Vec::new(), Vec::new());
            for round in 1..=rounds {
                let env = TestEnv::new(Faults::default(), |s| {
                    s.worker.concurrency = concurrency;
                    s.amqp.prefetch = (concurrency * 2) as u16;
                    s.rate_limit.requests_per_minute = 100_000_000;
                    s.rate_limit.burst = 100_000;
                    // A known port, to read the worker's ledger metrics at the end.
                    s.http.listen = format!("127.0.0.1:{}", common::free_port());
                })
                .await;
                let (baseline, base_cpu) =
                    broker_baseline(&env, &bodies, (concurrency * 2) as u16).await;
                let (e2e, d, e2e_cpu) = end_to_end(&env, &bodies, true).await;
                steady_now.push(STEADY.with(|s| s.get()));
                let first_now = FIRST_EVENT.with(|s| s.get()) * 1e3;
                dups += d;
                drop(env);
                if let Some(bin) = &before_bin {
                    let before_env = TestEnv::new(Faults::default(), |s| {
                        s.worker.concurrency = concurrency;
                        s.amqp.prefetch = (concurrency * 2) as u16;
                        s.rate_limit.requests_per_minute = 100_000_000;
                        s.rate_limit.burst = 100_000;
                    })
                    .await;
                    // That build declares the dead-letter queues as quorum queues (now they
                    // are classic): let it declare them its way.
                    for q in [&before_env.settings.amqp.dead_letter_queue, &before_env.settings.amqp.webhook_dead_letter_queue] {
                        let _ = before_env.ch.queue_delete(q.as_str().into(), Default::default()).await;
                    }
                    let (before, _, before_cpu) = end_to_end_with(&before_env, &bodies, Some(bin)).await;
                    steady_before.push(STEADY.with(|s| s.get()));
                    let first_before = FIRST_EVENT.with(|s| s.get()) * 1e3;
                    eprintln!("  round {round}: before the ledger {before:.0} msg/s (first result event after {first_before:.0} ms)");
                    befores.push(before);
                    before_rows.push(format!(
                        "| {round} | {before:.0} msg/s | {:.0} msg/s | {first_before:.0} ms | {} | {} | {} |",
                        steady_before.last().copied().unwrap_or(0.0),
                        per_msg_us(before_cpu.broker, n),
                        per_msg_us(before_cpu.worker, n),
                        per_msg_us(before_cpu.here, n),
                    ));
                }
                eprintln!("  round {round}: baseline {baseline:.0} msg/s, end to end {e2e:.0} msg/s ({:.2}; first result event after {first_now:.0} ms)", e2e / baseline);
                cpu_rows.push(format!(
                    "| {round} | {baseline:.0} msg/s | {e2e:.0} msg/s | {:.0} msg/s | {first_now:.0} ms | {:.2} | {} | {} | {} | {} | {} |",
                    steady_now.last().copied().unwrap_or(0.0),
                    e2e / baseline,
                    per_msg_us(base_cpu.broker, n),
                    per_msg_us(e2e_cpu.broker, n),
                    per_msg_us(base_cpu.here, n),
                    per_msg_us(e2e_cpu.worker, n),
                    per_msg_us(e2e_cpu.here, n),
                ));
                baselines.push(baseline);
                e2es.push(e2e);
                ratios.push(e2e / baseline);
            }
            let (baseline, e2e, ratio) = (median(&mut baselines), median(&mut e2es), median(&mut ratios));
            rows.push(format!("| broker baseline: bare consumer, ack only, {n} msgs (median of {rounds}) | {baseline:.0} msg/s | — | 1.00 | — |"));
            rows.push(format!("| end to end: {n} requests, no latency, no limit (median of {rounds}) | {e2e:.0} msg/s | {baseline:.0} msg/s (baseline) | {ratio:.2} | ≥ 0.5 |"));
            if !befores.is_empty() {
                let before = median(&mut befores);
                rows.push(format!("| end to end with the fleet ledger vs the build before it, from start ({} rounds, same run) | {e2e:.0} msg/s | {before:.0} msg/s (before) | {:.2} | ≥ 0.85 |", befores.len(), e2e / before));
                let (now, then) = (median(&mut steady_now), median(&mut steady_before));
                rows.push(format!("| the same, steady state (first result event to last) | {now:.0} msg/s | {then:.0} msg/s (before) | {:.2} | ≥ 0.85 |", now / then));
            }
            notes.push(format!("duplicate sessions (end to end, all rounds): {dups}"));
            notes.push(String::new());
            notes.push("Per round, CPU time per message: broker = RabbitMQ (beam.smp); consumer = the bare consumer; worker = the `session-worker run` process; simulator = this process (the simulator, and the queue-length polling):".into());
            notes.push(String::new());
            notes.push("| round | baseline | end to end, from start | end to end, steady | first result event | ratio (from start) | broker, baseline | broker, end to end | consumer, baseline | worker, end to end | simulator, end to end |".into());
            notes.push("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|".into());
            notes.extend(cpu_rows);
            if !before_rows.is_empty() {
                notes.push(String::new());
                notes.push("The build before the ledger, same rounds:".into());
                notes.push(String::new());
                notes.push("| round | from start | steady | first result event | broker | worker | simulator |".into());
                notes.push("|---:|---:|---:|---:|---:|---:|---:|".into());
                notes.extend(before_rows);
            }
            eprintln!("  end to end done");
        }
        if run("latency") {
            let latency = Duration::from_millis(env_or::<usize>("BENCH_LATENCY_MS", 200) as u64);
            let (lat_rate, lat_ideal) = latency_bound(concurrency * 25, concurrency, latency).await;
            let lat_steady = STEADY.with(|s| s.get());
            rows.push(format!("| latency-bound: simulator at 200 ms, concurrency {concurrency}, from start | {lat_rate:.1} msg/s | {lat_ideal:.1} msg/s (concurrency / latency) | {:.2} | ≥ 0.9 |", lat_rate / lat_ideal));
            rows.push(format!("| latency-bound, steady state (first result event to last) | {lat_steady:.1} msg/s | {lat_ideal:.1} msg/s | {:.2} | ≥ 0.9 |", lat_steady / lat_ideal));
            eprintln!("  latency-bound done");
        }
        if run("limiter") {
            let (lim_rate, lim_cfg, lim_429) = limiter_precision(600, Duration::from_secs(20)).await;
            rows.push(format!("| limiter precision: 600/min in worker and simulator, 20 s | {lim_rate:.2} req/s, {lim_429} × 429 | {lim_cfg:.2} req/s | {:.3} | ≥ 0.98, 0 × 429 |", lim_rate / lim_cfg));
            eprintln!("  limiter done");
        }
        if run("rss") {
            let (rss_kib, rss_time) = peak_rss(rss_backlog).await;
            let mib = rss_kib as f64 / 1024.0;
            rows.push(format!("| peak RSS of the worker draining {rss_backlog} messages | {mib:.1} MiB | 64 MiB | {:.2} | ≤ 1.0 |", mib / 64.0));
            notes.push(format!("backlog of {rss_backlog} drained in {:.1} s", rss_time.as_secs_f64()));
            eprintln!("  peak RSS done");
        }
        common::print_scenarios(&rows);
        for n in &notes {
            println!("{n}");
        }
    });
}
