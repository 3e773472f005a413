//! A paced run's vocabulary: what the operator asks ([`Control`]), where the run stands
//! ([`RunState`], [`Progress`]), how it goes ([`RunOptions`], [`steps`]), and what decides a
//! replayed message ([`verdict`]).

use super::super::plan::Plan;
use super::super::DlqKind;
use crate::store::AuditEntry;
use serde::Serialize;
use std::time::Duration;

/// What the operator asks of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Control {
    Run,
    Pause,
    Abort,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Waiting for the worker's verdict on a canary step.
    Verifying,
    Paused,
    /// Stopped by itself: the re-failure ratio passed the threshold.
    Stopped,
    Aborted,
    Done,
    Failed,
}

impl RunState {
    pub fn is_over(self) -> bool {
        matches!(
            self,
            Self::Stopped | Self::Aborted | Self::Done | Self::Failed
        )
    }
}

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Sizes of the canary steps before the rest.
    pub canary: Vec<usize>,
    /// Stop when more than this share of the verdicts are failures again.
    pub stop_ratio: f64,
    /// Move `needs_force` messages too.
    pub force: bool,
    pub operator: String,
    /// The console role, if from the console.
    pub role: Option<String>,
    /// How long a canary step waits for the worker's verdicts.
    pub verdict_timeout: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            canary: vec![1, 10],
            stop_ratio: 0.5,
            force: false,
            operator: String::new(),
            role: None,
            verdict_timeout: Duration::from_secs(60),
        }
    }
}

/// A run as it stands.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub plan_id: String,
    pub run_id: String,
    pub state: RunState,
    /// Sizes of the steps, the last being the rest.
    pub steps: Vec<usize>,
    /// The step under way (0-based).
    pub step: usize,
    pub total: usize,
    pub replayed: usize,
    /// Verdicts so far: sessions started, and failures again.
    pub succeeded: usize,
    pub refailed: usize,
    pub rate_per_sec: f64,
    /// Seconds spent replaying, the pace's waits included (pauses and canary verdicts left out).
    pub elapsed_secs: f64,
    pub message: String,
}

impl Progress {
    /// A run of `plan` that has not started yet.
    pub fn waiting(plan: &Plan, options: &RunOptions) -> Self {
        let total = plan.ids(options.force).len();
        Progress {
            plan_id: plan.id.clone(),
            run_id: format!("r-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            state: RunState::Running,
            steps: steps(&options.canary, total),
            step: 0,
            total,
            replayed: 0,
            succeeded: 0,
            refailed: 0,
            rate_per_sec: plan.rate_per_sec,
            elapsed_secs: 0.0,
            message: "checking that the DLQ still holds the plan's messages".into(),
        }
    }
}

/// The step sizes for `total` messages: the canaries that fit, then the rest.
pub fn steps(canary: &[usize], total: usize) -> Vec<usize> {
    let mut left = total;
    let mut out = Vec::new();
    for &c in canary.iter().filter(|c| **c > 0) {
        if left <= c {
            break;
        }
        out.push(c);
        left -= c;
    }
    if left > 0 {
        out.push(left);
    }
    out
}

/// What an audit entry says of a replayed message of a `kind` plan: succeeded, failed again, or
/// nothing. A webhook's verdict is the forwarder's first attempt after the replay (a retry
/// scheduled counts as failed again: the receiver still refuses), not the end of its retries.
pub fn verdict(kind: DlqKind, e: &AuditEntry) -> Option<bool> {
    match (kind, e.event_type.as_str()) {
        (DlqKind::Worker, "session_init") => Some(e.outcome == "started"),
        (DlqKind::Webhook, "webhook_delivery") => Some(e.outcome == "delivered"),
        _ => None,
    }
}
