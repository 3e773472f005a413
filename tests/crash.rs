//! The real binary killed with SIGKILL mid-run and restarted on the same store loses nothing;
//! SIGTERM drains and exits 0.

mod common;

use common::{request, TestEnv};
use session_worker::sim::Faults;
use std::collections::HashSet;
use std::io::Write;
use std::process::Child;
use std::time::Duration;

fn spawn_worker(config: &std::path::Path) -> Child {
    common::spawn_worker_binary(config, "warn")
}

fn terminate(child: &mut Child) -> Option<i32> {
    common::terminate(child)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_nothing_and_sigterm_exits_cleanly() {
    let faults = Faults {
        latency_ms: 15,
        ..Default::default()
    };
    let env = TestEnv::new(faults, |s| s.worker.concurrency = 16).await;
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    file.write_all(env.settings.to_redacted_toml().unwrap().as_bytes())
        .unwrap();

    let n = 400u64;
    for i in 0..n {
        env.publish(&request(&format!("k{i}")), None).await;
    }
    // Kill twice while sessions are being created.
    for round in 1..=2u64 {
        let mut child = spawn_worker(file.path());
        let target = round * n / 4;
        let reached = env
            .wait_for(Duration::from_secs(60), || {
                env.sim.sim.stats().sessions_created >= target
            })
            .await;
        assert!(reached, "worker made progress before kill {round}");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }
    let mut child = spawn_worker(file.path());
    let done = env
        .wait_for(Duration::from_secs(120), || {
            env.sim.sim.stats().distinct_visitors >= n
        })
        .await;
    // Let the last events get published and acked before asking it to stop.
    let drained = {
        let inbound = env.settings.amqp.inbound_queue.clone();
        let mut ok = false;
        for _ in 0..200 {
            if env.queue_len(&inbound).await == 0 {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let code = terminate(&mut child);
    assert!(
        done,
        "every request got a session: {:?}",
        env.sim.sim.stats()
    );
    assert!(drained, "inbound queue drained");
    assert_eq!(code, Some(0), "SIGTERM exits 0");

    let stats = env.sim.sim.stats();
    let events = env.events(usize::MAX, Duration::from_secs(3)).await;
    let visitors: HashSet<_> = events.iter().map(|e| e.visitor_id.clone()).collect();
    assert_eq!(visitors.len() as u64, n, "an event for every request");
    assert_eq!(env.queue_len(&env.settings.amqp.dead_letter_queue).await, 0);
    // A kill between the API call and the sled write can repeat that one call; at most the
    // requests in flight at each kill.
    assert!(
        stats.duplicate_sessions <= 2 * 16,
        "duplicates bounded by in-flight work: {stats:?}"
    );
    eprintln!(
        "crash drill: sent {n}, created {}, duplicated {}, events {}",
        stats.distinct_visitors,
        stats.duplicate_sessions,
        events.len()
    );
}
