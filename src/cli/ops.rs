//! The operator commands' command-line edge: `dlq …` and `audit …` output and exit codes.
//! The logic lives in [`crate::dlq`] and [`crate::audit`], which return typed errors.

use super::args::{AuditAction, DlqAction, DlqFilterArgs};
use super::exit::{fail, usage, EXIT_OK};
use crate::admin::Operation;
use crate::audit::{self, AuditAccess};
use crate::config::Settings;
use crate::dlq::{self, DlqMessage, Filter, ReplayOptions};
use crate::store::{AuditEntry, AuditQuery};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

fn to_filter(args: &DlqFilterArgs) -> Result<Filter, audit::AuditError> {
    Ok(Filter {
        reason: args.reason.clone(),
        id: args.id.clone(),
        since_us: args.since.as_deref().map(audit::parse_time).transpose()?,
        max: args.max,
    })
}

fn operator() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn table_row(m: &DlqMessage) -> String {
    let detail: String = m
        .detail
        .clone()
        .unwrap_or_default()
        .chars()
        .take(60)
        .collect();
    format!(
        "{:<38} {:<22} {:>6} {:>8} {:<25} {}",
        m.message_id,
        m.reason.clone().unwrap_or_else(|| "-".into()),
        m.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        m.attempts
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        m.failed_at.clone().unwrap_or_else(|| "-".into()),
        detail
    )
}

fn table_header() -> String {
    format!(
        "{:<38} {:<22} {:>6} {:>8} {:<25} {}",
        "MESSAGE ID", "REASON", "STATUS", "ATTEMPTS", "FAILED AT", "DETAIL"
    )
}

async fn record(settings: &Settings, operation: Operation) {
    let written = match AuditAccess::open(settings) {
        Ok(access) => access.record(&operation).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        eprintln!("warning: the audit entry could not be written: {e}");
    }
}

fn operation(kind: &str, queue: &str, count: usize, detail: String) -> Operation {
    Operation {
        kind: kind.into(),
        queue: queue.to_string(),
        count: count as u64,
        operator: operator(),
        outcome: if count > 0 {
            "done".into()
        } else {
            "nothing_matched".into()
        },
        detail,
    }
}

pub async fn dlq_command(settings: &Settings, action: DlqAction) -> i32 {
    let conn = match crate::amqp::connect(&settings.amqp, "session-worker dlq").await {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let code = match action {
        DlqAction::List {
            queue,
            reason,
            limit,
            json,
        } => {
            let name = dlq::queue_name(settings, queue.into()).to_string();
            let filter = Filter {
                reason,
                max: limit,
                ..Default::default()
            };
            match dlq::list(&conn, &name, &filter).await {
                Ok((depth, messages)) => {
                    if json {
                        for m in &messages {
                            println!("{}", serde_json::to_string(m).unwrap_or_default());
                        }
                    } else {
                        println!("{name}: {depth} message(s); showing {}", messages.len());
                        if !messages.is_empty() {
                            println!("{}", table_header());
                            for m in &messages {
                                println!("{}", table_row(m));
                            }
                        }
                    }
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
        DlqAction::Show { id, queue } => {
            match dlq::show(&conn, dlq::queue_name(settings, queue.into()), &id).await {
                Ok(Some(v)) => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    EXIT_OK
                }
                Ok(None) => fail(format!(
                    "no message with id {id:?} in {}",
                    dlq::queue_name(settings, queue.into())
                )),
                Err(e) => fail(e),
            }
        }
        DlqAction::Replay {
            filter,
            rate,
            dry_run,
            force,
        } => {
            let options = ReplayOptions {
                rate_per_sec: rate,
                dry_run,
                force,
            };
            replay(settings, &conn, &filter, options).await
        }
        DlqAction::Purge { filter, yes } => purge(settings, &conn, &filter, yes).await,
    };
    let _ = conn.close(200, "done".into()).await;
    code
}

async fn replay(
    settings: &Settings,
    conn: &lapin::Connection,
    args: &DlqFilterArgs,
    options: ReplayOptions,
) -> i32 {
    let (rate, dry_run) = (options.rate_per_sec, options.dry_run);
    let filter = match to_filter(args) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return usage("--rate must be a positive number of messages per second");
    }
    let bar = if std::io::stderr().is_terminal() && !dry_run {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {pos} replayed ({per_sec}) {elapsed}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    if dry_run {
        println!("dry run: nothing is moved\n{}", table_header());
    }
    let result = dlq::replay(conn, settings, args.queue.into(), &filter, options, |m| {
        if dry_run {
            println!("{}", table_row(m));
        } else {
            bar.inc(1);
        }
    })
    .await;
    bar.finish_and_clear();
    let queue = dlq::queue_name(settings, args.queue.into()).to_string();
    match result {
        Ok(moved) => {
            if dry_run {
                println!(
                    "would replay {} of {} message(s) in {queue}",
                    moved.matched, moved.depth
                );
            } else {
                println!(
                    "replayed {} of {} message(s) in {queue}; non-matching messages stay in order",
                    moved.moved, moved.depth
                );
                let detail = format!("replayed {} message(s) (filter: {:?})", moved.moved, args);
                if moved.held_back > 0 {
                    println!(
                        "{} outcome_unknown message(s) stay in {queue}: Genesys Cloud may have created their sessions. Check there, then replay them with --force",
                        moved.held_back
                    );
                }
                record(
                    settings,
                    operation("dlq_replay", &queue, moved.moved, detail),
                )
                .await;
            }
            EXIT_OK
        }
        Err(e) => fail(format!(
            "{e}; messages already replayed were removed from the DLQ, the rest stay"
        )),
    }
}

async fn purge(
    settings: &Settings,
    conn: &lapin::Connection,
    args: &DlqFilterArgs,
    yes: bool,
) -> i32 {
    let filter = match to_filter(args) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    let queue = dlq::queue_name(settings, args.queue.into()).to_string();
    match dlq::purge(conn, &queue, &filter, yes).await {
        Ok(moved) if !yes => usage(format!(
            "{} of {} message(s) in {queue} match; nothing was removed. Add --yes to remove them",
            moved.matched, moved.depth
        )),
        Ok(moved) => {
            println!(
                "purged {} of {} message(s) from {queue}",
                moved.moved, moved.depth
            );
            let detail = format!("purged {} message(s) (filter: {:?})", moved.moved, args);
            record(
                settings,
                operation("dlq_purge", &queue, moved.moved, detail),
            )
            .await;
            EXIT_OK
        }
        Err(e) => fail(e),
    }
}

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
        AuditAction::Tail { n, follow } => {
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
            print_jsonl(&entries);
            if !follow {
                return EXIT_OK;
            }
            let mut since = audit::micros(std::time::SystemTime::now());
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = audit::micros(std::time::SystemTime::now());
                match access
                    .query(&AuditQuery {
                        since_us: Some(since),
                        until_us: Some(now),
                        ..Default::default()
                    })
                    .await
                {
                    Ok(entries) => print_jsonl(&entries),
                    Err(e) => return fail(e),
                }
                since = now;
            }
        }
        AuditAction::Show { key } => match access
            .query(&AuditQuery {
                key: Some(key.clone()),
                ..Default::default()
            })
            .await
        {
            Ok(entries) if entries.is_empty() => fail(format!("no audit entries for key {key:?}")),
            Ok(entries) => {
                print_jsonl(&entries);
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
