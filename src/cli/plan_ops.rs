//! `dlq plan` and `dlq replay --plan ID` (SPEC §7): the console's plans from the command line.

use super::args::DlqFilterArgs;
use super::exit::{fail, usage, EXIT_OK, EXIT_RUNTIME};
use super::ops::operator;
use crate::audit::{self, AuditAccess};
use crate::config::Settings;
use crate::dlq::paced::{self, Control, RunOptions, RunState};
use crate::dlq::plan::{self, Plan, Selection};
use std::time::Duration;
use tokio::sync::watch;

/// How often a plan's replay says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

pub async fn make_plan(
    settings: &Settings,
    conn: &lapin::Connection,
    args: &DlqFilterArgs,
    group: Option<String>,
    json: bool,
) -> i32 {
    let since_us = match args.since.as_deref().map(audit::parse_time).transpose() {
        Ok(s) => s,
        Err(e) => return usage(e),
    };
    let selection = Selection {
        queue: crate::console::dlq_view::queue_label(args.queue.into()).into(),
        group,
        reason: args.reason.clone(),
        id: args.id.clone(),
        since_us,
        max: args.max,
    };
    // Without the store (a fresh pod, another machine) nothing counts as stored: every
    // message is planned as a call, which is the cautious estimate.
    let access = AuditAccess::open(settings).ok();
    let made = match plan::make(conn, settings, selection, access.as_ref()).await {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    drop(access);
    if let Err(e) = plan::save(settings, &made) {
        return fail(e);
    }
    if json {
        println!("{}", serde_json::to_string(&made).unwrap_or_default());
    } else {
        print_plan(&made);
    }
    EXIT_OK
}

fn print_plan(p: &Plan) {
    println!(
        "plan {}: {} of {} message(s) in {}",
        p.id,
        p.messages.len(),
        p.depth,
        p.queue_name
    );
    for (class, n) in &p.counts {
        let label = serde_json::to_value(class)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!("  {label:<14} {n}");
    }
    println!(
        "a replay moves them at {:.2}/s (half the budget): about {:.0} s; `needs_force` ones only with --force",
        p.rate_per_sec, p.estimated_secs
    );
    println!(
        "apply it with: session-worker dlq replay --plan {} [--canary 1,10] [--stop-ratio 0.5]",
        p.id
    );
}

pub struct PlanRun {
    pub id: String,
    pub canary: Vec<usize>,
    pub stop_ratio: f64,
    pub force: bool,
    pub operator: Option<String>,
}

/// Apply a saved plan; Ctrl-C aborts after the message in hand. Exit 0 when it is done, 1
/// when it stopped by itself, was aborted or failed (the DLQ changed since the plan: 2).
pub async fn replay_plan(settings: &Settings, conn: &lapin::Connection, run: PlanRun) -> i32 {
    let loaded = match plan::load(settings, &run.id) {
        Ok(p) => p,
        Err(e) => return fail(e),
    };
    if let Err(e) = plan::check_unchanged(conn, settings, &loaded).await {
        return usage(e);
    }
    let access = match AuditAccess::open(settings) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let options = RunOptions {
        canary: run.canary,
        stop_ratio: run.stop_ratio,
        force: run.force,
        operator: operator(run.operator.as_deref()),
        ..Default::default()
    };
    let (control_tx, control) = watch::channel(Control::Run);
    let (progress, watching) = watch::channel(paced::Progress::waiting(&loaded, &options));
    let reporter = tokio::spawn(report(watching));
    let aborter = tokio::spawn(async move {
        crate::shutdown::Shutdown::on_signals().requested().await;
        control_tx.send_replace(Control::Abort);
    });
    let ended = paced::run(conn, settings, &loaded, options, &access, control, progress).await;
    reporter.abort();
    aborter.abort();
    println!(
        "plan {} ({}): {}",
        ended.plan_id, ended.run_id, ended.message
    );
    if ended.state == RunState::Done {
        EXIT_OK
    } else {
        EXIT_RUNTIME
    }
}

/// A line on stderr when the run moves on, at most every [`PROGRESS_EVERY`].
async fn report(mut watching: watch::Receiver<paced::Progress>) {
    let mut last = String::new();
    while watching.changed().await.is_ok() {
        let p = watching.borrow().clone();
        let line = format!(
            "plan {}: {:?} step {}/{}: {} of {} replayed, {} started, {} failed again; {}",
            p.plan_id,
            p.state,
            p.step + 1,
            p.steps.len().max(1),
            p.replayed,
            p.total,
            p.succeeded,
            p.refailed,
            p.message
        );
        if line != last {
            eprintln!("{line}");
            last = line;
        }
        tokio::time::sleep(PROGRESS_EVERY).await;
    }
}
