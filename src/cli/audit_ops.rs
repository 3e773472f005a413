//! The `audit …` commands' command-line edge: the trail as a table or JSON Lines, and exit
//! codes. The reading lives in [`crate::audit`].

use super::args::{AuditAction, OutputArgs};
use super::exit::{fail, usage, EXIT_OK};
use super::table::{self, or_dash, Table};
use crate::audit::{self, AuditAccess};
use crate::config::Settings;
use crate::store::{AuditEntry, AuditQuery};
use std::time::Duration;

pub(super) fn audit_table(entries: &[AuditEntry]) -> Table {
    let mut t = Table::new(&[
        "TIME",
        "EVENT",
        "OUTCOME",
        "IDEMPOTENCY KEY",
        "VISITOR",
        "STATUS>",
        "ATTEMPTS>",
        "LATENCY MS>",
        "BY",
    ]);
    for e in entries {
        let mut notes = Vec::new();
        if let Some(n) = e.count {
            notes.push(format!("{n} message(s)"));
        }
        if let Some(c) = &e.conversation_id {
            notes.push(format!("conversation {c}"));
        }
        if let Some(m) = &e.message_id {
            notes.push(format!("message {m}"));
        }
        if let Some(c) = &e.correlation_id {
            notes.push(format!("correlation id {c}"));
        }
        if let Some(d) = &e.detail {
            notes.push(d.clone());
        }
        t.row(
            vec![
                e.timestamp.clone(),
                e.event_type.clone(),
                e.outcome.clone(),
                or_dash(e.idempotency_key.clone()),
                or_dash(e.visitor_id.clone()),
                or_dash(e.http_status),
                or_dash(e.attempts),
                or_dash(e.latency_ms),
                e.operator.clone().unwrap_or_else(|| e.worker_id.clone()),
            ],
            notes,
        );
    }
    t
}

fn print_audit(entries: &[AuditEntry], format: OutputArgs) {
    if format.json {
        print_jsonl(entries);
    } else if !entries.is_empty() {
        print!(
            "{}",
            audit_table(entries).render(table::width(), format.wide)
        );
    }
}

/// `dlq show` for people: the message's facts, its detail wrapped, its key's audit entries,
/// then headers and body.
fn print_jsonl(entries: &[AuditEntry]) {
    for e in entries {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
    }
}

pub async fn audit_command(settings: &Settings, action: AuditAction) -> i32 {
    let access = match AuditAccess::open(settings) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let bound = |t: &Option<String>| t.as_deref().map(audit::parse_time).transpose();
    let stats = matches!(action, AuditAction::Stats { .. });
    match action {
        AuditAction::Tail { n, follow, format } => {
            let entries = match access
                .query(&AuditQuery {
                    tail: Some(n),
                    ..Default::default()
                })
                .await
            {
                Ok(e) => e,
                Err(e) => return fail(e),
            };
            print_audit(&entries, format);
            if !follow {
                return EXIT_OK;
            }
            let mut following = audit::Follow::new(audit::micros(std::time::SystemTime::now()));
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = audit::micros(std::time::SystemTime::now());
                let (since_us, until_us) = following.window(now);
                let fresh = access
                    .query(&AuditQuery {
                        since_us: Some(since_us),
                        until_us: Some(until_us),
                        ..Default::default()
                    })
                    .await
                    .map(|entries| following.fresh(entries, now));
                match fresh {
                    Ok(entries) if format.json => print_jsonl(&entries),
                    Ok(entries) => {
                        // Following: one line per entry, no header after the first screen.
                        let rendered = audit_table(&entries).render(table::width(), true);
                        for line in rendered.lines().skip(1) {
                            println!("{line}");
                        }
                    }
                    Err(e) => return fail(e),
                }
            }
        }
        AuditAction::Show { key, format } => match access
            .query(&AuditQuery {
                key: Some(key.clone()),
                ..Default::default()
            })
            .await
        {
            Ok(entries) if entries.is_empty() => fail(format!("no audit entries for key {key:?}")),
            Ok(entries) => {
                print_audit(&entries, format);
                EXIT_OK
            }
            Err(e) => fail(e),
        },
        AuditAction::Export { since, until } | AuditAction::Stats { since, until }
            if bound(&since).is_err() || bound(&until).is_err() =>
        {
            usage(
                bound(&since)
                    .err()
                    .or(bound(&until).err())
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
            )
        }
        AuditAction::Export { since, until } | AuditAction::Stats { since, until } => {
            let q = AuditQuery {
                since_us: bound(&since).ok().flatten(),
                until_us: bound(&until).ok().flatten(),
                ..Default::default()
            };
            match access.query(&q).await {
                Ok(entries) if stats => {
                    print!("{}", audit::stats(&entries).render());
                    EXIT_OK
                }
                Ok(entries) => {
                    print_jsonl(&entries);
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
    }
}
