//! Dead letters alike: the group a dead letter falls in, by queue, failure reason and its
//! detail with what differs between messages alike (numbers, ids, quoted values) taken out.
//! The console shows DLQs by group; a plan and a purge can take one group.

use super::{DlqKind, DlqMessage};
use serde::Serialize;

/// Dead letters alike: the same queue, reason and detail once numbers and ids are taken out.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Group {
    pub id: String,
    pub queue: &'static str,
    pub reason: String,
    pub detail: String,
    pub count: usize,
    pub oldest: Option<String>,
    pub newest: Option<String>,
}

pub fn queue_label(kind: DlqKind) -> &'static str {
    match kind {
        DlqKind::Worker => "worker",
        DlqKind::Webhook => "webhook",
    }
}

/// The group a dead letter falls in (`count` 1, `oldest`/`newest` its own time).
pub fn group_of(kind: DlqKind, m: &DlqMessage) -> Group {
    let queue = queue_label(kind);
    let reason = m.reason.clone().unwrap_or_else(|| "(none)".into());
    let detail = normalise(m.detail.as_deref().unwrap_or(""));
    let id = crate::text::sha256_hex(format!("{queue}\n{reason}\n{detail}").as_bytes())[..12]
        .to_string();
    Group {
        id,
        queue,
        reason,
        detail,
        count: 1,
        oldest: m.failed_at.clone(),
        newest: m.failed_at.clone(),
    }
}

/// A failure detail with what differs between messages alike taken out: numbers become `#`,
/// long hexadecimal and UUID-like tokens `…`, quoted values `"…"`; at most 200 characters.
pub fn normalise(detail: &str) -> String {
    let mut out = String::with_capacity(detail.len().min(200));
    let mut chars = detail.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '"' {
            for n in chars.by_ref() {
                if n == '"' {
                    break;
                }
            }
            out.push_str("\"…\"");
        } else if c.is_ascii_alphanumeric() {
            let mut token = String::from(c);
            while let Some(n) = chars
                .peek()
                .copied()
                .filter(|n| n.is_ascii_alphanumeric() || *n == '-')
            {
                token.push(n);
                chars.next();
            }
            out.push_str(&shape(&token));
        } else {
            out.push(c);
        }
        if out.len() >= 800 {
            break;
        }
    }
    out.chars().take(200).collect()
}

fn shape(token: &str) -> String {
    let digits = token.chars().filter(|c| c.is_ascii_digit()).count();
    let hexish = token.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    if digits == token.len() {
        "#".into()
    } else if hexish && token.len() >= 8 && digits > 0 {
        "…".into()
    } else {
        token.to_string()
    }
}

/// A dead letter with these parts, for tests.
#[cfg(test)]
pub(crate) fn test_message(reason: &str, detail: &str, failed_at: &str) -> DlqMessage {
    DlqMessage {
        message_id: format!("m-{failed_at}"),
        reason: Some(reason.into()),
        detail: Some(detail.into()),
        status: None,
        failed_at: Some(failed_at.into()),
        attempts: None,
        replay_count: 0,
        idempotency_key: None,
        correlation_id: None,
        body: None,
        body_base64: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_message as message;

    #[test]
    fn details_that_differ_only_in_numbers_and_ids_fall_in_one_group() {
        assert_eq!(
            normalise("Genesys Cloud rejected the request: 404 not.found: The routing queue \"q-17\" was not found."),
            "Genesys Cloud rejected the request: # not.found: The routing queue \"…\" was not found."
        );
        assert_eq!(
            normalise("conversation 3f2a9c1e-77aa-4b1c-9d2e-0123456789ab timed out after 30 s"),
            "conversation … timed out after # s"
        );
        let a = group_of(
            DlqKind::Worker,
            &message("permanent_api_error", "404 for queue \"a\"", "t1"),
        );
        let b = group_of(
            DlqKind::Worker,
            &message("permanent_api_error", "404 for queue \"b\"", "t2"),
        );
        let c = group_of(
            DlqKind::Webhook,
            &message("permanent_api_error", "404 for queue \"b\"", "t2"),
        );
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id, "another queue is another group");
        assert!(normalise(&"x".repeat(1000)).chars().count() <= 200);
    }
}
