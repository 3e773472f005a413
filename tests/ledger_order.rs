//! The fleet ledger's appender (real broker): a pod's records reach the ledger stream in the
//! order the pod appended them, while more than one batch waits for its confirm (SPEC §9:
//! every pod applies the stream in order, with one rule).

mod common;

use common::TestEnv;
use futures_util::StreamExt;
use session_worker::amqp::shell::SharedConnection;
use session_worker::fleet::record::Record;
use session_worker::fleet::{Fleet, Held};
use session_worker::health::Health;
use session_worker::sim::Faults;
use std::sync::Arc;
use std::time::Duration;

/// More records than one batch holds (512), so several batches are in flight in turn.
const RECORDS: usize = 3_000;

/// Every record in the stream, message by message, until `n` records are read.
async fn read_stream(env: &TestEnv, n: usize) -> (Vec<String>, usize) {
    let ch = env.conn.create_channel().await.expect("channel");
    let mut consumer = common::ledger::read_from_first(env, &ch, "ledger-order", 100).await;
    let (mut keys, mut messages) = (Vec::new(), 0usize);
    while keys.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(20), consumer.next()).await;
        let delivery = next
            .expect("the ledger holds every appended record within 20 s")
            .expect("the consumer is open")
            .expect("a delivery");
        messages += 1;
        let records = Record::decode_message(&delivery.data).expect("a ledger message decodes");
        for record in records {
            match record {
                Some(Record::Release { key, .. }) => keys.push(key),
                other => panic!("only this test's releases are in its ledger, found {other:?}"),
            }
        }
        delivery.acker.ack(Default::default()).await.expect("ack");
    }
    let _ = ch.close(200, "".into()).await;
    (keys, messages)
}

#[tokio::test(flavor = "current_thread")]
async fn a_pods_records_reach_the_ledger_in_the_order_it_appended_them() {
    let env = TestEnv::new(Faults::default(), |_| {}).await;
    common::ledger::declare(&env, &env.conn).await;
    let settings = Arc::new(env.settings.clone());
    let link = SharedConnection::new(&settings.amqp, "ledger-order");
    let health = Arc::new(Health::default());
    // The reader is not run: this test reads the stream itself.
    let (fleet, _reader) = Fleet::new(settings, env.open_store(), health, link);
    let held = Held {
        claim_id: "claim".into(),
        fingerprint: "fingerprint".into(),
    };
    let keys: Vec<String> = (0..RECORDS).map(|i| format!("order-{i:05}")).collect();
    // Joined on this one thread, the appends are handed to the appender in this order, all
    // before it runs: it sends them in batches, the next while the one before is unconfirmed.
    let appended =
        futures_util::future::join_all(keys.iter().map(|key| fleet.release(key, &held))).await;
    let failed = appended.iter().filter(|r| r.is_err()).count();
    assert_eq!(failed, 0, "every append is confirmed");

    let (read, messages) = read_stream(&env, RECORDS).await;
    assert_eq!(read.len(), RECORDS, "every record once");
    let first_out_of_order = read.iter().zip(&keys).position(|(r, k)| r != k);
    assert_eq!(
        first_out_of_order, None,
        "the stream holds the records in the order they were appended"
    );
    assert!(
        messages > 1 && messages < RECORDS / 100,
        "the records went in batches ({messages} ledger messages for {RECORDS} records)"
    );
}
