//! The console's write API (SPEC §7), for the `operator` role only (a viewer token → 403),
//! each request naming its operator (`X-Operator`, the name given at sign-in):
//!
//! - `POST /api/plans` `{"queue","group"|"reason","max"}` → a dry-run plan, saved;
//!   `GET /api/plans/{id}` shows it again;
//! - `POST /api/replay` `{"plan_id","force","canary","stop_ratio"}` → applies it in the
//!   background (409 if the DLQ changed since); `GET /api/replay/{plan_id}` is its progress,
//!   `POST /api/replay/{plan_id}/pause|resume|abort` steers it;
//! - `POST /api/purge` `{"queue","group","confirm"}`: one group, only when `confirm` is the
//!   queue's name; an audit entry per message and one for the purge.

use super::api::ApiError;
use super::auth::Role;
use super::Console;
use crate::admin::Operation;
use crate::audit::AuditAccess;
use crate::dlq::paced::{self, Control, Progress, RunOptions};
use crate::dlq::plan::{self, Plan, PlanError, Selection};
use crate::dlq::{self, Filter};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::watch;

/// The most messages a plan answer lists (the plan itself keeps them all).
const LISTED: usize = 100;

/// A replay under way (or over), steered through `control`.
pub struct RunHandle {
    control: watch::Sender<Control>,
    progress: watch::Receiver<Progress>,
}

impl From<PlanError> for ApiError {
    fn from(e: PlanError) -> Self {
        let status = match e {
            PlanError::Changed(..) => StatusCode::CONFLICT,
            PlanError::Unknown(..) => StatusCode::NOT_FOUND,
            PlanError::BadId(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, e.to_string())
    }
}

/// Who is writing: an operator token and a name, or the reason why not.
fn writer(role: Role, headers: &HeaderMap) -> Result<String, ApiError> {
    if role != Role::Operator {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "the viewer token only reads: planning, replaying and purging need the operator token",
        ));
    }
    headers
        .get("x-operator")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.len() <= 100)
        .map(str::to_string)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "say who you are: the X-Operator header (the name given at sign-in) goes into the audit trail",
            )
        })
}

fn audit(c: &Console) -> Result<AuditAccess, ApiError> {
    AuditAccess::open(&c.settings).map_err(ApiError::from)
}

fn summary(plan: &Plan) -> Value {
    json!({
        "id": plan.id,
        "created_at": plan.created_at,
        "selection": plan.selection,
        "queue_name": plan.queue_name,
        "depth": plan.depth,
        "total": plan.messages.len(),
        "counts": plan.counts,
        "rate_per_sec": plan.rate_per_sec,
        "estimated_secs": plan.estimated_secs,
        "messages": plan.messages.iter().take(LISTED).collect::<Vec<_>>(),
    })
}

#[derive(Deserialize)]
pub struct PlanRequest {
    #[serde(default)]
    queue: Option<String>,
    group: Option<String>,
    reason: Option<String>,
    max: Option<usize>,
}

/// `POST /api/plans`.
pub async fn make_plan(
    State(c): State<Arc<Console>>,
    Extension(role): Extension<Role>,
    headers: HeaderMap,
    Json(req): Json<PlanRequest>,
) -> Result<Json<Value>, ApiError> {
    writer(role, &headers)?;
    let queue = req.queue.unwrap_or_else(|| "worker".into());
    if queue != "worker" && queue != "webhook" {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "queue is `worker` or `webhook`",
        ));
    }
    if req.group.is_none() && req.reason.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a plan takes a group (or a reason): replaying a whole DLQ at once is not offered",
        ));
    }
    let selection = Selection {
        queue,
        group: req.group,
        reason: req.reason,
        max: req.max,
        ..Default::default()
    };
    let access = {
        let _turn = c.audit_turn.lock().await;
        audit(&c)?
    };
    let turn = c.dlq.reading_turn("a plan").await?;
    let conn = c.connect().await?;
    let made = plan::make(&conn, &c.settings, selection, Some(&access)).await;
    drop(turn);
    drop(access);
    let _ = conn.close(200, "done".into()).await;
    let made = made?;
    plan::save(&c.settings, &made)?;
    Ok(Json(summary(&made)))
}

/// `GET /api/plans/{id}`.
pub async fn show_plan(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let plan = plan::load(&c.settings, &id)?;
    Ok(Json(summary(&plan)))
}

#[derive(Deserialize)]
pub struct ReplayRequest {
    plan_id: String,
    #[serde(default)]
    force: bool,
    canary: Option<Vec<usize>>,
    stop_ratio: Option<f64>,
}

