//! `make bench` (backends part): the Web Messaging guest backend against the `conversations`
//! backend, in the same run, on the same machine.
//!
//! For each simulator latency (0 ms, then `BENCH_BACKEND_LATENCY_MS`, 200 by default), rounds
//! alternate the two backends, each on fresh queues, a fresh store and a fresh simulator: N
//! requests through `session-worker run` (the release binary, its own process), counted from
//! the worker's start to the last result event. Printed: sessions per second per backend (median
//! of the rounds), the ratio web_messaging ÷ conversations (goal ≥ 0.8), the CPU per
//! request (worker, simulator, broker), and the duplicates the simulator saw (0 with either backend here: no faults).
//!
//! Nothing here asserts timing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::cpu::{per_msg_us, CpuMeter, CpuSpent};
use common::{bodies, env_or, median, web_messaging_on, TestEnv};
use session_worker::config::Settings;
use session_worker::sim::Faults;
use std::time::{Duration, Instant};

struct Run {
    rate: f64,
    cpu: CpuSpent,
    duplicates: u64,
}

/// `n` requests through the release worker on `backend`'s settings.
async fn one_run(n: usize, latency_ms: u64, concurrency: usize, web: bool) -> Run {
    let faults = Faults {
        latency_ms,
        ..Default::default()
    };
    let tweak = |s: &mut Settings| {
        if web {
            web_messaging_on(s);
        }
        s.worker.concurrency = concurrency;
        s.amqp.prefetch = (concurrency * 2) as u16;
        s.rate_limit.requests_per_minute = 100_000_000;
        s.rate_limit.burst = 100_000;
    };
    let env = TestEnv::new(faults, tweak).await;
    let prefix = if web { "wm" } else { "cv" };
    let all = bodies(&format!("{prefix}-{latency_ms}-"), n);
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &all)
        .await;
    let file = env.config_file();
    let started = Instant::now();
    let meter = CpuMeter::start();
    let mut child = common::spawn_worker_binary(file.path(), "warn");
    loop {
        let done = env.queue_len(&a.webhook_queue).await as usize;
        if done >= n {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!("the run did not finish in 10 minutes ({done} of {n})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let cpu = meter.stop(Some(child.id()));
    common::terminate(&mut child);
    let stats = env.sim.sim.stats();
    Run {
        rate,
        cpu,
        duplicates: stats.duplicate_sessions + stats.web_messaging.repeated_conversations,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let rounds = env_or("BENCH_ROUNDS", 3usize).max(1);
        let concurrency = env_or("BENCH_CONCURRENCY", 64usize);
        let profile = if cfg!(debug_assertions) {
            "debug build: figures not representative"
        } else {
            "release build"
        };
        let slow = env_or("BENCH_BACKEND_LATENCY_MS", 200u64);
        let mut rows = Vec::new();
        let mut notes = Vec::new();
        for (latency, n) in [
            (0u64, env_or("BENCH_BACKEND_REQUESTS", 5_000usize)),
            (slow, concurrency * 25),
        ] {
            eprintln!("backends: {n} requests at {latency} ms, concurrency {concurrency}, {rounds} rounds ({profile})");
            let (mut conv, mut web, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for round in 1..=rounds {
                let c = one_run(n, latency, concurrency, false).await;
                let w = one_run(n, latency, concurrency, true).await;
                eprintln!(
                    "  round {round}: conversations {:.0}/s, web_messaging {:.0}/s ({:.2})",
                    c.rate,
                    w.rate,
                    w.rate / c.rate
                );
                notes.push(format!(
                    "| {latency} ms | {round} | {:.0}/s | {:.0}/s | {:.2} | {} / {} / {} | {} / {} / {} | {} | {} |",
                    c.rate,
                    w.rate,
                    w.rate / c.rate,
                    per_msg_us(c.cpu.worker, n),
                    per_msg_us(c.cpu.here, n),
                    per_msg_us(c.cpu.broker, n),
                    per_msg_us(w.cpu.worker, n),
                    per_msg_us(w.cpu.here, n),
                    per_msg_us(w.cpu.broker, n),
                    c.duplicates,
                    w.duplicates
                ));
                conv.push(c.rate);
                web.push(w.rate);
                ratios.push(w.rate / c.rate);
            }
            let (c, w, r) = (median(&mut conv), median(&mut web), median(&mut ratios));
            rows.push(format!("| web_messaging end to end, simulator at {latency} ms, {n} requests (median of {rounds}) | {w:.0} sessions/s | {c:.0} sessions/s (conversations, same run) | {r:.2} | ≥ 0.8 |"));
        }
        common::print_scenarios(&rows);
        println!("Per round (CPU per request: worker / simulator (this process) / broker; duplicates seen by the simulator):");
        println!();
        println!("| latency | round | conversations | web_messaging | ratio | CPU, conversations (worker / sim / broker) | CPU, web_messaging (worker / sim / broker) | dup., conversations | dup., web_messaging |");
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for n in &notes {
            println!("{n}");
        }
    });
}
