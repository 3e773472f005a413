//! The published contract (docs/schemas, docs/asyncapi.yaml) agrees with the code: the same
//! fixtures go through the JSON Schemas and through the worker's validation.

use serde_json::{json, Value};
use session_worker::config::Settings;
use session_worker::event::{EventError, EventKind, ResultEvent};
use session_worker::request::SessionRequest;
use std::path::PathBuf;

fn doc(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn schema(path: &str) -> jsonschema::Validator {
    let text = std::fs::read_to_string(doc(path)).unwrap();
    let value: Value = serde_json::from_str(&text).unwrap();
    jsonschema::validator_for(&value)
        .unwrap_or_else(|e| panic!("{path} is not a valid schema: {e}"))
}

fn request_fixtures() -> Vec<(&'static str, Value, bool)> {
    vec![
        (
            "spec example",
            json!({"visitor_id": "guest-88421-uuid", "queue_id": "routing-queue-id", "visitor_name": "Anonymous Visitor", "bot_score": 0.12, "source": "marketing_landing", "external_id": "ext-track-9921", "attributes": {"campaign": "spring"}, "idempotency_key": "optional-explicit-key"}),
            true,
        ),
        ("minimal", json!({"visitor_id": "v", "queue_id": "q"}), true),
        (
            "nulls for optionals",
            json!({"visitor_id": "v", "queue_id": "q", "bot_score": null, "source": null, "attributes": null}),
            true,
        ),
        (
            "score bounds",
            json!({"visitor_id": "v", "queue_id": "q", "bot_score": 1.0}),
            true,
        ),
        ("missing visitor", json!({"queue_id": "q"}), false),
        ("missing queue", json!({"visitor_id": "v"}), false),
        (
            "empty visitor",
            json!({"visitor_id": "", "queue_id": "q"}),
            false,
        ),
        (
            "blank queue",
            json!({"visitor_id": "v", "queue_id": "   "}),
            false,
        ),
        (
            "visitor too long",
            json!({"visitor_id": "x".repeat(257), "queue_id": "q"}),
            false,
        ),
        (
            "visitor at limit",
            json!({"visitor_id": "x".repeat(256), "queue_id": "q"}),
            true,
        ),
        (
            "score too high",
            json!({"visitor_id": "v", "queue_id": "q", "bot_score": 1.01}),
            false,
        ),
        (
            "score negative",
            json!({"visitor_id": "v", "queue_id": "q", "bot_score": -0.5}),
            false,
        ),
        (
            "score as text",
            json!({"visitor_id": "v", "queue_id": "q", "bot_score": "0.5"}),
            false,
        ),
        (
            "number as id",
            json!({"visitor_id": 42, "queue_id": "q"}),
            false,
        ),
        (
            "attributes as list",
            json!({"visitor_id": "v", "queue_id": "q", "attributes": [1]}),
            false,
        ),
        (
            "unknown field",
            json!({"visitor_id": "v", "queue_id": "q", "colour": "red"}),
            false,
        ),
        (
            "empty key",
            json!({"visitor_id": "v", "queue_id": "q", "idempotency_key": ""}),
            false,
        ),
        ("not an object", json!(["v", "q"]), false),
    ]
}

#[test]
fn request_schema_accepts_exactly_what_the_worker_accepts() {
    let v = schema("docs/schemas/session-request.schema.json");
    for (name, body, valid) in request_fixtures() {
        let worker = SessionRequest::parse(&serde_json::to_vec(&body).unwrap()).is_ok();
        let schema_ok = v.is_valid(&body);
        assert_eq!(worker, valid, "worker on {name}");
        assert_eq!(schema_ok, valid, "schema on {name}");
    }
}

fn events() -> Vec<ResultEvent> {
    let mut started = ResultEvent::new(EventKind::SessionStarted, "k1", "v", "q");
    started.conversation_id = Some("c-1".into());
    started.latency_ms = 12.5;
    started.attempts = 1;
    let mut out = vec![started];
    for (kind, reason, status) in [
        (EventKind::SessionFailed, "permanent_api_error", Some(404)),
        (EventKind::SessionFailed, "retries_exhausted", Some(503)),
        (EventKind::SessionRejected, "invalid_request", None),
        (EventKind::SessionRejected, "idempotency_conflict", None),
    ] {
        let mut e = ResultEvent::new(kind, "k2", "v", "q");
        e.error = Some(EventError {
            reason: reason.into(),
            status,
            message: "m".into(),
        });
        out.push(e);
    }
    out
}

#[test]
fn event_schema_accepts_what_the_worker_produces_and_rejects_malformed_events() {
    let v = schema("docs/schemas/result-event.schema.json");
    for e in events() {
        let value = serde_json::to_value(&e).unwrap();
        assert!(v.is_valid(&value), "{value}");
    }
    let good = serde_json::to_value(&events()[0]).unwrap();
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("event_id");
    let mut bad_kind = good.clone();
    bad_kind["event"] = json!("session_exploded");
    let mut extra = good.clone();
    extra["surprise"] = json!(1);
    let mut started_with_error = good.clone();
    started_with_error["error"] =
        json!({"reason": "retries_exhausted", "status": 503, "message": "x"});
    for (name, bad) in [
        ("missing event_id", missing),
        ("unknown event", bad_kind),
        ("extra field", extra),
        ("started with error", started_with_error),
    ] {
        assert!(!v.is_valid(&bad), "schema accepted {name}");
    }
    // The code's own reader agrees on the structural ones.
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("event_id");
    assert!(serde_json::from_value::<ResultEvent>(missing).is_err());
}

#[test]
fn asyncapi_names_the_configured_exchanges_queues_and_schemas() {
    let text = std::fs::read_to_string(doc("docs/asyncapi.yaml")).unwrap();
    let api: serde_norway::Value = serde_norway::from_str(&text).expect("asyncapi.yaml parses");
    assert_eq!(api["asyncapi"].as_str(), Some("3.0.0"));
    let s = Settings::load_from(None, &Default::default()).unwrap();
    let channels = &api["channels"];
    assert_eq!(
        channels["sessionRequests"]["address"].as_str(),
        Some(s.amqp.inbound_exchange.as_str())
    );
    assert_eq!(
        channels["sessionResults"]["address"].as_str(),
        Some(s.amqp.results_exchange.as_str())
    );
    assert_eq!(
        channels["deadLetters"]["address"].as_str(),
        Some(s.amqp.dead_letter_queue.as_str())
    );
    assert_eq!(
        channels["webhookDeadLetters"]["address"].as_str(),
        Some(s.amqp.webhook_dead_letter_queue.as_str())
    );
    for r in [
        "./schemas/session-request.schema.json",
        "./schemas/result-event.schema.json",
    ] {
        assert!(
            text.contains(r) && doc(&format!("docs/{}", r.trim_start_matches("./"))).exists(),
            "{r}"
        );
    }
    let headers = &api["components"]["schemas"]["DeadLetterHeaders"]["properties"];
    for h in [
        "x-failure-reason",
        "x-failure-detail",
        "x-failure-status",
        "x-attempts",
        "x-failed-at",
        "x-worker-id",
    ] {
        assert!(headers.get(h).is_some(), "{h} documented");
    }
}
