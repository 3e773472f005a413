//! `dlq replay`'s command-line edge (without a plan): the pass, its spinner, its report and
//! its audit entry. Split from [`super::ops`], which dispatches to it.

use super::args::DlqFilterArgs;
use super::exit::{fail, usage, EXIT_OK};
use super::ops::{describe_filter, dlq_table, operation, record, to_filter};
use super::table;
use crate::config::Settings;
use crate::dlq::{self, ReplayOptions};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// How often a replay without a terminal says how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

pub(super) async fn replay(
    settings: &Settings,
    conn: &lapin::Connection,
    args: &DlqFilterArgs,
    options: ReplayOptions,
    operator: String,
) -> i32 {
    let (rate, dry_run) = (options.rate_per_sec, options.dry_run);
    let filter = match to_filter(args) {
        Ok(f) => f,
        Err(e) => return usage(e),
    };
    if rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return usage("--rate must be a positive number of messages per second");
    }
    let queue = dlq::queue_name(settings, args.queue.into()).to_string();
    let described = describe_filter(args);
    let terminal = std::io::stderr().is_terminal();
    let bar = replay_bar(terminal && !dry_run);
    let mut rehearsed = Vec::new();
    if !dry_run {
        eprintln!(
            "replay {}: {queue}, {described}{}; Ctrl-C stops it after the message in hand",
            options.run_id,
            rate.map(|r| format!(", at most {r}/s")).unwrap_or_default()
        );
    }
    let stop = crate::shutdown::Shutdown::on_signals();
    let started = std::time::Instant::now();
    let mut last_said = started;
    let result = dlq::replay(
        conn,
        settings,
        args.queue.into(),
        &filter,
        &options,
        &stop,
        |m, so_far| {
            if dry_run {
                rehearsed.push(m.clone());
                return;
            }
            bar.set_length(u64::from(so_far.depth));
            bar.set_position(so_far.moved as u64);
            if !terminal && last_said.elapsed() >= PROGRESS_EVERY {
                last_said = std::time::Instant::now();
                eprintln!(
                    "replay {}: {} replayed, {} of {} looked at, {:.1}/s",
                    options.run_id,
                    so_far.moved,
                    so_far.seen,
                    so_far.depth,
                    so_far.moved as f64 / started.elapsed().as_secs_f64().max(0.001)
                );
            }
        },
    )
    .await;
    bar.finish_and_clear();
    let moved = match result {
        Ok(moved) => moved,
        Err(e) => {
            return fail(format!(
                "{e}; messages already replayed were removed from the DLQ, the rest stay"
            ))
        }
    };
    if dry_run {
        print_rehearsal(&rehearsed, &moved, &queue);
        return EXIT_OK;
    }
    let ending = report_replay(&options, &moved, &queue, started.elapsed().as_secs_f64());
    let detail = format!(
        "run {}: {ending}; replayed {} of {} looked at ({} in the queue); filter: {described}{}{}",
        options.run_id,
        moved.moved,
        moved.seen,
        moved.depth,
        rate.map(|r| format!("; rate {r}/s")).unwrap_or_default(),
        if options.force { "; --force" } else { "" },
    );
    record(
        settings,
        operation(
            "dlq_replay",
            &queue,
            moved.moved,
            operator,
            moved.completed,
            detail,
        ),
    )
    .await;
    EXIT_OK
}

/// The replay's last words on stdout; how it ended (for the audit entry).
fn report_replay(
    options: &ReplayOptions,
    moved: &dlq::Moved,
    queue: &str,
    elapsed: f64,
) -> &'static str {
    let ending = if !moved.completed {
        "interrupted"
    } else if moved.met_own_copy {
        "stopped at a copy it had replayed itself, failed again"
    } else {
        "done"
    };
    println!(
        "replay {}: {ending}: replayed {} of {} message(s) in {queue} in {elapsed:.1} s ({:.1}/s); looked at {}; non-matching messages stay in order",
        options.run_id,
        moved.moved,
        moved.depth,
        moved.moved as f64 / elapsed.max(0.001),
        moved.seen,
    );
    if moved.held_back > 0 {
        println!(
            "{} outcome_unknown message(s) stay in {queue}: Genesys Cloud may have created their sessions. Check there, then replay them with --force",
            moved.held_back
        );
    }
    ending
}

/// The spinner a replay shows on a terminal (hidden otherwise).
fn replay_bar(shown: bool) -> ProgressBar {
    let bar = if shown {
        ProgressBar::new_spinner()
    } else {
        ProgressBar::hidden()
    };
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {pos} replayed of {len} in the queue ({per_sec}) {elapsed}",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(120));
    bar
}

/// What a dry run would replay.
fn print_rehearsal(rehearsed: &[dlq::DlqMessage], moved: &dlq::Moved, queue: &str) {
    println!("dry run: nothing is moved");
    if !rehearsed.is_empty() {
        print!("{}", dlq_table(rehearsed).render(table::width(), false));
    }
    println!(
        "would replay {} of {} message(s) in {queue}",
        moved.matched, moved.depth
    );
    if moved.held_back > 0 {
        println!(
            "{} outcome_unknown message(s) would stay: they need --force",
            moved.held_back
        );
    }
}
