//! A fleet's ledger written without a fleet: `n` completed keys, each a claim and then an
//! outcome from "another-pod", batched as a busy pod's appender batches them. For the restore
//! bench and the tests of a long restore.

use super::TestEnv;
use session_worker::event::{EventKind, ResultEvent};
use session_worker::fleet::record::{Record, RECORD_TYPE};
use session_worker::store::{AuditEntry, IdemRecord, IdemState};
use std::sync::atomic::{AtomicU8, Ordering};

/// How the restore fill's keys are made: 0 not chosen yet (then `BENCH_RESTORE_RANDOM_KEYS`
/// says), 1 in order, 2 scattered.
static SCATTER: AtomicU8 = AtomicU8::new(0);

/// Make the fill's keys scattered (as real idempotency keys are: sled then inserts them all
/// over its tree) or in order (`restore-000000001`, …: at the tree's right edge).
pub fn scatter_keys(scattered: bool) {
    SCATTER.store(if scattered { 2 } else { 1 }, Ordering::SeqCst);
}

/// Key `i` of the restore fill: in order unless [`scatter_keys`] or
/// `BENCH_RESTORE_RANDOM_KEYS=1` says scattered.
pub fn key_of(i: usize) -> String {
    if SCATTER.load(Ordering::SeqCst) == 0 {
        let from_env = std::env::var("BENCH_RESTORE_RANDOM_KEYS").is_ok_and(|v| v == "1");
        let _ = SCATTER.compare_exchange(
            0,
            if from_env { 2 } else { 1 },
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }
    if SCATTER.load(Ordering::SeqCst) == 2 {
        // splitmix64 of `i`: distinct for distinct `i`, in no order.
        let mut z = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        format!("restore-{:016x}", z ^ (z >> 31))
    } else {
        format!("restore-{i:09}")
    }
}

/// What another pod appended for key `i`: its claim, then its outcome.
pub fn claim_of(i: usize, now: u64) -> Record {
    Record::Claim {
        key: key_of(i),
        claim_id: format!("claim-{i}"),
        worker_id: "another-pod".into(),
        fingerprint: format!("fp-{i}"),
        at_ms: now,
        lease_ms: 60_000,
    }
}

pub fn outcome_of(i: usize, now: u64) -> Record {
    let key = key_of(i);
    // As a real outcome: with the result event a duplicate re-publishes.
    let mut event = ResultEvent::new(
        EventKind::SessionStarted,
        &key,
        &format!("visitor-{i}"),
        "0b8c8ba0-a5cb-4b65-a6d6-3b0b3b7ad3c1",
    );
    event.conversation_id = Some(format!("conv-{i}"));
    event.attempts = 1;
    Record::outcome(
        &key,
        &IdemRecord {
            state: IdemState::Completed,
            fingerprint: format!("fp-{i}"),
            attempts: 1,
            conversation_id: Some(format!("conv-{i}")),
            event: Some(event.clone()),
            worker_id: "another-pod".into(),
            created_at_ms: now,
            updated_at_ms: now,
        },
        &AuditEntry {
            timestamp: event.timestamp.clone(),
            event_type: "session_init".into(),
            idempotency_key: Some(key.clone()),
            visitor_id: Some(event.visitor_id.clone()),
            queue_id: Some(event.queue_id.clone()),
            bot_score: Some(0.12),
            outcome: "started".into(),
            http_status: Some(200),
            conversation_id: event.conversation_id.clone(),
            correlation_id: Some(format!("corr-{i}")),
            latency_ms: Some(41.5),
            attempts: Some(1),
            worker_id: "another-pod".into(),
            ..Default::default()
        },
    )
}

/// Declare the test's ledger stream on `conn` (a worker declares it when it starts).
pub async fn declare(env: &TestEnv, conn: &lapin::Connection) {
    session_worker::amqp::topology::declare_ledger(
        conn,
        &env.settings.amqp,
        env.settings.store.idempotency_ttl,
    )
    .await
    .expect("declare the ledger");
}

/// A consumer of the test's ledger stream from its first message, prefetch `prefetch`.
pub async fn read_from_first(
    env: &TestEnv,
    ch: &lapin::Channel,
    tag: &str,
    prefetch: u16,
) -> lapin::Consumer {
    ch.basic_qos(prefetch, Default::default())
        .await
        .expect("qos");
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        lapin::types::AMQPValue::LongString("first".into()),
    );
    ch.basic_consume(
        env.settings.amqp.ledger_stream.as_str().into(),
        tag.into(),
        Default::default(),
        args,
    )
    .await
    .expect("consume the ledger stream")
}

/// Append `n` completed keys to the test's ledger stream as a fleet writes them: each key's
/// claim, and its outcome a batch later, `per_message` records to a stream message (the
/// appender's batches: ~40 under load, 1 when a pod is quiet).
pub async fn fill_ledger(env: &TestEnv, n: usize, per_message: usize) {
    let conn = super::broker().await;
    declare(env, &conn).await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let now = session_worker::store::now_ms();
    let group = (per_message / 2).max(1);
    let mut confirms = Vec::with_capacity(1024);
    let mut records: Vec<Record> = Vec::with_capacity(per_message * 2);
    let groups = n.div_ceil(group);
    for g in 0..=groups {
        if g < groups {
            records.extend((g * group..((g + 1) * group).min(n)).map(|i| claim_of(i, now)));
        }
        if g > 0 {
            records.extend(((g - 1) * group..(g * group).min(n)).map(|i| outcome_of(i, now)));
        }
        let last = g == groups;
        while records.len() >= per_message || (last && !records.is_empty()) {
            let take = per_message.min(records.len());
            let chunk: Vec<Record> = records.drain(..take).collect();
            let body = if chunk.len() == 1 {
                chunk[0].encode()
            } else {
                Record::encode_batch(&chunk)
            };
            let props = lapin::BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_type(RECORD_TYPE.into());
            let c = ch
                .basic_publish(
                    "".into(),
                    env.settings.amqp.ledger_stream.as_str().into(),
                    Default::default(),
                    &body,
                    props,
                )
                .await
                .expect("publish");
            confirms.push(c);
            if confirms.len() == 1024 {
                for c in confirms.drain(..) {
                    c.await.expect("confirm");
                }
            }
        }
    }
    for c in confirms {
        c.await.expect("confirm");
    }
    let _ = conn.close(200, "".into()).await;
}

/// Append `records` to the test's ledger stream as one message (after [`fill_ledger`]).
pub async fn append(env: &TestEnv, records: &[Record]) {
    let conn = super::broker().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_type(RECORD_TYPE.into());
    ch.basic_publish(
        "".into(),
        env.settings.amqp.ledger_stream.as_str().into(),
        Default::default(),
        &Record::encode_batch(records),
        props,
    )
    .await
    .expect("publish")
    .await
    .expect("confirm");
    let _ = conn.close(200, "".into()).await;
}
