//! The `dlq …` commands' command-line edge: output, progress and exit codes. The logic lives in
//! [`crate::dlq`], which returns typed errors; `audit …` is [`super::audit_ops`].

use super::args::{DlqAction, DlqFilterArgs};
use super::audit_ops::audit_table;
use super::exit::{fail, usage, EXIT_OK};
use super::table::{self, or_dash, Table};
use crate::admin::Operation;
use crate::audit::{self, AuditAccess};
use crate::config::Settings;
use crate::dlq::{self, DlqMessage, Filter, ReplayOptions};
use crate::store::AuditQuery;

pub(super) fn to_filter(args: &DlqFilterArgs) -> Result<Filter, audit::AuditError> {
    Ok(Filter {
        reason: args.reason.clone(),
        id: args.id.clone(),
        since_us: args.since.as_deref().map(audit::parse_time).transpose()?,
        max: args.max,
        ..Default::default()
    })
}

/// Where a pod's Kubernetes service account token is mounted.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// Who runs an operator command, for its audit entry: `--operator`, else `$USER`, else
/// `$LOGNAME`, else the pod's service account (the `sub` of its token), else a value that says
/// none was found.
pub fn operator(explicit: Option<&str>) -> String {
    let named = |v: Option<String>| v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    named(explicit.map(str::to_string))
        .or_else(|| named(std::env::var("USER").ok()))
        .or_else(|| named(std::env::var("LOGNAME").ok()))
        .or_else(|| {
            std::fs::read_to_string(SERVICE_ACCOUNT_TOKEN)
                .ok()
                .and_then(|t| token_subject(&t))
        })
        .unwrap_or_else(|| {
            "unknown (no --operator, $USER, $LOGNAME or service account token)".into()
        })
}

/// The `sub` claim of a JWT (`system:serviceaccount:NAMESPACE:NAME` for a service account).
fn token_subject(token: &str) -> Option<String> {
    use base64::Engine;
    let payload = token.trim().split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims.get("sub")?.as_str().map(str::to_string)
}

/// A filter as an operator would write it: `queue=worker reason=permanent_api_error max=10`.
pub fn describe_filter(args: &DlqFilterArgs) -> String {
    let queue = match args.queue {
        super::args::QueueArg::Worker => "worker",
        super::args::QueueArg::Webhook => "webhook",
    };
    let mut parts = vec![format!("queue={queue}")];
    if let Some(r) = &args.reason {
        parts.push(format!("reason={r}"));
    }
    if let Some(id) = &args.id {
        parts.push(format!("id={id}"));
    }
    if let Some(since) = &args.since {
        parts.push(format!("since={since}"));
    }
    if let Some(max) = args.max {
        parts.push(format!("max={max}"));
    }
    if parts.len() == 1 {
        parts.push("(every message)".into());
    }
    parts.join(" ")
}

/// The DLQ as a table: ids whole (paste them into `dlq show`, `--id`, `audit show`), the
/// detail wrapped under each row.
pub(super) fn dlq_table(messages: &[DlqMessage]) -> Table {
    let mut t = Table::new(&[
        "MESSAGE ID",
        "REASON",
        "STATUS>",
        "ATTEMPTS>",
        "REPLAYS>",
        "FAILED AT",
        "IDEMPOTENCY KEY",
    ]);
    for m in messages {
        let key = match &m.idempotency_key {
            Some(k) if *k == m.message_id => "(same)".to_string(),
            other => or_dash(other.clone()),
        };
        let mut notes = Vec::new();
        if let Some(d) = &m.detail {
            notes.push(d.clone());
        }
        if let Some(c) = &m.correlation_id {
            notes.push(format!("correlation id {c}"));
        }
        t.row(
            vec![
                m.message_id.clone(),
                or_dash(m.reason.clone()),
                or_dash(m.status),
                or_dash(m.attempts),
                m.replay_count.to_string(),
                or_dash(m.failed_at.clone()),
                key,
            ],
            notes,
        );
    }
    t
}

