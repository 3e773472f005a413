//! Property tests (proptest) over request bodies and AMQP header tables (SPEC §4, §5): random
//! and adversarial inputs never panic, and every message ends either answered (one result
//! event) or dead-lettered with its original bytes.
//!
//! The first two properties run intake and validation in-process over many cases; the last
//! publishes a generated batch to the real broker with a worker running.

mod common;

use common::TestEnv;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, ShortString};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use session_worker::request;
use session_worker::sim::Faults;
use session_worker::worker::intake::{self, Intake};
use std::collections::HashSet;
use std::time::Duration;

/// Any value an AMQP 0-9-1 field table can hold, nested up to 6 levels. `broker` leaves out
/// what RabbitMQ refuses from a publisher (it closes the connection on a short string or a NaN
/// in a header table), so such values can never reach a worker through it.
fn amqp_value(broker: bool) -> BoxedStrategy<AMQPValue> {
    let any_f32 = if broker {
        (-1e30f32..1e30f32).boxed()
    } else {
        any::<f32>().boxed()
    };
    let any_f64 = if broker {
        (-1e300f64..1e300f64).boxed()
    } else {
        any::<f64>().boxed()
    };
    let short_string = if broker {
        "[a-z]{0,20}"
            .prop_map(|s| AMQPValue::LongString(s.into()))
            .boxed()
    } else {
        "[a-z]{0,20}"
            .prop_map(|s| AMQPValue::ShortString(s.into()))
            .boxed()
    };
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any_f32.prop_map(AMQPValue::Float),
        any_f64.prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        ".{0,40}".prop_map(|s| AMQPValue::LongString(s.into())),
        short_string,
        proptest::collection::vec(any::<u8>(), 0..40)
            .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(6, 48, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            proptest::collection::vec(("[a-z-]{1,12}", inner), 0..4)
                .prop_map(|kv| AMQPValue::FieldTable(table(kv))),
        ]
    })
    .boxed()
}

fn table(pairs: Vec<(String, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(ShortString::from(k), v);
    }
    t
}

/// Header tables, with the names the worker reads given random values of any type.
fn headers(broker: bool) -> impl Strategy<Value = FieldTable> {
    let name = prop_oneof![
        Just("x-delivery-count".to_string()),
        Just("x-attempts".to_string()),
        Just("x-delayed-retries".to_string()),
        Just("x-failure-reason".to_string()),
        Just("x-death".to_string()),
        "[a-z-]{1,16}",
    ];
    proptest::collection::vec((name, amqp_value(broker)), 0..6).prop_map(table)
}

/// Request bodies: well-formed, well-formed with fields of random JSON types, JSON of any
/// shape, deep nesting, and raw bytes.
fn body() -> impl Strategy<Value = Vec<u8>> {
    let json_leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,30}".prop_map(serde_json::Value::from),
    ];
    let json = json_leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(".{0,12}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    let field = prop_oneof![
        Just("visitor_id"),
        Just("queue_id"),
        Just("bot_score"),
        Just("source"),
        Just("external_id"),
        Just("idempotency_key"),
        Just("metadata"),
        Just("language"),
    ];
    prop_oneof![
        // Well formed, random but valid-looking values.
        ("[a-z0-9]{1,20}", "[a-z0-9-]{1,20}", 0.0f64..=1.0).prop_map(|(v, q, s)| {
            serde_json::to_vec(&serde_json::json!({
                "visitor_id": v, "queue_id": q, "bot_score": s,
                "source": "proptest", "external_id": format!("ext-{v}")
            }))
            .unwrap_or_default()
        }),
        // Known fields, values of any JSON type.
        proptest::collection::btree_map(field, json.clone(), 0..8).prop_map(|m| {
            let obj: serde_json::Map<String, serde_json::Value> =
                m.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            serde_json::to_vec(&obj).unwrap_or_default()
        }),
        json.prop_map(|v| serde_json::to_vec(&v).unwrap_or_default()),
        (1usize..3000).prop_map(|depth| {
            let mut b = b"{\"visitor_id\":".to_vec();
            b.extend(std::iter::repeat_n(b'[', depth));
            b.extend(std::iter::repeat_n(b']', depth));
            b.push(b'}');
            b
        }),
        proptest::collection::vec(any::<u8>(), 0..300),
    ]
}

