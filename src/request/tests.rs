//! Unit tests of `request.rs`.

#[test]
fn custom_attributes_are_strings_and_routing_fields_win() {
    let r = SessionRequest::parse(
        br#"{"visitor_id":"v","queue_id":"q","bot_score":0.5,"attributes":{"queue_id":"evil","n":3,"s":"x"}}"#,
    )
    .unwrap();
    let a = r.custom_attributes();
    assert_eq!(a["queue_id"], "q");
    assert_eq!(a["bot_score"], "0.5");
    assert_eq!(a["visitor_name"], DEFAULT_VISITOR_NAME);
    assert_eq!(a["n"], "3");
    assert_eq!(a["s"], "x");
    assert!(r
        .check_custom_attributes(r.custom_attributes_size())
        .is_ok());
    let err = r
        .check_custom_attributes(r.custom_attributes_size() - 1)
        .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("attributes"));
    assert!(err.message.contains("bytes"), "{err}");
}

use super::*;

const GOOD: &str = r#"{"visitor_id": "guest-88421-uuid", "queue_id": "routing-queue-id",
 "visitor_name": "Anonymous Visitor", "bot_score": 0.12, "source": "marketing_landing",
 "external_id": "ext-track-9921", "attributes": {"campaign": "spring"},
 "idempotency_key": "optional-explicit-key"}"#;

fn err(body: &[u8]) -> ValidationError {
    SessionRequest::parse(body).unwrap_err()
}

