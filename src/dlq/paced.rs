//! Applying a replay plan (console `POST /api/replay`, `dlq replay --plan ID`): the plan's
//! messages go back in canary steps (1, then 10, then the rest by default) at the plan's pace.
//! After each canary step the run waits for the verdict on each replayed key and stops by
//! itself when more than `stop_ratio` of them failed again; during the last step it looks again
//! every [`CHECK_EVERY`] messages. A verdict is the first audit entry after the replay that
//! decides the message ([`verdict`]): the worker's `session_init` for a worker plan, the
//! forwarder's `webhook_delivery` for a webhook plan. It can be paused, resumed and aborted;
//! each message replayed gets its own audit entry (operator, role, plan id, key) and the run one
//! more when it ends.
//!
//! The loop owns its state and reports through a `watch` channel; it takes orders through
//! another.

use super::plan::{check_unchanged, Plan, PlanError};
use super::{replay, Filter, ReplayOptions};
use crate::admin::Operation;
use crate::audit::AuditAccess;
use crate::config::Settings;
use crate::shutdown::Shutdown;
use crate::store::AuditQuery;
use lapin::Connection;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

mod progress;
pub use progress::{steps, verdict, Control, Progress, RunOptions, RunState};

/// In the last step, the re-failure ratio is looked at again after this many messages.
pub const CHECK_EVERY: usize = 50;
/// The fewest verdicts the last step's ratio is judged on.
const MIN_VERDICTS: usize = 10;

struct Run<'a> {
    conn: &'a Connection,
    settings: &'a Settings,
    plan: &'a Plan,
    options: RunOptions,
    audit: &'a AuditAccess,
    control: watch::Receiver<Control>,
    progress: watch::Sender<Progress>,
    p: Progress,
    /// Replayed keys and when, waiting for a verdict.
    waiting: BTreeMap<String, u64>,
    ran_for: Duration,
    /// The pace: `paced` messages moved since `pace_start` (reset after a wait).
    pace_start: tokio::time::Instant,
    paced: usize,
}

/// Apply `plan`: check that the DLQ still holds its messages, then replay them in steps.
/// Returns how it ended (also the last value sent on `progress`).
pub async fn run(
    conn: &Connection,
    settings: &Settings,
    plan: &Plan,
    options: RunOptions,
    audit: &AuditAccess,
    control: watch::Receiver<Control>,
    progress: watch::Sender<Progress>,
) -> Progress {
    let ids = plan.ids(options.force);
    let p = progress.borrow().clone();
    let mut run = Run {
        conn,
        settings,
        plan,
        options,
        audit,
        control,
        progress,
        p,
        waiting: BTreeMap::new(),
        ran_for: Duration::ZERO,
        pace_start: tokio::time::Instant::now(),
        paced: 0,
    };
    run.publish();
    let (state, message) = match run.all_steps(ids).await {
        Ok(ended) => ended,
        Err(e) => (RunState::Failed, e.to_string()),
    };
    run.p.state = state;
    run.p.message = message;
    run.record_end().await;
    run.publish();
    run.p
}