fn delivery(
    body: Vec<u8>,
    headers: FieldTable,
    message_id: Option<String>,
) -> lapin::message::Delivery {
    let mut d = lapin::message::Delivery::mock(1, "in".into(), "rk".into(), false, body);
    let mut props = lapin::BasicProperties::default().with_headers(headers);
    if let Some(id) = message_id {
        props = props.with_message_id(id.into());
    }
    d.properties = props;
    d
}

proptest! {
    #![proptest_config(Config { cases: 512, ..Config::default() })]

    #[test]
    fn validation_never_panics_and_valid_means_in_range(body in body(), id in proptest::option::of("[a-z0-9]{1,64}")) {
        if let Ok(valid) = request::validate_message(&body, id.as_deref()) {
            let r = &valid.request;
            prop_assert!(!r.visitor_id.is_empty());
            prop_assert!(!r.queue_id.is_empty());
            if let Some(score) = r.bot_score {
                prop_assert!((0.0..=1.0).contains(&score));
            }
            prop_assert!(!valid.idempotency_key.is_empty());
        }
    }

    #[test]
    fn intake_never_panics_and_keeps_the_original_bytes(
        body in body(),
        headers in headers(false),
        id in proptest::option::of("[a-z0-9]{1,64}"),
    ) {
        match intake::accept(delivery(body.clone(), headers, id), 5, Some(2048)) {
            Intake::Valid(job, _) => prop_assert!(!job.key.is_empty()),
            Intake::Invalid(job, err) => {
                prop_assert_eq!(&job.delivery.data, &body);
                prop_assert!(!err.to_string().is_empty());
            }
            Intake::Poison(job, deliveries) => {
                prop_assert_eq!(&job.delivery.data, &body);
                prop_assert!(deliveries >= 5);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_messages_on_the_broker_each_end_answered_or_dead_lettered_intact() {
    let env = TestEnv::new(Faults::default(), |s| {
        s.worker.max_redeliveries = 5;
    })
    .await;
    // A fixed seed: the same batch every run, so a failure can be reproduced.
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]),
    );
    let strategy = (
        body(),
        headers(true),
        proptest::option::of("[a-z0-9]{1,64}"),
    );
    let n = 80;
    let mut sent = Vec::new();
    for _ in 0..n {
        let (body, headers, id) = strategy
            .new_tree(&mut runner)
            .expect("a generated case")
            .current();
        env.publish_with(&body, id.as_deref(), headers).await;
        sent.push(body);
    }
    let worker = env.start_worker(env.open_store());
    let events = env.events(n, Duration::from_secs(60)).await;
    let dead = env.dead_letters(n, Duration::from_secs(5)).await;
    worker.stop().await;
    assert_eq!(
        events.len(),
        n,
        "every message was answered with one result event"
    );
    let originals: HashSet<&[u8]> = sent.iter().map(Vec::as_slice).collect();
    for d in &dead {
        assert!(
            originals.contains(d.delivery.data.as_slice()),
            "a dead letter carries a published body byte for byte"
        );
    }
    let refused = events.iter().filter(|e| e.error.is_some()).count();
    assert_eq!(
        dead.len(),
        refused,
        "each refused message is dead-lettered once"
    );
    assert_eq!(env.queue_len(&env.settings.amqp.inbound_queue).await, 0);
    eprintln!(
        "properties: {n} generated messages: {} answered, {} dead-lettered intact",
        events.len() - refused,
        dead.len()
    );
}
