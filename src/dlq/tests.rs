//! Unit tests of `dlq.rs`.

use super::*;
use crate::amqp::{int, table, text};

fn props() -> BasicProperties {
    BasicProperties::default()
        .with_message_id("m-1".into())
        .with_headers(table(vec![
            (header::FAILURE_REASON, text("retries_exhausted")),
            (header::FAILURE_DETAIL, text("503")),
            (header::FAILED_AT, text("2026-11-24T10:00:00Z")),
            (header::ATTEMPTS, int(7)),
            (header::DELAYED_RETRIES, int(4)),
            ("x-producer", text("site")),
        ]))
}

#[test]
fn filters_match_reason_id_and_time() {
    let m = DlqMessage::from_parts(&props(), b"{}");
    assert!(m.matches(&Filter::default()));
    assert!(m.matches(&Filter {
        reason: Some("retries_exhausted".into()),
        ..Default::default()
    }));
    assert!(!m.matches(&Filter {
        reason: Some("invalid_request".into()),
        ..Default::default()
    }));
    assert!(!m.matches(&Filter {
        id: Some("other".into()),
        ..Default::default()
    }));
    let at = crate::audit::parse_time("2026-11-24T09:00:00Z").unwrap();
    assert!(m.matches(&Filter {
        since_us: Some(at),
        ..Default::default()
    }));
    let later = crate::audit::parse_time("2026-11-24T11:00:00Z").unwrap();
    assert!(!m.matches(&Filter {
        since_us: Some(later),
        ..Default::default()
    }));
}

#[test]
fn binary_bodies_are_base64() {
    let m = DlqMessage::from_parts(&BasicProperties::default(), &[0xff, 0x00]);
    assert_eq!(m.body, None);
    assert_eq!(m.body_base64.as_deref(), Some("/wA="));
    assert!(m.message_id.starts_with("sha256:"));
}

#[test]
fn replay_clears_failure_headers_and_counts() {
    let p = replay_properties(&props(), "run-1");
    assert_eq!(header_i64(&p, header::REPLAY_COUNT), Some(1));
    assert_eq!(
        header_string(&p, header::REPLAY_RUN).as_deref(),
        Some("run-1")
    );
    assert_eq!(header_string(&p, header::FAILURE_REASON), None);
    assert_eq!(header_i64(&p, header::DELAYED_RETRIES), None);
    assert_eq!(header_string(&p, "x-producer").as_deref(), Some("site"));
    assert_eq!(
        header_i64(&replay_properties(&p, "run-2"), header::REPLAY_COUNT),
        Some(2)
    );
    let huge =
        BasicProperties::default().with_headers(table(vec![(header::REPLAY_COUNT, int(i64::MAX))]));
    assert_eq!(
        header_i64(&replay_properties(&huge, "run-3"), header::REPLAY_COUNT),
        Some(i64::MAX)
    );
}

#[test]
fn a_plan_runs_its_canaries_then_the_rest() {
    assert_eq!(super::paced::steps(&[1, 10], 100), vec![1, 10, 89]);
    assert_eq!(super::paced::steps(&[1, 10], 5), vec![1, 4]);
    assert_eq!(super::paced::steps(&[1, 10], 1), vec![1]);
    assert_eq!(super::paced::steps(&[1, 10], 0), Vec::<usize>::new());
    assert_eq!(super::paced::steps(&[], 7), vec![7]);
    assert_eq!(super::paced::steps(&[0, 3], 7), vec![3, 4]);
}

#[test]
fn a_verdict_is_the_entry_that_decides_a_replayed_message_of_its_kind() {
    use super::paced::verdict;
    let cases = [
        (DlqKind::Worker, "session_init", "started", Some(true)),
        (
            DlqKind::Worker,
            "session_init",
            "dead_lettered",
            Some(false),
        ),
        (DlqKind::Worker, "webhook_delivery", "delivered", None),
        (
            DlqKind::Webhook,
            "webhook_delivery",
            "delivered",
            Some(true),
        ),
        (
            DlqKind::Webhook,
            "webhook_delivery",
            "retry_scheduled",
            Some(false),
        ),
        (
            DlqKind::Webhook,
            "webhook_delivery",
            "dead_lettered",
            Some(false),
        ),
        (DlqKind::Webhook, "session_init", "started", None),
        (DlqKind::Webhook, "dlq_replay", "replayed", None),
    ];
    for (kind, event, outcome, expected) in cases {
        let entry = crate::store::AuditEntry {
            event_type: event.into(),
            outcome: outcome.into(),
            ..Default::default()
        };
        assert_eq!(
            verdict(kind, &entry),
            expected,
            "{kind:?} {event} {outcome}"
        );
    }
}
