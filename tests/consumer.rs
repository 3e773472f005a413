//! The shared consume loop against the real broker: batched acks settle exactly what finished,
//! requeues come back, and a handler that panics has its delivery requeued, not stranded.

mod common;

use common::TestEnv;
use session_worker::amqp::consumer::{self, ConsumeEnd, ConsumeOptions, Settle};
use session_worker::shutdown::Shutdown;
use session_worker::sim::Faults;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// Deliveries seen per body, shared with the handler.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

async fn run_consumer(
    env: &TestEnv,
    prefetch: u16,
    concurrency: usize,
    seen: Seen,
    verdict: fn(&str, usize) -> Settle,
    until: impl Fn(&HashMap<String, usize>) -> bool + Send + 'static,
) -> ConsumeEnd {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stop_rx = Shutdown::from(stop_rx);
    let watcher_seen = seen.clone();
    let watcher = tokio::spawn(async move {
        for _ in 0..600 {
            if until(&watcher_seen.lock().unwrap()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = stop_tx.send(true);
    });
    let opts = ConsumeOptions {
        queue: &env.settings.amqp.inbound_queue,
        consumer_tag: format!("{}-consumer-test", env.prefix),
        prefetch,
        concurrency,
        grace: Duration::from_secs(5),
        arguments: Default::default(),
    };
    let end = consumer::consume(&env.conn, opts, &mut stop_rx, None, move |delivery| {
        let seen = seen.clone();
        async move {
            let body = String::from_utf8_lossy(&delivery.data).to_string();
            let n = {
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(body.clone()).or_default();
                *n += 1;
                *n
            };
            // Finish out of order, so acks wait behind slower deliveries.
            let jitter = body.bytes().map(u64::from).sum::<u64>() % 7;
            tokio::time::sleep(Duration::from_millis(jitter)).await;
            verdict(&body, n)
        }
    })
    .await
    .expect("consume");
    watcher.await.unwrap();
    end
}

fn bodies(n: usize) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("m-{i:04}").into_bytes()).collect()
}

#[tokio::test]
async fn batched_acks_settle_every_finished_delivery_and_requeues_come_back() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &bodies(200))
        .await;
    let seen: Seen = Arc::default();
    // Every tenth message is requeued on its first delivery.
    fn verdict(body: &str, n: usize) -> Settle {
        if body.ends_with('0') && n == 1 {
            Settle::Requeue
        } else {
            Settle::Ack
        }
    }
    let end = run_consumer(&env, 32, 8, seen.clone(), verdict, |seen| {
        seen.len() == 200
            && seen
                .iter()
                .all(|(b, n)| *n == if b.ends_with('0') { 2 } else { 1 })
    })
    .await;
    assert!(matches!(end, ConsumeEnd::Shutdown), "{end:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 200);
    for (body, n) in &seen {
        let expected = if body.ends_with('0') { 2 } else { 1 };
        assert_eq!(*n, expected, "{body} delivered {n} times");
    }
    // The channel is closed: anything left unacked would be back in the queue now.
    assert_eq!(env.queue_len(&a.inbound_queue).await, 0);
}

#[tokio::test]
async fn a_panicking_handler_gets_its_delivery_requeued() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &bodies(20))
        .await;
    let seen: Seen = Arc::default();
    fn verdict(body: &str, n: usize) -> Settle {
        if body == "m-0007" && n == 1 {
            panic!("handler bug on the first delivery of {body}");
        }
        Settle::Ack
    }
    let end = run_consumer(&env, 8, 4, seen.clone(), verdict, |seen| {
        seen.len() == 20 && seen.get("m-0007") == Some(&2)
    })
    .await;
    assert!(matches!(end, ConsumeEnd::Shutdown), "{end:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.get("m-0007"),
        Some(&2),
        "the panicked delivery came back"
    );
    assert!(seen.iter().all(|(b, n)| b == "m-0007" || *n == 1));
    assert_eq!(env.queue_len(&a.inbound_queue).await, 0);
}

#[tokio::test]
async fn deliveries_behind_a_slow_one_are_acked_without_waiting_for_it() {
    // One delivery takes 4 s; with prefetch 8 the rest (40) only get through if the finished
    // ones behind it are acked singly instead of waiting for the multiple-ack.
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let a = env.settings.amqp.clone();
    env.publish_many(&a.inbound_exchange, &a.inbound_routing_key, &bodies(41))
        .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut stop_rx = Shutdown::from(stop_rx);
    let done = Arc::new(Mutex::new(Vec::<String>::new()));
    let d = done.clone();
    let opts = ConsumeOptions {
        queue: &a.inbound_queue,
        consumer_tag: format!("{}-slow-test", env.prefix),
        prefetch: 8,
        concurrency: 4,
        grace: Duration::from_secs(10),
        arguments: Default::default(),
    };
    let consume = consumer::consume(&env.conn, opts, &mut stop_rx, None, move |delivery| {
        let d = d.clone();
        async move {
            let body = String::from_utf8_lossy(&delivery.data).to_string();
            if body == "m-0000" {
                tokio::time::sleep(Duration::from_secs(4)).await;
            }
            d.lock().unwrap().push(body);
            Settle::Ack
        }
    });
    let watch_done = done.clone();
    let observer = async move {
        // All 40 fast ones finish while the slow one still sleeps.
        for _ in 0..50 {
            if watch_done.lock().unwrap().len() >= 40 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fast_done = watch_done.lock().unwrap().len();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let _ = stop_tx.send(true);
        fast_done
    };
    let (end, fast_done) = tokio::join!(consume, observer);
    assert!(matches!(end.expect("consume"), ConsumeEnd::Shutdown));
    assert!(
        fast_done >= 40,
        "only {fast_done} of 40 fast deliveries finished while a slow one held the first tag"
    );
    assert_eq!(done.lock().unwrap().len(), 41);
    assert_eq!(env.queue_len(&a.inbound_queue).await, 0);
}