#[test]
fn a_wrong_type_names_the_field() {
    let e = err(br#"{"visitor_id": 5, "queue_id": "q"}"#);
    assert_eq!(e.field.as_deref(), Some("visitor_id"));
    assert!(
        e.to_string().contains("must be a string, got a number"),
        "{e}"
    );
    let e = err(br#"{"visitor_id": "v", "queue_id": "q", "attributes": [1]}"#);
    assert_eq!(e.field.as_deref(), Some("attributes"));
    let e = err(br#"{"visitor_id": "v", "queue_id": "q", "bot_score": "high"}"#);
    assert_eq!(e.field.as_deref(), Some("bot_score"));
}

#[test]
fn a_key_twice_is_refused_at_any_depth() {
    let e = err(
        br#"{"visitor_id": "v", "queue_id": "q", "idempotency_key": "a", "idempotency_key": "b"}"#,
    );
    assert_eq!(e.field.as_deref(), Some("idempotency_key"));
    assert!(e.to_string().contains("twice"), "{e}");
    let e = err(br#"{"visitor_id": "v", "queue_id": "q", "attributes": {"x": 1, "x": 2}}"#);
    assert_eq!(e.field.as_deref(), Some("x"));
    // The same key in two different objects is fine.
    assert!(SessionRequest::parse(
        br#"{"visitor_id": "v", "queue_id": "q", "attributes": {"visitor_id": "inner"}}"#
    )
    .is_ok());
}

#[test]
fn spec_example_is_valid() {
    let v = validate_message(GOOD.as_bytes(), Some("mid")).unwrap();
    assert_eq!(v.idempotency_key, "optional-explicit-key");
    assert_eq!(v.request.bot_score, Some(0.12));
}

#[test]
fn key_falls_back_to_message_id_then_fingerprint() {
    let body = br#"{"visitor_id":"v","queue_id":"q"}"#;
    assert_eq!(
        validate_message(body, Some("m-1")).unwrap().idempotency_key,
        "m-1"
    );
    let v = validate_message(body, None).unwrap();
    assert_eq!(v.idempotency_key, v.fingerprint);
    assert_eq!(v.fingerprint.len(), 64);
}

#[test]
fn fingerprint_ignores_key_order_and_whitespace() {
    let a = validate_message(
        br#"{"visitor_id":"v","queue_id":"q","attributes":{"a":1,"b":2}}"#,
        None,
    )
    .unwrap();
    let b = validate_message(
        br#"{ "attributes":{"b":2,"a":1}, "queue_id":"q", "visitor_id":"v" }"#,
        None,
    )
    .unwrap();
    assert_eq!(a.fingerprint, b.fingerprint);
    let c = validate_message(br#"{"visitor_id":"v","queue_id":"q2"}"#, None).unwrap();
    assert_ne!(a.fingerprint, c.fingerprint);
}

#[test]
fn fingerprint_excludes_explicit_key() {
    let a = validate_message(
        br#"{"visitor_id":"v","queue_id":"q","idempotency_key":"k1"}"#,
        None,
    )
    .unwrap();
    let b = validate_message(br#"{"visitor_id":"v","queue_id":"q"}"#, None).unwrap();
    assert_eq!(a.fingerprint, b.fingerprint);
}

#[test]
fn rejects_every_kind_of_bad_input() {
    assert!(err(b"\xff\xfe").message.contains("UTF-8"));
    assert!(err(b"{not json").message.contains("not JSON"));
    assert!(err(b"[1,2]").message.contains("JSON object"));
    assert_eq!(
        err(br#"{"queue_id":"q"}"#).field.as_deref(),
        Some("visitor_id")
    );
    assert_eq!(
        err(br#"{"visitor_id":"","queue_id":"q"}"#).field.as_deref(),
        Some("visitor_id")
    );
    assert_eq!(
        err(br#"{"visitor_id":"v","queue_id":"  "}"#)
            .field
            .as_deref(),
        Some("queue_id")
    );
    assert!(err(br#"{"visitor_id":5,"queue_id":"q"}"#)
        .message
        .contains("must be a string, got a number"));
    assert_eq!(
        err(br#"{"visitor_id":"v","queue_id":"q","bot_score":1.5}"#)
            .field
            .as_deref(),
        Some("bot_score")
    );
    assert_eq!(
        err(br#"{"visitor_id":"v","queue_id":"q","bot_score":-0.1}"#)
            .field
            .as_deref(),
        Some("bot_score")
    );
    assert!(
        err(br#"{"visitor_id":"v","queue_id":"q","bot_score":"high"}"#)
            .message
            .contains("must be a number, got a string")
    );
    let unknown = err(br#"{"visitor_id":"v","queue_id":"q","colour":"red"}"#);
    assert_eq!(unknown.field.as_deref(), Some("colour"));
    let long = format!(r#"{{"visitor_id":"{}","queue_id":"q"}}"#, "x".repeat(257));
    assert_eq!(err(long.as_bytes()).field.as_deref(), Some("visitor_id"));
    assert!(
        err(br#"{"visitor_id":"v","queue_id":"q","attributes":[1]}"#)
            .message
            .contains("must be an object, got an array")
    );
}

#[test]
fn metadata_limit_is_64_kib() {
    let big = "x".repeat(MAX_METADATA_BYTES);
    let body = format!(r#"{{"visitor_id":"v","queue_id":"q","attributes":{{"blob":"{big}"}}}}"#);
    let e = err(body.as_bytes());
    assert_eq!(e.field.as_deref(), Some("attributes"));
    assert!(e.to_string().contains("64 KiB"));
    let fits = "x".repeat(MAX_METADATA_BYTES - 100);
    let body = format!(r#"{{"visitor_id":"v","queue_id":"q","attributes":{{"blob":"{fits}"}}}}"#);
    assert!(SessionRequest::parse(body.as_bytes()).is_ok());
}

#[test]
fn huge_bodies_and_keys_are_refused() {
    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    assert!(err(&huge).message.contains("at most"));
    let key = "k".repeat(256);
    let body = format!(r#"{{"visitor_id":"v","queue_id":"q","idempotency_key":"{key}"}}"#);
    assert_eq!(
        err(body.as_bytes()).field.as_deref(),
        Some("idempotency_key")
    );
}

#[test]
fn metadata_omits_absent_values() {
    let r = SessionRequest::parse(br#"{"visitor_id":"v","queue_id":"q","source":"web"}"#).unwrap();
    assert_eq!(r.metadata(), serde_json::json!({"source_channel": "web"}));
    assert_eq!(r.visitor_name(), DEFAULT_VISITOR_NAME);
}