impl Run<'_> {
    fn publish(&mut self) {
        self.p.elapsed_secs = self.ran_for.as_secs_f64();
        self.progress.send_replace(self.p.clone());
    }

    async fn all_steps(&mut self, ids: Vec<String>) -> Result<(RunState, String), PlanError> {
        check_unchanged(self.conn, self.settings, self.plan).await?;
        let mut rest = ids.into_iter();
        let sizes = self.p.steps.clone();
        let last = sizes.len().saturating_sub(1);
        for (step, size) in sizes.into_iter().enumerate() {
            self.p.step = step;
            let batch: Vec<String> = rest.by_ref().take(size).collect();
            let chunk = if step == last { CHECK_EVERY } else { size };
            for part in batch.chunks(chunk.max(1)) {
                if let Some(end) = self.replay_part(part).await? {
                    return Ok(end);
                }
                if step == last {
                    if let Some(end) = self.judge(false).await? {
                        return Ok(end);
                    }
                }
            }
            if step != last {
                if let Some(end) = self.judge(true).await? {
                    return Ok(end);
                }
                self.restart_pace();
            }
        }
        self.judge_final().await
    }

    /// Replay the ids in `part` at the plan's pace, pausing when told; `Some` ends the run.
    async fn replay_part(
        &mut self,
        part: &[String],
    ) -> Result<Option<(RunState, String)>, PlanError> {
        let mut left: BTreeSet<String> = part.iter().cloned().collect();
        while !left.is_empty() {
            let asked = *self.control.borrow();
            match asked {
                Control::Abort => return Ok(Some(self.aborted())),
                Control::Pause => {
                    if let Some(end) = self.paused().await {
                        return Ok(Some(end));
                    }
                    self.restart_pace();
                }
                Control::Run => {}
            }
            self.p.state = RunState::Running;
            self.p.message = format!("step {} of {}", self.p.step + 1, self.p.steps.len());
            self.publish();
            // Verdicts count from before the pass: the worker may decide a replayed message
            // before the pass is over.
            let pass_began = crate::audit::micros(std::time::SystemTime::now());
            let moved = self.pass(&left).await?;
            if moved.is_empty() {
                // Gone from the queue meanwhile (replayed or purged by someone else).
                break;
            }
            for (id, key) in moved {
                left.remove(&id);
                self.p.replayed += 1;
                self.record_message(&id, key.as_deref()).await;
                if let Some(k) = key {
                    self.waiting.insert(k, pass_began);
                }
            }
            self.publish();
        }
        Ok(None)
    }

    /// One pass over the DLQ moving the ids in `left`, stopped early by a pause or an abort.
    /// Returns (message id, idempotency key) of each message moved.
    async fn pass(
        &mut self,
        left: &BTreeSet<String>,
    ) -> Result<Vec<(String, Option<String>)>, PlanError> {
        let (trigger, stop) = Shutdown::new();
        let mut control = self.control.clone();
        // Fires the pass's stop on a pause or an abort, then waits for ever: the pass always
        // ends by itself (returning what it held to the queue).
        let watcher = async move {
            while control.changed().await.is_ok() {
                if *control.borrow() != Control::Run {
                    trigger.fire();
                    break;
                }
            }
            std::future::pending::<()>().await;
        };
        let filter = Filter {
            ids: Some(Arc::new(left.clone())),
            ..Default::default()
        };
        let options = ReplayOptions {
            run_id: self.p.run_id.clone(),
            rate_per_sec: Some(self.plan.rate_per_sec),
            dry_run: false,
            force: self.options.force,
        };
        let kind = self.plan.selection.kind();
        let mut moved = Vec::new();
        // The plan's pace across passes: the n-th message of a stretch at its start + n / rate.
        let began = tokio::time::Instant::now();
        let due =
            self.pace_start + Duration::from_secs_f64(self.paced as f64 / self.plan.rate_per_sec);
        tokio::time::sleep_until(due).await;
        let result = tokio::select! {
            r = replay(self.conn, self.settings, kind, &filter, &options, &stop, |m, _| {
                moved.push((m.message_id.clone(), m.idempotency_key.clone()));
            }) => r,
            () = watcher => Ok(super::Moved::default()),
        };
        self.ran_for += began.elapsed();
        self.paced += moved.len();
        result?;
        Ok(moved)
    }

    async fn paused(&mut self) -> Option<(RunState, String)> {
        self.p.state = RunState::Paused;
        self.p.message = format!("paused after {} of {}", self.p.replayed, self.p.total);
        self.publish();
        loop {
            match *self.control.borrow() {
                Control::Run => return None,
                Control::Abort => return Some(self.aborted()),
                Control::Pause => {}
            }
            if self.control.changed().await.is_err() {
                return Some(self.aborted());
            }
        }
    }

    /// After a wait (a pause, a canary's verdict) the pace starts again from now.
    fn restart_pace(&mut self) {
        self.pace_start = tokio::time::Instant::now();
        self.paced = 0;
    }

    fn aborted(&self) -> (RunState, String) {
        (
            RunState::Aborted,
            format!(
                "aborted by the operator after {} of {} replayed; the rest stay in the DLQ",
                self.p.replayed, self.p.total
            ),
        )
    }

    /// Read the verdicts in; after a canary step (`wait`), until every replayed key has one or
    /// the timeout passes. `Some` when the ratio of failures again passed the threshold.
    async fn judge(&mut self, wait: bool) -> Result<Option<(RunState, String)>, PlanError> {
        let deadline = tokio::time::Instant::now() + self.options.verdict_timeout;
        if wait {
            self.p.state = RunState::Verifying;
            self.p.message = format!(
                "waiting for the worker's verdict on canary step {} ({} message(s))",
                self.p.step + 1,
                self.waiting.len()
            );
            self.publish();
        }
        loop {
            self.read_verdicts().await?;
            if !wait || self.waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                break;
            }
            if *self.control.borrow() == Control::Abort {
                return Ok(Some(self.aborted()));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let verdicts = self.p.succeeded + self.p.refailed;
        let enough = wait || verdicts >= MIN_VERDICTS;
        let ratio = self.p.refailed as f64 / verdicts.max(1) as f64;
        if verdicts > 0 && enough && ratio > self.options.stop_ratio {
            return Ok(Some((
                RunState::Stopped,
                format!(
                    "stopped by itself: {} of {} replayed message(s) failed again ({:.0} % > {:.0} %); {} stay in the DLQ",
                    self.p.refailed,
                    verdicts,
                    ratio * 100.0,
                    self.options.stop_ratio * 100.0,
                    self.p.total - self.p.replayed
                ),
            )));
        }
        Ok(None)
    }

    /// Move the keys whose verdict came after their replay to the counts.
    async fn read_verdicts(&mut self) -> Result<(), PlanError> {
        let Some(since) = self.waiting.values().min().copied() else {
            return Ok(());
        };
        let entries = self
            .audit
            .query(&AuditQuery {
                since_us: Some(since),
                ..Default::default()
            })
            .await
            .map_err(PlanError::Audit)?;
        let kind = self.plan.selection.kind();
        for e in &entries {
            let (Some(key), Some(succeeded)) = (e.idempotency_key.as_deref(), verdict(kind, e))
            else {
                continue;
            };
            let at = humantime::parse_rfc3339_weak(&e.timestamp)
                .map(crate::audit::micros)
                .unwrap_or(0);
            if self.waiting.get(key).is_some_and(|t| at >= *t) {
                self.waiting.remove(key);
                if succeeded {
                    self.p.succeeded += 1;
                } else {
                    self.p.refailed += 1;
                }
            }
        }
        Ok(())
    }

    async fn judge_final(&mut self) -> Result<(RunState, String), PlanError> {
        if let Some(end) = self.judge(false).await? {
            return Ok(end);
        }
        Ok((
            RunState::Done,
            format!(
                "done: {} of {} replayed in {:.1} s; verdicts so far: {} started, {} failed again",
                self.p.replayed,
                self.p.total,
                self.ran_for.as_secs_f64(),
                self.p.succeeded,
                self.p.refailed
            ),
        ))
    }

    fn operation(&self, count: u64, outcome: &str, detail: String, key: Option<&str>) -> Operation {
        Operation {
            kind: "dlq_replay".into(),
            queue: self.plan.queue_name.clone(),
            count,
            operator: self.options.operator.clone(),
            outcome: outcome.into(),
            detail,
            role: self.options.role.clone(),
            plan_id: Some(self.plan.id.clone()),
            idempotency_key: key.map(str::to_string),
        }
    }

    async fn record_message(&self, id: &str, key: Option<&str>) {
        let op = self.operation(
            1,
            "replayed",
            format!("run {}: message {id}", self.p.run_id),
            key,
        );
        if let Err(e) = self.audit.record(&op).await {
            tracing::error!(error = %e, message_id = id, "cannot write the replay's audit entry");
        }
    }

    async fn record_end(&self) {
        let outcome = format!("{:?}", self.p.state).to_lowercase();
        let detail = format!("run {}: {}", self.p.run_id, self.p.message);
        let op = self.operation(self.p.replayed as u64, &outcome, detail, None);
        if let Err(e) = self.audit.record(&op).await {
            tracing::error!(error = %e, "cannot write the replay's audit entry");
        }
    }
}
