//! `make bench`: throughput of the worker against a baseline measured in the same run.
//!
//! - broker baseline: a bare lapin consumer that only acks, same broker, same message size;
//! - end to end: N requests through the worker against the simulator (no latency, no limit).
//!
//! Figures are printed as a table with the ratio to the baseline. Nothing here asserts timing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::{request, TestEnv};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use session_worker::sim::Faults;
use std::time::{Duration, Instant};

fn count_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn publish_many(env: &TestEnv, exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) {
    let mut pending = Vec::with_capacity(256);
    for body in bodies {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        let c = env
            .ch
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                Default::default(),
                body,
                props,
            )
            .await
            .expect("publish");
        pending.push(c);
        if pending.len() == 256 {
            for c in pending.drain(..) {
                c.await.expect("confirm");
            }
        }
    }
    for c in pending.drain(..) {
        c.await.expect("confirm");
    }
}

/// A bare consumer that acks every message: the ceiling the broker allows on this machine.
async fn broker_baseline(env: &TestEnv, bodies: &[Vec<u8>], prefetch: u16) -> f64 {
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
    publish_many(env, "", &queue, bodies).await;
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
    let _ = ch.close(200, "".into()).await;
    let _ = env
        .ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    rate
}

async fn end_to_end(env: &TestEnv, bodies: &[Vec<u8>]) -> (f64, u64) {
    let store = env.open_store();
    let a = env.settings.amqp.clone();
    publish_many(env, &a.inbound_exchange, &a.inbound_routing_key, bodies).await;
    let started = Instant::now();
    let worker = env.start_worker(store);
    loop {
        let done = env.queue_len(&a.webhook_queue).await as usize;
        if done >= bodies.len() {
            break;
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
    worker.stop().await;
    (rate, env.sim.sim.stats().duplicate_sessions)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let n = count_from_env("BENCH_REQUESTS", 5000);
        let concurrency = count_from_env("BENCH_CONCURRENCY", 64);
        let env = TestEnv::new(Faults::default(), |s| {
            s.worker.concurrency = concurrency;
            s.amqp.prefetch = (concurrency * 2) as u16;
            s.rate_limit.requests_per_minute = 100_000_000;
            s.rate_limit.burst = 100_000;
        })
        .await;
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| request(&format!("bench-{i:08}"))).collect();
        let size = bodies[0].len();
        let profile = if cfg!(debug_assertions) {
            "debug build: figures not representative"
        } else {
            "release build"
        };
        eprintln!(
            "measuring: {n} messages of {size} bytes, worker concurrency {concurrency} ({profile})"
        );
        let baseline = broker_baseline(&env, &bodies, (concurrency * 2) as u16).await;
        let (e2e, dups) = end_to_end(&env, &bodies).await;
        println!();
        println!("| scenario | messages | msg/s | ratio to baseline |");
        println!("|---|---:|---:|---:|");
        println!("| broker baseline (bare consumer, ack only) | {n} | {baseline:.0} | 1.00 |");
        println!(
            "| end to end (worker + simulator, no latency, no limit) | {n} | {e2e:.0} | {:.2} |",
            e2e / baseline
        );
        println!();
        println!("duplicate sessions: {dups}");
    });
}