/// Audit entries as a table, oldest first; details wrapped under each row.
async fn show_message(settings: &Settings, queue: &str, v: &serde_json::Value) {
    let field = |k: &str| match &v[k] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let width = table::width();
    println!("message id       {}", field("message_id"));
    println!("queue            {queue}");
    println!("reason           {}", field("reason"));
    println!("status           {}", field("status"));
    println!("failed at        {}", field("failed_at"));
    println!("attempts         {}", field("attempts"));
    println!("replays          {}", field("replay_count"));
    println!("idempotency key  {}", field("idempotency_key"));
    println!("correlation id   {}", field("correlation_id"));
    println!(
        "source           {} / {}",
        field("exchange"),
        field("routing_key")
    );
    println!("detail");
    for line in table::wrap(&field("detail"), width.saturating_sub(4)) {
        println!("    {line}");
    }
    if let serde_json::Value::String(key) = &v["idempotency_key"] {
        let entries = match AuditAccess::open(settings) {
            Ok(access) => {
                access
                    .query(&AuditQuery {
                        key: Some(key.clone()),
                        ..Default::default()
                    })
                    .await
            }
            Err(e) => Err(e),
        };
        match entries {
            Ok(entries) if entries.is_empty() => println!("audit entries    none on this pod"),
            Ok(entries) => {
                println!("audit entries");
                print!("{}", audit_table(&entries).render(width, false));
            }
            Err(e) => println!("audit entries    not available here: {e}"),
        }
    }
    println!("headers");
    if let serde_json::Value::Object(h) = &v["headers"] {
        for (k, val) in h {
            let text = match val {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            println!("    {k}: {text}");
        }
    }
    println!("body");
    let body = match (&v["body"], &v["body_base64"]) {
        (serde_json::Value::String(b), _) => b.clone(),
        (_, serde_json::Value::String(b)) => format!("(base64) {b}"),
        _ => "-".into(),
    };
    println!("    {body}");
}

pub(super) async fn record(settings: &Settings, operation: Operation) {
    let written = match AuditAccess::open(settings) {
        Ok(access) => access.record(&operation).await,
        Err(e) => Err(e),
    };
    if let Err(e) = written {
        eprintln!("warning: the audit entry could not be written: {e}");
    }
}

pub(super) fn operation(
    kind: &str,
    queue: &str,
    count: usize,
    operator: String,
    completed: bool,
    detail: String,
) -> Operation {
    Operation {
        kind: kind.into(),
        queue: queue.to_string(),
        count: count as u64,
        operator,
        outcome: match (completed, count) {
            (false, _) => "interrupted".into(),
            (true, 0) => "nothing_matched".into(),
            (true, _) => "done".into(),
        },
        detail,
        ..Default::default()
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
            format,
        } => {
            let name = dlq::queue_name(settings, queue.into()).to_string();
            let filter = Filter {
                reason,
                max: limit,
                ..Default::default()
            };
            match dlq::list(&conn, &name, &filter).await {
                Ok((depth, messages)) => {
                    if format.json {
                        for m in &messages {
                            println!("{}", serde_json::to_string(m).unwrap_or_default());
                        }
                    } else {
                        println!("{name}: {depth} message(s); showing {}", messages.len());
                        let t = dlq_table(&messages);
                        if !t.is_empty() {
                            print!("{}", t.render(table::width(), format.wide));
                        }
                    }
                    EXIT_OK
                }
                Err(e) => fail(e),
            }
        }
        DlqAction::Show { id, queue, json } => {
            let name = dlq::queue_name(settings, queue.into()).to_string();
            match dlq::show(&conn, &name, &id).await {
                Ok(Some(v)) if json => {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                    EXIT_OK
                }
                Ok(Some(v)) => {
                    show_message(settings, &name, &v).await;
                    EXIT_OK
                }
                Ok(None) => fail(format!("no message with id {id:?} in {name}")),
                Err(e) => fail(e),
            }
        }
        DlqAction::Plan {
            filter,
            group,
            json,
        } => super::plan_ops::make_plan(settings, &conn, &filter, group, json).await,
        DlqAction::Replay {
            plan: Some(id),
            canary,
            stop_ratio,
            force,
            operator: who,
            ..
        } => {
            let run = super::plan_ops::PlanRun {
                id,
                canary,
                stop_ratio,
                force,
                operator: who,
            };
            super::plan_ops::replay_plan(settings, &conn, run).await
        }
        DlqAction::Replay {
            filter,
            rate,
            dry_run,
            force,
            operator: who,
            ..
        } => {
            let options = ReplayOptions {
                run_id: format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
                rate_per_sec: rate,
                dry_run,
                force,
            };
            super::replay_ops::replay(settings, &conn, &filter, options, operator(who.as_deref()))
                .await
        }
        DlqAction::Purge {
            filter,
            yes,
            operator: who,
        } => purge(settings, &conn, &filter, yes, operator(who.as_deref())).await,
    };
    let _ = conn.close(200, "done".into()).await;
    code
}

async fn purge(
    settings: &Settings,
    conn: &lapin::Connection,
    args: &DlqFilterArgs,
    yes: bool,
    operator: String,
) -> i32 {
    let filter = match to_filter(args) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    let queue = dlq::queue_name(settings, args.queue.into()).to_string();
    match dlq::purge(conn, &queue, &filter, yes, |_| {}).await {
        Ok(moved) if !yes => usage(format!(
            "{} of {} message(s) in {queue} match; nothing was removed. Add --yes to remove them",
            moved.matched, moved.depth
        )),
        Ok(moved) => {
            println!(
                "purged {} of {} message(s) from {queue}",
                moved.moved, moved.depth
            );
            let detail = format!(
                "purged {} of {} looked at ({} in the queue); filter: {}",
                moved.moved,
                moved.seen,
                moved.depth,
                describe_filter(args)
            );
            record(
                settings,
                operation("dlq_purge", &queue, moved.moved, operator, true, detail),
            )
            .await;
            EXIT_OK
        }
        Err(e) => fail(e),
    }
}