/// `POST /api/replay`: check the plan against the queue, then run it in the background.
pub async fn replay(
    State(c): State<Arc<Console>>,
    Extension(role): Extension<Role>,
    headers: HeaderMap,
    Json(req): Json<ReplayRequest>,
) -> Result<(StatusCode, Json<Progress>), ApiError> {
    let operator = writer(role, &headers)?;
    let plan = plan::load(&c.settings, &req.plan_id)?;
    if let Some(r) = req.stop_ratio.filter(|r| !(0.0..=1.0).contains(r)) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("stop_ratio {r} is not between 0 and 1"),
        ));
    }
    let mut runs = c.runs.lock().await;
    if runs
        .get(&plan.id)
        .is_some_and(|r| !r.progress.borrow().state.is_over())
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("plan {} is being replayed already", plan.id),
        ));
    }
    let conn = c.connect().await?;
    let turn = c.dlq.turn().await;
    plan::check_unchanged(&conn, &c.settings, &plan).await?;
    // Counted as replaying before the turn is given up, so no reading starts in between.
    let replaying = c.dlq.replaying();
    drop(turn);
    let defaults = RunOptions::default();
    let options = RunOptions {
        canary: req.canary.unwrap_or(defaults.canary),
        stop_ratio: req.stop_ratio.unwrap_or(defaults.stop_ratio),
        force: req.force,
        operator,
        role: Some("operator".into()),
        ..defaults
    };
    let access = audit(&c)?;
    let (control, control_rx) = watch::channel(Control::Run);
    let first = Progress::waiting(&plan, &options);
    let (progress_tx, progress) = watch::channel(first.clone());
    runs.insert(plan.id.clone(), RunHandle { control, progress });
    let console = c.clone();
    tokio::spawn(async move {
        let settings = console.settings.clone();
        paced::run(
            &conn,
            &settings,
            &plan,
            options,
            &access,
            control_rx,
            progress_tx,
        )
        .await;
        // Given up as soon as the run's last state is published (no await in between), so a
        // plan or a purge asked for right after it ended is not refused.
        drop(replaying);
        let _ = conn.close(200, "done".into()).await;
        console.dlq.forget().await;
    });
    Ok((StatusCode::ACCEPTED, Json(first)))
}

/// `GET /api/replay/{plan_id}`.
pub async fn progress(
    State(c): State<Arc<Console>>,
    Path(id): Path<String>,
) -> Result<Json<Progress>, ApiError> {
    let runs = c.runs.lock().await;
    let run = runs.get(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no replay of plan {id:?} in this console"),
        )
    })?;
    let p = run.progress.borrow().clone();
    Ok(Json(p))
}

/// `POST /api/replay/{plan_id}/{pause|resume|abort}`.
pub async fn steer(
    State(c): State<Arc<Console>>,
    Extension(role): Extension<Role>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> Result<Json<Progress>, ApiError> {
    writer(role, &headers)?;
    let wanted = match action.as_str() {
        "pause" => Control::Pause,
        "resume" => Control::Run,
        "abort" => Control::Abort,
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "pause, resume or abort",
            ))
        }
    };
    let runs = c.runs.lock().await;
    let run = runs.get(&id).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no replay of plan {id:?} in this console"),
        )
    })?;
    if run.progress.borrow().state.is_over() {
        return Err(ApiError::new(StatusCode::CONFLICT, "that replay is over"));
    }
    run.control.send_replace(wanted);
    let p = run.progress.borrow().clone();
    Ok(Json(p))
}

#[derive(Deserialize)]
pub struct PurgeRequest {
    #[serde(default)]
    queue: Option<String>,
    group: String,
    /// The queue's name, typed.
    confirm: String,
}

/// `POST /api/purge`: remove one group, when `confirm` is the queue's name.
pub async fn purge(
    State(c): State<Arc<Console>>,
    Extension(role): Extension<Role>,
    headers: HeaderMap,
    Json(req): Json<PurgeRequest>,
) -> Result<Json<Value>, ApiError> {
    let operator = writer(role, &headers)?;
    let selection = Selection {
        queue: req.queue.unwrap_or_else(|| "worker".into()),
        group: Some(req.group.clone()),
        ..Default::default()
    };
    let kind = selection.kind();
    let queue = dlq::queue_name(&c.settings, kind).to_string();
    if req.confirm.trim() != queue {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("type the queue's name ({queue}) to confirm: a purge cannot be undone"),
        ));
    }
    let filter: Filter = selection.filter();
    let _turn = c.dlq.reading_turn("a purge").await?;
    let conn = c.connect().await?;
    let mut keys = Vec::new();
    let purged = dlq::purge(&conn, &queue, &filter, true, |m| {
        keys.push((m.message_id.clone(), m.idempotency_key.clone()));
    })
    .await;
    let _ = conn.close(200, "done".into()).await;
    let purged = purged.map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, e.to_string()))?;
    c.dlq.forget().await;
    let access = audit(&c)?;
    let op = |count, outcome: &str, detail: String, key: Option<String>| Operation {
        kind: "dlq_purge".into(),
        queue: queue.clone(),
        count,
        operator: operator.clone(),
        outcome: outcome.into(),
        detail,
        role: Some("operator".into()),
        plan_id: None,
        idempotency_key: key,
    };
    for (id, key) in keys {
        access
            .record(&op(1, "purged", format!("message {id}"), key))
            .await?;
    }
    let detail = format!(
        "group {} purged from the console: {} message(s)",
        req.group, purged.moved
    );
    access
        .record(&op(purged.moved as u64, "done", detail, None))
        .await?;
    Ok(Json(
        json!({ "queue": queue, "group": req.group, "purged": purged.moved }),
    ))
}
