//! `dlq::scan` (the one-pass reader behind `dlq list/show/purge`, plans and the console) on a
//! large queue against the real broker: an early stop, removals on the way and a whole
//! reading each leave the rest of the queue in place, in its order.

mod common;

use common::TestEnv;
use lapin::BasicProperties;
use session_worker::dlq::scan::{scan, Scanned, Take};
use session_worker::sim::Faults;

const N: usize = 20_000;

fn id(i: usize) -> String {
    format!("m-{i:05}")
}

/// Publish `N` small messages, ids in order, straight into `queue`.
async fn fill(env: &TestEnv, queue: &str) {
    let messages = (0..N).map(|i| {
        let props = BasicProperties::default()
            .with_message_id(id(i).into())
            .with_delivery_mode(2);
        (format!("{{\"n\":{i}}}").into_bytes(), props)
    });
    common::dlq::publish_confirmed(&env.ch, "", queue, messages).await;
}

fn message_id(d: &lapin::message::Delivery) -> String {
    d.properties
        .message_id()
        .as_ref()
        .map(|m| m.to_string())
        .unwrap_or_default()
}

/// Every message id of `queue`, in queue order, by one whole pass.
async fn ids(env: &TestEnv, queue: &str) -> Vec<String> {
    let mut out = Vec::new();
    scan(&env.conn, queue, |d| {
        out.push(message_id(d));
        Take::Keep
    })
    .await
    .expect("a whole pass");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_stop_and_removals_on_a_large_queue_leave_the_rest_in_place_and_in_order() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    let q = env.settings.amqp.dead_letter_queue.clone();
    fill(&env, &q).await;
    let all: Vec<String> = (0..N).map(id).collect();

    // Stop at the tenth: the broker had pushed far more to the reader (no prefetch limit);
    // all of it goes back, in place.
    let mut seen = 0;
    let stopped = scan(&env.conn, &q, |_| {
        seen += 1;
        if seen == 10 {
            Take::Stop
        } else {
            Take::Keep
        }
    })
    .await
    .expect("a pass stopped early");
    assert_eq!(
        stopped,
        Scanned {
            depth: N as u32,
            seen: 10,
            removed: 0
        }
    );
    assert_eq!(env.queue_len(&q).await, N as u32);
    assert_eq!(ids(&env, &q).await, all, "same messages, same order");

    // Remove every thousandth on the way and stop three quarters in.
    let stop_at = id(N * 3 / 4);
    let removed = scan(&env.conn, &q, |d| {
        let m = message_id(d);
        if m == stop_at {
            Take::Stop
        } else if m.ends_with("000") {
            Take::Remove
        } else {
            Take::Keep
        }
    })
    .await
    .expect("a pass removing some");
    assert_eq!(removed.removed, 15, "{removed:?}");
    assert_eq!(removed.seen as usize, N * 3 / 4 + 1, "{removed:?}");
    let left: Vec<String> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 1000 != 0 || *i >= N * 3 / 4)
        .map(|(_, m)| m.clone())
        .collect();
    assert_eq!(env.queue_len(&q).await as usize, left.len());
    assert_eq!(ids(&env, &q).await, left, "the rest in its order");

    // A pass that removes everything leaves nothing, and one over an empty queue sees nothing.
    let emptied = scan(&env.conn, &q, |_| Take::Remove).await.expect("purge");
    assert_eq!(emptied.removed as usize, left.len());
    assert_eq!(env.queue_len(&q).await, 0);
    let none = scan(&env.conn, &q, |_| Take::Keep).await.expect("empty");
    assert_eq!(none, Scanned::default());
}
